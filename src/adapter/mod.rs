//! A PEFT LoRA adapter directory: its config and its factors, read into f32.

mod config;
mod pattern;

pub use config::AdapterConfig;
pub use pattern::Patterns;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::dtype::{to_f32_vec, DType};
use crate::error::{Error, Result};
use crate::layout::Layout;

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

/// A vector or small matrix stored in the adapter (lora_B.bias, DoRA magnitude, trainable
/// token rows), read into f32.
pub type Vector = Factor;

/// A tensor the adapter stores whole, to be served in place of a base tensor: PEFT's
/// `modules_to_save`, `M.base_layer.weight`/`.bias` (e.g. saved embedding layers) and trained
/// biases (`bias="all"`/`"lora_only"`). Its bytes stay in the adapter file.
#[derive(Debug, Clone)]
pub struct Replacement {
    /// The key in the adapter file.
    pub key: String,
    /// The base tensor it replaces (e.g. `lm_head.weight`).
    pub target: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset and length in the adapter file.
    pub offset: u64,
    pub len: u64,
}

/// Trainable tokens (`M.token_adapter.trainable_tokens_delta`): rows `indices` of `M.weight`
/// are replaced by the rows of `values`.
#[derive(Debug, Clone)]
pub struct TokenRows {
    pub module: String,
    pub indices: Vec<usize>,
    pub values: Factor,
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
    /// `M.lora_B.bias` per module (1 × out), added times the scale to `M.bias`.
    pub lora_biases: BTreeMap<String, Vector>,
    /// `M.lora_magnitude_vector` per module (1 × out): DoRA.
    pub magnitudes: BTreeMap<String, Vector>,
    /// Trainable tokens per module.
    pub tokens: BTreeMap<String, TokenRows>,
    /// Whole tensors served in place of the base's, in adapter-file order.
    pub replacements: Vec<Replacement>,
    /// Tokenizer files of the adapter directory (they replace the base's).
    pub tokenizer_files: Vec<PathBuf>,
    /// Number of values in the adapter file (the seed's "trainable params").
    pub num_params: usize,
}

/// File names of a tokenizer that an adapter directory may carry (saved with the adapter when
/// tokens were added); when present they replace the base's.
pub const TOKENIZER_FILES: [&str; 11] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    A,
    B,
}

/// What an adapter key (prefix removed) means.
enum Role<'a> {
    Factor(&'a str, Part, bool),
    LoraBias(&'a str),
    Magnitude(&'a str),
    Tokens(&'a str),
    /// A whole base tensor, by its base name.
    Replace(String),
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
        let layout = Layout::open(&file)?;
        let handle = File::open(&file).map_err(|e| Error::io(&file, e))?;
        // SAFETY: read-only map of an input file that must not change while lorafs runs;
        // everything needed is copied out before the map is dropped.
        let map = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| Error::io(&file, e))?;

        let mut halves: BTreeMap<(String, bool), (Option<Factor>, Option<Factor>)> =
            BTreeMap::new();
        let mut lora_biases = BTreeMap::new();
        let mut magnitudes = BTreeMap::new();
        let mut token_deltas: BTreeMap<String, Factor> = BTreeMap::new();
        let mut replacements = Vec::new();
        let mut num_params = 0;
        // File order, so that messages and `inspect` follow the adapter file.
        for entry in &layout.tensors {
            let key = &entry.name;
            num_params += entry.numel();
            let name = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
            let role = classify(name).ok_or_else(|| unsupported_key(&file, key, name))?;
            if let Role::Replace(target) = role {
                replacements.push(Replacement {
                    key: key.clone(),
                    target,
                    dtype: entry.dtype,
                    shape: entry.shape.clone(),
                    offset: entry.offset,
                    len: entry.len,
                });
                continue;
            }
            let dtype = DType::from_safetensors(entry.dtype).ok_or_else(|| {
                Error::tensor(
                    &file,
                    key,
                    format!(
                        "dtype {:?} is not supported (F16, BF16 or F32)",
                        entry.dtype
                    ),
                )
            })?;
            let shape = &entry.shape;
            let (dims, what) = match role {
                Role::LoraBias(_) => (1, "lora_B bias"),
                Role::Magnitude(_) => (1, "DoRA magnitude vector"),
                Role::Tokens(_) => (2, "trainable tokens delta"),
                Role::Factor(..) | Role::Replace(_) => (2, "LoRA factor"),
            };
            if matches!(role, Role::Factor(..)) && shape.len() > 2 {
                return Err(Error::unsupported(
                    &file,
                    format!(
                        "`{key}` has shape {shape:?}: LoRA on a convolution (nn.Conv1d/2d/3d) \
                         is not supported by lorafs (and with groups > 1 it cannot be merged \
                         as a low-rank delta at all); merge it with PEFT"
                    ),
                ));
            }
            if shape.len() != dims {
                return Err(Error::tensor(
                    &file,
                    key,
                    format!("expected a {dims}-D {what}, found shape {shape:?}"),
                ));
            }
            let bytes = usize::try_from(entry.offset)
                .ok()
                .and_then(|start| map.get(start..start + entry.len as usize))
                .ok_or_else(|| Error::tensor(&file, key, "the file changed while being read"))?;
            let (rows, cols) = if dims == 1 {
                (1, shape[0])
            } else {
                (shape[0], shape[1])
            };
            let factor = Factor {
                key: key.clone(),
                rows,
                cols,
                data: to_f32_vec(dtype, bytes),
            };
            match role {
                Role::Factor(module, part, embedding) => {
                    let slot = halves.entry((module.to_string(), embedding)).or_default();
                    match part {
                        Part::A => slot.0 = Some(factor),
                        Part::B => slot.1 = Some(factor),
                    }
                }
                Role::LoraBias(module) => {
                    lora_biases.insert(module.to_string(), factor);
                }
                Role::Magnitude(module) => {
                    magnitudes.insert(module.to_string(), factor);
                }
                Role::Tokens(module) => {
                    token_deltas.insert(module.to_string(), factor);
                }
                Role::Replace(_) => unreachable!("handled above"),
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
        for (module, bias) in &lora_biases {
            let Some(f) = modules.get(module) else {
                return Err(Error::tensor(
                    &file,
                    &bias.key,
                    "lora_B.bias without lora_A/lora_B factors for its module",
                ));
            };
            if f.embedding || bias.cols != f.b.rows {
                return Err(Error::tensor(
                    &file,
                    &bias.key,
                    format!("has {} values but lora_B has {} rows", bias.cols, f.b.rows),
                ));
            }
        }
        for (module, m) in &magnitudes {
            let Some(f) = modules.get(module) else {
                return Err(Error::tensor(
                    &file,
                    &m.key,
                    "DoRA magnitude vector without lora_A/lora_B factors for its module",
                ));
            };
            if f.embedding {
                return Err(Error::unsupported(
                    &file,
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
                    &file,
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
        let mut tokens = BTreeMap::new();
        for (module, values) in token_deltas {
            let indices = config.token_indices_for(&module).ok_or_else(|| {
                Error::config(
                    &file,
                    format!(
                        "`{}`: trainable tokens for module {module}, but adapter_config.json has no \
                         trainable_token_indices for it",
                        values.key
                    ),
                )
            })?;
            if indices.len() != values.rows {
                return Err(Error::tensor(
                    &file,
                    &values.key,
                    format!(
                        "has {} rows but trainable_token_indices lists {} tokens",
                        values.rows,
                        indices.len()
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
        if modules.is_empty() && tokens.is_empty() && replacements.is_empty() {
            return Err(Error::config(&file, "the adapter holds no LoRA factors"));
        }
        let tokenizer_files = TOKENIZER_FILES
            .iter()
            .map(|n| dir.join(n))
            .filter(|p| p.is_file())
            .collect();
        Ok(Adapter {
            dir: dir.to_path_buf(),
            weight,
            config,
            file,
            modules,
            lora_biases,
            magnitudes,
            tokens,
            replacements,
            tokenizer_files,
            num_params,
        })
    }

    /// The scale applied to `B @ A` for a module: PEFT's `alpha/r` (or `alpha/√r`) times the
    /// user's weight.
    pub fn scale(&self, factors: &ModuleFactors) -> f64 {
        self.weight * self.config.scale_for(&factors.module, factors.rank())
    }
}

/// Split an adapter key (prefix removed) into module name and role.
fn classify(name: &str) -> Option<Role<'_>> {
    const SUFFIXES: [(&str, Part, bool); 4] = [
        (".lora_A.weight", Part::A, false),
        (".lora_B.weight", Part::B, false),
        (".lora_embedding_A", Part::A, true),
        (".lora_embedding_B", Part::B, true),
    ];
    if let Some(role) = SUFFIXES.iter().find_map(|&(suffix, part, embedding)| {
        name.strip_suffix(suffix)
            .map(|m| Role::Factor(m, part, embedding))
    }) {
        return Some(role);
    }
    if let Some(m) = name.strip_suffix(".lora_B.bias") {
        return Some(Role::LoraBias(m));
    }
    if let Some(m) = name
        .strip_suffix(".lora_magnitude_vector")
        .or_else(|| name.strip_suffix(".lora_magnitude_vector.weight"))
    {
        return Some(Role::Magnitude(m));
    }
    if let Some(m) = name.strip_suffix(".token_adapter.trainable_tokens_delta") {
        return Some(Role::Tokens(m));
    }
    // Anything else that still names a LoRA part (another variant's tensors, an adapter
    // name left in the key) is not a plain tensor: refuse rather than replace something.
    if name.contains("lora_") || name.contains("token_adapter") || name.contains("modules_to_save")
    {
        return None;
    }
    // `M.base_layer.weight` replaces `M.weight`; any other key replaces itself.
    for (suffix, to) in [
        (".base_layer.weight", ".weight"),
        (".base_layer.bias", ".bias"),
    ] {
        if let Some(m) = name.strip_suffix(suffix) {
            return Some(Role::Replace(format!("{m}{to}")));
        }
    }
    Some(Role::Replace(name.to_string()))
}

fn unsupported_key(file: &Path, key: &str, name: &str) -> Error {
    let what = if name.contains("lora_magnitude_vector") {
        "a DoRA magnitude vector in a form lorafs does not know".to_string()
    } else {
        format!(
            "unknown adapter key `{name}`: not a LoRA factor (lora_A/lora_B, lora_embedding_A/B), \
             lora_B.bias, DoRA magnitude, trainable tokens delta, or a plain tensor to replace"
        )
    };
    Error::tensor(file, key, what)
}
