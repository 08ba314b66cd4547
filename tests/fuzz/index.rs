//! A sharded base as a fuzz input: the tiny base split over shards, with a generated
//! `model.safetensors.index.json` and `config.json`, and now and then an adapter that resizes
//! the vocabulary (the one case where lorafs rewrites the index's `total_size`).

use std::path::Path;

use proptest::prelude::*;
use proptest::sample::Index;

use crate::adapter::{write_table, Fit, Key};
use crate::base::{self, shard_name, TENSORS};
use crate::json::{odd_string, odd_value, J};

/// What a `weight_map` entry names as the file holding a tensor.
#[derive(Clone, Debug)]
pub enum FileRef {
    Correct,
    /// `./model-…`: transformers accepts it.
    DotSlash,
    /// `../<base dir>/model-…`: the same file, through the parent.
    DotDot,
    Absolute,
    /// Another shard (or the same one, with one shard).
    Other(Index),
    Missing,
    Name(String),
    Odd(J),
}

#[derive(Clone, Debug)]
pub struct IndexCase {
    pub shards: usize,
    pub shard_of: Vec<usize>,
    /// Per base tensor, its entry (or none).
    pub refs: Vec<Option<FileRef>>,
    /// Entries for tensors the base does not have.
    pub extra: Vec<(String, FileRef)>,
    pub total_size: Option<J>,
    /// Replaces `weight_map`, `metadata` or the whole file when set.
    pub odd_weight_map: Option<J>,
    pub odd_metadata: Option<J>,
    pub odd_file: Option<J>,
    pub mutations: Vec<(Index, u8)>,
    pub config: Option<J>,
    /// Pass an adapter that resizes the vocabulary.
    pub resize: bool,
}

impl IndexCase {
    fn file_name(&self, r: &FileRef, shard: usize, dir: &Path) -> J {
        let name = shard_name(shard, self.shards);
        match r {
            FileRef::Correct => J::Str(name),
            FileRef::DotSlash => J::Str(format!("./{name}")),
            FileRef::DotDot => {
                let own = dir.file_name().map(|n| n.to_string_lossy().into_owned());
                J::Str(format!("../{}/{name}", own.unwrap_or_default()))
            }
            FileRef::Absolute => J::Str(dir.join(&name).display().to_string()),
            FileRef::Other(i) => J::Str(shard_name(i.index(self.shards), self.shards)),
            FileRef::Missing => J::str("model-00009-of-00009.safetensors"),
            FileRef::Name(s) => J::Str(s.clone()),
            FileRef::Odd(j) => j.clone(),
        }
    }

    fn index_text(&self, dir: &Path) -> Vec<u8> {
        let mut map = Vec::new();
        for (t, r) in self.refs.iter().enumerate() {
            if let Some(r) = r {
                let shard = self.shard_of[t] % self.shards;
                map.push((TENSORS[t].0.to_string(), self.file_name(r, shard, dir)));
            }
        }
        for (name, r) in &self.extra {
            map.push((name.clone(), self.file_name(r, 0, dir)));
        }
        let real_total: u64 = base::data_bytes();
        let metadata = self.odd_metadata.clone().unwrap_or_else(|| {
            let total = self.total_size.clone().unwrap_or(J::num(real_total));
            J::obj(vec![("total_size", total)])
        });
        let index = self.odd_file.clone().unwrap_or_else(|| {
            J::obj(vec![
                ("metadata", metadata),
                (
                    "weight_map",
                    self.odd_weight_map.clone().unwrap_or(J::Obj(map)),
                ),
            ])
        });
        let mut text = index.render().into_bytes();
        for (i, x) in &self.mutations {
            if !text.is_empty() {
                let i = i.index(text.len());
                text[i] ^= x;
            }
        }
        text
    }

    /// Write the base (and the resizing adapter) under `dir`; returns the base directory
    /// and the adapters to open it with.
    pub fn write(
        &self,
        dir: &Path,
    ) -> std::io::Result<(std::path::PathBuf, Vec<std::path::PathBuf>)> {
        let base_dir = dir.join("base");
        base::write(&base_dir, self.shards, &self.shard_of, self.config.as_ref())?;
        if self.shards > 1 || !self.refs.is_empty() || !self.extra.is_empty() {
            std::fs::write(
                base_dir.join("model.safetensors.index.json"),
                self.index_text(&base_dir),
            )?;
        }
        let mut adapters = Vec::new();
        if self.resize {
            let adapter = dir.join("adapter");
            std::fs::create_dir_all(&adapter)?;
            std::fs::write(
                adapter.join("adapter_config.json"),
                r#"{"peft_type": "LORA", "r": 2}"#,
            )?;
            let resized = |module: usize| Key {
                prefix: "base_model.model.",
                module: Ok(module),
                suffix: ".base_layer.weight",
                rank: 2,
                tokens: 0,
                fit: Fit::Dim(0, base::VOCAB + 6),
                dtype: "BF16",
            };
            write_table(
                &adapter.join("adapter_model.safetensors"),
                &[resized(3), resized(4)],
                7,
            )?;
            adapters.push(adapter);
        }
        Ok((base_dir, adapters))
    }
}

fn file_ref() -> BoxedStrategy<FileRef> {
    prop_oneof![
        12 => Just(FileRef::Correct),
        2 => Just(FileRef::DotSlash),
        1 => Just(FileRef::DotDot),
        1 => Just(FileRef::Absolute),
        2 => any::<Index>().prop_map(FileRef::Other),
        1 => Just(FileRef::Missing),
        1 => prop_oneof![
            odd_string(),
            Just("model.safetensors.index.json".to_string()),
            Just("config.json".to_string()),
            Just(".".to_string()),
        ]
        .prop_map(FileRef::Name),
        1 => odd_value().prop_map(FileRef::Odd),
    ]
    .boxed()
}

fn total_size() -> BoxedStrategy<Option<J>> {
    prop_oneof![
        2 => Just(None),
        3 => proptest::sample::select(&[
            "0", "-1", "9223372036854775807", "-9223372036854775808", "18446744073709551615",
            "1e999", "1.5", "\"12\"", "null",
        ][..])
            .prop_map(|s| Some(J::Raw(s.to_string()))),
        1 => odd_value().prop_map(Some),
    ]
    .boxed()
}

fn config() -> BoxedStrategy<Option<J>> {
    prop_oneof![
        6 => Just(Some(base::llama_config())),
        1 => Just(None),
        1 => odd_value().prop_map(Some),
        1 => proptest::sample::select(&["", "{", "[1,2", "\u{0}"][..]).prop_map(|s| Some(J::Raw(s.to_string()))),
        1 => (odd_string(), odd_value()).prop_map(|(model_type, tie)| {
            Some(J::obj(vec![("model_type", J::Str(model_type)), ("tie_word_embeddings", tie)]))
        }),
    ]
    .boxed()
}

pub fn case() -> impl Strategy<Value = IndexCase> {
    // A correct index with a few entries changed, so that most cases get past the first
    // check and each reaches a different one.
    let changes = prop::collection::vec(
        (
            any::<Index>(),
            prop_oneof![4 => file_ref().prop_map(Some), 1 => Just(None)],
        ),
        0..3,
    );
    let extra = prop_oneof![
        4 => Just(Vec::new()),
        1 => prop::collection::vec((odd_string(), file_ref()), 1..3),
    ];
    let odd = || proptest::option::weighted(0.03, odd_value());
    (
        (1usize..4, prop::collection::vec(0usize..3, TENSORS.len())),
        changes,
        extra,
        total_size(),
        (odd(), odd(), odd()),
        proptest::option::weighted(0.1, (any::<Index>(), 1u8..=255)),
        config(),
        proptest::bool::weighted(0.3),
    )
        .prop_map(
            |(
                (shards, shard_of),
                changes,
                extra,
                total_size,
                (wm, meta, file),
                mutation,
                config,
                resize,
            )| {
                let mut refs = vec![Some(FileRef::Correct); TENSORS.len()];
                for (i, r) in changes {
                    refs[i.index(TENSORS.len())] = r;
                }
                IndexCase {
                    shards,
                    shard_of,
                    refs,
                    extra,
                    total_size,
                    odd_weight_map: wm,
                    odd_metadata: meta,
                    odd_file: file,
                    mutations: mutation.into_iter().collect(),
                    config,
                    resize,
                }
            },
        )
}
