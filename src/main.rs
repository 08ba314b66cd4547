//! The `lorafs` command line.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

mod cli;

use cli::{Cli, Command};

/// Raise the soft limit on open files to the hard one. lorafs keeps one descriptor per
/// safetensors file (others are opened per read), and the usual soft limit of 1024 is below
/// the shard count of some models, while the hard limit is usually far higher.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed, which lives on
    // this stack frame; failures leave the limit as it was, which is fine.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                log::debug!("could not raise the open files limit");
            }
        }
    }
}

/// The error and its causes on one line, leaving out causes the message already quotes.
fn error_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

/// Print an error, with its causes, as the last line of a failed run. A stderr that cannot
/// take it (closed, a full disk) leaves only the exit code: `eprintln!` would panic.
fn report(err: &anyhow::Error) {
    let _ = writeln!(std::io::stderr(), "lorafs: error: {}", error_chain(err));
}

/// Write `text` to stdout. A reader that went away (`lorafs inspect | head -1`) is not an
/// error, as for other command-line tools; any other failure (`> /dev/full`) is, where
/// `print!` would panic.
fn to_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write to stdout"))
        }
        Ok(()) | Err(_) => Ok(()),
    }
}

fn main() -> ExitCode {
    let command_line: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Installed as /sbin/mount.lorafs (a link to lorafs), mount(8)'s helper for `-t lorafs`.
    if command_line
        .first()
        .is_some_and(|a| cli::invoked_as_helper(a))
    {
        return cli::run_mount_helper(&command_line);
    }
    let cli = Cli::parse_from(&command_line);
    start(&cli);
    match cli::run(cli, &command_line) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(&err);
            ExitCode::FAILURE
        }
    }
}

/// Logging and limits, before `cli` runs.
fn start(cli: &Cli) {
    // A mount is a long-lived server: say what it did at init (kernel settings, read-ahead).
    // fuser's session warns when the mount is already gone as it ends (after `umount` or
    // `lorafs unmount`, the normal way): not worth a warning.
    let default_level = if matches!(cli.command, Command::Mount { .. }) {
        "info,fuser::session=error"
    } else {
        "warn"
    };
    // Through `LogSink` (a background server's log file, and stderr): colours only where
    // stderr is a terminal, as env_logger would choose for stderr itself.
    let style = match std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        true => env_logger::WriteStyle::Always,
        false => env_logger::WriteStyle::Never,
    };
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("LORAFS_LOG", default_level))
        .target(env_logger::Target::Pipe(Box::new(cli::LogSink)))
        .write_style(style)
        .init();
    raise_open_files_limit();
}
