//! The bytes of a GGUF header (version 3) and where each tensor's data goes, as
//! `gguf-py`'s `GGUFWriter` lays a single file out: magic, version, counts, the key/value
//! pairs, the tensor infos, zero padding to the alignment; then each tensor's data padded
//! to the alignment.

use super::metadata::{Array, Metadata, Value};
use super::GgmlType;

/// `general.alignment` when the key is absent (lorafs never sets it).
pub const ALIGNMENT: u64 = 32;
const MAGIC: u32 = 0x4655_4747; // "GGUF"
const VERSION: u32 = 3;

/// One tensor as the header describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major (numpy) order; the header stores it reversed, as ggml counts dimensions.
    pub shape: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorInfo {
    /// Elements of the last dimension (1 for a scalar).
    pub fn cols(&self) -> u64 {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Rows: the product of the other dimensions.
    pub fn rows(&self) -> u64 {
        let n = self.shape.len().saturating_sub(1);
        self.shape[..n].iter().product()
    }

    /// Bytes of the tensor's data.
    pub fn bytes(&self) -> u64 {
        self.rows() * self.ty.row_bytes(self.cols())
    }
}

/// A laid-out GGUF file: its header bytes (padding included) and each tensor's data offset.
#[derive(Debug, Clone)]
pub struct Header {
    pub bytes: Vec<u8>,
    /// Absolute offset of each tensor's data, in the order of the infos.
    pub offsets: Vec<u64>,
    /// Size of the whole file.
    pub size: u64,
}

/// Lays out the file of `metadata` and `tensors`.
pub fn build(metadata: &Metadata, tensors: &[TensorInfo]) -> Header {
    let mut out = Vec::new();
    put_u32(&mut out, MAGIC);
    put_u32(&mut out, VERSION);
    put_u64(&mut out, tensors.len() as u64);
    put_u64(&mut out, metadata.len() as u64);
    for (key, value) in metadata.entries() {
        put_str(&mut out, key);
        put_value(&mut out, value);
    }
    let mut relative = Vec::with_capacity(tensors.len());
    let mut data = 0u64;
    for t in tensors {
        put_str(&mut out, &t.name);
        put_u32(&mut out, t.shape.len() as u32);
        for dim in t.shape.iter().rev() {
            put_u64(&mut out, *dim);
        }
        put_u32(&mut out, t.ty as u32);
        put_u64(&mut out, data);
        relative.push(data);
        data += pad(t.bytes());
    }
    out.resize(pad(out.len() as u64) as usize, 0);
    let start = out.len() as u64;
    Header {
        offsets: relative.iter().map(|r| start + r).collect(),
        size: start + data,
        bytes: out,
    }
}

/// `n` rounded up to the alignment.
fn pad(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// GGUF value type codes (`GGUFValueType`).
fn type_code(value: &Value) -> u32 {
    match value {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::Text(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    put_u32(out, type_code(value));
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.push(*v as u8),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => put_u32(out, *v),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => put_u64(out, *v),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(*v as u8),
        Value::Text(s) => put_str(out, s),
        Value::Array(array) => put_array(out, array),
    }
}

fn put_array(out: &mut Vec<u8>, array: &Array) {
    fn items<T>(out: &mut Vec<u8>, code: u32, items: &[T], mut put: impl FnMut(&mut Vec<u8>, &T)) {
        put_u32(out, code);
        put_u64(out, items.len() as u64);
        for item in items {
            put(out, item);
        }
    }
    match array {
        Array::I32(v) => items(out, 5, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        Array::U32(v) => items(out, 4, v, |o, x| put_u32(o, *x)),
        Array::F32(v) => items(out, 6, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        Array::Bool(v) => items(out, 7, v, |o, x| o.push(*x as u8)),
        Array::Text(v) => items(out, 8, v, |o, x| put_str(o, x)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_pads_header_and_every_tensor_to_32_bytes() {
        let mut meta = Metadata::new();
        meta.set("general.architecture", Value::Text("llama".into()));
        let tensors = [
            TensorInfo {
                name: "a".into(),
                shape: vec![3],
                ty: GgmlType::F32,
            },
            TensorInfo {
                name: "b".into(),
                shape: vec![2, 32],
                ty: GgmlType::Q8_0,
            },
        ];
        let h = build(&meta, &tensors);
        assert_eq!(h.bytes.len() % 32, 0);
        assert_eq!(&h.bytes[..4], b"GGUF");
        assert_eq!(h.offsets, [h.bytes.len() as u64, h.bytes.len() as u64 + 32]);
        assert_eq!(h.size, h.bytes.len() as u64 + 32 + 96);
        // b's dimensions are stored reversed: 32 then 2.
        let info = h
            .bytes
            .windows(1 + 4 + 16)
            .position(|w| w[0] == b'b')
            .unwrap();
        let dims = &h.bytes[info + 5..info + 21];
        assert_eq!(dims, [32u64.to_le_bytes(), 2u64.to_le_bytes()].concat());
    }
}
