//! Building the plan: each adapter's replacements, trainable tokens, LoRA factors and
//! lora_B biases applied in turn to the base tensors they name (in that order, as PEFT loads
//! and merges them), then the terms of every tensor concatenated along the rank.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::adapter::{Adapter, ModuleFactors};

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

/// What one adapter did, for its summary.
#[derive(Default)]
pub(super) struct Tally {
    scales: BTreeMap<String, usize>,
    features: Features,
    changed: BTreeSet<(usize, usize)>,
}

impl Tally {
    fn note_tied(&mut self, tied: bool, key: &str) {
        if tied {
            self.features.tied.push(key.to_string());
        }
    }
}

/// The plan being built: every base tensor some adapter touches, by (layout, tensor).
pub(super) struct Planner<'a> {
    base: &'a BaseModel,
    pending: BTreeMap<(usize, usize), Pending>,
    conv1d_arch: bool,
    /// With tied embeddings the checkpoint usually holds only the input embedding; PEFT
    /// merges an lm_head change into that shared tensor (in place), and transformers saves
    /// it once. So `lm_head.*` goes to the input embedding when the base has no lm_head.
    tied_embedding: Option<(String, String)>,
}

impl<'a> Planner<'a> {
    pub(super) fn new(base: &'a BaseModel) -> Planner<'a> {
        Planner {
            base,
            pending: BTreeMap::new(),
            conv1d_arch: base
                .model_type()
                .is_some_and(|t| CONV1D_MODEL_TYPES.contains(&t)),
            tied_embedding: tied_embedding(base),
        }
    }

    /// The base tensor an adapter key's target names, and whether it was found through
    /// the tied embedding.
    fn lookup(&self, adapter: &Adapter, key: &str, target: &str) -> Result<((usize, usize), bool)> {
        if let Some(&loc) = self.base.tensors.get(target) {
            return Ok((loc, false));
        }
        if let Some((head, emb)) = &self.tied_embedding {
            if target == head {
                return Ok((self.base.tensors[emb.as_str()], true));
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

    /// The pending merge of a base tensor, created as "W unchanged" on first use.
    fn slot(&mut self, loc: (usize, usize), dtype: DType) -> &mut Pending {
        let base = self.base;
        self.pending.entry(loc).or_insert_with(|| {
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
        })
    }

    /// Whole tensors: PEFT loads them in place of the base's before merging.
    pub(super) fn replacements(
        &mut self,
        ai: usize,
        adapter: &Adapter,
        tally: &mut Tally,
    ) -> Result<()> {
        for r in &adapter.replacements {
            let (loc, tied) = self.lookup(adapter, &r.key, &r.target)?;
            tally.note_tied(tied, &r.key);
            let dtype = self.base_dtype(loc, &r.target)?;
            let entry = &self.base.layouts[loc.0].tensors[loc.1];
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
            let p = self.slot(loc, dtype);
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
            });
            tally.features.replacements.push((
                r.key.clone(),
                r.target.clone(),
                r.shape.clone(),
                format!("{:?}", r.dtype),
            ));
            tally.changed.insert(loc);
        }

        Ok(())
    }

    /// Trainable tokens: rows of W replaced (PEFT `index_copy`, values converted to the
    /// weight's dtype).
    pub(super) fn trainable_tokens(&mut self, adapter: &Adapter, tally: &mut Tally) -> Result<()> {
        for t in adapter.tokens.values() {
            let target = format!("{}.weight", t.module);
            let (loc, tied) = self.lookup(adapter, &t.values.key, &target)?;
            tally.note_tied(tied, &t.values.key);
            let dtype = self.base_dtype(loc, &target)?;
            let p = self.slot(loc, dtype);
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
                        format!("token index {index} is out of range for `{target}` ({rows} rows)"),
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
            tally
                .features
                .trainable_tokens
                .push((target.clone(), t.indices.len()));
            tally.changed.insert(loc);
        }

        Ok(())
    }

    /// LoRA factors (and DoRA), on top of the (possibly replaced) W. The factors' data moves
    /// into the plan.
    pub(super) fn lora(
        &mut self,
        ai: usize,
        adapter: &mut Adapter,
        tally: &mut Tally,
    ) -> Result<()> {
        let conv1d_arch = self.conv1d_arch;
        let modules: Vec<String> = adapter.modules.keys().cloned().collect();
        for module in modules {
            let factors = &adapter.modules[&module];
            let target = format!("{}.weight", factors.module);
            let (loc, tied) = self.lookup(adapter, &factors.a.key, &target)?;
            tally.note_tied(tied, &factors.a.key);
            let dtype = self.base_dtype(loc, &target)?;
            let p = self.slot(loc, dtype);
            let transposed = orientation(adapter, factors, &p.shape, conv1d_arch)?;
            let scale = adapter.scale(factors);
            let (embedding, rank) = (factors.embedding, factors.rank());
            // The plan takes the factors over: no second copy of them at any time.
            let factors = adapter.modules.get_mut(&module).expect("listed above");
            let (u, v) = orient(factors, transposed, scale as f32);
            *tally.scales.entry(format_scale(scale)).or_insert(0) += 1;
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
                tally.features.dora += 1;
            } else if embedding {
                tally.features.embedding_lora += 1;
            } else if transposed {
                tally.features.conv1d += 1;
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
            let factors = &adapter.modules[module];
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
            let p = self.slot(loc, dtype);
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
            tally.features.lora_bias += 1;
            tally.changed.insert(loc);
        }

        Ok(())
    }

    /// The merges, in file order, with each tensor's terms concatenated along the rank; and
    /// the vocabulary resize, if any.
    pub(super) fn finish(self) -> Result<(Vec<TensorMerge>, Option<VocabResize>)> {
        let base = self.base;
        let mut vocab = None;
        let merges = self
            .pending
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

        Ok((merges, vocab))
    }
}

/// The summary of one adapter, for `inspect` and the logs.
pub(super) fn summary(adapter: &Adapter, tally: Tally) -> AdapterSummary {
    let Tally {
        scales,
        mut features,
        changed,
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
