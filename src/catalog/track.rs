//! What the watcher remembers between walks: the views it reported, and the candidates
//! waiting for their files to be quiet. Pure: time and the completeness check are passed in,
//! so the rules are tested without a filesystem or a clock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::walk::{Candidate, Fingerprint, Walk};
use super::{Event, Found, QUIET};

/// A directory whose fingerprint differs from its view's (or that is no view yet).
#[derive(Debug)]
struct Pending {
    dir: PathBuf,
    fingerprint: Fingerprint,
    /// When this fingerprint was first seen.
    since: Instant,
    /// Checked after its quiet period (and found incomplete, or the check panicked): not
    /// checked again until the fingerprint changes.
    checked: bool,
}

#[derive(Debug, Default)]
pub(super) struct Tracker {
    views: BTreeMap<PathBuf, Found>,
    pending: BTreeMap<PathBuf, Pending>,
}

impl Tracker {
    pub fn new(initial: &[Found]) -> Tracker {
        let views = initial
            .iter()
            .map(|f| (f.name.clone(), f.clone()))
            .collect();
        Tracker {
            views,
            pending: BTreeMap::new(),
        }
    }

    /// Take in a walk made at `now`: views and candidates it no longer saw are dropped (a
    /// view with an event), those it saw are compared with what is known.
    pub fn after_walk(&mut self, walk: Walk, now: Instant, events: &mut Vec<Event>) {
        let gone = |name: &Path| !walk.candidates.contains_key(name) && !walk.is_unsure(name);
        let gone_views: Vec<PathBuf> = self.views.keys().filter(|n| gone(n)).cloned().collect();
        for name in gone_views {
            self.views.remove(&name);
            events.push(Event::Disappeared { name });
        }
        self.pending.retain(|name, _| !gone(name));
        for (name, candidate) in walk.candidates {
            self.observe(name, candidate, now);
        }
    }

    /// Record that `name`'s files had `candidate.fingerprint` at `now`.
    pub fn observe(&mut self, name: PathBuf, candidate: Candidate, now: Instant) {
        let Candidate { dir, fingerprint } = candidate;
        if self
            .views
            .get(&name)
            .is_some_and(|v| v.fingerprint == fingerprint)
        {
            // Back to the version reported (an incomplete rewrite undone, or a touch reverted).
            self.pending.remove(&name);
            return;
        }
        if let Some(pending) = self.pending.get_mut(&name) {
            if pending.fingerprint == fingerprint {
                return;
            }
        }
        let pending = Pending {
            dir,
            fingerprint,
            since: now,
            checked: false,
        };
        self.pending.insert(name, pending);
    }

    /// The candidates still waiting for their quiet period to end, to be stat'ed again.
    pub fn waiting(&self) -> impl Iterator<Item = (&Path, &Path)> {
        let waiting = self.pending.iter().filter(|(_, p)| !p.checked);
        waiting.map(|(name, p)| (name.as_path(), p.dir.as_path()))
    }

    /// Forget the candidate `name` (its files are gone): the next walk says what became of it.
    pub fn forget(&mut self, name: &Path) {
        self.pending.remove(name);
    }

    /// When the first waiting candidate's quiet period ends.
    pub fn next_deadline(&self) -> Option<Instant> {
        let waiting = self.pending.values().filter(|p| !p.checked);
        waiting.map(|p| p.since + QUIET).min()
    }

    /// Check the candidates whose files have been quiet since `QUIET` before `now`; report
    /// those that are complete. `check` says why a directory is incomplete.
    pub fn settle(
        &mut self,
        now: Instant,
        check: impl Fn(&Path) -> Result<(), String>,
        events: &mut Vec<Event>,
    ) {
        let due = |p: &Pending| !p.checked && now.duration_since(p.since) >= QUIET;
        let names: Vec<PathBuf> = self
            .pending
            .iter()
            .filter(|(_, p)| due(p))
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let Some(pending) = self.pending.get_mut(&name) else {
                continue;
            };
            pending.checked = true;
            if let Err(why) = check(&pending.dir) {
                log::warn!("catalog: {name:?} is not complete after its files stopped changing, left as it was: {why}");
                continue;
            }
            let Some(pending) = self.pending.remove(&name) else {
                continue;
            };
            let found = Found {
                name: name.clone(),
                dir: pending.dir,
                fingerprint: pending.fingerprint,
            };
            let event = if self.views.contains_key(&name) {
                Event::Changed(found.clone())
            } else {
                Event::Appeared(found.clone())
            };
            self.views.insert(name, found);
            events.push(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn candidate(n: u64) -> Candidate {
        Candidate {
            dir: PathBuf::from(format!("/catalog/dir{n}")),
            fingerprint: Fingerprint::fake(n),
        }
    }

    fn walk_of(found: &[(&str, u64)]) -> Walk {
        let mut walk = Walk::default();
        for &(name, n) in found {
            walk.candidates.insert(PathBuf::from(name), candidate(n));
        }
        walk
    }

    fn complete(_: &Path) -> Result<(), String> {
        Ok(())
    }

    fn names(events: &[Event]) -> Vec<String> {
        let name = |e: &Event| match e {
            Event::Appeared(f) => format!("+{}", f.name.display()),
            Event::Changed(f) => format!("~{}", f.name.display()),
            Event::Disappeared { name } => format!("-{}", name.display()),
        };
        events.iter().map(name).collect()
    }

    /// Walk at `t`, then settle at `t`: the events of that one step.
    fn step(tracker: &mut Tracker, found: &[(&str, u64)], t: Instant) -> Vec<String> {
        let mut events = Vec::new();
        tracker.after_walk(walk_of(found), t, &mut events);
        tracker.settle(t, complete, &mut events);
        names(&events)
    }

    #[test]
    fn a_candidate_appears_once_quiet_and_its_clock_restarts_when_it_changes() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut tracker = Tracker::default();
        assert!(step(&mut tracker, &[("a", 1)], t0).is_empty());
        assert_eq!(tracker.next_deadline(), Some(t0 + QUIET));
        assert!(
            step(&mut tracker, &[("a", 2)], ms(400)).is_empty(),
            "changed: waits"
        );
        assert!(
            step(&mut tracker, &[("a", 2)], ms(800)).is_empty(),
            "quiet since 400 only"
        );
        assert_eq!(step(&mut tracker, &[("a", 2)], ms(900)), ["+a"]);
        assert_eq!(tracker.next_deadline(), None);
        assert!(
            step(&mut tracker, &[("a", 2)], ms(2000)).is_empty(),
            "reported once"
        );
    }

    #[test]
    fn a_view_rewritten_changes_only_when_the_new_version_is_complete() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let old = Found {
            name: "a".into(),
            dir: "/catalog/dir1".into(),
            fingerprint: Fingerprint::fake(1),
        };
        let mut tracker = Tracker::new(std::slice::from_ref(&old));
        assert!(
            step(&mut tracker, &[("a", 1)], t0).is_empty(),
            "the start state"
        );
        let mut events = Vec::new();
        tracker.after_walk(walk_of(&[("a", 2)]), ms(100), &mut events);
        tracker.settle(ms(700), |_| Err("truncated".into()), &mut events);
        assert!(
            events.is_empty(),
            "an incomplete rewrite keeps the old view"
        );
        assert_eq!(tracker.next_deadline(), None, "and is not checked again");
        tracker.settle(ms(800), complete, &mut events);
        assert!(events.is_empty(), "until its files change");
        assert!(step(&mut tracker, &[("a", 3)], ms(900)).is_empty());
        assert_eq!(step(&mut tracker, &[("a", 3)], ms(1400)), ["~a"]);
    }

    #[test]
    fn a_view_gone_disappears_at_once_unless_the_walk_could_not_see_it() {
        let t0 = Instant::now();
        let mut tracker = Tracker::default();
        step(&mut tracker, &[("a", 1), ("b/c", 2), ("d", 3)], t0);
        let later = t0 + QUIET;
        assert_eq!(
            step(&mut tracker, &[("a", 1), ("b/c", 2), ("d", 3)], later).len(),
            3
        );
        let mut walk = walk_of(&[("d", 3)]);
        walk.unsure.push("b".into());
        let mut events = Vec::new();
        tracker.after_walk(walk, later, &mut events);
        assert_eq!(
            names(&events),
            ["-a"],
            "b/c is under an unreadable directory: kept"
        );
    }

    #[test]
    fn a_check_that_panics_is_not_repeated_until_the_files_change() {
        let t0 = Instant::now();
        let mut tracker = Tracker::default();
        step(&mut tracker, &[("a", 1)], t0);
        let mut events = Vec::new();
        let settle = std::panic::AssertUnwindSafe(|| {
            tracker.settle(t0 + QUIET, |_| panic!("a bug in the check"), &mut events)
        });
        assert!(std::panic::catch_unwind(settle).is_err());
        assert_eq!(
            tracker.next_deadline(),
            None,
            "no busy loop on the same files"
        );
        assert!(step(&mut tracker, &[("a", 2)], t0 + QUIET).is_empty());
        assert_eq!(step(&mut tracker, &[("a", 2)], t0 + 2 * QUIET), ["+a"]);
    }

    #[test]
    fn a_candidate_gone_before_its_quiet_period_ends_is_never_reported() {
        let t0 = Instant::now();
        let mut tracker = Tracker::default();
        step(&mut tracker, &[("a", 1)], t0);
        assert!(step(&mut tracker, &[], t0 + QUIET).is_empty());
        assert_eq!(tracker.next_deadline(), None);
    }
}
