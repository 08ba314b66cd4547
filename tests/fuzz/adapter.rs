//! Adapter directories as a fuzz input: `adapter_config.json` field by field, and the tensor
//! table of `adapter_model.safetensors` from the real key grammar with shapes that fit the
//! base, fit it transposed, or do not fit at all.

use std::path::Path;

use proptest::prelude::*;

use crate::base::{MODULES, TENSORS};
use crate::json::{mostly, object, odd_number, odd_string, odd_value, J};
use crate::st::{dim, Entry, Shape, StFile};

/// The most bytes one adapter tensor may declare. A reader that converts factors before
/// checking them allocates a few times this, which the heap bound sees (the 8 GiB version of
/// the same bug is the `huge_sparse_factor` regression test, not a fuzz case).
pub const TENSOR_CAP: u128 = 48 << 20;

const PREFIXES: [&str; 3] = [
    "base_model.model.",
    "",
    "base_model.model.base_model.model.",
];

/// Key suffixes PEFT writes (and a few it does not).
const SUFFIXES: [&str; 16] = [
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_embedding_A",
    ".lora_embedding_B",
    ".lora_B.bias",
    ".lora_magnitude_vector",
    ".lora_magnitude_vector.weight",
    ".token_adapter.trainable_tokens_delta",
    ".modules_to_save.default.weight",
    ".base_layer.weight",
    ".base_layer.bias",
    ".weight",
    ".bias",
    ".lora_A.default.weight",
    ".lora_E",
    ".hada_w1_a",
];

#[derive(Clone, Debug)]
pub enum Fit {
    /// The shape PEFT saves for this key on this module.
    Exact,
    Transposed,
    /// Dimension `i` (mod the rank) replaced.
    Dim(usize, u64),
    Any(Vec<u64>),
}

/// One key of the tensor table.
#[derive(Clone, Debug)]
pub struct Key {
    pub prefix: &'static str,
    /// An index into [`MODULES`], or a made-up module name.
    pub module: Result<usize, String>,
    pub suffix: &'static str,
    pub rank: u64,
    /// Rows of a trainable-tokens delta.
    pub tokens: u64,
    pub fit: Fit,
    pub dtype: &'static str,
}

impl Key {
    pub fn entry(&self) -> Entry {
        let (name, out, inp) = match &self.module {
            Ok(i) => MODULES[*i],
            Err(name) => (name.as_str(), 8, 8),
        };
        let r = self.rank;
        let shape: Vec<u64> = match self.suffix {
            ".lora_A.weight" | ".lora_A.default.weight" => vec![r, inp],
            ".lora_B.weight" => vec![out, r],
            ".lora_embedding_A" => vec![r, out],
            ".lora_embedding_B" => vec![inp, r],
            ".lora_B.bias" | ".lora_magnitude_vector" | ".lora_magnitude_vector.weight" => {
                vec![out]
            }
            ".base_layer.bias" | ".bias" => vec![out],
            ".token_adapter.trainable_tokens_delta" => vec![self.tokens, inp],
            // A whole tensor: the base's own shape, when the base has it.
            suffix => {
                let leaf = if suffix.ends_with(".bias") {
                    "bias"
                } else {
                    "weight"
                };
                let target = format!("{name}.{leaf}");
                TENSORS
                    .iter()
                    .find(|t| t.0 == target)
                    .map_or(vec![out, inp], |t| t.2.to_vec())
            }
        };
        let shape = match &self.fit {
            Fit::Exact => shape,
            Fit::Transposed => shape.into_iter().rev().collect(),
            Fit::Dim(i, v) => {
                let mut s = shape;
                let n = s.len();
                s[i % n] = *v;
                s
            }
            Fit::Any(dims) => dims.clone(),
        };
        Entry::plain(
            &format!("{}{name}{}", self.prefix, self.suffix),
            self.dtype,
            &shape,
        )
    }
}

/// Heap that valid factors in `keys` may call for: a `lora_A`/`lora_B` pair that agrees on
/// its rank is valid PEFT whatever the rank, and lorafs holds it as f32 `U`, `V` and `V`'s
/// packed copy (the bound of the `factor_memory_is_proportional_to_the_file` regression).
/// A pair that does not agree earns nothing: such factors must be refused before they are
/// read, which the fixed bound checks.
pub fn factor_allowance(keys: &[Key]) -> usize {
    let dims = |key: &Key| match key.entry().shape {
        Shape::Dims(dims) if dims.len() == 2 => Some((dims[0], dims[1])),
        _ => None,
    };
    let bytes = |key: &Key| key.entry().size().min(TENSOR_CAP) as usize;
    let mut total = 0;
    for a in keys.iter().filter(|k| k.suffix == ".lora_A.weight") {
        let pair = keys
            .iter()
            .find(|b| b.suffix == ".lora_B.weight" && b.prefix == a.prefix && b.module == a.module);
        let (Some(b), Some((a0, a1))) = (pair, dims(a)) else {
            continue;
        };
        let Some((b0, b1)) = dims(b) else { continue };
        if a0 == b1 || a1 == b0 {
            total += 4 * (bytes(a) + bytes(b));
        }
    }
    total
}

/// Tensors written as a valid safetensors file (data capped, see [`TENSOR_CAP`]).
pub fn write_table(path: &Path, keys: &[Key], seed: u64) -> std::io::Result<u64> {
    let file = StFile {
        cap: TENSOR_CAP,
        ..StFile::valid(keys.iter().map(Key::entry).collect(), seed)
    };
    file.write(path)
}

fn fit() -> BoxedStrategy<Fit> {
    prop_oneof![
        30 => Just(Fit::Exact),
        2 => Just(Fit::Transposed),
        3 => (0usize..2, prop_oneof![
            3 => 0u64..11,
            1 => proptest::sample::select(&[1u64 << 20, 1 << 23, 1 << 32, 1 << 62, u64::MAX][..]),
        ])
            .prop_map(|(i, v)| Fit::Dim(i, v)),
        1 => prop::collection::vec(dim(), 0..4).prop_map(Fit::Any),
    ]
    .boxed()
}

fn factor_dtype() -> BoxedStrategy<&'static str> {
    prop_oneof![
        30 => proptest::sample::select(&["F16", "BF16", "F32"][..]),
        1 => proptest::sample::select(&["I8", "F64", "F8_E4M3", "BOOL", "U16", "F4"][..]),
    ]
    .boxed()
}

fn module() -> BoxedStrategy<Result<usize, String>> {
    prop_oneof![
        // The first five are weights a LoRA fits; the rest lead to refusals.
        12 => (0..5usize).prop_map(Ok),
        6 => (5..MODULES.len()).prop_map(Ok),
        1 => odd_string().prop_map(Err),
    ]
    .boxed()
}

/// Keys of one module: a lora_A/lora_B pair (Linear or embedding) with, now and then, a DoRA
/// magnitude or a lora_B bias; or a single key of any kind.
fn group() -> impl Strategy<Value = Vec<Key>> {
    let pair = (
        proptest::sample::select(&PREFIXES[..]),
        module(),
        proptest::bool::weighted(0.2),
        prop_oneof![4 => 1u64..5, 1 => Just(0u64), 1 => Just(1u64 << 12)],
        prop::collection::vec((fit(), factor_dtype()), 4),
        proptest::option::weighted(0.3, 0usize..3),
    )
        .prop_map(|(prefix, module, embedding, rank, fits, extra)| {
            let parts: &[&'static str] = if embedding {
                &[".lora_embedding_A", ".lora_embedding_B"]
            } else {
                &[".lora_A.weight", ".lora_B.weight"]
            };
            let extras = [
                ".lora_magnitude_vector",
                ".lora_B.bias",
                ".lora_magnitude_vector.weight",
            ];
            let suffixes = parts.iter().copied().chain(extra.map(|e| extras[e]));
            suffixes
                .zip(fits)
                .map(|(suffix, (fit, dtype))| Key {
                    prefix,
                    module: module.clone(),
                    suffix,
                    rank,
                    tokens: 2,
                    fit,
                    dtype,
                })
                .collect()
        });
    let single = (
        proptest::sample::select(&PREFIXES[..]),
        module(),
        proptest::sample::select(&SUFFIXES[..]),
        1u64..4,
        0u64..4,
        fit(),
        factor_dtype(),
    )
        .prop_map(|(prefix, module, suffix, rank, tokens, fit, dtype)| {
            vec![Key {
                prefix,
                module,
                suffix,
                rank,
                tokens,
                fit,
                dtype,
            }]
        });
    prop_oneof![4 => pair, 1 => single]
}

/// A generated tensor table: a few groups of keys, in any order.
pub fn table() -> impl Strategy<Value = Vec<Key>> {
    prop::collection::vec(group(), 1..4)
        .prop_map(|groups| groups.concat())
        .prop_shuffle()
}

/// Valid tables, one per feature, for the config target (the config decides what happens).
pub fn valid_table(kind: usize) -> Vec<Key> {
    let key = |module: usize, suffix: &'static str, rank: u64| Key {
        prefix: "base_model.model.",
        module: Ok(module),
        suffix,
        rank,
        tokens: 2,
        fit: Fit::Exact,
        dtype: "BF16",
    };
    let pair = |m: usize, r: u64| vec![key(m, ".lora_A.weight", r), key(m, ".lora_B.weight", r)];
    match kind % 6 {
        0 => pair(0, 2),
        1 => [pair(0, 2), vec![key(0, ".lora_magnitude_vector", 2)]].concat(),
        2 => vec![
            key(3, ".lora_embedding_A", 2),
            key(3, ".lora_embedding_B", 2),
        ],
        3 => vec![key(3, ".token_adapter.trainable_tokens_delta", 2)],
        4 => [pair(0, 2), vec![key(0, ".lora_B.bias", 2)]].concat(),
        _ => [pair(1, 4), pair(2, 4)].concat(),
    }
}

/// `alpha_pattern` / `rank_pattern` keys: module names, regex syntax errors, and patterns
/// whose compiled form is large.
fn pattern_key() -> BoxedStrategy<String> {
    prop_oneof![
        3 => proptest::sample::select(&[
            "q_proj", "k_proj", "model.layers.0.self_attn.q_proj", "layers\\.0\\..*", "lm_head",
            "embed_tokens", "down_proj",
        ][..])
            .prop_map(str::to_string),
        2 => odd_string(),
        1 => proptest::sample::select(&[
            "\\w{300}", "(\\w+\\s*){40}", "a{1000}{1000}", "[\\s\\S]{5000}", "(?i)\\pL{200}",
        ][..])
            .prop_map(str::to_string),
    ]
    .boxed()
}

fn pattern() -> BoxedStrategy<J> {
    mostly(
        prop::collection::vec((pattern_key(), odd_number()), 0..6)
            .prop_map(J::Obj)
            .boxed(),
    )
}

fn token_ids() -> BoxedStrategy<J> {
    prop_oneof![
        4 => prop::collection::vec(prop_oneof![4 => (0u64..12).prop_map(J::num), 1 => odd_number()], 0..5)
            .prop_map(J::Arr),
        1 => (0usize..50_000).prop_map(|n| J::Arr((0..n as u64).map(J::num).collect())),
    ]
    .boxed()
}

fn token_indices() -> BoxedStrategy<J> {
    mostly(
        prop_oneof![
            token_ids(),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("embed_tokens".to_string()),
                        Just("model.embed_tokens".to_string()),
                        Just("lm_head".to_string()),
                        odd_string()
                    ],
                    token_ids()
                ),
                0..3
            )
            .prop_map(J::Obj),
        ]
        .boxed(),
    )
}

fn boolean() -> BoxedStrategy<J> {
    mostly(any::<bool>().prop_map(|b| J::Raw(b.to_string())).boxed())
}

fn choice(options: &'static [&'static str]) -> BoxedStrategy<J> {
    mostly(proptest::sample::select(options).prop_map(J::str).boxed())
}

fn target_modules() -> BoxedStrategy<J> {
    mostly(
        prop_oneof![
            prop::collection::vec(pattern_key().prop_map(J::Str), 0..4).prop_map(J::Arr),
            pattern_key().prop_map(J::Str),
        ]
        .boxed(),
    )
}

/// `adapter_config.json`: every field PEFT's LoraConfig has that lorafs reads, each present
/// or not and well- or ill-typed; the fields that make lorafs refuse are rarer, so that the
/// rest gets exercised.
pub fn config() -> BoxedStrategy<J> {
    let common = object(vec![
        ("peft_type", 0.95, prop_oneof![9 => Just(J::str("LORA")), 1 => choice(&["LORA ", "lora", "LOHA", "ADALORA", ""])].boxed()),
        ("r", 0.8, mostly(prop_oneof![(1u64..9).prop_map(J::num), odd_number()].boxed())),
        ("lora_alpha", 0.8, mostly(odd_number())),
        ("use_rslora", 0.4, boolean()),
        ("fan_in_fan_out", 0.3, boolean()),
        ("use_dora", 0.3, boolean()),
        ("alpha_pattern", 0.4, pattern()),
        ("rank_pattern", 0.4, pattern()),
        ("target_modules", 0.5, target_modules()),
        ("trainable_token_indices", 0.4, token_indices()),
        ("bias", 0.3, choice(&["none", "all", "lora_only", "some"])),
        ("modules_to_save", 0.2, odd_value()),
        ("base_model_name_or_path", 0.3, mostly(odd_string().prop_map(J::Str).boxed())),
        ("lora_bias", 0.2, boolean()),
    ]);
    let refusing = object(vec![
        (
            "init_lora_weights",
            0.05,
            choice(&[
                "gaussian",
                "pissa",
                "PiSSA_niter_4",
                "olora",
                "loftq",
                "eva",
            ]),
        ),
        ("layer_replication", 0.02, odd_value()),
        ("alora_invocation_tokens", 0.02, odd_value()),
        ("use_qalora", 0.02, boolean()),
        ("arrow_config", 0.02, odd_value()),
        ("use_kasa", 0.02, boolean()),
        ("use_bdlora", 0.02, odd_value()),
        ("velora_config", 0.02, odd_value()),
    ]);
    (common, refusing)
        .prop_map(|(a, b)| match (a, b) {
            (J::Obj(mut a), J::Obj(b)) => {
                a.extend(b);
                J::Obj(a)
            }
            (a, _) => a,
        })
        .boxed()
}
