//! `View::read_at` over arbitrary ranges equals the materialized bytes.

use std::sync::Arc;

use lorafs::materialize::{materialize, MaterializeOptions};
use lorafs::{EngineOptions, View};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::Dtype;

use crate::common::*;

struct Fixture {
    _tmp: tempfile::TempDir,
    base: std::path::PathBuf,
    adapters: Vec<(std::path::PathBuf, f64)>,
    expected: std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>,
}

fn fixture(dtype: Dtype) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec {
        dtype,
        shards: 2,
        hidden: 64,
        kv: 32,
        inter: 1000,
        ..BaseSpec::default()
    };
    write_base(&tmp.path().join("base"), &spec);
    write_adapter(&tmp.path().join("a"), &AdapterSpec::new(&spec, 8, ""));
    let base = tmp.path().join("base");
    let adapters = vec![(tmp.path().join("a"), 1.0)];
    let engine = View::open_single(&base, &adapters, None, None, EngineOptions::default()).unwrap();
    let out = tmp.path().join("out");
    materialize(
        &engine,
        &out,
        &[base.as_path(), &adapters[0].0],
        &MaterializeOptions::default(),
    )
    .unwrap();
    let expected = read_tree(&out);
    Fixture {
        _tmp: tmp,
        base,
        adapters,
        expected,
    }
}

fn engine(f: &Fixture, cache_bytes: usize) -> View {
    engine_with(f, cache_bytes, false)
}

fn engine_with(f: &Fixture, cache_bytes: usize, direct_base_reads: bool) -> View {
    let options = EngineOptions {
        cache_bytes,
        ..Default::default()
    };
    let mut engine = lorafs::Engine::open(&f.base, options).unwrap();
    engine.direct_base_reads = direct_base_reads;
    let view = View::open(std::sync::Arc::new(engine), &f.adapters, None, None).unwrap();
    view.realize_all().unwrap();
    view
}

/// Ranges that start and end on every interesting boundary: headers, tensors, blocks, EOF.
fn interesting_offsets(engine: &View, file: usize) -> Vec<u64> {
    let size = engine.files[file].size;
    let header = engine.files[file]
        .rel
        .extension()
        .is_some_and(|e| e == "safetensors")
        .then(|| {
            let bytes = std::fs::read(engine.files[file].source_path()).unwrap();
            8 + u64::from_le_bytes(bytes[..8].try_into().unwrap())
        });
    let mut v = vec![0, 1, 7, 8, 9, size.saturating_sub(1), size, size + 10];
    if let Some(h) = header {
        v.extend([h - 1, h, h + 1]);
    }
    v
}

#[test]
fn random_ranges_equal_materialized_bytes() {
    for dtype in [Dtype::BF16, Dtype::F32] {
        let f = fixture(dtype);
        for (cache, direct) in [
            (0, false),
            (4096, true),
            (64 << 20, false),
            (64 << 20, true),
        ] {
            // O_DIRECT base reads (models over half of RAM) serve the same bytes.
            let engine = engine_with(&f, cache, direct);
            let mut rng = StdRng::seed_from_u64(cache as u64);
            for (index, file) in engine.files.iter().enumerate() {
                let want = &f.expected[&file.rel];
                let size = file.size;
                let mut starts = interesting_offsets(&engine, index);
                starts.extend((0..40).map(|_| rng.random_range(0..size + 1)));
                for start in starts {
                    for len in [0u64, 1, 3, 4095, 100_003, rng.random_range(1..size + 2)] {
                        let mut buf = vec![0xAAu8; len as usize];
                        let n = engine.read_at(index, start, &mut buf).unwrap();
                        let lo = start.min(size) as usize;
                        let hi = (start + len).min(size) as usize;
                        assert_eq!(n, hi - lo, "{}: count at {start}+{len}", file.rel.display());
                        assert!(
                            buf[..n] == want[lo..hi],
                            "{}: bytes at {start}+{len}",
                            file.rel.display()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn converted_ranges_from_the_base_read_ahead_equal_materialized_bytes() {
    // `--dtype f32` over a bf16 base: the tensors that are not merged are converted. Each
    // read is preceded by a read-ahead from its start, as a sequential reader's is, so the
    // conversion runs on the base bytes read ahead, in ranges that cut elements too.
    let f = fixture(Dtype::BF16);
    let f32 = Some(lorafs::dtype::DType::F32);
    let reference = View::open_single(&f.base, &f.adapters, f32, None, Default::default());
    let (reference, out) = (reference.unwrap(), f._tmp.path().join("out-f32"));
    let inputs = [f.base.as_path(), &f.adapters[0].0];
    materialize(&reference, &out, &inputs, &MaterializeOptions::default()).unwrap();
    let expected = read_tree(&out);
    let mut engine = lorafs::Engine::open(&f.base, EngineOptions::default()).unwrap();
    engine.direct_base_reads = true;
    let view = View::open(Arc::new(engine), &f.adapters, f32, None).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    for (index, file) in view.files.iter().enumerate().filter(|(_, f)| f.size > 0) {
        let want = &expected[&file.rel];
        check_random_ranges(&view, index, want, &mut rng, (60, 300_000), true);
    }
    let served = view
        .engine
        .ahead
        .stats()
        .served
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(served > 0, "nothing was taken from the base read ahead");
}

#[test]
fn concurrent_readers_get_the_same_bytes() {
    let f = fixture(Dtype::F16);
    let engine = Arc::new(engine(&f, 256 << 10));
    let expected = Arc::new(f.expected.clone());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (engine, expected) = (engine.clone(), expected.clone());
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(t);
                for _ in 0..300 {
                    let index = rng.random_range(0..engine.files.len());
                    let file = &engine.files[index];
                    if file.size == 0 {
                        continue;
                    }
                    let start = rng.random_range(0..file.size);
                    let len = rng.random_range(1..300_000);
                    let mut buf = vec![0u8; len];
                    let n = engine.read_at(index, start, &mut buf).unwrap();
                    let want = &expected[&file.rel];
                    assert!(buf[..n] == want[start as usize..start as usize + n]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = &engine.engine.blocks.stats;
    assert!(stats.hits.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

#[test]
fn reads_never_modify_the_inputs() {
    let f = fixture(Dtype::BF16);
    let before = read_tree(&f.base);
    let adapter_before = read_tree(&f.adapters[0].0);
    let engine = engine(&f, 0);
    for index in 0..engine.files.len() {
        let mut buf = vec![0u8; engine.files[index].size as usize];
        engine.read_at(index, 0, &mut buf).unwrap();
    }
    assert!(read_tree(&f.base) == before);
    assert!(read_tree(&f.adapters[0].0) == adapter_before);
}
