//! A 4-bit base's state checked before use: sizes and fields refused by name.

use std::path::Path;

use serde_json::json;

use crate::model::BaseModel;

/// Write a safetensors file of `(name, dtype, shape, bytes)` tensors.
fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// A base with one 4-bit weight of shape [4, 32] (64 values, one block of 64), its
/// absmax having `absmax` values and its state `state`.
fn base(dir: &Path, absmax: usize, state: serde_json::Value, method: &str) -> String {
    let config = json!({"model_type": "llama", "dtype": "bfloat16",
        "quantization_config": {"quant_method": method, "load_in_4bit": true}});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let w = "m.weight";
    let blob = state.to_string().into_bytes();
    write_safetensors(
        &dir.join("model.safetensors"),
        &[
            (w, "U8", vec![32, 1], vec![0x7F; 32]),
            ("m.weight.absmax", "F32", vec![absmax], vec![0; 4 * absmax]),
            ("m.weight.quant_map", "F32", vec![16], vec![0; 64]),
            (
                "m.weight.quant_state.bitsandbytes__nf4",
                "U8",
                vec![blob.len()],
                blob,
            ),
        ],
    );
    match BaseModel::open(dir) {
        Ok(base) => format!("ok: {:?}", base.quant.unwrap().describe()),
        Err(e) => e.to_string(),
    }
}

fn state(shape: serde_json::Value) -> serde_json::Value {
    json!({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": shape})
}

#[test]
fn a_well_formed_state_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let got = base(dir.path(), 1, state(json!([4, 16])), "bitsandbytes");
    assert_eq!(got, r#"ok: [("nf4", 1)]"#);
}

#[test]
fn sizes_that_disagree_with_the_state_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let got = base(dir.path(), 2, state(json!([4, 16])), "bitsandbytes");
    assert!(
        got.contains("m.weight.absmax") && got.contains("needs 1 values"),
        "{got}"
    );
    // 64 values are 32 bytes of codes; [4, 32] would need 64.
    let got = base(dir.path(), 1, state(json!([4, 32])), "bitsandbytes");
    assert!(
        got.contains("`m.weight`") && got.contains("64 uint8 values"),
        "{got}"
    );
    // A shape whose product overflows.
    let huge = json!([u64::MAX / 2, 4]);
    let got = base(dir.path(), 1, state(huge), "bitsandbytes");
    assert!(got.contains("too large"), "{got}");
}

#[test]
fn bad_fields_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = state(json!([4, 16]));
    s["blocksize"] = json!(48);
    assert!(base(dir.path(), 1, s, "bitsandbytes").contains("blocksize is not one of"));
    let mut s = state(json!([4, 16]));
    s["quant_type"] = json!("fp4");
    assert!(base(dir.path(), 1, s, "bitsandbytes").contains("does not match"));
    let mut s = state(json!([4, 16]));
    s["nested_blocksize"] = json!(256);
    s["nested_dtype"] = json!("float32");
    s["nested_offset"] = json!(0.5);
    let got = base(dir.path(), 1, s, "bitsandbytes");
    assert!(
        got.contains("m.weight.absmax") && got.contains("U8"),
        "{got}"
    );
}

#[test]
fn other_quantization_methods_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for method in ["gptq", "awq"] {
        let got = base(dir.path(), 1, state(json!([4, 16])), method);
        assert!(
            got.contains(method) && got.contains("use the 16-bit base"),
            "{got}"
        );
    }
}
