//! The GGUF view through the library: any byte range of `model-TYPE.gguf` is the same
//! bytes as the whole file read at once (the header, rows re-encoded from a BF16 base,
//! Llama's permuted Q/K rows, merged tensors), for each type. Against llama.cpp's converter:
//! tests/e2e/test_gguf.py.

use std::sync::Arc;

use lorafs::gguf::OutType;
use lorafs::{Engine, EngineOptions, View};
use rand::rngs::StdRng;
use rand::SeedableRng;
use safetensors::Dtype;
use serde_json::json;

use crate::common::*;

/// A protobuf varint.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field.
fn field(number: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(number << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// A SentencePiece `tokenizer.model` (a `ModelProto`) of these (piece, score, type)s, its
/// trainer spec a BPE model without byte fallback.
fn sentencepiece_model(pieces: &[(&str, f32, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (text, score, kind) in pieces {
        let mut piece = Vec::new();
        field(1, text.as_bytes(), &mut piece);
        varint(2 << 3 | 5, &mut piece);
        piece.extend_from_slice(&score.to_le_bytes());
        varint(3 << 3, &mut piece);
        varint(*kind, &mut piece);
        field(1, &piece, &mut out);
    }
    // TrainerSpec: model_type (field 3) = 2, BPE.
    field(2, &[0x18, 2], &mut out);
    out
}

/// A BF16 Llama of 4 heads of 16 (2 KV heads) that the GGUF view converts, with a
/// SentencePiece tokenizer, and a rank-4 adapter on every linear layer.
fn llama_with_adapter(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (base, adapter) = (dir.join("base"), dir.join("a"));
    let spec = BaseSpec {
        dtype: Dtype::BF16,
        hidden: 64,
        kv: 32,
        inter: 96,
        ..BaseSpec::default()
    };
    write_base(&base, &spec);
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": spec.hidden, "intermediate_size": spec.inter,
        "num_hidden_layers": spec.layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": spec.vocab, "rms_norm_eps": 1e-5, "dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(base.join("config.json"), config.to_string()).unwrap();
    std::fs::remove_file(base.join("tokenizer.json")).unwrap();
    let pieces = [
        ("<unk>", 0.0, 2),
        ("<s>", 0.0, 3),
        ("</s>", 0.0, 3),
        ("\u{2581}a", -1.0, 1),
        ("\u{2581}b", -2.0, 1),
    ];
    std::fs::write(base.join("tokenizer.model"), sentencepiece_model(&pieces)).unwrap();
    write_adapter(&adapter, &AdapterSpec::new(&spec, 4, ""));
    (base, adapter)
}

#[test]
fn gguf_ranges_equal_the_whole_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = llama_with_adapter(tmp.path());
    // Through the page cache, and with O_DIRECT base reads staged ahead of each read (as
    // for a sequential reader of a model over half of RAM).
    for direct in [false, true] {
        let mut engine = Engine::open(&base, EngineOptions::default()).unwrap();
        engine.direct_base_reads = direct;
        let adapters = [(adapter.clone(), 1.0)];
        let mut view = View::open(Arc::new(engine), &adapters, None, None).unwrap();
        view.add_gguf(&[OutType::F16, OutType::Q8_0]).unwrap();
        view.realize_all().unwrap();
        check_ranges(&view, direct);
    }
}

/// Random ranges of each GGUF file of `view` against the whole file read at once, each
/// read after a read-ahead from its start if `ahead`.
fn check_ranges(view: &View, ahead: bool) {
    let ggufs: Vec<usize> = (0..view.files.len())
        .filter(|&i| view.files[i].rel.extension().is_some_and(|e| e == "gguf"))
        .collect();
    assert_eq!(ggufs.len(), 2, "model-F16.gguf and model-Q8_0.gguf");
    let mut rng = StdRng::seed_from_u64(5);
    for index in ggufs {
        let mut whole = vec![0u8; view.files[index].size as usize];
        assert_eq!(view.read_at(index, 0, &mut whole).unwrap(), whole.len());
        assert_eq!(&whole[..4], b"GGUF", "{}", view.files[index].rel.display());
        check_random_ranges(view, index, &whole, &mut rng, (300, 100_000), ahead);
    }
}
