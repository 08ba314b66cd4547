//! Tensor element encodings of GGUF, bit-identical to `gguf-py`'s `quants.quantize` (the
//! converter's): every value arrives as the f32 of the merged model's stored element, as
//! the converter sees it after `tensor.to(torch.float32)`.

use half::f16;

use super::GgmlType;

/// Elements per `Q8_0` block: one f16 scale then 32 signed bytes.
pub const Q8_0_BLOCK: usize = 32;
const Q8_0_BLOCK_BYTES: usize = 2 + Q8_0_BLOCK;

impl GgmlType {
    /// Bytes of a row of `cols` elements (`cols` a multiple of 32 for `Q8_0`).
    pub fn row_bytes(self, cols: u64) -> u64 {
        match self {
            GgmlType::F32 => cols * 4,
            GgmlType::F16 | GgmlType::Bf16 => cols * 2,
            GgmlType::Q8_0 => cols / Q8_0_BLOCK as u64 * Q8_0_BLOCK_BYTES as u64,
        }
    }
}

/// Encodes `values` (whole rows) as `ty` into `out`, which has exactly
/// `ty.row_bytes(values.len())` bytes.
pub fn encode(ty: GgmlType, values: &[f32], out: &mut [u8]) {
    debug_assert_eq!(out.len() as u64, ty.row_bytes(values.len() as u64));
    match ty {
        GgmlType::F32 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        // numpy's astype(float16): round to nearest, ties to even, as `half` converts.
        GgmlType::F16 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        GgmlType::Bf16 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&bf16_bits(*v).to_le_bytes());
            }
        }
        GgmlType::Q8_0 => {
            for (block, o) in
                (values.chunks_exact(Q8_0_BLOCK)).zip(out.chunks_exact_mut(Q8_0_BLOCK_BYTES))
            {
                q8_0_block(block, o);
            }
        }
    }
}

/// ggml's f32 -> bf16 (`ggml_compute_fp32_to_bf16`, gguf-py's `BF16.quantize_blocks`): NaNs
/// made quiet, then round to nearest even on the raw bits.
fn bf16_bits(v: f32) -> u16 {
    let mut n = v.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        n = (n & 0xffff_0000) | (64 << 16);
    }
    ((n as u64 + (0x7fff + ((n >> 16) & 1)) as u64) >> 16) as u16
}

/// One `Q8_0` block as gguf-py computes it, in f32: `d = max|x| / 127`,
/// `q = round_half_away(x * (1/d))`, `d` stored as f16. numpy's `max` is NaN where the block
/// holds one (Rust's `max` skips it): then `d` is NaN and every `q` is 0.
fn q8_0_block(block: &[f32], out: &mut [u8]) {
    // Two passes that vectorize, rather than one with a branch per value.
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let nan = block.iter().fold(false, |n, v| n | v.is_nan());
    let amax = match nan {
        true => block.iter().find(|v| v.is_nan()).map_or(amax, |v| v.abs()),
        false => amax,
    };
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    let quants = (block.iter()).zip(&mut out[2..]);
    if id.is_finite() {
        // Every `v * id` is at most 127-and-a-rounding in magnitude, or NaN.
        quants.for_each(|(v, q)| *q = quant_small(v * id) as u8);
    } else {
        // (`d` so small that `1/d` overflows)
        quants.for_each(|(v, q)| *q = round_half_away(v * id) as i8 as u8);
    }
}

/// gguf-py's `np_roundf`: `floor(a) + floor(2 * (a - floor(a)))` with the sign of `x`, in
/// f32 (C's `roundf`).
fn round_half_away(x: f32) -> f32 {
    let a = x.abs();
    let floored = a.floor();
    let b = floored + (2.0 * (a - floored)).floor();
    if x > 0.0 {
        b
    } else if x < 0.0 {
        -b
    } else {
        0.0
    }
}

/// `round_half_away(x) as i8` for `|x| < 2^24` or NaN, in integers and without `floorf` (a
/// library call on the baseline x86-64 target, which held Q8_0 to a tenth of the speed of
/// F16): truncation to an integer is the floor of a non-negative value (and exact), NaN
/// truncates to 0 as the reference rounds it to 0, and clamping is what the reference's
/// saturating `as i8` does. Loops of it vectorize.
#[inline]
fn quant_small(x: f32) -> i8 {
    // NaN (and, never met here, anything from 2^24 up) counts as 0 from here on.
    let a = match x.abs() {
        a if a < 16_777_216.0 => a,
        _ => 0.0,
    };
    // SAFETY: `a` is finite and in 0 .. 2^24, and `2 * fraction` in 0 .. 2: both fit an i32.
    let (whole, twice_fraction) = unsafe {
        let whole: i32 = a.to_int_unchecked();
        (whole, (2.0 * (a - whole as f32)).to_int_unchecked::<i32>())
    };
    let n = whole + twice_fraction;
    let signed = if x > 0.0 {
        n
    } else if x < 0.0 {
        -n
    } else {
        0
    };
    signed.clamp(-128, 127) as i8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(ty: GgmlType, values: &[f32]) -> Vec<u8> {
        let mut out = vec![0; ty.row_bytes(values.len() as u64) as usize];
        encode(ty, values, &mut out);
        out
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_quiets_nans() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
    }

    #[test]
    fn q8_0_matches_the_reference_arithmetic() {
        let mut block = [0f32; 32];
        for (i, v) in block.iter_mut().enumerate() {
            *v = (i as f32 - 15.5) * 0.25;
        }
        let out = encoded(GgmlType::Q8_0, &block);
        let amax = 15.5f32 * 0.25;
        let d = amax / 127.0;
        assert_eq!(&out[..2], &f16::from_f32(d).to_le_bytes());
        let id = 1.0 / d;
        for (i, v) in block.iter().enumerate() {
            assert_eq!(
                out[2 + i] as i8 as f32,
                round_half_away(v * id),
                "element {i}"
            );
        }
        assert_eq!(out[2] as i8, -127);
        assert_eq!(out[33] as i8, 127);
    }

    #[test]
    fn q8_0_of_a_block_holding_nan_is_a_nan_scale_and_zeros() {
        // As gguf-py's numpy arithmetic gives it; the other block is quantized as usual.
        let mut values = vec![0.5f32; 64];
        values[3] = f32::NAN;
        values[40] = -1.0;
        let out = encoded(GgmlType::Q8_0, &values);
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x7e00, "f16 NaN");
        assert!(out[2..34].iter().all(|&q| q == 0));
        assert_eq!(
            f16::from_le_bytes([out[34], out[35]]),
            f16::from_f32(1.0 / 127.0)
        );
        assert_eq!(out[34 + 2 + 8] as i8, -127);
    }

    #[test]
    fn q8_0_of_zeros_is_zero() {
        assert_eq!(encoded(GgmlType::Q8_0, &[0.0; 64]), vec![0u8; 68]);
    }

    #[test]
    fn rounding_is_half_away_from_zero() {
        assert_eq!(round_half_away(2.5), 3.0);
        assert_eq!(round_half_away(-2.5), -3.0);
        assert_eq!(round_half_away(2.4999998), 2.0);
        assert_eq!(round_half_away(-0.5), -1.0);
    }

    #[test]
    fn quants_without_floorf_are_the_reference_below_2_to_the_24() {
        let same = |x: f32| {
            let (got, want) = (quant_small(x), round_half_away(x) as i8);
            assert_eq!(got, want, "{x} ({:#x})", x.to_bits());
        };
        // every f32 from 0 to 256 around each half (the ties and their neighbours), both signs
        for k in 0..512u32 {
            let half = k as f32 / 2.0;
            for x in [half, f32::from_bits(half.to_bits() + 1)] {
                let below = f32::from_bits(x.to_bits().saturating_sub(1));
                for v in [x, below, -x, -below] {
                    same(v);
                }
            }
        }
        // then a million bit patterns spread below 2^24 in magnitude, and the odd ones
        let mut bits = 0x9e37_79b9u32;
        for _ in 0..1_000_000 {
            bits = bits.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let x = f32::from_bits((bits % 0x4b80_0000) | (bits & 0x8000_0000));
            same(x);
        }
        for x in [
            0.0,
            -0.0,
            f32::NAN,
            -f32::NAN,
            f32::MIN_POSITIVE,
            1e-45,
            16777215.0,
        ] {
            same(x);
        }
    }

    #[test]
    fn q8_0_of_a_block_too_small_to_invert_is_the_reference() {
        // d = amax/127 is subnormal and 1/d overflows: the reference path
        let block: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 1e-44).collect();
        let out = encoded(GgmlType::Q8_0, &block);
        let d = 16e-44f32 / 127.0;
        assert!(!(1.0 / d).is_finite());
        for (v, q) in block.iter().zip(&out[2..]) {
            assert_eq!(*q as i8, round_half_away(v * (1.0 / d)) as i8);
        }
    }

    /// The GGUF view writes its float types with the merge kernels' conversion instead of
    /// `encode` (src/view/gguf.rs), from values the kernels widened (whose only NaN is
    /// theirs): the same bits on every kernel this machine has.
    #[test]
    fn every_kernel_rounds_to_the_float_types_as_encode_does() {
        use crate::dtype::{DType, CANONICAL_NAN_F32};
        // every sign, exponent and top mantissa bit, with the low 13 bits (what f16
        // rounds away from a normal value) at and around each rounding boundary (those of
        // bf16 are among them), the NaNs made the kernels' one
        let mut values = Vec::new();
        for high in 0..(1u32 << 19) {
            for low in [0, 1, 0x0fff, 0x1000, 0x1001, 0x1fff, 0x0a5a] {
                let x = f32::from_bits(high << 13 | low);
                values.push(match x.is_nan() {
                    true => f32::from_bits(CANONICAL_NAN_F32),
                    false => x,
                });
            }
        }
        assert!(values.len() > 3_000_000);
        let wide: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let types = [
            (GgmlType::F16, DType::F16),
            (GgmlType::Bf16, DType::BF16),
            (GgmlType::F32, DType::F32),
        ];
        for (ty, dtype) in types {
            let want = encoded(ty, &values);
            for kernel in crate::kernel::Kernel::available() {
                let mut got = vec![0u8; want.len()];
                kernel.convert(DType::F32, &wide, dtype, &mut got);
                let first = got.iter().zip(&want).position(|(a, b)| a != b);
                assert!(
                    first.is_none(),
                    "{} to {ty:?} differs at byte {first:?}",
                    kernel.name()
                );
            }
        }
    }

    #[test]
    fn f16_and_f32_are_little_endian_ieee() {
        assert_eq!(
            encoded(GgmlType::F16, &[1.0, -2.0]),
            [0x00, 0x3c, 0x00, 0xc0]
        );
        assert_eq!(encoded(GgmlType::F32, &[1.0]), 1.0f32.to_le_bytes());
    }
}
