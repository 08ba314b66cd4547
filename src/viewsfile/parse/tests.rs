use super::*;

fn err(text: &str) -> String {
    parse(text, Path::new("/files")).unwrap_err()
}

#[test]
fn a_good_file() {
    let text = r#"
        [views."mix/a"]
        adapters = [{ path = "/ckpt/a", weight = 0.7 }, "rel/b:0.3", { path = "c" }, "/d:2"]
        dtype = "bf16"
        gguf = ["F16", "q8_0"]
        combine = "ties"
        density = 0.5
        majority_sign = "frequency"

        [views.plain]
        adapters = ["/ckpt/a"]

        [views.svd]
        adapters = ["/a", "/b"]
        combine = "svd"
        svd_rank = 8

        [views.dare]
        adapters = ["/a", "/b"]
        combine = "dare_linear"
        density = 1
        seed = 7
    "#;
    let entries = parse(text, Path::new("/files")).unwrap();
    assert_eq!(
        entries
            .keys()
            .map(|k| k.to_str().unwrap())
            .collect::<Vec<_>>(),
        ["dare", "mix/a", "plain", "svd"]
    );
    let mix = &entries[Path::new("mix/a")];
    assert_eq!(
        mix.adapters,
        [
            (PathBuf::from("/ckpt/a"), 0.7),
            (PathBuf::from("/files/rel/b"), 0.3),
            (PathBuf::from("/files/c"), 1.0),
            (PathBuf::from("/d"), 2.0),
        ],
        "relative paths are the file's directory's"
    );
    assert_eq!(mix.dtype, Some(DType::BF16));
    assert_eq!(mix.gguf, Some(vec![OutType::F16, OutType::Q8_0]));
    let ties = mix.combine.as_ref().unwrap();
    assert_eq!(ties.method, Method::Ties);
    assert_eq!(ties.density, Some(0.5));
    assert_eq!(ties.majority_sign, MajoritySign::Frequency);
    let plain = &entries[Path::new("plain")];
    assert_eq!(*plain, ViewSpec::of_adapters(vec![("/ckpt/a".into(), 1.0)]));
    let svd = entries[Path::new("svd")].combine.clone().unwrap();
    assert_eq!((svd.method, svd.svd_rank), (Method::Svd, Some(8)));
    let dare = entries[Path::new("dare")].combine.clone().unwrap();
    assert_eq!((dare.density, dare.seed), (Some(1.0), 7));
    assert!(parse("", Path::new("/")).unwrap().is_empty());
    assert!(parse("[views]", Path::new("/")).unwrap().is_empty());
}

#[test]
fn an_existing_path_with_a_colon_is_taken_whole() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("ad:2")).unwrap();
    let entries = parse("[views.v]\nadapters = [\"ad:2\", \"ad:2:0.5\"]", tmp.path()).unwrap();
    assert_eq!(
        entries[Path::new("v")].adapters,
        [
            (tmp.path().join("ad:2"), 1.0),
            (tmp.path().join("ad:2"), 0.5)
        ]
    );
}

#[test]
fn unknown_keys_name_the_view_and_the_key() {
    let e = err("[views.v]\nadapters = [\"/a\"]\ndensty = 0.5");
    assert!(e.contains("view \"v\"") && e.contains("\"densty\""), "{e}");
    let e = err("[views.v]\nadapters = [{ path = \"/a\", wieght = 1 }]");
    assert!(
        e.contains("view \"v\"") && e.contains("adapters[0]") && e.contains("\"wieght\""),
        "{e}"
    );
    let e = err("[view.v]\nadapters = [\"/a\"]");
    assert!(e.contains("unknown key \"view\""), "{e}");
    // An unquoted name with a dot is a table inside the view.
    let e = err("[views.mix.a]\nadapters = [\"/a\"]");
    assert!(e.contains("view \"mix\"") && e.contains("quoted"), "{e}");
}

#[test]
fn bad_names_and_values_are_refused() {
    for name in ["../up", ".hidden", "a b", "a//b"] {
        let e = err(&format!("[views.\"{name}\"]\nadapters = [\"/a\"]"));
        assert!(e.contains("view name"), "{name}: {e}");
    }
    let cases = [
        ("[views.v]\ndtype = \"f16\"", "adapters is missing"),
        ("[views.v]\nadapters = []", "at least one adapter"),
        (
            "[views.v]\nadapters = [\"/a\"]\ndtype = \"f8\"",
            "unknown dtype",
        ),
        (
            "[views.v]\nadapters = [\"/a\"]\ngguf = [\"Q4\"]",
            "unknown GGUF type",
        ),
        ("[views.v]\nadapters = [1]", "expected \"DIR[:WEIGHT]\""),
        ("[views.v]\nadapters = [{ weight = 1 }]", "path is missing"),
        (
            "[views.v]\nadapters = [{ path = \"/a\", weight = nan }]",
            "finite",
        ),
        ("[views.v]\nadapters = [\"/a:inf\"]", "finite"),
        ("[views.v]\nadapters = \"/a\"", "view \"v\": adapters: "),
        (
            "[views.v]\nadapters = [\"/a\"]\nsvd_rank = \"8\"",
            "svd_rank: ",
        ),
        ("[views.v\nadapters = 1", "line 1, column"),
        ("views = 3", "table of tables"),
        ("[views]\nv = 3", "expected a table"),
    ];
    for (text, want) in cases {
        let e = err(text);
        assert!(e.contains(want), "{text:?}: {e}");
        assert!(!e.contains('\n'), "one line: {e:?}");
    }
}

#[test]
fn combination_parameters_are_checked() {
    let view = |extra: &str| format!("[views.v]\nadapters = [\"/a\", \"/b\"]\n{extra}");
    let cases = [
        ("combine = \"ties\"", "combine = ties needs density"),
        ("combine = \"ties\"\ndensity = 1.5", "not between 0 and 1"),
        (
            "combine = \"linear\"\ndensity = 0.5",
            "density does not apply",
        ),
        ("combine = \"cat\"\nsvd_rank = 4", "svd_rank does not apply"),
        (
            "combine = \"svd\"\nsvd_rank = 0",
            "svd_rank must be at least 1",
        ),
        ("combine = \"svd\"\nsvd_rank = -1", "svd_rank: "),
        (
            "combine = \"linear\"\nmajority_sign = \"frequency\"",
            "majority_sign",
        ),
        (
            "combine = \"ties\"\ndensity = 0.5\nmajority_sign = \"most\"",
            "unknown majority",
        ),
        (
            "combine = \"ties\"\ndensity = 0.5\nseed = 3",
            "seed does not apply",
        ),
        ("combine = \"ties_svd\"", "not supported"),
        ("combine = \"average\"", "unknown combination"),
        ("density = 0.5", "density is a parameter of combine"),
        ("seed = 1", "seed is a parameter of combine"),
    ];
    for (extra, want) in cases {
        let e = err(&view(extra));
        assert!(
            e.contains("view \"v\"") && e.contains(want),
            "{extra:?}: {e}"
        );
    }
}
