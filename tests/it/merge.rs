//! Materialized tensors against an independent f64 reference merge.

use std::path::Path;

use safetensors::Dtype;

use crate::common::*;

/// Check every tensor of the merged directory, and that every other file is unchanged.
fn check(base_dir: &Path, out: &Path, base: &[Tensor], adapters: &[(&AdapterSpec, &Factors, f64)]) {
    let reference = reference_merge(base, adapters);
    let before = read_tree(base_dir);
    let after = read_tree(out);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "same file names"
    );
    let mut checked = 0;
    for (rel, bytes) in &after {
        assert_eq!(bytes.len(), before[rel].len(), "{}: size", rel.display());
        if rel.extension().is_some_and(|e| e == "safetensors") {
            let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            assert_eq!(
                bytes[..header],
                before[rel][..header],
                "{}: header bytes",
                rel.display()
            );
            for (name, (dtype, _, values)) in read_safetensors(&out.join(rel)) {
                assert_close(&name, dtype, &values, &reference[&name]);
                checked += 1;
            }
        } else {
            assert_eq!(bytes, &before[rel], "{}: pass-through", rel.display());
        }
    }
    assert_eq!(checked, base.len(), "every tensor checked");
}

#[test]
fn one_adapter_every_dtype_single_and_sharded() {
    for dtype in [Dtype::F16, Dtype::BF16, Dtype::F32] {
        for shards in [1, 3] {
            let tmp = tempfile::tempdir().unwrap();
            let spec = BaseSpec {
                dtype,
                shards,
                ..BaseSpec::default()
            };
            let base = write_base(&tmp.path().join("base"), &spec);
            let a = AdapterSpec::new(&spec, 8, "proj");
            let fa = write_adapter(&tmp.path().join("a"), &a);
            let out = tmp.path().join("out");
            let engine = materialize_lib(
                &tmp.path().join("base"),
                &[(&tmp.path().join("a"), 1.0)],
                &out,
            );
            assert_eq!(engine.plan.merges.len(), linear_modules(&spec).len());
            check(&tmp.path().join("base"), &out, &base, &[(&a, &fa, 1.0)]);
        }
    }
}

#[test]
fn ranks_from_1_to_64_and_odd_shapes() {
    for (r, factor_dtype) in [
        (1, Dtype::F16),
        (3, Dtype::BF16),
        (17, Dtype::F32),
        (64, Dtype::BF16),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let spec = BaseSpec {
            dtype: Dtype::F16,
            hidden: 37,
            kv: 19,
            inter: 131,
            vocab: 53,
            seed: r as u64,
            ..BaseSpec::default()
        };
        let base = write_base(&tmp.path().join("base"), &spec);
        let mut a = AdapterSpec::new(&spec, r, "");
        a.dtype = factor_dtype;
        let fa = write_adapter(&tmp.path().join("a"), &a);
        let out = tmp.path().join("out");
        materialize_lib(
            &tmp.path().join("base"),
            &[(&tmp.path().join("a"), 1.0)],
            &out,
        );
        check(&tmp.path().join("base"), &out, &base, &[(&a, &fa, 1.0)]);
    }
}

#[test]
fn several_weighted_adapters_rslora_and_patterns() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec {
        dtype: Dtype::BF16,
        shards: 2,
        ..BaseSpec::default()
    };
    let base = write_base(&tmp.path().join("base"), &spec);
    let mut a = AdapterSpec::new(&spec, 8, "self_attn");
    a.rslora = true;
    a.alpha = 5.0;
    let mut b = AdapterSpec::new(&spec, 4, "");
    b.seed = 11;
    b.prefix = false;
    // First match in file order wins: layer 1's q_proj gets 3.0, not 0.5.
    b.alpha_pattern = vec![
        ("layers\\.1\\.self_attn\\.q_proj".into(), 3.0),
        ("q_proj".into(), 0.5),
    ];
    b.rank_pattern = vec![("mlp\\.down_proj".into(), 12)];
    let mut c = AdapterSpec::new(&spec, 16, "mlp");
    c.seed = 12;
    c.dtype = Dtype::F16;
    let (fa, fb, fc) = (
        write_adapter(&tmp.path().join("a"), &a),
        write_adapter(&tmp.path().join("b"), &b),
        write_adapter(&tmp.path().join("c"), &c),
    );
    let out = tmp.path().join("out");
    let engine = materialize_lib(
        &tmp.path().join("base"),
        &[
            (&tmp.path().join("a"), 0.5),
            (&tmp.path().join("b"), 1.5),
            (&tmp.path().join("c"), -1.0),
        ],
        &out,
    );
    let q1 = engine
        .plan
        .merges
        .iter()
        .find(|m| m.name == "model.layers.1.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q1.terms.len(), 2);
    assert!(
        (q1.terms[1].scale - 1.5 * 3.0 / 4.0).abs() < 1e-12,
        "alpha_pattern first match"
    );
    check(
        &tmp.path().join("base"),
        &out,
        &base,
        &[(&a, &fa, 0.5), (&b, &fb, 1.5), (&c, &fc, -1.0)],
    );
}

#[test]
fn materialize_refuses_existing_output_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    write_base(&tmp.path().join("base"), &spec);
    write_adapter(&tmp.path().join("a"), &AdapterSpec::new(&spec, 2, "q_proj"));
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("old"), b"x").unwrap();
    let args = |force: bool| {
        let mut v = vec![
            "materialize".into(),
            tmp.path().join("base").into_os_string(),
            out.clone().into_os_string(),
            "--adapter".into(),
            tmp.path().join("a").into_os_string(),
        ];
        if force {
            v.push("--force".into());
        }
        v
    };
    let (ok, _, err) = run_lorafs(args(false));
    assert!(
        !ok && err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert!(out.join("old").exists(), "untouched without --force");
    let (ok, stdout, err) = run_lorafs(args(true));
    assert!(ok, "{err}");
    assert!(stdout.contains("tensors merged"), "{stdout}");
    assert!(!out.join("old").exists() && out.join("model.safetensors").exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("lorafs-")
        })
        .collect();
    assert!(leftovers.is_empty(), "no temporary directory left behind");
}

#[test]
fn inspect_shows_the_plan_and_parameter_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    let base = write_base(&tmp.path().join("base"), &spec);
    let mut a = AdapterSpec::new(&spec, 4, "self_attn");
    a.rslora = true;
    write_adapter(&tmp.path().join("a"), &a);
    let (ok, out, err) = run_lorafs([
        "inspect".as_ref(),
        tmp.path().join("base").as_os_str(),
        "--adapter".as_ref(),
        format!("{}:0.5", tmp.path().join("a").display()).as_ref(),
    ]);
    assert!(ok, "{err}");
    let adapter_params: usize = a.modules.iter().map(|(_, o, i)| 4 * (o + i)).sum();
    let base_params: usize = base.iter().map(|t| t.values.len()).sum();
    let all = adapter_params + base_params;
    let pct = 100.0 * adapter_params as f64 / all as f64;
    assert!(
        out.contains(&format!(
            "trainable params: {adapter_params} || all params: {all} || trainable%: {pct:.4}"
        )),
        "{out}"
    );
    assert!(out.contains("rsLoRA yes"), "{out}");
    assert!(out.contains("base tensors changed 8"), "{out}");
    assert!(out.contains("k_proj, o_proj, q_proj, v_proj"), "{out}");
}

#[test]
fn parallel_and_single_threaded_output_are_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec {
        dtype: Dtype::BF16,
        hidden: 256,
        kv: 128,
        inter: 3000,
        ..BaseSpec::default()
    };
    write_base(&tmp.path().join("base"), &spec);
    write_adapter(&tmp.path().join("a"), &AdapterSpec::new(&spec, 16, ""));
    let mut trees = Vec::new();
    for threads in ["1", "2"] {
        let out = tmp.path().join(format!("out{threads}"));
        let status = std::process::Command::new(lorafs_bin())
            .arg("materialize")
            .arg(tmp.path().join("base"))
            .arg(&out)
            .arg("--adapter")
            .arg(tmp.path().join("a"))
            .env("RAYON_NUM_THREADS", threads)
            .status()
            .unwrap();
        assert!(status.success());
        trees.push(read_tree(&out));
    }
    assert!(trees[0] == trees[1], "same bytes with 1 and 2 threads");
}
