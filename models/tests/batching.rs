//! The batched forward pass: sequences at different positions, joining at
//! different steps, with prompts prefilled in chunks beside decoding
//! sequences, produce exactly the tokens each produces alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{argmax, greedy_alone, pool, Seq};
use kindling_models::{BatchItem, KvCache, TextModel};

const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old clockmaker who",
    "def fibonacci(n):",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Translate to German: good morning",
    "List three colours:",
];
/// The step at which each prompt joins the batch.
const JOIN: [usize; 8] = [0, 0, 1, 3, 5, 6, 9, 12];
const STEPS: usize = 12;
/// Longest prompt chunk per pass, so the long prompt is prefilled over
/// several passes while the others decode.
const CHUNK: usize = 7;

fn load() -> TextModel {
    TextModel::load(&common::demo_gguf(), Some(512)).unwrap()
}

struct Running {
    seq: Seq,
    tokens: Vec<u32>,
    generated: Vec<u32>,
}

#[test]
fn eight_sequences_in_one_batch_match_their_solo_runs() {
    let model = load();
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| model.tokenizer.encode(p).unwrap())
        .collect();
    let mut kv = pool(&model, 8 * 128);
    let mut running: Vec<Option<Running>> = (0..8).map(|_| None).collect();
    let mut step = 0;
    while running
        .iter()
        .zip(&JOIN)
        .any(|(r, &j)| j >= step || r.as_ref().is_some_and(|r| r.generated.len() < STEPS))
    {
        for (i, slot) in running.iter_mut().enumerate() {
            if JOIN[i] == step {
                *slot = Some(Running {
                    seq: Seq::default(),
                    tokens: prompts[i].clone(),
                    generated: Vec::new(),
                });
            }
        }
        // Plan: every live sequence brings its uncached tokens, at most CHUNK.
        let mut plan = Vec::new();
        for (i, r) in running.iter_mut().enumerate() {
            let Some(r) = r else { continue };
            if r.generated.len() >= STEPS {
                continue;
            }
            let end = (r.seq.len + CHUNK).min(r.tokens.len());
            assert!(kv.grow(&mut r.seq.table, end));
            plan.push((i, r.seq.len, end));
        }
        let batch: Vec<BatchItem> = plan
            .iter()
            .map(|&(i, start, end)| {
                let r = running[i].as_ref().unwrap();
                BatchItem {
                    tokens: &r.tokens[start..end],
                    start,
                    blocks: r.seq.table.blocks(),
                    logits: usize::from(end == r.tokens.len()),
                }
            })
            .collect();
        let mut logits = model.forward(&batch, &mut kv).unwrap().into_iter();
        for &(i, _, end) in &plan {
            let r = running[i].as_mut().unwrap();
            r.seq.len = end;
            if end == r.tokens.len() {
                let t = argmax(&logits.next().unwrap());
                r.generated.push(t);
                r.tokens.push(t);
            }
        }
        assert!(logits.next().is_none());
        step += 1;
    }
    for (i, r) in running.into_iter().enumerate() {
        let got = r.unwrap().generated;
        let alone = greedy_alone(&model, &prompts[i], STEPS);
        assert_eq!(got, alone, "prompt {i} ({:?})", PROMPTS[i]);
    }
}

#[test]
fn chunked_prefill_equals_whole_prefill() {
    let model = load();
    let ids = model.tokenizer.encode(PROMPTS[3]).unwrap();
    let mut kv = pool(&model, 2 * ids.len() + 32);
    let mut whole = Seq::default();
    let a = whole.feed(&model, &mut kv, &ids);
    let mut parts = Seq::default();
    let mut b = Vec::new();
    for chunk in ids.chunks(5) {
        b = parts.feed(&model, &mut kv, chunk);
    }
    // Every row of a pass is computed on its own, so chunking changes nothing.
    assert_eq!(a, b);
}

#[test]
fn a_forked_sequence_continues_like_a_fresh_one() {
    let model = load();
    let ids = model
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog, and")
        .unwrap();
    assert!(!ids
        .len()
        .is_multiple_of(kindling_models::kv_cache::BLOCK_SIZE));
    let mut kv = pool(&model, 4 * 64);
    let mut a = Seq::default();
    a.feed(&model, &mut kv, &ids);
    let mut b = Seq {
        table: kv.fork(&a.table, a.len).unwrap(),
        len: a.len,
    };
    // Diverge `a`; `b` must not see it.
    a.feed(&model, &mut kv, &[42, 43]);
    let from_b = b.feed(&model, &mut kv, &[7]);
    let mut fresh = Seq::default();
    fresh.feed(&model, &mut kv, &ids);
    assert_eq!(from_b, fresh.feed(&model, &mut kv, &[7]));
    for s in [&mut a, &mut b, &mut fresh] {
        kv.release(&mut s.table);
    }
    assert_eq!(kv.free_blocks(), kv.total_blocks());
}

#[test]
fn a_batch_that_does_not_fit_its_blocks_is_an_error() {
    let model = load();
    let mut kv = KvCache::new(model.cache_shape(), 1);
    let mut seq = Seq::default();
    assert!(kv.grow(&mut seq.table, 16));
    let tokens = vec![1u32; 17];
    let item = BatchItem {
        tokens: &tokens,
        start: 0,
        blocks: seq.table.blocks(),
        logits: 1,
    };
    assert!(model.forward(&[item], &mut kv).is_err());
}
