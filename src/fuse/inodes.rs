//! The inode table: the merged tree's directories and files, numbered once at mount time,
//! each served with the permissions and owner of its source, less the classes of users the
//! directories around the source keep out, so that the mount (with `default_permissions`,
//! the kernel enforcing them) never lets anyone read more than the source lets them.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use super::access::{Ancestors, Owner, Perms};
use super::acl;
use super::MountNode;
use crate::baseio::Identity;
use crate::tree::{Kind, Node};
use crate::view::{View, VirtualFile};

/// Reported as `st_blksize`: programs such as `cat` size their reads by it, and larger reads
/// mean fewer round trips through the kernel (FUSE caps one read at 1 MiB anyway).
const BLKSIZE: u32 = 1 << 20;

/// The permission bits a node keeps from its source: read and execute. Write bits go (the
/// mount is read-only; a write bit would only make tools try), and so do set-id and sticky
/// bits (the mount is `nosuid`, and nothing can be created in it).
const KEPT_BITS: u32 = 0o555;

/// Every node of `view`'s tree, numbered from `first` (the root, the base directory) on:
/// `view` takes [`count`] numbers. Each takes the mode, owner and modification time of its
/// source, following symlinks (a Hugging Face snapshot is links into `blobs/`: the blob's
/// mode counts): the base directory, a base subdirectory, or the file behind it (a base
/// file, the adapter's file that replaces it, or the base file lorafs rewrites); its mode
/// keeps a class's bits only if every user of that class has them under the source's ACL
/// (see [`acl`]), may reach the source through the directories around it (see
/// [`access`](super::access)) and, for a merged file, may read every adapter file. Fails,
/// naming the path, when a source or a directory above it cannot be stat'ed: serving it
/// with guessed permissions could widen access.
pub(super) fn build(view: &Arc<View>, first: u64) -> io::Result<Vec<(u64, MountNode)>> {
    let mut attrs = Attrs::default();
    let dir_node = |parent: u64, attr: FileAttr| Node {
        parent,
        kind: Kind::Dir {
            children: BTreeMap::new(),
        },
        attr,
    };
    let root = dir_node(first, attrs.dir(first, None, view.base_dir())?);
    let mut nodes = vec![(first, root)];
    let mut dir_ino: HashMap<&Path, u64> = HashMap::from([(Path::new(""), first)]);
    for dir in view.dirs() {
        let ino = first + nodes.len() as u64;
        let parent = parent_ino(&dir_ino, dir)?;
        let attr = attrs.dir(ino, Some(parent), &view.base_dir().join(dir))?;
        nodes.push((ino, dir_node(parent, attr)));
        link(
            &mut nodes,
            first,
            parent,
            dir.file_name().unwrap_or_default(),
            ino,
        );
        dir_ino.insert(dir, ino);
    }
    for (index, file) in view.files.iter().enumerate() {
        let ino = first + nodes.len() as u64;
        let parent = parent_ino(&dir_ino, &file.rel)?;
        let attr = attrs.file(ino, parent, file, view)?;
        let kind = Kind::File {
            view: view.clone(),
            file: index,
        };
        nodes.push((ino, Node { parent, kind, attr }));
        link(
            &mut nodes,
            first,
            parent,
            file.rel.file_name().unwrap_or_default(),
            ino,
        );
    }
    Ok(nodes)
}

/// The inode of file `index` of `view`, whose root is inode `root`: [`build`] numbers the
/// root, the directories, then the files in order.
pub(super) fn file_ino(view: &View, root: u64, index: usize) -> u64 {
    root + 1 + view.dirs().len() as u64 + index as u64
}

/// The number of nodes [`build`] makes for `view`.
pub(super) fn count(view: &View) -> usize {
    1 + view.dirs().len() + view.files.len()
}

/// Builds the nodes' attributes, remembering where each directory node's source really is.
#[derive(Default)]
struct Attrs {
    ancestors: Ancestors,
    /// The canonical path of each directory node's source, by inode.
    dirs: HashMap<u64, PathBuf>,
}

impl Attrs {
    /// The attributes of directory node `ino` (in `parent`, None for the root) whose source
    /// is `path`.
    fn dir(&mut self, ino: u64, parent: Option<u64>, path: &Path) -> io::Result<FileAttr> {
        let identity = Identity::of_path(path).map_err(|e| {
            io::Error::other(format!("cannot read its permissions to serve them: {e}"))
        })?;
        let canon = canonical(path, &identity)?;
        let attr = self.masked(ino, FileType::Directory, 0, &identity, &canon, parent)?;
        self.dirs.insert(ino, canon);
        Ok(attr)
    }

    /// The attributes of file node `ino` in `parent` serving `file` of `view`: its
    /// source's identity is the one the view recorded before reading it, so bytes and
    /// permissions belong to one version. A file with bytes from the adapters (merged or
    /// replaced tensors) keeps only the classes that may read every adapter file: through
    /// it, and the base file, they would otherwise learn the adapter's weights.
    fn file(
        &mut self,
        ino: u64,
        parent: u64,
        file: &VirtualFile,
        view: &View,
    ) -> io::Result<FileAttr> {
        let identity = file.source();
        let canon = canonical(file.source_path(), &identity)?;
        let kind = FileType::RegularFile;
        let mut attr = self.masked(ino, kind, file.size, &identity, &canon, Some(parent))?;
        let owner = owner(&identity);
        let covered = self.dirs.get(&parent);
        for input in view.other_sources(file) {
            let identity = input.identity();
            let canon = canonical(&input.path, &identity)?;
            let source = perms(&identity, &canon)?;
            let mask =
                self.ancestors
                    .readable(&owner, &source, &canon, covered.map(PathBuf::as_path))?;
            attr.perm &= mask as u16;
        }
        Ok(attr)
    }

    /// The attributes of a node whose source had `identity` and is at `canon`, its mode
    /// masked by the directories above `canon` that the served directory `parent` does not
    /// cover. The kernel checks `parent`'s own mode on the way to the node, and `parent`'s
    /// mask covers the directories above its source, so only the rest count: those of a
    /// symlink's target elsewhere, or all of them for the root.
    fn masked(
        &mut self,
        ino: u64,
        kind: FileType,
        size: u64,
        identity: &Identity,
        canon: &Path,
        parent: Option<u64>,
    ) -> io::Result<FileAttr> {
        let covered = parent.and_then(|parent| self.dirs.get(&parent));
        let mask = self
            .ancestors
            .mask(&owner(identity), canon, covered.map(PathBuf::as_path))?;
        let mode = acl::effective_mode(canon, identity.mode)?;
        let mut attr = attr(ino, kind, size, identity);
        attr.perm &= (mode & mask) as u16;
        Ok(attr)
    }
}

fn owner(identity: &Identity) -> Owner {
    Owner {
        uid: identity.uid,
        gid: identity.gid,
    }
}

/// What the permission check of the source stat'ed as `identity`, at canonical path
/// `canon`, looks at: its owner, and its mode reduced by its ACL (see [`acl`]).
fn perms(identity: &Identity, canon: &Path) -> io::Result<Perms> {
    Ok(Perms {
        uid: identity.uid,
        gid: identity.gid,
        mode: acl::effective_mode(canon, identity.mode)?,
    })
}

/// `path` with every symlink resolved: where the directories that decide who reaches it
/// are. Fails if it is no longer the source stat'ed as `identity` (replaced meanwhile).
fn canonical(path: &Path, identity: &Identity) -> io::Result<PathBuf> {
    let failed = |e: io::Error| {
        io::Error::other(format!(
            "{}: cannot resolve its path to check the directories above it: {e}",
            path.display()
        ))
    };
    let canon = std::fs::canonicalize(path).map_err(failed)?;
    let meta = std::fs::metadata(&canon).map_err(failed)?;
    if (meta.dev(), meta.ino()) != (identity.dev, identity.ino) {
        return Err(io::Error::other(format!(
            "{}: replaced while mounting (now {}); mount again",
            path.display(),
            canon.display()
        )));
    }
    Ok(canon)
}

/// The inode of the directory holding `rel`; the view lists parents before children.
fn parent_ino(dir_ino: &HashMap<&Path, u64>, rel: &Path) -> io::Result<u64> {
    let parent = rel.parent().unwrap_or(Path::new(""));
    dir_ino.get(parent).copied().ok_or_else(|| {
        io::Error::other(format!(
            "{}: its directory is not in the tree (an view bug)",
            rel.display()
        ))
    })
}

fn link(nodes: &mut [(u64, MountNode)], first: u64, parent: u64, name: &OsStr, ino: u64) {
    if let Kind::Dir { children } = &mut nodes[(parent - first) as usize].1.kind {
        children.insert(name.to_os_string(), ino);
    }
}

/// The attributes of a node whose source had `identity` (a file's is the one the view
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

/// The attributes of the root of a mount of views: those of the base directory, whose
/// views it lists.
pub(super) fn base_dir_attr(base_dir: &Path) -> io::Result<FileAttr> {
    Attrs::default().dir(crate::tree::ROOT, None, base_dir)
}
