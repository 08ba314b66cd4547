//! The inode table: the merged tree's directories and files, numbered once at mount time,
//! each served with the permissions and owner of its source, so that the mount (with
//! `default_permissions`, the kernel enforcing them) never lets anyone read more than the
//! source lets them.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use crate::baseio::Identity;
use crate::engine::Engine;

/// Reported as `st_blksize`: programs such as `cat` size their reads by it, and larger reads
/// mean fewer round trips through the kernel (FUSE caps one read at 1 MiB anyway).
const BLKSIZE: u32 = 1 << 20;

/// The permission bits a node keeps from its source: read and execute. Write bits go (the
/// mount is read-only; a write bit would only make tools try), and so do set-id and sticky
/// bits (the mount is `nosuid`, and nothing can be created in it).
const KEPT_BITS: u32 = 0o555;

pub(super) enum NodeKind {
    Dir { children: BTreeMap<OsString, u64> },
    File { file: usize },
}

pub(super) struct Node {
    pub parent: u64,
    pub kind: NodeKind,
    pub attr: FileAttr,
}

/// Every node of `engine`'s tree; index = inode number - 1, the root (the base directory)
/// first. Each takes the mode, owner and modification time of its source, following
/// symlinks (a Hugging Face snapshot is links into `blobs/`: the blob's mode counts): the
/// base directory, a base subdirectory, or the file behind it (a base file, the adapter's
/// file that replaces it, or the base file lorafs rewrites). Fails, naming the path, when a
/// source cannot be stat'ed: serving it with guessed permissions could widen access.
pub(super) fn build(engine: &Engine) -> io::Result<Vec<Node>> {
    let dir_node = |ino: u64, parent: u64, path: &Path| -> io::Result<Node> {
        Ok(Node {
            parent,
            kind: NodeKind::Dir {
                children: BTreeMap::new(),
            },
            attr: source_attr(path, ino, FileType::Directory, 0)?,
        })
    };
    let mut nodes = vec![dir_node(1, 1, &engine.base_dir)?];
    let mut dir_ino: HashMap<&Path, u64> = HashMap::from([(Path::new(""), 1)]);
    for dir in &engine.dirs {
        let ino = nodes.len() as u64 + 1;
        let parent = parent_ino(&dir_ino, dir)?;
        nodes.push(dir_node(ino, parent, &engine.base_dir.join(dir))?);
        link(&mut nodes, parent, dir.file_name().unwrap_or_default(), ino);
        dir_ino.insert(dir, ino);
    }
    for (index, file) in engine.files.iter().enumerate() {
        let ino = nodes.len() as u64 + 1;
        let parent = parent_ino(&dir_ino, &file.rel)?;
        nodes.push(Node {
            parent,
            kind: NodeKind::File { file: index },
            attr: attr(ino, FileType::RegularFile, file.size, &file.source()),
        });
        link(
            &mut nodes,
            parent,
            file.rel.file_name().unwrap_or_default(),
            ino,
        );
    }
    Ok(nodes)
}

/// The inode of the directory holding `rel`; the engine lists parents before children.
fn parent_ino(dir_ino: &HashMap<&Path, u64>, rel: &Path) -> io::Result<u64> {
    let parent = rel.parent().unwrap_or(Path::new(""));
    dir_ino.get(parent).copied().ok_or_else(|| {
        io::Error::other(format!(
            "{}: its directory is not in the tree (an engine bug)",
            rel.display()
        ))
    })
}

fn link(nodes: &mut [Node], parent: u64, name: &OsStr, ino: u64) {
    if let NodeKind::Dir { children } = &mut nodes[parent as usize - 1].kind {
        children.insert(name.to_os_string(), ino);
    }
}

/// The attributes of a directory node whose source is `path` (followed if a symlink).
fn source_attr(path: &Path, ino: u64, kind: FileType, size: u64) -> io::Result<FileAttr> {
    let identity = Identity::of_path(path)
        .map_err(|e| io::Error::other(format!("cannot read its permissions to serve them: {e}")))?;
    Ok(attr(ino, kind, size, &identity))
}

/// The attributes of a node whose source had `identity` (a file's is the one the engine
/// recorded before reading it, so bytes and permissions belong to one version).
fn attr(ino: u64, kind: FileType, size: u64, source: &Identity) -> FileAttr {
    let (secs, nanos) = source.mtime;
    let time = if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos as u32)
    } else {
        UNIX_EPOCH
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind,
        perm: (source.mode & KEPT_BITS) as u16,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: source.uid,
        gid: source.gid,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}
