//! Pairing lora_A with lora_B, and the tensors that belong to a pair (lora_B bias, DoRA
//! magnitude) or to the config (trainable token ids): shapes and names only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::table::{Halves, Table};
use super::{AdapterConfig, ModuleFactors, Replacement, Stored, TokenRows};
use crate::error::{Error, Result};

/// An adapter's tensors, paired and checked against each other and the config.
pub(super) struct Parts {
    pub modules: BTreeMap<String, ModuleFactors>,
    pub lora_biases: BTreeMap<String, Stored>,
    pub magnitudes: BTreeMap<String, Stored>,
    pub tokens: BTreeMap<String, TokenRows>,
    pub replacements: Vec<Replacement>,
    pub num_params: usize,
}

impl Parts {
    pub(super) fn pair(file: &Path, config: &AdapterConfig, table: Table) -> Result<Parts> {
        let modules = modules(file, config, table.halves)?;
        check_biases(file, &modules, &table.lora_biases)?;
        check_magnitudes(file, config, &modules, &table.magnitudes)?;
        let tokens = tokens(file, config, table.token_deltas)?;
        if modules.is_empty() && tokens.is_empty() && table.replacements.is_empty() {
            return Err(Error::config(file, "the adapter holds no LoRA factors"));
        }
        Ok(Parts {
            modules,
            lora_biases: table.lora_biases,
            magnitudes: table.magnitudes,
            tokens,
            replacements: table.replacements,
            num_params: table.num_params,
        })
    }
}

/// Each module's A and B, with A's rows (the rank) equal to B's columns.
fn modules(
    file: &Path,
    config: &AdapterConfig,
    halves: BTreeMap<(String, bool), Halves>,
) -> Result<BTreeMap<String, ModuleFactors>> {
    let mut modules = BTreeMap::new();
    for ((module, embedding), Halves { a, b }) in halves {
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (Some(f), None) | (None, Some(f)) => {
                return Err(Error::tensor(
                    file,
                    &f.key,
                    "has no matching lora_A/lora_B partner",
                ))
            }
            (None, None) => continue,
        };
        if a.rows == 0 {
            return Err(Error::tensor(file, &a.key, "has rank 0 (no rows)"));
        }
        if a.rows != b.cols {
            return Err(Error::tensor(
                file,
                &a.key,
                format!(
                    "rank mismatch: A is {}×{} and B is {}×{}; A's rows must equal B's columns",
                    a.rows, a.cols, b.rows, b.cols
                ),
            ));
        }
        if let Some(other) = modules.get(&module) {
            let other: &ModuleFactors = other;
            return Err(Error::tensor(
                file,
                &a.key,
                format!(
                    "module {module} has both lora_A/B and lora_embedding_A/B (`{}`)",
                    other.a.key
                ),
            ));
        }
        let configured = config.rank_for(&module);
        if configured != a.rows {
            log::warn!(
                "{}: module {module}: the config says r={configured} but the factors have rank {}; using the factors' rank",
                file.display(),
                a.rows
            );
        }
        modules.insert(
            module.clone(),
            ModuleFactors {
                module,
                embedding,
                a,
                b,
            },
        );
    }
    Ok(modules)
}

/// Each lora_B.bias has its module's factors and one value per row of lora_B.
fn check_biases(
    file: &Path,
    modules: &BTreeMap<String, ModuleFactors>,
    biases: &BTreeMap<String, Stored>,
) -> Result<()> {
    for (module, bias) in biases {
        let Some(f) = modules.get(module) else {
            return Err(Error::tensor(
                file,
                &bias.key,
                "lora_B.bias without lora_A/lora_B factors for its module",
            ));
        };
        if f.embedding || bias.cols != f.b.rows {
            return Err(Error::tensor(
                file,
                &bias.key,
                format!("has {} values but lora_B has {} rows", bias.cols, f.b.rows),
            ));
        }
    }
    Ok(())
}

/// DoRA magnitudes belong to Linear factors, and `use_dora` needs one for every module.
fn check_magnitudes(
    file: &Path,
    config: &AdapterConfig,
    modules: &BTreeMap<String, ModuleFactors>,
    magnitudes: &BTreeMap<String, Stored>,
) -> Result<()> {
    for (module, m) in magnitudes {
        let Some(f) = modules.get(module) else {
            return Err(Error::tensor(
                file,
                &m.key,
                "DoRA magnitude vector without lora_A/lora_B factors for its module",
            ));
        };
        if f.embedding {
            return Err(Error::unsupported(
                file,
                format!(
                    "`{}`: DoRA on an embedding normalises each column over the whole vocabulary; \
                     lorafs merges DoRA on Linear layers only",
                    m.key
                ),
            ));
        }
    }
    if config.use_dora {
        if let Some(f) = modules
            .values()
            .find(|f| !magnitudes.contains_key(&f.module))
        {
            return Err(Error::unsupported(
                file,
                format!(
                    "DoRA: use_dora is set in adapter_config.json but module {} has no \
                     lora_magnitude_vector; DoRA cannot be merged without its magnitude",
                    f.module
                ),
            ));
        }
    } else if let Some(m) = magnitudes.values().next() {
        log::warn!(
            "{}: `{}`: DoRA magnitude vector present although use_dora is not set; applying DoRA",
            file.display(),
            m.key
        );
    }
    Ok(())
}

/// Trainable token rows with their ids from the config: one distinct id per row.
fn tokens(
    file: &Path,
    config: &AdapterConfig,
    deltas: BTreeMap<String, Stored>,
) -> Result<BTreeMap<String, TokenRows>> {
    let mut tokens = BTreeMap::new();
    for (module, values) in deltas {
        let indices = config.token_indices_for(&module).ok_or_else(|| {
            Error::config(
                file,
                format!(
                    "`{}`: trainable tokens for module {module}, but adapter_config.json has no \
                     trainable_token_indices for it",
                    values.key
                ),
            )
        })?;
        if indices.len() != values.rows {
            return Err(Error::tensor(
                file,
                &values.key,
                format!(
                    "has {} rows but trainable_token_indices lists {} tokens",
                    values.rows,
                    indices.len()
                ),
            ));
        }
        // torch's index_copy_ leaves the result of a repeated index undefined.
        let mut seen = BTreeSet::new();
        if let Some(&dup) = indices.iter().find(|&&i| !seen.insert(i)) {
            return Err(Error::tensor(
                file,
                &values.key,
                format!(
                    "trainable_token_indices lists token {dup} twice; which row wins is undefined"
                ),
            ));
        }
        tokens.insert(
            module.clone(),
            TokenRows {
                module,
                indices,
                values,
            },
        );
    }
    Ok(tokens)
}
