//! Machine-readable output: `inspect --json` checked against the plan it must describe, and
//! `stats` (the stats file parsed, `--json`, `--watch`, its errors) on real mounts.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;
use crate::mount::{can_mount, MountGuard};

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// The small model's plan: two q_proj tensors (one per layer) of rank 4, alpha 8.
#[test]
fn inspect_json_describes_the_plan() {
    let (tmp, spec, base, adapter) = small_model();
    let weighted = format!("{}:0.5", adapter.display());
    let (ok, out, err) = run_lorafs([
        "inspect".as_ref(),
        base.as_os_str(),
        "--adapter".as_ref(),
        weighted.as_ref(),
        "--json".as_ref(),
        "--tensors".as_ref(),
    ]);
    assert!(ok, "{err}");
    let plan = json_of(&out);
    assert_eq!(plan["schema"], 1);
    assert_eq!(
        plan["base"]["dir"],
        base.canonicalize().unwrap().to_str().unwrap()
    );
    let files = read_tree(&base);
    assert_eq!(plan["base"]["files"], files.len());
    assert_eq!(plan["base"]["safetensors_files"], 1);
    let tensors = read_safetensors(&base.join("model.safetensors"));
    assert_eq!(plan["base"]["tensors"], tensors.len());
    let parameters: usize = tensors
        .values()
        .map(|(_, shape, _)| shape.iter().product::<usize>())
        .sum();
    assert_eq!(plan["base"]["parameters"], parameters);
    assert!(plan["kernel"].is_string());
    assert!(plan.get("views").is_none(), "one merged model: no views");
    assert_eq!(plan["dtype"], Value::Null);

    let a = &plan["adapters"][0];
    assert_eq!(plan["adapters"].as_array().unwrap().len(), 1);
    assert_eq!(a["dir"], adapter.canonicalize().unwrap().to_str().unwrap());
    assert_eq!(a["weight"], 0.5);
    assert_eq!(a["peft_type"], "LORA");
    assert_eq!(
        (a["rank"].clone(), a["alpha"].clone()),
        (json!(4), json!(8.0))
    );
    assert_eq!(a["use_rslora"], false);
    // weight · alpha / r = 0.5 · 8 / 4, on one q_proj per layer.
    assert_eq!(a["scales"], json!([{"scale": 1.0, "modules": spec.layers}]));
    assert_eq!(a["tensors_changed"], spec.layers);
    assert_eq!(a["features"]["dora"], 0);

    assert_eq!(plan["merge"]["tensors_merged"], spec.layers);
    assert_eq!(plan["merge"]["base_tensors"], tensors.len());
    assert_eq!(plan["merge"]["files"], json!(["model.safetensors"]));
    assert_eq!(plan["vocab_resize"], Value::Null);
    let trainable = a["parameters"].as_u64().unwrap();
    assert_eq!(trainable as usize, spec.layers * 4 * 2 * spec.hidden);
    assert_eq!(plan["parameters"]["trainable"], trainable);
    assert_eq!(plan["parameters"]["all"], parameters as u64 + trainable);

    let merged = plan["tensors"].as_array().unwrap();
    assert_eq!(merged.len(), spec.layers);
    for (l, t) in merged.iter().enumerate() {
        assert_eq!(
            t["name"],
            format!("model.layers.{l}.self_attn.q_proj.weight")
        );
        assert_eq!(t["dtype"], "BF16");
        assert_eq!(t["shape"], json!([spec.hidden, spec.hidden]));
        assert_eq!(t["rank"], 4);
        assert_eq!(t["replaced_by"], Value::Null);
        assert_eq!(
            t["terms"],
            json!([{"adapter": 0, "module": format!("model.layers.{l}.self_attn.q_proj"),
                    "rank": 4, "scale": 1.0, "transposed": false, "kind": "lora"}])
        );
    }
    drop(tmp);
}

#[test]
fn inspect_json_of_views_lists_each_under_its_name() {
    let (tmp, _spec, base, adapter) = small_model();
    let (ok, out, err) = run_lorafs([
        "inspect".as_ref(),
        base.as_os_str(),
        "--view".as_ref(),
        format!("one={}", adapter.display()).as_ref(),
        "--view".as_ref(),
        format!("half={}:0.5", adapter.display()).as_ref(),
        "--json".as_ref(),
        "--dtype".as_ref(),
        "f32".as_ref(),
    ]);
    assert!(ok, "{err}");
    let plan = json_of(&out);
    assert_eq!(plan["schema"], 1);
    assert!(plan["base"]["tensors"].as_u64().unwrap() > 0);
    let views = plan["views"].as_array().unwrap();
    let names: Vec<&str> = views.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["one", "half"], "in the order given");
    assert_eq!(views[0]["adapters"][0]["scales"][0]["scale"], 2.0);
    assert_eq!(views[1]["adapters"][0]["scales"][0]["scale"], 1.0);
    assert_eq!(views[0]["dtype"], "F32");
    assert!(
        views[0].get("tensors").is_none(),
        "tensors only with --tensors"
    );
    drop(tmp);
}

/// The stats file's text, parsed and printed back, is the text: the typed counters and the
/// server agree on every line.
#[test]
fn stats_of_the_server_round_trip_through_the_parser() {
    let (tmp, _spec, base, adapter) = small_model();
    let view = open_engine(&base, &[(&adapter, 1.0)]).unwrap();
    let before = lorafs::fuse::stats_text(&view.engine);
    let parsed = lorafs::stats::Stats::parse(&before).unwrap();
    assert!(
        parsed.other.is_empty(),
        "a line the parser does not know: {before}"
    );
    assert_eq!(parsed.to_string(), before);
    let file = (view.files.iter())
        .position(|f| f.rel == Path::new("model.safetensors"))
        .unwrap();
    let mut buf = vec![0u8; view.files[file].size as usize];
    view.read_at(file, 0, &mut buf).unwrap();
    let after = lorafs::stats::Stats::parse(&lorafs::fuse::stats_text(&view.engine)).unwrap();
    assert_eq!(after.bytes_read, parsed.bytes_read + buf.len() as u64);
    assert!(after.bytes_merged > parsed.bytes_merged);
    drop(tmp);
}

fn stats_cmd(mountpoint: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut args: Vec<OsString> = vec!["stats".into(), mountpoint.into()];
    args.extend(extra.iter().map(OsString::from));
    run_lorafs(&args)
}

#[test]
fn stats_of_a_path_that_is_not_a_mount_is_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, out, err) = stats_cmd(tmp.path(), &["--json"]);
    assert!(!ok && out.is_empty());
    assert!(
        err.contains("is not a lorafs mount (nothing is mounted there)"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let (ok, _, err) = stats_cmd(Path::new("/proc"), &[]);
    assert!(!ok && err.contains("it is a proc mount"), "{err}");
}

/// A mount of the small model that warms nothing (the counters move only when read).
fn mount_small(dir: &Path, base: &Path, adapter: &Path, extra: &[&str]) -> MountGuard {
    let mut args: Vec<OsString> = vec![
        "--adapter".into(),
        adapter.into(),
        "--warm".into(),
        "never".into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    MountGuard::new(base, &dir.join("mnt"), &args)
}

#[test]
fn stats_json_counts_what_was_read() {
    if !can_mount() {
        return;
    }
    let (tmp, _spec, base, adapter) = small_model();
    let guard = mount_small(tmp.path(), &base, &adapter, &[]);
    let m = &guard.mountpoint;
    let (ok, out, err) = stats_cmd(m, &["--json"]);
    assert!(ok, "{err}");
    let before = json_of(&out);
    assert_eq!(before["mountpoint"], m.to_str().unwrap());
    assert!(before["kernel"].is_string() && before["pid"].as_u64().unwrap() > 0);
    let size = std::fs::read(m.join("model.safetensors")).unwrap().len() as u64;
    let (ok, out, err) = stats_cmd(m, &["--json"]);
    assert!(ok, "{err}");
    let after = json_of(&out);
    let counter = |v: &Value, name: &str| v[name].as_u64().unwrap_or_else(|| panic!("{name}: {v}"));
    assert!(counter(&after, "bytes_read") >= counter(&before, "bytes_read") + size);
    assert!(counter(&after, "bytes_merged") > counter(&before, "bytes_merged"));
    assert!(counter(&after, "cache_misses") > 0);
    // Every counter of the stats file is a key, with its type.
    let text = std::fs::read_to_string(m.join(".lorafs-stats")).unwrap();
    for line in text.lines() {
        let (name, value) = line.split_once(' ').unwrap();
        match name {
            "kernel" | "transport" => assert_eq!(after[name], value),
            _ => assert!(after[name].is_u64(), "{name}: {after}"),
        }
    }
    let (ok, table, err) = stats_cmd(m, &[]);
    assert!(ok, "{err}");
    assert!(
        table.contains("bytes read") && table.contains("hit rate"),
        "{table}"
    );
    let transport = after["transport"].as_str().unwrap();
    assert!(table.contains(&format!("transport {transport}")), "{table}");
    assert!(table.contains("KiB"), "sizes in units: {table}");
}

/// `lorafs stats MNT --watch=0.2 EXTRA...`, its stdout and stderr piped.
fn spawn_watch(mountpoint: &Path, extra: &[&str]) -> std::process::Child {
    Command::new(lorafs_bin())
        .arg("stats")
        .arg(mountpoint)
        .arg("--watch=0.2")
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn stats_watch_prints_json_lines_and_ends_when_the_mount_goes() {
    if !can_mount() {
        return;
    }
    let (tmp, _spec, base, adapter) = small_model();
    let guard = mount_small(tmp.path(), &base, &adapter, &[]);
    let mut watch = spawn_watch(&guard.mountpoint, &["--json"]);
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = json_of(&lines.next().unwrap().unwrap());
    assert_eq!(
        first["interval_secs"],
        Value::Null,
        "no interval yet: {first}"
    );
    std::fs::read(guard.mountpoint.join("model.safetensors")).unwrap();
    // A later line covers the read: its rate is over its interval.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen_rate = false;
    while !seen_rate && Instant::now() < deadline {
        let line = json_of(&lines.next().unwrap().unwrap());
        assert!(line["interval_secs"].as_f64().unwrap() > 0.0, "{line}");
        assert!(line["time"].as_f64().unwrap() > 0.0, "{line}");
        seen_rate = line["bytes_read_per_sec"].as_f64().unwrap() > 0.0;
    }
    assert!(seen_rate, "the read shows as a rate");
    drop(guard);
    // Unmounted: the watch says so and exits 0.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = watch.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = watch.kill();
            panic!("the watch did not end with the mount");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    for line in &rest {
        json_of(line);
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut watch.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("stopped watching"), "{err}");
}

#[test]
fn stats_watch_in_text_prints_blocks_with_rates() {
    if !can_mount() {
        return;
    }
    let (tmp, _spec, base, adapter) = small_model();
    let guard = mount_small(tmp.path(), &base, &adapter, &[]);
    let mut watch = spawn_watch(&guard.mountpoint, &[]);
    std::thread::sleep(Duration::from_millis(900));
    watch.kill().unwrap();
    let out = watch.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains('\x1b'),
        "no cursor movement into a pipe: {text:?}"
    );
    let blocks: Vec<&str> = text.split("\n\n").collect();
    assert!(blocks.len() >= 2, "{text}");
    assert!(blocks[0].contains("the first reading"), "{text}");
    assert!(
        blocks[1].contains("rates over        the last 0."),
        "{text}"
    );
}

#[test]
fn stats_refused_to_others_and_when_a_base_file_shadows_it() {
    if !can_mount() {
        return;
    }
    let (tmp, _spec, base, adapter) = small_model();
    // tempdirs are 0700: open the way for nobody, as a shared directory would be.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let guard = mount_small(tmp.path(), &base, &adapter, &["--allow-other"]);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(lorafs_bin())
        .arg("stats")
        .arg(&guard.mountpoint)
        .output()
        .expect("setpriv (util-linux) runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("permission denied: only the user who mounted") && err.contains("uid 0"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    drop(guard);

    std::fs::write(base.join(".lorafs-stats"), b"the model's own file\n").unwrap();
    let guard = MountGuard::new(
        &base,
        &tmp.path().join("mnt2"),
        &["--adapter".into(), adapter.clone().into()],
    );
    let (ok, _, err) = stats_cmd(&guard.mountpoint, &["--json"]);
    assert!(!ok);
    assert!(err.contains("the base has a file of that name"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn version_names_the_kernels_of_the_build_and_of_this_cpu() {
    use lorafs::kernel::Kernel;
    let (ok, out, err) = run_lorafs(["--version"]);
    assert!(ok, "{err}");
    let compiled: Vec<&str> = Kernel::compiled().iter().rev().map(|k| k.name()).collect();
    let best = Kernel::available().last().unwrap().name();
    let expected = format!(
        "lorafs {} (kernels: {}; this CPU: {best}",
        env!("CARGO_PKG_VERSION"),
        compiled.join(", ")
    );
    assert!(out.starts_with(&expected), "{out:?} vs {expected:?}");
    assert!(compiled.ends_with(&["scalar"]), "{compiled:?}");
    let forced = output_of(
        Command::new(lorafs_bin())
            .arg("--version")
            .env("LORAFS_KERNEL", "scalar"),
    );
    match best {
        "scalar" => assert!(!forced.1.contains("in use"), "{}", forced.1),
        _ => assert!(
            forced.1.contains("in use: scalar (LORAFS_KERNEL))"),
            "{}",
            forced.1
        ),
    }
}

/// The subcommands every generated document must name.
const SUBCOMMANDS: [&str; 8] = [
    "materialize",
    "mount",
    "unmount",
    "view",
    "inspect",
    "stats",
    "completions",
    "man",
];

#[test]
fn completion_scripts_are_generated_for_each_shell_and_bash_accepts_its_own() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (ok, out, err) = run_lorafs(["completions", shell]);
        assert!(ok, "{shell}: {err}");
        for word in SUBCOMMANDS.iter().chain(&["--adapter", "--watch"]) {
            assert!(out.contains(word), "{shell}: {word} missing");
        }
    }
    let (_, script, _) = run_lorafs(["completions", "bash"]);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("lorafs.bash");
    std::fs::write(&file, &script).unwrap();
    let (ok, _, err) = output_of(Command::new("bash").arg("-n").arg(&file));
    assert!(ok, "bash -n: {err}");
    let (ok, _, err) = run_lorafs(["completions", "tcsh"]);
    assert!(!ok && err.contains("tcsh"), "{err}");
}

#[test]
fn man_pages_name_every_subcommand_and_render() {
    let (ok, page, err) = run_lorafs(["man"]);
    assert!(ok, "{err}");
    assert!(page.contains(".TH lorafs 1"), "{page}");
    for sub in SUBCOMMANDS {
        assert!(
            page.contains(&format!("lorafs\\-{sub}(1)")),
            "{sub} missing"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("man1");
    let (ok, out, err) = run_lorafs(["man".as_ref(), "--dir".as_ref(), dir.as_os_str()]);
    assert!(ok, "{err}");
    let mut pages: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    assert_eq!(
        out.lines().count(),
        pages.len(),
        "each page written is listed: {out}"
    );
    for sub in SUBCOMMANDS
        .iter()
        .map(|s| format!("lorafs-{s}.1"))
        .chain(["lorafs.1".into(), "lorafs-view-ls.1".into()])
    {
        assert!(pages.contains(&sub), "{sub} not in {pages:?}");
    }
    let stats_page = std::fs::read_to_string(dir.join("lorafs-stats.1")).unwrap();
    let title = format!(
        ".TH lorafs-stats 1  \"lorafs {}\"",
        env!("CARGO_PKG_VERSION")
    );
    assert!(stats_page.contains(&title), "{title} not in {stats_page}");
    if Command::new("man").arg("--version").output().is_err() {
        eprintln!("man is not installed: the pages are checked as roff only");
        return;
    }
    let rendered = output_of(
        Command::new("man")
            .arg("-l")
            .arg(dir.join("lorafs-stats.1"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"),
    );
    assert!(rendered.0, "man -l: {}", rendered.2);
    assert!(
        rendered.1.contains("--watch") && rendered.1.contains("SYNOPSIS"),
        "{}",
        rendered.1
    );
}
