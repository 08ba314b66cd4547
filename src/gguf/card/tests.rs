use super::*;

#[test]
fn model_id_components_as_gguf_py() {
    // (id, version, title of the name, title of the organization), from gguf-py's
    // Metadata.get_model_id_components and id_to_title.
    let cases: &[(&str, Option<&str>, &str, Option<&str>)] = &[
        (
            "meta-llama/Llama-2-7b-hf",
            None,
            "Llama 2 7b Hf",
            Some("Meta Llama"),
        ),
        (
            "Qwen/Qwen2.5-0.5B-Instruct",
            None,
            "Qwen2.5 0.5B Instruct",
            Some("Qwen"),
        ),
        (
            "mistralai/Mistral-7B-Instruct-v0.2",
            Some("v0.2"),
            "Mistral 7B Instruct v0.2",
            Some("Mistralai"),
        ),
        (
            "bigscience/bloom-7b1",
            None,
            "Bloom 7b1",
            Some("Bigscience"),
        ),
        ("org/Model-v1.5", Some("v1.5"), "Model v1.5", Some("Org")),
        ("./local-thing", None, "Local Thing", None),
        (
            "HuggingFaceH4/ultrachat_200k",
            None,
            "Ultrachat_200K",
            Some("HuggingFaceH4"),
        ),
        ("tiny", None, "Tiny", None),
        ("Org/Some Model", None, "Org/Some Model", None),
        ("a/b-8k-v2-chat", Some("v2"), "B 8k v2 Chat", Some("A")),
        ("foo/Bar-small-1B", None, "Bar Small 1B", Some("Foo")),
        ("x/llama3.2-1b", None, "Llama3.2 1b", Some("X")),
        ("x/q4_k-model", None, "Q4_K Model", Some("X")),
        ("x/Model-iter3-lora", None, "Model Iter3 Lora", Some("X")),
    ];
    for total in [0, 144_000, 7_000_000_000] {
        for &(id, version, name, org) in cases {
            let p = model_id_components(id, total);
            assert_eq!(p.version.as_deref(), version, "{id} {total}");
            assert_eq!(id_to_title(p.name.as_deref().unwrap()), name, "{id}");
            assert_eq!(p.org.as_deref().map(id_to_title).as_deref(), org, "{id}");
        }
    }
    assert_eq!(model_id_components("/lead", 0).org.as_deref(), Some(""));
}

#[test]
fn front_matter_as_load_model_card() {
    assert_eq!(front_matter("# Title\n---\na: 1\n---\n"), None);
    assert_eq!(front_matter(""), None);
    assert_eq!(front_matter("--- \na: 1\n"), None);
    assert_eq!(front_matter("\u{feff}---\na: 1\n---\n"), None);
    assert_eq!(
        front_matter("---\r\na: 1\r\n---\r\nbody").as_deref(),
        Some("a: 1\n")
    );
    assert_eq!(front_matter("---\na: 1\n").as_deref(), Some("a: 1\n"));
    assert_eq!(front_matter("---\n---\n").as_deref(), Some("\n"));
    assert_eq!(
        front_matter("---\nlanguage:\n- en\n- no\n\tx\n---\n").as_deref(),
        Some("language:\n- en\n- \"no\"\n  x\n")
    );
}

fn keys(readme: &str, total: u64) -> Result<Metadata, String> {
    let card = load(readme.as_bytes(), total)?;
    let mut md = Metadata::new();
    card.write_names(&mut md, "dir", Some("144K".into()))?;
    card.write_rest(&mut md)?;
    Ok(md)
}

#[test]
fn card_keys_in_the_converters_order_and_types() {
    let md = keys(
        "---\nlicense: other\nlicense_name: acme\nlicense_link: https://x/y\ntags: [a, b]\n\
         pipeline_tag: text-generation\nlanguage: en\nbase_model: meta-llama/Llama-3.2-1B\n\
         datasets:\n- HuggingFaceH4/ultrachat_200k\n- {name: Mine, author: me}\n- 3\n\
         model_name: Card Name\nauthor: Someone\nurl: https://example.org\n---\n# body\n",
        144_000,
    )
    .unwrap();
    let names: Vec<&str> = md.entries().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "general.name",
            "general.author",
            "general.size_label",
            "general.license",
            "general.license.name",
            "general.license.link",
            "general.source.url",
            "general.base_model.count",
            "general.base_model.0.name",
            "general.base_model.0.organization",
            "general.base_model.0.repo_url",
            "general.dataset.count",
            "general.dataset.0.name",
            "general.dataset.0.organization",
            "general.dataset.0.repo_url",
            "general.dataset.1.name",
            "general.dataset.1.author",
            "general.tags",
            "general.languages",
        ]
    );
    assert_eq!(
        md.get("general.name"),
        Some(&Value::Text("Card Name".into()))
    );
    assert_eq!(md.get("general.dataset.count"), Some(&Value::U32(3)));
    assert_eq!(
        md.get("general.base_model.0.repo_url"),
        Some(&Value::Text(
            "https://huggingface.co/meta-llama/Llama-3.2-1B".into()
        ))
    );
    assert_eq!(
        md.get("general.tags"),
        Some(&Value::Array(Array::Text(vec![
            "a".into(),
            "b".into(),
            "text-generation".into()
        ])))
    );
    assert_eq!(
        md.get("general.languages"),
        Some(&Value::Array(Array::Text(vec!["en".into()])))
    );
}

#[test]
fn what_the_converter_skips_and_what_it_fails_on() {
    // No front matter, an empty one, a list: nothing but the name and size.
    for readme in ["# Model\n", "---\n---\n", "---\n- a\n---\n", ""] {
        assert_eq!(keys(readme, 0).unwrap().len(), 2, "{readme:?}");
    }
    // Empty and false values are not written; `language: no` is false.
    let md = keys(
        "---\nlicense: ''\nlanguage: no\ntags: []\nauthor: null\n---\n",
        0,
    )
    .unwrap();
    assert_eq!(md.len(), 2);
    // A null base_model still writes a count of 0.
    let md = keys("---\nbase_model:\n---\n", 0).unwrap();
    assert_eq!(md.get("general.base_model.count"), Some(&Value::U32(0)));
    // A list license is joined.
    let md = keys("---\nlicense: [mit, apache-2.0]\n---\n", 0).unwrap();
    assert_eq!(
        md.get("general.license"),
        Some(&Value::Text("mit,apache-2.0".into()))
    );
    // Malformed YAML, non-text values, mixed lists: the converter raises.
    assert!(keys("---\nlicense: [mit\n---\n", 0).is_err());
    assert!(keys("---\nversion: 1.5\n---\n", 0).is_err());
    assert!(keys("---\ntags: [a, 1]\n---\n", 0).is_err());
    assert!(load(b"---\nlicense: \xff\n---\n", 0).is_err());
}
