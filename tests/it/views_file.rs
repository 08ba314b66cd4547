//! `--views FILE`: each view of the file is byte for byte `materialize` of its adapters;
//! edits of the file (by rename, as editors save) and of its adapters are followed; a bad
//! file mounts nothing, a bad edit keeps the views.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use crate::mount::can_mount;
use crate::views::*;

/// Write `text` as the file at `path` the way editors save: a new file renamed over it.
fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The bytes of every file of `dir`.
fn tree(dir: &Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    read_tree(dir)
}

#[test]
fn a_views_file_serves_its_views_and_follows_its_edits() {
    if !can_mount() {
        return eprintln!("skipped: this machine cannot mount FUSE (no /dev/fuse or not root)");
    }
    let f = fixture();
    let [a, b, c] = [0, 1, 2].map(|i| arg(&f.adapters[i]));
    let file = f.tmp.path().join("views.toml");
    // Relative paths are the file's directory's: `c` is f.tmp/c.
    save(
        &file,
        &format!(
            "[views.one]\nadapters = [\"{a}\"]\n\n\
             [views.\"mix/x\"]\nadapters = [{{ path = \"{a}\", weight = 0.5 }}, \"c:-1.25\"]\n\
             dtype = \"f16\"\n"
        ),
    );
    let log = f.tmp.path().join("log");
    let mnt = f.tmp.path().join("mnt");
    let guard = mount(
        &f,
        &mnt,
        &["--views".into(), arg(&file), "--log-file".into(), arg(&log)],
    );
    let m = guard.mountpoint.clone();
    let want_one = materialized(&f, "one", std::slice::from_ref(&a), &[]);
    assert_same_tree(&m.join("one"), &want_one);
    let mix = [format!("{a}:0.5"), format!("{c}:-1.25")];
    assert_same_tree(
        &m.join("mix/x"),
        &materialized(&f, "mix", &mix, &["--dtype", "f16"]),
    );
    let (ok, out, err) = view_cmd(&["ls", "--json", &arg(&m)]);
    assert!(ok, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    for view in listed.as_array().unwrap() {
        assert_eq!(view["source"], "file", "{out}");
    }
    let (_, out, _) = view_cmd(&["ls", &arg(&m)]);
    assert!(out.lines().all(|l| l.ends_with("  (views file)")), "{out}");

    // Edited: a weight changed, a view removed, one added.
    save(
        &file,
        &format!(
            "[views.\"mix/x\"]\nadapters = [\"{a}:0.25\", \"c:-1.25\"]\ndtype = \"f16\"\n\n\
             [views.two]\nadapters = [\"b\"]\n"
        ),
    );
    // Applied in one reading, in name order: once `two` is there, `mix/x` changed.
    eventually("the edit is applied", || {
        !m.join("one").exists() && m.join("two/config.json").exists()
    });
    let mix = [format!("{a}:0.25"), format!("{c}:-1.25")];
    let want_mix = materialized(&f, "mix2", &mix, &["--dtype", "f16"]);
    assert_same_tree(&m.join("mix/x"), &want_mix);
    assert_same_tree(
        &m.join("two"),
        &materialized(&f, "two", std::slice::from_ref(&b), &[]),
    );

    // An invalid edit keeps the views, with a log line saying why.
    save(&file, "[views.two]\nadapters = [\"b\"]\nwieght = 2\n");
    eventually("the bad edit is logged", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("\"wieght\""))
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(m.join("mix/x/config.json").exists(), "views kept");
    assert!(tree(&m.join("mix/x")) == tree(&want_mix));

    // An adapter of a view replaced (by rename): the view is rebuilt from it.
    let copy = f.tmp.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for name in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(f.adapters[1].join(name), copy.join(name)).unwrap();
    }
    save(&file, "[views.two]\nadapters = [\"copy\"]\n");
    eventually("the view of the copy", || {
        !m.join("mix").exists() && m.join("two/config.json").exists()
    });
    let want_c = materialized(&f, "c", std::slice::from_ref(&c), &[]);
    for name in ["adapter_model.safetensors", "adapter_config.json"] {
        let staged = copy.join(format!("{name}.new"));
        std::fs::copy(f.adapters[2].join(name), &staged).unwrap();
        std::fs::rename(&staged, copy.join(name)).unwrap();
    }
    eventually("the view follows its adapter", || {
        tree(&m.join("two")) == tree(&want_c)
    });
    assert_same_tree(&m.join("two"), &want_c);
}

#[test]
fn a_bad_views_file_mounts_nothing() {
    let f = fixture();
    let a = arg(&f.adapters[0]);
    let mnt = f.tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let file = f.tmp.path().join("views.toml");
    let mount_with = |extra: &[&str]| {
        let mut args = vec!["mount", f.base.to_str().unwrap(), mnt.to_str().unwrap()];
        args.extend_from_slice(&["--views", file.to_str().unwrap()]);
        args.extend_from_slice(extra);
        run_lorafs(args)
    };
    let cases = [
        (
            format!("[views.v]\nadapters = [\"{a}\"]\ndensty = 1"),
            "\"densty\"",
        ),
        (
            format!("[views.\"../v\"]\nadapters = [\"{a}\"]"),
            "view name",
        ),
        ("[views.v]\nadapters = [\"missing\"]".to_string(), "missing"),
        (
            format!("[views.v]\nadapters = [\"{a}\"]\ncombine = \"ties\""),
            "needs density",
        ),
    ];
    for (text, want) in &cases {
        std::fs::write(&file, text).unwrap();
        let (ok, _, err) = mount_with(&[]);
        assert!(
            !ok && err.contains("views file") && err.contains(want),
            "{text:?}: {err}"
        );
    }
    std::fs::write(&file, format!("[views.v]\nadapters = [\"{a}\"]")).unwrap();
    let (ok, _, err) = mount_with(&["--view", &format!("v={a}")]);
    assert!(!ok && err.contains("a view named v exists"), "{err}");
    let catalog = f.tmp.path().join("catalog");
    let in_catalog = catalog.join("v");
    std::fs::create_dir_all(&in_catalog).unwrap();
    for name in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(f.adapters[1].join(name), in_catalog.join(name)).unwrap();
    }
    let (ok, _, err) = mount_with(&["--catalog", catalog.to_str().unwrap()]);
    assert!(
        !ok && err.contains("also a view of the views file"),
        "{err}"
    );
    std::fs::remove_file(&file).unwrap();
    let (ok, _, err) = mount_with(&[]);
    assert!(!ok && err.contains("views file"), "{err}");
    assert!(
        std::fs::read_dir(&mnt).unwrap().next().is_none(),
        "nothing mounted"
    );
}

#[test]
fn inspect_shows_the_views_of_a_file_each_with_its_dtype() {
    let f = fixture();
    let file = f.tmp.path().join("views.toml");
    std::fs::write(
        &file,
        "[views.half]\nadapters = [\"a\"]\ndtype = \"f16\"\n\n[views.full]\nadapters = [\"b:0.5\"]\n",
    )
    .unwrap();
    let (ok, out, err) = run_lorafs([
        "inspect",
        &arg(&f.base),
        "--views",
        &arg(&file),
        "--dtype",
        "f32",
    ]);
    assert!(ok, "{err}");
    let full = out.find("\nview full\n").expect("view full listed");
    let half = out.find("\nview half\n").expect("view half listed");
    assert!(full < half, "{out}");
    assert!(out[full..half].contains("dtype     F32"), "{out}");
    assert!(out[half..].contains("dtype     F16"), "{out}");
    assert!(out[full..half].contains("(weight 0.5)"), "{out}");
}

#[test]
fn a_views_file_view_with_combine_equals_materialize_with_combine() {
    if !can_mount() {
        return eprintln!("skipped: this machine cannot mount FUSE (no /dev/fuse or not root)");
    }
    let f = fixture();
    let [a, b, c] = [0, 1, 2].map(|i| arg(&f.adapters[i]));
    let views: [(&str, Vec<String>, &str, Vec<&str>); 3] = [
        (
            "cat",
            vec![format!("{a}:0.5"), b.clone(), format!("{c}:-1.25")],
            "combine = \"cat\"",
            vec!["--combine", "cat"],
        ),
        (
            "svd",
            vec![a.clone(), format!("{b}:0.5")],
            "combine = \"svd\"\nsvd_rank = 2",
            vec!["--combine", "svd", "--svd-rank", "2"],
        ),
        (
            "dare",
            vec![format!("{a}:0.7"), format!("{a}:0.3")],
            "combine = \"dare_ties\"\ndensity = 0.5\nmajority_sign = \"frequency\"\nseed = 3",
            vec![
                "--combine",
                "dare_ties",
                "--density",
                "0.5",
                "--majority-sign",
                "frequency",
                "--seed",
                "3",
            ],
        ),
    ];
    let mut text = String::new();
    for (name, adapters, combine, _) in &views {
        let listed: Vec<String> = adapters.iter().map(|a| format!("{a:?}")).collect();
        text += &format!(
            "[views.{name}]\nadapters = [{}]\n{combine}\n\n",
            listed.join(", ")
        );
    }
    let file = f.tmp.path().join("views.toml");
    std::fs::write(&file, text).unwrap();
    let mnt = f.tmp.path().join("mnt");
    let guard = mount(&f, &mnt, &["--views".into(), arg(&file)]);
    for (name, adapters, _, flags) in &views {
        let want = materialized(&f, name, adapters, flags);
        assert_same_tree(&guard.mountpoint.join(name), &want);
    }
}
