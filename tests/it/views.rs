//! Mounts of views: each view of a mount is byte for byte `materialize` of the same spec,
//! through `read`, `pread` from threads and `mmap`; `--dtype` on both.

use std::ffi::OsString;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::*;
use crate::mount::{can_mount, MountGuard};

/// A base and three adapters on different modules and ranks.
pub(crate) struct Fixture {
    pub(crate) tmp: tempfile::TempDir,
    pub(crate) base: PathBuf,
    pub(crate) adapters: Vec<PathBuf>,
}

pub(crate) fn fixture() -> Fixture {
    let (tmp, spec, base, a) = small_model();
    let mut adapters = vec![a];
    for (name, r, filter, seed) in [("b", 8, "v_proj", 11), ("c", 3, "mlp", 12)] {
        let dir = tmp.path().join(name);
        let mut adapter = AdapterSpec::new(&spec, r, filter);
        adapter.seed = seed;
        write_adapter(&dir, &adapter);
        adapters.push(dir);
    }
    Fixture {
        tmp,
        base,
        adapters,
    }
}

/// `lorafs materialize` of `adapters` (`DIR[:W]` arguments) with `extra` flags.
pub(crate) fn materialized(
    f: &Fixture,
    name: &str,
    adapters: &[String],
    extra: &[&str],
) -> PathBuf {
    let out = f.tmp.path().join(format!("out-{}", name.replace('/', "-")));
    let mut args: Vec<OsString> = vec![
        "materialize".into(),
        f.base.clone().into(),
        out.clone().into(),
    ];
    for a in adapters {
        args.extend(["--adapter".into(), a.into()]);
    }
    args.extend(extra.iter().map(OsString::from));
    let (ok, _, err) = run_lorafs(args);
    assert!(ok, "materialize {name}: {err}");
    out
}

/// Compare every file of `dir` with `want` through whole reads, random preads from four
/// threads, and mmap.
pub(crate) fn assert_same_tree(dir: &Path, want: &Path) {
    let (got, want) = (read_tree(dir), read_tree(want));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{}: file list",
        dir.display()
    );
    for (rel, bytes) in &want {
        assert!(
            got[rel] == *bytes,
            "{}: {} differs",
            dir.display(),
            rel.display()
        );
        let path = dir.join(rel);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (path, bytes) = (&path, bytes);
                s.spawn(move || {
                    let file = std::fs::File::open(path).unwrap();
                    let mut rng = StdRng::seed_from_u64(t);
                    for _ in 0..25 {
                        let start = rng.random_range(0..=bytes.len());
                        let len = rng.random_range(0..=(bytes.len() - start).min(300_000));
                        let mut buf = vec![0u8; len];
                        file.read_exact_at(&mut buf, start as u64).unwrap();
                        assert!(buf == bytes[start..start + len], "{}", path.display());
                    }
                });
            }
        });
        let file = std::fs::File::open(&path).unwrap();
        if !bytes.is_empty() {
            // SAFETY: the mount is read-only and its files never change under an inode.
            let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
            assert!(map[..] == bytes[..], "{}: mmap", path.display());
        }
    }
}

pub(crate) fn mount(f: &Fixture, mnt: &Path, args: &[String]) -> MountGuard {
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    MountGuard::new(&f.base, mnt, &args)
}

pub(crate) fn arg(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn named_views_equal_materialize_through_read_pread_and_mmap() {
    if !can_mount() {
        return eprintln!("skipped: this machine cannot mount FUSE (no /dev/fuse or not root)");
    }
    let f = fixture();
    let [a, b, c] = [0, 1, 2].map(|i| arg(&f.adapters[i]));
    let views: Vec<(&str, Vec<String>)> = vec![
        ("one", vec![a.clone()]),
        (
            "mix",
            vec![format!("{a}:0.5"), b.clone(), format!("{c}:-1.25")],
        ),
        ("run/deep", vec![format!("{b}:2")]),
    ];
    let mut args = Vec::new();
    for (name, spec) in &views {
        args.extend(["--view".to_string(), format!("{name}={}", spec.join(","))]);
    }
    let mnt = f.tmp.path().join("mnt");
    let guard = mount(&f, &mnt, &args);
    let mut names: Vec<_> = std::fs::read_dir(&guard.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["mix", "one", "run"]);
    for (name, spec) in &views {
        let want = materialized(&f, name, spec, &[]);
        assert_same_tree(&guard.mountpoint.join(name), &want);
    }
}

#[test]
fn views_of_the_same_adapters_share_merged_blocks() {
    if !can_mount() {
        return eprintln!("skipped: this machine cannot mount FUSE (no /dev/fuse or not root)");
    }
    let f = fixture();
    let a = arg(&f.adapters[0]);
    let args = [
        "--view".to_string(),
        format!("x={a}"),
        "--view".to_string(),
        format!("y={a}"),
        "--view".to_string(),
        format!("z={a}:0.5"),
    ];
    let mnt = f.tmp.path().join("mnt");
    let guard = mount(&f, &mnt, &args);
    let computed = || {
        let stats = std::fs::read_to_string(guard.mountpoint.join(".lorafs-stats")).unwrap();
        let line = stats
            .lines()
            .find(|l| l.starts_with("bytes_computed "))
            .unwrap()
            .to_string();
        line["bytes_computed ".len()..].parse::<u64>().unwrap()
    };
    let x = read_tree(&guard.mountpoint.join("x"));
    let after_x = computed();
    assert!(after_x > 0, "x merged something");
    let y = read_tree(&guard.mountpoint.join("y"));
    assert_eq!(x, y);
    assert_eq!(
        computed(),
        after_x,
        "y is x's recipes: its blocks come from the cache"
    );
    let z = read_tree(&guard.mountpoint.join("z"));
    assert_ne!(x, z, "another weight is another model");
    assert!(computed() > after_x, "z's blocks are its own");
}

#[test]
fn adapter_with_views_is_refused_and_a_bad_view_mounts_nothing() {
    let f = fixture();
    let mnt = f.tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let a = arg(&f.adapters[0]);
    let (ok, _, err) = run_lorafs([
        "mount",
        &arg(&f.base),
        &arg(&mnt),
        "--adapter",
        &a,
        "--view",
        &format!("v={a}"),
    ]);
    assert!(!ok && err.contains("use one or the other"), "{err}");
    let missing = f.tmp.path().join("missing");
    let (ok, _, err) = run_lorafs([
        "mount",
        &arg(&f.base),
        &arg(&mnt),
        "--view",
        &format!("good={a}"),
        "--view",
        &format!("bad={}", arg(&missing)),
    ]);
    assert!(
        !ok && err.contains("view bad") && err.contains("missing"),
        "{err}"
    );
    for name in ["../up", ".hidden", "a b", ""] {
        let (ok, _, err) = run_lorafs([
            "mount",
            &arg(&f.base),
            &arg(&mnt),
            "--view",
            &format!("{name}={a}"),
        ]);
        assert!(!ok && err.contains("view name"), "{name}: {err}");
    }
    assert!(
        std::fs::read_dir(&mnt).unwrap().next().is_none(),
        "nothing mounted"
    );
}

#[test]
fn dtype_mount_equals_materialize_and_config_says_it() {
    if !can_mount() {
        return eprintln!("skipped: this machine cannot mount FUSE (no /dev/fuse or not root)");
    }
    let f = fixture();
    let spec = vec![arg(&f.adapters[0]), format!("{}:0.5", arg(&f.adapters[2]))];
    for (dtype, torch, st) in [
        ("f32", "float32", "F32"),
        ("f16", "float16", "F16"),
        ("bf16", "bfloat16", "BF16"),
    ] {
        let want = materialized(&f, &format!("dtype-{dtype}"), &spec, &["--dtype", dtype]);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(want.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["dtype"], torch, "{dtype}: config.json");
        for (name, (dt, _, _)) in read_safetensors(&want.join("model.safetensors")) {
            assert_eq!(format!("{dt:?}"), st, "{dtype}: {name}");
        }
        let mnt = f.tmp.path().join(format!("mnt-{dtype}"));
        let mut args = vec!["--dtype".to_string(), dtype.to_string()];
        for a in &spec {
            args.extend(["--adapter".to_string(), a.clone()]);
        }
        let guard = mount(&f, &mnt, &args);
        assert_same_tree(&guard.mountpoint, &want);
        // And as a view.
        drop(guard);
        let args = [
            "--dtype".to_string(),
            dtype.to_string(),
            "--view".to_string(),
            format!("v={}", spec.join(",")),
        ];
        let guard = mount(&f, &mnt, &args);
        assert_same_tree(&guard.mountpoint.join("v"), &want);
    }
}

#[test]
fn inspect_shows_each_views_plan() {
    let f = fixture();
    let [a, b] = [0, 1].map(|i| arg(&f.adapters[i]));
    let (ok, out, err) = run_lorafs([
        "inspect",
        &arg(&f.base),
        "--view",
        &format!("one={a}"),
        "--view",
        &format!("run/mix={a}:0.5,{b}"),
        "--dtype",
        "f32",
    ]);
    assert!(ok, "{err}");
    let one = out.find("\nview one\n").expect("view one listed");
    let mix = out.find("\nview run/mix\n").expect("view run/mix listed");
    assert!(out.starts_with("base ") && one < mix, "{out}");
    assert_eq!(out.matches("dtype     F32").count(), 2, "{out}");
    assert!(
        out[mix..].contains("(weight 0.5)") && out[mix..].contains(&b),
        "{out}"
    );
    assert!(
        !out[one..mix].contains(&b),
        "view one has adapter a only: {out}"
    );
}

/// Wait up to 20 s for `cond`.
pub(crate) fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "timed out waiting: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Copy an adapter directory's two files into `to`, the weights first (as trainers write).
fn copy_adapter(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

#[test]
fn a_catalog_serves_its_checkpoints_and_follows_them_live() {
    if !can_mount() {
        return eprintln!("skipped: this machine cannot mount FUSE (no /dev/fuse or not root)");
    }
    let f = fixture();
    let catalog = f.tmp.path().join("catalog");
    copy_adapter(&f.adapters[0], &catalog.join("run1"));
    copy_adapter(&f.adapters[1], &catalog.join("run1/checkpoint-100"));
    copy_adapter(&f.adapters[2], &catalog.join("run2/checkpoint-5"));
    copy_adapter(&f.adapters[2], &catalog.join(".hidden"));
    // Not a valid adapter: not LoRA.
    copy_adapter(&f.adapters[0], &catalog.join("broken"));
    let config = catalog.join("broken/adapter_config.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    json["peft_type"] = "IA3".into();
    std::fs::write(&config, serde_json::to_vec(&json).unwrap()).unwrap();

    let mnt = f.tmp.path().join("mnt");
    let guard = mount(&f, &mnt, &["--catalog".into(), arg(&catalog)]);
    let m = &guard.mountpoint;
    for (name, adapter) in [
        ("run1", 0),
        ("run1/checkpoint-100", 1),
        ("run2/checkpoint-5", 2),
    ] {
        let want = materialized(&f, name, &[arg(&f.adapters[adapter])], &[]);
        let got = read_tree(&m.join(name));
        let own: std::collections::BTreeMap<_, _> = got
            .into_iter()
            .filter(|(rel, _)| !rel.starts_with("checkpoint-100"))
            .collect();
        assert!(own == read_tree(&want), "{name} equals materialize");
    }
    assert!(!m.join(".hidden").exists() && !m.join("broken").exists());

    // A checkpoint written while mounted appears once complete; its half-written state never
    // shows as a view.
    let new = catalog.join("run2/checkpoint-10");
    std::fs::create_dir_all(&new).unwrap();
    let weights = std::fs::read(f.adapters[1].join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        new.join("adapter_model.safetensors"),
        &weights[..weights.len() / 2],
    )
    .unwrap();
    std::fs::copy(
        f.adapters[1].join("adapter_config.json"),
        new.join("adapter_config.json"),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        !m.join("run2/checkpoint-10").exists(),
        "a half-written checkpoint is no view"
    );
    std::fs::write(new.join("adapter_model.safetensors"), &weights).unwrap();
    eventually("the new checkpoint appears", || {
        m.join("run2/checkpoint-10/config.json").exists()
    });
    let want = materialized(&f, "ckpt10", &[arg(&f.adapters[1])], &[]);
    assert_same_tree(&m.join("run2/checkpoint-10"), &want);

    // Removed: it disappears; the others stay.
    std::fs::remove_dir_all(catalog.join("run2/checkpoint-5")).unwrap();
    eventually("the removed checkpoint disappears", || {
        !m.join("run2/checkpoint-5").exists()
    });
    assert!(m.join("run2/checkpoint-10/config.json").exists());
}

#[test]
fn a_mount_point_inside_the_catalog_is_refused() {
    let f = fixture();
    let catalog = f.tmp.path().join("catalog");
    copy_adapter(&f.adapters[0], &catalog.join("a"));
    let mnt = catalog.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (ok, _, err) = run_lorafs([
        "mount",
        &arg(&f.base),
        &arg(&mnt),
        "--catalog",
        &arg(&catalog),
    ]);
    assert!(!ok && err.contains("inside the catalog"), "{err}");
}

/// Drop the kernel's cached pages of every file under `dir`, so reads reach the server.
fn drop_page_cache(dir: &Path) {
    use std::os::fd::AsRawFd;
    for rel in read_tree(dir).keys() {
        let file = std::fs::File::open(dir.join(rel)).unwrap();
        // SAFETY: posix_fadvise has no memory-safety preconditions; the descriptor is open.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "fadvise {}", rel.display());
    }
}

/// A counter of the mount's stats file.
fn stat(mnt: &Path, key: &str) -> u64 {
    let stats = std::fs::read_to_string(mnt.join(".lorafs-stats")).unwrap();
    let line = stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no {key} in {stats}"))
        .to_string();
    line.parse().unwrap()
}

#[test]
fn catalog_views_read_their_factors_when_first_read_within_the_factor_budget() {
    if !can_mount() {
        return eprintln!("skipped: this machine cannot mount FUSE (no /dev/fuse or not root)");
    }
    let f = fixture();
    let catalog = f.tmp.path().join("catalog");
    let mut wanted = Vec::new();
    for (i, adapter) in f.adapters.iter().enumerate() {
        let name = format!("checkpoint-{i}");
        copy_adapter(adapter, &catalog.join(&name));
        wanted.push((
            name.clone(),
            read_tree(&materialized(&f, &name, &[arg(adapter)], &[])),
        ));
    }
    // Without a block cache every read computes its blocks, and needs the factors again.
    for (budget, dropped) in [("4KiB", true), ("64MiB", false)] {
        let mnt = f.tmp.path().join(format!("mnt-{budget}"));
        let args = [
            "--catalog".into(),
            arg(&catalog),
            "--factor-cache".into(),
            budget.into(),
            "--cache-size".into(),
            "0".into(),
        ];
        let guard = mount(&f, &mnt, &args);
        let m = &guard.mountpoint;
        assert_eq!(stat(m, "factors_loaded"), 0, "mounting reads no factor");
        assert_eq!(stat(m, "factor_bytes"), 0);
        let mut loaded = Vec::new();
        for _ in 0..2 {
            for (name, _) in &wanted {
                drop_page_cache(&m.join(name));
            }
            for (name, want) in &wanted {
                assert!(
                    read_tree(&m.join(name)) == *want,
                    "{name} equals materialize"
                );
                if dropped {
                    assert!(stat(m, "factor_bytes") <= 4096, "within the factor budget");
                }
            }
            loaded.push(stat(m, "factors_loaded"));
        }
        assert!(loaded[0] > 0);
        assert_eq!(
            loaded[1] > loaded[0],
            dropped,
            "{budget}: factors read again only when the budget dropped them ({loaded:?})"
        );
    }
}

/// `lorafs view ARGS...`: (success, stdout, stderr).
pub(crate) fn view_cmd(args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["view"];
    all.extend_from_slice(args);
    run_lorafs(all)
}

#[test]
fn view_commands_change_a_running_mount_and_open_files_keep_their_model() {
    if !can_mount() {
        return eprintln!("skipped: this machine cannot mount FUSE (no /dev/fuse or not root)");
    }
    let f = fixture();
    let [a, b, c] = [0, 1, 2].map(|i| arg(&f.adapters[i]));
    let mnt = f.tmp.path().join("mnt");
    let guard = mount(&f, &mnt, &["--view".into(), format!("v={a}")]);
    let m = guard.mountpoint.clone();
    let mnt_arg = arg(&m);
    let want_a = materialized(&f, "a", std::slice::from_ref(&a), &[]);
    let want_bc = materialized(&f, "bc", &[format!("{b}:0.5"), c.clone()], &[]);
    let want_c = materialized(&f, "c", std::slice::from_ref(&c), &[]);
    let weights = Path::new("model.safetensors");
    let old_bytes = std::fs::read(want_a.join(weights)).unwrap();

    // Open, map and half-read v's weights, then change v under them.
    let open = std::fs::File::open(m.join("v").join(weights)).unwrap();
    // SAFETY: the mount's files never change under an inode.
    let map = unsafe { memmap2::Mmap::map(&open) }.unwrap();
    let half = old_bytes.len() / 2;
    let mut first = vec![0u8; half];
    open.read_exact_at(&mut first, 0).unwrap();
    let (ok, _, err) = view_cmd(&["set", &mnt_arg, "v", &format!("{b}:0.5,{c}")]);
    assert!(ok, "{err}");
    let mut rest = vec![0u8; old_bytes.len() - half];
    open.read_exact_at(&mut rest, half as u64).unwrap();
    first.extend(rest);
    assert!(
        first == old_bytes,
        "the open file reads the old model to the end"
    );
    assert!(map[..] == old_bytes[..], "and so does its mapping");
    assert_same_tree(&m.join("v"), &want_bc);

    // ls: one view a line, its name then its spec; add, rm.
    let (ok, out, err) = view_cmd(&["add", &mnt_arg, "run/c", &c]);
    assert!(ok, "{err}");
    assert_same_tree(&m.join("run/c"), &want_c);
    let (ok, out_ls, _) = view_cmd(&["ls", &mnt_arg]);
    assert!(ok);
    let lines: Vec<&str> = out_ls.lines().collect();
    assert_eq!(lines.len(), 2, "{out_ls}{out}");
    assert!(
        lines[0].starts_with("run/c ") && lines[0].contains(&c),
        "{out_ls}"
    );
    assert!(
        lines[1].starts_with("v ") && lines[1].contains(&format!("{b}:0.5")),
        "{out_ls}"
    );

    // A view in use removed: its open file still reads.
    let in_use = std::fs::File::open(m.join("run/c").join(weights)).unwrap();
    let (ok, _, err) = view_cmd(&["rm", &mnt_arg, "run/c"]);
    assert!(ok, "{err}");
    assert!(!m.join("run/c").exists() && !m.join("run").exists());
    let want = std::fs::read(want_c.join(weights)).unwrap();
    let mut got = vec![0u8; want.len()];
    in_use.read_exact_at(&mut got, 0).unwrap();
    assert!(got == want, "a removed view's open file reads to the end");

    // Bad specs and names fail with a message and change nothing.
    let missing = arg(&f.tmp.path().join("missing"));
    for (args, expect) in [
        (vec!["add", &mnt_arg, "x", &missing], "missing"),
        (vec!["add", &mnt_arg, "v", &a], "exists"),
        (vec!["set", &mnt_arg, "nope", &a], "no view named nope"),
        (vec!["set", &mnt_arg, "v", &missing], "missing"),
        (vec!["rm", &mnt_arg, "nope"], "no view named nope"),
        (vec!["add", &mnt_arg, "../x", &a], "view name"),
    ] {
        let (ok, _, err) = view_cmd(&args);
        assert!(!ok && err.contains(expect), "{args:?}: {err}");
    }
    let (_, after, _) = view_cmd(&["ls", &mnt_arg]);
    assert_eq!(after.lines().count(), 1, "{after}");
    assert_same_tree(&m.join("v"), &want_bc);
    drop((open, map, in_use));
}

#[test]
fn view_commands_on_a_mount_of_one_model_say_it_has_no_views() {
    if !can_mount() {
        return eprintln!("skipped: this machine cannot mount FUSE (no /dev/fuse or not root)");
    }
    let f = fixture();
    let mnt = f.tmp.path().join("mnt");
    let guard = mount(&f, &mnt, &["--adapter".into(), arg(&f.adapters[0])]);
    let (ok, _, err) = view_cmd(&["add", &arg(&guard.mountpoint), "x", &arg(&f.adapters[1])]);
    assert!(!ok && err.contains("without views"), "{err}");
}
