//! Tiny synthetic models and adapters, written with the `safetensors` crate, and an
//! independent f64 reference merge to check lorafs against.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

/// A tensor to write: name, dtype, shape, values (f64, rounded to the dtype on write).
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

pub fn encode(dtype: Dtype, values: &[f64]) -> Vec<u8> {
    match dtype {
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f64(v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f64(v).to_le_bytes())
            .collect(),
        Dtype::F32 => values
            .iter()
            .flat_map(|&v| (v as f32).to_le_bytes())
            .collect(),
        Dtype::I32 => values
            .iter()
            .flat_map(|&v| (v as i32).to_le_bytes())
            .collect(),
        Dtype::I8 => values.iter().map(|&v| v as i8 as u8).collect(),
        other => panic!("test helper cannot encode {other:?}"),
    }
}

pub fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::F16 => bytes
            .chunks(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::BF16 => bytes
            .chunks(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::F32 => bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Dtype::I32 => bytes
            .chunks(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        other => panic!("test helper cannot decode {other:?}"),
    }
}

/// Write tensors as a safetensors file (the crate orders them; metadata `format: pt`).
pub fn write_safetensors(path: &Path, tensors: &[Tensor]) {
    let data: Vec<(String, Vec<u8>, &Tensor)> = tensors
        .iter()
        .map(|t| (t.name.clone(), encode(t.dtype, &t.values), t))
        .collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(name, bytes, t)| {
            (
                name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

/// Read every tensor of a safetensors file as f64.
pub fn read_safetensors(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let values = match v.dtype() {
                Dtype::F16 | Dtype::BF16 | Dtype::F32 => decode(v.dtype(), v.data()),
                _ => v.data().iter().map(|&b| b as f64).collect(),
            };
            (name, (v.dtype(), v.shape().to_vec(), values))
        })
        .collect()
}

pub fn random_values(rng: &mut StdRng, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| rng.random_range(-1.0..1.0) * scale)
        .collect()
}

/// A small Llama-shaped base: embeddings, `layers` blocks of attention and MLP projections
/// with deliberately odd sizes, norms, and an lm_head.
#[derive(Clone, Debug)]
pub struct BaseSpec {
    pub dtype: Dtype,
    pub layers: usize,
    pub hidden: usize,
    pub kv: usize,
    pub inter: usize,
    pub vocab: usize,
    /// Number of shard files (1 = a single model.safetensors).
    pub shards: usize,
    pub seed: u64,
}

impl Default for BaseSpec {
    fn default() -> Self {
        BaseSpec {
            dtype: Dtype::BF16,
            layers: 2,
            hidden: 48,
            kv: 24,
            inter: 77,
            vocab: 101,
            shards: 1,
            seed: 1,
        }
    }
}

/// `(module name, out features, in features)` of every linear layer of the spec.
pub fn linear_modules(spec: &BaseSpec) -> Vec<(String, usize, usize)> {
    let (h, kv, i) = (spec.hidden, spec.kv, spec.inter);
    let mut out = Vec::new();
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.self_attn.q_proj"), h, h));
        out.push((format!("{p}.self_attn.k_proj"), kv, h));
        out.push((format!("{p}.self_attn.v_proj"), kv, h));
        out.push((format!("{p}.self_attn.o_proj"), h, h));
        out.push((format!("{p}.mlp.gate_proj"), i, h));
        out.push((format!("{p}.mlp.up_proj"), i, h));
        out.push((format!("{p}.mlp.down_proj"), h, i));
    }
    out
}

/// Write a base model directory; returns its tensors.
pub fn write_base(dir: &Path, spec: &BaseSpec) -> Vec<Tensor> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut tensors = vec![Tensor {
        name: "model.embed_tokens.weight".into(),
        dtype: spec.dtype,
        shape: vec![spec.vocab, spec.hidden],
        values: random_values(&mut rng, spec.vocab * spec.hidden, 1.0),
    }];
    for l in 0..spec.layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tensors.push(Tensor {
                name: format!("model.layers.{l}.{norm}.weight"),
                dtype: spec.dtype,
                shape: vec![spec.hidden],
                values: random_values(&mut rng, spec.hidden, 1.0),
            });
        }
    }
    for (name, out, inp) in linear_modules(spec) {
        tensors.push(Tensor {
            name: format!("{name}.weight"),
            dtype: spec.dtype,
            shape: vec![out, inp],
            values: random_values(&mut rng, out * inp, 0.5),
        });
    }
    tensors.push(Tensor {
        name: "model.norm.weight".into(),
        dtype: spec.dtype,
        shape: vec![spec.hidden],
        values: random_values(&mut rng, spec.hidden, 1.0),
    });
    tensors.push(Tensor {
        name: "lm_head.weight".into(),
        dtype: spec.dtype,
        shape: vec![spec.vocab, spec.hidden],
        values: random_values(&mut rng, spec.vocab * spec.hidden, 1.0),
    });

    let config = json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": spec.hidden, "vocab_size": spec.vocab});
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        br#"{"version": "1.0", "model": {"type": "WordLevel"}}"#,
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("extra/nested")).unwrap();
    std::fs::write(dir.join("extra/nested/notes.txt"), b"not a weight file\n").unwrap();
    std::fs::write(dir.join("extra/empty.txt"), b"").unwrap();

    if spec.shards <= 1 {
        write_safetensors(&dir.join("model.safetensors"), &tensors);
    } else {
        let per = tensors.len().div_ceil(spec.shards);
        let mut weight_map = serde_json::Map::new();
        let mut total = 0;
        for (k, chunk) in tensors.chunks(per).enumerate() {
            let name = format!("model-{:05}-of-{:05}.safetensors", k + 1, spec.shards);
            write_safetensors(&dir.join(&name), chunk);
            for t in chunk {
                weight_map.insert(t.name.clone(), Value::String(name.clone()));
                total += encode(t.dtype, &t.values).len();
            }
        }
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_vec_pretty(&index).unwrap(),
        )
        .unwrap();
    }
    tensors
}

/// Per module, the (A, B) factors written, as f64 after rounding to the file's dtype.
pub type Factors = BTreeMap<String, (Vec<f64>, Vec<f64>)>;

/// A LoRA adapter to write.
#[derive(Clone, Debug)]
pub struct AdapterSpec {
    pub r: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub dtype: Dtype,
    /// Module names (no prefix, no `.weight`) and their (out, in) shapes.
    pub modules: Vec<(String, usize, usize)>,
    /// Per-module rank overrides (also written as rank_pattern).
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub prefix: bool,
    pub seed: u64,
}

impl AdapterSpec {
    pub fn new(spec: &BaseSpec, r: usize, filter: &str) -> AdapterSpec {
        AdapterSpec {
            r,
            alpha: 2.0 * r as f64,
            rslora: false,
            dtype: Dtype::F32,
            modules: linear_modules(spec)
                .into_iter()
                .filter(|(m, _, _)| m.contains(filter))
                .collect(),
            rank_pattern: vec![],
            alpha_pattern: vec![],
            prefix: true,
            seed: 7,
        }
    }

    /// PEFT's first-match rule, for the reference.
    fn lookup<T: Copy>(patterns: &[(String, T)], module: &str) -> Option<T> {
        patterns.iter().find_map(|(k, v)| {
            let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).unwrap();
            re.is_match(module).then_some(*v)
        })
    }

    pub fn rank_for(&self, module: &str) -> usize {
        Self::lookup(&self.rank_pattern, module).unwrap_or(self.r)
    }

    pub fn scale_for(&self, module: &str) -> f64 {
        let alpha = Self::lookup(&self.alpha_pattern, module).unwrap_or(self.alpha);
        let r = self.rank_for(module) as f64;
        if self.rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

pub fn write_config(dir: &Path, config: &Value) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec_pretty(config).unwrap(),
    )
    .unwrap();
}

/// Write an adapter directory; returns, per module, (A, B) as stored (rounded to the dtype).
pub fn write_adapter(dir: &Path, spec: &AdapterSpec) -> Factors {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let prefix = if spec.prefix { "base_model.model." } else { "" };
    let mut tensors = Vec::new();
    let mut factors = BTreeMap::new();
    for (module, out, inp) in &spec.modules {
        let r = spec.rank_for(module);
        let a = random_values(&mut rng, r * inp, 0.3);
        let b = random_values(&mut rng, out * r, 0.3);
        let round = |v: &[f64]| decode(spec.dtype, &encode(spec.dtype, v));
        factors.insert(module.clone(), (round(&a), round(&b)));
        tensors.push(Tensor {
            name: format!("{prefix}{module}.lora_A.weight"),
            dtype: spec.dtype,
            shape: vec![r, *inp],
            values: a,
        });
        tensors.push(Tensor {
            name: format!("{prefix}{module}.lora_B.weight"),
            dtype: spec.dtype,
            shape: vec![*out, r],
            values: b,
        });
    }
    let targets: Vec<String> = {
        let mut t: Vec<String> = spec
            .modules
            .iter()
            .map(|(m, _, _)| m.rsplit('.').next().unwrap().to_string())
            .collect();
        t.sort();
        t.dedup();
        t
    };
    let pattern = |p: &[(String, Value)]| Value::Object(p.iter().cloned().collect());
    let config = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.r, "lora_alpha": spec.alpha,
        "use_rslora": spec.rslora, "target_modules": targets, "fan_in_fan_out": false,
        "bias": "none", "init_lora_weights": false, "use_dora": false,
        "rank_pattern": pattern(&spec.rank_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Vec<_>>()),
        "alpha_pattern": pattern(&spec.alpha_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Vec<_>>()),
    });
    write_config(dir, &config);
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors);
    factors
}

/// The merged value of every tensor, in f64: `W + Σ w·s·B@A`, unrounded, with a bound on
/// the f32 accumulation error lorafs is allowed (`Σ|terms|`).
pub fn reference_merge(
    base: &[Tensor],
    adapters: &[(&AdapterSpec, &Factors, f64)],
) -> BTreeMap<String, (Vec<f64>, Vec<f64>)> {
    let mut out = BTreeMap::new();
    for t in base {
        let w = decode(t.dtype, &encode(t.dtype, &t.values));
        let mut merged = w.clone();
        let mut magnitude = vec![0.0; w.len()];
        let module = t.name.strip_suffix(".weight").unwrap_or(&t.name);
        for (spec, factors, weight) in adapters {
            let Some((a, b)) = factors.get(module) else {
                continue;
            };
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let r = a.len() / cols;
            let s = weight * spec.scale_for(module);
            for i in 0..rows {
                for j in 0..cols {
                    let mut acc = 0.0;
                    let mut mag = 0.0;
                    for k in 0..r {
                        let term = b[i * r + k] * a[k * cols + j];
                        acc += term;
                        mag += term.abs();
                    }
                    merged[i * cols + j] += s * acc;
                    magnitude[i * cols + j] += s.abs() * mag;
                }
            }
        }
        out.insert(t.name.clone(), (merged, magnitude));
    }
    out
}

/// One unit in the last place of `dtype` at the magnitude of `x`.
pub fn ulp(dtype: Dtype, x: f64) -> f64 {
    let (mant_bits, min_exp) = match dtype {
        Dtype::F16 => (10, -14),
        Dtype::BF16 => (7, -126),
        Dtype::F32 => (23, -126),
        other => panic!("{other:?}"),
    };
    let e = if x == 0.0 {
        min_exp
    } else {
        (x.abs().log2().floor() as i32).max(min_exp)
    };
    2f64.powi(e - mant_bits)
}

/// Check that `actual` is `reference` rounded once to `dtype`: within one ulp of the output
/// dtype, plus the f32 accumulation slack (a few f32 ulps of the summed magnitudes).
pub fn assert_close(name: &str, dtype: Dtype, actual: &[f64], reference: &(Vec<f64>, Vec<f64>)) {
    let (want, magnitude) = reference;
    assert_eq!(actual.len(), want.len(), "{name}: length");
    for (i, ((&got, &want), &mag)) in actual.iter().zip(want).zip(magnitude).enumerate() {
        let tol = ulp(dtype, want) + mag * 2f64.powi(-20) + 1e-30;
        assert!(
            (got - want).abs() <= tol,
            "{name}[{i}]: lorafs {got} vs reference {want} (tolerance {tol}, dtype {dtype:?})"
        );
    }
}

pub fn lorafs_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lorafs"))
}

/// Run the binary; returns (success, stdout, stderr).
pub fn run_lorafs<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
) -> (bool, String, String) {
    output_of(std::process::Command::new(lorafs_bin()).args(args))
}

/// Run `command`: (success, stdout, stderr).
pub fn output_of(command: &mut std::process::Command) -> (bool, String, String) {
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every regular file under `dir`, relative path → bytes.
pub fn read_tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// An engine over `base` and `(adapter directory, weight)`s through the library, with a
/// 1 MiB cache.
pub fn open_engine(base: &Path, adapters: &[(&Path, f64)]) -> lorafs::Result<lorafs::View> {
    let list: Vec<_> = adapters
        .iter()
        .map(|(p, w)| (p.to_path_buf(), *w))
        .collect();
    lorafs::View::open_single(
        base,
        &list,
        None,
        None,
        lorafs::EngineOptions {
            cache_bytes: 1 << 20,
            ..Default::default()
        },
    )
}

/// Materialize `base` + adapters into `out` through the library; returns the engine.
pub fn materialize_lib(base: &Path, adapters: &[(&Path, f64)], out: &Path) -> lorafs::View {
    let engine = open_engine(base, adapters).unwrap();
    let inputs: Vec<&Path> = std::iter::once(base)
        .chain(adapters.iter().map(|(p, _)| *p))
        .collect();
    lorafs::materialize::materialize(
        &engine,
        out,
        &inputs,
        &lorafs::materialize::MaterializeOptions::default(),
    )
    .unwrap();
    engine
}

/// Run `lorafs materialize BASE OUT --adapter ...` in `dir`: it must fail with one line
/// holding every `expect`, and leave nothing named like OUT.
pub fn refused(dir: &Path, adapters: &[std::ffi::OsString], expect: &[&str]) {
    let out = dir.join("out");
    let mut args: Vec<std::ffi::OsString> =
        vec!["materialize".into(), dir.join("base").into(), out.into()];
    for a in adapters {
        args.extend(["--adapter".into(), a.clone()]);
    }
    let (ok, _, err) = run_lorafs(&args);
    assert!(!ok, "accepted: {expect:?}");
    for e in expect {
        assert!(err.contains(e), "{e:?} not in {err}");
    }
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("out"))
        .collect();
    assert!(left.is_empty(), "nothing written: {left:?}");
}

/// A temporary directory with a default base at `base/` and a rank-4 adapter on the
/// `q_proj` layers at `a/`: (the directory, the base's spec, base, adapter).
pub fn small_model() -> (tempfile::TempDir, BaseSpec, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    let base = tmp.path().join("base");
    write_base(&base, &spec);
    let adapter = tmp.path().join("a");
    write_adapter(&adapter, &AdapterSpec::new(&spec, 4, "self_attn.q_proj"));
    (tmp, spec, base, adapter)
}

/// `count` random ranges (1 to `max_len` bytes) of file `index` of `view`, each read with
/// `read_at` after a read-ahead from its start if `ahead` (as a sequential reader's read),
/// must be those bytes of `want`.
pub fn check_random_ranges(
    view: &lorafs::View,
    index: usize,
    want: &[u8],
    rng: &mut StdRng,
    (count, max_len): (usize, u64),
    ahead: bool,
) {
    let (rel, size) = (&view.files[index].rel, view.files[index].size);
    for _ in 0..count {
        let start = rng.random_range(0..size);
        let len = rng.random_range(1..max_len).min(size - start);
        if ahead {
            view.read_ahead(index, start);
        }
        let mut buf = vec![0xAAu8; len as usize];
        assert_eq!(view.read_at(index, start, &mut buf).unwrap(), len as usize);
        let (lo, hi) = (start as usize, (start + len) as usize);
        assert!(
            buf == want[lo..hi],
            "{}: bytes at {start}+{len}, ahead={ahead}",
            rel.display()
        );
    }
}
