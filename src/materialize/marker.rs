//! The marker that identifies a run's temporary files as lorafs's own, and tells whether the
//! run that wrote it is still going. A run killed by SIGKILL or a power loss leaves its
//! temporary directory behind; the next run to the same output removes it only when the
//! marker is valid and names a process that no longer exists.

use std::io;

/// First line of every marker: anything else is not ours.
const MAGIC: &str = "lorafs materialize run v1";

/// Who wrote a marker. A process is identified by its pid and its start time (clock ticks
/// after boot, field 22 of `/proc/PID/stat`), so a pid reused by a later process does not
/// pass for the writer; the boot id, host name and pid namespace say whether the pid can be
/// looked up here at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Marker {
    host: String,
    boot: String,
    pid_namespace: String,
    pid: i32,
    start: u64,
}

/// What a marker says about the run that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Owner {
    /// The process is gone (or the machine restarted since): its files may be removed.
    Gone,
    /// The process still runs.
    Running,
    /// The marker comes from another host or pid namespace (a shared or network
    /// filesystem, a container): this machine cannot tell, so the files stay.
    Elsewhere,
}

impl Marker {
    /// The marker of this process. Fields that cannot be read (no `/proc`) stay empty, which
    /// makes the marker invalid: a leftover of such a run is never removed automatically.
    pub fn current() -> Marker {
        let pid = std::process::id() as i32;
        Marker {
            host: read_trimmed("/proc/sys/kernel/hostname"),
            boot: read_trimmed("/proc/sys/kernel/random/boot_id"),
            pid_namespace: std::fs::read_link("/proc/self/ns/pid")
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            pid,
            start: start_time(pid).ok().flatten().unwrap_or(0),
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn to_text(&self) -> String {
        format!(
            "{MAGIC}\nhost {}\nboot {}\npidns {}\npid {}\nstart {}\n",
            self.host, self.boot, self.pid_namespace, self.pid, self.start
        )
    }

    /// A marker as written by [`Marker::to_text`] with every field present, or None.
    pub fn parse(text: &str) -> Option<Marker> {
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return None;
        }
        let mut field = |key: &str| {
            let value = lines.next()?.strip_prefix(key)?.strip_prefix(' ')?;
            (!value.is_empty()).then(|| value.to_string())
        };
        let marker = Marker {
            host: field("host")?,
            boot: field("boot")?,
            pid_namespace: field("pidns")?,
            pid: field("pid")?.parse().ok().filter(|&p: &i32| p > 0)?,
            start: field("start")?.parse().ok().filter(|&s| s > 0)?,
        };
        lines.next().is_none().then_some(marker)
    }

    /// Whether the run that wrote this marker may still be going, as seen from `here` (the
    /// current process's marker).
    pub fn owner(&self, here: &Marker) -> Owner {
        if self.host != here.host {
            return Owner::Elsewhere;
        }
        if self.boot != here.boot {
            return Owner::Gone; // every process of an earlier boot has ended
        }
        if self.pid_namespace != here.pid_namespace {
            return Owner::Elsewhere;
        }
        let Some(pid) = rustix::process::Pid::from_raw(self.pid) else {
            return Owner::Gone;
        };
        // Any other answer (EPERM: another user's process) means the pid exists.
        if rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH) {
            return Owner::Gone;
        }
        match start_time(self.pid) {
            Ok(None) => Owner::Gone, // exited since the kill(0) above
            Ok(Some(start)) if start != self.start => Owner::Gone, // the pid was reused
            Ok(Some(_)) | Err(_) => Owner::Running,
        }
    }
}

/// Start time of process `pid` in clock ticks after boot, or None if it does not exist.
fn start_time(pid: i32) -> io::Result<Option<u64>> {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so count the
    // fields after its last `)`; starttime is field 22 overall, the 20th after comm.
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    after_comm
        .split_whitespace()
        .nth(19)
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat: no start time")))
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_partial_markers_are_invalid() {
        let here = Marker::current();
        assert!(here.start > 0 && !here.boot.is_empty(), "{here:?}");
        assert_eq!(Marker::parse(&here.to_text()), Some(here.clone()));
        let text = here.to_text();
        assert_eq!(Marker::parse(&text.replace(MAGIC, "lorafs")), None);
        assert_eq!(Marker::parse(&text[..text.len() / 2]), None);
        assert_eq!(Marker::parse(&format!("{text}extra\n")), None);
        assert_eq!(Marker::parse(""), None);
        let no_host = Marker {
            host: String::new(),
            ..here.clone()
        };
        assert_eq!(Marker::parse(&no_host.to_text()), None);
    }

    #[test]
    fn only_a_gone_process_of_this_machine_is_gone() {
        let here = Marker::current();
        assert_eq!(here.owner(&here), Owner::Running);
        let reused = Marker {
            start: here.start + 1,
            ..here.clone()
        };
        assert_eq!(reused.owner(&here), Owner::Gone, "same pid, other process");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        let dead = Marker {
            pid,
            ..here.clone()
        };
        assert_eq!(dead.owner(&here), Owner::Gone);
        let rebooted = Marker {
            boot: "another boot".into(),
            ..here.clone()
        };
        assert_eq!(rebooted.owner(&here), Owner::Gone);
        let remote = Marker {
            host: "another host".into(),
            ..dead.clone()
        };
        assert_eq!(remote.owner(&here), Owner::Elsewhere);
        let container = Marker {
            pid_namespace: "pid:[1]".into(),
            ..dead
        };
        assert_eq!(container.owner(&here), Owner::Elsewhere);
    }
}
