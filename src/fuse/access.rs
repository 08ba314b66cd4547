//! Who may reach a source through the directories around it.
//!
//! The kernel checks a served node's own mode and those of the served directories above it,
//! but on the source a reader also needs search (`x`) permission on every directory from `/`
//! down to the file: a 0644 file in a 0700 home is closed to others. So each node's served
//! mode keeps a class's bits only if every user of that class could search every such
//! directory the served tree does not already check. The owner and group of those
//! directories differ from the node's, so which of their classes a user falls in is not
//! known; the check is conservative: a class passes only if it passes in every case. The
//! same rules tell who may read another file (an adapter, whose weights a merged file
//! reveals).

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Whose a served node is: which users fall in each of its classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// What the kernel's permission check of a file or directory looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Perms {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits (0o777; others are ignored): each class's as every user of the class
    /// has them, so those an ACL refuses to some of its users are cleared (see `acl`).
    pub mode: u32,
}

/// The class whose bits the kernel checks for a user: the owner's, else the group's if the
/// user is in the group, else the others'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Owner,
    Group,
    Other,
}

const CLASSES: [Class; 3] = [Class::Owner, Class::Group, Class::Other];

impl Class {
    /// The class's three bits in a mode.
    fn shift(self) -> u32 {
        match self {
            Class::Owner => 6,
            Class::Group => 3,
            Class::Other => 0,
        }
    }

    fn bits(self, mode: u32) -> u32 {
        (mode >> self.shift()) & 0o7
    }
}

/// The classes of `dir` that a user of class `class` of `file` may be in. A user is in
/// `file`'s owner class iff their uid is `file.uid`, in its group class iff not and they are
/// in group `file.gid`; any other membership is unknown.
fn possible_classes(file: &Owner, class: Class, dir: &Perms) -> Vec<Class> {
    let same_owner = dir.uid == file.uid;
    let same_group = dir.gid == file.gid;
    let mut classes = Vec::with_capacity(3);
    match class {
        // The user is file.uid: dir's owner exactly when dir.uid is file.uid too; otherwise
        // they may or may not be in dir's group (the owner of a file need not be in its group).
        Class::Owner if same_owner => classes.push(Class::Owner),
        Class::Owner => classes.extend([Class::Group, Class::Other]),
        // Not file.uid: possibly dir's owner, unless dir.uid is file.uid.
        Class::Group | Class::Other => {
            if !same_owner {
                classes.push(Class::Owner);
            }
            match (class, same_group) {
                (Class::Group, true) => classes.push(Class::Group),
                (Class::Other, true) => classes.push(Class::Other),
                _ => classes.extend([Class::Group, Class::Other]),
            }
        }
    }
    classes
}

/// What a reader needs on a file or directory of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Right {
    Read,
    Search,
}

impl Right {
    /// The right's bit, in a class's three bits.
    fn bit(self) -> u32 {
        match self {
            Right::Read => 0o4,
            Right::Search => 0o1,
        }
    }
}

/// The bits of `file`'s mode (0o700, 0o070, 0o007, or'ed) of the classes all of whose users
/// have `right` on `other`.
pub(super) fn granted_classes(file: &Owner, other: &Perms, right: Right) -> u32 {
    CLASSES
        .iter()
        .filter(|&&class| {
            possible_classes(file, class, other)
                .iter()
                .all(|other_class| other_class.bits(other.mode) & right.bit() != 0)
        })
        .fold(0, |mask, class| mask | 0o7 << class.shift())
}

/// The bits of `file`'s mode of the classes all of whose users may search every directory
/// of `dirs`.
pub(super) fn reachable_classes(file: &Owner, dirs: &[Perms]) -> u32 {
    dirs.iter().fold(0o777, |mask, dir| {
        mask & granted_classes(file, dir, Right::Search)
    })
}

/// The permissions of the directories around sources, each read once (a model's files share
/// a few directories).
#[derive(Default)]
pub(super) struct Ancestors {
    dirs: HashMap<PathBuf, Perms>,
}

impl Ancestors {
    /// The mask (see [`reachable_classes`]) of a source of owner `file` at canonical path
    /// `canon`, over the directories above it, except `covered` and the directories above
    /// it: the canonical path of the served directory holding the node, whose own served
    /// mode the kernel checks, and whose mask covers the directories above it (None for the
    /// mount root).
    pub fn mask(&mut self, file: &Owner, canon: &Path, covered: Option<&Path>) -> io::Result<u32> {
        let mut dirs = Vec::new();
        for dir in canon.ancestors().skip(1) {
            if covered.is_some_and(|covered| covered.starts_with(dir)) {
                break;
            }
            dirs.push(self.perms(dir)?);
        }
        Ok(reachable_classes(file, &dirs))
    }

    /// The mask of a served node of owner `file` whose bytes come from `input` too, at
    /// canonical path `canon` (a merged file's adapter): the classes all of whose users may
    /// reach and read `input`, over the directories not `covered` (as for [`Self::mask`]).
    pub fn readable(
        &mut self,
        file: &Owner,
        input: &Perms,
        canon: &Path,
        covered: Option<&Path>,
    ) -> io::Result<u32> {
        let reach = self.mask(file, canon, covered)?;
        Ok(reach & granted_classes(file, input, Right::Read))
    }

    fn perms(&mut self, dir: &Path) -> io::Result<Perms> {
        if let Some(perms) = self.dirs.get(dir) {
            return Ok(*perms);
        }
        let meta = std::fs::metadata(dir).map_err(|e| {
            io::Error::other(format!(
                "{}: cannot read its permissions, which decide who may reach the files below \
                 it: {e}",
                dir.display()
            ))
        })?;
        let perms = Perms {
            uid: meta.uid(),
            gid: meta.gid(),
            mode: super::acl::effective_mode(dir, meta.mode())?,
        };
        self.dirs.insert(dir.to_path_buf(), perms);
        Ok(perms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: u32 = 1000;
    const BOB: u32 = 1001;
    const STAFF: u32 = 50;
    const USERS: u32 = 100;

    fn p(uid: u32, gid: u32, mode: u32) -> Perms {
        Perms { uid, gid, mode }
    }

    /// The served file of most tests.
    const FILE: Owner = Owner {
        uid: ALICE,
        gid: STAFF,
    };

    const ALL: u32 = 0o777;
    const OWNER: u32 = 0o700;
    const GROUP: u32 = 0o070;
    const OTHER: u32 = 0o007;

    #[test]
    fn no_directory_to_pass_keeps_every_class() {
        assert_eq!(reachable_classes(&FILE, &[]), ALL);
    }

    #[test]
    fn open_directories_keep_every_class() {
        let dirs = [p(0, 0, 0o755), p(BOB, USERS, 0o711)];
        assert_eq!(reachable_classes(&FILE, &dirs), ALL);
    }

    #[test]
    fn a_0700_home_of_the_files_owner_lets_only_the_owner_through() {
        let dirs = [p(0, 0, 0o755), p(ALICE, ALICE, 0o700)];
        assert_eq!(reachable_classes(&FILE, &dirs), OWNER);
    }

    #[test]
    fn a_0700_directory_of_another_owner_closes_every_class() {
        // /root holding alice's file: alice is not root, and 0700 gives no one else x.
        let dirs = [p(0, 0, 0o755), p(0, 0, 0o700)];
        assert_eq!(reachable_classes(&FILE, &dirs), 0);
    }

    #[test]
    fn a_0750_home_with_the_files_group_lets_the_group_through() {
        let dirs = [p(ALICE, STAFF, 0o750)];
        assert_eq!(reachable_classes(&FILE, &dirs), OWNER | GROUP);
    }

    #[test]
    fn a_0750_directory_of_another_group_closes_the_group_class() {
        // A member of the file's group (staff) need not be in the directory's (users).
        let dirs = [p(ALICE, USERS, 0o750)];
        assert_eq!(reachable_classes(&FILE, &dirs), OWNER);
    }

    #[test]
    fn a_0711_home_lets_everyone_through() {
        let dirs = [p(ALICE, ALICE, 0o711)];
        assert_eq!(reachable_classes(&FILE, &dirs), ALL);
    }

    #[test]
    fn a_directory_of_another_owner_must_let_its_group_and_others_through_for_the_owner() {
        // Bob's 0705 directory: alice, the file's owner, may be in bob's group (no x).
        let dirs = [p(BOB, USERS, 0o705)];
        assert_eq!(reachable_classes(&FILE, &dirs), 0);
        // 0750: alice may be outside bob's group; members of staff may be bob himself.
        let dirs = [p(BOB, STAFF, 0o750)];
        assert_eq!(reachable_classes(&FILE, &dirs), GROUP);
        // 0705 with the file's group: others are not in staff and o+x lets them through (or
        // they are bob); alice and the members of staff may be in staff, which has no x.
        let dirs = [p(BOB, STAFF, 0o705)];
        assert_eq!(reachable_classes(&FILE, &dirs), OTHER);
    }

    #[test]
    fn a_directory_owned_by_the_files_owner_tests_the_others_by_group() {
        // Alice's 0701 directory of group staff: no one but alice is its owner; members of
        // staff get the group's bits (none), the rest the others' (x).
        let dirs = [p(ALICE, STAFF, 0o701)];
        assert_eq!(reachable_classes(&FILE, &dirs), OWNER | OTHER);
        // 0770 of group users: others may or may not be in users: both must give x.
        let dirs = [p(ALICE, USERS, 0o770)];
        assert_eq!(reachable_classes(&FILE, &dirs), OWNER);
    }

    #[test]
    fn every_directory_counts() {
        let dirs = [
            p(0, 0, 0o755),
            p(ALICE, STAFF, 0o750),
            p(ALICE, ALICE, 0o700),
        ];
        assert_eq!(reachable_classes(&FILE, &dirs), OWNER);
    }

    #[test]
    fn reading_another_file_takes_its_read_bit_for_every_possible_class() {
        let file = FILE;
        assert_eq!(
            granted_classes(&file, &p(ALICE, STAFF, 0o644), Right::Read),
            ALL
        );
        assert_eq!(
            granted_classes(&file, &p(ALICE, STAFF, 0o600), Right::Read),
            OWNER
        );
        assert_eq!(
            granted_classes(&file, &p(ALICE, STAFF, 0o640), Right::Read),
            OWNER | GROUP
        );
        // x is not r: a 0711 file is read by its owner only.
        assert_eq!(
            granted_classes(&file, &p(ALICE, STAFF, 0o711), Right::Read),
            OWNER
        );
        // Bob's 0644 file: alice may be in bob's group or not, others may be bob: all read.
        assert_eq!(
            granted_classes(&file, &p(BOB, USERS, 0o644), Right::Read),
            ALL
        );
        // Bob's 0600 file: no one but bob, who is in none of alice's file's classes for sure.
        assert_eq!(
            granted_classes(&file, &p(BOB, USERS, 0o600), Right::Read),
            0
        );
    }

    #[test]
    fn the_mask_skips_the_directories_the_served_tree_checks() {
        let tmp = tempfile::tempdir().unwrap();
        let inner = tmp.path().join("a/b");
        std::fs::create_dir_all(&inner).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let closed = std::fs::Permissions::from_mode(0o700);
        std::fs::set_permissions(tmp.path(), closed).unwrap();
        let owner = std::fs::metadata(tmp.path()).unwrap();
        let file = Owner {
            uid: owner.uid(),
            gid: owner.gid(),
        };
        let mut ancestors = Ancestors::default();
        // Of a file of the 0700 tempdir's owner, only the owner class passes.
        let target = inner.join("f");
        assert_eq!(ancestors.mask(&file, &target, None).unwrap(), OWNER);
        // Reached through the served tempdir, only a/ and a/b/ (0755) are left to check.
        assert_eq!(
            ancestors.mask(&file, &target, Some(tmp.path())).unwrap(),
            ALL
        );
        assert_eq!(ancestors.mask(&file, &target, Some(&inner)).unwrap(), ALL);
    }

    #[test]
    fn a_directory_that_cannot_be_read_fails_naming_it() {
        let missing = Path::new("/nonexistent-lorafs-dir/f");
        let err = Ancestors::default()
            .mask(&Owner { uid: 0, gid: 0 }, missing, None)
            .unwrap_err();
        assert!(
            err.to_string().starts_with("/nonexistent-lorafs-dir: "),
            "{err}"
        );
    }
}
