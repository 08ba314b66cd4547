//! Adapter features beyond plain LoRA, on synthetic models, against an f64 reference:
//! replaced tensors (same shape, other dtype, resized vocabulary), lora_B.bias, trainable
//! tokens and DoRA.

use std::collections::BTreeMap;
use std::path::Path;

use lorafs::View;
use rand::rngs::StdRng;
use rand::SeedableRng;
use safetensors::Dtype;
use serde_json::{json, Value};

use crate::common::*;

const P: &str = "base_model.model.";

/// Each adapter at weight 1.
fn weighted<'a>(adapters: &[&'a Path]) -> Vec<(&'a Path, f64)> {
    adapters.iter().map(|&p| (p, 1.0)).collect()
}

fn open(base: &Path, adapters: &[&Path]) -> lorafs::Result<View> {
    open_engine(base, &weighted(adapters))
}

fn run(base: &Path, adapters: &[&Path], out: &Path) -> View {
    materialize_lib(base, &weighted(adapters), out)
}

fn config(extra: Value) -> Value {
    let mut c = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        "bias": "none", "use_dora": false, "use_rslora": false});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn t(name: &str, dtype: Dtype, shape: &[usize], values: Vec<f64>) -> Tensor {
    Tensor {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        values,
    }
}

/// `lora_A` of `module`: `rank × fan_in`, F32.
fn lora_a(module: &str, rank: usize, fan_in: usize, values: Vec<f64>) -> Tensor {
    t(
        &format!("{P}{module}.lora_A.weight"),
        Dtype::F32,
        &[rank, fan_in],
        values,
    )
}

/// `lora_B` of `module`: `fan_out × rank`, F32.
fn lora_b(module: &str, fan_out: usize, rank: usize, values: Vec<f64>) -> Tensor {
    t(
        &format!("{P}{module}.lora_B.weight"),
        Dtype::F32,
        &[fan_out, rank],
        values,
    )
}

fn rounded(dtype: Dtype, v: &[f64]) -> Vec<f64> {
    decode(dtype, &encode(dtype, v))
}

/// `W + s·B@A` in f64 for an (out, in) Linear.
fn lora(w: &[f64], a: &[f64], b: &[f64], out: usize, inp: usize, s: f64) -> Vec<f64> {
    let r = a.len() / inp;
    let mut x = w.to_vec();
    for i in 0..out {
        for j in 0..inp {
            x[i * inp + j] += s * (0..r).map(|k| b[i * r + k] * a[k * inp + j]).sum::<f64>();
        }
    }
    x
}

/// Every value within one ulp of the output dtype (plus f32 noise) of the reference.
fn close(name: &str, dtype: Dtype, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = ulp(dtype, w) + 1e-6 * (1.0 + w.abs());
        assert!(
            (g - w).abs() <= tol,
            "{name}[{i}]: lorafs {g} vs reference {w}"
        );
    }
}

fn values(out: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<f64>)> {
    let mut all = BTreeMap::new();
    for (rel, _) in read_tree(out) {
        if rel.extension().is_some_and(|e| e == "safetensors") {
            all.extend(read_safetensors(&out.join(rel)));
        }
    }
    all
}

fn find<'a>(base: &'a [Tensor], name: &str) -> &'a Tensor {
    base.iter().find(|t| t.name == name).unwrap()
}

#[test]
fn replacements_same_shape_with_lora_on_top() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    let base = write_base(&tmp.path().join("base"), &spec);
    let mut rng = StdRng::seed_from_u64(5);
    let (h, v) = (spec.hidden, spec.vocab);
    // modules_to_save lm_head in F32 (rounded to the base's BF16), with the wrapper's copy
    // and the original beside it (PEFT saves them with a resized vocabulary, and loads
    // neither: other values here, which must not be served); q_proj replaced as
    // `base_layer.weight` with LoRA factors on top, and a norm replaced in BF16 (copied).
    let head = random_values(&mut rng, v * h, 1.0);
    let copies = ["modules_to_save", "original_module"].map(|wrapper| {
        let values = random_values(&mut rng, v * h, 1.0);
        t(
            &format!("{P}lm_head.{wrapper}.weight"),
            Dtype::F32,
            &[v, h],
            values,
        )
    });
    let q_w = random_values(&mut rng, h * h, 0.5);
    let norm = random_values(&mut rng, h, 1.0);
    let a = random_values(&mut rng, 4 * h, 0.3);
    let b = random_values(&mut rng, h * 4, 0.3);
    let q = "model.layers.0.self_attn.q_proj";
    let adir = tmp.path().join("a");
    write_config(&adir, &config(json!({"modules_to_save": ["lm_head"]})));
    write_safetensors(
        &adir.join("adapter_model.safetensors"),
        &[
            t(
                &format!("{P}lm_head.weight"),
                Dtype::F32,
                &[v, h],
                head.clone(),
            ),
            t(
                &format!("{P}{q}.base_layer.weight"),
                Dtype::F32,
                &[h, h],
                q_w.clone(),
            ),
            t(
                &format!("{P}model.norm.weight"),
                Dtype::BF16,
                &[h],
                norm.clone(),
            ),
            lora_a(q, 4, h, a.clone()),
            lora_b(q, h, 4, b.clone()),
            copies[0].clone(),
            copies[1].clone(),
        ],
    );
    let out = tmp.path().join("out");
    let engine = run(&tmp.path().join("base"), &[&adir], &out);
    assert_eq!(engine.plan.merges.len(), 3);
    let got = values(&out);
    let bf = Dtype::BF16;
    assert_eq!(
        got["lm_head.weight"].2,
        rounded(bf, &head),
        "converted once"
    );
    assert_eq!(got["model.norm.weight"].2, rounded(bf, &norm), "copied");
    let want = lora(&rounded(bf, &q_w), &a, &b, h, h, 2.0);
    close("q_proj", bf, &got[&format!("{q}.weight")].2, &want);
    for t in &base {
        if !["lm_head.weight", "model.norm.weight"].contains(&t.name.as_str())
            && !t.name.starts_with(q)
        {
            assert_eq!(
                got[&t.name].2,
                rounded(bf, &t.values),
                "{} untouched",
                t.name
            );
        }
    }
    // every file keeps its size and header (same shapes)
    let before = read_tree(&tmp.path().join("base"));
    for (rel, bytes) in read_tree(&out) {
        assert_eq!(bytes.len(), before[&rel].len(), "{}", rel.display());
    }
}

#[test]
fn resized_vocabulary_regenerates_header_index_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec {
        shards: 3,
        dtype: Dtype::F16,
        ..BaseSpec::default()
    };
    let base = write_base(&tmp.path().join("base"), &spec);
    let mut rng = StdRng::seed_from_u64(9);
    let (h, v2) = (spec.hidden, spec.vocab + 13);
    let emb = random_values(&mut rng, v2 * h, 1.0);
    let head = random_values(&mut rng, v2 * h, 1.0);
    let a = random_values(&mut rng, 4 * h, 0.3);
    let b = random_values(&mut rng, v2 * 4, 0.3);
    let adir = tmp.path().join("a");
    write_config(&adir, &config(json!({"target_modules": ["lm_head"]})));
    write_safetensors(
        &adir.join("adapter_model.safetensors"),
        &[
            t(
                &format!("{P}model.embed_tokens.weight"),
                Dtype::F16,
                &[v2, h],
                emb.clone(),
            ),
            t(
                &format!("{P}lm_head.base_layer.weight"),
                Dtype::F32,
                &[v2, h],
                head.clone(),
            ),
            lora_a("lm_head", 4, h, a.clone()),
            lora_b("lm_head", v2, 4, b.clone()),
        ],
    );
    std::fs::write(adir.join("tokenizer.json"), b"{\"added\": true}").unwrap();
    let out = tmp.path().join("out");
    let engine = run(&tmp.path().join("base"), &[&adir], &out);
    let report = lorafs::inspect::report(&engine, false);
    assert!(
        report.contains(&format!(
            "resized vocab {} -> {v2} (rewritten: safetensors headers, \
             model.safetensors.index.json, config.json vocab_size)\n",
            spec.vocab
        )),
        "{report}"
    );
    let got = values(&out);
    let f = Dtype::F16;
    assert_eq!(got["model.embed_tokens.weight"].1, vec![v2, h]);
    assert_eq!(got["model.embed_tokens.weight"].2, rounded(f, &emb));
    assert_eq!(got["lm_head.weight"].1, vec![v2, h]);
    close(
        "lm_head",
        f,
        &got["lm_head.weight"].2,
        &lora(&rounded(f, &head), &a, &b, v2, h, 2.0),
    );
    for t in &base {
        if !t.name.contains("embed_tokens") && t.name != "lm_head.weight" {
            assert_eq!(got[&t.name].2, rounded(f, &t.values), "{}", t.name);
        }
    }
    // index: total_size is the sum of the tensors' bytes, every shard listed exists
    let index: Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let total: usize = got
        .values()
        .map(|(_, s, _)| s.iter().product::<usize>() * 2)
        .sum();
    assert_eq!(index["metadata"]["total_size"], json!(total));
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], json!(v2));
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        b"{\"added\": true}"
    );
    // headers: metadata kept, JSON padded to 8 bytes, tensors in the base's order
    for (rel, bytes) in read_tree(&out) {
        if rel.extension().is_some_and(|e| e == "safetensors") {
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            assert_eq!(n % 8, 0);
            let st = safetensors::SafeTensors::read_metadata(&bytes).unwrap().1;
            assert_eq!(
                st.metadata()
                    .as_ref()
                    .and_then(|m| m.get("format"))
                    .map(String::as_str),
                Some("pt")
            );
            let before = std::fs::read(tmp.path().join("base").join(&rel)).unwrap();
            let old = safetensors::SafeTensors::read_metadata(&before).unwrap().1;
            assert_eq!(st.offset_keys(), old.offset_keys(), "{}", rel.display());
        }
    }
}

#[test]
fn inspect_names_only_the_files_a_resize_rewrites() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    let base = tmp.path().join("base");
    write_base(&base, &spec);
    // A config whose vocab_size is not the embedding's row count is served as it is.
    std::fs::write(
        base.join("config.json"),
        json!({"model_type": "llama", "vocab_size": 128}).to_string(),
    )
    .unwrap();
    let (h, v2) = (spec.hidden, spec.vocab + 3);
    let adir = tmp.path().join("a");
    write_config(&adir, &config(json!({})));
    let resized = |name: &str| {
        t(
            &format!("{P}{name}"),
            Dtype::F32,
            &[v2, h],
            vec![0.5; v2 * h],
        )
    };
    write_safetensors(
        &adir.join("adapter_model.safetensors"),
        &[
            resized("model.embed_tokens.weight"),
            resized("lm_head.weight"),
        ],
    );
    let engine = open(&base, &[&adir]).unwrap();
    let report = lorafs::inspect::report(&engine, false);
    assert!(
        report.contains(&format!(
            "resized vocab {} -> {v2} (rewritten: safetensors headers; config.json keeps \
             vocab_size 128)\n",
            spec.vocab
        )),
        "{report}"
    );
    let plan: serde_json::Value =
        serde_json::from_str(&lorafs::inspect::json::report(&engine, false)).unwrap();
    assert_eq!(
        plan["vocab_resize"],
        json!({"base": spec.vocab, "merged": v2, "rewritten": ["safetensors headers"],
               "config_vocab_size": 128}),
        "the JSON says what the text says"
    );
}

/// A GPT-2-shaped base with one block: Conv1D weights stored (in, out), F32.
pub fn write_gpt2(dir: &Path, h: usize, vocab: usize) -> Vec<Tensor> {
    let mut rng = StdRng::seed_from_u64(21);
    let mut w = |name: &str, shape: &[usize]| {
        let n = shape.iter().product();
        t(name, Dtype::F32, shape, random_values(&mut rng, n, 0.5))
    };
    let tensors = vec![
        w("transformer.wte.weight", &[vocab, h]),
        w("transformer.h.0.attn.c_attn.weight", &[h, 3 * h]),
        w("transformer.h.0.attn.c_proj.weight", &[h, h]),
        w("transformer.h.0.mlp.c_fc.weight", &[h, 4 * h]),
        w("transformer.h.0.mlp.c_proj.weight", &[4 * h, h]),
        w("transformer.ln_f.weight", &[h]),
    ];
    std::fs::create_dir_all(dir).unwrap();
    let config = json!({"model_type": "gpt2", "n_embd": h, "vocab_size": vocab});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    write_safetensors(&dir.join("model.safetensors"), &tensors);
    tensors
}

#[test]
fn gpt2_conv1d_and_embedding_lora_merge_transposed() {
    let tmp = tempfile::tempdir().unwrap();
    let (h, vocab, r) = (16, 50, 2);
    let base = write_gpt2(&tmp.path().join("base"), h, vocab);
    let mut rng = StdRng::seed_from_u64(23);
    // fan_in_fan_out is left false: PEFT (and lorafs) follow the layer, and the square
    // attn.c_proj shows that the architecture decides, not the shapes.
    let adir = tmp.path().join("a");
    write_config(
        &adir,
        &json!({"peft_type": "LORA", "r": r, "lora_alpha": 4,
            "target_modules": ["c_attn", "c_proj", "c_fc", "wte"]}),
    );
    let mut tensors = Vec::new();
    let mut want = BTreeMap::new();
    for w in &base {
        let Some(module) = w.name.strip_suffix(".weight") else {
            continue;
        };
        if w.shape.len() != 2 {
            continue;
        }
        // Stored (rows, cols) = (in, out) for Conv1D, (vocab, dim) for wte: A is r × rows,
        // B is cols × r, and W[i, j] += s·Σₖ B[j, k]·A[k, i].
        let (rows, cols) = (w.shape[0], w.shape[1]);
        let a = random_values(&mut rng, r * rows, 0.3);
        let b = random_values(&mut rng, cols * r, 0.3);
        let mut x = w
            .values
            .iter()
            .map(|&v| v as f32 as f64)
            .collect::<Vec<_>>();
        for i in 0..rows {
            for j in 0..cols {
                x[i * cols + j] +=
                    2.0 * (0..r).map(|k| b[j * r + k] * a[k * rows + i]).sum::<f64>();
            }
        }
        want.insert(w.name.clone(), x);
        let (ka, kb) = if module.ends_with("wte") {
            ("lora_embedding_A", "lora_embedding_B")
        } else {
            ("lora_A.weight", "lora_B.weight")
        };
        tensors.push(t(&format!("{P}{module}.{ka}"), Dtype::F32, &[r, rows], a));
        tensors.push(t(&format!("{P}{module}.{kb}"), Dtype::F32, &[cols, r], b));
    }
    write_safetensors(&adir.join("adapter_model.safetensors"), &tensors);
    let out = tmp.path().join("out");
    let engine = run(&tmp.path().join("base"), &[&adir], &out);
    let features = &engine.plan.adapters[0].features;
    assert_eq!((features.conv1d, features.embedding_lora), (4, 1));
    let got = values(&out);
    assert_eq!(want.len(), 5);
    for (name, x) in &want {
        close(name, Dtype::F32, &got[name].2, x);
    }
}

/// A base with biases on the attention projections (one file).
fn base_with_biases(dir: &Path, spec: &BaseSpec) -> Vec<Tensor> {
    let mut base = write_base(dir, spec);
    let mut rng = StdRng::seed_from_u64(3);
    for (name, out, _) in linear_modules(spec) {
        if name.contains("self_attn") {
            base.push(t(
                &format!("{name}.bias"),
                spec.dtype,
                &[out],
                random_values(&mut rng, out, 0.5),
            ));
        }
    }
    write_safetensors(&dir.join("model.safetensors"), &base);
    base
}

#[test]
fn lora_bias_adds_scaled_bias_and_trained_biases_replace() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    let base = base_with_biases(&tmp.path().join("base"), &spec);
    let mut rng = StdRng::seed_from_u64(11);
    let h = spec.hidden;
    let q = "model.layers.1.self_attn.q_proj";
    let k = "model.layers.1.self_attn.k_proj";
    let a = random_values(&mut rng, 4 * h, 0.3);
    let b = random_values(&mut rng, h * 4, 0.3);
    let lb = random_values(&mut rng, h, 0.3);
    let kb = random_values(&mut rng, spec.kv, 0.3);
    let adir = tmp.path().join("a");
    write_config(
        &adir,
        &config(json!({"lora_bias": true, "bias": "all", "lora_alpha": 6})),
    );
    write_safetensors(
        &adir.join("adapter_model.safetensors"),
        &[
            lora_a(q, 4, h, a.clone()),
            lora_b(q, h, 4, b.clone()),
            t(&format!("{P}{q}.lora_B.bias"), Dtype::F32, &[h], lb.clone()),
            t(&format!("{P}{k}.bias"), Dtype::F32, &[spec.kv], kb.clone()),
        ],
    );
    let out = tmp.path().join("out");
    run(&tmp.path().join("base"), &[&adir], &out);
    let got = values(&out);
    let bf = Dtype::BF16;
    let s = 6.0 / 4.0;
    let qb = rounded(bf, &find(&base, &format!("{q}.bias")).values);
    let want: Vec<f64> = qb.iter().zip(&lb).map(|(w, x)| w + s * x).collect();
    close("q bias", bf, &got[&format!("{q}.bias")].2, &want);
    let qw = rounded(bf, &find(&base, &format!("{q}.weight")).values);
    close(
        "q weight",
        bf,
        &got[&format!("{q}.weight")].2,
        &lora(&qw, &a, &b, h, h, s),
    );
    assert_eq!(got[&format!("{k}.bias")].2, rounded(bf, &kb));
}

#[test]
fn trainable_tokens_replace_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec {
        dtype: Dtype::F16,
        ..BaseSpec::default()
    };
    let base = write_base(&tmp.path().join("base"), &spec);
    let mut rng = StdRng::seed_from_u64(13);
    let h = spec.hidden;
    let indices = [7usize, 0, 100, 42];
    let delta = random_values(&mut rng, indices.len() * h, 1.0);
    let adir = tmp.path().join("a");
    write_config(
        &adir,
        &config(json!({"trainable_token_indices": {"embed_tokens": indices}})),
    );
    let q = "model.layers.0.self_attn.q_proj";
    let a = random_values(&mut rng, 4 * h, 0.3);
    let b = random_values(&mut rng, h * 4, 0.3);
    write_safetensors(
        &adir.join("adapter_model.safetensors"),
        &[
            t(
                &format!("{P}model.embed_tokens.token_adapter.trainable_tokens_delta"),
                Dtype::F32,
                &[indices.len(), h],
                delta.clone(),
            ),
            lora_a(q, 4, h, a),
            lora_b(q, h, 4, b),
        ],
    );
    let out = tmp.path().join("out");
    run(&tmp.path().join("base"), &[&adir], &out);
    let got = values(&out);
    let f = Dtype::F16;
    let mut want = rounded(f, &find(&base, "model.embed_tokens.weight").values);
    for (k, &i) in indices.iter().enumerate() {
        want[i * h..(i + 1) * h].copy_from_slice(&rounded(f, &delta[k * h..(k + 1) * h]));
    }
    assert_eq!(got["model.embed_tokens.weight"].2, want);
}

#[test]
fn dora_rescales_rows() {
    for dtype in [Dtype::F32, Dtype::BF16] {
        let tmp = tempfile::tempdir().unwrap();
        let spec = BaseSpec {
            dtype,
            ..BaseSpec::default()
        };
        let base = write_base(&tmp.path().join("base"), &spec);
        let mut rng = StdRng::seed_from_u64(17);
        let (h, i) = (spec.hidden, spec.inter);
        let m = "model.layers.0.mlp.down_proj"; // (h, i)
        let a = random_values(&mut rng, 4 * i, 0.3);
        let b = random_values(&mut rng, h * 4, 0.3);
        let mag: Vec<f64> = random_values(&mut rng, h, 1.0)
            .iter()
            .map(|x| 1.0 + x)
            .collect();
        let adir = tmp.path().join("a");
        write_config(
            &adir,
            &config(json!({"use_dora": true, "target_modules": ["down_proj"]})),
        );
        write_safetensors(
            &adir.join("adapter_model.safetensors"),
            &[
                lora_a(m, 4, i, a.clone()),
                lora_b(m, h, 4, b.clone()),
                t(
                    &format!("{P}{m}.lora_magnitude_vector"),
                    Dtype::F32,
                    &[h],
                    mag.clone(),
                ),
            ],
        );
        let out = tmp.path().join("out");
        run(&tmp.path().join("base"), &[&adir], &out);
        let got = values(&out);
        let w = rounded(dtype, &find(&base, &format!("{m}.weight")).values);
        let x = lora(&w, &a, &b, h, i, 2.0);
        let mut want = x.clone();
        for row in 0..h {
            let norm = x[row * i..(row + 1) * i]
                .iter()
                .map(|v| v * v)
                .sum::<f64>()
                .sqrt();
            for j in 0..i {
                want[row * i + j] = mag[row] / norm * x[row * i + j];
            }
        }
        close("dora", dtype, &got[&format!("{m}.weight")].2, &want);
    }
}

#[test]
fn refusals_name_the_feature() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    write_base(&tmp.path().join("base"), &spec);
    let h = spec.hidden;
    let q = "model.layers.0.self_attn.q_proj";
    let cases: Vec<(Value, Vec<Tensor>, &str)> = vec![
        (
            json!({"use_dora": true}),
            vec![],
            "no lora_magnitude_vector",
        ),
        (json!({"use_kasa": true}), vec![], "KaSA"),
        (json!({"kasa_config": {"x": 1}}), vec![], "KaSA"),
        (json!({"use_qalora": true}), vec![], "QALoRA"),
        (json!({"arrow_config": {"top_k": 2}}), vec![], "Arrow"),
        (
            json!({"init_lora_weights": "olora"}),
            vec![],
            "modified base",
        ),
        (
            json!({"init_lora_weights": "corda"}),
            vec![],
            "modified base",
        ),
        (
            json!({}),
            vec![t(
                &format!("{P}model.layers.0.conv.lora_A.weight"),
                Dtype::F32,
                &[4, h, 3, 3],
                vec![0.0; 4 * h * 9],
            )],
            "convolution",
        ),
        (
            json!({}),
            vec![t(
                &format!("{P}{q}.lora_B.bias"),
                Dtype::F32,
                &[h],
                vec![0.0; h],
            )],
            "does not have",
        ),
        (
            json!({}),
            vec![t(
                &format!("{P}lm_head.modules_to_save.weight"),
                Dtype::F32,
                &[spec.vocab, h],
                vec![0.0; spec.vocab * h],
            )],
            "has no `lm_head.weight`",
        ),
    ];
    for (extra, extra_tensors, message) in cases {
        let adir = tmp.path().join("a");
        let _ = std::fs::remove_dir_all(&adir);
        write_config(&adir, &config(extra));
        let mut tensors = vec![
            lora_a(q, 4, h, vec![0.1; 4 * h]),
            lora_b(q, h, 4, vec![0.1; 4 * h]),
        ];
        tensors.extend(extra_tensors);
        write_safetensors(&adir.join("adapter_model.safetensors"), &tensors);
        let err = match open(&tmp.path().join("base"), &[&adir]) {
            Ok(_) => panic!("{message}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(message), "{message:?} not in {err}");
    }
}
