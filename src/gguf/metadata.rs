//! The key/value metadata of a GGUF header, typed as the GGUF spec types them.

/// One metadata value. The variant is the GGUF value type written to the file, so the
/// producer of a key chooses it exactly as `gguf-py`'s `GGUFWriter.add_*` does (for
/// example `uint32` for `llama.block_count`, `float32` for `llama.rope.freq_base`).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Text(String),
    Array(Array),
}

/// An array value: GGUF arrays hold one element type.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    I32(Vec<i32>),
    U32(Vec<u32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    Text(Vec<String>),
}

/// The ordered key/value pairs of a header. Setting a key that is already there replaces its
/// value in place, as `GGUFWriter` does (a Python dict keeps the first insertion's position).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    entries: Vec<(String, Value)>,
}

impl Metadata {
    pub fn new() -> Metadata {
        Metadata::default()
    }

    /// Sets `key` to `value`, keeping the key's position if it was set before.
    pub fn set(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((key, value)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn entries(&self) -> &[(String, Value)] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
