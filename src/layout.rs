//! The layout of a safetensors file: header bytes and where each tensor's bytes are.
//!
//! Parsing and validation are the `safetensors` crate's; this module only adds file names to
//! its errors and keeps what lorafs needs to serve byte ranges: the exact header bytes (served
//! unchanged) and every tensor's absolute byte range in the file.

use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

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
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
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
        let (n, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| describe(path, &map, e))?;
        let data_start = 8 + n as u64;
        let mut tensors = Vec::new();
        for name in metadata.offset_keys() {
            let info = metadata
                .info(&name)
                .expect("offset_keys names are in the metadata");
            let (start, end) = info.data_offsets;
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

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
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
    let json = file.get(8..8usize.checked_add(header_len as usize)?)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json).ok()?;
    header.into_iter().find_map(|(name, v)| {
        let info: safetensors::tensor::TensorInfo = serde_json::from_value(v).ok()?;
        let numel: usize = info.shape.iter().product();
        let want = numel * info.dtype.bitsize() / 8;
        (info.data_offsets.1.checked_sub(info.data_offsets.0) != Some(want)).then_some(name)
    })
}
