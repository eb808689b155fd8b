//! The demo embedding model against sentence-transformers (PyTorch, f32) on
//! the same weights, and batch invariance. The reference comes from
//! `scripts/embedding_reference.py`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use kindling_models::EmbeddingModel;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

fn model() -> EmbeddingModel {
    let dir = common::store().join("all-minilm-l6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-models.sh first",
        dir.display()
    );
    EmbeddingModel::load(&dir).expect("the demo embedding model loads")
}

struct Case {
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn reference() -> Vec<Case> {
    let path = common::repo().join("models/tests/data/minilm_reference.json");
    let text = std::fs::read_to_string(&path).expect("reference file");
    let json: serde_json::Value = serde_json::from_str(&text).expect("reference JSON");
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_string(),
            ids: common::json_ids(&c["ids"]),
            embedding: common::json_f32s(&c["embedding"]),
        })
        .collect()
}

#[test]
fn matches_sentence_transformers() {
    let model = model();
    let cases = reference();
    assert!(
        cases.iter().any(|c| c.ids.len() == model.max_tokens()),
        "a truncated case"
    );
    let mut worst = 1.0f32;
    for case in &cases {
        let ids = model
            .tokenize(&case.text, true)
            .expect("tokenizes")
            .expect("fits");
        assert_eq!(ids, case.ids, "token ids of {:?}", case.text);
        let got = &model.embed(&[&ids]).expect("embeds")[0];
        assert_eq!(got.len(), 384);
        let cos = common::cosine(got, &case.embedding);
        worst = worst.min(cos);
        assert!(cos >= 0.9999, "cosine {cos} for {:?}", case.text);
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "normalized: {norm}");
    }
    eprintln!("lowest cosine with sentence-transformers: {worst:.9}");
}

#[test]
fn truncation_off_refuses_long_text() {
    let model = model();
    let long = "word ".repeat(600);
    let refused = model.tokenize(&long, false).expect("tokenizes");
    let too_long = refused.expect_err("refused");
    assert_eq!(too_long.limit, 256);
    assert!(too_long.tokens > 256, "{too_long:?}");
    let cut = model
        .tokenize(&long, true)
        .expect("tokenizes")
        .expect("cut");
    assert_eq!(cut.len(), 256);
    assert_eq!(cut.last(), Some(&102), "ends with [SEP]");
}

#[test]
fn an_embedding_is_the_same_alone_and_in_any_batch() {
    let model = model();
    let cases = reference();
    let alone: Vec<Vec<f32>> = cases
        .iter()
        .map(|c| model.embed(&[&c.ids]).expect("embeds").remove(0))
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for round in 0..6 {
        // A random multiset of the cases, in random order, some repeated.
        let size = rng.random_range(2..=3 * cases.len());
        let mut picks: Vec<usize> = (0..size)
            .map(|_| rng.random_range(0..cases.len()))
            .collect();
        picks.shuffle(&mut rng);
        let batch: Vec<&[u32]> = picks.iter().map(|&i| cases[i].ids.as_slice()).collect();
        let got = model.embed(&batch).expect("embeds");
        for (&i, v) in picks.iter().zip(&got) {
            assert_eq!(
                v, &alone[i],
                "round {round}: {:?} differs inside a batch of {size}",
                cases[i].text
            );
        }
    }
}

#[test]
fn bad_token_ids_are_errors_not_panics() {
    let model = model();
    assert!(model.embed(&[&[101, 999_999, 102]]).is_err());
    assert!(model.embed(&[&[]]).is_err());
    let long = vec![1000u32; 257];
    assert!(model.embed(&[&long]).is_err());
}
