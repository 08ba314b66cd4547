//! `lorafs stats MNT [--json] [--watch[=SECS]]`: the counters of a running mount, read from
//! its stats file, once or refreshed in place with throughput and hit rate.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Args;
use serde_json::{Map, Value};

use lorafs::fuse::STATS_FILE;
use lorafs::mountinfo::{find_mount, mount_target};
use lorafs::stats::{Rates, Stats};

#[derive(Args)]
pub(crate) struct StatsArgs {
    /// The mount point of a running lorafs mount.
    mountpoint: PathBuf,
    /// One JSON object: {"mountpoint": PATH, COUNTER: VALUE, ...} (docs/CLI.md); with
    /// --watch, one such line per interval with the rates over it.
    #[arg(long)]
    json: bool,
    /// Refresh every SECS seconds (default 1) with throughput and hit rate, until Ctrl-C
    /// or until the mount goes away. An interval is given as `--watch=SECS`, so that
    /// `--watch MNT` reads MNT as the mount point.
    #[arg(long, value_name = "SECS", num_args = 0..=1, require_equals = true,
          default_missing_value = "1", value_parser = parse_interval)]
    watch: Option<f64>,
}

fn parse_interval(arg: &str) -> Result<f64, String> {
    match arg.parse::<f64>() {
        Ok(secs) if secs.is_finite() && (0.05..=86400.0).contains(&secs) => Ok(secs),
        _ => Err(format!(
            "{arg:?} is not an interval in seconds from 0.05 to 86400"
        )),
    }
}

/// Why a reading failed: the mount is gone (the end of a watch), or anything else.
enum ReadError {
    Gone(String),
    Other(anyhow::Error),
}

impl From<ReadError> for anyhow::Error {
    fn from(e: ReadError) -> anyhow::Error {
        match e {
            ReadError::Gone(why) => anyhow::anyhow!("{why}"),
            ReadError::Other(e) => e,
        }
    }
}

/// Read the counters of the lorafs mount at `mountpoint` (as the user named it). The mount
/// is found in mountinfo first, so a path that is not one says so rather than "no file".
fn read_stats(mountpoint: &Path) -> Result<Stats, ReadError> {
    let shown = mountpoint.display();
    let target = mount_target(mountpoint).map_err(|e| ReadError::Other(io_error(mountpoint, e)))?;
    let mount = find_mount(&target).map_err(|e| ReadError::Other(io_error(mountpoint, e)))?;
    let owner = match mount {
        None => {
            return Err(ReadError::Gone(format!(
                "{shown} is not a lorafs mount (nothing is mounted there)"
            )))
        }
        Some(m) if !m.is_lorafs() => {
            return Err(ReadError::Gone(format!(
                "{shown} is not a lorafs mount (it is a {} mount)",
                m.fstype
            )))
        }
        Some(m) => m.user_id(),
    };
    let file = target.join(STATS_FILE);
    let text = std::fs::read_to_string(&file).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => ReadError::Other(anyhow::anyhow!(
            "permission denied: only the user who mounted {shown} ({}) or root may read its \
             counters",
            owner.map_or("uid unknown".into(), |uid| format!("uid {uid}"))
        )),
        // The server died, or the mount went away between mountinfo and the read.
        _ if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ENODEV)) => {
            ReadError::Gone(format!("the lorafs server of {shown} is gone ({e})"))
        }
        std::io::ErrorKind::NotFound => ReadError::Other(anyhow::anyhow!(
            "{shown} is a lorafs mount without {STATS_FILE}: its server is older than this \
             command"
        )),
        _ => ReadError::Other(io_error(&file, e)),
    })?;
    Stats::parse(&text).map_err(|e| {
        ReadError::Other(anyhow::anyhow!(
            "{} does not hold the mount's counters ({e}): the base has a file of that name, \
             which the mount serves instead (the server logs its counters on SIGUSR1)",
            file.display()
        ))
    })
}

fn io_error(path: &Path, e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!("{}: {e}", path.display())
}

/// Run `lorafs stats`.
pub(crate) fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let Some(secs) = args.watch else {
        let stats = read_stats(&args.mountpoint)?;
        let text = if args.json {
            json_line(&args.mountpoint, &stats, None)
        } else {
            table(&args.mountpoint, &stats, None)
        };
        return crate::to_stdout(&text);
    };
    watch(&args, Duration::from_secs_f64(secs))
}

/// Print a reading every `interval` until the mount goes away (exit 0, saying so), stdout
/// is closed (exit 0) or the process is interrupted.
fn watch(args: &StatsArgs, interval: Duration) -> anyhow::Result<()> {
    let terminal = std::io::stdout().is_terminal() && !args.json;
    let mut previous: Option<(Instant, Stats)> = None;
    let mut lines_drawn = 0;
    loop {
        let stats = match read_stats(&args.mountpoint) {
            Ok(stats) => stats,
            Err(ReadError::Gone(why)) if previous.is_some() => {
                let line = format!("{why}: stopped watching\n");
                // Keep a JSON-lines stdout all JSON.
                if args.json {
                    let _ = std::io::stderr().write_all(line.as_bytes());
                } else {
                    crate::to_stdout(&line)?;
                }
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let now = Instant::now();
        let rates = (previous.as_ref())
            .map(|(then, before)| Rates::between(before, &stats, (now - *then).as_secs_f64()));
        let text = if args.json {
            json_line(&args.mountpoint, &stats, Some(rates))
        } else {
            table(&args.mountpoint, &stats, Some(rates))
        };
        let text = match (terminal, lines_drawn) {
            // Over the previous block: up as many lines as it took, then clear below.
            (true, n) if n > 0 => format!("\x1b[{n}A\x1b[J{text}"),
            (false, _) if !args.json && previous.is_some() => format!("\n{text}"),
            _ => text,
        };
        lines_drawn = text.matches('\n').count();
        if !emit(&text).context("cannot write to stdout")? {
            return Ok(());
        }
        previous = Some((now, stats));
        std::thread::sleep(interval);
    }
}

/// Write `text` to stdout: `Ok(false)` when the reader went away (`| head`), which ends a
/// watch quietly as other tools do.
fn emit(text: &str) -> std::io::Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}

/// The JSON of a reading: `mountpoint`, then the counters under their names; with a watch
/// (`rates` is `Some`) the rates too, null on the first line, which has no interval.
fn json_line(mountpoint: &Path, stats: &Stats, rates: Option<Option<Rates>>) -> String {
    let mut object = Map::new();
    // Absolute: a reader of the JSON may run elsewhere.
    let mountpoint = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.into());
    object.insert(
        "mountpoint".into(),
        Value::String(mountpoint.to_string_lossy().into_owned()),
    );
    if let Value::Object(counters) = serde_json::to_value(stats).unwrap_or_default() {
        object.extend(counters);
    }
    if let Some(rates) = rates {
        let time = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        object.insert("time".into(), Value::from(time));
        let known = rates.is_some();
        let rates = rates.unwrap_or_else(|| Rates::between(stats, stats, 0.0));
        if let Value::Object(rates) = serde_json::to_value(rates).unwrap_or_default() {
            object.extend(
                rates
                    .into_iter()
                    .map(|(k, v)| (k, if known { v } else { Value::Null })),
            );
        }
    }
    // Integers, strings and finite rates: serializing cannot fail.
    let mut line = serde_json::to_string(&Value::Object(object)).unwrap_or_default();
    line.push('\n');
    line
}

/// The readable table of a reading, with the rates of a watch.
fn table(mountpoint: &Path, s: &Stats, rates: Option<Option<Rates>>) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("mount", mount_line(mountpoint, s)),
        ("bytes read", size(s.bytes_read)),
        ("  merged", size(s.bytes_merged)),
        ("  from the base", size(s.bytes_passthrough)),
        ("  replaced", size(s.bytes_replaced)),
        ("  converted", size(s.bytes_converted)),
        (
            "merged blocks",
            format!("{} computed", size(s.bytes_computed)),
        ),
        ("cache", held(s.cache_bytes, s.cache_budget)),
        (
            "  lookups",
            format!(
                "{} hits, {} waits, {} misses, {} evictions",
                s.cache_hits, s.cache_waits, s.cache_misses, s.cache_evictions
            ),
        ),
        ("  hit rate", percent(s.hit_rate())),
        (
            "factors",
            format!(
                "{} ({} tensors loaded)",
                held(s.factor_bytes, s.factor_budget),
                s.factors_loaded
            ),
        ),
        (
            "base read ahead",
            format!(
                "{} ({} taken by readers, {} ranges dropped unread), {} held",
                size(s.read_ahead_staged),
                size(s.read_ahead_served),
                s.read_ahead_dropped,
                held(s.read_ahead_bytes, s.read_ahead_budget)
            ),
        ),
        ("panics caught", s.panics_caught.to_string()),
    ];
    if let Some(rates) = rates {
        rows.extend(rate_rows(rates));
    }
    for (name, value) in &s.other {
        rows.push((name, value.to_string()));
    }
    rows.iter()
        .map(|(name, value)| format!("{name:<18}{value}\n"))
        .collect()
}

/// The table's first line: the mount, its server and how it serves.
fn mount_line(mountpoint: &Path, s: &Stats) -> String {
    let (mnt, pid, kernel) = (mountpoint.display(), s.pid, &s.kernel);
    match s.other.get("transport") {
        // Servers before FUSE over io_uring had one transport and no line for it.
        Some(transport) => format!("{mnt} (pid {pid}, kernel {kernel}, transport {transport})"),
        None => format!("{mnt} (pid {pid}, kernel {kernel})"),
    }
}

/// The rows of a watch's rates (`None` at its first reading, which has nothing to compare).
fn rate_rows(rates: Option<Rates>) -> [(&'static str, String); 5] {
    let per_sec =
        |f: fn(&Rates) -> f64| rates.map_or("-".into(), |r| format!("{}/s", size(f(&r) as u64)));
    let over = rates.map_or("the first reading".into(), |r| {
        format!("the last {:.1} s", r.interval_secs)
    });
    [
        ("rates over", over),
        ("  read", per_sec(|r| r.bytes_read_per_sec)),
        ("  merged", per_sec(|r| r.bytes_merged_per_sec)),
        ("  computed", per_sec(|r| r.bytes_computed_per_sec)),
        ("  hit rate", percent(rates.and_then(|r| r.hit_rate))),
    ]
}

/// A byte count in B, KiB, MiB or GiB.
fn size(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if bytes < 1024 {
        format!("{bytes} B")
    } else if b < KIB * KIB {
        format!("{:.1} KiB", b / KIB)
    } else if b < KIB * KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    }
}

/// Bytes held of a budget; the largest count is no bound (a mount of one model keeps every
/// factor it reads).
fn held(bytes: u64, budget: u64) -> String {
    match budget == usize::MAX as u64 {
        true => format!("{}, no bound", size(bytes)),
        false => format!("{} of {}", size(bytes), size(budget)),
    }
}

fn percent(rate: Option<f64>) -> String {
    rate.map_or("- (no lookups)".into(), |r| format!("{:.1}%", 100.0 * r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_intervals() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(256 << 20), "256.0 MiB");
        assert_eq!(size(3 << 30), "3.00 GiB");
        assert_eq!(parse_interval("0.5"), Ok(0.5));
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("NaN").is_err());
    }
}
