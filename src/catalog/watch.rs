//! The watcher thread: walks the catalog when notifications say something changed (or on a
//! timer), stats waiting candidates until they are quiet, and reports events. A panic in a
//! step or in the caller's `on_event` is logged and costs that step or that event only.

use std::collections::{HashMap, HashSet};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};

use super::track::Tracker;
use super::walk::{self, Candidate, DirId};
use super::{Event, Found};
use crate::adapter::Adapter;

/// After a notification, how long to wait for the rest of a burst before walking; at least
/// 4 times the last walk's duration, so that walking takes at most a fifth of the time.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// How often waiting candidates are stat'ed again.
const TICK: Duration = Duration::from_millis(200);
/// Full walks with notifications working: they may be lost (queue overflow, changes made on
/// another machine of a network filesystem).
const RESCAN: Duration = Duration::from_secs(30);
/// Full walks when some directory could not be watched.
const POLL: Duration = Duration::from_secs(2);

/// Where the signal to walk comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Notify {
    /// inotify (or the platform's equivalent), with polling if it cannot be set up.
    Inotify,
    /// Polling only (tests of the fallback).
    #[cfg(test)]
    Poll,
}

enum Msg {
    Fs(notify::Result<notify::Event>),
    Stop,
}

/// The catalog's watcher thread; dropping it stops the thread.
pub struct Watcher {
    messages: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Fails only if the thread is gone already.
        let _ = self.messages.send(Msg::Stop);
        let Some(thread) = self.thread.take() else {
            return;
        };
        // Dropped by `on_event` itself: the thread ends when that call returns.
        if thread.thread().id() == thread::current().id() {
            return;
        }
        if thread.join().is_err() {
            log::error!("catalog watcher thread panicked");
        }
    }
}

pub(super) type OnEvent = Box<dyn FnMut(Event) + Send>;

pub(super) fn start(
    root: PathBuf,
    initial: &[Found],
    on_event: OnEvent,
    notify: Notify,
) -> io::Result<Watcher> {
    let (messages, inbox) = mpsc::channel();
    let watches = Watches::new(&root, notify, messages.clone());
    let state = Loop {
        root,
        tracker: Tracker::new(initial),
        on_event,
        inbox,
        watches,
        reported: HashSet::new(),
        walk_took: Duration::ZERO,
    };
    let thread = thread::Builder::new()
        .name("lorafs-catalog".into())
        .spawn(move || state.run())?;
    Ok(Watcher {
        messages,
        thread: Some(thread),
    })
}

struct Loop {
    root: PathBuf,
    tracker: Tracker,
    on_event: OnEvent,
    inbox: Receiver<Msg>,
    watches: Watches,
    /// The last walk's problems, each logged when it first appeared.
    reported: HashSet<String>,
    walk_took: Duration,
}

impl Loop {
    fn run(mut self) {
        let mut next_walk = Instant::now();
        // When waiting candidates were last stat'ed (by a walk or on their own).
        let mut stated = Instant::now();
        loop {
            let next_stat = self.next_stat(stated);
            let now = Instant::now();
            if now >= next_walk {
                caught("walk", || self.walk());
                let every = if self.watches.complete() {
                    RESCAN
                } else {
                    POLL
                };
                stated = now;
                next_walk = Instant::now() + every;
            } else if next_stat.is_some_and(|t| now >= t) {
                if caught("stat", || self.restat_waiting()) == Some(true) {
                    next_walk = now;
                }
                stated = now;
            }
            let next_stat = self.next_stat(stated);
            let wake = next_stat.map_or(next_walk, |t| t.min(next_walk));
            match self
                .inbox
                .recv_timeout(wake.saturating_duration_since(Instant::now()))
            {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(Msg::Fs(event)) => {
                    if self.watches.take_in(event) {
                        let debounce = DEBOUNCE.max(4 * self.walk_took);
                        next_walk = next_walk.min(Instant::now() + debounce);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// When to stat the waiting candidates again, last stat'ed at `stated`: every TICK, and
    /// when the first one's quiet period ends; not at every notification of a burst. A
    /// deadline the last stat covered already (its check panicked) waits for the next TICK.
    fn next_stat(&self, stated: Instant) -> Option<Instant> {
        let deadline = self.tracker.next_deadline()?;
        Some(if deadline > stated {
            deadline.min(stated + TICK)
        } else {
            stated + TICK
        })
    }

    /// Walk the tree, watching each directory, and report what changed.
    fn walk(&mut self) {
        let started = Instant::now();
        let watches = &mut self.watches;
        let walk = walk::walk(&self.root, &mut |dir, id| watches.ensure(dir, id));
        watches.end_walk();
        self.walk_took = started.elapsed();
        let problems: HashSet<String> = walk.problems.iter().cloned().collect();
        for problem in &walk.problems {
            if !self.reported.contains(problem) {
                log::warn!("catalog: {problem}");
            }
        }
        self.reported = problems;
        let mut events = Vec::new();
        let now = Instant::now();
        self.tracker.after_walk(walk, now, &mut events);
        self.settle(now, events);
    }

    /// Stat the waiting candidates again and report those that became quiet and complete.
    /// True if one is gone: a walk says what became of it.
    fn restat_waiting(&mut self) -> bool {
        let waiting: Vec<(PathBuf, PathBuf)> = (self.tracker.waiting())
            .map(|(name, dir)| (name.to_path_buf(), dir.to_path_buf()))
            .collect();
        let now = Instant::now();
        let mut gone = false;
        for (name, dir) in waiting {
            match walk::fingerprint(&dir) {
                Ok(Some(fingerprint)) => {
                    let candidate = Candidate { dir, fingerprint };
                    self.tracker.observe(name, candidate, now);
                }
                // Not found, or unreadable: the walk decides (and logs).
                Ok(None) | Err(_) => {
                    self.tracker.forget(&name);
                    gone = true;
                }
            }
        }
        self.settle(now, Vec::new());
        gone
    }

    fn settle(&mut self, now: Instant, mut events: Vec<Event>) {
        let check = |dir: &Path| walk::check_complete(dir).map_err(|e| e.to_string());
        self.tracker.settle(now, check, &mut events);
        for event in events {
            caught("on_event", || (self.on_event)(event));
        }
    }
}

/// Run one step of the watcher; `None` if it panicked (logged; the next step goes on).
fn caught<T>(what: &str, step: impl FnOnce() -> T) -> Option<T> {
    // A panic leaves the tracker at worst out of date; the next walk compares it with the
    // tree again.
    let result = catch_unwind(AssertUnwindSafe(step));
    if result.is_err() {
        log::error!("catalog watcher: {what} panicked; the watcher goes on");
    }
    result.ok()
}

fn is_adapter_file(path: &Path) -> bool {
    let name = path.file_name();
    name == Some(Adapter::CONFIG_FILE.as_ref()) || name == Some(Adapter::WEIGHTS_FILE.as_ref())
}

/// One notification watch per walked directory, so that watching stops at the walk's depth
/// and follows the links the walk follows.
struct Watches {
    watcher: Option<RecommendedWatcher>,
    /// Directories watched, by path, with the identity they had when the watch was set.
    watched: HashMap<PathBuf, DirId>,
    /// Directories of the current walk.
    walked: HashSet<PathBuf>,
    /// Some directory of the current walk could not be watched.
    failed: bool,
    /// Some directory of the last walk could not be watched: the tree is polled.
    polled: bool,
}

impl Watches {
    fn new(root: &Path, notify: Notify, messages: Sender<Msg>) -> Watches {
        let watcher = match notify {
            Notify::Inotify => {
                let handler = move |event| {
                    // Fails only once the watcher thread has ended.
                    let _ = messages.send(Msg::Fs(event));
                };
                match notify::recommended_watcher(handler) {
                    Ok(watcher) => Some(watcher),
                    Err(e) => {
                        log::warn!("catalog {root:?}: cannot watch for changes ({e}); polled every {POLL:?}");
                        None
                    }
                }
            }
            #[cfg(test)]
            Notify::Poll => None,
        };
        Watches {
            watcher,
            watched: HashMap::new(),
            walked: HashSet::new(),
            failed: false,
            polled: false,
        }
    }

    /// Whether every directory of the last walk is watched.
    fn complete(&self) -> bool {
        self.watcher.is_some() && !self.polled
    }

    fn ensure(&mut self, dir: &Path, id: DirId) {
        let Some(watcher) = &mut self.watcher else {
            return;
        };
        self.walked.insert(dir.to_path_buf());
        if self.watched.get(dir) == Some(&id) {
            return;
        }
        match watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                self.watched.insert(dir.to_path_buf(), id);
            }
            // Removed since the walk reached it: its parent's watch saw that.
            Err(e) if matches!(e.kind, notify::ErrorKind::PathNotFound) => {}
            Err(e) => {
                if !self.failed && !self.polled {
                    log::warn!(
                        "catalog: cannot watch {dir:?} ({e}); the catalog is polled every {POLL:?}"
                    );
                }
                self.failed = true;
            }
        }
    }

    /// Stop watching the directories the walk did not reach.
    fn end_walk(&mut self) {
        let Some(watcher) = &mut self.watcher else {
            return;
        };
        let walked = std::mem::take(&mut self.walked);
        self.watched.retain(|dir, _| {
            if !walked.contains(dir) {
                // Fails if the directory was removed, which ended its watch already.
                let _ = watcher.unwatch(dir);
            }
            walked.contains(dir)
        });
        // A directory not watched is tried again at the next walk.
        let polled = std::mem::take(&mut self.failed);
        if self.polled && !polled {
            log::info!("catalog: every directory is watched again; polling stops");
        }
        self.polled = polled;
    }

    /// Take in a notification; true if the tree should be walked.
    fn take_in(&mut self, event: notify::Result<notify::Event>) -> bool {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                log::debug!("catalog: notification error ({e}); walking the tree");
                return true;
            }
        };
        match event.kind {
            // Writes matter only to the adapter files: a trainer writing its optimizer state
            // next to them for a minute must not cause a walk every 100 ms.
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Data(_)) => {
                event.paths.iter().any(|p| is_adapter_file(p))
            }
            // Opens and reads (ours, the mount's) change nothing.
            EventKind::Access(_) => false,
            // A directory removed or renamed lost its watch: set it again if it is walked.
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) => {
                for path in &event.paths {
                    self.watched.retain(|dir, _| !dir.starts_with(path));
                }
                true
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn walk_watching(root: &Path, watches: &mut Watches) -> Vec<String> {
        walk::walk(root, &mut |dir, id| watches.ensure(dir, id));
        watches.end_walk();
        let relative = |dir: &PathBuf| dir.strip_prefix(root).unwrap().display().to_string();
        let mut watched: Vec<String> = watches.watched.keys().map(relative).collect();
        watched.sort();
        watched
    }

    /// The next notification that asks for a walk.
    fn next_walk_signal(inbox: &Receiver<Msg>, watches: &mut Watches) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match inbox.recv_timeout(left) {
                Ok(Msg::Fs(event)) => {
                    if watches.take_in(event) {
                        return;
                    }
                }
                Ok(Msg::Stop) => {}
                Err(e) => panic!("no notification within 10 s: {e}"),
            }
        }
    }

    #[test]
    fn the_walked_directories_are_watched_and_no_others() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        fs::create_dir_all(root.join("a/b/c/d/e/f")).unwrap();
        fs::create_dir_all(root.join(".hidden/x")).unwrap();
        let (messages, inbox) = mpsc::channel();
        let mut watches = Watches::new(root, Notify::Inotify, messages);
        let watched = walk_watching(root, &mut watches);
        assert_eq!(
            watched,
            ["", "a", "a/b", "a/b/c", "a/b/c/d"],
            "4 levels below the root"
        );
        assert!(watches.complete());

        fs::write(root.join("a/b/c/d/new"), b"").unwrap();
        next_walk_signal(&inbox, &mut watches);
        fs::remove_dir_all(root.join("a/b/c/d")).unwrap();
        next_walk_signal(&inbox, &mut watches);
        assert_eq!(walk_watching(root, &mut watches), ["", "a", "a/b", "a/b/c"]);
        // Removed and made again between two walks, perhaps with the same inode (tmpfs and
        // ext4 reuse them): watched again.
        fs::remove_dir(root.join("a/b/c")).unwrap();
        fs::create_dir(root.join("a/b/c")).unwrap();
        next_walk_signal(&inbox, &mut watches);
        while let Ok(Msg::Fs(event)) = inbox.recv_timeout(Duration::from_millis(200)) {
            watches.take_in(event);
        }
        assert_eq!(walk_watching(root, &mut watches), ["", "a", "a/b", "a/b/c"]);
        fs::write(root.join("a/b/c/new"), b"").unwrap();
        next_walk_signal(&inbox, &mut watches);
    }
}
