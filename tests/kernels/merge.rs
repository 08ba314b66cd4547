//! `Kernel::merge_into` and `Kernel::merge` (in place) of every kernel against the reference.

use half::f16;
use lorafs::dtype::DType;
use lorafs::kernel::{Factors, Kernel};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{first_difference, kernels_under_test, pairs, value, weights, DTYPES};

/// Run every kernel on `w` (rows `row0 ..` of the tensor, in `from`) into `to` and compare
/// with the reference; in place too when `from == to`. Also checks that the reference rounds
/// once: its output is its exact F32 output rounded into `to`.
fn check(from: DType, to: DType, f: &Factors, row0: usize, w: &[u8]) -> Result<(), String> {
    let elements = w.len() / from.size();
    let merged = |k: Kernel, to: DType| {
        let mut out = vec![0u8; elements * to.size()];
        k.merge_into(from, w, to, &mut out, f, row0);
        out
    };
    let expected = merged(Kernel::Scalar, to);
    let describe = |what: &str, got: &[u8]| -> Result<(), String> {
        let Some((e, got, exp)) = first_difference(to.size(), got, &expected) else {
            return Ok(());
        };
        let (r, j) = (e / f.cols, e % f.cols);
        Err(format!(
            "{what} differs from scalar merge_into: {from:?} -> {to:?} rows={} rank={} cols={} \
             row0={row0} n={} at row {r} col {j}: W={:#x} got {got:#x}, expected {exp:#x}",
            f.rows,
            f.rank,
            f.cols,
            elements / f.cols.max(1),
            super::bits_at(from, w, e),
        ))
    };
    let mut once = vec![0u8; expected.len()];
    Kernel::Scalar.convert(
        DType::F32,
        &merged(Kernel::Scalar, DType::F32),
        to,
        &mut once,
    );
    describe("scalar merge_into F32 then convert", &once)?;
    for k in std::iter::once(Kernel::Scalar).chain(kernels_under_test()) {
        if k != Kernel::Scalar {
            describe(&format!("kernel {} merge_into", k.name()), &merged(k, to))?;
        }
        if from == to {
            let mut in_place = w.to_vec();
            k.merge(from, f, row0, &mut in_place);
            describe(&format!("kernel {} merge in place", k.name()), &in_place)?;
        }
    }
    Ok(())
}

/// [`check`] into every output dtype.
fn check_into_all(from: DType, f: &Factors, row0: usize, w: &[u8]) -> Result<(), String> {
    DTYPES
        .iter()
        .try_for_each(|&to| check(from, to, f, row0, w))
}

struct Case {
    from: DType,
    f: Factors,
    row0: usize,
    w: Vec<u8>,
}

#[allow(clippy::too_many_arguments)]
fn random_case(
    seed: u64,
    from: DType,
    n: usize,
    extra_rows: usize,
    rank: usize,
    cols: usize,
    special: f64,
) -> Case {
    let mut rng = StdRng::seed_from_u64(seed);
    let rows = n + extra_rows;
    let row0 = rng.random_range(0..=extra_rows);
    // Scale the factors so that the delta is of the order of the weights for any rank.
    let scale = 0.3 / (rank.max(1) as f32).sqrt();
    let u = (0..rows * rank)
        .map(|_| value(&mut rng, special, scale))
        .collect();
    let v = (0..rank * cols)
        .map(|_| value(&mut rng, special, 1.0))
        .collect();
    let w = weights(&mut rng, from, n * cols, special);
    Case {
        from,
        f: Factors::new(rows, rank, cols, u, v),
        row0,
        w,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn kernels_match_scalar_on_random_inputs(
        seed in any::<u64>(),
        from in prop::sample::select(DTYPES.to_vec()),
        to in prop::sample::select(DTYPES.to_vec()),
        n in 1usize..=20,
        extra_rows in 0usize..=12,
        rank in 1usize..=128,
        cols in 1usize..=300,
        special in prop::sample::select(vec![0.0, 0.0003, 0.001, 0.02, 0.2, 1.0]),
    ) {
        let c = random_case(seed, from, n, extra_rows, rank, cols, special);
        if let Err(e) = check(c.from, to, &c.f, c.row0, &c.w) {
            return Err(TestCaseError::fail(e));
        }
    }
}

#[test]
fn kernels_match_scalar_on_large_shapes() {
    // Several column blocks (the packed-V budget splits the columns for big ranks), every
    // row-tile remainder, a ragged right edge, ranks summed over several adapters.
    for (i, &(n, rank, cols)) in [
        (13, 192, 1100),
        (25, 64, 4096 + 17),
        (7, 16, 2049),
        (64, 8, 511),
        (3, 300, 700),
    ]
    .iter()
    .enumerate()
    {
        for (d, (from, to)) in pairs().enumerate() {
            for special in [0.0, 0.01] {
                let seed = 1000 + 10 * i as u64 + d as u64;
                let c = random_case(seed, from, n, 5, rank, cols, special);
                check(c.from, to, &c.f, c.row0, &c.w).unwrap();
            }
        }
    }
}

#[test]
fn rank_zero_rounds_w_plus_zero() {
    for (from, to) in pairs() {
        let mut rng = StdRng::seed_from_u64(7);
        for cols in [77, 200] {
            let w = weights(&mut rng, from, 3 * cols, 1.0);
            let f = Factors::new(3, 0, cols, vec![], vec![]);
            check(from, to, &f, 0, &w).unwrap();
        }
    }
}

/// Awkward `W` values of a dtype, as f32 bit patterns of what they widen to.
fn special_w(dtype: DType) -> Vec<u32> {
    let mut w: Vec<u32> = vec![
        0x0000_0000, // +0
        0x8000_0000, // -0
        0x7F80_0000, // +inf
        0xFF80_0000, // -inf
        0x3F80_0000, // 1.0
        0xBF80_0000, // -1.0
        0x3F80_8000, // 1 + 2^-8
        0x477F_E000, // 65504 = f16 max
        0xC77F_E000, // -65504
        0x3380_0000, // 2^-24 = smallest f16 subnormal
        0x3880_0000, // 2^-14 = smallest f16 normal
        0x0001_0000, // bf16 subnormal
        0x8080_0000, // -f32 min normal
        0x7F7F_0000, // near bf16 max
    ];
    if dtype == DType::F32 {
        w.extend([0x0000_0001, 0x807F_FFFF, 0x7F7F_FFFF, 0x3F80_0001]);
        // Narrowing: just below and at the f16 overflow tie (65520), f16 and bf16
        // subnormal ties (2^-25, 3·2^-25; 2^-134, 3·2^-134).
        w.extend([0x477F_EFFF, 0x477F_F000, 0x3300_0000, 0x3340_0000]);
        w.extend([0x0000_8000, 0x0001_8000]);
    }
    // NaNs of several payloads and signs (quiet and signalling) in the dtype's own encoding.
    match dtype {
        DType::F16 => w.extend([0x7FC0_0000, 0xFFC0_0000, 0x7FC0_2000, 0xFFFF_E000]),
        DType::BF16 => w.extend([0x7FC0_0000, 0xFFC1_0000, 0x7F81_0000, 0xFFFF_0000]),
        DType::F32 => w.extend([0x7F80_0001, 0xFFC0_0001, 0x7FFF_FFFF, 0xFF80_1234]),
    }
    w
}

/// Awkward deltas `U[i,0] · V[0,j]` (with `U[i,0] = 1`, so `acc` is the delta exactly, except
/// that `-0` becomes `+0`).
fn special_delta() -> Vec<f32> {
    let mut d = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001), // signalling NaN
        f32::from_bits(0xFFBF_FFFF), // negative signalling NaN
        f32::from_bits(0x7FC1_2345),
        1.0,
        -1.0,
        2f32.powi(-8),  // ties for bf16 around 1
        2f32.powi(-9),  // bf16 1 + 3·2^-9 rounds up
        2f32.powi(-11), // ties for f16 around 1
        3.0 * 2f32.powi(-12),
        16.0, // 65504 + 16 = tie between 65504 and inf: rounds to inf
        15.9, // just below: stays 65504
        1e6,
        -1e6,
        f32::MAX,
        -f32::MAX,
        f32::from_bits(1),           // smallest f32 subnormal
        f32::from_bits(0x8000_0001), // its negative
        f32::from_bits(0x007F_FFFF), // largest f32 subnormal
        2f32.powi(-25),              // half the smallest f16 subnormal: a tie to 0
        3.0 * 2f32.powi(-25),        // 1.5 × smallest f16 subnormal: tie to even (2)
        2f32.powi(-134),             // half the smallest bf16 subnormal: a tie to 0
        3.0 * 2f32.powi(-134),       // 1.5 × smallest bf16 subnormal: tie to even (2)
        f32::MIN_POSITIVE,
    ];
    d.extend(d.clone().iter().map(|x| -x));
    d
}

#[test]
fn kernels_match_scalar_on_special_values() {
    for dtype in DTYPES {
        // (`dtype` is W's; every output dtype is checked.)
        let ws = special_w(dtype);
        let ds = special_delta();
        // Every (W, delta) pair once: one column per delta, one row per W (plus offset rows).
        let (n, cols, extra) = (ws.len(), ds.len(), 3);
        let rows = n + extra;
        let mut w = vec![0u8; n * cols * dtype.size()];
        for (r, &wb) in ws.iter().enumerate() {
            for j in 0..cols {
                let e = r * cols + j;
                match dtype {
                    DType::F16 => {
                        let bits = if f32::from_bits(wb).is_nan() {
                            // Keep the NaN's own payload instead of converting.
                            0x7C00 | ((wb >> 16) & 0x8000) as u16 | ((wb >> 13) & 0x3FF) as u16
                        } else {
                            f16::from_f32(f32::from_bits(wb)).to_bits()
                        };
                        w[2 * e..2 * e + 2].copy_from_slice(&bits.to_le_bytes());
                    }
                    DType::BF16 => {
                        w[2 * e..2 * e + 2].copy_from_slice(&((wb >> 16) as u16).to_le_bytes())
                    }
                    DType::F32 => w[4 * e..4 * e + 4].copy_from_slice(&wb.to_le_bytes()),
                }
            }
        }
        // rank 1 with U = 1: acc = delta. rank 3 with U = (1, x, -x): acc = fma chains that
        // cancel or overflow. rank 2 with tiny U: products underflow, to -0 for negative ones.
        for (rank, u_row) in [
            (1, vec![1.0f32]),
            (3, vec![1.0, 1e30, -1e30]),
            (2, vec![-1e-30, 1e-30]),
        ] {
            let mut v = Vec::new();
            for k in 0..rank {
                v.extend(ds.iter().map(|&d| if k == 0 { d } else { d * 0.5 }));
            }
            let u: Vec<f32> = (0..rows).flat_map(|_| u_row.clone()).collect();
            let f = Factors::new(rows, rank, cols, u, v);
            check_into_all(dtype, &f, extra, &w).unwrap();
            check_into_all(dtype, &f, extra, &w[..cols * dtype.size()]).unwrap();
        }
    }
}

/// One awkward element in an otherwise ordinary tensor: SIMD kernels may round clean tiles
/// (or tile rows) with a fast instruction and only fall back to the exact path when they see
/// a NaN or subnormal, so every special must also be caught when it is alone.
#[test]
fn kernels_match_scalar_on_isolated_specials() {
    let (rows, rank, cols, row0) = (11, 3, 150, 2);
    let n = rows - row0;
    for dtype in DTYPES {
        // (`dtype` is W's; every output dtype is checked.)
        let mut rng = StdRng::seed_from_u64(99);
        let base_w = weights(&mut rng, dtype, n * cols, 0.0);
        let u: Vec<f32> = (0..rows * rank)
            .map(|_| value(&mut rng, 0.0, 0.3))
            .collect();
        let base_v: Vec<f32> = (0..rank * cols)
            .map(|_| value(&mut rng, 0.0, 1.0))
            .collect();
        // Raw W bits for: the smallest and largest subnormals, NaNs, infinity, the max value.
        let w_specials: Vec<u32> = match dtype {
            DType::F16 => vec![
                0x0001, 0x83FF, 0x0200, 0x7E00, 0xFD01, 0x7C01, 0x7C00, 0x7BFF,
            ],
            DType::BF16 => vec![0x0001, 0x807F, 0x0040, 0x7FC0, 0xFF81, 0x7F80, 0x7F7F],
            DType::F32 => vec![
                0x0000_0001,
                0x807F_FFFF,
                0x7FC0_0000,
                0xFF80_0001,
                0x7F80_0000,
                0x7F7F_FFFF,
            ],
        };
        // V column values (in the first rank row; the others 0) for: f32 subnormal products,
        // bf16/f16 subnormal sums, NaN, infinity, overflow, a tiny normal.
        let v_specials = [
            1e-39f32,
            -1e-40,
            1e-42,
            2f32.powi(-20),
            f32::NAN,
            f32::from_bits(0xFF80_0001),
            f32::INFINITY,
            f32::NEG_INFINITY,
            3e38,
            1e-30,
        ];
        for j in [0, 5, 15, 16, 63, 64, 100, 127, 128, 140, 149] {
            for i in [0, 4, n - 1] {
                for (which, &bits) in w_specials.iter().enumerate() {
                    // W special alone (its delta column zeroed, or not).
                    for zero_column in [true, false] {
                        let mut w = base_w.clone();
                        let e = i * cols + j;
                        let size = dtype.size();
                        w[e * size..(e + 1) * size].copy_from_slice(&bits.to_le_bytes()[..size]);
                        let mut v = base_v.clone();
                        if zero_column {
                            for k in 0..rank {
                                v[k * cols + j] = 0.0;
                            }
                        }
                        let f = Factors::new(rows, rank, cols, u.clone(), v);
                        check_into_all(dtype, &f, row0, &w)
                            .map_err(|e| format!("W special #{which} at ({i}, {j}): {e}"))
                            .unwrap();
                    }
                }
            }
            for (which, &x) in v_specials.iter().enumerate() {
                // A delta special alone, over a zero or an ordinary weight.
                for zero_w in [true, false] {
                    let mut w = base_w.clone();
                    if zero_w {
                        let size = dtype.size();
                        for i in 0..n {
                            let e = i * cols + j;
                            w[e * size..(e + 1) * size].fill(0);
                        }
                    }
                    let mut v = base_v.clone();
                    v[j] = x;
                    for k in 1..rank {
                        v[k * cols + j] = 0.0;
                    }
                    let f = Factors::new(rows, rank, cols, u.clone(), v);
                    check_into_all(dtype, &f, row0, &w)
                        .map_err(|e| format!("V special #{which} in column {j}: {e}"))
                        .unwrap();
                }
            }
        }
    }
}

/// The reference itself follows the contract on the cases that matter most.
#[test]
fn reference_follows_the_contract() {
    let merge1 = |dtype: DType, w: f32, delta: f32| -> Vec<u8> {
        let mut data = vec![0u8; dtype.size()];
        dtype.store(&mut data, 0, w);
        let f = Factors::new(1, 1, 1, vec![1.0], vec![delta]);
        check(dtype, dtype, &f, 0, &data).unwrap();
        Kernel::Scalar.merge(dtype, &f, 0, &mut data);
        data
    };
    let u16s = |b: Vec<u8>| u16::from_le_bytes([b[0], b[1]]);
    // Ties to even.
    assert_eq!(u16s(merge1(DType::BF16, 1.0, 2f32.powi(-8))), 0x3F80);
    assert_eq!(u16s(merge1(DType::F16, 1.0, 2f32.powi(-11))), 0x3C00);
    assert_eq!(
        u16s(merge1(DType::F16, 1.0 + 2f32.powi(-10), 2f32.powi(-11))),
        0x3C02
    );
    // Overflow to inf, subnormals kept.
    assert_eq!(u16s(merge1(DType::F16, 65504.0, 16.0)), 0x7C00);
    assert_eq!(u16s(merge1(DType::F16, 65504.0, 15.9)), 0x7BFF);
    assert_eq!(u16s(merge1(DType::F16, 0.0, 2f32.powi(-24))), 0x0001);
    assert_eq!(u16s(merge1(DType::BF16, 0.0, 2f32.powi(-134))), 0x0000);
    assert_eq!(
        u16s(merge1(DType::BF16, 0.0, 3.0 * 2f32.powi(-134))),
        0x0002
    );
    assert_eq!(u16s(merge1(DType::BF16, 0.0, 2f32.powi(-133))), 0x0001);
    // Canonical NaNs, from NaN inputs and from inf - inf.
    assert_eq!(u16s(merge1(DType::F16, 1.0, -f32::NAN)), 0x7E00);
    assert_eq!(
        u16s(merge1(DType::BF16, f32::INFINITY, f32::NEG_INFINITY)),
        0x7FC0
    );
    let f32_out = merge1(DType::F32, 1.0, f32::from_bits(0xFF80_0001));
    assert_eq!(u32::from_le_bytes(f32_out.try_into().unwrap()), 0x7FC0_0000);
    // -0 + (+0 from fma(1, -0, +0)) = +0.
    assert_eq!(u16s(merge1(DType::F16, -0.0, -0.0)), 0x0000);
}
