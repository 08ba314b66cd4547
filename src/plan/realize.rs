//! Realizing the checked plan: the memory the factors will take is compared with the
//! machine's before anything is read; then each tensor's factors are read from the adapter
//! files one at a time, oriented, scaled and concatenated along the rank.

use super::build::{Op, Planner};
use super::*;
use crate::adapter::Stored;
use crate::plan::bound;

/// `x` rounded to `dtype` (nearest even) and widened back.
pub(super) fn round_to(dtype: DType, x: f32) -> f32 {
    let mut b = [0u8; 4];
    dtype.store(&mut b, 0, x);
    dtype.load(&b, 0)
}

/// Values of adapter data an op reads (each held as one f32 in the plan).
fn op_values(op: &Op) -> u128 {
    let n = |t: &Stored| t.numel() as u128;
    match op {
        Op::Lora {
            a, b, magnitude, ..
        } => n(a) + n(b) + magnitude.as_ref().map_or(0, n),
        Op::Bias { bias, .. } => n(bias) + 1,
        Op::Tokens { values, .. } => n(values),
    }
}

/// The rank an op adds to its tensor's factors (one packed `V` row each).
fn op_rank(op: &Op) -> usize {
    match op {
        Op::Lora { term, .. } | Op::Bias { term, .. } => term.rank,
        Op::Tokens { .. } => 0,
    }
}

fn op_adapter(op: &Op) -> usize {
    match op {
        Op::Lora { term, .. } | Op::Bias { term, .. } => term.adapter,
        Op::Tokens { adapter, .. } => *adapter,
    }
}

fn gib(bytes: u128) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// One term of a tensor being realized: the term, its U and V, and a DoRA magnitude.
pub(super) struct Part {
    pub term: Term,
    pub u: Vec<f32>,
    pub v: Vec<f32>,
    pub magnitude: Option<Vec<f32>>,
}

/// (U, V) for one term: `U = s·B`, `V = A`, or transposed `U = s·Aᵀ`, `V = Bᵀ`. `a` is
/// (r × a_cols), `b` is (b_rows × r).
pub(super) fn orient(
    (a, a_cols): (Vec<f32>, usize),
    (b, b_rows): (Vec<f32>, usize),
    r: usize,
    transposed: bool,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    if !transposed {
        let mut u = b;
        u.iter_mut().for_each(|x| *x *= scale);
        return (u, a);
    }
    let (rows, cols) = (a_cols, b_rows);
    let mut u = vec![0f32; rows * r];
    for k in 0..r {
        for i in 0..rows {
            u[i * r + k] = scale * a[k * rows + i];
        }
    }
    // Not held while `v` is built: the peak is two factors' copies, not all four.
    drop(a);
    let mut v = vec![0f32; r * cols];
    for j in 0..cols {
        for k in 0..r {
            v[k * cols + j] = b[j * r + k];
        }
    }
    (u, v)
}

/// Concatenate per-term factors along the rank: `U = [U₁ | U₂ | …]`, `V = [V₁; V₂; …]`.
/// A single term (the common case) is moved, not copied, so loading needs no second copy.
fn concat_ranks(rows: usize, rank: usize, cols: usize, parts: &mut [Part]) -> (Vec<f32>, Vec<f32>) {
    if let [one] = parts {
        return (std::mem::take(&mut one.u), std::mem::take(&mut one.v));
    }
    let mut u = vec![0f32; rows * rank];
    let mut v = Vec::with_capacity(rank * cols);
    let mut offset = 0;
    for p in parts {
        let r = p.term.rank;
        for i in 0..rows {
            u[i * rank + offset..i * rank + offset + r].copy_from_slice(&p.u[i * r..(i + 1) * r]);
        }
        v.extend_from_slice(&p.v);
        offset += r;
    }
    (u, v)
}

impl Planner<'_> {
    /// Refuse, before reading anything, factors that need more memory (as f32) than the
    /// machine has, naming the adapter that needs the most: they could never be held, and
    /// reading them would only end in the OOM killer.
    pub(super) fn check_memory(&self, adapters: &[Adapter], available: u64) -> Result<()> {
        let mut per_adapter = vec![0u128; adapters.len()];
        for p in self.pending.values() {
            // `V` is kept packed in whole panels: count its padding too.
            let cols = view(&p.shape).map_or(0, |(_, cols)| cols);
            let padding = (crate::kernel::packed_cols(cols) - cols) as u128;
            for op in &p.ops {
                per_adapter[op_adapter(op)] += (op_values(op) + op_rank(op) as u128 * padding) * 4;
            }
        }
        let total: u128 = per_adapter.iter().sum();
        let Some((largest, &bytes)) = per_adapter.iter().enumerate().max_by_key(|(_, b)| **b)
        else {
            return Ok(());
        };
        if total <= u128::from(available) {
            return Ok(());
        }
        Err(Error::unsupported(
            &adapters[largest].file,
            format!(
                "its factors need {} of memory as f32 (all adapters: {}), more than this \
                 machine's {}",
                gib(bytes),
                gib(total),
                gib(u128::from(available))
            ),
        ))
    }

    /// The merges, in file order: what each tensor is made from, checked, nothing read yet.
    pub(super) fn finish(self, adapters: &[Adapter]) -> Result<Vec<TensorMerge>> {
        let base = self.base;
        self.pending
            .into_iter()
            .map(|((li, ti), p)| {
                let name = base.layouts[li].tensors[ti].name.clone();
                let Some((rows, cols)) = view(&p.shape) else {
                    // The shape is the replacement's when there is one.
                    let (path, tensor) = match (&p.replaced, p.w.file) {
                        (Some(r), WFile::Adapter(i)) => (&adapters[i].file, r.key.clone()),
                        _ => (&base.layouts[li].path, name),
                    };
                    let what = format!(
                        "shape {:?}: a row has more values than fit in memory",
                        p.shape
                    );
                    return Err(Error::tensor(path, tensor, what));
                };
                let terms: Vec<Term> = (p.ops.iter())
                    .filter_map(|op| match op {
                        Op::Lora { term, .. } | Op::Bias { term, .. } => Some(term.clone()),
                        Op::Tokens { .. } => None,
                    })
                    .collect();
                let token_rows = (p.ops.iter())
                    .map(|op| match op {
                        Op::Tokens { indices, .. } => indices.len(),
                        _ => 0,
                    })
                    .sum();
                Ok(TensorMerge {
                    name,
                    tensor: TensorId {
                        layout: li,
                        tensor: ti,
                    },
                    dtype: p.dtype,
                    shape: p.shape,
                    w: p.w,
                    dims: Dims { rows, cols },
                    rank: terms.iter().map(|t| t.rank).sum(),
                    terms,
                    combination: None,
                    token_rows,
                    replaced: p.replaced,
                    ops: p.ops,
                })
            })
            .collect()
    }
}

impl TensorMerge {
    /// Read this tensor's factors from the adapter files and build what the kernels merge
    /// with: the terms' U and V concatenated along the rank, DoRA magnitudes, token rows.
    /// Refuses values that are not finite and deltas that could overflow.
    pub fn realize(&self, adapters: &[Adapter]) -> Result<Realized> {
        let Dims { rows, cols } = self.dims;
        let (mut parts, token_rows) = match &self.combination {
            // The plan refused trainable tokens and biases with a combination.
            Some(c) => (c.parts(self, adapters)?, BTreeMap::new()),
            None => read_ops(&self.ops, adapters, cols, self.dtype)?,
        };
        check_delta(&self.name, self.dtype, &parts, adapters)?;
        let any_dora = parts.iter().any(|part| part.term.kind == TermKind::Dora);
        let (u, v) = concat_ranks(rows, self.rank, cols, &mut parts);
        let mut offset = 0;
        let mut groups = Vec::new();
        for part in parts {
            groups.push(DoraGroup {
                offset,
                rank: part.term.rank,
                magnitude: part.magnitude,
            });
            offset += part.term.rank;
        }
        Ok(Realized {
            factors: Factors::new(rows, self.rank, cols, u, v),
            dora: any_dora.then_some(groups),
            rows: (token_rows.into_iter())
                .map(|(index, values)| TokenRow { index, values })
                .collect(),
        })
    }
}

/// Refuse terms whose summed delta could overflow: finite factors and scales (each checked
/// on its own) can still multiply beyond the output dtype, or beyond f32, and merge into Inf
/// or NaN weights with nothing to show for it. The adapter named is the one whose term
/// weighs most.
fn check_delta(tensor: &str, dtype: DType, parts: &[Part], adapters: &[Adapter]) -> Result<()> {
    let bounds: Vec<f64> = (parts.iter())
        .map(|p| bound::delta_bound(&p.u, &p.v, p.term.rank))
        .collect();
    let total: f64 = bounds.iter().sum();
    let limit = bound::max_finite(dtype) / 2.0;
    let worst = (0..parts.len()).max_by(|&a, &b| bounds[a].total_cmp(&bounds[b]));
    let (Some(worst), false) = (worst, total <= limit) else {
        return Ok(());
    };
    let term = &parts[worst].term;
    Err(Error::tensor(
        &adapters[term.adapter].file,
        tensor,
        format!(
            "the delta of module `{}` (scale {:.3e} with its factors{}) can reach {total:.3e}, \
             beyond half the largest {dtype:?} value ({limit:.3e}): the merged weights could be \
             Inf or NaN; lower the --adapter weight or lora_alpha, or check the factors",
            term.module,
            term.scale,
            if parts.len() > 1 {
                ", with the other adapters'"
            } else {
                ""
            }
        ),
    ))
}

/// Rows replaced by trainable tokens, by index, rounded to the output dtype.
type TokenRowMap = BTreeMap<usize, Vec<f32>>;

/// A token row rounded to `dtype`; or the first value that is not finite once rounded (its
/// index and value as given).
fn token_row(row: &[f32], dtype: DType) -> std::result::Result<Vec<f32>, (usize, f32)> {
    let rounded: Vec<f32> = row.iter().map(|&x| round_to(dtype, x)).collect();
    match rounded.iter().position(|x| !x.is_finite()) {
        Some(j) => Err((j, row[j])),
        None => Ok(rounded),
    }
}

/// Token row `index` of tensor `key` in `adapter` overflows `dtype` at value `j` (`x`).
fn token_row_error(
    adapter: &Adapter,
    key: &str,
    index: usize,
    j: usize,
    x: f32,
    dtype: DType,
) -> Error {
    Error::tensor(
        &adapter.file,
        key,
        format!(
            "token row {index}, value {j} is {x} after rounding to {dtype:?}: beyond the \
             largest {dtype:?} value, the row would be Inf"
        ),
    )
}

/// Read each op's data, in order: the terms with their U and V, and the token rows (which
/// drop the deltas of the terms before them on their rows).
fn read_ops(
    ops: &[Op],
    adapters: &[Adapter],
    cols: usize,
    dtype: DType,
) -> Result<(Vec<Part>, TokenRowMap)> {
    let mut parts: Vec<Part> = Vec::new();
    let mut token_rows = BTreeMap::new();
    for op in ops {
        match op {
            Op::Lora {
                term,
                a,
                b,
                magnitude,
            } => {
                let adapter = &adapters[term.adapter];
                let (u, v) = orient(
                    (adapter.read(a)?, a.cols),
                    (adapter.read(b)?, b.rows),
                    term.rank,
                    term.transposed,
                    term.scale as f32,
                );
                let magnitude = magnitude.as_ref().map(|m| adapter.read(m)).transpose()?;
                parts.push(Part {
                    term: term.clone(),
                    u,
                    v,
                    magnitude,
                });
            }
            Op::Bias { term, bias } => {
                let v = adapters[term.adapter].read(bias)?;
                let u = vec![term.scale as f32];
                parts.push(Part {
                    term: term.clone(),
                    u,
                    v,
                    magnitude: None,
                });
            }
            Op::Tokens {
                adapter,
                indices,
                values,
            } => {
                let adapter = &adapters[*adapter];
                let data = adapter.read(values)?;
                for (k, &index) in indices.iter().enumerate() {
                    // The plan checked `index < rows` and one row of `cols` values per index;
                    // every part has `rows` rows of U.
                    for part in &mut parts {
                        let r = part.term.rank;
                        if let Some(row) = part.u.get_mut(index * r..(index + 1) * r) {
                            row.fill(0.0);
                        }
                    }
                    let row = data.get(k * cols..(k + 1) * cols).unwrap_or_default();
                    let row = token_row(row, dtype).map_err(|(j, x)| {
                        token_row_error(adapter, &values.key, index, j, x, dtype)
                    })?;
                    token_rows.insert(index, row);
                }
            }
        }
    }
    Ok((parts, token_rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_rows_are_rounded_once_and_refused_where_they_overflow() {
        let row = [1.0f32, 1.0 + 1.0 / 1024.0, -3.0];
        let bf16 = token_row(&row, DType::BF16).expect("finite");
        assert_eq!(bf16, vec![1.0, 1.0, -3.0], "rounded to bf16's 8 bits");
        assert_eq!(token_row(&row, DType::F32).expect("finite"), row.to_vec());
        // Past f16's largest value (65504), rounding gives Inf: refused, naming the value.
        let over = [0.5f32, 70000.0, f32::NAN];
        assert_eq!(token_row(&over, DType::F16), Err((1, 70000.0)));
        assert!(
            token_row(&over, DType::BF16).is_err(),
            "NaN is not finite either"
        );
    }
}
