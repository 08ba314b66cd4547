//! Write a Llama-shaped model of any size with random weights, and a LoRA adapter on every
//! linear layer, for benchmarks: no Python, no download, shards written one at a time so
//! memory stays at one shard.
//!
//! cargo run --release --example synth_model -- OUT [--layers 8] [--hidden 2048]
//!     [--intermediate 5632] [--vocab 32000] [--heads 16] [--kv-heads 4] [--rank 16]
//!     [--dtype f16|bf16] [--shard-gib 2] [--adapters 1]
//!     [--targets q_proj,k_proj,...] [--target-layers N] [--adapter-only]
//!
//! OUT/base is a transformers-loadable LlamaForCausalLM; OUT/adapter a PEFT LoRA adapter.
//! `--adapters N` also writes OUT/adapter-2 ... OUT/adapter-N: the same configuration with
//! other random factors, like the checkpoints of one training run. `--targets` (module names,
//! default all seven) and `--target-layers N` (the first N layers, default all) narrow what
//! the adapters change; `--adapter-only` skips the base, for an adapter (with other random
//! factors) on a base written before with the same shape arguments.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

struct Args {
    out: std::path::PathBuf,
    layers: usize,
    hidden: usize,
    intermediate: usize,
    vocab: usize,
    heads: usize,
    kv_heads: usize,
    rank: usize,
    dtype: Dtype,
    shard_bytes: usize,
    adapters: usize,
    targets: Vec<String>,
    target_layers: usize,
    adapter_only: bool,
}

const MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn parse() -> Args {
    let mut a = Args {
        out: "synth".into(),
        layers: 8,
        hidden: 2048,
        intermediate: 5632,
        vocab: 32000,
        heads: 16,
        kv_heads: 4,
        rank: 16,
        dtype: Dtype::F16,
        shard_bytes: 2 << 30,
        adapters: 1,
        targets: MODULES.iter().map(|m| m.to_string()).collect(),
        target_layers: usize::MAX,
        adapter_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--layers" => a.layers = value().parse().unwrap(),
            "--hidden" => a.hidden = value().parse().unwrap(),
            "--intermediate" => a.intermediate = value().parse().unwrap(),
            "--vocab" => a.vocab = value().parse().unwrap(),
            "--heads" => a.heads = value().parse().unwrap(),
            "--kv-heads" => a.kv_heads = value().parse().unwrap(),
            "--rank" => a.rank = value().parse().unwrap(),
            "--adapters" => a.adapters = value().parse().unwrap(),
            "--targets" => a.targets = value().split(',').map(str::to_string).collect(),
            "--target-layers" => a.target_layers = value().parse().unwrap(),
            "--adapter-only" => a.adapter_only = true,
            "--shard-gib" => {
                a.shard_bytes = (value().parse::<f64>().unwrap() * (1u64 << 30) as f64) as usize
            }
            "--dtype" => {
                a.dtype = match value().as_str() {
                    "f16" => Dtype::F16,
                    "bf16" => Dtype::BF16,
                    other => panic!("dtype {other}: use f16 or bf16"),
                }
            }
            _ if !arg.starts_with("--") => a.out = arg.into(),
            _ => panic!("unknown argument {arg}"),
        }
    }
    a
}

/// xorshift64*: fast, deterministic, good enough for weights nobody trains.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-scale, scale).
    fn uniform(&mut self, scale: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
}

fn values(rng: &mut Rng, n: usize, dtype: Dtype, scale: f32) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * (dtype.bitsize() / 8));
    for _ in 0..n {
        let x = rng.uniform(scale);
        match dtype {
            Dtype::F16 => out.extend(half::f16::from_f32(x).to_le_bytes()),
            Dtype::BF16 => out.extend(half::bf16::from_f32(x).to_le_bytes()),
            Dtype::F32 => out.extend(x.to_le_bytes()),
            _ => unreachable!(),
        }
    }
    out
}

fn write(path: &Path, tensors: &[(String, Vec<usize>, Dtype, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, d, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

fn main() {
    let a = parse();
    let base = a.out.join("base");
    let (h, i, kv) = (a.hidden, a.intermediate, a.hidden / a.heads * a.kv_heads);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);

    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![a.vocab, h])];
    let mut linear = Vec::new();
    for l in 0..a.layers {
        let p = format!("model.layers.{l}");
        shapes.push((format!("{p}.input_layernorm.weight"), vec![h]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        for (m, out, inp) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            shapes.push((format!("{p}.{m}.weight"), vec![out, inp]));
            let short = m.rsplit('.').next().unwrap();
            if l < a.target_layers && a.targets.iter().any(|t| t == short) {
                linear.push((format!("{p}.{m}"), out, inp));
            }
        }
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    shapes.push(("lm_head.weight".into(), vec![a.vocab, h]));

    if !a.targets.iter().all(|t| MODULES.contains(&t.as_str())) {
        panic!("--targets {:?}: use names among {MODULES:?}", a.targets);
    }
    let total = if a.adapter_only {
        0
    } else {
        write_base(&a, &base, shapes, &mut rng)
    };

    // Each adapter continues the same random stream, so OUT/adapter is the same with or
    // without --adapters and the others differ from it.
    for k in 1..=a.adapters {
        let name = if k == 1 {
            "adapter".to_string()
        } else {
            format!("adapter-{k}")
        };
        write_adapter(&a.out.join(name), &a, &linear, &base, &mut rng);
    }
    eprintln!(
        "base: {} ({:.2} GB); adapters: {} in {}",
        base.display(),
        total as f64 / 1e9,
        a.adapters,
        a.out.display()
    );
}

/// The base's shards, index and config.json at `base`; returns the bytes of weights written.
fn write_base(a: &Args, base: &Path, shapes: Vec<(String, Vec<usize>)>, rng: &mut Rng) -> usize {
    std::fs::create_dir_all(base).unwrap();
    let (h, i) = (a.hidden, a.intermediate);
    // Group tensors into shards of about shard_bytes, then write each shard.
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![vec![]];
    let mut size = 0;
    for (name, shape) in shapes {
        let bytes = shape.iter().product::<usize>() * (a.dtype.bitsize() / 8);
        if size + bytes > a.shard_bytes && !shards.last().unwrap().is_empty() {
            shards.push(vec![]);
            size = 0;
        }
        size += bytes;
        shards.last_mut().unwrap().push((name, shape));
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0;
    for (k, shard) in shards.into_iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        let tensors: Vec<_> = shard
            .into_iter()
            .map(|(name, shape)| {
                let numel = shape.iter().product();
                let scale = if shape.len() == 1 { 1.0 } else { 0.02 };
                let data = values(rng, numel, a.dtype, scale);
                total += data.len();
                weight_map.insert(name.clone(), json!(file));
                (name, shape, a.dtype, data)
            })
            .collect();
        write(&base.join(&file), &tensors);
        eprintln!("wrote {}", base.join(&file).display());
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(
            base.join("model.safetensors.index.json"),
            serde_json::to_vec_pretty(&index).unwrap(),
        )
        .unwrap();
    }
    let dtype = if a.dtype == Dtype::F16 {
        "float16"
    } else {
        "bfloat16"
    };
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": i, "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "vocab_size": a.vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": false, "torch_dtype": dtype, "dtype": dtype,
        "bos_token_id": 1, "eos_token_id": 2,
    });
    std::fs::write(
        base.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();

    total
}

/// A PEFT LoRA adapter at `dir` with random factors on the `linear` layers of `base`.
fn write_adapter(
    dir: &Path,
    a: &Args,
    linear: &[(String, usize, usize)],
    base: &Path,
    rng: &mut Rng,
) {
    std::fs::create_dir_all(dir).unwrap();
    let mut factors = Vec::new();
    for (m, out, inp) in linear {
        let r = a.rank;
        factors.push((
            format!("base_model.model.{m}.lora_A.weight"),
            vec![r, *inp],
            Dtype::F32,
            values(rng, r * inp, Dtype::F32, 0.05),
        ));
        factors.push((
            format!("base_model.model.{m}.lora_B.weight"),
            vec![*out, r],
            Dtype::F32,
            values(rng, out * r, Dtype::F32, 0.05),
        ));
    }
    write(&dir.join("adapter_model.safetensors"), &factors);
    let config = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": a.rank, "lora_alpha": 2 * a.rank,
        "target_modules": a.targets,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": false, "use_rslora": false,
        "init_lora_weights": false, "base_model_name_or_path": base.display().to_string(),
    });
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
}
