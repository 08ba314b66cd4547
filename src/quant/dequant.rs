//! bitsandbytes' dequantization, value for value, in f32.
//!
//! 4-bit (`functional.dequantize_4bit`, CPU backend): byte `b` of the packed codes holds
//! values `2b` (high nibble) and `2b + 1` (low nibble) of the flattened tensor; value `e` is
//! `code[nibble] · absmax[e / blocksize]`, one f32 multiplication. With double quantization
//! the block's absmax is `nested_code[c] · nested_absmax[block / nested_blocksize]`, then
//! `+ offset`: two f32 operations, in that order (`dequantize_blockwise` then `absmax +=
//! offset`). 8-bit (`int8_vectorwise_dequant`): `cb · SCB[row] · 7.874015718698502e-3`,
//! left to right in f32.

/// How a base weight is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Nf4,
    Fp4,
    Int8,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Nf4 => "nf4",
            Scheme::Fp4 => "fp4",
            Scheme::Int8 => "int8",
        }
    }
}

/// NF4's 16 values, as `functional.get_4bit_type("nf4")` writes them (then divided by
/// their largest magnitude, 1.0, which changes none).
const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4's values before `get_4bit_type` divides them (in f32) by their largest, 12.
const FP4_RAW: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// `1/127` as bitsandbytes writes it; torch multiplies an f32 tensor by it in f32, i.e. by
/// this literal rounded to f32, as Rust rounds it (the literal is kept as written).
#[allow(clippy::excessive_precision)]
const INT8_SCALE: f32 = 7.874_015_718_698_502e-3;

/// The 16 values of a 4-bit scheme.
pub fn code4(scheme: Scheme) -> [f32; 16] {
    match scheme {
        Scheme::Nf4 => NF4,
        Scheme::Fp4 => FP4_RAW.map(|x| x / 12.0),
        Scheme::Int8 => unreachable!("int8 has no 4-bit code"),
    }
}

/// The absmax of a block under double quantization.
#[inline]
pub fn nested_scale(code: &[f32; 256], c: u8, nested_absmax: f32, offset: f32) -> f32 {
    code[c as usize] * nested_absmax + offset
}

/// Values `e0 .. e0 + out.len()` of a 4-bit tensor: `packed` holds its bytes from `e0 / 2`,
/// `scales` the absmax of its blocks from `e0 / blocksize`.
pub fn dequant4(
    code: &[f32; 16],
    blocksize: usize,
    e0: usize,
    packed: &[u8],
    scales: &[f32],
    out: &mut [f32],
) {
    let (b0, k0) = (e0 / 2, e0 / blocksize);
    for (i, o) in out.iter_mut().enumerate() {
        let e = e0 + i;
        let byte = packed[e / 2 - b0];
        let nibble = if e.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0xF
        };
        *o = code[nibble as usize] * scales[e / blocksize - k0];
    }
}

/// Rows of an 8-bit tensor: `codes` holds them (int8, `scb.len()` rows of `cols`).
pub fn dequant8(cols: usize, codes: &[u8], scb: &[f32], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = (codes[i] as i8 as f32) * scb[i / cols] * INT8_SCALE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_high_nibble_is_the_first_value() {
        let code = code4(Scheme::Nf4);
        let mut out = [0f32; 4];
        // Bytes 0x0F, 0x7F: values 0 (nibble 0), 1 (15), 2 (7), 3 (15).
        dequant4(&code, 64, 0, &[0x0F, 0x7F], &[2.0], &mut out);
        assert_eq!(out, [-2.0, 2.0, 0.0, 2.0]);
        // From an odd value: the low nibble of the first byte.
        let mut out = [0f32; 2];
        dequant4(&code, 64, 1, &[0x0F, 0x7F], &[2.0], &mut out);
        assert_eq!(out, [2.0, 0.0]);
    }

    #[test]
    fn each_block_has_its_scale() {
        let code = code4(Scheme::Fp4);
        // Blocks of 32: values 30..34 straddle blocks 0 and 1; nibble 3 is 12/12 = 1.
        let packed = [0x33u8; 17];
        let mut out = [0f32; 4];
        dequant4(&code, 32, 30, &packed[15..], &[3.0, 5.0], &mut out);
        assert_eq!(out, [3.0, 3.0, 5.0, 5.0]);
        assert_eq!(code[1], 0.0625f32 / 12.0);
    }

    #[test]
    fn double_quantization_multiplies_then_adds_in_f32() {
        let mut code = [0f32; 256];
        code[7] = 0.1;
        let s = nested_scale(&code, 7, 3.0, 0.2);
        assert_eq!(s, 0.1f32 * 3.0f32 + 0.2f32);
    }

    #[test]
    fn int8_is_scaled_by_row() {
        let mut out = [0f32; 4];
        dequant8(2, &[127, 0x81, 1, 0], &[1.0, 2.0], &mut out);
        assert_eq!(out[0], 127.0 * INT8_SCALE);
        assert_eq!(out[1], -127.0 * INT8_SCALE);
        assert_eq!(out[2], 2.0 * INT8_SCALE);
        assert_eq!(out[3], 0.0);
    }
}
