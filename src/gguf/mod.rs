//! The GGUF view: the merged model as the single `.gguf` file llama.cpp's
//! `convert_hf_to_gguf.py` would write from a materialized copy, computed on demand.
//!
//! [`metadata`] holds the typed key/value pairs of a GGUF header; [`arch`] maps a Hugging
//! Face config and tensor list to GGUF architecture keys, tensor names, types and the Q/K row
//! permutation; [`vocab`] turns the tokenizer files into the `tokenizer.*` keys. The writer
//! and the lazy tensor data live in [`file`].

pub mod arch;
pub mod card;
pub mod encode;
pub mod header;
pub mod metadata;
pub mod vocab;

pub use metadata::{Array, Metadata, Value};
pub use vocab::{vocab_metadata, VocabFamily};

use std::path::{Path, PathBuf};

/// The files of a model directory, as the GGUF header needs them (config, tokenizer files,
/// model card). A view serves these from the base or from an adapter; `materialize` and tests
/// read a plain directory.
pub trait ModelFiles {
    /// The bytes of file `name` (relative to the directory root), or `None` if there is no
    /// such file.
    fn read(&self, name: &str) -> crate::Result<Option<Vec<u8>>>;
    /// As [`ModelFiles::read`], but an error (naming the file) without reading it whole if
    /// it holds more than `cap` bytes.
    fn read_capped(&self, name: &str, cap: u64) -> crate::Result<Option<Vec<u8>>> {
        match self.read(name)? {
            Some(bytes) if bytes.len() as u64 > cap => Err(too_large(self.root().join(name), cap)),
            other => Ok(other),
        }
    }
    /// The names of the files in subdirectory `dir` (relative to the root), in any order;
    /// empty if there is no such directory. (The converter globs
    /// `additional_chat_templates/*.jinja`.)
    fn list(&self, dir: &str) -> crate::Result<Vec<String>>;
    /// The directory's path, for error messages.
    fn root(&self) -> &Path;
}

/// The error of a file larger than [`ModelFiles::read_capped`]'s cap.
pub fn too_large(path: PathBuf, cap: u64) -> crate::Error {
    let what = format!("larger than {} MiB; refusing to read it whole", cap >> 20);
    crate::Error::Io {
        path,
        source: std::io::Error::other(what),
    }
}

/// A plain directory.
pub struct DirFiles(pub PathBuf);

impl ModelFiles for DirFiles {
    fn read(&self, name: &str) -> crate::Result<Option<Vec<u8>>> {
        let path = self.0.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(crate::Error::Io { path, source }),
        }
    }

    fn read_capped(&self, name: &str, cap: u64) -> crate::Result<Option<Vec<u8>>> {
        let path = self.0.join(name);
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(crate::Error::Io { path, source }),
            Ok(_) => crate::baseio::read_small(&path, cap).map(Some),
        }
    }

    fn list(&self, dir: &str) -> crate::Result<Vec<String>> {
        let path = self.0.join(dir);
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(crate::Error::Io { path, source }),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| crate::Error::Io {
                path: path.clone(),
                source,
            })?;
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(names)
    }

    fn root(&self) -> &Path {
        &self.0
    }
}

/// A GGUF output type, as llama.cpp's `--outtype` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutType {
    F32,
    F16,
    Bf16,
    Q8_0,
}

/// A tensor element type of GGUF (`GGMLQuantizationType`), only those lorafs writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
    Bf16 = 30,
}

impl OutType {
    /// The `general.file_type` value (`LlamaFileType`) of this output type.
    pub fn file_type(self) -> u32 {
        match self {
            OutType::F32 => 0,
            OutType::F16 => 1,
            OutType::Q8_0 => 7,
            OutType::Bf16 => 32,
        }
    }

    /// The element type of a tensor that is not forced to F32.
    pub fn tensor_type(self) -> GgmlType {
        match self {
            OutType::F32 => GgmlType::F32,
            OutType::F16 => GgmlType::F16,
            OutType::Bf16 => GgmlType::Bf16,
            OutType::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// The name used in `--gguf` and in file names (`model-Q8_0.gguf`).
    pub fn name(self) -> &'static str {
        match self {
            OutType::F32 => "F32",
            OutType::F16 => "F16",
            OutType::Bf16 => "BF16",
            OutType::Q8_0 => "Q8_0",
        }
    }

    /// Parses a `--gguf` value (case-insensitive).
    pub fn parse(text: &str) -> Option<OutType> {
        [OutType::F32, OutType::F16, OutType::Bf16, OutType::Q8_0]
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(text))
    }
}
