//! `lorafs inspect --json`: the merge plan as data, from the same view the text report is
//! written from. The schema is documented in docs/CLI.md; a change that renames or retypes
//! a key bumps [`SCHEMA`].

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{resized_files, VocabFiles};
use crate::plan::{AdapterSummary, Features, TensorMerge, TermKind};
use crate::view::View;

/// The version of the schema below.
pub const SCHEMA: u32 = 1;

/// The plan of one merged model (`--adapter`): the view's keys at the top level.
#[derive(Serialize)]
pub struct SinglePlan {
    pub schema: u32,
    pub base: BaseInfo,
    pub kernel: &'static str,
    #[serde(flatten)]
    pub view: ViewPlan,
}

/// The plans of the views of `--view` or `--catalog`, each under its name.
#[derive(Serialize)]
pub struct ViewsPlan {
    pub schema: u32,
    /// `None` (null) when there are no views.
    pub base: Option<BaseInfo>,
    pub kernel: Option<&'static str>,
    pub views: Vec<NamedView>,
}

#[derive(Serialize)]
pub struct NamedView {
    pub name: String,
    #[serde(flatten)]
    pub view: ViewPlan,
}

/// The base every view of one inspect shares.
#[derive(Serialize)]
pub struct BaseInfo {
    pub dir: String,
    pub files: usize,
    pub safetensors_files: usize,
    pub tensors: usize,
    pub parameters: usize,
    /// A bitsandbytes-quantized base (served dequantized); `None` (null) for a plain one.
    pub quantization: Option<QuantInfo>,
}

/// How the base is quantized: each scheme and how many weights use it.
#[derive(Serialize)]
pub struct QuantInfo {
    pub method: &'static str,
    /// `[scheme, weights]` pairs: "nf4", "fp4" (each possibly "(double quantization)"),
    /// "int8".
    pub schemes: Vec<(String, usize)>,
    /// The dtypes the quantized weights are served in.
    pub served_as: Vec<&'static str>,
}

/// One merged model.
#[derive(Serialize)]
pub struct ViewPlan {
    /// The `--dtype` floating tensors are stored in, `None` to keep the base's.
    pub dtype: Option<&'static str>,
    /// `--combine` as applied, `None` when the deltas are summed.
    pub combine: Option<CombineInfo>,
    pub adapters: Vec<AdapterInfo>,
    pub vocab_resize: Option<VocabResizeInfo>,
    /// Files served from an adapter directory in place of the base's (a tokenizer): the
    /// relative name, and the file served.
    pub files_from_adapters: BTreeMap<String, String>,
    pub merge: MergeCounts,
    pub parameters: Parameters,
    /// Every merged tensor, with `--tensors` only (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensors: Option<Vec<TensorInfo>>,
    /// The GGUF files of `--gguf` (empty without it).
    pub gguf: Vec<GgufInfo>,
}

/// How the adapters are combined (`--combine`): PEFT's `add_weighted_adapter` arguments.
#[derive(Serialize)]
pub struct CombineInfo {
    /// PEFT's `combination_type` as applied (`linear` for a single adapter).
    pub method: &'static str,
    pub density: Option<f64>,
    /// `total` or `frequency` for ties and dare_ties, else null.
    pub majority_sign: Option<String>,
    /// The rank of the combined adapter (`r` and `lora_alpha`).
    pub rank: usize,
    /// The scale the combined adapter merges with: 1, or √rank when the first adapter
    /// has use_rslora.
    pub scaling: f64,
    /// DARE's seed, else null.
    pub seed: Option<u64>,
}

/// A GGUF file of the view.
#[derive(Serialize)]
pub struct GgufInfo {
    pub file: String,
    /// F32, F16, BF16 or Q8_0.
    #[serde(rename = "type")]
    pub out_type: &'static str,
    pub architecture: String,
    pub tensors: usize,
    pub bytes: u64,
}

#[derive(Serialize)]
pub struct AdapterInfo {
    pub dir: String,
    /// The weights file read.
    pub file: String,
    pub weight: f64,
    /// Always "LORA": the only type lorafs accepts.
    pub peft_type: &'static str,
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    /// How a module's scale is formed: "weight*alpha/r" or "weight*alpha/sqrt(r)".
    pub scale_rule: &'static str,
    /// Each distinct scale applied (rounded to 6 decimals) and how many modules use it.
    pub scales: Vec<ScaleCount>,
    pub target_modules: String,
    /// PEFT's patterns, in the order of the config (the first match wins).
    pub alpha_pattern: Map<String, Value>,
    pub rank_pattern: Map<String, Value>,
    pub base_model: Option<String>,
    pub tensors_changed: usize,
    /// Values in the adapter file (PEFT's trainable parameters).
    pub parameters: usize,
    pub features: FeaturesInfo,
}

#[derive(Serialize)]
pub struct ScaleCount {
    pub scale: f64,
    pub modules: usize,
}

#[derive(Serialize)]
pub struct FeaturesInfo {
    /// Module counts per feature (0: unused).
    pub dora: usize,
    pub embedding_lora: usize,
    pub conv1d: usize,
    pub lora_bias: usize,
    pub trainable_tokens: Vec<TrainableTokens>,
    pub replacements: Vec<ReplacementInfo>,
    /// Keys applied to the input embedding because lm_head is tied to it.
    pub tied: Vec<String>,
    pub tokenizer_files: Vec<String>,
}

#[derive(Serialize)]
pub struct TrainableTokens {
    pub target: String,
    pub rows: usize,
}

#[derive(Serialize)]
pub struct ReplacementInfo {
    pub key: String,
    pub target: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

#[derive(Serialize)]
pub struct VocabResizeInfo {
    pub base: usize,
    pub merged: usize,
    /// What the resize rewrites, as the view serves it.
    pub rewritten: Vec<String>,
    /// The `vocab_size` config.json serves (null when it has none or there is none).
    pub config_vocab_size: Option<u64>,
}

#[derive(Serialize)]
pub struct MergeCounts {
    pub tensors_merged: usize,
    pub base_tensors: usize,
    /// Base files holding merged tensors, relative to the base directory.
    pub files: Vec<String>,
    /// Bytes of f32 factors held once every merged tensor is read.
    pub factor_bytes: usize,
}

/// The figures PEFT's `print_trainable_parameters` shows.
#[derive(Serialize)]
pub struct Parameters {
    pub trainable: usize,
    pub all: usize,
    pub trainable_percent: f64,
}

#[derive(Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    /// Sum of the terms' ranks.
    pub rank: usize,
    pub token_rows: usize,
    pub replaced_by: Option<ReplacedByInfo>,
    pub terms: Vec<TermInfo>,
}

#[derive(Serialize)]
pub struct ReplacedByInfo {
    /// Index into `adapters`, from 0.
    pub adapter: usize,
    pub key: String,
}

#[derive(Serialize)]
pub struct TermInfo {
    /// Index into `adapters`, from 0.
    pub adapter: usize,
    pub module: String,
    pub rank: usize,
    pub scale: f64,
    pub transposed: bool,
    /// "lora", "lora_bias" or "dora".
    pub kind: &'static str,
}

/// The plan of one merged model as JSON (pretty, newline-terminated).
pub fn report(view: &View, tensors: bool) -> String {
    to_json(&SinglePlan {
        schema: SCHEMA,
        base: base_info(view),
        kernel: view.engine.kernel.name(),
        view: view_plan(view, tensors),
    })
}

/// The plans of several views of one base as JSON.
pub fn report_views(views: &[(String, &View)], tensors: bool) -> String {
    let first = views.first().map(|(_, v)| *v);
    to_json(&ViewsPlan {
        schema: SCHEMA,
        base: first.map(base_info),
        kernel: first.map(|v| v.engine.kernel.name()),
        views: (views.iter())
            .map(|(name, view)| NamedView {
                name: name.clone(),
                view: view_plan(view, tensors),
            })
            .collect(),
    })
}

fn to_json(value: &impl Serialize) -> String {
    // Strings, integers and finite floats (scales and weights are checked finite when the
    // adapters are read): serializing cannot fail.
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// A path made absolute (against the working directory, links kept as given): a reader of
/// the JSON may run elsewhere.
fn path_text(path: &Path) -> String {
    std::path::absolute(path)
        .as_deref()
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

fn base_info(view: &View) -> BaseInfo {
    let base = &view.engine.base;
    BaseInfo {
        dir: path_text(view.base_dir()),
        files: base.files.len(),
        safetensors_files: super::safetensors_files(view),
        tensors: base.tensors.len(),
        parameters: base.num_params(),
        quantization: super::quant_info(view),
    }
}

fn view_plan(view: &View, tensors: bool) -> ViewPlan {
    let plan = &view.plan;
    let trainable: usize = plan.adapters.iter().map(|a| a.num_params).sum();
    let all = view.engine.base.num_params() + trainable;
    ViewPlan {
        dtype: plan.dtype.map(|d| d.name()),
        combine: plan.combination.as_deref().map(|c| CombineInfo {
            method: c.combine.method.name(),
            density: c.combine.density,
            majority_sign: (c.combine.method.elects_sign())
                .then(|| c.combine.majority_sign.to_string()),
            rank: c.new_rank,
            scaling: c.scaling,
            seed: c.combine.method.is_random().then_some(c.combine.seed),
        }),
        adapters: plan.adapters.iter().map(adapter_info).collect(),
        vocab_resize: plan.vocab.map(|resize| {
            let VocabFiles {
                rewritten,
                config_vocab_size,
                ..
            } = resized_files(view, resize.merged);
            VocabResizeInfo {
                base: resize.base,
                merged: resize.merged,
                rewritten,
                config_vocab_size,
            }
        }),
        files_from_adapters: (plan.extra_files.iter())
            .map(|(rel, path)| (rel.to_string_lossy().into_owned(), path_text(path)))
            .collect(),
        merge: MergeCounts {
            tensors_merged: plan.merges.len(),
            base_tensors: view.engine.base.tensors.len(),
            files: super::merged_files(view),
            factor_bytes: plan.factor_bytes(),
        },
        parameters: Parameters {
            trainable,
            all,
            trainable_percent: 100.0 * trainable as f64 / all.max(1) as f64,
        },
        tensors: tensors.then(|| plan.merges.iter().map(tensor_info).collect()),
        gguf: (view.gguf.iter())
            .map(|g| GgufInfo {
                file: g.rel.to_string_lossy().into_owned(),
                out_type: g.out.name(),
                architecture: g.architecture.clone(),
                tensors: g.tensors,
                bytes: g.bytes,
            })
            .collect(),
    }
}

fn adapter_info(a: &AdapterSummary) -> AdapterInfo {
    AdapterInfo {
        dir: path_text(&a.dir),
        file: path_text(&a.file),
        weight: a.weight,
        peft_type: "LORA",
        rank: a.r,
        alpha: a.lora_alpha,
        use_rslora: a.use_rslora,
        scale_rule: if a.use_rslora {
            "weight*alpha/sqrt(r)"
        } else {
            "weight*alpha/r"
        },
        scales: (a.scales.iter())
            .map(|(scale, &modules)| ScaleCount {
                // The plan keeps scales as text rounded to 6 decimals, which parses back.
                scale: scale.parse().unwrap_or(f64::NAN),
                modules,
            })
            .collect(),
        target_modules: a.target_modules.clone(),
        alpha_pattern: (a.alpha_pattern.iter())
            .map(|(k, v)| (k.clone(), Value::from(*v)))
            .collect(),
        rank_pattern: (a.rank_pattern.iter())
            .map(|(k, v)| (k.clone(), Value::from(*v)))
            .collect(),
        base_model: a.base_model.clone(),
        tensors_changed: a.tensors_changed,
        parameters: a.num_params,
        features: features_info(&a.features),
    }
}

fn features_info(f: &Features) -> FeaturesInfo {
    FeaturesInfo {
        dora: f.dora,
        embedding_lora: f.embedding_lora,
        conv1d: f.conv1d,
        lora_bias: f.lora_bias,
        trainable_tokens: (f.trainable_tokens.iter())
            .map(|(target, rows)| TrainableTokens {
                target: target.clone(),
                rows: *rows,
            })
            .collect(),
        replacements: (f.replacements.iter())
            .map(|r| ReplacementInfo {
                key: r.key.clone(),
                target: r.target.clone(),
                dtype: r.dtype.clone(),
                shape: r.shape.clone(),
            })
            .collect(),
        tied: f.tied.clone(),
        tokenizer_files: f.tokenizer_files.clone(),
    }
}

fn tensor_info(m: &TensorMerge) -> TensorInfo {
    TensorInfo {
        name: m.name.clone(),
        dtype: m.dtype.name(),
        shape: m.shape.clone(),
        rank: m.rank,
        token_rows: m.token_rows,
        replaced_by: m.replaced.as_ref().map(|r| ReplacedByInfo {
            adapter: r.adapter,
            key: r.key.clone(),
        }),
        terms: (m.terms.iter())
            .map(|t| TermInfo {
                adapter: t.adapter,
                module: t.module.clone(),
                rank: t.rank,
                scale: t.scale,
                transposed: t.transposed,
                kind: match t.kind {
                    TermKind::Lora => "lora",
                    TermKind::LoraBias => "lora_bias",
                    TermKind::Dora => "dora",
                },
            })
            .collect(),
    }
}
