//! POSIX ACLs of the sources, reduced to mode bits.
//!
//! The mount serves mode bits only, and the kernel checks them alone. A source's ACL can
//! refuse a user that its mode bits let in (`setfacl -m u:nobody:- FILE` leaves the mode
//! 0644), so serving the mode would widen access. Each class's bits are therefore the
//! rights that every user of that class has under the ACL: granting more through an ACL
//! than the mode is not carried over (narrower), refusing more is (never wider).

use std::io;
use std::path::Path;

/// The extended attribute holding a file's access ACL (`system.posix_acl_access`), in the
/// kernel's format: a version, then entries of tag, permission bits and id.
const ACL_XATTR: &str = "system.posix_acl_access";
const ACL_VERSION: u32 = 2;
const ENTRY_BYTES: usize = 8;

// Entry tags, from the kernel's `include/uapi/linux/posix_acl.h`.
const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;

/// The largest extended attribute value Linux stores (`XATTR_SIZE_MAX`).
const XATTR_SIZE_MAX: usize = 64 << 10;

/// The permission bits (0o777) of the file at `path`, whose mode is `mode`, such that each
/// class's bits are granted to every user of that class, by its ACL if it has one.
pub(super) fn effective_mode(path: &Path, mode: u32) -> io::Result<u32> {
    let mut buf = vec![0; XATTR_SIZE_MAX];
    match rustix::fs::getxattr(path, ACL_XATTR, &mut buf[..]) {
        Ok(len) => Ok(lower_bound(mode, &buf[..len])),
        // No ACL beyond the mode, or a filesystem without ACLs.
        Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP) => Ok(mode & 0o777),
        Err(e) => Err(io::Error::other(format!(
            "{}: cannot read its ACL, which may refuse users its mode lets in: {e}",
            path.display()
        ))),
    }
}

/// The bits of `mode` that every user of each class has under the ACL `acl` (the xattr's
/// bytes), following the kernel's `posix_acl_permission`: the owner gets the owner entry; a
/// named user, their entry limited by the mask; a member of the owning or a named group,
/// the first of their groups' entries that grants, limited by the mask, and nothing if
/// none does; anyone else, the other entry. A member of the file's group may be a named
/// user; anyone else may be a named user or in any named group. An ACL this code cannot
/// read leaves the owner's bits only.
pub(super) fn lower_bound(mode: u32, acl: &[u8]) -> u32 {
    let mode = mode & 0o777;
    // The kernel consults the ACL only when the mode's group bits (the mask) are not empty.
    if mode & 0o070 == 0 {
        return mode;
    }
    let Some(entries) = parse(acl) else {
        return mode & 0o700;
    };
    let (mut users, mut groups, mut mask) = (0o7, 0o7, 0o7);
    let (mut group_obj, mut other) = ((mode >> 3) & 0o7, mode & 0o7);
    for (tag, perm) in entries {
        match tag {
            ACL_USER_OBJ => {}
            ACL_USER => users &= perm,
            ACL_GROUP_OBJ => group_obj = perm,
            ACL_GROUP => groups &= perm,
            ACL_MASK => mask = perm,
            ACL_OTHER => other = perm,
            _ => return mode & 0o700,
        }
    }
    let group = group_obj & users & mask;
    let others = other & (users & groups & mask);
    (mode & 0o700) | group << 3 | others
}

/// The (tag, permission bits) of each entry, or None if `acl` is not a version 2 ACL.
fn parse(acl: &[u8]) -> Option<Vec<(u16, u32)>> {
    let (version, entries) = acl.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*version) != ACL_VERSION || entries.len() % ENTRY_BYTES != 0 {
        return None;
    }
    let entry = |e: &[u8]| {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        (tag, u32::from(perm) & 0o7)
    };
    Some(entries.chunks_exact(ENTRY_BYTES).map(entry).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The xattr bytes of an ACL of `(tag, perm, id)` entries.
    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut bytes = ACL_VERSION.to_le_bytes().to_vec();
        for &(tag, perm, id) in entries {
            bytes.extend(tag.to_le_bytes());
            bytes.extend(perm.to_le_bytes());
            bytes.extend(id.to_le_bytes());
        }
        bytes
    }

    const ANY: u32 = u32::MAX;

    /// An ACL whose base entries match `mode`, plus `extra` entries and a mask of `mask`.
    fn extended(mode: u32, mask: u16, extra: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut entries = vec![
            (ACL_USER_OBJ, (mode >> 6) as u16 & 7, ANY),
            (ACL_GROUP_OBJ, (mode >> 3) as u16 & 7, ANY),
        ];
        entries.extend_from_slice(extra);
        entries.extend([(ACL_MASK, mask, ANY), (ACL_OTHER, mode as u16 & 7, ANY)]);
        acl(&entries)
    }

    #[test]
    fn a_named_user_refused_takes_the_rights_of_the_group_and_others() {
        // setfacl -m u:nobody:- on a 0644 file: nobody may be in the group or not.
        let bytes = extended(0o644, 4, &[(ACL_USER, 0, 65534)]);
        assert_eq!(lower_bound(0o100644, &bytes), 0o600);
    }

    #[test]
    fn a_named_group_refused_takes_the_rights_of_others() {
        // Members of the file's group get the group entry whatever their other groups.
        let bytes = extended(0o755, 5, &[(ACL_GROUP, 0, 1234)]);
        assert_eq!(lower_bound(0o755, &bytes), 0o750);
    }

    #[test]
    fn the_mask_limits_named_entries_and_the_owning_group() {
        // 0750 with a mask of r--: the group entry r-x is cut to r--.
        let bytes = extended(0o750, 4, &[(ACL_USER, 7, 1000)]);
        assert_eq!(lower_bound(0o740, &bytes), 0o740);
    }

    #[test]
    fn an_acl_that_grants_more_than_the_mode_is_not_carried_over() {
        // u:alice:r-x on a 0700 directory (mask r-x shows as the group bits): others and
        // the group still get nothing.
        let bytes = acl(&[
            (ACL_USER_OBJ, 7, ANY),
            (ACL_USER, 5, 1000),
            (ACL_GROUP_OBJ, 0, ANY),
            (ACL_MASK, 5, ANY),
            (ACL_OTHER, 0, ANY),
        ]);
        assert_eq!(lower_bound(0o750, &bytes), 0o700);
    }

    #[test]
    fn a_minimal_acl_is_the_mode() {
        let bytes = acl(&[
            (ACL_USER_OBJ, 6, ANY),
            (ACL_GROUP_OBJ, 4, ANY),
            (ACL_OTHER, 4, ANY),
        ]);
        assert_eq!(lower_bound(0o644, &bytes), 0o644);
    }

    #[test]
    fn an_empty_mask_leaves_the_acl_unused_as_the_kernel_does() {
        let bytes = extended(0o604, 0, &[(ACL_USER, 0, 65534)]);
        assert_eq!(lower_bound(0o604, &bytes), 0o604);
    }

    #[test]
    fn an_unreadable_acl_keeps_the_owner_only() {
        assert_eq!(lower_bound(0o755, b"\x01\0\0\0"), 0o700, "another version");
        assert_eq!(lower_bound(0o755, b"\x02\0\0\0\x01"), 0o700, "a cut entry");
        assert_eq!(lower_bound(0o755, b"\x02\0"), 0o700, "a cut header");
        let bytes = extended(0o755, 5, &[(0x40, 7, 1)]);
        assert_eq!(lower_bound(0o755, &bytes), 0o700, "an unknown tag");
    }

    #[test]
    fn a_file_without_an_acl_keeps_its_mode() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(effective_mode(tmp.path(), 0o40755).unwrap(), 0o755);
        let err = effective_mode(&tmp.path().join("missing"), 0o644).unwrap_err();
        assert!(
            err.to_string().contains("missing: cannot read its ACL"),
            "{err}"
        );
    }
}
