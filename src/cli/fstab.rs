//! `mount.lorafs`: lorafs as mount(8)'s helper for `-t lorafs`, and so for /etc/fstab.
//!
//! mount(8) runs `/sbin/mount.lorafs SPEC DIR [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]`; SPEC is
//! the base. This module turns that call into the arguments of `lorafs mount SPEC DIR ...`
//! (the options mapped to flags), which then runs as usual: validated, served in the
//! background, returning once the mount is ready.

use std::ffi::{OsStr, OsString};

/// The file name that makes the binary mount(8)'s helper.
pub(crate) const HELPER_NAME: &str = "mount.lorafs";

/// Whether this process runs as `mount.lorafs` (argv[0], usually a link to lorafs).
pub(crate) fn invoked_as_helper(argv0: &OsStr) -> bool {
    std::path::Path::new(argv0).file_name() == Some(OsStr::new(HELPER_NAME))
}

/// mount(8)'s call, parsed.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct HelperCall {
    pub(crate) spec: OsString,
    pub(crate) dir: OsString,
    /// The `-o` option lists, in order (mount(8) passes one).
    pub(crate) options: Vec<String>,
    /// `-s`: skip options lorafs does not know instead of failing.
    pub(crate) sloppy: bool,
    /// `-f`: check everything, mount nothing.
    pub(crate) fake: bool,
    /// `-v`: say what runs.
    pub(crate) verbose: bool,
    /// `-N`: the mount namespace to mount in (a path, or a pid).
    pub(crate) namespace: Option<OsString>,
}

/// Parse mount(8)'s arguments to the helper (`argv` without argv[0]). `-n` (no mtab: lorafs
/// writes none) and `-t` (the type, lorafs) are accepted and ignored.
pub(crate) fn parse_helper_args(argv: &[OsString]) -> Result<HelperCall, String> {
    let mut call = HelperCall::default();
    let mut positional = Vec::new();
    let mut args = argv.iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        let Some(flags) = text.strip_prefix('-').filter(|f| !f.is_empty()) else {
            positional.push(arg.clone());
            continue;
        };
        // Flags may come together (`-sfv`); one that takes a value ends the group, its
        // value the rest of the group or the next argument (`-oro` or `-o ro`).
        for (at, flag) in flags.char_indices() {
            let mut value = || -> Result<OsString, String> {
                let rest = &flags[at + 1..];
                match rest.is_empty() {
                    false => Ok(rest.into()),
                    true => args.next().cloned().ok_or(format!("-{flag} needs a value")),
                }
            };
            match flag {
                's' => call.sloppy = true,
                'f' => call.fake = true,
                'v' => call.verbose = true,
                'n' => {}
                'o' => {
                    let options = value()?;
                    let options = options.to_str().ok_or("mount options are not UTF-8")?;
                    call.options.push(options.to_string());
                    break;
                }
                't' => {
                    value()?;
                    break;
                }
                'N' => {
                    call.namespace = Some(value()?);
                    break;
                }
                _ => return Err(format!("unknown flag -{flag} (usage: {USAGE})")),
            }
        }
    }
    match <[OsString; 2]>::try_from(positional) {
        Ok([spec, dir]) => {
            call.spec = spec;
            call.dir = dir;
            Ok(call)
        }
        Err(_) => Err(format!(
            "expected a base and a mount point (usage: {USAGE})"
        )),
    }
}

const USAGE: &str = "mount.lorafs BASE DIR [-sfnv] [-N NS] [-o OPTIONS]";

/// Split a mount option list on the commas outside double quotes, as libmount does, and
/// drop the quotes: `adapter=/a,view="mix=/a:0.5,/b"` is `adapter=/a` and `view=mix=/a:0.5,/b`.
pub(crate) fn split_options(list: &str) -> Result<Vec<String>, String> {
    let mut options = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in list.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => options.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    if quoted {
        return Err(format!("unbalanced double quote in mount options {list:?}"));
    }
    options.push(current);
    Ok(options.into_iter().filter(|o| !o.is_empty()).collect())
}

/// Options with a value, and the `lorafs mount` flag each one is.
const VALUED: &[(&str, &str)] = &[
    ("adapter", "--adapter"),
    ("view", "--view"),
    ("catalog", "--catalog"),
    ("views", "--views"),
    ("cache_size", "--cache-size"),
    ("base_read_ahead", "--base-read-ahead"),
    ("factor_cache", "--factor-cache"),
    ("dtype", "--dtype"),
    ("direct_io", "--direct-io"),
    ("warm", "--warm"),
    ("threads", "--threads"),
    ("read_ahead_kb", "--read-ahead-kb"),
    ("max_background", "--max-background"),
    ("transport", "--transport"),
    ("log_file", "--log-file"),
];

/// Options without a value, and their flag.
const FLAGS: &[(&str, &str)] = &[("allow_other", "--allow-other"), ("noexec", "--noexec")];

/// mount(8)'s generic options, which lorafs takes and ignores: the mount is read-only,
/// nodev and nosuid whatever they say, and `exec` is the default (`noexec` is a flag);
/// `noauto`, `nofail`, `_netdev`, `user`... are for mount(8) and systemd, which act on them
/// before the helper runs.
const IGNORED: &[&str] = &[
    "ro",
    "rw",
    "defaults",
    "auto",
    "noauto",
    "nofail",
    "_netdev",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "lazytime",
    "nolazytime",
    "diratime",
    "nodiratime",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "sync",
    "async",
    "dirsync",
    "mand",
    "nomand",
    "silent",
    "loud",
    "iversion",
    "noiversion",
    "symfollow",
    "nosymfollow",
];

/// Whether `option` (`key` or `key=value`) is one lorafs accepts and ignores: the generic
/// ones above, userspace options (`x-*`, `comment=*`, which mount(8) keeps for itself but
/// an fstab line read by something else may pass on).
fn ignored(option: &str) -> bool {
    IGNORED.contains(&option) || option.starts_with("x-") || option.starts_with("comment=")
}

/// The `lorafs mount` command line (argv[0] included) for mount(8)'s call: the options as
/// flags, then `--`, the base and the mount point. An unknown option fails naming it,
/// unless sloppy (`-s`).
pub(crate) fn mount_command_line(call: &HelperCall) -> Result<Vec<OsString>, String> {
    let mut flags: Vec<OsString> = Vec::new();
    for list in &call.options {
        for option in split_options(list)? {
            let (key, value) = match option.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (option.as_str(), None),
            };
            if let Some((_, flag)) = VALUED.iter().find(|(k, _)| *k == key) {
                let value = value
                    .filter(|v| !v.is_empty())
                    .ok_or(format!("mount option {key} needs a value ({key}=...)"))?;
                flags.extend([flag.into(), value.into()]);
            } else if let Some((_, flag)) = FLAGS.iter().find(|(k, _)| *k == key) {
                if value.is_some() {
                    return Err(format!("mount option {key} takes no value"));
                }
                flags.push(flag.into());
            } else if ignored(&option) {
                continue;
            } else if !call.sloppy {
                return Err(format!(
                    "unknown mount option {option:?} (see docs/DEPLOY.md; -s ignores it)"
                ));
            }
        }
    }
    let mut argv: Vec<OsString> = vec!["lorafs".into(), "mount".into()];
    argv.extend(flags);
    argv.extend(["--".into(), base_of_spec(&call.spec), call.dir.clone()]);
    Ok(argv)
}

/// The base a SPEC names: the SPEC, less a `lorafs:` prefix. With the prefix, an fstab line's
/// source is what the kernel shows for the mount (`lorafs:` and the base's canonical path),
/// so `mount -a` sees the line mounted already and leaves it, as for other file systems.
fn base_of_spec(spec: &OsStr) -> OsString {
    use std::os::unix::ffi::OsStrExt;
    let prefix = format!("{}:", lorafs::mountinfo::FS_NAME);
    match spec.as_bytes().strip_prefix(prefix.as_bytes()) {
        Some(base) => OsStr::from_bytes(base).to_owned(),
        None => spec.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn command_line(args: &[&str]) -> Result<Vec<String>, String> {
        let call = parse_helper_args(&os(args))?;
        let argv = mount_command_line(&call)?;
        Ok(argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect())
    }

    #[test]
    fn the_name_decides() {
        assert!(invoked_as_helper("/sbin/mount.lorafs".as_ref()));
        assert!(invoked_as_helper("mount.lorafs".as_ref()));
        assert!(!invoked_as_helper("/usr/bin/lorafs".as_ref()));
        assert!(!invoked_as_helper("/sbin/mount.lorafs.old".as_ref()));
    }

    #[test]
    fn mount8s_call_becomes_lorafs_mount() {
        let argv = command_line(&[
            "/models/base",
            "/mnt/m",
            "-n",
            "-o",
            "rw,adapter=/a,adapter=/b:0.5,cache_size=2GiB,nofail,_netdev,x-systemd.after=x",
            "-t",
            "lorafs",
        ])
        .unwrap();
        assert_eq!(
            argv.join(" "),
            "lorafs mount --adapter /a --adapter /b:0.5 --cache-size 2GiB -- /models/base /mnt/m"
        );
    }

    #[test]
    fn a_lorafs_prefix_on_the_base_is_dropped() {
        let argv = command_line(&["lorafs:/models/base", "/m", "-o", "adapter=/a"]).unwrap();
        assert_eq!(argv[2..].join(" "), "--adapter /a -- /models/base /m");
        let argv = command_line(&["org/lorafs:x", "/m"]).unwrap();
        assert_eq!(argv[2..].join(" "), "-- org/lorafs:x /m");
    }

    #[test]
    fn every_flag_is_mapped() {
        let argv = command_line(&[
            "b",
            "m",
            "-o",
            "catalog=/c,views=/v.toml,factor_cache=1GiB,dtype=bf16,direct_io=never,warm=always,threads=3,\
             allow_other,noexec,read_ahead_kb=0,max_background=32,transport=uring,base_read_ahead=8MiB,\
             log_file=/var/log/l,\
             view=v=/a",
        ])
        .unwrap();
        assert_eq!(
            argv[2..].join(" "),
            "--catalog /c --views /v.toml --factor-cache 1GiB --dtype bf16 --direct-io never --warm always \
             --threads 3 --allow-other --noexec --read-ahead-kb 0 --max-background 32 --transport uring \
             --base-read-ahead 8MiB --log-file /var/log/l --view v=/a -- b m"
        );
    }

    #[test]
    fn quoted_values_keep_their_commas() {
        assert_eq!(
            split_options(r#"ro,view="mix=/a:0.5,/b",view=one=/a,adapter="/x,y""#).unwrap(),
            ["ro", "view=mix=/a:0.5,/b", "view=one=/a", "adapter=/x,y"]
        );
        assert_eq!(split_options("a,,b,").unwrap(), ["a", "b"]);
        let err = split_options(r#"view="mix=/a,/b"#).unwrap_err();
        assert!(err.contains("unbalanced double quote"), "{err}");
    }

    #[test]
    fn generic_options_are_ignored() {
        let argv = command_line(&[
            "b",
            "m",
            "-o",
            "ro,exec,nosuid,nodev,user,noatime,defaults,comment=x,x-gvfs-hide,adapter=/a",
        ])
        .unwrap();
        assert_eq!(argv[2..].join(" "), "--adapter /a -- b m");
    }

    #[test]
    fn unknown_options_fail_naming_them_unless_sloppy() {
        let err = command_line(&["b", "m", "-o", "adapter=/a,cache=1G"]).unwrap_err();
        assert!(err.contains("unknown mount option \"cache=1G\""), "{err}");
        let argv = command_line(&["b", "m", "-s", "-o", "adapter=/a,cache=1G"]).unwrap();
        assert_eq!(argv[2..].join(" "), "--adapter /a -- b m");
        let err = command_line(&["b", "m", "-o", "adapter"]).unwrap_err();
        assert!(err.contains("adapter needs a value"), "{err}");
        let err = command_line(&["b", "m", "-o", "allow_other=1"]).unwrap_err();
        assert!(err.contains("allow_other takes no value"), "{err}");
    }

    #[test]
    fn helper_flags() {
        let call = parse_helper_args(&os(&[
            "b",
            "m",
            "-sfv",
            "-N",
            "/proc/1/fd/4",
            "-oadapter=/a",
            "-t",
            "lorafs",
        ]))
        .unwrap();
        assert!(call.sloppy && call.fake && call.verbose);
        assert_eq!(call.namespace, Some("/proc/1/fd/4".into()));
        assert_eq!(call.options, ["adapter=/a"]);
        assert_eq!(
            (call.spec.as_os_str(), call.dir.as_os_str()),
            ("b".as_ref(), "m".as_ref())
        );
        assert!(parse_helper_args(&os(&["b"])).is_err());
        assert!(parse_helper_args(&os(&["b", "m", "x"])).is_err());
        assert!(parse_helper_args(&os(&["b", "m", "-o"])).is_err());
        let err = parse_helper_args(&os(&["b", "m", "-w"])).unwrap_err();
        assert!(err.contains("unknown flag -w"), "{err}");
    }
}
