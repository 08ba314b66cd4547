//! How large a tensor's delta can get, from its factors alone, so that finite factors whose
//! product overflows (a weight of 1e30, factors near the f32 limit) are refused before any
//! weight is merged instead of merging into Inf or NaN.
//!
//! Every element of `U @ V` satisfies `|Δ[i,j]| = |Σ_k U[i,k]·V[k,j]| ≤ Σ_k |U[i,k]|·max_j |V[k,j]|`,
//! so the largest of those row sums bounds the whole delta. The kernels sum in f32: while the
//! bound is below the f32 limit no partial sum can overflow, and while it is below half the
//! output dtype's largest value, `W + Δ` is finite in that dtype for every base weight below
//! the other half (real weights are many orders of magnitude smaller).

use crate::dtype::DType;

/// The largest finite value of `dtype`.
pub(super) fn max_finite(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 65504.0,
        // 0x7f7f: sign 0, exponent 254, mantissa all ones.
        DType::BF16 => f64::from(f32::from_bits(0x7f7f_0000)),
        DType::F32 => f64::from(f32::MAX),
    }
}

/// `max_i Σ_k |u[i,k]|·max_j |v[k,j]|` for `u` (rows × rank) and `v` (rank × cols), in f64
/// (which cannot overflow for finite f32 inputs at any rank that fits in memory): no
/// element of `u @ v` is larger in magnitude.
pub(super) fn delta_bound(u: &[f32], v: &[f32], rank: usize) -> f64 {
    if rank == 0 {
        return 0.0;
    }
    let cols = v.len() / rank;
    let v_max: Vec<f64> = (0..rank)
        .map(|k| {
            let row = v.get(k * cols..(k + 1) * cols).unwrap_or_default();
            row.iter().fold(0f64, |m, &x| m.max(f64::from(x.abs())))
        })
        .collect();
    u.chunks(rank)
        .map(|row| {
            let sum = row.iter().zip(&v_max);
            sum.map(|(&x, &m)| f64::from(x.abs()) * m).sum::<f64>()
        })
        .fold(0f64, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_holds_every_element_and_is_reached_by_aligned_signs() {
        // U = [[1, -2], [0.5, 0.5]], V = [[3, -1, 0], [0, 4, -2]]: row 0 reaches |1·-1| + |-2·4| = 9.
        let u = [1.0, -2.0, 0.5, 0.5];
        let v = [3.0, -1.0, 0.0, 0.0, 4.0, -2.0];
        assert_eq!(delta_bound(&u, &v, 2), 1.0 * 3.0 + 2.0 * 4.0);
        for i in 0..2 {
            for j in 0..3 {
                let d: f32 = (0..2).map(|k| u[i * 2 + k] * v[k * 3 + j]).sum();
                assert!(f64::from(d.abs()) <= delta_bound(&u, &v, 2));
            }
        }
        assert_eq!(delta_bound(&[], &[], 0), 0.0);
    }

    #[test]
    fn factors_whose_product_overflows_f32_have_a_finite_bound_beyond_it() {
        let big = 3e38f32;
        let bound = delta_bound(&[big, big], &[big, big], 2);
        assert!(bound.is_finite() && bound > max_finite(DType::F32));
        assert!(max_finite(DType::BF16) < max_finite(DType::F32));
        assert_eq!(
            DType::BF16.load(&[0x7f, 0x7f], 0) as f64,
            max_finite(DType::BF16)
        );
    }
}
