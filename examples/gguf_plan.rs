//! Prints the GGUF architecture plan of a model directory as JSON (metadata keys with their
//! GGUF value types, tensors with GGML-order shapes and types), to compare it with the file
//! llama.cpp's `convert_hf_to_gguf.py` writes.
//! Usage: cargo run --release --example gguf_plan -- DIR F16|BF16|F32|Q8_0 MODEL_NAME

use lorafs::dtype::DType;
use lorafs::gguf::arch::{plan, SourceTensor, TensorData};
use lorafs::gguf::{Array, DirFiles, OutType, Value};
use serde_json::json;

fn value(v: &Value) -> (&'static str, serde_json::Value) {
    match v {
        Value::U32(x) => ("UINT32", json!(x)),
        Value::I32(x) => ("INT32", json!(x)),
        Value::F32(x) => ("FLOAT32", json!(x)),
        Value::Bool(x) => ("BOOL", json!(x)),
        Value::Text(x) => ("STRING", json!(x)),
        Value::Array(Array::Text(x)) => ("ARRAY", json!(x)),
        other => ("OTHER", json!(format!("{other:?}"))),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let out = OutType::parse(&args[2]).ok_or("bad output type")?;
    let mut tensors = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let part = entry?.file_name().to_string_lossy().into_owned();
        if !(part.starts_with("model") && part.ends_with(".safetensors")) {
            continue;
        }
        let layout = lorafs::layout::Layout::open(&dir.join(&part))?;
        for t in layout.tensors {
            tensors.push(SourceTensor {
                name: t.name,
                part: part.clone(),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
                dtype: DType::from_safetensors(t.dtype).ok_or("dtype")?,
            });
        }
    }
    let plan = plan(&DirFiles(dir), &tensors, out, &args[3])?;
    let kvs: Vec<_> = plan
        .metadata
        .entries()
        .iter()
        .map(|(k, v)| {
            let (t, v) = value(v);
            json!([k, t, v])
        })
        .collect();
    let ts: Vec<_> = plan
        .tensors
        .iter()
        .map(|t| {
            let data = match &t.data {
                TensorData::Model { source, permute } => json!([source, permute.map(|p| p.heads)]),
                TensorData::Computed(v) => json!(v),
            };
            json!([t.name, t.shape, format!("{:?}", t.ty).to_uppercase(), data])
        })
        .collect();
    println!(
        "{}",
        json!({"kvs": kvs, "tensors": ts, "vocab": format!("{:?}", plan.vocab)})
    );
    Ok(())
}
