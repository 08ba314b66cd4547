//! From a model directory's files and its tensor list, everything of the GGUF file that
//! llama.cpp's `convert_hf_to_gguf.py` would write except the `tokenizer.*` keys and the
//! tensor bytes: the architecture, the metadata keys in the converter's order, and the
//! tensors in its order with their GGUF names, shapes, element types and Q/K permutation.

pub(crate) mod hparams;
mod keys;
mod tensors;
#[cfg(test)]
mod tests;

use serde_json::Value as Json;

use super::{card, GgmlType, Metadata, ModelFiles, OutType, Value};
use crate::dtype::DType;

/// A tensor of the Hugging Face model, with the safetensors file (`part`) that holds it: the
/// converter orders tensors by part file name, then by tensor name.
#[derive(Debug, Clone)]
pub struct SourceTensor {
    pub name: String,
    pub part: String,
    pub shape: Vec<u64>,
    pub dtype: DType,
}

/// Where a GGUF tensor's values come from.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// The Hugging Face tensor `source`, its rows permuted if `permute` says so.
    Model {
        source: String,
        permute: Option<Permute>,
    },
    /// Values the converter computes (llama3's `rope_freqs`).
    Computed(Vec<f32>),
}

/// `LlamaModel.permute`: the rows, seen as `heads` × 2 × (rows / heads / 2), have their two
/// middle axes swapped (`heads` is already the KV head count for `k_proj`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permute {
    pub heads: u64,
}

impl Permute {
    /// The source row that lands in row `row` of the permuted tensor of `rows` rows.
    pub fn source_row(self, row: u64, rows: u64) -> u64 {
        let half = rows / self.heads / 2;
        let (head, rest) = (row / (2 * half), row % (2 * half));
        let (i, j) = (rest / 2, rest % 2);
        head * 2 * half + j * half + i
    }
}

/// One tensor of the GGUF file. `shape` is in Hugging Face (row-major) order; the writer
/// reverses it into GGML's.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<u64>,
    pub ty: GgmlType,
    pub data: TensorData,
}

/// Which converter class converts the model: it decides the GGUF architecture, the tensor
/// names, the permutation and the vocabulary procedure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    Qwen3,
}

pub use super::vocab::VocabFamily;

/// The GGUF file without its tokenizer keys and tensor bytes.
#[derive(Debug, Clone)]
pub struct ArchPlan {
    /// The keys from `general.architecture` to `general.quantization_version`; the tokenizer
    /// keys follow them in the file.
    pub metadata: Metadata,
    pub tensors: Vec<PlannedTensor>,
    pub vocab: VocabFamily,
}

impl Family {
    fn gguf_arch(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }
}

/// Plans the GGUF file of the model in `files` with `tensors`, for output type `out`.
/// `model_name` becomes `general.name` (the converter derives it from the directory name).
pub fn plan(
    files: &dyn ModelFiles,
    tensors: &[SourceTensor],
    out: OutType,
    model_name: &str,
) -> crate::Result<ArchPlan> {
    let refuse = |what: String| refusal(files, what);
    let config = files
        .read("config.json")?
        .ok_or_else(|| refuse("no config.json".into()))?;
    let hp = hparams::load(&config).map_err(&refuse)?;
    let family = hparams::SUPPORTED
        .iter()
        .find(|(name, _)| *name == hp.arch)
        .map(|(_, f)| *f)
        .ok_or_else(|| refuse(format!("architecture {}", hp.arch)))?;
    if let Some(why) = refuse_variants(files, &hp, family, model_name)? {
        return Err(refuse(why));
    }
    let planned = plan_tensors(files, &hp, family, tensors, out)?;
    let total: u64 = planned
        .iter()
        .map(|t| t.shape.iter().product::<u64>())
        .sum();
    let sampling = sampling(files)?;
    let card = model_card(files, total)?;
    let mut metadata = Metadata::new();
    let arch = family.gguf_arch();
    keys::general(&mut metadata, arch, sampling, model_name, total, &card).map_err(|e| {
        crate::Error::NoGguf {
            path: files.root().join("README.md"),
            what: format!("{e}: fix the card"),
        }
    })?;
    keys::parameters(&mut metadata, &hp, family, arch, out)
        .map_err(|what| config_error(files, what))?;
    let vocab = match family {
        Family::Llama => VocabFamily::Llama,
        Family::Qwen2 | Family::Qwen3 => VocabFamily::Qwen,
    };
    Ok(ArchPlan {
        metadata,
        tensors: planned,
        vocab,
    })
}

/// The refusal of a model the GGUF view does not convert, with what to do instead.
fn refusal(files: &dyn ModelFiles, what: String) -> crate::Error {
    crate::Error::NoGguf {
        path: files.root().to_path_buf(),
        what: format!(
            "{what}: lorafs's GGUF view supports {}; where llama.cpp's convert_hf_to_gguf.py \
             supports the model, run it on the mounted (or materialized) directory instead",
            supported_architectures().join(", ")
        ),
    }
}

/// An error in `config.json`.
fn config_error(files: &dyn ModelFiles, what: String) -> crate::Error {
    crate::Error::config(files.root().join("config.json"), what)
}

/// The GGUF tensors of the model, in the converter's order, with its names and types (and
/// Llama 3's RoPE frequency factors where the config asks for them).
fn plan_tensors(
    files: &dyn ModelFiles,
    hp: &hparams::Hparams,
    family: Family,
    tensors: &[SourceTensor],
    out: OutType,
) -> crate::Result<Vec<PlannedTensor>> {
    let bad = |what: String| config_error(files, what);
    let count = |k: &str| {
        hp.get(k)
            .and_then(Json::as_u64)
            .ok_or_else(|| bad(format!("`{k}` is missing or not an integer")))
    };
    let params = tensors::TensorParams {
        family,
        block_count: count("num_hidden_layers")?,
        n_head: count("num_attention_heads")?,
        n_head_kv: count("num_key_value_heads")?,
    };
    let rope_type = hp
        .rope()
        .get("rope_type")
        .and_then(Json::as_str)
        .unwrap_or("");
    let rope_factors = if family == Family::Llama && rope_type.eq_ignore_ascii_case("llama3") {
        let dim = keys::rope_dim(hp).map_err(bad)?;
        Some(tensors::llama3_rope_factors(hp.rope(), dim as u64))
    } else {
        None
    };
    tensors::plan_tensors(&params, tensors, rope_factors, out).map_err(|e| refusal(files, e))
}

/// The sampling keys from `generation_config.json`, if there is one the converter parses
/// (it ignores one it cannot); a value its writer fails on is refused.
fn sampling(files: &dyn ModelFiles) -> crate::Result<Vec<(String, Value)>> {
    let generation = match files.read("generation_config.json")? {
        Some(bytes) => match serde_json::from_slice::<Json>(&bytes) {
            Ok(Json::Object(m)) => m,
            _ => return Ok(Vec::new()),
        },
        None => return Ok(Vec::new()),
    };
    keys::sampling(&generation).map_err(|e| crate::Error::NoGguf {
        path: files.root().join("generation_config.json"),
        what: format!("{e}; llama.cpp's convert_hf_to_gguf.py fails on it too: fix the file"),
    })
}

/// The model card's keys, from the YAML front matter of `README.md` if there is one.
fn model_card(files: &dyn ModelFiles, total_params: u64) -> crate::Result<card::Card> {
    let Some(readme) = files.read_capped("README.md", card::MAX_README)? else {
        return Ok(card::Card::default());
    };
    card::load(&readme, total_params).map_err(|e| crate::Error::NoGguf {
        path: files.root().join("README.md"),
        what: format!(
            "{e}; llama.cpp's convert_hf_to_gguf.py fails on this model card too (it \
             reads its YAML front matter): fix the card"
        ),
    })
}

/// The reason to refuse one of the variants that share a supported architecture name but not its conversion:
/// mixtures of experts, pre-quantized weights, EAGLE-3 drafts, sentence-transformers pooling,
/// and Qwen3 rerankers.
fn refuse_variants(
    files: &dyn ModelFiles,
    hp: &hparams::Hparams,
    family: Family,
    model_name: &str,
) -> crate::Result<Option<String>> {
    let arch = &hp.arch;
    let present = |keys: &[&str]| {
        keys.iter()
            .find(|k| hp.get(k).is_some())
            .map(|k| k.to_string())
    };
    if let Some(k) = present(&[
        "num_local_experts",
        "num_experts",
        "n_routed_experts",
        "num_experts_per_tok",
        "num_experts_per_token",
        "top_k_experts",
        "n_group",
        "topk_group",
    ]) {
        return Ok(Some(format!("{arch} with experts (`{k}`)")));
    }
    if let Some(k) = present(&[
        "quantization_config",
        "draft_vocab_size",
        "transformer_layer_config",
        "classifier_pooling",
        "mrope_section",
    ]) {
        return Ok(Some(format!("{arch} with `{k}`")));
    }
    if hp.rope().contains_key("mrope_section") {
        return Ok(Some(format!("{arch} with `mrope_section`")));
    }
    if files.read("hf_quant_config.json")?.is_some() {
        return Ok(Some(format!(
            "{arch} with hf_quant_config.json (pre-quantized weights)"
        )));
    }
    if family != Family::Llama && files.read("modules.json")?.is_some() {
        return Ok(Some(format!(
            "{arch} with a sentence-transformers modules.json (pooling)"
        )));
    }
    let readme = (files.read_capped("README.md", card::MAX_README)?).unwrap_or_default();
    let readme = String::from_utf8_lossy(&readme);
    if family == Family::Qwen3 {
        let hints = [
            model_name,
            hp.get("_name_or_path").and_then(Json::as_str).unwrap_or(""),
        ];
        let lower = readme.to_lowercase();
        if lower.contains("# qwen3-reranker")
            || lower.contains("# qwen3-vl-reranker")
            || hints.iter().any(|h| {
                h.to_lowercase().contains("qwen3-reranker")
                    || h.to_lowercase().contains("qwen3-vl-reranker")
            })
        {
            return Ok(Some("a Qwen3 reranker".into()));
        }
    }
    Ok(None)
}

/// The architectures the GGUF view supports, for messages and docs.
pub fn supported_architectures() -> Vec<&'static str> {
    hparams::SUPPORTED.iter().map(|(name, _)| *name).collect()
}
