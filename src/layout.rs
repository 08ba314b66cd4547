//! The layout of a safetensors file: header bytes and where each tensor's bytes are.
//!
//! Only the header is read (`pread`, never a map of the whole file), and parsed as it is
//! read, so a file of any declared or sparse size costs its header's bytes, and a length
//! prefix that claims more than the JSON costs what the parser took before it failed. Validation is the `safetensors` crate's
//! (`Metadata::new`: increasing offsets, no holes, sizes that match shapes, overflow-checked),
//! plus what its map-based reader cannot see: a tensor named twice in the header (the map
//! silently keeps one). This module adds file names to the errors and keeps what lorafs
//! needs to serve byte ranges: the exact header bytes (served unchanged) and every tensor's
//! absolute byte range. Every size computed from a header is overflow-checked.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use crate::error::{Error, Result};

/// The format's cap on the header's JSON (the crate's `MAX_HEADER_SIZE`).
const MAX_HEADER: u64 = 100_000_000;

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

/// Bytes of a tensor of `shape` and `dtype`, `None` on overflow or when the bits do not
/// fill whole bytes (sub-byte dtypes).
fn byte_size(shape: &[usize], dtype: Dtype) -> Option<usize> {
    let bits = numel(shape)?.checked_mul(dtype.bitsize())?;
    bits.is_multiple_of(8).then_some(bits / 8)
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
    /// Parse the header of `path`, reading nothing else.
    pub fn open(path: &Path) -> Result<Layout> {
        let file = crate::baseio::open_regular(path)?;
        let file_size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if file_size < 8 {
            return Err(bad(
                path,
                format!("file is {file_size} bytes, shorter than the 8-byte header length"),
            ));
        }
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0)
            .map_err(|e| Error::io(path, e))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER {
            return Err(bad(
                path,
                format!("header length {n} is larger than the 100 MB safetensors allows"),
            ));
        }
        if n > file_size - 8 {
            return Err(bad(
                path,
                format!(
                    "header length {n} runs past the end of the {file_size}-byte file (truncated?)"
                ),
            ));
        }
        let (header, metadata) = read_header(path, &file, len, n)?;
        let data_start = 8 + n;
        if data_start.checked_add(metadata.data_len() as u64) != Some(file_size) {
            return Err(bad(
                path,
                "the tensors' data offsets do not end at the end of the file (truncated or padded file)",
            ));
        }
        let mut tensors = Vec::new();
        for name in metadata.offset_keys() {
            let Some(info) = metadata.info(&name) else {
                continue;
            };
            let (start, end) = info.data_offsets;
            // The crate checked these sizes; checked again here so that no later product of
            // this shape can overflow, whatever the crate version.
            if byte_size(&info.shape, info.dtype) != end.checked_sub(start) {
                return Err(bad(
                    path,
                    format!("tensor `{name}`: data offsets do not match its shape and dtype"),
                ));
            }
            // start <= end <= data_len, and data_start + data_len is the file size.
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
            header,
            tensors,
            file_size,
        })
    }

    /// The header of this file with tensor `i` given shape `shapes[i]` and dtype
    /// `dtypes[i]` (same tensor order, same `__metadata__`), and every tensor's new absolute
    /// (offset, len). Like the safetensors writer, the JSON is padded with spaces to a
    /// multiple of 8 bytes. Tensors with `dropped[i]` are left out (their range is empty).
    pub fn header_with(
        &self,
        shapes: &[Vec<usize>],
        dtypes: &[safetensors::Dtype],
        dropped: &[bool],
    ) -> Result<(Vec<u8>, Vec<TensorRange>)> {
        use serde_json::{json, Map, Value};
        let old: Map<String, Value> = serde_json::from_slice(&self.header[8..])
            .map_err(|e| bad(&self.path, format!("header JSON: {e}")))?;
        let mut map = Map::new();
        if let Some(meta) = old.get("__metadata__") {
            map.insert("__metadata__".into(), meta.clone());
        }
        let mut lens = Vec::with_capacity(self.tensors.len());
        let mut pos = 0usize;
        for (((t, shape), &dtype), &drop) in
            self.tensors.iter().zip(shapes).zip(dtypes).zip(dropped)
        {
            if drop {
                // Left out of the header; its range is empty.
                lens.push(0);
                continue;
            }
            // Sizes stay below i64::MAX, so the change of a file's size is an i64 too.
            let len = byte_size(shape, dtype)
                .filter(|&len| {
                    pos.checked_add(len)
                        .is_some_and(|end| end <= i64::MAX as usize)
                })
                .ok_or_else(|| {
                    Error::tensor(
                        &self.path,
                        &t.name,
                        format!("shape {shape:?}: the file's size would overflow"),
                    )
                })?;
            let mut entry = old.get(&t.name).cloned().unwrap_or_else(|| json!({}));
            entry["dtype"] = serde_json::to_value(dtype).expect("a dtype serializes");
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

/// The header's `n` bytes of JSON after the length prefix `len`, parsed as they are read:
/// a length prefix may claim up to 100 MB, and bytes that are not JSON are refused after
/// at most one buffer more than the parser took, not after reading the whole claim. On
/// success all `n` bytes have been read (only whitespace may follow the JSON object, as in
/// the crate's own reader), and are returned with the prefix, exactly as on disk.
fn read_header(path: &Path, file: &File, len: [u8; 8], n: u64) -> Result<(Vec<u8>, Metadata)> {
    /// What a buffer beyond the parser's position may read ahead.
    const CHUNK: usize = 64 << 10;
    let mut source = Recorder {
        file,
        pos: 8,
        end: 8 + n,
        bytes: len.to_vec(),
    };
    let reader = std::io::BufReader::with_capacity(CHUNK, &mut source);
    let mut de = serde_json::Deserializer::from_reader(reader);
    let parsed = Header::parse(&mut de).and_then(|header| de.end().map(|()| header));
    drop(de);
    let header = match parsed {
        Ok(header) => header,
        Err(e) if e.is_io() => return Err(Error::io(path, e.into())),
        Err(e) => return Err(bad(path, format!("header JSON: {e}"))),
    };
    // `end()` read to the end of the `n` bytes, so `bytes` holds the whole header.
    let bytes = source.bytes;
    let metadata = validate(path, header, &bytes[8..])?;
    Ok((bytes, metadata))
}

/// Reads the file from `pos` to `end` and keeps every byte it has handed out.
struct Recorder<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
    bytes: Vec<u8>,
}

impl std::io::Read for Recorder<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = usize::try_from(self.end - self.pos).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        if want == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..want], self.pos)?;
        if got == 0 {
            // The file was longer when its size was checked: it changed while being read.
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.bytes.extend_from_slice(&buf[..got]);
        self.pos += got as u64;
        Ok(got)
    }
}

/// The parsed header as the crate's validated `Metadata`; a key named twice is refused.
fn validate(path: &Path, header: Header, json: &[u8]) -> Result<Metadata> {
    if let Some(name) = header.duplicate {
        let what = if name == "__metadata__" {
            "key"
        } else {
            "tensor"
        };
        return Err(bad(
            path,
            format!("{what} `{name}` appears twice in the header"),
        ));
    }
    let mut tensors = header.tensors;
    // The crate's order: by offsets (stable, so equal offsets keep the file's order).
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    Metadata::new(header.metadata, tensors).map_err(|e| describe(path, json, e))
}

/// The header's entries in file order, and the first key it names twice.
struct Header {
    metadata: Option<HashMap<String, String>>,
    tensors: Vec<(String, TensorInfo)>,
    duplicate: Option<String>,
}

impl Header {
    fn parse<'de, R: serde_json::de::Read<'de>>(
        de: &mut serde_json::Deserializer<R>,
    ) -> serde_json::Result<Header> {
        use serde::de::{Deserializer, MapAccess, Visitor};

        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Header;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Header, A::Error> {
                let mut header = Header {
                    metadata: None,
                    tensors: Vec::new(),
                    duplicate: None,
                };
                let mut seen = HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "__metadata__" {
                        header.metadata = Some(map.next_value()?);
                    } else {
                        header.tensors.push((key.clone(), map.next_value()?));
                    }
                    if header.duplicate.is_none() && !seen.insert(key.clone()) {
                        header.duplicate = Some(key);
                    }
                }
                Ok(header)
            }
        }
        de.deserialize_map(Entries)
    }
}

/// Turn the crate's error into a message that says what is wrong with which tensor.
fn describe(path: &Path, json: &[u8], err: safetensors::SafeTensorError) -> Error {
    use safetensors::SafeTensorError as E;
    let what = match err {
        E::InvalidOffset(name) => {
            format!("tensor `{name}`: data offsets leave a hole or overlap the previous tensor")
        }
        E::TensorInvalidInfo | E::ValidationOverflow | E::MisalignedSlice => {
            match find_inconsistent_tensor(json) {
                Some(name) => {
                    format!("tensor `{name}`: data offsets do not match its shape and dtype")
                }
                None => "a tensor's data offsets do not match its shape and dtype".to_string(),
            }
        }
        other => other.to_string(),
    };
    bad(path, what)
}

/// The crate does not say which tensor fails its size check; find it for the message.
fn find_inconsistent_tensor(json: &[u8]) -> Option<String> {
    let header = Header::parse(&mut serde_json::Deserializer::from_slice(json)).ok()?;
    header.tensors.into_iter().find_map(|(name, info)| {
        let want = byte_size(&info.shape, info.dtype);
        (want.is_none() || info.data_offsets.1.checked_sub(info.data_offsets.0) != want)
            .then_some(name)
    })
}
