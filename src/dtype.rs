//! The floating-point storage types lorafs can merge into, and their one rounding rule.

use half::{bf16, f16};

/// A dtype a merged tensor can be stored in. Other safetensors dtypes pass through untouched
/// but cannot be the target of a LoRA delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
}

impl DType {
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<DType> {
        match dtype {
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F32 => Some(DType::F32),
            _ => None,
        }
    }

    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F32 => safetensors::Dtype::F32,
        }
    }

    /// The name `torch_dtype` / `dtype` has in a transformers `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
        }
    }

    /// A dtype as `--dtype` and a views file name it: f16, bf16 or f32 (or float16, fp16,
    /// bfloat16, float32, fp32), any case.
    pub fn parse(text: &str) -> Result<DType, String> {
        match text.to_ascii_lowercase().as_str() {
            "f16" | "float16" | "fp16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f32" | "float32" | "fp32" => Ok(DType::F32),
            _ => Err(format!("unknown dtype {text:?} (use f16, bf16 or f32)")),
        }
    }

    /// Widen element `i` of a little-endian buffer of this dtype to f32 (exact).
    #[inline]
    pub fn load(self, bytes: &[u8], i: usize) -> f32 {
        match self {
            DType::F16 => {
                f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
            }
            DType::BF16 => {
                bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
            }
            DType::F32 => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()),
        }
    }

    /// Widen every element of a little-endian buffer of this dtype to f32 (exact), appending
    /// them to `out`: one match per buffer, not per element, so each arm is a loop the
    /// compiler vectorises (an adapter's factors are read through this at every mount).
    pub fn load_into(self, bytes: &[u8], out: &mut Vec<f32>) {
        fn halves(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
            bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        }
        match self {
            DType::F16 => out.extend(halves(bytes).map(|h| f16::from_bits(h).to_f32())),
            DType::BF16 => out.extend(halves(bytes).map(|h| bf16::from_bits(h).to_f32())),
            DType::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
        }
    }

    /// Round `x` to this dtype and store it as element `i`: see [`round_f16`] and friends.
    #[inline]
    pub fn store(self, bytes: &mut [u8], i: usize, x: f32) {
        match self {
            DType::F16 => bytes[2 * i..2 * i + 2].copy_from_slice(&round_f16(x).to_le_bytes()),
            DType::BF16 => bytes[2 * i..2 * i + 2].copy_from_slice(&round_bf16(x).to_le_bytes()),
            DType::F32 => bytes[4 * i..4 * i + 4].copy_from_slice(&round_f32(x).to_le_bytes()),
        }
    }
}

/// The quiet NaN every kernel writes for a NaN result, whatever the input NaN's payload or sign.
///
/// Hardware differs in which operand's NaN payload an addition propagates (x86 takes the
/// first source, aarch64 may use the default NaN), so bit-identical output across kernels
/// needs one canonical NaN. Real weights hold no NaN; this only makes the contract total.
pub const CANONICAL_NAN_F32: u32 = 0x7FC0_0000;
pub const CANONICAL_NAN_F16: u16 = 0x7E00;
pub const CANONICAL_NAN_BF16: u16 = 0x7FC0;

/// f32 → f16 bits, round to nearest even (subnormals kept, overflow to ±inf), canonical NaN.
#[inline]
pub fn round_f16(x: f32) -> u16 {
    if x.is_nan() {
        CANONICAL_NAN_F16
    } else {
        f16::from_f32(x).to_bits()
    }
}

/// f32 → bf16 bits, round to nearest even (subnormals kept, overflow to ±inf), canonical NaN.
#[inline]
pub fn round_bf16(x: f32) -> u16 {
    if x.is_nan() {
        CANONICAL_NAN_BF16
    } else {
        bf16::from_f32(x).to_bits()
    }
}

/// f32 → f32 bits with the canonical NaN.
#[inline]
pub fn round_f32(x: f32) -> u32 {
    if x.is_nan() {
        CANONICAL_NAN_F32
    } else {
        x.to_bits()
    }
}

/// Decode a whole little-endian buffer of a float safetensors dtype into f32 values.
pub fn to_f32_vec(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    (0..bytes.len() / dtype.size())
        .map(|i| dtype.load(bytes, i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_nearest_even_and_keeps_subnormals() {
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 0x3F80);
        // 1 + 3·2^-9 lies above the halfway point: rounds up.
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-9)), 0x3F81);
        // the smallest f16 subnormal survives.
        assert_eq!(round_f16(2f32.powi(-24)), 0x0001);
        assert_eq!(round_f16(1e6), 0x7C00);
        assert_eq!(round_bf16(f32::from_bits(0xFFC1_2345)), CANONICAL_NAN_BF16);
        assert_eq!(round_f32(f32::from_bits(0x7F80_0001)), CANONICAL_NAN_F32);
    }

    #[test]
    fn load_into_widens_like_load() {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let values = [1.5f32, -0.25, 96.0, 0.0, -0.0, 65504.0];
            let mut buf = vec![0u8; dtype.size() * values.len()];
            for (i, &x) in values.iter().enumerate() {
                dtype.store(&mut buf, i, x);
            }
            let mut out = vec![7.0];
            dtype.load_into(&buf, &mut out);
            let want: Vec<f32> = (0..values.len()).map(|i| dtype.load(&buf, i)).collect();
            assert_eq!(out[0], 7.0, "{dtype:?}: appends");
            assert_eq!(&out[1..], &want[..], "{dtype:?}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&out[1..]),
                bits(&want),
                "{dtype:?}: signs of zero kept"
            );
        }
    }

    #[test]
    fn load_store_round_trip() {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let mut buf = vec![0u8; dtype.size() * 3];
            for (i, x) in [1.5f32, -0.25, 96.0].into_iter().enumerate() {
                dtype.store(&mut buf, i, x);
                assert_eq!(dtype.load(&buf, i), x, "{dtype:?}");
            }
        }
    }
}
