//! Every kernel this CPU can run must produce exactly the bytes of the scalar reference, for
//! every input and every (input, output) dtype pair: random shapes (odd widths, ranks up to
//! 300, row offsets), NaNs of any payload and sign, ±inf, ±0, f32/f16/bf16 subnormals,
//! overflow when narrowing, rounding ties (`merge.rs`, `convert.rs`). The reference itself is
//! checked against a textbook f64 computation of one rounding (`reference.rs`).

mod convert;
mod merge;
mod reference;

use half::{bf16, f16};
use lorafs::dtype::DType;
use lorafs::kernel::Kernel;
use rand::rngs::StdRng;
use rand::Rng;

const DTYPES: [DType; 3] = [DType::F16, DType::BF16, DType::F32];

/// Every (input, output) dtype pair.
fn pairs() -> impl Iterator<Item = (DType, DType)> {
    DTYPES
        .into_iter()
        .flat_map(|from| DTYPES.into_iter().map(move |to| (from, to)))
}

/// The kernels to compare with the reference; says on stderr (once) which ones cannot run
/// here and why.
fn kernels_under_test() -> Vec<Kernel> {
    static REPORT: std::sync::Once = std::sync::Once::new();
    let available = Kernel::available();
    REPORT.call_once(|| {
        for k in Kernel::ALL {
            if !available.contains(&k) {
                eprintln!(
                    "kernel {} SKIPPED: it needs {}, which this machine is not",
                    k.name(),
                    k.requires()
                );
            }
        }
    });
    available
        .into_iter()
        .filter(|&k| k != Kernel::Scalar)
        .collect()
}

/// The first element (of `size` bytes) where `got` and `expected` differ, with both bit
/// patterns.
fn first_difference(size: usize, got: &[u8], expected: &[u8]) -> Option<(usize, u64, u64)> {
    assert_eq!(got.len(), expected.len());
    let bits = |b: &[u8]| b.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64);
    got.chunks(size)
        .zip(expected.chunks(size))
        .position(|(g, e)| g != e)
        .map(|e| {
            let at = e * size..(e + 1) * size;
            (e, bits(&got[at.clone()]), bits(&expected[at]))
        })
}

/// Element `e` of a little-endian buffer of `dtype` as raw bits.
fn bits_at(dtype: DType, bytes: &[u8], e: usize) -> u64 {
    let size = dtype.size();
    bytes[e * size..(e + 1) * size]
        .iter()
        .rev()
        .fold(0, |a, &x| (a << 8) | x as u64)
}

/// A value of the kind real factors and sums run into, or (with probability `special`) an
/// awkward one.
fn value(rng: &mut StdRng, special: f64, scale: f32) -> f32 {
    if !rng.random_bool(special) {
        return rng.random_range(-1.0f32..1.0) * scale;
    }
    let sign = if rng.random_bool(0.5) {
        0x8000_0000u32
    } else {
        0
    };
    let mag = |x: f32| f32::from_bits(x.to_bits() | sign);
    match rng.random_range(0..12) {
        // NaN, quiet or signalling, any payload and sign.
        0 => f32::from_bits(sign | 0x7F80_0000 | rng.random_range(1..0x80_0000)),
        1 => mag(f32::INFINITY),
        2 => mag(0.0),
        // f32 (and bf16-range) subnormals.
        3 => f32::from_bits(sign | rng.random_range(1..0x80_0000)),
        // f16 subnormals, exactly representable ones and in-between values.
        4 => mag(rng.random_range(1..1024) as f32 * 2f32.powi(-24)),
        5 => mag(rng.random_range(0.0f32..1.0) * 2f32.powi(-14)),
        // Around and beyond the f16 range (65504).
        6 => mag(rng.random_range(60000.0f32..70000.0)),
        // Huge: products overflow f32, sums of infinities of both signs make NaN.
        7 => mag(rng.random_range(1.0f32..3.0) * 1e38),
        8 => mag(rng.random_range(1.0f32..2.0) * 1e20),
        // Tiny normals: products underflow, possibly to -0.
        9 => mag(rng.random_range(1.0f32..2.0) * 1e-25),
        10 => mag(f32::MIN_POSITIVE),
        // Exact small integers and halves: sums land on rounding ties.
        _ => mag(rng.random_range(0..64) as f32 * 0.5),
    }
}

/// `n` elements of `dtype` as little-endian bytes: values of `value(.., scale)`, and with
/// probability `special` arbitrary bit patterns (every NaN payload, subnormal, infinity, ...).
fn elements(rng: &mut StdRng, dtype: DType, n: usize, special: f64, scale: f32) -> Vec<u8> {
    let mut out = vec![0u8; n * dtype.size()];
    for i in 0..n {
        let raw = rng.random_bool(special);
        match dtype {
            DType::F16 | DType::BF16 => {
                let bits = if raw {
                    rng.random::<u16>()
                } else {
                    let x = value(rng, special, scale);
                    if dtype == DType::F16 {
                        f16::from_f32(x).to_bits()
                    } else {
                        bf16::from_f32(x).to_bits()
                    }
                };
                out[2 * i..2 * i + 2].copy_from_slice(&bits.to_le_bytes());
            }
            DType::F32 => {
                let bits = if raw {
                    rng.random::<u32>()
                } else {
                    value(rng, special, scale).to_bits()
                };
                out[4 * i..4 * i + 4].copy_from_slice(&bits.to_le_bytes());
            }
        }
    }
    out
}

/// `n` weights of `dtype` (typical magnitude 0.1), see [`elements`].
fn weights(rng: &mut StdRng, dtype: DType, n: usize, special: f64) -> Vec<u8> {
    elements(rng, dtype, n, special, 0.1)
}
