//! A PEFT LoRA adapter directory: its config and the table of its tensors.
//!
//! Loading reads only `adapter_config.json` and the safetensors header: every tensor is
//! classified (factor, bias, magnitude, token rows, replacement) and paired from its name,
//! dtype and shape alone. No tensor data is read until the merge plan has checked every
//! shape against the base ([`Adapter::read`]), so a header that declares a huge tensor
//! costs nothing before it is refused.

mod config;
pub(crate) mod json;
mod pair;
mod pattern;
mod table;

pub use config::AdapterConfig;
pub use pattern::Patterns;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;

/// A float tensor of the adapter file as its header describes it, viewed as a matrix (a 1-D
/// tensor is one row). Its data stays in the file until [`Adapter::read`].
#[derive(Debug, Clone)]
pub struct Stored {
    /// The key in `adapter_model.safetensors`, for messages.
    pub key: String,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    /// Absolute byte offset of its data in the adapter file.
    pub offset: u64,
}

impl Stored {
    /// Number of values (the header's size check guarantees no overflow).
    pub fn numel(&self) -> usize {
        self.rows.saturating_mul(self.cols)
    }
}

/// The LoRA factors of one module: A (r × in) and B (out × r) for Linear and Conv1D, or
/// `lora_embedding_A` (r × vocab) and `lora_embedding_B` (dim × r) for embeddings.
#[derive(Debug, Clone)]
pub struct ModuleFactors {
    pub module: String,
    pub embedding: bool,
    pub a: Stored,
    pub b: Stored,
}

impl ModuleFactors {
    pub fn rank(&self) -> usize {
        self.a.rows
    }
}

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
    /// Distinct token ids, one per row of `values`.
    pub indices: Vec<usize>,
    pub values: Stored,
}

/// A loaded adapter: `--adapter DIR[:WEIGHT]`.
#[derive(Debug)]
pub struct Adapter {
    pub dir: PathBuf,
    /// The user's weight for this adapter (PEFT `set_scale`), 1 by default.
    pub weight: f64,
    pub config: AdapterConfig,
    /// `adapter_config.json`, for messages.
    pub config_path: PathBuf,
    /// The weights file, for messages.
    pub file: PathBuf,
    /// The weights file, open for [`Adapter::read`].
    handle: File,
    /// Factors per module name (no prefix, no `.weight`), sorted by module name.
    pub modules: BTreeMap<String, ModuleFactors>,
    /// `M.lora_B.bias` per module (1 × out), added times the scale to `M.bias`.
    pub lora_biases: BTreeMap<String, Stored>,
    /// `M.lora_magnitude_vector` per module (1 × out): DoRA.
    pub magnitudes: BTreeMap<String, Stored>,
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

/// Bytes read from the adapter file at a time by [`Adapter::read`]: the f32 result is the
/// only allocation that grows with the tensor. Small enough to stay in the allocator's heap,
/// reused from one tensor's read to the next (a megabyte would be a mapping of its own).
const READ_CHUNK: usize = 64 << 10;

impl Adapter {
    /// Read the config and the table of tensors of an adapter directory; no tensor data.
    /// The config's file name in an adapter directory.
    pub const CONFIG_FILE: &'static str = "adapter_config.json";
    /// The weights' file name in an adapter directory.
    pub const WEIGHTS_FILE: &'static str = "adapter_model.safetensors";

    pub fn load(dir: &Path, weight: f64) -> Result<Adapter> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "adapter directory not found"),
            ));
        }
        let config_path = dir.join(Adapter::CONFIG_FILE);
        let config = AdapterConfig::load(&config_path)?;
        let file = weights_file(dir)?;
        let layout = Layout::open(&file)?;
        let handle = crate::baseio::open_regular(&file)?;
        let table = table::Table::classify(&file, &layout)?;
        let parts = pair::Parts::pair(&file, &config, table)?;
        let tokenizer_files = TOKENIZER_FILES
            .iter()
            .map(|n| dir.join(n))
            .filter(|p| p.is_file())
            .collect();
        Ok(Adapter {
            dir: dir.to_path_buf(),
            weight,
            config,
            config_path,
            file,
            handle,
            modules: parts.modules,
            lora_biases: parts.lora_biases,
            magnitudes: parts.magnitudes,
            tokens: parts.tokens,
            replacements: parts.replacements,
            tokenizer_files,
            num_params: parts.num_params,
        })
    }

    /// The scale applied to `B @ A` for a module: PEFT's `alpha/r` (or `alpha/√r`) times the
    /// user's weight. Refused unless it is finite in f32, the precision it is applied in: an
    /// infinite scale would merge into Inf/NaN weights. (A scale that rounds to 0 in f32 is
    /// allowed: a zero delta.)
    pub fn scale(&self, factors: &ModuleFactors) -> Result<f64> {
        let (module, r) = (&factors.module, factors.rank());
        let alpha = self.config.alpha_for(module);
        let scale = self.weight * self.config.scale_for(module, r);
        if (scale as f32).is_finite() {
            return Ok(scale);
        }
        let rule = if self.config.use_rslora {
            "/√r"
        } else {
            "/r"
        };
        Err(Error::config(
            &self.config_path,
            format!(
                "module `{module}`: scale = weight·lora_alpha{rule} = {}·{}{rule} (r={r}) = {} is \
                 not a finite f32, so the merged weights would be Inf or NaN; lower lora_alpha \
                 (or its alpha_pattern entry) or the --adapter weight",
                short(self.weight),
                short(alpha),
                short(scale)
            ),
        ))
    }

    /// The values of `t`, converted to f32. Call it only for a tensor whose shape the merge
    /// plan checked against the base: the result is as large as the header says. A value that
    /// is NaN or infinite is refused: every value read here is merged (factors, magnitudes,
    /// biases, token rows), and it would turn the weights it touches into NaN or Inf.
    pub fn read(&self, t: &Stored) -> Result<Vec<f32>> {
        let size = t.dtype.size();
        let mut out = Vec::with_capacity(t.numel());
        let mut buf = vec![0u8; READ_CHUNK.min(t.numel() * size)];
        let (mut pos, mut left) = (t.offset, t.numel());
        while left > 0 {
            let n = left.min(READ_CHUNK / size);
            let bytes = &mut buf[..n * size];
            self.handle.read_exact_at(bytes, pos).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Error::tensor(
                        &self.file,
                        &t.key,
                        "the file is shorter than its header says (changed while being read?)",
                    )
                } else {
                    Error::io(&self.file, e)
                }
            })?;
            let first = out.len();
            t.dtype.load_into(bytes, &mut out);
            if let Some(k) = out[first..].iter().position(|x| !x.is_finite()) {
                return Err(Error::tensor(
                    &self.file,
                    &t.key,
                    format!(
                        "value {} is {}: a factor that is not finite would merge into NaN \
                         or Inf weights; the adapter is broken (re-export or retrain it)",
                        first + k,
                        out[first + k]
                    ),
                ));
            }
            pos += bytes.len() as u64;
            left -= n;
        }
        Ok(out)
    }
}

/// A number for a message: plain when of moderate size, else in scientific notation.
fn short(x: f64) -> String {
    if x == 0.0 || (1e-4..1e6).contains(&x.abs()) {
        x.to_string()
    } else {
        format!("{x:e}")
    }
}

/// `adapter_model.safetensors` of an adapter directory; a pickle is refused.
fn weights_file(dir: &Path) -> Result<PathBuf> {
    let file = dir.join(Adapter::WEIGHTS_FILE);
    if file.exists() {
        return Ok(file);
    }
    let bin = dir.join("adapter_model.bin");
    if bin.exists() {
        return Err(Error::unsupported(
            &bin,
            "adapter_model.bin is a pickle, which lorafs never unpickles (it can run code); \
             convert it to adapter_model.safetensors, e.g. load it with PEFT and save_pretrained \
             with safe_serialization=True",
        ));
    }
    Err(Error::io(
        &file,
        std::io::Error::new(std::io::ErrorKind::NotFound, "adapter weights not found"),
    ))
}
