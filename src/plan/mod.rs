//! The merge plan: which base tensors change, and the f32 factors that change them.
//!
//! Every supported delta is row-local: row `i` of the merged tensor needs row `i` of `W` and
//! row `i` of `U`. Linear LoRA gives `U = w·s·B`, `V = A`; transposed layouts (GPT-2 Conv1D,
//! embeddings) give `U = w·s·Aᵀ`, `V = Bᵀ`. Several adapters on one tensor are concatenated
//! along the rank, so their deltas are summed in f32 and rounded once.
//!
//! Building checks everything from the headers first (`build.rs`: shapes against the base,
//! layouts, scales; `vocab.rs`: which tensors may change shape), then reads the factors that
//! passed (`realize.rs`), so a hostile header costs no memory before it is refused.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::adapter::Adapter;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernel::Factors;
use crate::model::BaseModel;

mod bound;
mod build;
mod combination;
pub mod combine;
mod mix;
mod realize;
mod vocab;

use build::{summary, Planner, Tally};
pub use combination::{Combination, CombinationKey};
pub use combine::{Combine, MajoritySign, Method};

/// Architectures that build some layers with transformers' `Conv1D`, whose weight is stored
/// (in, out), and those layers' names. PEFT decides the layout from the layer's type (a
/// `Conv1D` gets `fan_in_fan_out=True`, a Linear `False`, whatever the config says), so lorafs
/// decides it from the architecture and the layer, never from the shapes. transformers
/// (`models/*/modeling_*.py`): gpt2, openai-gpt, imagegpt and decision_transformer build
/// c_attn, q_attn, c_proj and c_fc as Conv1D; clvp its decoder MLP's c_fc and c_proj. Every
/// other layer (GPT-2's lm_head, gpt_bigcode's c_attn ...) is an nn.Linear.
const CONV1D_MODEL_TYPES: [&str; 5] = [
    "gpt2",
    "openai-gpt",
    "imagegpt",
    "decision_transformer",
    "clvp",
];
const CONV1D_LAYERS: [&str; 4] = ["c_attn", "q_attn", "c_proj", "c_fc"];

/// What a term adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TermKind {
    /// `s·B@A` (or its transpose).
    Lora,
    /// `s·lora_B.bias`, added to the bias.
    LoraBias,
    /// DoRA: `m / ‖W + s·B@A‖_row · (W + s·B@A)`.
    Dora,
}

/// One adapter's contribution to one tensor.
#[derive(Debug, Clone)]
pub struct Term {
    pub adapter: usize,
    pub module: String,
    pub rank: usize,
    /// `w · alpha / r` (or `/ √r` with rsLoRA), as applied.
    pub scale: f64,
    pub transposed: bool,
    pub kind: TermKind,
}

/// The file a merged tensor's `W` is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WFile {
    /// The base file holding the tensor.
    Base,
    /// Adapter `i`'s `adapter_model.safetensors` (a replaced tensor).
    Adapter(usize),
}

/// Where the rows of `W` come from: a file, the absolute offset of row 0, and the dtype they
/// are stored in (widened exactly to f32 before the delta is added).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WSource {
    pub file: WFile,
    pub offset: u64,
    pub dtype: DType,
    /// A bitsandbytes-quantized base weight: its rows are dequantized to f32 (`dtype`)
    /// from the codes at `offset` and the scales the base's quantization lists.
    pub quant: Option<crate::quant::Scheme>,
}

/// A tensor of the base: its file's index in [`BaseModel::layouts`] and its index in that
/// layout's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TensorId {
    pub layout: usize,
    pub tensor: usize,
}

/// The 2-D view a tensor is merged in: a 1-D tensor is one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dims {
    pub rows: usize,
    pub cols: usize,
}

/// A tensor served from an adapter instead of the base.
#[derive(Debug, Clone)]
pub struct ReplacedBy {
    pub adapter: usize,
    pub key: String,
}

/// One term of a DoRA tensor's sequence: ranks `offset .. offset + rank` of the factors, and
/// for a DoRA term its magnitude vector (one value per output row).
#[derive(Debug, Clone)]
pub struct DoraGroup {
    pub offset: usize,
    pub rank: usize,
    pub magnitude: Option<Vec<f32>>,
}

/// A base tensor that the adapters change: what it is made from, checked against the base
/// from the headers. The factors are read by [`TensorMerge::realize`] when first needed.
#[derive(Debug)]
pub struct TensorMerge {
    pub name: String,
    pub tensor: TensorId,
    /// The output dtype.
    pub dtype: DType,
    /// The output shape (the base's, or a replacement's).
    pub shape: Vec<usize>,
    pub w: WSource,
    pub dims: Dims,
    /// Sum of the terms' ranks: 0 when nothing is added.
    pub rank: usize,
    pub terms: Vec<Term>,
    /// Rows of `W` replaced by trainable tokens.
    pub token_rows: usize,
    pub replaced: Option<ReplacedBy>,
    /// The view's `--combine`: the terms' factors are combined module by module, and
    /// `rank` is the combined factors' rank.
    pub combination: Option<Arc<Combination>>,
    /// What `realize` reads, in the order PEFT applies it.
    ops: Vec<build::Op>,
}

/// A row of `W` replaced before merging (trainable tokens), rounded to the output dtype.
#[derive(Debug, Clone)]
pub struct TokenRow {
    pub index: usize,
    pub values: Vec<f32>,
}

/// A merge's data, read from the adapter files: what the kernels merge with.
#[derive(Debug)]
pub struct Realized {
    /// `Δ = U @ V` over the tensor's [`Dims`].
    pub factors: Factors,
    /// Set when a term is DoRA: every term in order, applied one after another.
    pub dora: Option<Vec<DoraGroup>>,
    /// Sorted by row.
    pub rows: Vec<TokenRow>,
}

impl Realized {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let dora = self.dora.iter().flatten();
        self.factors.bytes()
            + dora
                .map(|g| g.magnitude.as_ref().map_or(0, |m| m.len() * 4))
                .sum::<usize>()
            + self.rows.iter().map(|r| r.values.len() * 4).sum::<usize>()
    }
}

impl TensorMerge {
    /// Bytes of one row in the output dtype.
    pub fn row_bytes(&self) -> usize {
        self.dims.cols * self.dtype.size()
    }

    pub fn bytes(&self) -> u64 {
        (self.dims.rows * self.row_bytes()) as u64
    }

    /// A replacement served as the adapter's bytes, unchanged.
    pub fn is_plain_copy(&self) -> bool {
        self.ops.is_empty() && self.w.file != WFile::Base && self.w.dtype == self.dtype
    }

    /// The adapters this tensor's bytes are read from (its `W`, its terms, its token rows),
    /// by index, each once, in the order of the view's list.
    pub fn adapters(&self) -> Vec<usize> {
        let mut used: Vec<usize> = (self.ops.iter())
            .map(|op| match op {
                build::Op::Lora { term, .. } | build::Op::Bias { term, .. } => term.adapter,
                build::Op::Tokens { adapter, .. } => *adapter,
            })
            .chain(match self.w.file {
                WFile::Adapter(i) => Some(i),
                WFile::Base => None,
            })
            .collect();
        used.sort_unstable();
        used.dedup();
        used
    }

    /// Bytes of f32 factors `realize` holds: U, and V packed in panels.
    pub fn factor_bytes(&self) -> usize {
        let Dims { rows, cols } = self.dims;
        4 * self.rank * (rows + crate::kernel::packed_cols(cols))
    }
}

/// Which features an adapter uses, for `inspect`.
#[derive(Debug, Clone, Default)]
pub struct Features {
    pub dora: usize,
    pub embedding_lora: usize,
    pub conv1d: usize,
    pub lora_bias: usize,
    pub trainable_tokens: Vec<(String, usize)>,
    pub replacements: Vec<ReplacementInfo>,
    /// Tensors applied to the input embedding because the base ties lm_head to it.
    pub tied: Vec<String>,
    pub tokenizer_files: Vec<String>,
}

/// A whole tensor an adapter serves in place of a base tensor, for `inspect`.
#[derive(Debug, Clone)]
pub struct ReplacementInfo {
    /// The key in the adapter file.
    pub key: String,
    pub target: String,
    pub shape: Vec<usize>,
    pub dtype: String,
}

/// Per-adapter facts for `inspect` and the logs, kept after the factors are packed.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub dir: PathBuf,
    pub file: PathBuf,
    pub weight: f64,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub alpha_pattern: Vec<(String, f64)>,
    pub rank_pattern: Vec<(String, usize)>,
    pub target_modules: String,
    pub base_model: Option<String>,
    pub tensors_changed: usize,
    pub num_params: usize,
    /// Distinct scales applied (module count per scale), e.g. when alpha_pattern is used.
    pub scales: BTreeMap<String, usize>,
    pub features: Features,
}

#[derive(Debug)]
pub struct MergePlan {
    /// Sorted by tensor so that file order is plan order.
    pub merges: Vec<TensorMerge>,
    pub adapters: Vec<AdapterSummary>,
    /// The output dtype of floating tensors (`--dtype`), `None` to keep the base's.
    pub dtype: Option<DType>,
    /// The adapters' tables and open weights files, which the merges' factors are read
    /// from.
    pub loaded: Vec<Adapter>,
    /// `vocab_size` (base, merged) when a replaced embedding changes it.
    pub vocab: Option<VocabResize>,
    /// Files served from an adapter directory instead of the base (tokenizer), by relative
    /// name; the last adapter that has one wins.
    pub extra_files: BTreeMap<PathBuf, PathBuf>,
    /// How the adapters are combined (`--combine`), `None`: each delta summed exactly.
    pub combination: Option<Arc<Combination>>,
}

/// `vocab_size` of the base and of the merged model when a replacement resizes the
/// embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabResize {
    pub base: usize,
    pub merged: usize,
}

/// (rows, cols) of the 2-D view a tensor is merged in: a 1-D tensor is one row. `None` when
/// a row has more values than a `usize` counts, which a tensor of a checked layout has only
/// if it holds no values: `[0, 2^32, 2^32]` is valid safetensors, and is merged (served
/// unchanged) as `(0, 0)`, since no row of it is ever read.
fn view(shape: &[usize]) -> Option<(usize, usize)> {
    match shape {
        [] => Some((1, 1)),
        [n] => Some((1, *n)),
        [r, rest @ ..] => match crate::layout::numel(rest) {
            Some(cols) => Some((*r, cols)),
            // A zero among the trailing dimensions: rows of no values (the product
            // overflowed before it reached the zero).
            None if rest.contains(&0) => Some((*r, 0)),
            None if *r == 0 => Some((0, 0)),
            None => None,
        },
    }
}

impl MergePlan {
    /// Plan the merge. Every adapter is checked against the base from the headers alone
    /// (shapes, ranks, scales, vocabulary, the memory the factors will take); no factor is
    /// read: [`TensorMerge::realize`] reads a tensor's when it is first needed. With
    /// `combine`, the adapters are combined as PEFT's `add_weighted_adapter` does.
    pub fn build(
        base: &BaseModel,
        loaded: Vec<Adapter>,
        dtype: Option<DType>,
        combine: Option<&Combine>,
    ) -> Result<MergePlan> {
        let adapters = &loaded[..];
        let mut planner = Planner::new(base, dtype);
        let mut summaries = Vec::new();
        for (ai, adapter) in adapters.iter().enumerate() {
            let mut tally = Tally::default();
            planner.replacements(ai, adapter, &mut tally)?;
            planner.trainable_tokens(ai, adapter, &mut tally)?;
            planner.lora(ai, adapter, &mut tally)?;
            planner.lora_biases(ai, adapter, &mut tally)?;
            summaries.push(summary(adapter, tally));
        }
        let vocab = planner.vocab_resize(adapters)?;
        planner.check_memory(adapters, physical_memory())?;
        let mut merges = planner.finish(adapters)?;
        let combination = match combine {
            Some(c) => Some(Arc::new(combination::resolve(c, adapters, &summaries)?)),
            None => None,
        };
        if let Some(c) = &combination {
            for merge in &mut merges {
                merge.rank = c.tensor_rank(merge, adapters)?;
                merge.combination = Some(c.clone());
            }
        }

        let mut extra_files = BTreeMap::new();
        for adapter in adapters {
            for path in &adapter.tokenizer_files {
                if let Some(name) = path.file_name() {
                    extra_files.insert(PathBuf::from(name), path.clone());
                }
            }
        }
        Ok(MergePlan {
            merges,
            adapters: summaries,
            dtype,
            loaded,
            vocab,
            extra_files,
            combination,
        })
    }

    /// Bytes of f32 factors all merges hold once realized.
    pub fn factor_bytes(&self) -> usize {
        self.merges.iter().map(|m| m.factor_bytes()).sum()
    }
}

/// Physical memory in bytes (`u64::MAX` if unknown): factors that need more cannot be held.
fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 on error, handled below.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    match (u64::try_from(pages), u64::try_from(size)) {
        (Ok(pages), Ok(size)) if pages > 0 && size > 0 => pages.saturating_mul(size),
        _ => u64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::view;

    #[test]
    fn the_view_of_a_tensor_without_values_does_not_overflow() {
        let big = 1usize << 40;
        assert_eq!(view(&[]), Some((1, 1)));
        assert_eq!(view(&[7]), Some((1, 7)));
        assert_eq!(view(&[3, 4, 5]), Some((3, 20)));
        // Valid safetensors, holding no values: no row is read.
        assert_eq!(view(&[0, big, big]), Some((0, 0)));
        assert_eq!(view(&[2, big, big, 0]), Some((2, 0)));
        // Not a tensor a checked layout holds (2^81 values).
        assert_eq!(view(&[2, big, big]), None);
    }
}
