//! The thread that follows a views file: woken by notifications on the file's directory
//! and the adapters' directories, and every [`POLL`] regardless; it asks the [`FileSync`]
//! to look. A panic in a look is logged and costs that look only.

use std::collections::BTreeSet;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};

use super::{FileSync, Registry, POLL};

enum Msg {
    /// Something changed in a watched directory (or the notifications failed).
    Changed,
    Stop,
}

/// The views file's watcher thread; dropping it stops the thread and waits for it.
pub struct Watcher {
    messages: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Fails only if the thread is gone already.
        let _ = self.messages.send(Msg::Stop);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("views file watcher thread panicked");
            }
        }
    }
}

/// Follow the file of `sync` on a thread, applying its changes to `registry`.
pub fn watch(sync: FileSync, registry: Arc<dyn Registry>) -> io::Result<Watcher> {
    let (messages, inbox) = mpsc::channel();
    let notifications = messages.clone();
    let handler = move |event: notify::Result<notify::Event>| {
        // Opens and reads (the mount's own, of the adapters) change nothing.
        if !matches!(event, Ok(ref e) if matches!(e.kind, EventKind::Access(_))) {
            // Fails only once the thread has ended.
            let _ = notifications.send(Msg::Changed);
        }
    };
    let watcher = match notify::recommended_watcher(handler) {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            log::warn!(
                "views file {}: cannot watch for changes ({e}); polled every {POLL:?}",
                sync.path().display()
            );
            None
        }
    };
    let follow = Follow {
        sync,
        registry,
        inbox,
        watcher,
        watched: BTreeSet::new(),
    };
    let thread = thread::Builder::new()
        .name("lorafs-views".into())
        .spawn(move || follow.run())?;
    Ok(Watcher {
        messages,
        thread: Some(thread),
    })
}

struct Follow {
    sync: FileSync,
    registry: Arc<dyn Registry>,
    inbox: Receiver<Msg>,
    watcher: Option<RecommendedWatcher>,
    /// The directories watched now.
    watched: BTreeSet<PathBuf>,
}

impl Follow {
    fn run(mut self) {
        loop {
            self.update_watches();
            let wait = catch_unwind(AssertUnwindSafe(|| self.sync.check(&*self.registry)))
                .unwrap_or_else(|_| {
                    log::error!("views file watcher: a look panicked; the watcher goes on");
                    POLL
                });
            match self.inbox.recv_timeout(wait) {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                // A burst of notifications is one look.
                Ok(Msg::Changed) => {
                    while let Ok(msg) = self.inbox.try_recv() {
                        if let Msg::Stop = msg {
                            return;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Watch the file's directory and the directories of the adapters it names now.
    fn update_watches(&mut self) {
        let Some(watcher) = &mut self.watcher else {
            return;
        };
        let file_dir = self.sync.path().parent().unwrap_or(Path::new("/"));
        let wanted: BTreeSet<PathBuf> = std::iter::once(file_dir)
            .chain(self.sync.adapter_dirs())
            .map(Path::to_path_buf)
            .collect();
        for dir in self.watched.difference(&wanted) {
            // Fails if the directory was removed, which ended its watch already.
            let _ = watcher.unwatch(dir);
        }
        // A directory that cannot be watched (missing for now) is tried again at the next
        // look; the polling covers it meanwhile.
        self.watched = (wanted.into_iter())
            .filter(|dir| {
                self.watched.contains(dir)
                    || watcher.watch(dir, RecursiveMode::NonRecursive).is_ok()
            })
            .collect();
    }
}
