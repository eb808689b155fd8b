//! Known-answer test against llama.cpp on the same GGUF. The reference
//! (`tests/data/llama_cpp_reference.json`, from `scripts/llama_cpp_reference.py`)
//! holds llama.cpp's prompt ids, its first 32 greedy ids, and at each step the
//! margin of its chosen logit over the runner-up.
//!
//! Tokenization and chat-template rendering must be identical. Greedy decoding
//! must pick llama.cpp's token at every step where llama.cpp's choice is clear;
//! at a near-tie (margin under [`NEAR_TIE`]) two correct implementations may
//! differ in the last bits — different summation orders meet 8-bit activation
//! rounding — so there llama.cpp's token must be one of our top two.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{pool, ranked, repo, Seq};
use kindling_models::{ChatMessage, Sampler, SamplingParams, TextModel};
use serde_json::Value;

/// Logit margin below which llama.cpp's own choice is a near-tie.
const NEAR_TIE: f32 = 0.3;

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join("tests/data/llama_cpp_reference.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn margins(case: &Value) -> Vec<f32> {
    case["greedy_margins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn load(context: usize) -> TextModel {
    TextModel::load(&common::demo_gguf(), Some(context)).unwrap()
}

#[test]
fn tokenizer_and_chat_template_match_llama_cpp() {
    let model = load(2048);
    for case in cases() {
        let prompt = case["prompt"].as_str().unwrap();
        if case["kind"] == "chat" {
            let messages: Vec<ChatMessage> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())
                })
                .collect();
            assert_eq!(
                model.render_chat(&messages).unwrap(),
                prompt,
                "chat template rendering"
            );
        }
        assert_eq!(
            model.tokenizer.encode(prompt).unwrap(),
            ids(&case["prompt_ids"]),
            "prompt ids for {prompt:?}"
        );
        let text = case["greedy_text"].as_str().unwrap();
        assert_eq!(
            model.tokenizer.decode(&ids(&case["greedy_ids"])).unwrap(),
            text,
            "detokenization"
        );
    }
}

#[test]
fn greedy_choices_match_llama_cpp_step_by_step() {
    let model = load(2048);
    let mut exact = 0;
    for case in cases() {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["greedy_ids"]);
        let margins = margins(&case);
        // Teacher-forced on llama.cpp's tokens, so one near-tie cannot derail the rest.
        let mut kv = pool(&model, 2 * (prompt.len() + want.len()));
        let mut seq = Seq::default();
        let mut logits = seq.feed(&model, &mut kv, &prompt);
        for (step, (&token, &margin)) in want.iter().zip(&margins).enumerate() {
            let ours = ranked(&logits);
            let gap = logits[ours[0] as usize] - logits[token as usize];
            if margin >= NEAR_TIE {
                assert_eq!(
                    ours[0], token,
                    "{:?} step {step}: llama.cpp's margin {margin}, our gap {gap}",
                    case["prompt"]
                );
            } else {
                assert!(
                    ours[..2].contains(&token),
                    "{:?} step {step}: near-tie, llama.cpp's token not in our top 2",
                    case["prompt"]
                );
            }
            logits = seq.feed(&model, &mut kv, &[token]);
        }
        // Free-running greedy decoding, as the server does it.
        let params = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let mut sampler = Sampler::new(params, &prompt, model.tokenizer.vocab_size());
        let mut seq = Seq::default();
        let mut logits = seq.feed(&model, &mut kv, &prompt);
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let t = sampler.sample(&logits).token;
            got.push(t);
            logits = seq.feed(&model, &mut kv, &[t]);
        }
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None => exact += 1,
            Some(step) => assert!(
                margins[step] < NEAR_TIE,
                "{:?}: greedy output left llama.cpp's at step {step}, where its margin was {}",
                case["prompt"],
                margins[step]
            ),
        }
    }
    eprintln!(
        "{exact} of {} cases match llama.cpp's 32 greedy ids exactly",
        cases().len()
    );
}
