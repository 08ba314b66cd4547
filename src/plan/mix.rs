//! The arithmetic of the combination methods on one module's factors, as PEFT's
//! `add_weighted_adapter` does it (`peft/tuners/lora/model.py`, `peft/utils/merge_utils.py`):
//! in f32 and in the same order of operations for the factor methods, in f64 for `svd`
//! (computed from the factors: QR of the stacked factors, SVD of the small core).
//!
//! Factors are in PEFT's stored layout: `A` is (r × a_cols), `B` is (b_rows × r), and the
//! module's delta is `B @ A` (transposed afterwards for Conv1D and embeddings).

use super::combine::{MajoritySign, Method};
use crate::dtype::DType;

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
    /// Names the module in DARE's masks.
    pub module: &'a str,
    /// The dtype `cat`'s factors are stored in (rounded to it).
    pub factor_dtype: DType,
}

/// Combine one module's factors (every adapter that targets the module, in view order).
pub(super) fn combine(p: &Params, loras: Vec<Lora>, a_cols: usize, b_rows: usize) -> Combined {
    match p.method {
        Method::Cat => cat(loras, a_cols, b_rows, p.factor_dtype),
        Method::Svd => svd(&loras, a_cols, b_rows, p.new_rank),
        _ => task_arithmetic(p, loras),
    }
}

/// `A = [w₁s₁·A₁; w₂s₂·A₂; …]` (rounded after each product, as `A * w * s` in torch),
/// `B = [B₁ | B₂ | …]`, each value rounded to `dtype` (PEFT copies them into the combined
/// adapter's weights, of the base layer's dtype).
fn cat(loras: Vec<Lora>, a_cols: usize, b_rows: usize, dtype: DType) -> Combined {
    let round = |x: f32| super::realize::round_to(dtype, x);
    let rank: usize = loras.iter().map(|l| l.rank).sum();
    let mut a = Vec::with_capacity(rank * a_cols);
    let mut b = vec![0f32; b_rows * rank];
    let mut offset = 0;
    for l in &loras {
        let (w, s) = (l.weight as f32, l.scaling as f32);
        a.extend(l.a.iter().map(|&x| round(x * w * s)));
        for i in 0..b_rows {
            let row = &l.b[i * l.rank..(i + 1) * l.rank];
            for (to, &x) in b[i * rank + offset..].iter_mut().zip(row) {
                *to = round(x);
            }
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
                    let key = mask_key(p.seed, p.module, adapter, which);
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

/// A stable 64-bit key for one factor's DARE mask (FNV-1a over the seed, the module, the
/// adapter's index and the factor), so a tensor's mask is the same whenever and in
/// whatever order tensors are realized.
pub(super) fn mask_key(seed: u64, module: &str, adapter: usize, which: char) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = (seed.to_le_bytes().into_iter())
        .chain(module.bytes())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random matrix of `n` values in (-1, 1).
    fn values(n: usize, key: u64) -> Vec<f32> {
        (0..n)
            .map(|j| (uniform(key, j as u64) * 2.0 - 1.0) as f32)
            .collect()
    }

    fn lora(rank: usize, a_cols: usize, b_rows: usize, weight: f64, key: u64) -> Lora {
        Lora {
            a: values(rank * a_cols, key),
            b: values(b_rows * rank, key + 1),
            rank,
            weight,
            scaling: 2.0,
            adapter: key as usize,
        }
    }

    fn params(method: Method, density: f64) -> Params<'static> {
        Params {
            method,
            density,
            majority_sign: MajoritySign::Total,
            new_rank: 3,
            seed: 7,
            module: "m",
            factor_dtype: DType::F32,
        }
    }

    /// `B @ A` in f64.
    fn product(c: &Combined, a_cols: usize, b_rows: usize) -> Vec<f64> {
        let mut out = vec![0f64; b_rows * a_cols];
        for i in 0..b_rows {
            for k in 0..c.rank {
                for j in 0..a_cols {
                    out[i * a_cols + j] +=
                        f64::from(c.b[i * c.rank + k]) * f64::from(c.a[k * a_cols + j]);
                }
            }
        }
        out
    }

    fn weighted_delta(loras: &[Lora], a_cols: usize, b_rows: usize) -> Vec<f64> {
        let mut out = vec![0f64; b_rows * a_cols];
        for l in loras {
            let c = Combined {
                a: l.a.clone(),
                b: l.b.clone(),
                rank: l.rank,
            };
            for (o, d) in out.iter_mut().zip(product(&c, a_cols, b_rows)) {
                *o += l.weight * l.scaling * d;
            }
        }
        out
    }

    fn max_abs_diff(x: &[f64], y: &[f64]) -> f64 {
        x.iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn cat_is_the_weighted_sum_of_deltas() {
        let loras = vec![lora(2, 5, 4, 0.5, 1), lora(3, 5, 4, -1.5, 3)];
        let want = weighted_delta(&loras, 5, 4);
        let got = combine(&params(Method::Cat, 1.0), loras, 5, 4);
        assert_eq!(got.rank, 5);
        assert!(max_abs_diff(&product(&got, 5, 4), &want) < 1e-5);
    }

    #[test]
    fn linear_has_cross_terms_and_keeps_the_sign_on_a() {
        // One adapter: (sign·√|ws|·A, √|ws|·B) multiply back to ws·B@A.
        let one = vec![lora(2, 5, 4, -0.75, 1)];
        let want = weighted_delta(&one, 5, 4);
        let got = combine(&params(Method::Linear, 1.0), one, 5, 4);
        assert!(max_abs_diff(&product(&got, 5, 4), &want) < 1e-5);
        // Two: (Σ cᵢAᵢ)ᵀ-weighted B's: B@A has the cross terms c_Bj·c_Ai·B_j@A_i.
        let two = vec![lora(2, 5, 4, 1.0, 1), lora(2, 5, 4, 0.5, 3)];
        let (ca, cb): (Vec<f64>, Vec<f64>) = two
            .iter()
            .map(|l| ((l.weight * l.scaling).sqrt(), (l.weight * l.scaling).sqrt()))
            .unzip();
        let mut want = vec![0f64; 20];
        for (i, li) in two.iter().enumerate() {
            for (j, lj) in two.iter().enumerate() {
                let c = Combined {
                    a: li.a.clone(),
                    b: lj.b.clone(),
                    rank: 2,
                };
                for (o, d) in want.iter_mut().zip(product(&c, 5, 4)) {
                    *o += ca[i] * cb[j] * d;
                }
            }
        }
        let got = combine(&params(Method::Linear, 1.0), two, 5, 4);
        assert!(max_abs_diff(&product(&got, 5, 4), &want) < 1e-5);
    }

    #[test]
    fn magnitude_pruning_keeps_the_largest_int_density_n() {
        let mut x = vec![0.5, -3.0, 1.0, 0.25, -2.0, 0.75, 4.0];
        prune_magnitude(&mut x, 0.5); // int(3.5) = 3 kept
        assert_eq!(x, vec![0.0, -3.0, 0.0, 0.0, -2.0, 0.0, 4.0]);
        let mut all = vec![1.0, -1.0];
        prune_magnitude(&mut all, 1.0);
        assert_eq!(all, vec![1.0, -1.0]);
        let mut none = vec![1.0, -1.0];
        prune_magnitude(&mut none, 0.0);
        assert_eq!(none, vec![0.0, 0.0]);
    }

    #[test]
    fn ties_elects_the_sign_from_the_unweighted_values() {
        // Column 0: total 1 - 3 = -2 elects -, frequency (one each) elects +.
        // Column 1: both agree on +; the mean of the weighted values.
        let xs = vec![vec![1.0, 2.0], vec![-3.0, 4.0]];
        let weights = [10.0, 1.0];
        let total = disjoint_merge(&xs, &weights, MajoritySign::Total);
        assert_eq!(total, vec![-3.0, (20.0 + 4.0) / 2.0]);
        let frequency = disjoint_merge(&xs, &weights, MajoritySign::Frequency);
        assert_eq!(frequency, vec![10.0, 12.0]);
        // All pruned: 0, not NaN (the count is clamped to 1).
        assert_eq!(
            disjoint_merge(&[vec![0.0]], &[1.0], MajoritySign::Total),
            vec![0.0]
        );
    }

    #[test]
    fn dare_keeps_about_density_rescaled_exactly_and_reproducibly() {
        let n = 100_000;
        let x = values(n, 11);
        for density in [0.1, 0.5, 0.9] {
            let key = mask_key(3, "model.layers.0.mlp.up_proj.weight", 1, 'A');
            let mut pruned = x.clone();
            prune_random(&mut pruned, density, key);
            let kept = pruned.iter().filter(|v| **v != 0.0).count() as f64 / n as f64;
            // 5 standard deviations of a binomial fraction.
            let sd = (density * (1.0 - density) / n as f64).sqrt();
            assert!((kept - density).abs() < 5.0 * sd, "{density}: kept {kept}");
            for (p, v) in pruned.iter().zip(&x) {
                assert!(*p == 0.0 || *p == *v / density as f32);
            }
            let mut again = x.clone();
            prune_random(&mut again, density, key);
            assert_eq!(pruned, again);
            let mut other = x.clone();
            prune_random(
                &mut other,
                density,
                mask_key(4, "model.layers.0.mlp.up_proj.weight", 1, 'A'),
            );
            assert_ne!(pruned, other);
        }
        assert_ne!(mask_key(0, "t", 0, 'A'), mask_key(0, "t", 0, 'B'));
        assert_ne!(mask_key(0, "t", 0, 'A'), mask_key(0, "t", 1, 'A'));
    }

    /// The truncation of `delta` (rows × cols) to `k` by nalgebra's dense SVD.
    fn dense_truncation(delta: &[f64], rows: usize, cols: usize, k: usize) -> Vec<f64> {
        let m = nalgebra::DMatrix::from_row_slice(rows, cols, delta);
        let svd = m.svd(true, true);
        let (u, vt) = (svd.u.unwrap(), svd.v_t.unwrap());
        let mut out = nalgebra::DMatrix::<f64>::zeros(rows, cols);
        for i in 0..k {
            out += svd.singular_values[i] * u.column(i) * vt.row(i);
        }
        (0..rows)
            .flat_map(|i| (0..cols).map(move |j| (i, j)))
            .map(|(i, j)| out[(i, j)])
            .collect()
    }

    #[test]
    fn svd_from_the_factors_is_the_dense_truncation() {
        let (a_cols, b_rows) = (9, 7);
        for new_rank in [1, 3, 5, 20] {
            let loras = vec![
                lora(2, a_cols, b_rows, 0.5, 1),
                lora(3, a_cols, b_rows, -1.25, 3),
            ];
            let delta = weighted_delta(&loras, a_cols, b_rows);
            let mut p = params(Method::Svd, 1.0);
            p.new_rank = new_rank;
            let got = combine(&p, loras, a_cols, b_rows);
            let k = svd_rank(new_rank, 5, b_rows, a_cols);
            assert_eq!(got.rank, k);
            let want = dense_truncation(&delta, b_rows, a_cols, k);
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            // The f32 rounding of the result's factors, relative to the delta's size.
            assert!(
                max_abs_diff(&product(&got, a_cols, b_rows), &want) < 1e-5 * scale,
                "rank {new_rank}"
            );
        }
    }
}
