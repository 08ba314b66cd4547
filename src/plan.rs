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
    pub shape: Vec<usize>,
    pub dtype: DType,
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
    pub vocab: Option<(usize, usize)>,
    /// Files served from an adapter directory instead of the base (tokenizer), by relative
    /// name; the last adapter that has one wins.
    pub extra_files: BTreeMap<PathBuf, PathBuf>,
}

/// A tensor being planned.
/// One term of a pending merge: the term, its U and V, and a DoRA magnitude if any.
type Part = (Term, Vec<f32>, Vec<f32>, Option<Vec<f32>>);

struct Pending {
    w: WSource,
    shape: Vec<usize>,
    dtype: DType,
    replaced: Option<ReplacedBy>,
    parts: Vec<Part>,
    rows: BTreeMap<usize, Vec<f32>>,
}

/// (rows, cols) of the 2-D view a tensor is merged in: a 1-D tensor is one row.
fn view(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (1, *n),
        [r, rest @ ..] => (*r, rest.iter().product()),
    }
}

impl MergePlan {
    /// Plan the merge. The adapters' LoRA factors are moved into the plan (their shapes
    /// stay, for messages), so memory holds one copy of them.
    pub fn build(base: &BaseModel, adapters: &mut [Adapter]) -> Result<MergePlan> {
        let mut pending: BTreeMap<(usize, usize), Pending> = BTreeMap::new();
        let mut summaries = Vec::new();
        let conv1d_arch = base
            .model_type()
            .is_some_and(|t| CONV1D_MODEL_TYPES.contains(&t));
        // With tied embeddings the checkpoint usually holds only the input embedding; PEFT
        // merges an lm_head change into that shared tensor (in place), and transformers saves
        // it once. So `lm_head.*` goes to the input embedding when the base has no lm_head.
        let tied_embedding = tied_embedding(base);

        let lookup =
            |adapter: &Adapter, key: &str, target: &str| -> Result<((usize, usize), bool)> {
                if let Some(&loc) = base.tensors.get(target) {
                    return Ok((loc, false));
                }
                if let Some((head, emb)) = &tied_embedding {
                    if target == head {
                        return Ok((base.tensors[emb.as_str()], true));
                    }
                }
                Err(Error::tensor(
                    &adapter.file,
                    key,
                    format!(
                        "maps to base tensor `{target}`, which {} does not have",
                        base.dir.display()
                    ),
                ))
            };
        let base_dtype = |loc: (usize, usize), target: &str| -> Result<DType> {
            let entry = &base.layouts[loc.0].tensors[loc.1];
            DType::from_safetensors(entry.dtype).ok_or_else(|| {
                Error::tensor(
                    &base.layouts[loc.0].path,
                    target,
                    format!(
                        "dtype {:?} cannot take a LoRA delta (only F16, BF16, F32): quantized base \
                         tensors are refused; merge into a dequantized base",
                        entry.dtype
                    ),
                )
            })
        };
        let fresh = |loc: (usize, usize), dtype: DType| {
            let entry = &base.layouts[loc.0].tensors[loc.1];
            Pending {
                w: WSource {
                    input: Input::Base,
                    offset: entry.offset,
                    dtype,
                },
                shape: entry.shape.clone(),
                dtype,
                replaced: None,
                parts: Vec::new(),
                rows: BTreeMap::new(),
            }
        };

        for (ai, adapter) in adapters.iter_mut().enumerate() {
            let mut scales = BTreeMap::new();
            let mut features = Features::default();
            let mut changed = std::collections::BTreeSet::new();
            let note_tied = |features: &mut Features, tied: bool, key: &str| {
                if tied {
                    features.tied.push(key.to_string());
                }
            };

            // 1. Whole tensors: PEFT loads them in place of the base's before merging.
            for r in &adapter.replacements {
                let (loc, tied) = lookup(adapter, &r.key, &r.target)?;
                note_tied(&mut features, tied, &r.key);
                let dtype = base_dtype(loc, &r.target)?;
                let entry = &base.layouts[loc.0].tensors[loc.1];
                let src = DType::from_safetensors(r.dtype);
                let src = match src {
                    Some(d) => d,
                    None if r.dtype == entry.dtype && r.shape == entry.shape => dtype,
                    None => {
                        return Err(Error::tensor(
                            &adapter.file,
                            &r.key,
                            format!(
                                "dtype {:?} cannot replace a {:?} tensor",
                                r.dtype, entry.dtype
                            ),
                        ))
                    }
                };
                if r.shape.len() != entry.shape.len() || r.shape.get(1..) != entry.shape.get(1..) {
                    return Err(Error::tensor(
                        &adapter.file,
                        &r.key,
                        format!(
                            "shape {:?} cannot replace base tensor `{}` of shape {:?} \
                             (only the first dimension, e.g. a resized vocabulary, may differ)",
                            r.shape, r.target, entry.shape
                        ),
                    ));
                }
                let p = pending.entry(loc).or_insert_with(|| fresh(loc, dtype));
                // Replacing W discards what earlier adapters merged into it (as loading it into
                // the previously merged model would).
                p.parts.clear();
                p.rows.clear();
                p.shape = r.shape.clone();
                p.w = WSource {
                    input: Input::Adapter(ai),
                    offset: r.offset,
                    dtype: src,
                };
                p.replaced = Some(ReplacedBy {
                    adapter: ai,
                    key: r.key.clone(),
                    shape: r.shape.clone(),
                    dtype: src,
                });
                features.replacements.push((
                    r.key.clone(),
                    r.target.clone(),
                    r.shape.clone(),
                    format!("{:?}", r.dtype),
                ));
                changed.insert(loc);
            }

            // 2. Trainable tokens: rows of W replaced (PEFT `index_copy`, values converted to
            //    the weight's dtype).
            for t in adapter.tokens.values() {
                let target = format!("{}.weight", t.module);
                let (loc, tied) = lookup(adapter, &t.values.key, &target)?;
                note_tied(&mut features, tied, &t.values.key);
                let dtype = base_dtype(loc, &target)?;
                let p = pending.entry(loc).or_insert_with(|| fresh(loc, dtype));
                let (rows, cols) = view(&p.shape);
                if p.shape.len() != 2 || t.values.cols != cols {
                    return Err(Error::tensor(
                        &adapter.file,
                        &t.values.key,
                        format!(
                            "rows of {} values do not fit base tensor `{target}` of shape {:?}",
                            t.values.cols, p.shape
                        ),
                    ));
                }
                if p.parts.iter().any(|(term, ..)| term.kind == TermKind::Dora) {
                    return Err(Error::unsupported(
                        &adapter.file,
                        format!("trainable tokens on `{target}`, which an earlier adapter changes with DoRA"),
                    ));
                }
                for (k, &index) in t.indices.iter().enumerate() {
                    if index >= rows {
                        return Err(Error::tensor(
                            &adapter.file,
                            &t.values.key,
                            format!(
                                "token index {index} is out of range for `{target}` ({rows} rows)"
                            ),
                        ));
                    }
                    let row: Vec<f32> = t.values.data[k * cols..(k + 1) * cols]
                        .iter()
                        .map(|&x| round_to(dtype, x))
                        .collect();
                    // Earlier adapters' deltas on this row are overwritten.
                    for (term, u, _, _) in &mut p.parts {
                        u[index * term.rank..(index + 1) * term.rank].fill(0.0);
                    }
                    p.rows.insert(index, row);
                }
                features
                    .trainable_tokens
                    .push((target.clone(), t.indices.len()));
                changed.insert(loc);
            }

            // 3. LoRA factors (and DoRA), on top of the (possibly replaced) W.
            let modules: Vec<String> = adapter.modules.keys().cloned().collect();
            for module in modules {
                let factors = &adapter.modules[&module];
                let target = format!("{}.weight", factors.module);
                let (loc, tied) = lookup(adapter, &factors.a.key, &target)?;
                note_tied(&mut features, tied, &factors.a.key);
                let dtype = base_dtype(loc, &target)?;
                let p = pending.entry(loc).or_insert_with(|| fresh(loc, dtype));
                let transposed = orientation(adapter, factors, &p.shape, conv1d_arch)?;
                let scale = adapter.scale(factors);
                let (embedding, rank) = (factors.embedding, factors.rank());
                // The plan takes the factors over: no second copy of them at any time.
                let factors = adapter.modules.get_mut(&module).expect("listed above");
                let (u, v) = orient(factors, transposed, scale as f32);
                *scales.entry(format_scale(scale)).or_insert(0) += 1;
                let magnitude = adapter.magnitudes.get(&factors.module);
                let kind = if magnitude.is_some() {
                    TermKind::Dora
                } else {
                    TermKind::Lora
                };
                if let Some(m) = magnitude {
                    if transposed {
                        return Err(Error::unsupported(
                            &adapter.file,
                            format!(
                                "`{}`: DoRA on a transposed layer ({}) normalises columns of the stored \
                                 weight; lorafs merges DoRA on Linear layers only",
                                m.key,
                                if embedding { "embedding" } else { "GPT-2 Conv1D" }
                            ),
                        ));
                    }
                    if m.cols != p.shape[0] {
                        return Err(Error::tensor(
                            &adapter.file,
                            &m.key,
                            format!(
                                "has {} values but `{target}` has {} rows",
                                m.cols, p.shape[0]
                            ),
                        ));
                    }
                    if !p.rows.is_empty() {
                        return Err(Error::unsupported(
                            &adapter.file,
                            format!("DoRA on `{target}`, whose rows trainable tokens replace"),
                        ));
                    }
                    features.dora += 1;
                } else if embedding {
                    features.embedding_lora += 1;
                } else if transposed {
                    features.conv1d += 1;
                }
                let term = Term {
                    adapter: ai,
                    module,
                    rank,
                    scale,
                    transposed,
                    kind,
                };
                // A LoRA applied after trainable tokens adds onto the replaced rows too.
                p.parts
                    .push((term, u, v, magnitude.map(|m| m.data.clone())));
                changed.insert(loc);
            }

            // 4. lora_B.bias: `bias += s·lora_B.bias`, a rank-1 merge of one row.
            for (module, bias) in &adapter.lora_biases {
                let factors = &adapter.modules[module];
                let target = format!("{module}.bias");
                let (loc, _) = base
                    .tensors
                    .get(&target)
                    .map(|&l| (l, false))
                    .ok_or_else(|| {
                        Error::tensor(
                            &adapter.file,
                            &bias.key,
                            format!(
                                "lora_bias needs base tensor `{target}`, which {} does not have \
                                 (PEFT cannot merge lora_bias into a layer without a bias either)",
                                base.dir.display()
                            ),
                        )
                    })?;
                let dtype = base_dtype(loc, &target)?;
                let p = pending.entry(loc).or_insert_with(|| fresh(loc, dtype));
                if view(&p.shape) != (1, bias.cols) {
                    return Err(Error::tensor(
                        &adapter.file,
                        &bias.key,
                        format!(
                            "has {} values but `{target}` has shape {:?}",
                            bias.cols, p.shape
                        ),
                    ));
                }
                let scale = adapter.scale(factors);
                let term = Term {
                    adapter: ai,
                    module: module.clone(),
                    rank: 1,
                    scale,
                    transposed: false,
                    kind: TermKind::LoraBias,
                };
                p.parts
                    .push((term, vec![scale as f32], bias.data.clone(), None));
                features.lora_bias += 1;
                changed.insert(loc);
            }

            features.tokenizer_files = adapter
                .tokenizer_files
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            let c = &adapter.config;
            summaries.push(AdapterSummary {
                dir: adapter.dir.clone(),
                file: adapter.file.clone(),
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
                tensors_changed: changed.len(),
                num_params: adapter.num_params,
                scales,
                features,
            });
        }

        let mut vocab = None;
        let merges = pending
            .into_iter()
            .map(|((li, ti), p)| {
                let entry = &base.layouts[li].tensors[ti];
                let (rows, cols) = view(&p.shape);
                if p.shape != entry.shape {
                    let old = entry.shape[0];
                    let new = p.shape[0];
                    match vocab {
                        Some((_, v)) if v != new => {
                            return Err(Error::unsupported(
                                &base.dir,
                                format!(
                                    "adapters resize tensors to {v} and to {new} rows; \
                                     lorafs can serve one vocabulary size only"
                                ),
                            ))
                        }
                        _ => vocab = Some((old, new)),
                    }
                }
                let rank: usize = p.parts.iter().map(|(t, ..)| t.rank).sum();
                let any_dora = p.parts.iter().any(|(t, ..)| t.kind == TermKind::Dora);
                let mut offset = 0;
                let mut terms = Vec::new();
                let mut groups = Vec::new();
                let mut factors = Vec::new();
                for (term, tu, tv, magnitude) in p.parts {
                    groups.push(DoraGroup {
                        offset,
                        rank: term.rank,
                        magnitude,
                    });
                    offset += term.rank;
                    factors.push((term.rank, tu, tv));
                    terms.push(term);
                }
                let (u, v) = concat_ranks(rows, rank, cols, factors);
                Ok(TensorMerge {
                    name: entry.name.clone(),
                    layout: li,
                    tensor: ti,
                    dtype: p.dtype,
                    shape: p.shape,
                    w: p.w,
                    factors: Factors::new(rows, rank, cols, u, v),
                    terms,
                    dora: any_dora.then_some(groups),
                    rows: p.rows.into_iter().collect(),
                    replaced: p.replaced,
                })
            })
            .collect::<Result<Vec<_>>>()?;

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

/// `x` rounded to `dtype` (nearest even) and widened back.
fn round_to(dtype: DType, x: f32) -> f32 {
    let mut b = [0u8; 4];
    dtype.store(&mut b, 0, x);
    dtype.load(&b, 0)
}

/// (`lm_head.weight`, input embedding name) when the base ties them and stores only the
/// embedding.
fn tied_embedding(base: &BaseModel) -> Option<(String, String)> {
    let tied = base
        .config
        .as_ref()
        .and_then(|c| c.get("tie_word_embeddings"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(true);
    let head = "lm_head.weight";
    if !tied || base.tensors.contains_key(head) {
        return None;
    }
    let mut embeddings = base
        .tensors
        .keys()
        .filter(|n| n.ends_with("embed_tokens.weight") || n.ends_with(".wte.weight"));
    let emb = embeddings.next()?.clone();
    if embeddings.next().is_some() {
        return None;
    }
    Some((head.to_string(), emb))
}

fn format_scale(scale: f64) -> String {
    format!("{scale:.6}")
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_string()
}

/// Decide whether the delta is `B @ A` as stored (Linear) or transposed (Conv1D, embedding),
/// and check that the shapes fit the base tensor.
/// Concatenate per-term factors along the rank: `U = [U₁ | U₂ | …]`, `V = [V₁; V₂; …]`.
/// A single term (the common case) is moved, not copied, so loading needs no second copy.
fn concat_ranks(
    rows: usize,
    rank: usize,
    cols: usize,
    mut parts: Vec<(usize, Vec<f32>, Vec<f32>)>,
) -> (Vec<f32>, Vec<f32>) {
    if parts.len() == 1 {
        let (_, u, v) = parts.pop().expect("one part");
        return (u, v);
    }
    let mut u = vec![0f32; rows * rank];
    let mut v = Vec::with_capacity(rank * cols);
    let mut offset = 0;
    for (r, tu, tv) in parts {
        for i in 0..rows {
            u[i * rank + offset..i * rank + offset + r].copy_from_slice(&tu[i * r..(i + 1) * r]);
        }
        v.extend_from_slice(&tv);
        offset += r;
    }
    (u, v)
}

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
/// Takes the factors' data out of `f` (only their shapes stay).
fn orient(f: &mut ModuleFactors, transposed: bool, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let r = f.rank();
    let (a, b) = (std::mem::take(&mut f.a.data), std::mem::take(&mut f.b.data));
    if !transposed {
        let mut u = b;
        u.iter_mut().for_each(|x| *x *= scale);
        (u, a)
    } else {
        let (rows, cols) = (f.a.cols, f.b.rows);
        let mut u = vec![0f32; rows * r];
        for k in 0..r {
            for i in 0..rows {
                u[i * r + k] = scale * a[k * rows + i];
            }
        }
        let mut v = vec![0f32; r * cols];
        for j in 0..cols {
            for k in 0..r {
                v[k * cols + j] = b[j * r + k];
            }
        }
        (u, v)
    }
}
