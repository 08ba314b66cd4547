//! Running as `mount.lorafs`: mount(8)'s call translated (see `fstab`), then `lorafs mount`.

use std::ffi::{OsStr, OsString};
use std::process::ExitCode;

use clap::Parser;

use super::fstab::{mount_command_line, parse_helper_args};
use super::mount::{check, mount};
use super::{Cli, Command};

/// mount(8)'s exit statuses (mount(8), "RETURN CODES"), which it passes on from a helper.
const BAD_INVOCATION: u8 = 1;
const MOUNT_FAILURE: u8 = 32;

/// Run mount(8)'s call (`argv`, argv[0] included): mount in the background and return once
/// the mount serves, as `lorafs mount` does, or with `-f` only check. Errors are one line;
/// nothing is mounted then.
pub(crate) fn run_mount_helper(argv: &[OsString]) -> ExitCode {
    let fail = |status: u8, message: &str| {
        crate::report(&anyhow::anyhow!("{message}"));
        ExitCode::from(status)
    };
    let call = match parse_helper_args(argv.get(1..).unwrap_or_default()) {
        Ok(call) => call,
        Err(e) => return fail(BAD_INVOCATION, &e),
    };
    if let Some(namespace) = &call.namespace {
        if let Err(e) = enter_mount_namespace(namespace) {
            return fail(MOUNT_FAILURE, &format!("{e:#}"));
        }
    }
    let command_line = match mount_command_line(&call) {
        Ok(line) => line,
        Err(e) => return fail(BAD_INVOCATION, &e),
    };
    if call.verbose {
        let words: Vec<_> = command_line.iter().map(|a| a.to_string_lossy()).collect();
        eprintln!("mount.lorafs: {}", words.join(" "));
    }
    let cli = match Cli::try_parse_from(&command_line) {
        Ok(cli) => cli,
        Err(e) => return fail(BAD_INVOCATION, &first_line_of(&e)),
    };
    crate::start(&cli);
    let Command::Mount(args) = cli.command else {
        unreachable!("the helper's command line is a mount")
    };
    let result = match call.fake {
        true => check(&args),
        false => mount(args, &command_line),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            crate::report(&e);
            ExitCode::from(MOUNT_FAILURE)
        }
    }
}

/// clap's message for a bad option value, without its advice to try --help (which is
/// about `lorafs mount`'s flags, not the mount options).
fn first_line_of(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let line = text.lines().next().unwrap_or_default();
    let line = line.strip_prefix("error: ").unwrap_or(line);
    format!("in the mount options: {line}")
}

/// `-N NS`: mount in that mount namespace: a path (mount(8) passes `/proc/PID/fd/N`), or a
/// pid whose namespace it is. Done first, while the process has one thread (setns(2)
/// refuses a mount namespace to a process that shares its file system attributes).
fn enter_mount_namespace(namespace: &OsStr) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::fd::AsRawFd;

    let text = namespace.to_string_lossy();
    let path = match text.bytes().all(|b| b.is_ascii_digit()) {
        true => format!("/proc/{text}/ns/mnt").into(),
        false => std::path::PathBuf::from(namespace),
    };
    let file = std::fs::File::open(&path)
        .with_context(|| format!("mount namespace {}", path.display()))?;
    // SAFETY: setns on a descriptor `file` owns, open for the call.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
        let err = std::io::Error::last_os_error();
        anyhow::bail!("cannot enter mount namespace {}: {err}", path.display());
    }
    Ok(())
}
