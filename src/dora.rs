//! DoRA rows: `W' = m / ‖W + Δ‖_row · (W + Δ)`, computed row by row in f32.
//!
//! PEFT (tuners/lora/variants.py `DoraLinearVariant.merge_unsafe`, tuners/lora/dora.py
//! `get_weight_norm`) computes, in f32: `x = W + Δ` with `Δ = s·B@A`, the L2 norm of each
//! output row of `x` (`torch.linalg.norm(x, dim=1)`), `factor = m / norm`, and
//! `factor · x`, rounded once to the weight's dtype. Each output row needs only its own row
//! of `W`, `U` and the magnitude, so DoRA stays row-local and fits lorafs's blocks.
//!
//! A tensor with a DoRA term is merged here instead of by the SIMD kernels: the terms are
//! applied in order (a plain LoRA term adds its delta, a DoRA term rescales the running row),
//! all in f32, and the row is rounded once at the end. The delta of one term is accumulated
//! like the kernels do (`acc = fma(U[i,k], V[k,j], acc)`, k ascending); the norm is summed
//! in f64 and rounded to f32.

use crate::dtype::DType;
use crate::kernel::Factors;
use crate::plan::DoraGroup;

/// Merge rows `row0 ..` of a tensor: `src` holds those rows of `W` in `from` (widened
/// exactly to f32), `dst` receives the merged rows in `to` (as many elements), each value
/// rounded once from f32. Err(row) for a row whose `W + Δ` is all zeros when a DoRA term
/// rescales it: `m / 0` is undefined, and PEFT's merge writes NaN there (`0 · inf`), where
/// lorafs refuses to.
pub fn merge(
    from: DType,
    src: &[u8],
    to: DType,
    dst: &mut [u8],
    f: &Factors,
    groups: &[DoraGroup],
    row0: usize,
) -> Result<(), usize> {
    let cols = f.cols;
    let n = src.len() / (cols * from.size()).max(1);
    assert_eq!(dst.len(), n * cols * to.size(), "as many rows out as in");
    let mut acc = vec![0f32; cols];
    let mut delta = vec![0f32; cols];
    for r in 0..n {
        let i = row0 + r;
        for (j, a) in acc.iter_mut().enumerate() {
            *a = from.load(src, r * cols + j);
        }
        for g in groups {
            let u = &f.u[i * f.rank + g.offset..i * f.rank + g.offset + g.rank];
            delta.fill(0.0);
            for (k, &uk) in u.iter().enumerate() {
                for (j, d) in delta.iter_mut().enumerate() {
                    *d = uk.mul_add(f.v(g.offset + k, j), *d);
                }
            }
            match &g.magnitude {
                None => {
                    for (a, d) in acc.iter_mut().zip(&delta) {
                        *a += d;
                    }
                }
                Some(m) => {
                    let mut sum = 0f64;
                    for (a, d) in acc.iter_mut().zip(&delta) {
                        *a += d;
                        sum += (*a as f64) * (*a as f64);
                    }
                    let norm = sum.sqrt() as f32;
                    if norm == 0.0 {
                        return Err(i);
                    }
                    let factor = m[i] / norm;
                    for a in acc.iter_mut() {
                        *a *= factor;
                    }
                }
            }
        }
        for (j, &a) in acc.iter().enumerate() {
            to.store(dst, r * cols + j, a);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Δ = 0` on a 2×2 F32 `W` (given row-major) with one DoRA term of magnitudes [2, 5].
    fn merge_zero_delta(w: [f32; 4]) -> (Result<(), usize>, Vec<f32>) {
        let f = Factors::new(2, 1, 2, vec![0.0, 0.0], vec![1.0, 1.0]);
        let groups = [DoraGroup {
            offset: 0,
            rank: 1,
            magnitude: Some(vec![2.0, 5.0]),
        }];
        let src: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut data = vec![0u8; src.len()];
        let result = merge(DType::F32, &src, DType::F32, &mut data, &f, &groups, 0);
        (result, (0..4).map(|i| DType::F32.load(&data, i)).collect())
    }

    #[test]
    fn one_dora_term_rescales_rows_to_the_magnitude() {
        // W = [[3, 0], [0, 1]]: rows scaled to norms m = [2, 5].
        let (result, out) = merge_zero_delta([3.0, 0.0, 0.0, 1.0]);
        assert_eq!(result, Ok(()));
        assert_eq!(out, vec![2.0, 0.0, 0.0, 5.0]);
    }

    #[test]
    fn a_row_whose_norm_is_zero_is_refused_not_merged_into_nan() {
        // W row 1 = [0, 0]: m / ‖0‖ is undefined (PEFT: NaN).
        assert_eq!(merge_zero_delta([3.0, 0.0, 0.0, 0.0]).0, Err(1));
    }

    /// One row `W = [w, 0]` stored in `from`, `Δ = [delta, 0]`, a plain term then a DoRA
    /// term whose magnitude is the row's norm (so the factor is 1 where the sum is exact),
    /// merged into `to`.
    fn merge_one_row(from: DType, w: f32, to: DType, delta: f32) -> Vec<u8> {
        let mut src = vec![0u8; 2 * from.size()];
        from.store(&mut src, 0, w);
        let norm = from.load(&src, 0) + delta;
        let f = Factors::new(1, 2, 2, vec![1.0, 0.0], vec![delta, 0.0, 0.0, 0.0]);
        let groups = [
            DoraGroup {
                offset: 0,
                rank: 1,
                magnitude: None,
            },
            DoraGroup {
                offset: 1,
                rank: 1,
                magnitude: Some(vec![norm]),
            },
        ];
        let mut dst = vec![0u8; 2 * to.size()];
        merge(from, &src, to, &mut dst, &f, &groups, 0).unwrap();
        dst
    }

    #[test]
    fn another_output_dtype_is_rounded_once_from_the_f32_row() {
        // 1 + 2^-9 + 2^-8 = 1 + 3·2^-9 rounds up to the BF16 1 + 2^-7 (0x3F81); rounding W to
        // BF16 first (1.0) would leave a tie, 1 + 2^-8, that rounds to even: 1.0 (0x3F80).
        let (w, delta) = (1.0 + 2f32.powi(-9), 2f32.powi(-8));
        let out = merge_one_row(DType::F32, w, DType::BF16, delta);
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x3F81);
        let twice = merge_one_row(DType::BF16, w, DType::BF16, delta);
        assert_eq!(u16::from_le_bytes([twice[0], twice[1]]), 0x3F80);
        // Widening loses nothing: BF16 1.0 + 2^-20 is exact in F32.
        let wide = merge_one_row(DType::BF16, 1.0, DType::F32, 2f32.powi(-20));
        assert_eq!(DType::F32.load(&wide, 0), 1.0 + 2f32.powi(-20));
    }
}
