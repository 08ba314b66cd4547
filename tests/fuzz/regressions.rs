//! Minimal reproducers of what the fuzz targets found, one test per finding, checked with
//! the same properties as the fuzz cases ([`check`]). A test is `#[ignore]`d, with the file
//! to fix, until the fix is merged.

use proptest::test_runner::TestCaseError;

use crate::adapter::{Fit, Key};
use crate::harness::check;
use crate::json::J;
use crate::st::{Entry, StFile};
use crate::{open, shared_base, write_adapter};

fn assert_ok(result: Result<(), TestCaseError>) {
    if let Err(err) = result {
        panic!("{err}");
    }
}

/// Run `body` in a child process (this test binary, filtered to `test`): a refused
/// allocation aborts the process, and the parent can then fail with the child's message.
fn in_child(test: &str, body: impl FnOnce()) {
    const CHILD: &str = "LORAFS_FUZZ_CHILD";
    if std::env::var(CHILD).as_deref() == Ok(test) {
        body();
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let output = std::process::Command::new(exe)
        .args([
            test,
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, test)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running the test binary");
    assert!(
        output.status.success(),
        "{test} failed in its child process ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn key(module: usize, suffix: &'static str, rank: u64, fit: Fit, dtype: &'static str) -> Key {
    Key {
        prefix: "base_model.model.",
        module: Ok(module),
        suffix,
        rank,
        tokens: 2,
        fit,
        dtype,
    }
}

const CONFIG: &str = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4}"#;

/// Open the shared base with an adapter made of `keys` and `config`, under [`check`].
fn check_adapter(config: &str, keys: &[Key]) -> Result<(), TestCaseError> {
    let base = shared_base();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let adapter = write_adapter(dir.path(), &J::Raw(config.into()), keys, 1).expect("writing");
    check(dir.path(), || open(base.path(), &[adapter]))
}

/// The issue's case: a sparse adapter file of a few KiB whose header declares an 8 GiB
/// lora_B that fits no base tensor. lorafs converted every factor to f32 before checking
/// shapes (16 GiB of heap, 38 s); the shapes must be checked from the header first.
#[test]
fn huge_sparse_factor() {
    let _alone = crate::alloc::alone();
    in_child("regressions::huge_sparse_factor", || {
        let b = key(0, ".lora_B.weight", 2, Fit::Dim(0, 1 << 31), "BF16");
        let a = key(0, ".lora_A.weight", 2, Fit::Exact, "BF16");
        let base = shared_base();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let adapter = dir.path().join("adapter");
        std::fs::create_dir_all(&adapter).unwrap();
        std::fs::write(adapter.join("adapter_config.json"), CONFIG).unwrap();
        // Uncapped: the header declares all 8 GiB, and the file is that long (sparse).
        let file = StFile::valid(vec![a.entry(), b.entry()], 1);
        let real = file
            .write(&adapter.join("adapter_model.safetensors"))
            .unwrap();
        assert!(real < 1 << 20, "the file is sparse");
        assert_ok(check(dir.path(), || open(base.path(), &[adapter])));
    });
}

/// The same bug at a size the heap bound measures without aborting: a 32 MiB (declared,
/// sparse) lora_B of the wrong shape costs 64 MiB of f32 before it is refused.
#[test]
fn wrong_shape_factor_is_refused_before_it_is_read() {
    let _alone = crate::alloc::alone();
    assert_ok(check_adapter(
        CONFIG,
        &[
            key(0, ".lora_A.weight", 2, Fit::Exact, "BF16"),
            key(0, ".lora_B.weight", 2, Fit::Dim(0, 1 << 23), "BF16"),
        ],
    ));
}

/// A rank far above the weight's dimensions is valid PEFT, but the factors' memory must stay
/// proportional to the file: rank 2^20 on an 8×8 weight is 32 MiB of BF16 factors, and
/// lorafs used 320 MiB (f32, then `V` packed in 64-column panels for an 8-column weight).
/// Now 96 MiB: `U` and `V` in f32, and `V`'s packed copy, unpadded for a tensor narrower
/// than a panel (src/kernel/mod.rs).
#[test]
fn factor_memory_is_proportional_to_the_file() {
    let _alone = crate::alloc::alone();
    let rank = 1 << 20;
    let keys = [
        key(0, ".lora_A.weight", rank, Fit::Exact, "BF16"),
        key(0, ".lora_B.weight", rank, Fit::Exact, "BF16"),
    ];
    let base = shared_base();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let adapter = write_adapter(dir.path(), &J::Raw(CONFIG.into()), &keys, 1).unwrap();
    let declared: usize = 2 * rank as usize * 8 * 2;
    let (result, cost) = crate::alloc::measure("factor memory", || open(base.path(), &[adapter]));
    result.expect("a valid adapter opens");
    // f32 copies of both factors are twice the file; allow as much again for the plan.
    assert!(
        cost.peak <= 4 * declared,
        "{} MiB of heap for {} MiB of factors",
        cost.peak >> 20,
        declared >> 20
    );
}

/// The fuzz target's find with seed 13625188927256600810: a rank-2^20 F16 pair on an 8×8
/// weight (32 MiB of factors, valid PEFT) used 33 MiB, over the fixed bound. Memory in
/// proportion to valid factors is what lorafs must use, so the fuzz bound now grants
/// [`crate::adapter::factor_allowance`] for them; this keeps the case checked with it.
#[test]
fn huge_rank_pair_is_granted_its_factors() {
    let _alone = crate::alloc::alone();
    let config = r#"{"peft_type": "LORA", "r": 4, "trainable_token_indices": [1, 3]}"#;
    let keys = [
        key(0, ".lora_A.weight", 1, Fit::Dim(0, 1 << 20), "F16"),
        key(0, ".lora_B.weight", 1, Fit::Dim(1, 1 << 20), "F16"),
    ];
    let allowance = crate::adapter::factor_allowance(&keys);
    assert!(allowance >= 4 * (32 << 20), "the pair agrees on its rank");
    let base = shared_base();
    let dir = tempfile::tempdir().unwrap();
    let adapter = write_adapter(dir.path(), &J::Raw(config.into()), &keys, 0).unwrap();
    assert_ok(crate::harness::check_within(dir.path(), allowance, || {
        open(base.path(), &[adapter])
    }));
}

/// A regex syntax error in alpha_pattern / rank_pattern is reported with the `regex` crate's
/// multi-line message (the pattern, a caret line, the error). Escaped, it is one line, but
/// an unreadable one: the message should say what is wrong, without the caret diagram.
#[test]
fn pattern_error_is_one_readable_line() {
    let _alone = crate::alloc::alone();
    let config = r#"{"peft_type": "LORA", "r": 2, "alpha_pattern": {"(": 4}}"#;
    let base = shared_base();
    let dir = tempfile::tempdir().unwrap();
    let keys = crate::adapter::valid_table(0);
    let adapter = write_adapter(dir.path(), &J::Raw(config.into()), &keys, 1).unwrap();
    let mut message = String::new();
    assert_ok(check(dir.path(), || {
        let result = open(base.path(), &[adapter]).map(drop);
        if let Err(err) = &result {
            message = err.to_string();
        }
        result
    }));
    assert!(message.contains("unclosed group"), "{message}");
    assert!(!message.contains("\\n"), "{message}");
}

/// alpha_pattern / rank_pattern keys are compiled with the `regex` crate's default size
/// limit (10 MiB each) and kept for the whole run: a few short keys cost tens of MiB.
#[test]
fn pattern_keys_cost_bounded_memory() {
    let _alone = crate::alloc::alone();
    let keys: Vec<String> = (0..6)
        .map(|i| format!("\"(?i)\\\\pL{{200}}{i}\": 1"))
        .collect();
    let config = format!(
        r#"{{"peft_type": "LORA", "r": 2, "alpha_pattern": {{{}}}}}"#,
        keys.join(", ")
    );
    assert_ok(check_adapter(&config, &crate::adapter::valid_table(0)));
}

/// Tensor and file names come from the input files and may hold control characters; a
/// message that printed them raw spanned lines (and could carry terminal escapes). Checked
/// on the three places the fuzz targets found: a safetensors header, the shard index and an
/// adapter key (src/error.rs now escapes control characters in every message).
#[test]
fn names_with_newlines_give_one_line_messages() {
    let _alone = crate::alloc::alone();
    let name = "line\nbreak";
    // A safetensors header whose only tensor's offsets do not match its shape.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let mut entry = Entry::plain(name, "F16", &[2]);
    entry.offsets = crate::st::Offsets::Shifted(0, 2);
    StFile::valid(vec![entry], 1).write(&path).unwrap();
    assert_ok(check(dir.path(), || lorafs::layout::Layout::open(&path)));

    // A shard index that names a file that does not hold the tensor.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    crate::base::write(&base, 1, &[], None).unwrap();
    let index = J::obj(vec![(
        "weight_map",
        J::obj(vec![("lm_head.weight", J::str(name))]),
    )]);
    std::fs::write(base.join("model.safetensors.index.json"), index.render()).unwrap();
    assert_ok(check(dir.path(), || open(&base, &[])));

    // An adapter key that is not a LoRA key, holding a terminal escape.
    let keys = [Key {
        module: Err("red\u{1b}[31m".to_string()),
        ..key(0, ".lora_E", 2, Fit::Exact, "BF16")
    }];
    assert_ok(check_adapter(CONFIG, &keys));
}

/// Write a safetensors file from raw header JSON and data bytes.
fn write_raw(path: &std::path::Path, json: &str, data: &[u8]) {
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// When a tensor's offsets do not match its shape, the message names it by re-reading the
/// header; that search multiplied every tensor's dimensions unchecked, and a zero-byte
/// tensor listed first with dimensions 2^32 × 2^32 overflowed (a panic with overflow
/// checks, a wrapped product without).
#[test]
fn naming_the_inconsistent_tensor_survives_huge_dimensions() {
    let _alone = crate::alloc::alone();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let json = r#"{"b":{"dtype":"F16","shape":[4294967296,4294967296,0],"data_offsets":[4,4]},"a":{"dtype":"F16","shape":[1],"data_offsets":[0,4]}}"#;
    write_raw(&path, json, &[0; 4]);
    let mut message = String::new();
    assert_ok(check(dir.path(), || {
        let result = lorafs::layout::Layout::open(&path);
        if let Err(err) = &result {
            message = err.to_string();
        }
        result
    }));
    // `a` is the tensor whose offsets are wrong; `b`'s shape overflows the crate's own
    // (left to right) size check: either may be named.
    assert!(
        message.contains("tensor `a`") || message.contains("tensor `b`"),
        "{message}"
    );
}

/// A base tensor of shape [0, 2^32, 2^32] holds no bytes and is valid; the planner's
/// (rows, cols) view multiplied the trailing dimensions unchecked when an adapter replaced
/// it (a panic with overflow checks on).
#[test]
fn replacing_a_tensor_whose_dimensions_overflow() {
    let _alone = crate::alloc::alone();
    let keys = [key(9, ".base_layer.weight", 2, Fit::Exact, "BF16")];
    // Replacing a tensor that holds no values is valid: it is merged and served (no bytes).
    let base = shared_base();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let adapter = write_adapter(dir.path(), &J::Raw(CONFIG.into()), &keys, 1).unwrap();
    let mut outcome = String::new();
    assert_ok(check(dir.path(), || {
        let result = crate::open_and_read(base.path(), &[adapter]);
        if let Err(err) = &result {
            outcome = err.to_string();
        }
        result
    }));
    assert!(outcome.is_empty(), "{outcome}");
}

/// The same unchecked view, reached through trainable tokens on that tensor (the view is
/// taken before the tensor is found not to be 2-D).
#[test]
fn trainable_tokens_on_a_tensor_whose_dimensions_overflow() {
    let _alone = crate::alloc::alone();
    let config = r#"{"peft_type": "LORA", "r": 2, "trainable_token_indices": [1, 3]}"#;
    let keys = [key(
        9,
        ".token_adapter.trainable_tokens_delta",
        2,
        Fit::Dim(1, 3),
        "BF16",
    )];
    assert_ok(check_adapter(config, &keys));
}

/// A resized vocabulary changes the shard index's `total_size` by the size difference;
/// the addition was unchecked, so an index claiming i64::MAX bytes overflowed (a panic with
/// overflow checks on, a negative size served without).
#[test]
fn index_total_size_near_i64_max() {
    let _alone = crate::alloc::alone();
    let case = crate::index::IndexCase {
        shards: 2,
        shard_of: vec![0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0],
        refs: vec![Some(crate::index::FileRef::Correct); crate::base::TENSORS.len()],
        extra: Vec::new(),
        total_size: Some(J::num(i64::MAX)),
        odd_weight_map: None,
        odd_metadata: None,
        odd_file: None,
        mutations: Vec::new(),
        config: Some(crate::base::llama_config()),
        resize: true,
    };
    let dir = tempfile::tempdir().unwrap();
    let (base, adapters) = case.write(dir.path()).unwrap();
    let mut served = None;
    assert_ok(check(dir.path(), || -> lorafs::Result<()> {
        let engine = open(&base, &adapters)?;
        served = Some(index_bytes(&engine));
        Ok(())
    }));
    if let Some(bytes) = served {
        let index: serde_json::Value =
            serde_json::from_slice(&bytes).expect("the served index is JSON");
        let total = &index["metadata"]["total_size"];
        assert!(total.as_u64().is_some(), "served total_size {total}");
    }
}

/// The bytes of the merged directory's shard index.
fn index_bytes(engine: &lorafs::View) -> Vec<u8> {
    let id = engine
        .files
        .iter()
        .position(|f| f.rel == std::path::Path::new("model.safetensors.index.json"))
        .expect("the index is served");
    let mut buf = vec![0; engine.files[id].size as usize];
    let n = engine.read_at(id, 0, &mut buf).expect("reading the index");
    buf.truncate(n);
    buf
}

/// A length prefix may claim up to the format's 100 MB of header. A file that long but
/// sparse (a few KiB on disk) made lorafs allocate and read all 100 MB before the JSON parser
/// failed on its second byte: memory must follow the header's content, not its claim.
#[test]
fn a_claimed_header_length_is_not_read_whole() {
    let _alone = crate::alloc::alone();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let claimed: u64 = 100_000_000;
    let mut bytes = claimed.to_le_bytes().to_vec();
    bytes.push(b'{');
    std::fs::write(&path, bytes).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(8 + claimed + 64).unwrap();
    assert_ok(check(dir.path(), || lorafs::layout::Layout::open(&path)));
}
