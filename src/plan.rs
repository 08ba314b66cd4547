//! The merge plan: which base tensors change, and the f32 factors that change them.
//!
//! Every supported delta is row-local: row `i` of the merged tensor needs row `i` of `W` and
//! row `i` of `U`. Linear LoRA gives `U = w·s·B`, `V = A`; transposed layouts (GPT-2 Conv1D,
//! embeddings) give `U = w·s·Aᵀ`, `V = Bᵀ`. Several adapters on one tensor are concatenated
//! along the rank, so their deltas are summed in f32 and rounded once.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::adapter::{Adapter, ModuleFactors};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernel::Factors;
use crate::model::BaseModel;

/// Architectures whose projection layers are transformers' `Conv1D` (weights stored
/// (in, out)). Only square weights need this: other shapes show their orientation.
const CONV1D_MODEL_TYPES: [&str; 4] = ["gpt2", "openai-gpt", "imagegpt", "decision_transformer"];

/// One adapter's contribution to one tensor.
#[derive(Debug, Clone)]
pub struct Term {
    pub adapter: usize,
    pub module: String,
    pub rank: usize,
    /// `w · alpha / r` (or `/ √r` with rsLoRA), as applied.
    pub scale: f64,
    pub transposed: bool,
}

/// A base tensor that the adapters change.
#[derive(Debug)]
pub struct TensorMerge {
    pub name: String,
    /// Index into [`BaseModel::layouts`] and into that layout's tensors.
    pub layout: usize,
    pub tensor: usize,
    pub dtype: DType,
    pub factors: Factors,
    pub terms: Vec<Term>,
}

impl TensorMerge {
    pub fn row_bytes(&self) -> usize {
        self.factors.cols * self.dtype.size()
    }
}

/// Per-adapter facts for `inspect` and the logs, kept after the factors are packed.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub dir: PathBuf,
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
}

#[derive(Debug)]
pub struct MergePlan {
    /// Sorted by (layout, tensor) so that file order is plan order.
    pub merges: Vec<TensorMerge>,
    pub adapters: Vec<AdapterSummary>,
}

impl MergePlan {
    pub fn build(base: &BaseModel, adapters: &[Adapter]) -> Result<MergePlan> {
        // (layout, tensor) → (terms, per-term oriented factors).
        let mut pending: BTreeMap<(usize, usize), Vec<(Term, Vec<f32>, Vec<f32>)>> =
            BTreeMap::new();
        let mut summaries = Vec::new();
        let conv1d_arch = base
            .model_type()
            .is_some_and(|t| CONV1D_MODEL_TYPES.contains(&t));

        for (ai, adapter) in adapters.iter().enumerate() {
            let mut scales = BTreeMap::new();
            for factors in adapter.modules.values() {
                let target = format!("{}.weight", factors.module);
                let &(li, ti) = base.tensors.get(&target).ok_or_else(|| {
                    Error::tensor(
                        &adapter.file,
                        &factors.a.key,
                        format!(
                            "maps to base tensor `{target}`, which {} does not have",
                            base.dir.display()
                        ),
                    )
                })?;
                let entry = &base.layouts[li].tensors[ti];
                DType::from_safetensors(entry.dtype).ok_or_else(|| {
                    Error::tensor(
                        &base.layouts[li].path,
                        &target,
                        format!(
                            "dtype {:?} cannot take a LoRA delta (only F16, BF16, F32; quantized bases are refused)",
                            entry.dtype
                        ),
                    )
                })?;
                let transposed = orientation(adapter, factors, &entry.shape, conv1d_arch)?;
                let scale = adapter.scale(factors);
                let (u, v) = orient(factors, transposed, scale as f32);
                *scales.entry(format_scale(scale)).or_insert(0) += 1;
                let term = Term {
                    adapter: ai,
                    module: factors.module.clone(),
                    rank: factors.rank(),
                    scale,
                    transposed,
                };
                pending.entry((li, ti)).or_default().push((term, u, v));
            }
            let c = &adapter.config;
            summaries.push(AdapterSummary {
                dir: adapter.dir.clone(),
                weight: adapter.weight,
                r: c.r,
                lora_alpha: c.lora_alpha,
                use_rslora: c.use_rslora,
                alpha_pattern: c
                    .alpha_pattern
                    .keys()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
                rank_pattern: c
                    .rank_pattern
                    .keys()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
                target_modules: c.target_modules_display(),
                base_model: c.base_model_name_or_path.clone(),
                tensors_changed: adapter.modules.len(),
                num_params: adapter.num_params,
                scales,
            });
        }

        let merges = pending
            .into_iter()
            .map(|((li, ti), parts)| {
                let entry = &base.layouts[li].tensors[ti];
                let (rows, cols) = (entry.shape[0], entry.shape[1]);
                let rank: usize = parts.iter().map(|(t, _, _)| t.rank).sum();
                let mut u = vec![0f32; rows * rank];
                let mut v = Vec::with_capacity(rank * cols);
                let mut offset = 0;
                let mut terms = Vec::new();
                for (term, tu, tv) in parts {
                    for i in 0..rows {
                        u[i * rank + offset..i * rank + offset + term.rank]
                            .copy_from_slice(&tu[i * term.rank..(i + 1) * term.rank]);
                    }
                    v.extend_from_slice(&tv);
                    offset += term.rank;
                    terms.push(term);
                }
                TensorMerge {
                    name: entry.name.clone(),
                    layout: li,
                    tensor: ti,
                    dtype: DType::from_safetensors(entry.dtype).expect("checked above"),
                    factors: Factors::new(rows, rank, cols, u, v),
                    terms,
                }
            })
            .collect();
        Ok(MergePlan {
            merges,
            adapters: summaries,
        })
    }

    /// Bytes of f32 factors held in memory.
    pub fn factor_bytes(&self) -> usize {
        self.merges.iter().map(|m| m.factors.bytes()).sum()
    }
}

fn format_scale(scale: f64) -> String {
    format!("{scale:.6}")
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_string()
}

/// Decide whether the delta is `B @ A` as stored (Linear) or transposed (Conv1D, embedding),
/// and check that the shapes fit the base tensor.
fn orientation(
    adapter: &Adapter,
    f: &ModuleFactors,
    shape: &[usize],
    conv1d_arch: bool,
) -> Result<bool> {
    let (a, b) = (&f.a, &f.b);
    // B @ A is (out, in) = (b.rows, a.cols).
    let (out, inp) = (b.rows, a.cols);
    let fits = |rows: usize, cols: usize| shape.len() == 2 && shape[0] == rows && shape[1] == cols;
    let mismatch = || {
        Error::tensor(
            &adapter.file,
            &a.key,
            format!(
                "shape does not fit: lora_A is {}×{} and lora_B is {}×{}, so the delta is {out}×{inp}, \
                 but base tensor `{}.weight` is {shape:?}",
                a.rows, a.cols, b.rows, b.cols, f.module
            ),
        )
    };
    if f.embedding {
        // lora_embedding_A is (r, vocab), lora_embedding_B is (dim, r): Δ = (B @ A)ᵀ.
        return if fits(inp, out) {
            Ok(true)
        } else {
            Err(mismatch())
        };
    }
    match (fits(out, inp), fits(inp, out)) {
        (true, false) => Ok(false),
        (false, true) => Ok(true),
        (true, true) => {
            // Square: the layout cannot be seen. PEFT forces fan_in_fan_out by module type
            // (Conv1D → true), so the architecture decides; the config flag is only a hint.
            let leaf = f.module.rsplit('.').next().unwrap_or("");
            let conv1d = conv1d_arch && leaf.starts_with("c_");
            if conv1d != adapter.config.fan_in_fan_out {
                log::warn!(
                    "{}: {}: fan_in_fan_out={} in the config, but the layer is {}; following the layer",
                    adapter.file.display(),
                    f.module,
                    adapter.config.fan_in_fan_out,
                    if conv1d { "a GPT-2 Conv1D" } else { "a Linear" }
                );
            }
            Ok(conv1d)
        }
        (false, false) => Err(mismatch()),
    }
}

/// (U, V) for one adapter: `U = s·B`, `V = A`, or transposed `U = s·Aᵀ`, `V = Bᵀ`.
fn orient(f: &ModuleFactors, transposed: bool, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let r = f.rank();
    if !transposed {
        let u = f.b.data.iter().map(|&x| scale * x).collect();
        (u, f.a.data.clone())
    } else {
        let (rows, cols) = (f.a.cols, f.b.rows);
        let mut u = vec![0f32; rows * r];
        for k in 0..r {
            for i in 0..rows {
                u[i * r + k] = scale * f.a.data[k * rows + i];
            }
        }
        let mut v = vec![0f32; r * cols];
        for j in 0..cols {
            for k in 0..r {
                v[k * cols + j] = f.b.data[j * r + k];
            }
        }
        (u, v)
    }
}
