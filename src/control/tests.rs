//! The control served on made-up socket names, driven by the client and by raw peers
//! (malformed, oversized, of another user).

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::protocol::{AdapterEntry, MAX_REQUEST_BYTES};
use super::*;

/// A registry in a map; adding a view named `panic` panics, as a bug would.
#[derive(Default)]
struct FakeControl {
    views: Mutex<BTreeMap<String, Vec<(PathBuf, f64)>>>,
}

impl ViewControl for FakeControl {
    fn list(&self) -> Vec<ViewInfo> {
        let views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        views
            .iter()
            .map(|(name, adapters)| ViewInfo {
                name: name.clone(),
                adapters: adapters.clone(),
                source: ViewSource::Named,
            })
            .collect()
    }

    fn add(&self, name: &str, adapters: Vec<(PathBuf, f64)>) -> Result<(), String> {
        assert_ne!(name, "panic", "a bug in the registry");
        let mut views = self.views.lock().unwrap();
        if views.contains_key(name) {
            return Err(format!("view {name} exists"));
        }
        views.insert(name.into(), adapters);
        Ok(())
    }

    fn set(&self, name: &str, adapters: Vec<(PathBuf, f64)>) -> Result<(), String> {
        let mut views = self.views.lock().unwrap();
        let view = views.get_mut(name).ok_or(format!("no view {name}"))?;
        *view = adapters;
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), String> {
        match self.views.lock().unwrap().remove(name) {
            Some(_) => Ok(()),
            None => Err(format!("no view {name}")),
        }
    }
}

/// A socket name no other test (or test run) uses.
fn unique_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("lorafs-test-control/{}/{n}", std::process::id())
}

const MNT: &str = "/test/mnt";

fn me() -> Option<u32> {
    Some(rustix::process::geteuid().as_raw())
}

fn ask(name: &str, request: &Request) -> Response {
    request_at(name, Path::new(MNT), me(), request).unwrap()
}

fn adapters(list: &[(&str, f64)]) -> Vec<AdapterEntry> {
    list.iter()
        .map(|&(dir, weight)| AdapterEntry {
            dir: dir.into(),
            weight,
        })
        .collect()
}

fn names(response: Response) -> Vec<String> {
    match response {
        Response::Views(views) => views.into_iter().map(|v| v.name).collect(),
        Response::Refused(why) => panic!("refused: {why}"),
    }
}

fn refusal(response: Response) -> String {
    match response {
        Response::Refused(why) => why,
        Response::Views(views) => panic!("answered {views:?}"),
    }
}

/// Send raw bytes and close the sending side, read the answer.
fn raw(name: &str, bytes: &[u8]) -> Response {
    let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let mut stream = UnixStream::connect_addr(&address).unwrap();
    // A server that refuses this user answers without reading, and may have closed: its
    // answer is still there to read.
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut answer)
        .unwrap();
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn views_are_listed_added_set_and_removed() {
    let name = unique_name();
    let _server = serve_at(&name, Arc::new(FakeControl::default())).unwrap();
    assert!(names(ask(&name, &Request::Ls)).is_empty());
    let add = |view: &str, list: &[(&str, f64)]| Request::Add {
        name: view.into(),
        adapters: adapters(list),
    };
    assert_eq!(names(ask(&name, &add("b", &[("/l/b", 1.0)]))), ["b"]);
    assert_eq!(
        names(ask(&name, &add("a/x", &[("/l/a", 1.0), ("/l/c", 0.5)]))),
        ["a/x", "b"]
    );
    assert!(refusal(ask(&name, &add("b", &[("/l/z", 1.0)]))).contains("exists"));
    let set = Request::Set {
        name: "b".into(),
        adapters: adapters(&[("/l/d", 2.0)]),
    };
    match ask(&name, &set) {
        Response::Views(views) => {
            assert_eq!(views[1].spec, "/l/d:2");
            assert_eq!(views[0].spec, "/l/a:1,/l/c:0.5");
            assert_eq!(views[0].source, ViewSource::Named);
        }
        other => panic!("{other:?}"),
    }
    let rm = |view: &str| Request::Rm { name: view.into() };
    assert_eq!(names(ask(&name, &rm("b"))), ["a/x"]);
    assert!(refusal(ask(&name, &rm("b"))).contains("no view b"));
}

#[test]
fn the_server_checks_names_and_adapters_itself() {
    let name = unique_name();
    let control = Arc::new(FakeControl::default());
    let _server = serve_at(&name, control.clone()).unwrap();
    let cases = [
        ("../x", adapters(&[("/l/a", 1.0)]), "starting with '.'"),
        ("x", adapters(&[("rel", 1.0)]), "not an absolute path"),
        ("x", adapters(&[]), "at least one adapter"),
    ];
    for (view, list, why) in cases {
        let request = Request::Add {
            name: view.into(),
            adapters: list,
        };
        let refused = refusal(ask(&name, &request));
        assert!(refused.contains(why), "{refused}");
    }
    // JSON has no NaN: a weight that is not a number does not even parse.
    let nan = br#"{"op":"add","name":"x","adapters":[{"dir":"/a","weight":null}]}"#;
    assert!(refusal(raw(&name, &[&nan[..], b"\n"].concat())).contains("malformed"));
    assert!(control.list().is_empty());
}

#[test]
fn a_panic_costs_its_request_only() {
    let name = unique_name();
    let _server = serve_at(&name, Arc::new(FakeControl::default())).unwrap();
    let request = Request::Add {
        name: "panic".into(),
        adapters: adapters(&[("/l/a", 1.0)]),
    };
    assert!(refusal(ask(&name, &request)).contains("internal error"));
    assert!(names(ask(&name, &Request::Ls)).is_empty(), "still answers");
}

#[test]
fn bad_requests_are_answered_with_errors() {
    let name = unique_name();
    let _server = serve_at(&name, Arc::new(FakeControl::default())).unwrap();
    for bad in [
        &b"not json\n"[..],
        b"{\"op\":\"frob\"}\n",
        b"[1,2]\n",
        b"{}",
    ] {
        let why = refusal(raw(&name, bad));
        assert!(why.starts_with("malformed request"), "{why}");
    }
    // Exactly one byte over the limit and no newline: the server reads it all, then refuses.
    let oversized = vec![b' '; MAX_REQUEST_BYTES + 1];
    assert!(refusal(raw(&name, &oversized)).contains("longer than"));
    // A peer that connects and leaves costs nothing.
    drop(UnixStream::connect_addr(
        &SocketAddr::from_abstract_name(name.as_bytes()).unwrap(),
    ));
    // A request of the maximum length, padded with spaces, is taken.
    let mut padded = br#"{"op":"ls"}"#.to_vec();
    padded.resize(MAX_REQUEST_BYTES, b' ');
    padded.push(b'\n');
    assert!(names(raw(&name, &padded)).is_empty());
}

#[test]
fn stopping_frees_the_name_and_a_taken_name_is_refused() {
    let name = unique_name();
    let server = serve_at(&name, Arc::new(FakeControl::default())).unwrap();
    let taken = serve_at(&name, Arc::new(FakeControl::default()))
        .err()
        .unwrap();
    assert!(taken.to_string().contains("is taken"), "{taken}");
    server.stop();
    match request_at(&name, Path::new(MNT), me(), &Request::Ls) {
        Err(Error::NoAnswer { why, .. }) => assert!(why.contains("no view control"), "{why}"),
        other => panic!("{other:?}"),
    }
    let _again = serve_at(&name, Arc::new(FakeControl::default())).unwrap();
    assert!(names(ask(&name, &Request::Ls)).is_empty());
}

#[test]
fn not_a_mount_is_not_a_lorafs_mount() {
    let tmp = tempfile::tempdir().unwrap();
    for (path, why) in [
        (tmp.path(), "nothing is mounted"),
        (Path::new("/proc"), "a proc"),
    ] {
        let err = view_ls(path, false).unwrap_err().to_string();
        assert!(err.contains("is not a lorafs mount"), "{err}");
        assert!(err.contains(why), "{err}");
    }
}

/// Roles the test binary plays as user nobody, run by [`as_nobody`].
const ROLE: &str = "LORAFS_CONTROL_TEST_ROLE";
const SOCKET: &str = "LORAFS_CONTROL_TEST_SOCKET";
const NOBODY: u32 = 65534;

/// Not a test: run by [`as_nobody`] in a child, as user nobody, to play a peer of another
/// user. `send`: send the request line in LORAFS_CONTROL_TEST_REQUEST, print the answer.
/// `serve`: serve a fake registry until stdin closes.
#[test]
#[ignore = "a helper of the tests of other users, run by them"]
fn helper_as_another_user() {
    let (Ok(role), Ok(name)) = (std::env::var(ROLE), std::env::var(SOCKET)) else {
        return;
    };
    let mut out = std::io::stdout();
    match role.as_str() {
        "send" => {
            let request = std::env::var("LORAFS_CONTROL_TEST_REQUEST").unwrap();
            let answer = raw(&name, format!("{request}\n").as_bytes());
            writeln!(out, "answer: {}", serde_json::to_string(&answer).unwrap()).unwrap();
        }
        "serve" => {
            let _server = serve_at(&name, Arc::new(FakeControl::default())).unwrap();
            writeln!(out, "answer: ready").unwrap();
            out.flush().unwrap();
            // Until the test closes stdin, or a minute at most should the test be gone.
            let (closed, wait) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = std::io::stdin().read_to_end(&mut Vec::new());
                let _ = closed.send(());
            });
            let _ = wait.recv_timeout(std::time::Duration::from_secs(60));
        }
        other => panic!("unknown role {other}"),
    }
}

/// This test binary, as user nobody, playing `role` on socket `name`; `None` unless root.
fn as_nobody(role: &str, name: &str, request: &str) -> Option<std::process::Child> {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipping: only root can run a peer as another user");
        return None;
    }
    let child = Command::new("setpriv")
        .args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
        ])
        .arg(std::env::current_exe().unwrap())
        .args(["control::tests::helper_as_another_user", "--exact"])
        .args(["--ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(SOCKET, name)
        .env("LORAFS_CONTROL_TEST_REQUEST", request)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux) runs");
    Some(child)
}

/// What the helper printed after `answer: ` (the test harness starts that line with the
/// test's name).
fn answer_of(child: &mut std::process::Child) -> String {
    let stdout = child.stdout.as_mut().unwrap();
    let line = std::io::BufReader::new(stdout)
        .lines()
        .map(|line| line.unwrap())
        .find_map(|line| Some(line.split_once("answer: ")?.1.to_string()));
    line.expect("the helper answered")
}

#[test]
fn another_user_is_refused_before_reaching_the_views() {
    let name = unique_name();
    let control = Arc::new(FakeControl::default());
    let _server = serve_at(&name, control.clone()).unwrap();
    control.add("kept", vec![("/l/a".into(), 1.0)]).unwrap();
    for request in [r#"{"op":"rm","name":"kept"}"#, r#"{"op":"ls"}"#] {
        let Some(mut child) = as_nobody("send", &name, request) else {
            return;
        };
        let answer: Response = serde_json::from_str(&answer_of(&mut child)).unwrap();
        assert!(child.wait().unwrap().success());
        let why = refusal(answer);
        assert!(why.starts_with("permission denied"), "{why}");
    }
    assert_eq!(control.list().len(), 1, "the view is still there");
}

#[test]
fn a_server_of_another_user_is_not_trusted() {
    let name = unique_name();
    let Some(mut child) = as_nobody("serve", &name, "") else {
        return;
    };
    assert_eq!(answer_of(&mut child), "ready");
    let asked = |owner| request_at(&name, Path::new(MNT), owner, &Request::Ls);
    match asked(Some(0)) {
        Err(err @ Error::Impostor { uid: NOBODY, .. }) => {
            let text = err.to_string();
            assert!(text.contains("refusing to talk to it"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    // Mounted by nobody, it is that mount's server, and it answers root.
    assert!(names(asked(Some(NOBODY)).unwrap()).is_empty());
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}
