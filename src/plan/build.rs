//! Planning: each adapter's replacements, trainable tokens, LoRA factors and lora_B biases
//! applied in turn to the base tensors they name (in that order, as PEFT loads and merges
//! them). Only headers are looked at here: every shape, layout and scale is checked before
//! `realize.rs` reads any data.

use std::collections::{BTreeMap, BTreeSet};

use super::vocab::{is_vocab_tensor, tied_embedding};
use super::*;
use crate::adapter::{Adapter, ModuleFactors, Stored};

/// The kind of base layer a module is, which decides how its delta is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layer {
    /// nn.Linear: weight (out, in), delta `B @ A`.
    Linear,
    /// transformers' Conv1D: weight (in, out), delta `(B @ A)ᵀ`.
    Conv1D,
    /// nn.Embedding with `lora_embedding_A/B`: weight (vocab, dim), delta `(B @ A)ᵀ`.
    Embedding,
}

impl Layer {
    fn transposed(self) -> bool {
        match self {
            Layer::Linear => false,
            Layer::Conv1D | Layer::Embedding => true,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Layer::Linear => "a Linear layer",
            Layer::Conv1D => "a GPT-2 Conv1D layer (weight stored in × out)",
            Layer::Embedding => "an Embedding layer",
        }
    }
}

/// One adapter's change to a tensor, checked against the tensor's shape; its data is read
/// when the plan is realized.
#[derive(Debug)]
pub(super) enum Op {
    /// `s·B@A` (or its transpose); a DoRA term when there is a magnitude.
    Lora {
        term: Term,
        a: Stored,
        b: Stored,
        magnitude: Option<Stored>,
    },
    /// `s·lora_B.bias`, added to a bias.
    Bias { term: Term, bias: Stored },
    /// Rows `indices` of W replaced by the rows of `values` (trainable tokens); the deltas of
    /// earlier ops on those rows are dropped.
    Tokens {
        adapter: usize,
        indices: Vec<usize>,
        values: Stored,
    },
}

/// A tensor being planned.
pub(super) struct Pending {
    pub w: WSource,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub replaced: Option<ReplacedBy>,
    /// In the order PEFT applies them.
    pub ops: Vec<Op>,
}

fn format_scale(scale: f64) -> String {
    format!("{scale:.6}")
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_string()
}

/// Whether the delta is `B @ A` as stored or transposed, decided by the layer, and a check
/// that it fits the base tensor that way. A delta that fits only the other way is refused,
/// as PEFT refuses to load it (a size mismatch).
fn orientation(
    adapter: &Adapter,
    f: &ModuleFactors,
    shape: &[usize],
    layer: Layer,
) -> Result<bool> {
    let (a, b) = (&f.a, &f.b);
    // B @ A is (out, in) = (b.rows, a.cols).
    let (out, inp) = (b.rows, a.cols);
    let fits = |rows: usize, cols: usize| shape == [rows, cols];
    let transposed = layer.transposed();
    let (rows, cols) = if transposed { (inp, out) } else { (out, inp) };
    if fits(rows, cols) {
        return Ok(transposed);
    }
    let factors = format!(
        "lora_A is {}×{} and lora_B is {}×{}, so the delta is {out}×{inp}",
        a.rows, a.cols, b.rows, b.cols
    );
    let what = if fits(cols, rows) {
        format!(
            "shape does not fit: {factors} and base tensor `{}.weight` is {shape:?}: it fits \
             only {}; PEFT refuses this adapter for {}",
            f.module,
            if transposed {
                "untransposed"
            } else {
                "transposed"
            },
            layer.describe()
        )
    } else {
        format!(
            "shape does not fit: {factors}, but base tensor `{}.weight` is {shape:?}",
            f.module
        )
    };
    Err(Error::tensor(&adapter.file, &a.key, what))
}

/// What one adapter did, for its summary.
#[derive(Default)]
pub(super) struct Tally {
    scales: BTreeMap<String, usize>,
    features: Features,
    changed: BTreeSet<(usize, usize)>,
    warned_fan_in_fan_out: bool,
}

impl Tally {
    fn note_tied(&mut self, tied: bool, key: &str) {
        if tied {
            self.features.tied.push(key.to_string());
        }
    }

    /// PEFT overrides `fan_in_fan_out` by the layer's type, with a warning; so does lorafs
    /// (once per adapter).
    fn note_fan_in_fan_out(&mut self, adapter: &Adapter, module: &str, layer: Layer) {
        let conv1d = layer == Layer::Conv1D;
        if layer == Layer::Embedding
            || conv1d == adapter.config.fan_in_fan_out
            || self.warned_fan_in_fan_out
        {
            return;
        }
        self.warned_fan_in_fan_out = true;
        log::warn!(
            "{}: fan_in_fan_out={} in the config, but {module} is {}; following the layer \
             (as PEFT does)",
            adapter.config_path.display(),
            adapter.config.fan_in_fan_out,
            layer.describe()
        );
    }
}

/// The plan being built: every base tensor some adapter touches, by (layout, tensor).
pub(super) struct Planner<'a> {
    pub(super) base: &'a BaseModel,
    pub(super) pending: BTreeMap<(usize, usize), Pending>,
    conv1d_arch: bool,
    /// With tied embeddings the checkpoint usually holds only the input embedding; PEFT
    /// merges an lm_head change into that shared tensor (in place), and transformers saves
    /// it once. So `lm_head.*` goes to the input embedding when the base has no lm_head.
    pub(super) tied_embedding: Option<(String, String)>,
    /// The output dtype of every floating tensor (`--dtype`), or `None` to keep the base's.
    dtype: Option<DType>,
}

impl<'a> Planner<'a> {
    pub(super) fn new(base: &'a BaseModel, dtype: Option<DType>) -> Planner<'a> {
        let mut planner = Planner {
            base,
            dtype,
            pending: BTreeMap::new(),
            conv1d_arch: base
                .model_type()
                .is_some_and(|t| CONV1D_MODEL_TYPES.contains(&t)),
            tied_embedding: tied_embedding(base),
        };
        // A quantized weight is served dequantized whether or not an adapter changes it.
        for (&loc, q) in base.quant.iter().flat_map(|quant| &quant.tensors) {
            planner.slot(loc, q.dtype);
        }
        planner
    }

    /// The base tensor an adapter key's target names, and whether it was found through
    /// the tied embedding.
    fn lookup(&self, adapter: &Adapter, key: &str, target: &str) -> Result<((usize, usize), bool)> {
        if let Some(&loc) = self.base.tensors.get(target) {
            return Ok((loc, false));
        }
        if let Some((head, emb)) = &self.tied_embedding {
            if let (true, Some(&loc)) = (target == head, self.base.tensors.get(emb)) {
                return Ok((loc, true));
            }
        }
        Err(Error::tensor(
            &adapter.file,
            key,
            format!(
                "maps to base tensor `{target}`, which {} does not have",
                self.base.dir.display()
            ),
        ))
    }

    /// The dtype of a base tensor that is to change, if lorafs can merge into it.
    fn base_dtype(&self, loc: (usize, usize), target: &str) -> Result<DType> {
        if let Some(q) = self.base.quantized(loc) {
            return Ok(q.dtype);
        }
        let entry = &self.base.layouts[loc.0].tensors[loc.1];
        DType::from_safetensors(entry.dtype).ok_or_else(|| {
            Error::tensor(
                &self.base.layouts[loc.0].path,
                target,
                format!(
                    "dtype {:?} cannot take a LoRA delta (only F16, BF16, F32): quantized base \
                     tensors are refused; merge into a dequantized base",
                    entry.dtype
                ),
            )
        })
    }

    /// The layer a module's factors apply to: from the key (embedding LoRA), the
    /// architecture and the layer's name, never from the shapes.
    fn layer(&self, f: &ModuleFactors) -> Layer {
        let leaf = f.module.rsplit('.').next().unwrap_or("");
        if f.embedding {
            Layer::Embedding
        } else if self.conv1d_arch && CONV1D_LAYERS.contains(&leaf) {
            Layer::Conv1D
        } else {
            Layer::Linear
        }
    }

    /// The pending merge of a base tensor, created as "W unchanged" on first use.
    fn slot(&mut self, loc: (usize, usize), dtype: DType) -> &mut Pending {
        let (base, out) = (self.base, self.dtype);
        self.pending.entry(loc).or_insert_with(|| {
            let entry = &base.layouts[loc.0].tensors[loc.1];
            if let Some(q) = base.quantized(loc) {
                // Dequantized to f32, the deltas added, rounded once into the model's dtype.
                return Pending {
                    w: WSource {
                        file: WFile::Base,
                        offset: q.codes.offset,
                        dtype: DType::F32,
                        quant: Some(q.scheme),
                    },
                    shape: q.shape.clone(),
                    dtype: out.unwrap_or(q.dtype),
                    replaced: None,
                    ops: Vec::new(),
                };
            }
            Pending {
                w: WSource {
                    file: WFile::Base,
                    offset: entry.offset,
                    dtype,
                    quant: None,
                },
                shape: entry.shape.clone(),
                dtype: out.unwrap_or(dtype),
                replaced: None,
                ops: Vec::new(),
            }
        })
    }

    /// Whole tensors: PEFT loads them in place of the base's before merging. Only the
    /// input and output embeddings may change shape (a resized vocabulary), and only their
    /// first dimension.
    pub(super) fn replacements(
        &mut self,
        ai: usize,
        adapter: &Adapter,
        tally: &mut Tally,
    ) -> Result<()> {
        for r in &adapter.replacements {
            let (loc, tied) = self.lookup(adapter, &r.key, &r.target)?;
            tally.note_tied(tied, &r.key);
            if self.base.quantized(loc).is_some() {
                return Err(Error::unsupported(
                    &adapter.file,
                    format!(
                        "`{}` replaces `{}`, a bitsandbytes-quantized weight of the base;                          replacing a quantized weight is not supported: use the 16-bit base",
                        r.key, r.target
                    ),
                ));
            }
            let dtype = self.base_dtype(loc, &r.target)?;
            let entry = &self.base.layouts[loc.0].tensors[loc.1];
            let src = match DType::from_safetensors(r.dtype) {
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
            if r.shape != entry.shape {
                let vocab = is_vocab_tensor(&r.target, &self.tied_embedding)
                    || is_vocab_tensor(&entry.name, &self.tied_embedding);
                let rows_only = !r.shape.is_empty()
                    && r.shape.len() == entry.shape.len()
                    && r.shape.get(1..) == entry.shape.get(1..);
                if !(vocab && rows_only) {
                    return Err(Error::tensor(
                        &adapter.file,
                        &r.key,
                        format!(
                            "shape {:?} cannot replace base tensor `{}` of shape {:?}: only the \
                             input and output embeddings may change shape, and only in their \
                             first dimension (a resized vocabulary)",
                            r.shape, entry.name, entry.shape
                        ),
                    ));
                }
            }
            let p = self.slot(loc, dtype);
            // Replacing W discards what earlier adapters merged into it (as loading it into
            // the previously merged model would).
            p.ops.clear();
            p.shape = r.shape.clone();
            p.w = WSource {
                file: WFile::Adapter(ai),
                offset: r.offset,
                dtype: src,
                quant: None,
            };
            p.replaced = Some(ReplacedBy {
                adapter: ai,
                key: r.key.clone(),
            });
            tally.features.replacements.push(ReplacementInfo {
                key: r.key.clone(),
                target: r.target.clone(),
                shape: r.shape.clone(),
                dtype: format!("{:?}", r.dtype),
            });
            tally.changed.insert(loc);
        }
        Ok(())
    }

    /// Trainable tokens: rows of W replaced (PEFT `index_copy`, values converted to the
    /// weight's dtype).
    pub(super) fn trainable_tokens(
        &mut self,
        ai: usize,
        adapter: &Adapter,
        tally: &mut Tally,
    ) -> Result<()> {
        for t in adapter.tokens.values() {
            let target = format!("{}.weight", t.module);
            let (loc, tied) = self.lookup(adapter, &t.values.key, &target)?;
            tally.note_tied(tied, &t.values.key);
            let dtype = self.base_dtype(loc, &target)?;
            let p = self.slot(loc, dtype);
            // Only a 2-D tensor has rows of tokens (so no product of dimensions is taken).
            let rows = match *p.shape.as_slice() {
                [rows, cols] if cols == t.values.cols => rows,
                _ => {
                    return Err(Error::tensor(
                        &adapter.file,
                        &t.values.key,
                        format!(
                            "rows of {} values do not fit base tensor `{target}` of shape {:?}",
                            t.values.cols, p.shape
                        ),
                    ))
                }
            };
            let dora = |op: &Op| matches!(op, Op::Lora { term, .. } if term.kind == TermKind::Dora);
            if p.ops.iter().any(dora) {
                return Err(Error::unsupported(
                    &adapter.file,
                    format!(
                        "trainable tokens on `{target}`, which an earlier adapter changes with DoRA"
                    ),
                ));
            }
            if let Some(index) = t.indices.iter().find(|&&i| i >= rows) {
                return Err(Error::tensor(
                    &adapter.file,
                    &t.values.key,
                    format!("token index {index} is out of range for `{target}` ({rows} rows)"),
                ));
            }
            p.ops.push(Op::Tokens {
                adapter: ai,
                indices: t.indices.clone(),
                values: t.values.clone(),
            });
            tally
                .features
                .trainable_tokens
                .push((target.clone(), t.indices.len()));
            tally.changed.insert(loc);
        }
        Ok(())
    }

    /// LoRA factors (and DoRA), on top of the (possibly replaced) W.
    pub(super) fn lora(&mut self, ai: usize, adapter: &Adapter, tally: &mut Tally) -> Result<()> {
        for factors in adapter.modules.values() {
            let target = format!("{}.weight", factors.module);
            let (loc, tied) = self.lookup(adapter, &factors.a.key, &target)?;
            tally.note_tied(tied, &factors.a.key);
            let dtype = self.base_dtype(loc, &target)?;
            let layer = self.layer(factors);
            tally.note_fan_in_fan_out(adapter, &factors.module, layer);
            let p = self.slot(loc, dtype);
            let transposed = orientation(adapter, factors, &p.shape, layer)?;
            let scale = adapter.scale(factors)?;
            *tally.scales.entry(format_scale(scale)).or_insert(0) += 1;
            let magnitude = adapter.magnitudes.get(&factors.module);
            let kind = if magnitude.is_some() {
                TermKind::Dora
            } else {
                TermKind::Lora
            };
            if let Some(m) = magnitude {
                check_dora(adapter, m, p, layer, &target)?;
                tally.features.dora += 1;
            } else if layer == Layer::Embedding {
                tally.features.embedding_lora += 1;
            } else if layer == Layer::Conv1D {
                tally.features.conv1d += 1;
            }
            let term = Term {
                adapter: ai,
                module: factors.module.clone(),
                rank: factors.rank(),
                scale,
                transposed,
                kind,
            };
            // A LoRA applied after trainable tokens adds onto the replaced rows too.
            p.ops.push(Op::Lora {
                term,
                a: factors.a.clone(),
                b: factors.b.clone(),
                magnitude: magnitude.cloned(),
            });
            tally.changed.insert(loc);
        }
        Ok(())
    }

    /// lora_B.bias: `bias += s·lora_B.bias`, a rank-1 merge of one row.
    pub(super) fn lora_biases(
        &mut self,
        ai: usize,
        adapter: &Adapter,
        tally: &mut Tally,
    ) -> Result<()> {
        for (module, bias) in &adapter.lora_biases {
            let Some(factors) = adapter.modules.get(module) else {
                return Err(Error::tensor(
                    &adapter.file,
                    &bias.key,
                    "lora_B.bias without lora_A/lora_B factors for its module",
                ));
            };
            let target = format!("{module}.bias");
            let loc = *self.base.tensors.get(&target).ok_or_else(|| {
                Error::tensor(
                    &adapter.file,
                    &bias.key,
                    format!(
                        "lora_bias needs base tensor `{target}`, which {} does not have \
                         (PEFT cannot merge lora_bias into a layer without a bias either)",
                        self.base.dir.display()
                    ),
                )
            })?;
            let dtype = self.base_dtype(loc, &target)?;
            let scale = adapter.scale(factors)?;
            let p = self.slot(loc, dtype);
            if view(&p.shape) != Some((1, bias.cols)) {
                return Err(Error::tensor(
                    &adapter.file,
                    &bias.key,
                    format!(
                        "has {} values but `{target}` has shape {:?}",
                        bias.cols, p.shape
                    ),
                ));
            }
            let term = Term {
                adapter: ai,
                module: module.clone(),
                rank: 1,
                scale,
                transposed: false,
                kind: TermKind::LoraBias,
            };
            p.ops.push(Op::Bias {
                term,
                bias: bias.clone(),
            });
            tally.features.lora_bias += 1;
            tally.changed.insert(loc);
        }
        Ok(())
    }
}

/// DoRA is merged on Linear layers, with one magnitude per row, on rows no token replaces.
fn check_dora(
    adapter: &Adapter,
    m: &Stored,
    p: &Pending,
    layer: Layer,
    target: &str,
) -> Result<()> {
    if layer != Layer::Linear {
        return Err(Error::unsupported(
            &adapter.file,
            format!(
                "`{}`: DoRA on a transposed layer ({}) normalises columns of the stored \
                 weight; lorafs merges DoRA on Linear layers only",
                m.key,
                layer.describe()
            ),
        ));
    }
    if p.shape.first() != Some(&m.cols) {
        return Err(Error::tensor(
            &adapter.file,
            &m.key,
            format!(
                "has {} values but `{target}` has shape {:?}",
                m.cols, p.shape
            ),
        ));
    }
    if p.ops.iter().any(|op| matches!(op, Op::Tokens { .. })) {
        return Err(Error::unsupported(
            &adapter.file,
            format!("DoRA on `{target}`, whose rows trainable tokens replace"),
        ));
    }
    Ok(())
}

/// The summary of one adapter, for `inspect` and the logs.
pub(super) fn summary(adapter: &Adapter, tally: Tally) -> AdapterSummary {
    let Tally {
        scales,
        mut features,
        changed,
        warned_fan_in_fan_out: _,
    } = tally;
    features.tokenizer_files = adapter
        .tokenizer_files
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let c = &adapter.config;
    AdapterSummary {
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
    }
}
