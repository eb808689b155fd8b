//! Known-answer test against llama.cpp on the same GGUF. The reference
//! (`tests/data/llama_cpp_reference.json`, from `scripts/llama_cpp_reference.py`)
//! holds llama.cpp's prompt ids, its first 32 greedy ids, and at each step the
//! margin of its chosen logit over the runner-up.
//!
//! Tokenization and chat-template rendering must be identical. Greedy decoding
//! must pick llama.cpp's token at every step where llama.cpp's choice is clear;
//! at a near-tie (margin under [`NEAR_TIE`]) two correct implementations may
//! differ in the last bits — different summation orders meet 8-bit activation
//! rounding — so there llama.cpp's token must be within [`NEAR_TIE_GAP`] of
//! our best.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::convert::scratch_dir;
use common::{pool, ranked, repo, Seq};
use kindling_models::requantize::{mixed, requantize};
use kindling_models::retarget::retarget;
use kindling_models::{ChatMessage, Sampler, SamplingParams, TextModel};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Logit margin below which llama.cpp's own choice is a near-tie: the
/// spread that the order of float additions alone gives on this model (see
/// [`LOGIT_TOLERANCE`]; a margin of 0.52 has been seen to flip).
const NEAR_TIE: f32 = 1.0;
/// At a near-tie, how far under our best logit llama.cpp's token may be:
/// three to five candidates can sit within 0.7 of each other, and the noise
/// of [`LOGIT_TOLERANCE`] (largest where the model is least sure) is on top.
const NEAR_TIE_GAP: f32 = 2.0;

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

/// Logit differences allowed against llama.cpp (its five highest per step,
/// teacher-forced on the same ids): mean and worst. Both sides take the same
/// integer dot products on the same 8-bit activations; what remains is the
/// order of float additions, and on this model that alone moves logits this
/// much: our SIMD and reference kernels (the same integers, summed in
/// another order) differ from each other by a mean of 0.17–0.24 and at
/// worst 0.9–1.6, as much as either differs from llama.cpp (a float that
/// lands on the other side of an 8-bit rounding step changes that
/// activation by a whole step, and 30 layers carry it on).
const LOGIT_TOLERANCE: (f32, f32) = (0.35, 2.5);

/// Checks `model` against llama.cpp's answers for the same file (see the
/// module doc); returns how many cases match its 32 greedy ids exactly and
/// the mean and largest logit differences met (where the reference has logits).
fn follows_llama_cpp(model: &TextModel, cases: &[Value]) -> (usize, f32, f32) {
    let mut exact = 0;
    let (mut worst, mut total, mut count) = (0f32, 0f32, 0usize);
    for case in cases {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["greedy_ids"]);
        let margins = margins(case);
        // Teacher-forced on llama.cpp's tokens, so one near-tie cannot derail the rest.
        let mut kv = pool(model, 2 * (prompt.len() + want.len()));
        let mut seq = Seq::default();
        let mut logits = seq.feed(model, &mut kv, &prompt);
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
                    gap <= NEAR_TIE_GAP,
                    "{:?} step {step}: near-tie, but llama.cpp's token is {gap} under our best",
                    case["prompt"]
                );
            }
            for pair in case["top_logits"]
                .as_array()
                .map_or(&[][..], |v| &v[step].as_array().unwrap()[..])
            {
                let id = pair[0].as_u64().unwrap() as usize;
                let theirs = pair[1].as_f64().unwrap() as f32;
                let diff = (logits[id] - theirs).abs();
                worst = worst.max(diff);
                total += diff;
                count += 1;
            }
            logits = seq.feed(model, &mut kv, &[token]);
        }
        // Free-running greedy decoding, as the server does it.
        let params = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let mut sampler = Sampler::new(params, &prompt, model.tokenizer.vocab_size());
        let mut seq = Seq::default();
        let mut logits = seq.feed(model, &mut kv, &prompt);
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let t = sampler.sample(&logits).token;
            got.push(t);
            logits = seq.feed(model, &mut kv, &[t]);
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
    let mean = total / count.max(1) as f32;
    assert!(
        mean <= LOGIT_TOLERANCE.0 && worst <= LOGIT_TOLERANCE.1,
        "logits differ from llama.cpp's by {mean} on average, {worst} at worst"
    );
    (exact, mean, worst)
}

#[test]
fn greedy_choices_match_llama_cpp_step_by_step() {
    let model = load(2048);
    let cases = cases();
    let (exact, _, _) = follows_llama_cpp(&model, &cases);
    eprintln!(
        "{exact} of {} cases match llama.cpp's 32 greedy ids exactly",
        cases.len()
    );
}

/// Writes a fixture with `make`, checks it is the file llama.cpp ran for
/// `reference` (a file under tests/data), loads it and holds it to
/// llama.cpp's answers.
fn fixture_follows_llama_cpp(reference: &str, make: impl FnOnce(&std::path::Path)) {
    let text = std::fs::read_to_string(repo().join("tests/data").join(reference)).unwrap();
    let reference_doc: Value = serde_json::from_str(&text).unwrap();
    let dir = scratch_dir(reference.trim_end_matches(".json"));
    let path = dir.join("fixture.gguf");
    make(&path);
    let digest = hex(&Sha256::digest(std::fs::read(&path).unwrap()));
    assert_eq!(
        digest, reference_doc["sha256"],
        "{reference}: the fixture is not the file llama.cpp ran: regenerate the reference \
         (scripts/llama_cpp_reference.py)"
    );
    let model = TextModel::load(&path, Some(2048)).unwrap();
    let cases = reference_doc["cases"].as_array().unwrap();
    let (exact, mean, worst) = follows_llama_cpp(&model, cases);
    eprintln!(
        "{reference}: {exact} of {} cases match llama.cpp's 32 greedy ids exactly; \
         logits differ by {mean} on average, {worst} at worst",
        cases.len()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Every quantization format our kernels run, in one model: the demo model
/// requantized to a rotating mix of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K
/// and Q6_K (the same bytes llama.cpp ran for the reference, with its KV
/// cache in f32 as ours is on the CPU).
#[test]
fn every_quantization_format_follows_llama_cpp() {
    fixture_follows_llama_cpp("llama_cpp_reference.mixed.json", |path| {
        requantize(&common::demo_gguf(), path, mixed).unwrap()
    });
}

/// The Qwen2 architecture (q/k/v biases, NeoX-style rotation): the demo
/// model's weights written as `qwen2` with seeded biases.
#[test]
fn qwen2_architecture_follows_llama_cpp() {
    fixture_follows_llama_cpp("llama_cpp_reference.qwen2.json", |path| {
        retarget(&common::demo_gguf(), path, "qwen2").unwrap()
    });
}

/// The Qwen3 architecture (per-head q/k RMS norms before rotation): the
/// demo model's weights written as `qwen3` with seeded norms.
#[test]
fn qwen3_architecture_follows_llama_cpp() {
    fixture_follows_llama_cpp("llama_cpp_reference.qwen3.json", |path| {
        retarget(&common::demo_gguf(), path, "qwen3").unwrap()
    });
}

/// The Phi-3 architecture (q/k/v fused into one projection, gate and up
/// into another, NeoX-style rotation): the demo model's weights fused as
/// Phi-3 stores them.
#[test]
fn phi3_architecture_follows_llama_cpp() {
    fixture_follows_llama_cpp("llama_cpp_reference.phi3.json", |path| {
        retarget(&common::demo_gguf(), path, "phi3").unwrap()
    });
}

/// Gemma 2: GELU gating, a scaled embedding, norms after attention and
/// after the MLP, soft-capped attention scores and logits, and every other
/// layer attending to a sliding window (eight positions here, so it bites).
#[test]
fn gemma2_architecture_follows_llama_cpp() {
    fixture_follows_llama_cpp("llama_cpp_reference.gemma2.json", |path| {
        retarget(&common::demo_gguf(), path, "gemma2").unwrap()
    });
}

/// Gemma 3: Gemma 2's shape without the soft caps, with q/k norms, and
/// sliding layers (two of every three here) that rotate with a local base
/// while the global layers' RoPE is scaled.
#[test]
fn gemma3_architecture_follows_llama_cpp() {
    fixture_follows_llama_cpp("llama_cpp_reference.gemma3.json", |path| {
        retarget(&common::demo_gguf(), path, "gemma3").unwrap()
    });
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
