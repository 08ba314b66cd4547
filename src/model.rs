//! The base model directory: every file in it, and every tensor of its safetensors files.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use crate::baseio::Identity;
use crate::error::{Error, Result};
use crate::layout::Layout;

/// The shard index of a sharded model.
pub(crate) const INDEX_FILE: &str = "model.safetensors.index.json";

/// Directory depth beyond which the walk gives up (a symlink loop, most likely).
const MAX_DEPTH: usize = 32;

/// What the walk leaves out, with why: not part of the model, and not to be served or
/// copied. `.git` anywhere (a base cloned with git, or a submodule); `.cache/huggingface`
/// at the top, where huggingface_hub keeps download metadata in a local directory.
fn skipped(rel: &Path) -> Option<&'static str> {
    if rel.file_name().is_some_and(|n| n == ".git") {
        Some("git metadata")
    } else if rel == Path::new(".cache/huggingface") {
        Some("huggingface_hub download metadata")
    } else {
        None
    }
}

/// One regular file of the base directory.
#[derive(Debug)]
pub struct BaseFile {
    /// Path relative to the base directory.
    pub rel: PathBuf,
    /// Full path (symlinks, as in a Hugging Face cache snapshot, are followed when read).
    pub path: PathBuf,
    pub size: u64,
    /// The file's identity when the walk found it, before anything was read from it.
    pub identity: Identity,
    /// Index into [`BaseModel::layouts`] for `*.safetensors` files.
    pub layout: Option<usize>,
}

#[derive(Debug)]
pub struct BaseModel {
    pub dir: PathBuf,
    /// Regular files, sorted by relative path.
    pub files: Vec<BaseFile>,
    /// Subdirectories (relative paths), sorted, parents before children.
    pub dirs: Vec<PathBuf>,
    pub layouts: Vec<Layout>,
    /// Tensor name → (layout index, tensor index).
    pub tensors: HashMap<String, (usize, usize)>,
    /// `config.json`, if present.
    pub config: Option<Value>,
    /// The bitsandbytes quantization of a QLoRA base (`quantization_config`).
    pub quant: Option<crate::quant::Quantization>,
}

impl BaseModel {
    pub fn open(dir: &Path) -> Result<BaseModel> {
        let (mut files, dirs) = walk(dir)?;
        let layouts = open_layouts(dir, &mut files)?;
        let tensors = tensor_locations(&files, &layouts)?;
        let config_path = dir.join("config.json");
        let config = if config_path.exists() {
            Some(crate::error::read_json(&config_path)?)
        } else {
            None
        };
        let quant = crate::quant::scan(dir, config.as_ref(), &layouts, &tensors)?;
        Ok(BaseModel {
            dir: dir.to_path_buf(),
            files,
            dirs,
            layouts,
            tensors,
            config,
            quant,
        })
    }

    /// Number of values in all the base tensors (a quantized weight's logical count, its
    /// quantization state left out).
    pub fn num_params(&self) -> usize {
        let dropped =
            |loc: &(usize, usize)| self.quant.as_ref().is_some_and(|q| q.dropped.contains(loc));
        self.tensors
            .values()
            .filter(|loc| !dropped(loc))
            .map(|&loc| match self.quantized(loc) {
                Some(q) => q.numel(),
                None => self.layouts[loc.0].tensors[loc.1].numel(),
            })
            .fold(0, usize::saturating_add)
    }

    /// The quantized weight at `loc`, if it is one.
    pub fn quantized(&self, loc: (usize, usize)) -> Option<&crate::quant::QuantTensor> {
        self.quant.as_ref()?.tensors.get(&loc)
    }

    /// The shape the model gives tensor `loc`: a quantized weight's logical shape.
    pub fn shape(&self, loc: (usize, usize)) -> &[usize] {
        match self.quantized(loc) {
            Some(q) => &q.shape,
            None => &self.layouts[loc.0].tensors[loc.1].shape,
        }
    }

    /// `model_type` from `config.json`.
    pub fn model_type(&self) -> Option<&str> {
        self.config.as_ref()?.get("model_type")?.as_str()
    }
}

fn read_weight_map(path: &Path) -> Result<HashMap<String, String>> {
    let index: Value = crate::error::read_json(path)?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::config(path, "no \"weight_map\" object"))?;
    map.iter()
        .map(|(k, v)| match v.as_str() {
            Some(file) => Ok((k.clone(), shard_name(path, k, file)?)),
            None => Err(Error::config(
                path,
                format!("weight_map[{k:?}] is not a file name"),
            )),
        })
        .collect()
}

/// A shard name of the index as a path relative to the model directory: `./` dropped (as
/// transformers, which joins it to the directory), `..` and absolute paths refused.
fn shard_name(index: &Path, tensor: &str, file: &str) -> Result<String> {
    let mut rel = PathBuf::new();
    for part in Path::new(file).components() {
        match part {
            Component::Normal(name) => rel.push(name),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(Error::config(
                    index,
                    format!(
                        "weight_map[{tensor:?}] = {file:?} is outside the model directory; \
                         shard names are relative paths inside it"
                    ),
                ))
            }
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(Error::config(
            index,
            format!("weight_map[{tensor:?}] = {file:?} is not a file name"),
        ));
    }
    Ok(rel.to_string_lossy().into_owned())
}

/// The files and directories of the base directory `dir`, sorted by relative path.
fn walk(dir: &Path) -> Result<(Vec<BaseFile>, Vec<PathBuf>)> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::other("base model path is not a directory"),
        ));
    }
    let mut walk = Walk {
        root: dir,
        files: Vec::new(),
        dirs: Vec::new(),
        seen: HashMap::from([((meta.dev(), meta.ino()), PathBuf::new())]),
    };
    walk.dir(Path::new(""), 0)?;
    let Walk {
        mut files,
        mut dirs,
        ..
    } = walk;
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    dirs.sort();
    Ok((files, dirs))
}

/// The layout of each `*.safetensors` file of `files` (which record their index in the
/// result); a base without any is refused.
fn open_layouts(dir: &Path, files: &mut [BaseFile]) -> Result<Vec<Layout>> {
    let mut layouts = Vec::new();
    for file in files.iter_mut() {
        if file.rel.extension().is_some_and(|e| e == "safetensors") {
            file.layout = Some(layouts.len());
            layouts.push(Layout::open(&file.path)?);
        }
    }
    if !layouts.is_empty() {
        return Ok(layouts);
    }
    let pickles = (files.iter()).any(|f| f.rel.extension().is_some_and(|e| e == "bin"));
    let what = if pickles {
        "no *.safetensors weights (only pickle .bin files, which lorafs does not read); \
         convert the model with save_pretrained(safe_serialization=True)"
    } else {
        "no *.safetensors weights found"
    };
    Err(Error::config(dir, what))
}

/// Where each tensor is: (layout index, tensor index). With a shard index, the index decides
/// which file holds a tensor, and each tensor it lists must be there; without one, a tensor
/// in two files is refused.
fn tensor_locations(
    files: &[BaseFile],
    layouts: &[Layout],
) -> Result<HashMap<String, (usize, usize)>> {
    let index = (files.iter())
        .find(|f| f.rel == Path::new(INDEX_FILE))
        .map(|f| f.path.clone());
    let weight_map = match &index {
        Some(path) => Some(read_weight_map(path)?),
        None => None,
    };
    let mut tensors = HashMap::new();
    for (li, rel) in files.iter().filter_map(|f| Some((f.layout?, &f.rel))) {
        let layout = &layouts[li];
        for (ti, t) in layout.tensors.iter().enumerate() {
            if let Some(map) = &weight_map {
                if map.get(&t.name).map(Path::new) != Some(rel.as_path()) {
                    continue;
                }
            }
            if let Some(&(other, _)) = tensors.get(&t.name) {
                let other: &Layout = &layouts[other];
                return Err(Error::tensor(
                    &layout.path,
                    &t.name,
                    format!(
                        "also present in {}; add a model.safetensors.index.json",
                        other.path.display()
                    ),
                ));
            }
            tensors.insert(t.name.clone(), (li, ti));
        }
    }
    if let (Some(path), Some(map)) = (&index, &weight_map) {
        for (name, file) in map {
            if !tensors.contains_key(name) {
                return Err(Error::tensor(
                    path,
                    name,
                    format!("listed in the index but not found in {file}"),
                ));
            }
        }
    }
    Ok(tensors)
}

/// The walk of the base directory: what it found so far, and every directory it entered.
struct Walk<'a> {
    root: &'a Path,
    files: Vec<BaseFile>,
    dirs: Vec<PathBuf>,
    /// (device, inode) of each directory entered → its relative path. Symbolic links are
    /// followed, so without this a link to `.` or to an ancestor, or a few links to the same
    /// directory at each level, would make the walk exponential in time and memory.
    seen: HashMap<(u64, u64), PathBuf>,
}

impl Walk<'_> {
    fn dir(&mut self, rel: &Path, depth: usize) -> Result<()> {
        let dir = self.root.join(rel);
        if depth > MAX_DEPTH {
            return Err(Error::io(
                &dir,
                std::io::Error::other("directory nesting too deep (symlink loop?)"),
            ));
        }
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let path = entry.path();
            let rel = rel.join(entry.file_name());
            if let Some(why) = skipped(&rel) {
                log::debug!("skipping {} ({why}): not part of the model", path.display());
                continue;
            }
            // Follow symlinks: a Hugging Face cache snapshot is a directory of links to blobs.
            let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
            if meta.is_dir() {
                if let Some(first) = self.seen.insert((meta.dev(), meta.ino()), rel.clone()) {
                    let what = format!(
                        "is the directory {}/{} again (through a symbolic link); \
                         a model directory must be a tree, each directory reached once",
                        self.root.display(),
                        first.display()
                    );
                    return Err(Error::io(&path, std::io::Error::other(what)));
                }
                let (before_files, before_dirs) = (self.files.len(), self.dirs.len());
                self.dirs.push(rel.clone());
                self.dir(&rel, depth + 1)?;
                // A `.cache` that held only huggingface_hub's metadata is not listed either.
                let empty = self.files.len() == before_files && self.dirs.len() == before_dirs + 1;
                if empty && rel == Path::new(".cache") {
                    self.dirs.pop();
                }
            } else if meta.is_file() {
                refuse_kernel_files(&path)?;
                self.files.push(BaseFile {
                    rel,
                    path,
                    size: meta.len(),
                    identity: Identity::of(&meta),
                    layout: None,
                });
            }
        }
        Ok(())
    }
}

/// Files of the kernel's pseudo filesystems (`/proc`, `/sys`, ...) look like regular files
/// but are not data: `/proc/kcore` claims the size of the address space, others change at
/// each read or read kernel state. A model links to none of them; a base that does is refused.
fn refuse_kernel_files(path: &Path) -> Result<()> {
    const KERNEL_FILESYSTEMS: [libc::c_long; 5] = [
        libc::PROC_SUPER_MAGIC,
        libc::SYSFS_MAGIC,
        libc::DEBUGFS_MAGIC,
        libc::SECURITYFS_MAGIC,
        libc::TRACEFS_MAGIC,
    ];
    let stat = rustix::fs::statfs(path).map_err(|e| Error::io(path, e.into()))?;
    if KERNEL_FILESYSTEMS.contains(&(stat.f_type as libc::c_long)) {
        return Err(Error::io(
            path,
            std::io::Error::other(
                "is a file of a kernel pseudo filesystem (/proc, /sys), not model data; \
                 remove that link from the base directory",
            ),
        ));
    }
    Ok(())
}
