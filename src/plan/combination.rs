//! A `--combine` resolved for one view: what PEFT's `add_weighted_adapter` refuses is
//! refused by name, the combined adapter's rank and scale are fixed, and each tensor's
//! factors are combined module by module when the tensor is realized.
//!
//! PEFT makes the combined adapter with `r = lora_alpha = new_rank` and the rest of its
//! config copied from the first adapter, so it merges with scale 1, or `new_rank/√new_rank`
//! when the first adapter has `use_rslora` (a quirk lorafs reproduces).

use super::build::Op;
use super::mix::{self, Lora};
use super::*;
use crate::adapter::json::TargetModules;

/// A combination method with its parameters, and what it means for this view's adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct Combination {
    /// The method as applied: `linear` for a single adapter (as PEFT does).
    pub combine: Combine,
    /// The combined adapter's `r` (and `lora_alpha`).
    pub new_rank: usize,
    /// The scale its merge applies: 1, or `new_rank/√new_rank` with the first adapter's
    /// `use_rslora`.
    pub scaling: f64,
}

/// An adapter's rank as PEFT's `_check_add_weighted_adapter` takes it: `r`, or the largest
/// of `r` and the `rank_pattern` values.
fn adapter_rank(adapter: &Adapter) -> usize {
    let c = &adapter.config;
    c.rank_pattern.keys().map(|(_, r)| *r).fold(c.r, usize::max)
}

/// Refuse, naming the adapter, what cannot be combined; then fix the new rank and scale.
pub(super) fn resolve(
    combine: &Combine,
    adapters: &[Adapter],
    summaries: &[AdapterSummary],
) -> Result<Combination> {
    let first = adapters.first().ok_or_else(|| {
        Error::unsupported(".", "--combine needs at least one --adapter".to_string())
    })?;
    combine
        .check()
        .map_err(|what| Error::unsupported(&first.dir, what))?;
    let combine = as_applied(combine, adapters.len());
    for (adapter, summary) in adapters.iter().zip(summaries) {
        if let Some(what) = uncombinable(adapter, summary) {
            return Err(Error::unsupported(
                &adapter.dir,
                format!(
                    "--combine {} cannot combine an adapter with {what}",
                    combine.method
                ),
            ));
        }
    }
    check_target_kinds(adapters)?;
    let new_rank = new_rank(&combine, adapters)?;
    let scaling = combined_scaling(new_rank, first.config.use_rslora);
    Ok(Combination {
        combine,
        new_rank,
        scaling,
    })
}

/// The method as PEFT applies it to `count` adapters: a single adapter is combined as
/// `linear`, whatever was asked.
fn as_applied(combine: &Combine, count: usize) -> Combine {
    if count != 1 || combine.method == Method::Linear {
        return combine.clone();
    }
    log::info!(
        "--combine {}: a single adapter is combined as linear (as PEFT does)",
        combine.method
    );
    Combine {
        method: Method::Linear,
        density: None,
        majority_sign: MajoritySign::Total,
        svd_rank: None,
        seed: combine.seed,
    }
}

/// What in `adapter` (summarized by `summary`) `add_weighted_adapter` does not combine, if
/// anything.
fn uncombinable(adapter: &Adapter, summary: &AdapterSummary) -> Option<&'static str> {
    let f = &summary.features;
    if f.dora > 0 || adapter.config.use_dora {
        Some("DoRA (use_dora): lorafs combines plain LoRA only; merge it without --combine")
    } else if f.lora_bias > 0 {
        Some("lora_B biases (lora_bias): PEFT's add_weighted_adapter drops them; merge it without --combine")
    } else if !f.trainable_tokens.is_empty() {
        Some("trainable tokens: add_weighted_adapter does not combine them; merge it without --combine")
    } else if !f.replacements.is_empty() {
        Some("whole tensors (modules_to_save): add_weighted_adapter cannot combine them; merge it without --combine")
    } else {
        None
    }
}

/// Refuse a mix of list and string `target_modules`, as PEFT's `add_weighted_adapter` does.
fn check_target_kinds(adapters: &[Adapter]) -> Result<()> {
    let kinds = |a: &Adapter| match a.config.target_modules {
        TargetModules::Regex(_) => Some("a regex string"),
        TargetModules::Names(_) => Some("a list"),
        _ => None,
    };
    let Some(first) = adapters.first() else {
        return Ok(());
    };
    match adapters.iter().find(|a| kinds(a) != kinds(first)) {
        None => Ok(()),
        Some(other) => Err(Error::unsupported(
            &other.dir,
            format!(
                "--combine: its target_modules is {}, the first adapter's is {}; PEFT's \
                 add_weighted_adapter refuses a mix of list and string target_modules",
                kinds(other).unwrap_or("unset"),
                kinds(first).unwrap_or("unset")
            ),
        )),
    }
}

/// The combined adapter's rank: the sum for `cat`, `svd_rank` (else the largest) for `svd`,
/// and for the other methods the adapters' one rank (refused where they differ).
fn new_rank(combine: &Combine, adapters: &[Adapter]) -> Result<usize> {
    let ranks: Vec<usize> = adapters.iter().map(adapter_rank).collect();
    let method = combine.method;
    match method {
        Method::Cat => Ok(ranks.iter().sum()),
        Method::Svd => Ok(combine
            .svd_rank
            .unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(0))),
        _ => match ranks.iter().position(|&r| r != ranks[0]) {
            None => Ok(ranks.first().copied().unwrap_or(0)),
            Some(i) => Err(Error::unsupported(
                &adapters[i].dir,
                format!(
                    "--combine {method} needs adapters of one rank (as PEFT's \
                     add_weighted_adapter does): this one has r={}, the first r={}; use \
                     --combine cat or svd",
                    ranks[i], ranks[0]
                ),
            )),
        },
    }
}

/// PEFT's `scaling` of the combined adapter, `lora_alpha / r` or `lora_alpha / √r` with
/// `r = lora_alpha = new_rank` and the first adapter's `use_rslora`, in Python's f64.
fn combined_scaling(new_rank: usize, use_rslora: bool) -> f64 {
    let n = new_rank as f64;
    if use_rslora {
        n / n.sqrt()
    } else {
        // lora_alpha / r with lora_alpha == r.
        1.0
    }
}

/// The modules of a tensor's terms, each once, in order of first appearance.
fn modules(terms: &[Term]) -> Vec<&str> {
    let mut seen: Vec<&str> = Vec::new();
    for t in terms {
        if !seen.contains(&t.module.as_str()) {
            seen.push(&t.module);
        }
    }
    seen
}

impl Combination {
    /// The rank of a tensor's combined factors (the sum over the modules merged into it),
    /// refusing modules whose adapters' ranks differ for a same-rank method.
    pub(super) fn tensor_rank(&self, merge: &TensorMerge, adapters: &[Adapter]) -> Result<usize> {
        let mut rank = 0;
        for module in modules(&merge.terms) {
            let terms: Vec<&Term> = merge.terms.iter().filter(|t| t.module == module).collect();
            let stacked: usize = terms.iter().map(|t| t.rank).sum();
            rank += match self.combine.method {
                Method::Cat => stacked,
                Method::Svd => {
                    let Dims { rows, cols } = merge.dims;
                    mix::svd_rank(self.new_rank, stacked, rows, cols)
                }
                method => {
                    if let Some(t) = terms.iter().find(|t| t.rank != terms[0].rank) {
                        return Err(Error::unsupported(
                            &adapters[t.adapter].dir,
                            format!(
                                "--combine {method}: module `{module}` has rank {} here and {} \
                                 in {} (rank_pattern); the method needs one rank: use \
                                 --combine cat or svd",
                                t.rank,
                                terms[0].rank,
                                adapters[terms[0].adapter].dir.display()
                            ),
                        ));
                    }
                    terms[0].rank
                }
            };
        }
        Ok(rank)
    }

    /// Read a tensor's factors and combine them module by module: one oriented part per
    /// module, whose term stands for the combined adapter (its first adapter's index).
    pub(super) fn parts(
        &self,
        merge: &TensorMerge,
        adapters: &[Adapter],
    ) -> Result<Vec<realize::Part>> {
        let ops = &merge.ops;
        let c = &self.combine;
        let every = mix::Params {
            method: c.method,
            density: c.density.unwrap_or(1.0),
            majority_sign: c.majority_sign,
            new_rank: self.new_rank,
            seed: c.seed,
            module: "",
            // PEFT's cat copies the factors into the new adapter's weights, which have the
            // base layer's dtype (only adapters loaded by PeftModel are cast to f32).
            factor_dtype: merge.w.dtype,
        };
        let terms: Vec<Term> = (ops.iter())
            .filter_map(|op| match op {
                Op::Lora { term, .. } => Some(term.clone()),
                _ => None,
            })
            .collect();
        let mut parts = Vec::new();
        for module in modules(&terms) {
            let mut loras = Vec::new();
            let (mut a_cols, mut b_rows, mut first) = (0, 0, None);
            for op in ops {
                let Op::Lora { term, a, b, .. } = op else {
                    continue;
                };
                if term.module != module {
                    continue;
                }
                let adapter = &adapters[term.adapter];
                (a_cols, b_rows) = (a.cols, b.rows);
                first.get_or_insert(term.clone());
                loras.push(Lora {
                    a: adapter.read(a)?,
                    b: adapter.read(b)?,
                    rank: term.rank,
                    weight: adapter.weight,
                    scaling: adapter.config.scale_for(module, term.rank),
                    adapter: term.adapter,
                });
            }
            let Some(mut term) = first else { continue };
            // The module (not the tensor) seeds DARE: a tied lm_head and the embedding are
            // two modules merged into one tensor, each with its own masks.
            let params = mix::Params { module, ..every };
            let combined = mix::combine(&params, loras, a_cols, b_rows);
            let (u, v) = realize::orient(
                (combined.a, a_cols),
                (combined.b, b_rows),
                combined.rank,
                term.transposed,
                self.scaling as f32,
            );
            term.rank = combined.rank;
            term.scale = self.scaling;
            parts.push(realize::Part {
                term,
                u,
                v,
                magnitude: None,
            });
        }
        Ok(parts)
    }
}

/// Everything of a [`Combination`] that the bytes depend on, hashable (a recipe's part).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CombinationKey {
    method: Method,
    density: Option<u64>,
    majority_sign: MajoritySign,
    svd_rank: Option<usize>,
    seed: u64,
    new_rank: usize,
    scaling: u64,
}

impl Combination {
    pub fn key(&self) -> CombinationKey {
        let c = &self.combine;
        CombinationKey {
            method: c.method,
            density: c.density.map(f64::to_bits),
            majority_sign: c.majority_sign,
            svd_rank: c.svd_rank,
            seed: c.seed,
            new_rank: self.new_rank,
            scaling: self.scaling.to_bits(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::combined_scaling;

    #[test]
    fn the_combined_adapter_merges_at_scale_one_or_sqrt_rank_with_rslora() {
        assert_eq!(combined_scaling(8, false), 1.0);
        assert_eq!(combined_scaling(16, true), 4.0);
        assert_eq!(combined_scaling(8, true), 8.0 / 8f64.sqrt());
    }
}
