//! The reference kernel: the accumulation order of [`super`]'s contract, written plainly.

use super::Factors;
use crate::dtype::DType;

pub fn merge(dtype: DType, f: &Factors, row0: usize, data: &mut [u8]) {
    let n = data.len() / (f.cols * dtype.size()).max(1);
    for r in 0..n {
        let u = &f.u[(row0 + r) * f.rank..(row0 + r + 1) * f.rank];
        for j in 0..f.cols {
            let mut acc = 0.0f32;
            for (&uk, vk) in u.iter().zip(f.v_column(j)) {
                acc = uk.mul_add(vk, acc);
            }
            let e = r * f.cols + j;
            let w = dtype.load(data, e);
            dtype.store(data, e, w + acc);
        }
    }
}
