//! RoBERTa-style encoders: positions numbered after the padding index, no
//! weight-name prefix. A tiny random RoBERTa from transformers'
//! `RobertaModel` (`scripts/tiny_roberta_reference.py`) and its last hidden
//! states on three sequences, one at the position limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use kindling_models::bert::{Bert, Positions};

#[test]
fn tiny_roberta_matches_transformers() {
    let dir = common::repo().join("models/tests/data/tiny-roberta");
    let model = Bert::load(&dir).expect("loads");
    let config = model.config();
    assert_eq!(config.positions(), Positions::AfterPadding);
    assert_eq!(config.first_position(), 2);
    assert_eq!(config.max_positions(), 38);
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases: Vec<(Vec<u32>, Vec<f32>)> = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (common::json_ids(&c["ids"]), common::json_f32s(&c["hidden"])))
        .collect();
    assert!(
        cases.iter().any(|(ids, _)| ids.len() == 38),
        "a case at the limit"
    );
    let mut alone = Vec::new();
    for (ids, want) in &cases {
        let got = model.forward(&[ids]).expect("runs");
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{} tokens: max difference {worst}", ids.len());
        alone.push(got);
    }
    // Packed together, each sequence's rows are the same bits as alone.
    let batch: Vec<&[u32]> = cases.iter().rev().map(|(ids, _)| ids.as_slice()).collect();
    let packed = model.forward(&batch).expect("runs");
    let mut at = 0;
    for (i, ids) in batch.iter().enumerate() {
        let rows = ids.len() * 32;
        assert_eq!(
            packed[at..at + rows],
            alone[cases.len() - 1 - i][..],
            "sequence {i}"
        );
        at += rows;
    }
    // One position past the table is refused.
    let long: Vec<u32> = (0..39).map(|i| 3 + i % 90).collect();
    assert!(model.forward(&[&long]).is_err());
}
