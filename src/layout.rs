//! The layout of a safetensors file: header bytes and where each tensor's bytes are.
//!
//! Parsing and validation are the `safetensors` crate's; this module only adds file names to
//! its errors, refuses a header that names a tensor twice (the crate reads the header into a
//! map, where the first one silently vanishes), and keeps what lorafs needs to serve byte
//! ranges: the exact header bytes (served unchanged) and every tensor's absolute byte range.
//! Every size computed from a header is overflow-checked: headers are untrusted input.

use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// Absolute `(offset, len)` of a tensor's bytes in its file.
pub type TensorRange = (u64, u64);

/// One tensor of a safetensors file, with absolute file offsets.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute offset of the first byte in the file (header included).
    pub offset: u64,
    pub len: u64,
}

impl TensorEntry {
    /// Number of values. [`Layout::open`] refuses a tensor whose count or byte size does not
    /// fit in a `usize`, so for an entry of a layout this is exact.
    pub fn numel(&self) -> usize {
        numel(&self.shape).unwrap_or(usize::MAX)
    }
}

/// The product of a shape's dimensions, `None` on overflow.
pub fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Bytes of a tensor of `shape` and `dtype`, `None` on overflow.
fn byte_size(shape: &[usize], dtype: Dtype) -> Option<usize> {
    numel(shape)?
        .checked_mul(dtype.bitsize())
        .map(|bits| bits / 8)
}

/// A parsed safetensors file.
#[derive(Debug)]
pub struct Layout {
    pub path: PathBuf,
    /// The first `8 + N` bytes of the file, exactly as they are on disk.
    pub header: Vec<u8>,
    /// Tensors in file order (increasing offsets, no holes).
    pub tensors: Vec<TensorEntry>,
    pub file_size: u64,
}

impl Layout {
    /// Parse the header of `path`. Only the header pages are read.
    pub fn open(path: &Path) -> Result<Layout> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if file_size < 8 {
            return Err(bad(
                path,
                format!("file is {file_size} bytes, shorter than the 8-byte header length"),
            ));
        }
        // SAFETY: the map is read-only and dropped before this function returns; the inputs
        // must not change while lorafs runs (documented), and only the header pages are read.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if let Some(name) = duplicate_key(&map) {
            return Err(bad(
                path,
                format!("tensor `{name}` appears twice in the header"),
            ));
        }
        let (n, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| describe(path, &map, e))?;
        let data_start = 8 + n as u64;
        let mut tensors = Vec::new();
        for name in metadata.offset_keys() {
            let info = metadata
                .info(&name)
                .expect("offset_keys names are in the metadata");
            let (start, end) = info.data_offsets;
            // The crate checked these sizes; checked again here so that no later product of
            // this shape can overflow, whatever the crate version.
            if byte_size(&info.shape, info.dtype) != end.checked_sub(start) {
                return Err(bad(
                    path,
                    format!("tensor `{name}`: data offsets do not match its shape and dtype"),
                ));
            }
            tensors.push(TensorEntry {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                offset: data_start + start as u64,
                len: (end - start) as u64,
            });
        }
        Ok(Layout {
            path: path.to_path_buf(),
            header: map[..8 + n].to_vec(),
            tensors,
            file_size,
        })
    }

    /// The header of this file with tensor `i` given shape `shapes[i]` (same dtypes, same
    /// tensor order, same `__metadata__`), and every tensor's new absolute (offset, len).
    /// Like the safetensors writer, the JSON is padded with spaces to a multiple of 8 bytes.
    pub fn header_with(&self, shapes: &[Vec<usize>]) -> Result<(Vec<u8>, Vec<TensorRange>)> {
        use serde_json::{json, Map, Value};
        let old: Map<String, Value> = serde_json::from_slice(&self.header[8..])
            .map_err(|e| bad(&self.path, format!("header JSON: {e}")))?;
        let mut map = Map::new();
        if let Some(meta) = old.get("__metadata__") {
            map.insert("__metadata__".into(), meta.clone());
        }
        let mut lens = Vec::with_capacity(self.tensors.len());
        let mut pos = 0usize;
        for (t, shape) in self.tensors.iter().zip(shapes) {
            let len = byte_size(shape, t.dtype)
                .filter(|&len| pos.checked_add(len).is_some())
                .ok_or_else(|| {
                    Error::tensor(
                        &self.path,
                        &t.name,
                        format!("shape {shape:?}: the file's size would overflow"),
                    )
                })?;
            let mut entry = old.get(&t.name).cloned().unwrap_or_else(|| json!({}));
            entry["dtype"] = serde_json::to_value(t.dtype).expect("a dtype serializes");
            entry["shape"] = json!(shape);
            entry["data_offsets"] = json!([pos, pos + len]);
            map.insert(t.name.clone(), entry);
            lens.push(len as u64);
            pos += len;
        }
        let mut text = serde_json::to_vec(&Value::Object(map)).expect("JSON serializes");
        while !text.len().is_multiple_of(8) {
            text.push(b' ');
        }
        let mut header = (text.len() as u64).to_le_bytes().to_vec();
        header.extend_from_slice(&text);
        // `pos` (the data size) fits in a usize, so header + data fits in a u64.
        let mut offset = header.len() as u64;
        let ranges = lens
            .into_iter()
            .map(|len| {
                let r = (offset, len);
                offset += len;
                r
            })
            .collect();
        Ok((header, ranges))
    }
}

fn bad(path: &Path, what: impl Into<String>) -> Error {
    Error::BadSafetensors {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// Turn the crate's error into a message that says what is wrong with which tensor.
fn describe(path: &Path, file: &[u8], err: safetensors::SafeTensorError) -> Error {
    use safetensors::SafeTensorError as E;
    let header_len = u64::from_le_bytes(file[..8].try_into().unwrap());
    let what = match err {
        E::HeaderTooLarge => {
            format!("header length {header_len} is larger than the 100 MB safetensors allows")
        }
        E::InvalidHeaderLength => format!(
            "header length {header_len} runs past the end of the {}-byte file (truncated?)",
            file.len()
        ),
        E::MetadataIncompleteBuffer => {
            "the tensors' data offsets do not end at the end of the file (truncated or padded file)"
                .to_string()
        }
        E::InvalidOffset(name) => {
            format!("tensor `{name}`: data offsets leave a hole or overlap the previous tensor")
        }
        E::TensorInvalidInfo => match find_inconsistent_tensor(file, header_len) {
            Some(name) => format!("tensor `{name}`: data offsets do not match its shape and dtype"),
            None => "a tensor's data offsets do not match its shape and dtype".to_string(),
        },
        other => other.to_string(),
    };
    bad(path, what)
}

/// The crate does not say which tensor fails its size check; find it for the message.
fn find_inconsistent_tensor(file: &[u8], header_len: u64) -> Option<String> {
    let json = file.get(8..8usize.checked_add(usize::try_from(header_len).ok()?)?)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json).ok()?;
    header.into_iter().find_map(|(name, v)| {
        let info: safetensors::tensor::TensorInfo = serde_json::from_value(v).ok()?;
        let want = byte_size(&info.shape, info.dtype);
        (want.is_none() || info.data_offsets.1.checked_sub(info.data_offsets.0) != want)
            .then_some(name)
    })
}

/// The first key that the header JSON of `file` names twice, if the header is readable JSON.
/// Anything else wrong with the header is left to the crate to report.
fn duplicate_key(file: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    use std::collections::HashSet;

    struct FirstDuplicate;
    impl<'de> Visitor<'de> for FirstDuplicate {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
            let mut seen = HashSet::new();
            let mut first = None;
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if first.is_none() && !seen.insert(key.clone()) {
                    first = Some(key);
                }
            }
            Ok(first)
        }
    }

    let n = usize::try_from(u64::from_le_bytes(file.get(..8)?.try_into().ok()?)).ok()?;
    // The crate's own cap on header size; past it the crate refuses the file anyway.
    if n > 100_000_000 {
        return None;
    }
    let json = file.get(8..8usize.checked_add(n)?)?;
    serde_json::Deserializer::from_slice(json)
        .deserialize_map(FirstDuplicate)
        .ok()
        .flatten()
}
