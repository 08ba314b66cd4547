//! `lorafs inspect`: the merge plan in words, before anything runs; [`json`] gives it as
//! data.

pub mod json;

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::plan::{AdapterSummary, Features, TensorMerge, TermKind};
use crate::view::View;

/// The human-readable plan of one merged model. With `tensors`, one line per merged tensor.
pub fn report(view: &View, tensors: bool) -> String {
    let mut s = String::new();
    write_base(&mut s, view);
    write_view(&mut s, view, tensors);
    s
}

/// The plans of several views of one base, each under its name.
pub fn report_views(views: &[(String, &View)], tensors: bool) -> String {
    let mut s = String::new();
    let Some((_, first)) = views.first() else {
        return "no views\n".into();
    };
    write_base(&mut s, first);
    for (name, view) in views {
        let _ = writeln!(s, "\nview {name}");
        write_view(&mut s, view, tensors);
    }
    s
}

/// The base and the kernel: what every view of a mount shares.
fn write_base(s: &mut String, view: &View) {
    let _ = writeln!(
        s,
        "base      {}  ({} files, {} safetensors, {} tensors)",
        view.base_dir().display(),
        view.engine.base.files.len(),
        safetensors_files(view),
        view.engine.base.tensors.len()
    );
    if let Some(q) = quant_info(view) {
        let schemes: Vec<String> = (q.schemes.iter())
            .map(|(scheme, n)| format!("{scheme} × {n}"))
            .collect();
        let _ = writeln!(
            s,
            "quantized {}: {}; served dequantized as {}",
            q.method,
            schemes.join(", "),
            q.served_as.join(", ")
        );
    }
    let _ = writeln!(s, "kernel    {}", view.engine.kernel.name());
}

/// The base's quantization (bitsandbytes), for the text and the JSON.
fn quant_info(view: &View) -> Option<json::QuantInfo> {
    let quant = view.engine.base.quant.as_ref()?;
    let mut served_as: Vec<&'static str> = (view.plan.merges.iter())
        .filter(|m| m.w.quant.is_some())
        .map(|m| m.dtype.name())
        .collect();
    served_as.sort_unstable();
    served_as.dedup();
    Some(json::QuantInfo {
        method: crate::quant::BITSANDBYTES,
        schemes: quant.describe(),
        served_as,
    })
}

/// How many base files are safetensors files.
fn safetensors_files(view: &View) -> usize {
    (view.engine.base.files.iter())
        .filter(|f| f.rel.extension().is_some_and(|e| e == "safetensors"))
        .count()
}

/// The base files holding merged tensors, relative to the base directory, in file order.
fn merged_files(view: &View) -> Vec<String> {
    let layouts: BTreeSet<usize> = view.plan.merges.iter().map(|m| m.tensor.layout).collect();
    let base = &view.engine.base;
    (base.files.iter())
        .filter(|f| f.layout.is_some_and(|l| layouts.contains(&l)))
        .map(|f| f.rel.to_string_lossy().into_owned())
        .collect()
}

/// One view's plan: its adapters, what it changes, its parameter counts.
fn write_view(s: &mut String, view: &View, tensors: bool) {
    let plan = &view.plan;
    if let Some(dtype) = plan.dtype {
        let _ = writeln!(
            s,
            "dtype     {} (floating tensors stored in it)",
            dtype.name()
        );
    }
    if let Some(c) = &plan.combination {
        let _ = writeln!(
            s,
            "combine   {} (PEFT add_weighted_adapter: rank {}, merged with scale {})",
            c.combine, c.new_rank, c.scaling
        );
    }
    for (i, a) in plan.adapters.iter().enumerate() {
        write_adapter(s, i, a);
    }
    if let Some(resize) = plan.vocab {
        let files = resized_files(view, resize.merged);
        let _ = writeln!(
            s,
            "resized vocab {} -> {} ({})",
            resize.base,
            resize.merged,
            files.text()
        );
    }
    write_merges(s, view, tensors);
    for g in &view.gguf {
        let _ = writeln!(
            s,
            "gguf      {}  ({}, {} tensors, {} bytes)",
            g.rel.display(),
            g.architecture,
            g.tensors,
            g.bytes
        );
    }
    // The figure PEFT's print_trainable_parameters shows (and the seed prints).
    let trainable: usize = plan.adapters.iter().map(|a| a.num_params).sum();
    let all = view.engine.base.num_params() + trainable;
    let _ = writeln!(
        s,
        "trainable params: {trainable} || all params: {all} || trainable%: {:.4}",
        100.0 * trainable as f64 / all.max(1) as f64
    );
}

/// Adapter `i`: its scales, patterns and the features it uses.
fn write_adapter(s: &mut String, i: usize, a: &AdapterSummary) {
    let _ = writeln!(
        s,
        "adapter {} {}  (weight {})",
        i + 1,
        a.dir.display(),
        a.weight
    );
    let rule = if a.use_rslora {
        "alpha/sqrt(r)"
    } else {
        "alpha/r"
    };
    let _ = writeln!(
        s,
        "  r {}  alpha {}  rsLoRA {}  scale = weight·{rule}",
        a.r,
        a.lora_alpha,
        yes(a.use_rslora)
    );
    let scales: Vec<String> = a
        .scales
        .iter()
        .map(|(s, n)| format!("{s} ({n} modules)"))
        .collect();
    let _ = writeln!(s, "  scales applied     {}", scales.join(", "));
    let _ = writeln!(s, "  target modules     {}", a.target_modules);
    for (label, pairs) in [
        ("alpha_pattern", pairs(&a.alpha_pattern)),
        ("rank_pattern", pairs(&a.rank_pattern)),
    ] {
        if !pairs.is_empty() {
            let _ = writeln!(s, "  {label:<18} {}", pairs.join(", "));
        }
    }
    if let Some(b) = &a.base_model {
        let _ = writeln!(s, "  trained on         {b}");
    }
    let _ = writeln!(s, "  base tensors changed {}", a.tensors_changed);
    write_features(s, &a.features, a.use_rslora);
}

/// The features an adapter uses, and their details.
fn write_features(s: &mut String, f: &Features, use_rslora: bool) {
    let mut used = Vec::new();
    if f.dora > 0 {
        used.push(format!("DoRA ({} modules)", f.dora));
    }
    if use_rslora {
        used.push("rsLoRA".to_string());
    }
    if f.embedding_lora > 0 {
        used.push(format!("embedding LoRA ({} modules)", f.embedding_lora));
    }
    if f.conv1d > 0 {
        used.push(format!("GPT-2 Conv1D ({} modules)", f.conv1d));
    }
    if f.lora_bias > 0 {
        used.push(format!("lora_bias ({} biases)", f.lora_bias));
    }
    if !f.trainable_tokens.is_empty() {
        used.push("trainable tokens".to_string());
    }
    if !f.replacements.is_empty() {
        used.push(format!("replaced tensors ({})", f.replacements.len()));
    }
    if !f.tied.is_empty() {
        used.push("tied embeddings".to_string());
    }
    let _ = writeln!(
        s,
        "  features           {}",
        if used.is_empty() {
            "plain LoRA".to_string()
        } else {
            used.join(", ")
        }
    );
    for (target, n) in &f.trainable_tokens {
        let _ = writeln!(s, "  trainable tokens   {n} rows of {target}");
    }
    for r in &f.replacements {
        let _ = writeln!(
            s,
            "  replaces           {} <- {} {} {:?}",
            r.target, r.key, r.dtype, r.shape
        );
    }
    for key in &f.tied {
        let _ = writeln!(
            s,
            "  tied               {key} applies to the input embedding (lm_head is tied to it)"
        );
    }
    if !f.tokenizer_files.is_empty() {
        let _ = writeln!(
            s,
            "  tokenizer          {} (from the adapter)",
            f.tokenizer_files.join(", ")
        );
    }
}

/// The merged tensors: a count, and with `tensors` one line each.
fn write_merges(s: &mut String, view: &View, tensors: bool) {
    let plan = &view.plan;
    let _ = writeln!(
        s,
        "merge     {} of {} tensors in {} files; factors {:.1} MiB once read",
        plan.merges.len(),
        view.engine.base.tensors.len(),
        merged_files(view).len(),
        plan.factor_bytes() as f64 / (1 << 20) as f64
    );
    if tensors {
        for m in &plan.merges {
            let _ = writeln!(s, "  {}", tensor_line(m));
        }
    }
}

/// One merged tensor: name, output dtype and shape, and what it is made from.
fn tensor_line(m: &TensorMerge) -> String {
    let mut sources = Vec::new();
    if let Some(r) = &m.replaced {
        sources.push(format!("replaced by #{} {}", r.adapter + 1, r.key));
    }
    if m.token_rows > 0 {
        sources.push(format!("{} token rows", m.token_rows));
    }
    sources.extend(m.terms.iter().map(|t| {
        let kind = match t.kind {
            TermKind::Lora => "",
            TermKind::LoraBias => " lora_bias",
            TermKind::Dora => " DoRA",
        };
        let transposed = if t.transposed { " T" } else { "" };
        format!(
            "#{} r={} s={}{transposed}{kind}",
            t.adapter + 1,
            t.rank,
            t.scale
        )
    }));
    format!(
        "{} {} {:?} <- {}",
        m.name,
        m.dtype.name(),
        m.shape,
        sources.join(" + ")
    )
}

/// What a resized vocabulary rewrites, and what config.json says of the size.
pub(crate) struct VocabFiles {
    pub rewritten: Vec<String>,
    /// Whether the view serves a config.json.
    pub config_present: bool,
    /// The `vocab_size` its config.json serves (or its `text_config`'s).
    pub config_vocab_size: Option<u64>,
}

impl VocabFiles {
    /// `rewritten: ...`, and what config.json keeps when it is not rewritten.
    fn text(&self) -> String {
        let config_rewritten = self.rewritten.iter().any(|f| f.starts_with("config.json"));
        let kept = match (
            self.config_present && !config_rewritten,
            self.config_vocab_size,
        ) {
            (false, _) => String::new(),
            (true, Some(size)) => format!("; config.json keeps vocab_size {size}"),
            (true, None) => "; config.json has no vocab_size".into(),
        };
        format!("rewritten: {}{kept}", self.rewritten.join(", "))
    }
}

/// What a resized vocabulary rewrites, read back from what the view serves (so the report
/// never claims a change that is not served): the regenerated safetensors headers, the shard
/// index when its bytes change, and `config.json` when its served `vocab_size` is the new one.
fn resized_files(view: &View, new: usize) -> VocabFiles {
    let served = |name: &str| {
        let (i, vf) = view
            .files
            .iter()
            .enumerate()
            .find(|(_, f)| f.rel == std::path::Path::new(name))?;
        let mut bytes = vec![0u8; usize::try_from(vf.size).ok()?];
        let n = view.read_at(i, 0, &mut bytes).ok()?;
        bytes.truncate(n);
        Some((bytes, vf.source_path()))
    };
    let mut files = VocabFiles {
        rewritten: vec!["safetensors headers".to_string()],
        config_present: false,
        config_vocab_size: None,
    };
    if let Some((bytes, base)) = served("model.safetensors.index.json") {
        if std::fs::read(base).ok().as_ref() != Some(&bytes) {
            files.rewritten.push("model.safetensors.index.json".into());
        }
    }
    if let Some((bytes, _)) = served("config.json") {
        let config: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let vocab = |v: &serde_json::Value| v.get("vocab_size").and_then(|s| s.as_u64());
        let sizes = [vocab(&config), config.get("text_config").and_then(vocab)];
        files.config_present = true;
        if sizes.contains(&Some(new as u64)) {
            files.rewritten.push("config.json vocab_size".into());
            files.config_vocab_size = Some(new as u64);
        } else {
            files.config_vocab_size = sizes.iter().flatten().next().copied();
        }
    }
    files
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// `key=value` for each pattern, in order.
fn pairs<T: std::fmt::Display>(patterns: &[(String, T)]) -> Vec<String> {
    patterns.iter().map(|(k, v)| format!("{k}={v}")).collect()
}
