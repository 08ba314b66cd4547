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

use crate::adapter::Adapter;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernel::Factors;
use crate::model::BaseModel;

mod bound;
mod build;
mod realize;
mod vocab;

use build::{summary, Planner, Tally};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The base file holding the tensor.
    Base,
    /// Adapter `i`'s `adapter_model.safetensors` (a replaced tensor).
    Adapter(usize),
}

/// Where the rows of `W` come from: a file, the absolute offset of row 0, and the dtype they
/// are stored in (converted to the output dtype, rounding to nearest even, when it differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WSource {
    pub input: Input,
    pub offset: u64,
    pub dtype: DType,
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

/// A base tensor that the adapters change.
#[derive(Debug)]
pub struct TensorMerge {
    pub name: String,
    /// Index into [`BaseModel::layouts`] and into that layout's tensors.
    pub layout: usize,
    pub tensor: usize,
    /// The output dtype: always the base tensor's.
    pub dtype: DType,
    /// The output shape (the base's, or a replacement's).
    pub shape: Vec<usize>,
    pub w: WSource,
    /// `Δ = U @ V` over a (rows, cols) view of the tensor; rank 0 when nothing is added.
    pub factors: Factors,
    pub terms: Vec<Term>,
    /// Set when a term is DoRA: every term in order, applied one after another.
    pub dora: Option<Vec<DoraGroup>>,
    /// Rows of `W` replaced before merging (trainable tokens), sorted, already rounded to
    /// the output dtype.
    pub rows: Vec<(usize, Vec<f32>)>,
    pub replaced: Option<ReplacedBy>,
}

impl TensorMerge {
    pub fn row_bytes(&self) -> usize {
        self.factors.cols * self.dtype.size()
    }

    pub fn bytes(&self) -> u64 {
        (self.factors.rows * self.row_bytes()) as u64
    }

    /// A replacement served as the adapter's bytes, unchanged.
    pub fn is_plain_copy(&self) -> bool {
        self.factors.rank == 0
            && self.rows.is_empty()
            && self.dora.is_none()
            && self.w.input != Input::Base
            && self.w.dtype == self.dtype
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
    /// (adapter key, base tensor, shape, dtype)
    pub replacements: Vec<(String, String, Vec<usize>, String)>,
    /// Tensors applied to the input embedding because the base ties lm_head to it.
    pub tied: Vec<String>,
    pub tokenizer_files: Vec<String>,
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
    /// Sorted by (layout, tensor) so that file order is plan order.
    pub merges: Vec<TensorMerge>,
    pub adapters: Vec<AdapterSummary>,
    /// `vocab_size` (base, merged) when a replaced embedding changes it.
    pub vocab: Option<VocabResize>,
    /// Files served from an adapter directory instead of the base (tokenizer), by relative
    /// name; the last adapter that has one wins.
    pub extra_files: BTreeMap<PathBuf, PathBuf>,
}

/// (base, merged) `vocab_size` when a replacement resizes the embedding.
pub type VocabResize = (usize, usize);

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
    /// (shapes, ranks, scales, vocabulary, the memory the factors will take); only then are
    /// the factors read, one at a time, into the plan. The adapters keep no data.
    pub fn build(base: &BaseModel, adapters: &mut [Adapter]) -> Result<MergePlan> {
        let adapters = &*adapters;
        let mut planner = Planner::new(base);
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
        let merges = planner.finish(adapters)?;

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
            vocab,
            extra_files,
        })
    }

    /// Bytes of f32 factors held in memory.
    pub fn factor_bytes(&self) -> usize {
        self.merges.iter().map(|m| m.factors.bytes()).sum()
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
