//! The reference against a textbook computation: `merge_into` and `convert` round once, to
//! nearest even, from the exact value (computed in f64 on inputs where the f32 sum of the
//! contract is exact), and that one rounding differs from rounding `W` first.

use half::{bf16, f16};
use lorafs::dtype::{DType, CANONICAL_NAN_BF16, CANONICAL_NAN_F16, CANONICAL_NAN_F32};
use lorafs::kernel::{Factors, Kernel};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{bits_at, pairs, DTYPES};

/// `x` rounded to nearest, ties to even, in `dtype`, by the definition: a multiple of the
/// ulp of `x`'s binade (of the smallest normal binade below it, for subnormals), ±inf past
/// the largest finite value. Returns the value, which `dtype` represents exactly.
fn round_textbook(x: f64, dtype: DType) -> f64 {
    let (digits, min_exp, max) = match dtype {
        DType::F16 => (11, -14, 65504.0),
        DType::BF16 => (8, -126, f64::from(f32::from_bits(0x7F7F_0000))),
        DType::F32 => (24, -126, f64::from(f32::MAX)),
    };
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let exp = ((x.to_bits() >> 52) & 0x7FF) as i32 - 1023;
    let ulp = 2f64.powi(exp.max(min_exp) - (digits - 1));
    let r = (x / ulp).round_ties_even() * ulp;
    if r.abs() > max {
        f64::INFINITY.copysign(x)
    } else {
        r
    }
}

/// The bits `dtype` stores for the textbook rounding of `x` (NaN: the canonical one).
fn textbook_bits(x: f64, dtype: DType) -> u64 {
    if x.is_nan() {
        return match dtype {
            DType::F16 => CANONICAL_NAN_F16.into(),
            DType::BF16 => CANONICAL_NAN_BF16.into(),
            DType::F32 => CANONICAL_NAN_F32.into(),
        };
    }
    let r = round_textbook(x, dtype);
    match dtype {
        DType::F16 => f16::from_f64(r).to_bits().into(),
        DType::BF16 => bf16::from_f64(r).to_bits().into(),
        DType::F32 => (r as f32).to_bits().into(),
    }
}

/// Element `e` of a buffer of `dtype`, widened to f64 (by `half`, not by lorafs).
fn widen(dtype: DType, bytes: &[u8], e: usize) -> f64 {
    let b = bits_at(dtype, bytes, e);
    match dtype {
        DType::F16 => f16::from_bits(b as u16).to_f64(),
        DType::BF16 => bf16::from_bits(b as u16).to_f64(),
        DType::F32 => f64::from(f32::from_bits(b as u32)),
    }
}

/// `k · step` for a random `k` of at most 22 bits: half of them with few significant bits, so
/// that sums land on rounding ties.
fn on_grid(rng: &mut StdRng, step: f64) -> f64 {
    let k = if rng.random_bool(0.5) {
        rng.random_range(-(1i64 << 22)..1 << 22)
    } else {
        rng.random_range(-512i64..512) << rng.random_range(0..13)
    };
    k as f64 * step
}

#[test]
fn merge_into_rounds_the_exact_sum_once() {
    let mut rng = StdRng::seed_from_u64(11);
    // W and Δ multiples of `step` below 2^22 · step: their sum needs at most 24 significant
    // bits, so the contract's f32 addition is exact and the f64 sum is the exact value. The
    // steps reach f32 subnormals, f16 subnormals, ordinary weights, and f16 overflow.
    for step in [
        2f64.powi(-149),
        2f64.powi(-30),
        2f64.powi(-20),
        2f64.powi(-3),
    ] {
        for (from, to) in pairs() {
            let (rows, cols) = (16, 100);
            let mut w = vec![0u8; rows * cols * from.size()];
            for e in 0..rows * cols {
                from.store(&mut w, e, on_grid(&mut rng, step) as f32);
            }
            // Rank 1, U = 1: Δ[i, j] = fma(1, V[0, j], +0) = V[0, j] (+0 for -0).
            let v: Vec<f32> = (0..cols).map(|_| on_grid(&mut rng, step) as f32).collect();
            let f = Factors::new(rows, 1, cols, vec![1.0; rows], v.clone());
            let mut out = vec![0u8; rows * cols * to.size()];
            Kernel::Scalar.merge_into(from, &w, to, &mut out, &f, 0);
            for e in 0..rows * cols {
                let exact = widen(from, &w, e) + (f64::from(v[e % cols]) + 0.0);
                assert_eq!(
                    bits_at(to, &out, e),
                    textbook_bits(exact, to),
                    "{from:?} -> {to:?}: W {} + Δ {}",
                    widen(from, &w, e),
                    v[e % cols]
                );
            }
        }
    }
}

#[test]
fn convert_rounds_once() {
    let mut rng = StdRng::seed_from_u64(12);
    let sources: [(DType, Vec<u8>); 3] = [
        (
            DType::F16,
            (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect(),
        ),
        (
            DType::BF16,
            (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect(),
        ),
        (
            DType::F32,
            (0..1 << 17)
                .flat_map(|_| rng.random::<u32>().to_le_bytes())
                .collect(),
        ),
    ];
    for (from, src) in &sources {
        let n = src.len() / from.size();
        for to in DTYPES {
            let mut out = vec![0u8; n * to.size()];
            Kernel::Scalar.convert(*from, src, to, &mut out);
            for e in 0..n {
                let x = widen(*from, src, e);
                assert_eq!(
                    bits_at(to, &out, e),
                    textbook_bits(x, to),
                    "{from:?} -> {to:?} of {x:e}"
                );
            }
        }
    }
}

/// `merge_into` of one element `W` (stored in `from`) with `Δ = delta`, into `to`: its bits.
fn merge1(from: DType, w: f32, to: DType, delta: f32) -> u64 {
    let mut src = vec![0u8; from.size()];
    from.store(&mut src, 0, w);
    let f = Factors::new(1, 1, 1, vec![1.0], vec![delta]);
    let mut out = vec![0u8; to.size()];
    Kernel::Scalar.merge_into(from, &src, to, &mut out, &f, 0);
    bits_at(to, &out, 0)
}

/// Rounding `W` into the output dtype before adding `Δ` (two roundings) gives another result
/// than the one rounding of `merge_into`, for each narrowing pair.
#[test]
fn merge_into_is_not_two_roundings() {
    use DType::{BF16, F16, F32};
    let cases = [
        // 1 + 2^-9 + 2^-8 = 1 + 3·2^-9 rounds up to the BF16 1 + 2^-7; rounded first, W is
        // 1.0 and 1 + 2^-8 is a tie that goes to the even 1.0.
        (
            F32,
            1.0 + 2f32.powi(-9),
            BF16,
            2f32.powi(-8),
            0x3F81,
            0x3F80,
        ),
        (
            F16,
            1.0 + 2f32.powi(-9),
            BF16,
            2f32.powi(-8),
            0x3F81,
            0x3F80,
        ),
        // The same one binade down in F16: 1 + 2^-12 + 2^-11 rounds up to 1 + 2^-10.
        (
            F32,
            1.0 + 2f32.powi(-12),
            F16,
            2f32.powi(-11),
            0x3C01,
            0x3C00,
        ),
        // 65536 is past the F16 range (inf), but 65536 - 40 = 65496 rounds to 65504.
        (BF16, 65536.0, F16, -40.0, 0x7BFF, 0x7C00),
        (F32, 65536.0, F16, -40.0, 0x7BFF, 0x7C00),
    ];
    for (from, w, to, delta, once, twice) in cases {
        assert_eq!(
            merge1(from, w, to, delta),
            once,
            "{from:?} -> {to:?}: {w} + {delta}"
        );
        assert_eq!(merge1(to, w, to, delta), twice, "{to:?}: {w} + {delta}");
    }
    // Widening adds no rounding: BF16 1.0 + 2^-20 and F16 1.0 + 2^-20 are exact in F32.
    let exact = u64::from((1.0 + 2f32.powi(-20)).to_bits());
    assert_eq!(merge1(BF16, 1.0, F32, 2f32.powi(-20)), exact);
    assert_eq!(merge1(F16, 1.0, F32, 2f32.powi(-20)), exact);
    assert_eq!(merge1(F16, 1.0, F16, 2f32.powi(-20)), 0x3C00);
}

/// NaN, infinities, zeros and overflow across dtypes, in `merge_into` and `convert`.
#[test]
fn special_values_across_dtypes() {
    use DType::{BF16, F16, F32};
    let convert1 = |from: DType, bits: u32, to: DType| -> u64 {
        let src = &bits.to_le_bytes()[..from.size()];
        let mut out = vec![0u8; to.size()];
        Kernel::Scalar.convert(from, src, to, &mut out);
        bits_at(to, &out, 0)
    };
    // Any NaN, of any payload, becomes the output dtype's canonical NaN.
    assert_eq!(convert1(F32, 0xFF80_0001, BF16), 0x7FC0);
    assert_eq!(convert1(F32, 0x7FFF_FFFF, F16), 0x7E00);
    assert_eq!(convert1(F16, 0xFD01, F32), 0x7FC0_0000);
    assert_eq!(convert1(BF16, 0xFF81, F16), 0x7E00);
    assert_eq!(convert1(F16, 0x7C01, F16), 0x7E00);
    assert_eq!(merge1(F32, f32::from_bits(0x7F80_1234), F16, 1.0), 0x7E00);
    assert_eq!(
        merge1(BF16, f32::INFINITY, F32, f32::NEG_INFINITY),
        0x7FC0_0000
    );
    // -0 converts to -0; merged, -0 + (+0) is +0.
    assert_eq!(convert1(F32, 0x8000_0000, F16), 0x8000);
    assert_eq!(convert1(BF16, 0x8000, F32), 0x8000_0000);
    assert_eq!(merge1(F32, -0.0, BF16, 0.0), 0x0000);
    // Narrowing overflows to inf from the halfway point; infinities stay.
    assert_eq!(convert1(F32, 65520f32.to_bits(), F16), 0x7C00);
    assert_eq!(convert1(F32, 65519.996f32.to_bits(), F16), 0x7BFF);
    assert_eq!(convert1(BF16, 0xC780, F16), 0xFC00); // -65536
    assert_eq!(convert1(F32, f32::MAX.to_bits(), BF16), 0x7F80);
    assert_eq!(convert1(F16, 0xFC00, BF16), 0xFF80);
    // Subnormals: the smallest F16 one is a normal BF16; F32 ones round to BF16 ones.
    assert_eq!(convert1(F16, 0x0001, BF16), 0x3380);
    assert_eq!(convert1(F32, 0x0001_8000, BF16), 0x0002); // 1.5 ulp: tie to even
    assert_eq!(convert1(F32, 0x0000_8000, BF16), 0x0000); // 0.5 ulp: tie to even (0)
    assert_eq!(convert1(BF16, 0x0001, F16), 0x0000);
}
