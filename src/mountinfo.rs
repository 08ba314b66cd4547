//! Mounts as the kernel lists them in `/proc/self/mountinfo`: found by path without ever
//! stat'ing the mount point (with a dead or stuck server that fails or hangs), and told apart
//! as lorafs mounts. Used by mounting and unmounting, and by the view control, which names
//! its socket after a mount's device number and trusts the user in its `user_id=`.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Our mounts show as source `lorafs:BASE` (and type `fuse.lorafs` where a mount helper
/// applies the subtype; a direct mount by root shows type `fuse`).
pub const FS_NAME: &str = "lorafs";

/// A line of `/proc/self/mountinfo` (see proc_pid_mountinfo(5)).
#[derive(Debug, Clone)]
pub struct MountInfo {
    /// `MAJ:MIN` of the mount's device (field 3); for FUSE, an anonymous device number that
    /// stays the mount's own while it is mounted.
    pub device: String,
    pub fstype: String,
    /// The mount source (after the `-`), unescaped.
    pub source: Vec<u8>,
    /// The per-superblock options (last field), e.g. `rw,user_id=1000,group_id=1000`.
    pub super_options: String,
}

impl MountInfo {
    pub fn is_lorafs(&self) -> bool {
        self.fstype == format!("fuse.{FS_NAME}")
            || (self.fstype.starts_with("fuse")
                && self.source.starts_with(format!("{FS_NAME}:").as_bytes()))
    }

    /// The user who mounted a FUSE mount: the kernel records its `user_id=` (the real uid of
    /// the mounting process, also through fusermount3) and shows it as a super option.
    pub fn user_id(&self) -> Option<u32> {
        self.super_options
            .split(',')
            .find_map(|option| option.strip_prefix("user_id="))
            .and_then(|uid| uid.parse().ok())
    }

    /// The mount listed on `line` whose mount point is `path`, if it is.
    fn parse_at(line: &str, path: &Path) -> Option<MountInfo> {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|&f| f == "-")?;
        if unescape(fields.get(4)?) != path.as_os_str().as_bytes() {
            return None;
        }
        Some(MountInfo {
            device: fields.get(2)?.to_string(),
            fstype: fields.get(sep + 1)?.to_string(),
            source: unescape(fields.get(sep + 2)?),
            super_options: fields.get(sep + 3).unwrap_or(&"").to_string(),
        })
    }
}

/// The mount at exactly `path` (as mountinfo spells it: absolute, links resolved), the top
/// one where several are stacked.
pub fn find_mount(path: &Path) -> io::Result<Option<MountInfo>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(find_in(&text, path))
}

fn find_in(mountinfo: &str, path: &Path) -> Option<MountInfo> {
    // Later lines are mounted later: the last match is the one on top.
    mountinfo
        .lines()
        .rev()
        .find_map(|line| MountInfo::parse_at(line, path))
}

/// The path mountinfo lists for `path`: its parent resolved, then its last name, following
/// the last name too where it is a symbolic link. A mount point is never stat'ed (with a
/// dead or stuck server that fails or hangs): mountinfo is asked first.
pub fn mount_target(path: &Path) -> io::Result<PathBuf> {
    let mut path = std::path::absolute(path)?;
    // Symbolic links are followed at most as often as the kernel would (ELOOP beyond).
    for _ in 0..40 {
        let Some(name) = path.file_name().map(|n| n.to_os_string()) else {
            // Ends in `..` (or is `/`): it names a directory above any mount point in it.
            return path.canonicalize();
        };
        let parent = path.parent().unwrap_or(Path::new("/"));
        let parent = parent
            .canonicalize()
            .unwrap_or_else(|_| parent.to_path_buf());
        let joined = parent.join(&name);
        if find_mount(&joined)?.is_some() {
            return Ok(joined);
        }
        match std::fs::symlink_metadata(&joined) {
            Ok(meta) if meta.file_type().is_symlink() => {
                path = parent.join(std::fs::read_link(&joined)?);
            }
            _ => return Ok(joined),
        }
    }
    Err(io::Error::from_raw_os_error(libc::ELOOP))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn only_lorafs_mounts_are_lorafs() {
        let info = |fstype: &str, source: &str| MountInfo {
            device: "0:1".into(),
            fstype: fstype.into(),
            source: source.as_bytes().to_vec(),
            super_options: String::new(),
        };
        assert!(info("fuse.lorafs", "anything").is_lorafs());
        assert!(info("fuse", "lorafs:/models/base").is_lorafs());
        assert!(!info("fuse", "lorafsx").is_lorafs());
        assert!(!info("fuse.sshfs", "lorafs-host:/x").is_lorafs());
        assert!(!info("ext4", "lorafs:/x").is_lorafs());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/mnt/a\040b"), b"/mnt/a b");
        assert_eq!(unescape(r"/x\\y"), br"/x\\y".to_vec());
        assert_eq!(OsStr::from_bytes(&unescape("/plain")), "/plain");
    }

    #[test]
    fn a_line_gives_device_source_and_mounting_user() {
        let text = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
97 22 0:53 / /mnt/a\\040b ro,nosuid,nodev shared:50 - fuse.lorafs lorafs:/m/base \
ro,user_id=1000,group_id=1000,default_permissions
98 22 0:54 / /mnt/a\\040b ro - fuse lorafs:/m/other ro,user_id=0,group_id=0
";
        let top = find_in(text, Path::new("/mnt/a b")).unwrap();
        assert_eq!(top.device, "0:54", "the mount stacked last is the one seen");
        assert_eq!(top.user_id(), Some(0));
        assert!(top.is_lorafs());
        let before_stacking: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
        let first = find_in(&before_stacking, Path::new("/mnt/a b")).unwrap();
        assert_eq!(first.device, "0:53");
        assert_eq!(first.source, b"lorafs:/m/base");
        assert_eq!(first.user_id(), Some(1000));
        let root = find_in(text, Path::new("/")).unwrap();
        assert_eq!((root.device.as_str(), root.user_id()), ("8:1", None));
        assert!(find_in(text, Path::new("/mnt")).is_none());
    }
}
