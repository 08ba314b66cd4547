//! `Kernel::convert` of every kernel against the reference, for every dtype pair.

use lorafs::dtype::DType;
use lorafs::kernel::Kernel;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{bits_at, elements, first_difference, kernels_under_test, pairs, value, DTYPES};

/// Run every kernel's `convert` on `src` and compare with the reference, writing at the
/// start of a buffer and one element in (an odd address for the vector stores).
fn check(from: DType, to: DType, src: &[u8]) -> Result<(), String> {
    let n = src.len() / from.size();
    let mut expected = vec![0u8; n * to.size()];
    Kernel::Scalar.convert(from, src, to, &mut expected);
    for k in kernels_under_test() {
        for skip in [0, 1] {
            let mut buf = vec![0u8; (skip + n) * to.size()];
            let got = &mut buf[skip * to.size()..];
            k.convert(from, src, to, got);
            if let Some((e, got, exp)) = first_difference(to.size(), got, &expected) {
                return Err(format!(
                    "kernel {} convert {from:?} -> {to:?} of {n} elements (output {skip} in) \
                     differs at element {e}: input {:#x} got {got:#x}, expected {exp:#x}",
                    k.name(),
                    bits_at(from, src, e)
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn every_16_bit_pattern_converts_like_the_reference() {
    let all: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
    for from in [DType::F16, DType::BF16] {
        for to in DTYPES {
            check(from, to, &all).unwrap();
        }
    }
}

#[test]
fn f32_values_convert_like_the_reference() {
    let mut rng = StdRng::seed_from_u64(5);
    let mut src: Vec<u8> = Vec::new();
    for _ in 0..1 << 16 {
        // Arbitrary bits (every class and NaN payload), awkward values, values of every
        // scale that round in both directions and on ties.
        let x = match rng.random_range(0..3) {
            0 => f32::from_bits(rng.random()),
            1 => value(&mut rng, 1.0, 1.0),
            _ => {
                let mantissa = rng.random_range(0..1u32 << 13) << 10;
                let exponent = rng.random_range(90..160u32) << 23;
                f32::from_bits(rng.random::<u32>() & 0x8000_0000 | exponent | mantissa)
            }
        };
        src.extend(x.to_bits().to_le_bytes());
    }
    for to in DTYPES {
        check(DType::F32, to, &src).unwrap();
    }
}

/// The last elements of a buffer take another path in every SIMD kernel (a padded copy or
/// masked loads and stores): every length up to three 64-element rows, from odd starts.
#[test]
fn every_length_converts_like_the_reference() {
    let mut rng = StdRng::seed_from_u64(6);
    for (from, to) in pairs() {
        let src = elements(&mut rng, from, 3 * 64 + 10, 0.3, 1.0);
        let size = from.size();
        for len in 0..=3 * 64 + 1 {
            for start in [0, 1, 7] {
                check(from, to, &src[start * size..(start + len) * size]).unwrap();
            }
        }
    }
}
