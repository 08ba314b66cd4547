//! The arithmetic of the combination methods on one module's factors, as PEFT's
//! `add_weighted_adapter` does it (`peft/tuners/lora/model.py`, `peft/utils/merge_utils.py`):
//! in f32 and in the same order of operations for the factor methods, in f64 for `svd`
//! (computed from the factors: QR of the stacked factors, SVD of the small core).
//!
//! Factors are in PEFT's stored layout: `A` is (r × a_cols), `B` is (b_rows × r), and the
//! module's delta is `B @ A` (transposed afterwards for Conv1D and embeddings).

use super::combine::{MajoritySign, Method};

/// One adapter's factors of one module.
pub(super) struct Lora {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    /// The `--adapter` weight.
    pub weight: f64,
    /// `lora_alpha / r` (or `/ √r`).
    pub scaling: f64,
    /// The adapter's index in the view (seeds DARE's masks).
    pub adapter: usize,
}

/// The combined factors of a module, in the same layout.
pub(super) struct Combined {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
}

/// What the combination of one module needs besides the factors.
pub(super) struct Params<'a> {
    pub method: Method,
    pub density: f64,
    pub majority_sign: MajoritySign,
    /// `svd`'s rank (`svd_rank`, or the largest adapter rank).
    pub new_rank: usize,
    pub seed: u64,
    /// Names the tensor in DARE's masks.
    pub tensor: &'a str,
}

/// Combine one module's factors (every adapter that targets the module, in view order).
pub(super) fn combine(p: &Params, loras: Vec<Lora>, a_cols: usize, b_rows: usize) -> Combined {
    match p.method {
        Method::Cat => cat(loras, a_cols, b_rows),
        Method::Svd => svd(&loras, a_cols, b_rows, p.new_rank),
        _ => task_arithmetic(p, loras),
    }
}

/// `A = [w₁s₁·A₁; w₂s₂·A₂; …]` (rounded after each product, as `A * w * s` in torch),
/// `B = [B₁ | B₂ | …]`.
fn cat(loras: Vec<Lora>, a_cols: usize, b_rows: usize) -> Combined {
    let rank: usize = loras.iter().map(|l| l.rank).sum();
    let mut a = Vec::with_capacity(rank * a_cols);
    let mut b = vec![0f32; b_rows * rank];
    let mut offset = 0;
    for l in &loras {
        let (w, s) = (l.weight as f32, l.scaling as f32);
        a.extend(l.a.iter().map(|&x| x * w * s));
        for i in 0..b_rows {
            b[i * rank + offset..i * rank + offset + l.rank]
                .copy_from_slice(&l.b[i * l.rank..(i + 1) * l.rank]);
        }
        offset += l.rank;
    }
    Combined { a, b, rank }
}

/// linear, ties, dare_linear, dare_ties, magnitude_prune: `A` and `B` combined separately,
/// `A` weighted by `sign(ws)·√|ws|`, `B` by `√|ws|` (the ranks are equal: checked by the plan).
fn task_arithmetic(p: &Params, loras: Vec<Lora>) -> Combined {
    let rank = loras.first().map_or(0, |l| l.rank);
    let mut weights_a = Vec::new();
    let mut weights_b = Vec::new();
    let mut a_stack = Vec::new();
    let mut b_stack = Vec::new();
    for l in loras {
        let ws = l.weight * l.scaling;
        let sign = if ws >= 0.0 { 1.0 } else { -1.0 };
        weights_a.push((ws.abs().sqrt() * sign) as f32);
        weights_b.push(ws.abs().sqrt() as f32);
        a_stack.push((l.adapter, l.a));
        b_stack.push((l.adapter, l.b));
    }
    Combined {
        a: one_factor(p, a_stack, &weights_a, 'A'),
        b: one_factor(p, b_stack, &weights_b, 'B'),
        rank,
    }
}

/// One factor of every adapter combined: pruned, then summed or disjoint-merged.
fn one_factor(p: &Params, stack: Vec<(usize, Vec<f32>)>, weights: &[f32], which: char) -> Vec<f32> {
    let pruned: Vec<Vec<f32>> = (stack.into_iter())
        .map(|(adapter, mut x)| {
            match p.method {
                Method::Ties | Method::MagnitudePrune => prune_magnitude(&mut x, p.density),
                Method::DareLinear | Method::DareTies => {
                    let key = mask_key(p.seed, p.tensor, adapter, which);
                    prune_random(&mut x, p.density, key)
                }
                _ => {}
            }
            x
        })
        .collect();
    if p.method.elects_sign() {
        disjoint_merge(&pruned, weights, p.majority_sign)
    } else {
        weighted_sum(&pruned, weights)
    }
}

/// `Σᵢ wᵢ·xᵢ`, each product rounded to f32, summed in order (torch's `stack * w` then
/// `sum(dim=0)`).
pub(super) fn weighted_sum(xs: &[Vec<f32>], weights: &[f32]) -> Vec<f32> {
    let n = xs.first().map_or(0, |x| x.len());
    (0..n)
        .map(|j| (xs.iter().zip(weights)).fold(0f32, |acc, (x, &w)| acc + x[j] * w))
        .collect()
}

/// torch's `sign`: -1, 0 or 1.
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// TIES: the sign elected from the unweighted (pruned) values (their sum, or the count of
/// each sign), then the mean of the weighted values that have it (`disjoint_merge`).
pub(super) fn disjoint_merge(xs: &[Vec<f32>], weights: &[f32], method: MajoritySign) -> Vec<f32> {
    let n = xs.first().map_or(0, |x| x.len());
    (0..n)
        .map(|j| {
            let magnitude = match method {
                MajoritySign::Total => xs.iter().fold(0f32, |acc, x| acc + x[j]),
                MajoritySign::Frequency => xs.iter().fold(0f32, |acc, x| acc + sign(x[j])),
            };
            let majority = if magnitude >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut count) = (0f32, 0u32);
            for (x, &w) in xs.iter().zip(weights) {
                if sign(x[j]) == majority {
                    sum += x[j] * w;
                    count += 1;
                }
            }
            sum / count.max(1) as f32
        })
        .collect()
}

/// Keep the `int(density·n)` values of largest magnitude over the whole factor, zero the
/// rest (ties of magnitude: the lower index kept). A density of 1 or more keeps all.
pub(super) fn prune_magnitude(x: &mut [f32], density: f64) {
    if density >= 1.0 {
        return;
    }
    let keep = (density * x.len() as f64) as usize;
    let mut order: Vec<usize> = (0..x.len()).collect();
    let larger = |&i: &usize, &j: &usize| x[j].abs().total_cmp(&x[i].abs()).then(i.cmp(&j));
    if keep < order.len() {
        order.select_nth_unstable_by(keep, larger);
        for &i in &order[keep..] {
            x[i] = 0.0;
        }
    }
}

/// A stable 64-bit key for one factor's DARE mask (FNV-1a over the seed, the tensor, the
/// adapter's index and the factor), so a tensor's mask is the same whenever and in
/// whatever order tensors are realized.
pub(super) fn mask_key(seed: u64, tensor: &str, adapter: usize, which: char) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = (seed.to_le_bytes().into_iter())
        .chain(tensor.bytes())
        .chain([0xff])
        .chain((adapter as u64).to_le_bytes())
        .chain([which as u8]);
    for b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64's output function: value `counter` of the stream `key`, uniform in [0, 1).
fn uniform(key: u64, counter: u64) -> f64 {
    let mut z = key.wrapping_add(counter.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// DARE: each value kept with probability `density` (a Bernoulli draw from the counter-based
/// stream `key`) and divided by the density, the others zeroed. A density of 1 keeps all.
pub(super) fn prune_random(x: &mut [f32], density: f64, key: u64) {
    if density >= 1.0 {
        return;
    }
    let d = density as f32;
    for (j, v) in x.iter_mut().enumerate() {
        let keep = uniform(key, j as u64) < density;
        *v = if keep { *v / d } else { 0.0 };
    }
}

/// `svd`: the weighted sum of deltas `Σ wᵢsᵢ·Bᵢ@Aᵢ = Ũ Ṽ` truncated to `new_rank`, from the
/// factors: `Ũ = Q_u R_u`, `Ṽᵀ = Q_v R_v`, the SVD of the small core `R_u R_vᵀ = X Σ Yᵀ`
/// gives `Δ = (Q_u X) Σ (Q_v Y)ᵀ`; `B = Q_u X_k Σ_k`, `A = (Q_v Y_k)ᵀ`, as PEFT's `U·S`, `Vh`.
fn svd(loras: &[Lora], a_cols: usize, b_rows: usize, new_rank: usize) -> Combined {
    use nalgebra::DMatrix;
    let stacked: usize = loras.iter().map(|l| l.rank).sum();
    let mut u = DMatrix::<f64>::zeros(b_rows, stacked);
    let mut vt = DMatrix::<f64>::zeros(a_cols, stacked);
    let mut offset = 0;
    for l in loras {
        let c = l.weight * l.scaling;
        for k in 0..l.rank {
            for i in 0..b_rows {
                u[(i, offset + k)] = c * f64::from(l.b[i * l.rank + k]);
            }
            for j in 0..a_cols {
                vt[(j, offset + k)] = f64::from(l.a[k * a_cols + j]);
            }
        }
        offset += l.rank;
    }
    let (qu, ru) = u.qr().unpack();
    let (qv, rv) = vt.qr().unpack();
    let core = ru * rv.transpose();
    let svd = core.svd(true, true);
    let (Some(x), Some(yt)) = (svd.u, svd.v_t) else {
        unreachable!("the SVD was asked for both U and Vᵀ");
    };
    let rank = new_rank.min(svd.singular_values.len());
    let mut left = qu * x.columns(0, rank);
    for k in 0..rank {
        let s = svd.singular_values[k];
        left.column_mut(k).iter_mut().for_each(|v| *v *= s);
    }
    let right = yt.rows(0, rank) * qv.transpose();
    let b = (0..b_rows)
        .flat_map(|i| (0..rank).map(move |k| (i, k)))
        .map(|(i, k)| left[(i, k)] as f32)
        .collect();
    let a = (0..rank)
        .flat_map(|k| (0..a_cols).map(move |j| (k, j)))
        .map(|(k, j)| right[(k, j)] as f32)
        .collect();
    Combined { a, b, rank }
}

/// The rank `svd` keeps for a module whose stacked rank is `stacked` over a
/// `b_rows × a_cols` delta.
pub(super) fn svd_rank(new_rank: usize, stacked: usize, b_rows: usize, a_cols: usize) -> usize {
    new_rank.min(stacked.min(b_rows)).min(stacked.min(a_cols))
}
