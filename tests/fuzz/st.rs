//! Safetensors files as a fuzz input: a structured header (near-valid by default, with every
//! field liable to be wrong in some way), a length prefix that may lie, data that may be
//! short, long or sparse, and raw byte mutations on top.

use std::io::Write;
use std::path::Path;

use proptest::prelude::*;
use proptest::sample::Index;

use crate::json::{odd_number, odd_string, odd_value, J};

/// Every dtype name the `safetensors` crate knows, with its size in bits.
pub const DTYPES: [(&str, u128); 23] = [
    ("BOOL", 8),
    ("F4", 4),
    ("F6_E2M3", 6),
    ("F6_E3M2", 6),
    ("U8", 8),
    ("I8", 8),
    ("F8_E5M2", 8),
    ("F8_E4M3", 8),
    ("F8_E8M0", 8),
    ("F8_E4M3FNUZ", 8),
    ("F8_E5M2FNUZ", 8),
    ("I16", 16),
    ("U16", 16),
    ("F16", 16),
    ("BF16", 16),
    ("I32", 32),
    ("U32", 32),
    ("F32", 32),
    ("C64", 64),
    ("F64", 64),
    ("I64", 64),
    ("U64", 64),
    // Unknown to the crate: must be refused, not guessed.
    ("Q4_K", 0),
];

/// Real (non-sparse) bytes written at most per file; the rest of a larger file is a hole.
pub const MAX_REAL_DATA: u64 = 64 << 10;

#[derive(Clone, Debug)]
pub enum Dtype {
    Named(&'static str, u128),
    Odd(J),
}

#[derive(Clone, Debug)]
pub enum Shape {
    Dims(Vec<u64>),
    Odd(J),
}

#[derive(Clone, Debug)]
pub enum Offsets {
    /// `[pos, pos + size]`, following on from the previous entry: what a writer produces.
    Consistent,
    /// Consistent, then moved: holes, overlaps, sizes that do not match.
    Shifted(i64, i64),
    Odd(J),
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Shape,
    pub offsets: Offsets,
    /// A field left out (0 dtype, 1 shape, 2 data_offsets), or an unknown one added.
    pub drop_field: Option<u8>,
    pub extra_field: Option<(String, J)>,
}

impl Entry {
    pub fn plain(name: &str, dtype: &'static str, dims: &[u64]) -> Entry {
        let bits = DTYPES.iter().find(|d| d.0 == dtype).map_or(0, |d| d.1);
        Entry {
            name: name.to_string(),
            dtype: Dtype::Named(dtype, bits),
            shape: Shape::Dims(dims.to_vec()),
            offsets: Offsets::Consistent,
            drop_field: None,
            extra_field: None,
        }
    }

    /// Bytes the dtype and shape call for (0 when either is not understood).
    pub fn size(&self) -> u128 {
        match (&self.dtype, &self.shape) {
            (Dtype::Named(_, bits), Shape::Dims(dims)) => dims
                .iter()
                .try_fold(*bits, |n, &d| n.checked_mul(d as u128))
                .map_or(u128::MAX, |b| b / 8),
            _ => 0,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Prefix {
    Honest,
    Delta(i64),
    Value(u64),
}

#[derive(Clone, Debug)]
pub enum Mutation {
    Xor(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Truncate(Index),
}

#[derive(Clone, Debug)]
pub struct StFile {
    pub entries: Vec<Entry>,
    pub metadata: Option<J>,
    /// Repeat entry i's key (with its value) at the end.
    pub duplicate: Option<Index>,
    /// List the tensors in the JSON in the reverse of their data order (writers list them
    /// in data order; readers must not depend on it).
    pub reversed: bool,
    /// Bytes after the JSON, inside the declared header (the writer pads with spaces).
    pub padding: Vec<u8>,
    pub prefix: Prefix,
    /// Data bytes beyond (or short of) what the offsets declare.
    pub data_delta: i64,
    pub mutations: Vec<Mutation>,
    /// Seed of the data bytes (random floats: NaN, infinities, subnormals included).
    pub seed: u64,
    /// The most data bytes any one tensor's offsets declare (a larger one gets a range
    /// shorter than its shape says): keeps what a buggy reader could allocate affordable.
    pub cap: u128,
}

impl StFile {
    pub fn valid(entries: Vec<Entry>, seed: u64) -> StFile {
        StFile {
            entries,
            metadata: Some(J::obj(vec![("format", J::str("pt"))])),
            duplicate: None,
            reversed: false,
            padding: Vec::new(),
            prefix: Prefix::Honest,
            data_delta: 0,
            mutations: Vec::new(),
            seed,
            cap: u128::MAX,
        }
    }

    /// The JSON header and the data length the offsets declare.
    fn header(&self) -> (Vec<u8>, u128) {
        let mut fields = Vec::new();
        if let Some(meta) = &self.metadata {
            fields.push(("__metadata__".to_string(), meta.clone()));
        }
        let mut pos: u128 = 0;
        let mut end_max: u128 = 0;
        for e in &self.entries {
            let size = e.size().min(self.cap);
            let offsets = match &e.offsets {
                Offsets::Consistent => J::Arr(vec![J::num(pos), J::num(pos.saturating_add(size))]),
                Offsets::Shifted(s, t) => J::Arr(vec![
                    J::num(pos as i128 + *s as i128),
                    J::num(pos.saturating_add(size) as i128 + *t as i128),
                ]),
                Offsets::Odd(j) => j.clone(),
            };
            pos = pos.saturating_add(size);
            end_max = end_max.max(pos);
            let dtype = match &e.dtype {
                Dtype::Named(n, _) => J::str(n),
                Dtype::Odd(j) => j.clone(),
            };
            let shape = match &e.shape {
                Shape::Dims(d) => J::Arr(d.iter().map(J::num).collect()),
                Shape::Odd(j) => j.clone(),
            };
            let mut info: Vec<(String, J)> = [
                ("dtype", dtype),
                ("shape", shape),
                ("data_offsets", offsets),
            ]
            .into_iter()
            .enumerate()
            .filter(|(i, _)| e.drop_field != Some(*i as u8))
            .map(|(_, (k, v))| (k.to_string(), v))
            .collect();
            info.extend(e.extra_field.clone());
            fields.push((e.name.clone(), J::Obj(info)));
        }
        if self.reversed {
            let meta = usize::from(self.metadata.is_some());
            fields[meta..].reverse();
        }
        if let Some(i) = self.duplicate.filter(|_| !fields.is_empty()) {
            let again = fields[i.index(fields.len())].clone();
            fields.push(again);
        }
        let mut json = J::Obj(fields).render().into_bytes();
        json.extend_from_slice(&self.padding);
        (json, end_max)
    }

    /// Write the file; returns the bytes really written (the rest is a sparse hole).
    pub fn write(&self, path: &Path) -> std::io::Result<u64> {
        let (json, declared) = self.header();
        let prefix = match self.prefix {
            Prefix::Honest => json.len() as u64,
            Prefix::Delta(d) => (json.len() as i64).saturating_add(d) as u64,
            Prefix::Value(v) => v,
        };
        let data = (declared as i128 + self.data_delta as i128).clamp(0, u64::MAX as i128) as u64;
        let mut bytes = prefix.to_le_bytes().to_vec();
        bytes.extend_from_slice(&json);
        let real = data.min(MAX_REAL_DATA) as usize;
        let mut x = self.seed | 1;
        // Random bit patterns make every float class appear, and lorafs refuses factors that
        // hold NaN or Inf before merging anything. So in most files bit 6 of every byte is
        // cleared, which keeps each F16, BF16 and F32 exponent below its all-ones value
        // (values finite, |x| < 2) and lets the merge itself be reached; one seed in eight
        // keeps the raw bits.
        let mask = if self.seed.is_multiple_of(8) {
            0xff
        } else {
            0xbf
        };
        bytes.extend((0..real).map(|_| {
            // xorshift: cheap.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8 & mask
        }));
        let mut total = (8 + json.len() as u64).saturating_add(data);
        for m in &self.mutations {
            mutate(&mut bytes, m, &mut total);
        }
        let mut file = std::fs::File::create(path)?;
        file.write_all(&bytes)?;
        // A file system refuses lengths beyond its limit (16 TiB on ext4): then the file
        // simply stays shorter than its header says, which is another case worth having.
        if total > bytes.len() as u64 {
            let _ = file.set_len(total);
        }
        Ok(bytes.len() as u64)
    }
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation, total: &mut u64) {
    if bytes.is_empty() {
        return;
    }
    let sparse = *total - bytes.len() as u64;
    match m {
        Mutation::Xor(i, x) => {
            let i = i.index(bytes.len());
            bytes[i] ^= x;
        }
        Mutation::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
        Mutation::Delete(i) => {
            bytes.remove(i.index(bytes.len()));
        }
        Mutation::Truncate(i) => {
            bytes.truncate(i.index(bytes.len()));
            *total = bytes.len() as u64;
            return;
        }
    }
    *total = bytes.len() as u64 + sparse;
}

/// Dimensions: mostly small, sometimes zero, sometimes at the edge of an integer type.
pub fn dim() -> BoxedStrategy<u64> {
    prop_oneof![
        8 => 0u64..9,
        1 => proptest::sample::select(&[
            1u64 << 16, 1 << 24, 1 << 31, 1 << 32, 1 << 40, 1 << 53, 1 << 62, u64::MAX
        ][..]),
    ]
    .boxed()
}

fn dtype() -> BoxedStrategy<Dtype> {
    prop_oneof![
        3 => Just(Dtype::Named("F16", 16)),
        1 => Just(Dtype::Named("BF16", 16)),
        1 => Just(Dtype::Named("F32", 32)),
        3 => proptest::sample::select(&DTYPES[..]).prop_map(|(n, b)| Dtype::Named(n, b)),
        1 => prop_oneof![odd_string().prop_map(J::Str), odd_value()].prop_map(Dtype::Odd),
    ]
    .boxed()
}

fn shape() -> BoxedStrategy<Shape> {
    prop_oneof![
        10 => prop::collection::vec(dim(), 0..5).prop_map(Shape::Dims),
        1 => prop::collection::vec(0u64..3, 5..80).prop_map(Shape::Dims),
        1 => odd_value().prop_map(Shape::Odd),
        1 => prop::collection::vec(odd_number(), 0..4).prop_map(|v| Shape::Odd(J::Arr(v))),
    ]
    .boxed()
}

fn offsets() -> BoxedStrategy<Offsets> {
    prop_oneof![
        8 => Just(Offsets::Consistent),
        2 => (-9i64..9, -9i64..9).prop_map(|(s, e)| Offsets::Shifted(s, e)),
        1 => proptest::sample::select(&[i64::MIN, -1, 1 << 40, i64::MAX][..])
            .prop_map(|e| Offsets::Shifted(0, e)),
        1 => prop::collection::vec(odd_number(), 0..4).prop_map(|v| Offsets::Odd(J::Arr(v))),
        1 => odd_value().prop_map(Offsets::Odd),
    ]
    .boxed()
}

/// Tensor names: plausible ones, and the ones that break assumptions.
pub fn tensor_name() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "model\\.layers\\.[0-9]\\.[a-z_]{1,8}\\.weight",
        1 => Just("__metadata__".to_string()),
        2 => odd_string(),
    ]
    .boxed()
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        tensor_name(),
        dtype(),
        shape(),
        offsets(),
        proptest::option::weighted(0.05, 0u8..3),
        proptest::option::weighted(0.05, (odd_string(), odd_value())),
    )
        .prop_map(
            |(name, dtype, shape, offsets, drop_field, extra_field)| Entry {
                name,
                dtype,
                shape,
                offsets,
                drop_field,
                extra_field,
            },
        )
}

fn metadata() -> BoxedStrategy<Option<J>> {
    let strings =
        prop::collection::vec((odd_string(), odd_string().prop_map(J::Str)), 0..4).prop_map(J::Obj);
    prop_oneof![
        3 => Just(Some(J::obj(vec![("format", J::str("pt"))]))),
        2 => Just(None),
        2 => strings.prop_map(Some),
        2 => odd_value().prop_map(Some),
    ]
    .boxed()
}

fn prefix() -> BoxedStrategy<Prefix> {
    prop_oneof![
        8 => Just(Prefix::Honest),
        2 => (-16i64..16).prop_map(Prefix::Delta),
        1 => proptest::sample::select(&[
            0u64, 1, 100_000_000, 100_000_001, 1 << 32, i64::MAX as u64, u64::MAX
        ][..])
            .prop_map(Prefix::Value),
    ]
    .boxed()
}

fn padding() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => Just(Vec::new()),
        2 => (0usize..8).prop_map(|n| vec![b' '; n]),
        1 => prop::collection::vec(any::<u8>(), 0..8),
    ]
    .boxed()
}

fn data_delta() -> BoxedStrategy<i64> {
    prop_oneof![8 => Just(0i64), 2 => -16i64..16, 1 => Just(1i64 << 33)].boxed()
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 1u8..=255).prop_map(|(i, x)| Mutation::Xor(i, x)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => any::<Index>().prop_map(Mutation::Delete),
        1 => any::<Index>().prop_map(Mutation::Truncate),
    ]
}

/// A safetensors file built field by field, each field near-valid or broken.
pub fn structured_file() -> impl Strategy<Value = StFile> {
    (
        prop::collection::vec(entry(), 0..6),
        metadata(),
        proptest::option::weighted(0.1, any::<Index>()),
        any::<bool>(),
        padding(),
        prefix(),
        data_delta(),
        any::<u64>(),
    )
        .prop_map(
            |(entries, metadata, duplicate, reversed, padding, prefix, data_delta, seed)| StFile {
                entries,
                metadata,
                duplicate,
                reversed,
                padding,
                prefix,
                data_delta,
                mutations: Vec::new(),
                seed,
                cap: u128::MAX,
            },
        )
}

/// A valid file of small tensors, then a few raw byte mutations.
pub fn mutated_file() -> impl Strategy<Value = StFile> {
    let small = (
        tensor_name(),
        0usize..3,
        prop::collection::vec(0u64..6, 0..3),
    )
        .prop_map(|(name, d, dims)| {
            let dtype = ["F16", "BF16", "F32"][d];
            Entry::plain(&name, dtype, &dims)
        });
    (
        prop::collection::vec(small, 1..5),
        prop::collection::vec(mutation(), 1..6),
        any::<u64>(),
    )
        .prop_map(|(entries, mutations, seed)| StFile {
            mutations,
            ..StFile::valid(entries, seed)
        })
}
