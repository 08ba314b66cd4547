//! A PEFT LoRA adapter directory: its config and its factors, read into f32.

mod config;
mod pattern;

pub use config::AdapterConfig;
pub use pattern::Patterns;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use crate::dtype::{to_f32_vec, DType};
use crate::error::{Error, Result};

/// The prefix PEFT puts before module names (`PeftModel.base_model.model`).
const PEFT_PREFIX: &str = "base_model.model.";

/// One factor matrix, row-major f32, as stored in the adapter file.
#[derive(Debug, Clone)]
pub struct Factor {
    /// The key in `adapter_model.safetensors`, for messages.
    pub key: String,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

/// The LoRA factors of one module: A (r × in) and B (out × r) for Linear and Conv1D, or
/// `lora_embedding_A` (r × vocab) and `lora_embedding_B` (dim × r) for embeddings.
#[derive(Debug, Clone)]
pub struct ModuleFactors {
    pub module: String,
    pub embedding: bool,
    pub a: Factor,
    pub b: Factor,
}

impl ModuleFactors {
    pub fn rank(&self) -> usize {
        self.a.rows
    }
}

/// A loaded adapter: `--adapter DIR[:WEIGHT]`.
#[derive(Debug)]
pub struct Adapter {
    pub dir: PathBuf,
    /// The user's weight for this adapter (PEFT `set_scale`), 1 by default.
    pub weight: f64,
    pub config: AdapterConfig,
    /// The weights file, for messages.
    pub file: PathBuf,
    /// Factors per module name (no prefix, no `.weight`), sorted by module name.
    pub modules: BTreeMap<String, ModuleFactors>,
    /// Number of values in the adapter file (the seed's "trainable params").
    pub num_params: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    A,
    B,
}

impl Adapter {
    pub fn load(dir: &Path, weight: f64) -> Result<Adapter> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "adapter directory not found"),
            ));
        }
        let config = AdapterConfig::load(&dir.join("adapter_config.json"))?;
        let file = dir.join("adapter_model.safetensors");
        if !file.exists() {
            let bin = dir.join("adapter_model.bin");
            if bin.exists() {
                return Err(Error::unsupported(
                    &bin,
                    "adapter_model.bin is a pickle, which lorafs never unpickles (it can run code); \
                     convert it to adapter_model.safetensors, e.g. load it with PEFT and save_pretrained \
                     with safe_serialization=True",
                ));
            }
            return Err(Error::io(
                &file,
                std::io::Error::new(std::io::ErrorKind::NotFound, "adapter weights not found"),
            ));
        }
        let handle = File::open(&file).map_err(|e| Error::io(&file, e))?;
        // SAFETY: read-only map of an input file that must not change while lorafs runs;
        // everything needed is copied out before the map is dropped.
        let map = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| Error::io(&file, e))?;
        let tensors = SafeTensors::deserialize(&map).map_err(|e| Error::BadSafetensors {
            path: file.clone(),
            what: e.to_string(),
        })?;

        let mut halves: BTreeMap<(String, bool), (Option<Factor>, Option<Factor>)> =
            BTreeMap::new();
        let mut num_params = 0;
        for (key, view) in tensors.tensors() {
            num_params += view.shape().iter().product::<usize>();
            let name = key.strip_prefix(PEFT_PREFIX).unwrap_or(&key);
            let Some((module, part, embedding)) = classify(name) else {
                return Err(unsupported_key(&file, &key, name));
            };
            let dtype = DType::from_safetensors(view.dtype()).ok_or_else(|| {
                Error::tensor(
                    &file,
                    &key,
                    format!(
                        "dtype {:?} is not supported (F16, BF16 or F32)",
                        view.dtype()
                    ),
                )
            })?;
            if view.shape().len() != 2 {
                return Err(Error::tensor(
                    &file,
                    &key,
                    format!("expected a 2-D LoRA factor, found shape {:?}", view.shape()),
                ));
            }
            let factor = Factor {
                key: key.clone(),
                rows: view.shape()[0],
                cols: view.shape()[1],
                data: to_f32_vec(dtype, view.data()),
            };
            let slot = halves.entry((module.to_string(), embedding)).or_default();
            match part {
                Part::A => slot.0 = Some(factor),
                Part::B => slot.1 = Some(factor),
            }
        }

        let mut modules = BTreeMap::new();
        for ((module, embedding), (a, b)) in halves {
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (Some(f), None) | (None, Some(f)) => {
                    return Err(Error::tensor(
                        &file,
                        &f.key,
                        "has no matching lora_A/lora_B partner",
                    ))
                }
                (None, None) => unreachable!("a slot is created with one half"),
            };
            if a.rows != b.cols || a.rows == 0 {
                return Err(Error::tensor(
                    &file,
                    &a.key,
                    format!(
                        "rank mismatch: A is {}×{} and B is {}×{}; A's rows must equal B's columns",
                        a.rows, a.cols, b.rows, b.cols
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
        if modules.is_empty() {
            return Err(Error::config(&file, "the adapter holds no LoRA factors"));
        }
        Ok(Adapter {
            dir: dir.to_path_buf(),
            weight,
            config,
            file,
            modules,
            num_params,
        })
    }

    /// The scale applied to `B @ A` for a module: PEFT's `alpha/r` (or `alpha/√r`) times the
    /// user's weight.
    pub fn scale(&self, factors: &ModuleFactors) -> f64 {
        self.weight * self.config.scale_for(&factors.module, factors.rank())
    }
}

/// Split an adapter key (prefix removed) into module name and factor role.
fn classify(name: &str) -> Option<(&str, Part, bool)> {
    const SUFFIXES: [(&str, Part, bool); 4] = [
        (".lora_A.weight", Part::A, false),
        (".lora_B.weight", Part::B, false),
        (".lora_embedding_A", Part::A, true),
        (".lora_embedding_B", Part::B, true),
    ];
    SUFFIXES.iter().find_map(|&(suffix, part, embedding)| {
        name.strip_suffix(suffix).map(|m| (m, part, embedding))
    })
}

fn unsupported_key(file: &Path, key: &str, name: &str) -> Error {
    let what = if name.ends_with(".lora_magnitude_vector")
        || name.contains(".lora_magnitude_vector.")
    {
        "DoRA magnitude vectors are not supported yet"
    } else if name.ends_with(".lora_B.bias") {
        "lora_bias is not supported yet"
    } else if name.contains(".token_adapter.") {
        "trainable tokens are not supported yet"
    } else {
        "full-tensor replacements (modules_to_save, base_layer, trained biases) are not supported yet"
    };
    Error::tensor(file, key, what)
}
