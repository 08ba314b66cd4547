//! Fuzzing of every parser of untrusted input, on stable Rust, for a bounded time.
//!
//! Each target generates inputs with proptest (structured, near-valid ones that reach deep
//! into the code, and raw mutations), writes them to a temporary directory and calls the
//! library as `lorafs` would. Whatever the input, the call must return (no panic, no abort),
//! an error must be one line, and the call must stay under a heap bound (a counting global
//! allocator, [`alloc`]) and a time bound. `LORAFS_FUZZ_CASES` sets the cases per target,
//! `LORAFS_FUZZ_SEED` replays a run; docs/SAFETY.md ("Fuzzing") says how to run it longer.
//!
//! Findings become named regression tests in [`regressions`].

mod adapter;
mod alloc;
mod base;
mod harness;
mod index;
mod json;
mod regressions;
mod st;

use std::path::{Path, PathBuf};

use lorafs::layout::Layout;
use lorafs::{EngineOptions, View};
use proptest::prelude::*;

use harness::{check, check_within, fuzz, setup};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

/// `View::open` as the commands call it, with a small cache.
fn open(base: &Path, adapters: &[PathBuf]) -> lorafs::Result<View> {
    let adapters: Vec<(PathBuf, f64)> = adapters.iter().map(|a| (a.clone(), 1.0)).collect();
    let options = EngineOptions {
        cache_bytes: 1 << 20,
        ..Default::default()
    };
    View::open_single(base, &adapters, None, None, options)
}

/// What the commands do with inputs they accept: open, print the plan (`inspect
/// --tensors`), and read every byte of the merged directory (`mount`, `materialize`), so
/// that an input the checks let through is also merged.
fn open_and_read(base: &Path, adapters: &[PathBuf]) -> lorafs::Result<()> {
    let engine = open(base, adapters)?;
    std::hint::black_box(lorafs::inspect::report(&engine, true));
    // An odd size, so that reads start and end inside blocks and tensors.
    let mut buf = vec![0u8; (1 << 20) + 13];
    for (id, file) in engine.files.iter().enumerate() {
        let mut offset = 0;
        while offset < file.size {
            let n = engine.read_at(id, offset, &mut buf)?;
            if n == 0 {
                let what = format!("read_at returned 0 at {offset} of {} bytes", file.size);
                return Err(lorafs::Error::io(&file.rel, std::io::Error::other(what)));
            }
            offset += n as u64;
        }
    }
    Ok(())
}

/// A base directory for the adapter targets, written once per target.
fn shared_base() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    base::write(dir.path(), 1, &[], Some(&base::llama_config())).expect("writing the base");
    dir
}

/// Write an adapter directory: `config` as adapter_config.json and `keys` as its tensors.
fn write_adapter(
    dir: &Path,
    config: &json::J,
    keys: &[adapter::Key],
    seed: u64,
) -> std::io::Result<PathBuf> {
    let path = dir.join("adapter");
    std::fs::create_dir_all(&path)?;
    std::fs::write(path.join("adapter_config.json"), config.render())?;
    adapter::write_table(&path.join("adapter_model.safetensors"), keys, seed)?;
    Ok(path)
}

#[test]
fn safetensors_headers() {
    fuzz("safetensors_headers", st::structured_file(), |dir, file| {
        let path = dir.join("model.safetensors");
        file.write(&path).map_err(setup)?;
        check(dir, || Layout::open(&path))
    });
}

#[test]
fn safetensors_mutations() {
    fuzz("safetensors_mutations", st::mutated_file(), |dir, file| {
        let path = dir.join("model.safetensors");
        file.write(&path).map_err(setup)?;
        check(dir, || Layout::open(&path))
    });
}

#[test]
fn shard_index() {
    fuzz("shard_index", index::case(), |dir, case| {
        let (base, adapters) = case.write(dir).map_err(setup)?;
        check(dir, || open_and_read(&base, &adapters))
    });
}

#[test]
fn adapter_config() {
    let base = shared_base();
    let strategy = (json::mostly(adapter::config()), 0usize..6, any::<bool>());
    fuzz("adapter_config", strategy, |dir, (config, table, twice)| {
        let adapter =
            write_adapter(dir, &config, &adapter::valid_table(table), 1).map_err(setup)?;
        let adapters = vec![adapter; 1 + twice as usize];
        check(dir, || open_and_read(base.path(), &adapters))
    });
}

#[test]
fn adapter_tensors() {
    let base = shared_base();
    let config = prop_oneof![
        Just(r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4}"#),
        Just(r#"{"peft_type": "LORA", "r": 2, "use_dora": true}"#),
        Just(r#"{"peft_type": "LORA", "r": 4, "trainable_token_indices": [1, 3]}"#),
        Just(r#"{"peft_type": "LORA", "trainable_token_indices": {"embed_tokens": [0, 9]}}"#),
        Just(r#"{"peft_type": "LORA", "fan_in_fan_out": true, "alpha_pattern": {"q_proj": 2}}"#),
    ];
    let strategy = (config, adapter::table(), any::<u64>(), any::<bool>());
    fuzz(
        "adapter_tensors",
        strategy,
        |dir, (config, keys, seed, twice)| {
            let config = json::J::Raw(config.to_string());
            let adapter = write_adapter(dir, &config, &keys, seed).map_err(setup)?;
            let adapters = vec![adapter; 1 + twice as usize];
            let allowance = adapters.len() * adapter::factor_allowance(&keys);
            check_within(dir, allowance, || open_and_read(base.path(), &adapters))
        },
    );
}
