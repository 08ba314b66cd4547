//! Inputs as lorafs finds them: files that change while served (never a mix of versions),
//! what the walk leaves out, descriptors for large trees, shard names in the index, and
//! Hugging Face cache revisions that must stay inside the cache.

use std::io::{Seek, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use lorafs::layout::Layout;
use lorafs::{Error, View};
use rand::rngs::StdRng;
use rand::SeedableRng;
use safetensors::Dtype;
use serde_json::{json, Value};

use crate::common::*;

const Q: &str = "model.layers.0.self_attn.q_proj";

/// A single-file base and an adapter with LoRA on one q_proj and `model.norm.weight`
/// replaced (served as the adapter's bytes).
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    let base = tmp.path().join("base");
    write_base(&base, &spec);
    let adapter = tmp.path().join("a");
    let h = spec.hidden;
    let mut rng = StdRng::seed_from_u64(3);
    write_config(
        &adapter,
        &json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}),
    );
    let tensor = |name: &str, dtype, shape: &[usize], rng: &mut StdRng| Tensor {
        name: format!("base_model.model.{name}"),
        dtype,
        shape: shape.to_vec(),
        values: random_values(rng, shape.iter().product(), 0.3),
    };
    write_safetensors(
        &adapter.join("adapter_model.safetensors"),
        &[
            tensor(&format!("{Q}.lora_A.weight"), Dtype::F32, &[2, h], &mut rng),
            tensor(&format!("{Q}.lora_B.weight"), Dtype::F32, &[h, 2], &mut rng),
            tensor("model.norm.weight", Dtype::BF16, &[h], &mut rng),
        ],
    );
    (tmp, base, adapter)
}

fn index_of(engine: &View, rel: &str) -> usize {
    engine
        .files
        .iter()
        .position(|f| f.rel == Path::new(rel))
        .unwrap()
}

/// Bytes `range` of file `rel` through `read_at`.
fn read(engine: &View, rel: &str, (offset, len): (u64, u64)) -> lorafs::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let n = engine.read_at(index_of(engine, rel), offset, &mut buf)?;
    assert_eq!(n, buf.len());
    Ok(buf)
}

fn whole(engine: &View, rel: &str) -> lorafs::Result<Vec<u8>> {
    let size = engine.files[index_of(engine, rel)].size;
    read(engine, rel, (0, size))
}

/// (offset, length) of a tensor's bytes in a safetensors file.
fn range(path: &Path, tensor: &str) -> (u64, u64) {
    let layout = Layout::open(path).unwrap();
    let t = layout.tensors.iter().find(|t| t.name == tensor).unwrap();
    (t.offset, t.len)
}

/// Overwrite bytes in place (same inode, same size), flipping them. Kernels before 6.13
/// stamp times at clock-tick granularity: wait a tick so the write gets a time of its own.
fn flip_in_place(path: &Path, offset: u64, len: usize) {
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut bytes = vec![0u8; len];
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut bytes, offset).unwrap();
    bytes.iter_mut().for_each(|b| *b ^= 0x5a);
    f.seek(std::io::SeekFrom::Start(offset)).unwrap();
    f.write_all(&bytes).unwrap();
}

/// The error is a change of `file`, reported as EIO.
fn assert_changed(result: lorafs::Result<Vec<u8>>, file: &str) {
    let err = match result {
        Ok(bytes) => panic!("{file} changed, yet {} bytes were served", bytes.len()),
        Err(err) => err,
    };
    let text = err.to_string();
    // A block computation's error reaches its readers shared.
    let inner = match &err {
        Error::Shared(inner) => inner.as_ref(),
        other => other,
    };
    assert!(
        matches!(inner, Error::Changed { .. })
            && err.errno() == libc::EIO
            && text.contains(file)
            && text.contains("changed since lorafs opened it"),
        "{text}"
    );
}

#[test]
fn a_base_rewritten_in_place_is_never_served_as_a_mix() {
    let (_tmp, base, adapter) = setup();
    let engine = open_engine(&base, &[(&adapter, 1.0)]).unwrap();
    let weights = base.join("model.safetensors");
    let q = range(&weights, &format!("{Q}.weight"));
    // Merged blocks of q_proj are now in the cache, made from the base as opened.
    whole(&engine, "model.safetensors").unwrap();
    let (head, _) = range(&weights, "lm_head.weight");
    flip_in_place(&weights, head, 64);
    // Untouched tensors would now be the new version beside the cached old merge.
    assert_changed(whole(&engine, "model.safetensors"), "model.safetensors");
    // Once seen, the cached merge is refused too.
    assert_changed(read(&engine, "model.safetensors", q), "model.safetensors");
    // Files made from other inputs are still served.
    assert!(whole(&engine, "config.json").is_ok());
}

#[test]
fn an_adapter_changed_in_place_fails_merged_and_replaced_tensors() {
    let (_tmp, base, adapter) = setup();
    let weights = base.join("model.safetensors");
    let adapter_file = adapter.join("adapter_model.safetensors");
    let q = range(&weights, &format!("{Q}.weight"));
    let norm = range(&weights, "model.norm.weight");
    let embed = range(&weights, "model.embed_tokens.weight");
    let lora_a = range(
        &adapter_file,
        &format!("base_model.model.{Q}.lora_A.weight"),
    );

    let engine = open_engine(&base, &[(&adapter, 1.0)]).unwrap();
    read(&engine, "model.safetensors", q).unwrap();
    flip_in_place(&adapter_file, lora_a.0, 8);
    // The replaced norm is read from the adapter file: the change is seen...
    assert_changed(
        read(&engine, "model.safetensors", norm),
        "adapter_model.safetensors",
    );
    // ...and from then on the merge made from its factors (cached) is refused, as is the
    // rest of the file, which would otherwise sit beside a merge the adapter no longer has.
    for r in [q, embed] {
        assert_changed(
            read(&engine, "model.safetensors", r),
            "adapter_model.safetensors",
        );
    }
    assert!(whole(&engine, "tokenizer.json").is_ok());

    // A block computed after the change: its factors were read before it.
    let engine = open_engine(&base, &[(&adapter, 1.0)]).unwrap();
    flip_in_place(&adapter_file, lora_a.0, 8);
    assert_changed(
        read(&engine, "model.safetensors", q),
        "adapter_model.safetensors",
    );

    // The adapter's config (its scale) changes the merge as much as its factors do.
    let engine = open_engine(&base, &[(&adapter, 1.0)]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let config =
        json!({"peft_type": "LORA", "r": 2, "lora_alpha": 8, "target_modules": ["q_proj"]});
    write_config(&adapter, &config);
    assert_changed(read(&engine, "model.safetensors", q), "adapter_config.json");
}

#[test]
fn small_files_changed_or_replaced_fail_and_weights_replaced_by_rename_keep_their_version() {
    let (tmp, base, adapter) = setup();
    let engine = open_engine(&base, &[(&adapter, 1.0)]).unwrap();
    whole(&engine, "config.json").unwrap();
    flip_in_place(&base.join("config.json"), 2, 4);
    assert_changed(whole(&engine, "config.json"), "config.json");

    // Files other than weights are opened at each read: a new file at the path is another
    // version, refused.
    let new = tmp.path().join("new");
    std::fs::write(&new, br#"{"version": "2.0"}"#).unwrap();
    std::fs::rename(&new, base.join("tokenizer.json")).unwrap();
    let err = whole(&engine, "tokenizer.json").unwrap_err();
    assert!(
        err.to_string().contains("replaced by another file"),
        "{err}"
    );

    // Weights keep their descriptor: the version opened is still served, whole.
    let before = whole(&engine, "model.safetensors").unwrap();
    let other = tmp.path().join("other");
    write_base(
        &other,
        &BaseSpec {
            seed: 9,
            ..BaseSpec::default()
        },
    );
    std::fs::rename(
        other.join("model.safetensors"),
        base.join("model.safetensors"),
    )
    .unwrap();
    assert_eq!(whole(&engine, "model.safetensors").unwrap(), before);
}

#[test]
fn git_and_huggingface_metadata_are_not_part_of_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let spec = BaseSpec::default();
    write_base(&base, &spec);
    write_adapter(&tmp.path().join("a"), &AdapterSpec::new(&spec, 2, "q_proj"));
    for (rel, text) in [
        (".git/HEAD", "ref: refs/heads/main\n"),
        (".git/objects/ab/cdef", "blob"),
        (".git/lfs/objects/12/34/model", "lfs copy"),
        ("extra/.git", "gitdir: ../.git/modules/extra\n"),
        (".cache/huggingface/.gitignore", "*\n"),
        (
            ".cache/huggingface/download/model.safetensors.metadata",
            "abc\n",
        ),
        (".gitattributes", "*.safetensors filter=lfs\n"),
    ] {
        let path = base.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let out = tmp.path().join("out");
    let engine = materialize_lib(&base, &[(&tmp.path().join("a"), 1.0)], &out);
    let tree = read_tree(&out);
    let names: Vec<_> = tree.keys().map(|p| p.display().to_string()).collect();
    assert!(
        names
            .iter()
            .all(|n| !n.contains(".git/") && !n.ends_with("/.git") && !n.contains(".cache")),
        "{names:?}"
    );
    assert!(tree.contains_key(Path::new(".gitattributes")), "{names:?}");
    assert!(!out.join(".git").exists() && !out.join(".cache").exists());
    assert!(
        engine
            .dirs()
            .iter()
            .all(|d| !d.starts_with(".git") && !d.starts_with(".cache")),
        "{:?}",
        engine.dirs()
    );
}

/// `lorafs ARGS` with the open-files limit set to (soft, hard).
fn run_with_open_files(limit: (u64, u64), args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let mut command = Command::new(lorafs_bin());
    command.args(args);
    // SAFETY: setrlimit is async-signal-safe and only touches the child being started.
    unsafe {
        command.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit.0,
                rlim_max: limit.1,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    output_of(&mut command)
}

#[test]
fn a_tree_of_thousands_of_files_needs_few_descriptors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let spec = BaseSpec::default();
    write_base(&base, &spec);
    write_adapter(&tmp.path().join("a"), &AdapterSpec::new(&spec, 2, "q_proj"));
    std::fs::create_dir_all(base.join("many")).unwrap();
    for i in 0..1500 {
        std::fs::write(base.join(format!("many/{i:04}.txt")), format!("file {i}\n")).unwrap();
    }
    let out = tmp.path().join("out");
    let (ok, _, err) = run_with_open_files(
        (1024, 1024),
        &[
            "materialize".as_ref(),
            base.as_os_str(),
            out.as_os_str(),
            "--adapter".as_ref(),
            tmp.path().join("a").as_os_str(),
        ],
    );
    assert!(ok, "{err}");
    let tree = read_tree(&out);
    assert_eq!(tree[Path::new("many/1499.txt")], b"file 1499\n");
    assert_eq!(tree.keys().filter(|p| p.starts_with("many")).count(), 1500);
}

#[test]
fn many_shards_raise_the_open_files_limit_and_running_out_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let spec = BaseSpec::default();
    write_base(&base, &spec);
    write_adapter(&tmp.path().join("a"), &AdapterSpec::new(&spec, 2, "q_proj"));
    // 100 more weights files (one descriptor each, held while serving).
    for i in 0..100 {
        write_safetensors(
            &base.join(format!("extra-{i:03}.safetensors")),
            &[Tensor {
                name: format!("extra.{i}.weight"),
                dtype: Dtype::BF16,
                shape: vec![4],
                values: vec![i as f64; 4],
            }],
        );
    }
    let a = tmp.path().join("a");
    let inspect = [
        "inspect".as_ref(),
        base.as_os_str(),
        "--adapter".as_ref(),
        a.as_os_str(),
    ];
    let (ok, _, err) = run_with_open_files((64, 4096), &inspect);
    assert!(ok, "the soft limit is raised to the hard one: {err}");
    let (ok, _, err) = run_with_open_files((64, 64), &inspect);
    assert!(
        !ok && err.contains(".safetensors: too many open files: raise `ulimit -n`")
            && err.lines().count() == 1,
        "{err}"
    );
}

#[test]
fn shard_names_written_with_dot_slash_are_accepted_and_served_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let spec = BaseSpec {
        shards: 2,
        ..BaseSpec::default()
    };
    write_base(&base, &spec);
    let a = tmp.path().join("a");
    write_adapter(&a, &AdapterSpec::new(&spec, 2, "q_proj"));
    let index_path = base.join("model.safetensors.index.json");
    let write_index = |prefix: &str| {
        let mut index: Value =
            serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
        for file in index["weight_map"].as_object_mut().unwrap().values_mut() {
            let name = file
                .as_str()
                .unwrap()
                .trim_start_matches("./")
                .trim_start_matches("../");
            *file = Value::String(format!("{prefix}{name}"));
        }
        std::fs::write(&index_path, serde_json::to_vec_pretty(&index).unwrap()).unwrap();
    };
    write_index("./");
    let out = tmp.path().join("out");
    let engine = materialize_lib(&base, &[(&a, 1.0)], &out);
    assert_eq!(engine.plan.merges.len(), spec.layers);
    assert_eq!(
        std::fs::read(out.join("model.safetensors.index.json")).unwrap(),
        std::fs::read(&index_path).unwrap()
    );
    for prefix in ["../", "/abs/"] {
        write_index(prefix);
        let err = open_engine(&base, &[(&a, 1.0)]).err().unwrap().to_string();
        assert!(
            err.contains("model.safetensors.index.json")
                && err.contains(&format!("{prefix}model-00001-of-00002.safetensors"))
                && err.contains("outside the model directory"),
            "{err}"
        );
    }
}

#[test]
fn cache_revisions_and_refs_never_resolve_outside_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let spec = BaseSpec::default();
    let folder = cache.join("models--org--name");
    std::fs::create_dir_all(folder.join("snapshots/0123456789")).unwrap();
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), "../../x").unwrap();
    // Models where `..` would lead: the cache itself (`@../..`) and cache/x (refs/main).
    write_base(&cache, &spec);
    write_base(&cache.join("x"), &spec);
    let adapter = tmp.path().join("a");
    write_adapter(&adapter, &AdapterSpec::new(&spec, 2, "q_proj"));
    for (arg, says) in [
        ("org/name", "holding \"../../x\", not a commit"),
        (
            "org/name@../..",
            "\"../..\" is not a branch, tag or commit name",
        ),
    ] {
        let (ok, _, err) = output_of(
            Command::new(lorafs_bin())
                .args(["inspect", arg, "--adapter"])
                .arg(&adapter)
                .env("HF_HUB_CACHE", &cache)
                .current_dir(tmp.path()),
        );
        assert!(
            !ok && err.contains(arg) && err.contains(says),
            "{arg}: {err}"
        );
    }
}
