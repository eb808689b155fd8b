//! Helpers for the model tests: the demo model's path, a single sequence
//! driven through the batched forward pass, and greedy decoding.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use kindling_models::{BatchItem, BlockTable, KvCache, TextModel};

pub mod convert;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The model store (`KINDLING_STORE`, else `store/`).
pub fn store() -> PathBuf {
    std::env::var_os("KINDLING_STORE").map_or_else(|| repo().join("store"), PathBuf::from)
}

/// The demo GGUF (fetched by `scripts/fetch-models.sh`).
pub fn demo_gguf() -> PathBuf {
    let path = store().join("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh first",
        path.display()
    );
    path
}

#[path = "../../../kernels/tests/support/cuda.rs"]
mod cuda;
#[allow(unused_imports)] // not every test binary has a GPU half
pub use cuda::skip_cuda;

/// A pool big enough for a few test sequences of `model`.
pub fn pool(model: &TextModel, positions: usize) -> KvCache {
    model.new_cache(KvCache::blocks_for(positions) + 8).unwrap()
}

/// One sequence: its blocks and how many positions are cached.
#[derive(Default)]
pub struct Seq {
    pub table: BlockTable,
    pub len: usize,
}

impl Seq {
    /// Runs `tokens` alone after what is cached; returns the next-token logits.
    pub fn feed(&mut self, model: &TextModel, kv: &mut KvCache, tokens: &[u32]) -> Vec<f32> {
        assert!(
            kv.grow(&mut self.table, self.len + tokens.len()),
            "pool exhausted"
        );
        let item = BatchItem {
            tokens,
            start: self.len,
            blocks: self.table.blocks(),
            logits: 1,
        };
        let mut out = model.forward(&[item], kv).unwrap();
        self.len += tokens.len();
        out.pop().unwrap()
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    ranked(logits)[0]
}

pub fn ranked(logits: &[f32]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    idx
}

/// Two paths of one model (8-bit activations against f32, say), fed
/// `a`'s greedy tokens for `steps` steps after `prompt`: `b` must pick
/// `a`'s token wherever `a`'s margin is at least 1 logit (8-bit activations
/// alone move logits by about that much at worst; see known_answer.rs).
/// Returns how many steps were that clear.
pub fn clear_choices_agree(a: &TextModel, b: &TextModel, prompt: &[u32], steps: usize) -> usize {
    tracks(a, b, prompt, steps, -1.0)
}

/// [`clear_choices_agree`], with every step's logits also at least
/// `min_cosine` alike.
pub fn tracks(
    a: &TextModel,
    b: &TextModel,
    prompt: &[u32],
    steps: usize,
    min_cosine: f32,
) -> usize {
    let (mut ka, mut kb) = (pool(a, prompt.len() + steps), pool(b, prompt.len() + steps));
    let (mut sa, mut sb) = (Seq::default(), Seq::default());
    let mut la = sa.feed(a, &mut ka, prompt);
    let mut lb = sb.feed(b, &mut kb, prompt);
    let mut clear = 0;
    for step in 0..steps {
        let c = cosine(&la, &lb);
        assert!(c > min_cosine, "step {step}: cosine {c}");
        let r = ranked(&la);
        let t = r[0];
        if la[r[0] as usize] - la[r[1] as usize] >= 1.0 {
            assert_eq!(argmax(&lb), t, "step {step}");
            clear += 1;
        }
        la = sa.feed(a, &mut ka, &[t]);
        lb = sb.feed(b, &mut kb, &[t]);
    }
    clear
}

/// `steps` greedy tokens after `prompt`, the sequence alone in its passes.
pub fn greedy_alone(model: &TextModel, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut kv = pool(model, prompt.len() + steps);
    let mut seq = Seq::default();
    let mut logits = seq.feed(model, &mut kv, prompt);
    let mut out = Vec::new();
    for _ in 0..steps {
        let t = argmax(&logits);
        out.push(t);
        logits = seq.feed(model, &mut kv, &[t]);
    }
    out
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb)) as f32
}

/// A JSON array of numbers as token ids.
pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A JSON array of numbers as f32 values.
pub fn json_f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}
