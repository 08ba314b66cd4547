//! The reference kernel: the accumulation order of [`super`]'s contract, written plainly.

use super::Factors;
use crate::dtype::DType;

/// `Δ[i, j]` in the contract's order, `u` being row `i` of `U`: `acc = fma(U[i,k], V[k,j],
/// acc)` for `k` ascending, from `+0`.
#[inline]
fn delta(f: &Factors, u: &[f32], j: usize) -> f32 {
    let mut acc = 0.0f32;
    for (&uk, vk) in u.iter().zip(f.v_column(j)) {
        acc = uk.mul_add(vk, acc);
    }
    acc
}

/// Row `i` of `U`.
fn u_row(f: &Factors, i: usize) -> &[f32] {
    &f.u[i * f.rank..(i + 1) * f.rank]
}

/// See [`super::Kernel::merge_into`]: `dst = round_to(W + Δ)`, `W` widened from `src`.
pub fn merge_into(from: DType, src: &[u8], to: DType, dst: &mut [u8], f: &Factors, row0: usize) {
    let n = src.len() / (f.cols * from.size()).max(1);
    for r in 0..n {
        let u = u_row(f, row0 + r);
        for j in 0..f.cols {
            let e = r * f.cols + j;
            to.store(dst, e, from.load(src, e) + delta(f, u, j));
        }
    }
}

/// See [`super::Kernel::merge`]: [`merge_into`] with `src` and `dst` the same bytes, each
/// element read before it is written.
pub fn merge(dtype: DType, f: &Factors, row0: usize, data: &mut [u8]) {
    let n = data.len() / (f.cols * dtype.size()).max(1);
    for r in 0..n {
        let u = u_row(f, row0 + r);
        for j in 0..f.cols {
            let e = r * f.cols + j;
            let w = dtype.load(data, e);
            dtype.store(data, e, w + delta(f, u, j));
        }
    }
}

/// See [`super::Kernel::convert`]: each element widened exactly and rounded once into `to`.
pub fn convert(from: DType, src: &[u8], to: DType, dst: &mut [u8]) {
    for e in 0..src.len() / from.size() {
        to.store(dst, e, from.load(src, e));
    }
}
