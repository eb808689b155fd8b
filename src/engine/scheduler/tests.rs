//! The scheduler driven by a fake forward pass: no weights, a tiny word
//! tokenizer, a KV cache of one float per position. The fake always
//! predicts the successor of a sequence's last token (`a` → `b` → …), so a
//! sequence's text says whether it lost or repeated a step, and it checks
//! on every pass that the scheduler gave each item the blocks it needs.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kindling_models::kv_cache::BLOCK_SIZE;
use kindling_models::tokenizer::Tokenizer;
use kindling_models::{BatchItem, CacheShape, KvCache, SamplingParams};
use tokio::sync::mpsc;

use super::{Limits, Request, Scheduler, Sequence, StepModel};
use crate::engine::sequence::{Choice, ChoiceSpec, Events};
use crate::engine::shell::Ticket;
use crate::engine::{EngineError, EngineStats, FinishReason, GenerateEvent};

/// `</s>` (id 0, end of generation) and the letters `a`..=`z` (ids 1..=26).
const VOCAB: usize = 27;

struct Fake {
    tokenizer: Tokenizer,
    /// Per pass: (start, tokens) of each item.
    passes: RefCell<Vec<Vec<(usize, usize)>>>,
    fail_next: RefCell<bool>,
}

impl Fake {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "kindling-scheduler-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let vocab: serde_json::Map<String, serde_json::Value> = std::iter::once("</s>".to_string())
            .chain(('a'..='z').map(String::from))
            .enumerate()
            .map(|(i, t)| (t, serde_json::json!(i)))
            .collect();
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [{"id": 0, "content": "</s>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "</s>"}
        });
        std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": "</s>"}"#,
        )
        .unwrap();
        let (tokenizer, _) = Tokenizer::from_hf_dir(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(tokenizer.vocab_size(), VOCAB);
        Self {
            tokenizer,
            passes: RefCell::new(Vec::new()),
            fail_next: RefCell::new(false),
        }
    }

    fn passes(&self) -> Vec<Vec<(usize, usize)>> {
        self.passes.borrow().clone()
    }
}

impl StepModel for Fake {
    fn forward(
        &self,
        batch: &[BatchItem<'_>],
        _cache: &mut KvCache,
    ) -> kindling_models::Result<Vec<Vec<f32>>> {
        if self.fail_next.replace(false) {
            return Err(kindling_models::ModelError::Tokenizer(
                "the fake failed".into(),
            ));
        }
        self.passes
            .borrow_mut()
            .push(batch.iter().map(|b| (b.start, b.tokens.len())).collect());
        let mut rows = Vec::new();
        for item in batch {
            let end = item.start + item.tokens.len();
            assert!(
                item.blocks.len() * BLOCK_SIZE >= end,
                "{} blocks cannot hold {end} positions",
                item.blocks.len()
            );
            // A row after each of the last `logits` tokens (drafts being
            // verified, then the real last token's).
            let wanted = item.logits.min(item.tokens.len());
            for &token in &item.tokens[item.tokens.len() - wanted..] {
                let mut row = vec![0.0; VOCAB];
                row[token as usize % 26 + 1] = 10.0;
                rows.push(row);
            }
        }
        Ok(rows)
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

fn scheduler(max_sequences: usize, max_batch_tokens: usize, blocks: usize) -> Scheduler {
    let shape = CacheShape {
        layers: 1,
        kv_heads: 1,
        head_dim: 1,
    };
    let limits = Limits {
        max_sequences,
        max_batch_tokens,
        fair: true,
    };
    Scheduler::new(
        limits,
        KvCache::new(shape, blocks),
        Arc::new(EngineStats::default()),
    )
}

/// Queues a greedy request for `prompt` (token ids) and returns its events.
fn submit(
    s: &mut Scheduler,
    prompt: Vec<u32>,
    max_tokens: usize,
    buffer: usize,
    stall: Duration,
    deadline: Option<Instant>,
) -> mpsc::Receiver<GenerateEvent> {
    submit_as(s, None, prompt, max_tokens, buffer, stall, deadline)
}

/// [`submit`] for a tenant.
fn submit_as(
    s: &mut Scheduler,
    tenant: Option<&str>,
    prompt: Vec<u32>,
    max_tokens: usize,
    buffer: usize,
    stall: Duration,
    deadline: Option<Instant>,
) -> mpsc::Receiver<GenerateEvent> {
    let (tx, rx) = mpsc::channel(buffer);
    let tenant: Option<Arc<str>> = tenant.map(Arc::from);
    let ticket = Ticket::take(&s.stats, 64, tenant.clone(), false).unwrap();
    let params = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    let spec = ChoiceSpec {
        index: 0,
        prompt: &prompt,
        max_tokens,
        params,
        stop: &[],
        ignore_eos: false,
        min_tokens: 0,
        echo: None,
        constraint: None,
        tools: None,
    };
    let sequence = Sequence {
        request: 0,
        computed: 0,
        table: Default::default(),
        choice: Choice::new(spec, VOCAB),
        forks: Vec::new(),
        looked_up: false,
        salt: None,
        drafter: Default::default(),
        tokens: prompt.clone(),
    };
    let request = Request {
        events: Events::new(tx, stall),
        ticket,
        deadline: deadline.map(|d| (d, Duration::from_millis(1))),
        prompt_tokens: prompt.len(),
        live: 1,
        tenant,
    };
    s.enqueue(request, vec![sequence]);
    rx
}

fn letters(from: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (from + i - 1) % 26 + 1).collect()
}

/// Everything the client has been sent so far: text (the word tokenizer
/// puts a space between tokens; it is left out), and how it ended.
fn read(rx: &mut mpsc::Receiver<GenerateEvent>) -> (String, Option<FinishReason>, bool) {
    let (mut text, mut finish, mut started) = (String::new(), None, false);
    while let Ok(event) = rx.try_recv() {
        match event {
            GenerateEvent::Started { .. } => started = true,
            GenerateEvent::Delta { text: t, .. } => text.push_str(&t.replace(' ', "")),
            GenerateEvent::Finished { reason, .. } => finish = Some(reason),
            GenerateEvent::Failed(e) => panic!("request failed: {e}"),
            GenerateEvent::ToolCall { .. } => panic!("no tools were offered"),
            GenerateEvent::PrefixCached { .. } => {}
        }
    }
    (text, finish, started)
}

const LONG: Duration = Duration::from_secs(60);

#[test]
fn decodes_first_then_prefills_prompts_in_chunks_within_the_budget() {
    let fake = Fake::new();
    let mut s = scheduler(4, 4, 64);
    let mut a = submit(&mut s, letters(1, 3), 5, 64, LONG, None);
    let mut b = submit(&mut s, letters(1, 10), 2, 64, LONG, None);
    while s.step(&fake) {}
    assert!(s.is_idle());
    let passes = fake.passes();
    // Pass 1: a's whole prompt and the first token of b's; then a decodes
    // one token per pass, first, while b's prompt goes on in chunks.
    assert_eq!(passes[0], vec![(0, 3), (0, 1)]);
    assert_eq!(passes[1], vec![(3, 1), (1, 3)]);
    assert_eq!(passes[2], vec![(4, 1), (4, 3)]);
    for pass in &passes {
        assert!(pass.iter().map(|p| p.1).sum::<usize>() <= 4, "{pass:?}");
    }
    assert_eq!(
        read(&mut a),
        ("defgh".into(), Some(FinishReason::Length), true)
    );
    assert_eq!(
        read(&mut b),
        ("kl".into(), Some(FinishReason::Length), true)
    );
    assert_eq!(s.kv.free_blocks(), 64, "every block came back");
}

#[test]
fn a_request_waits_for_a_seat_and_keeps_its_ticket_until_then() {
    let fake = Fake::new();
    let mut s = scheduler(1, 16, 64);
    let mut a = submit(&mut s, letters(1, 2), 3, 64, LONG, None);
    let mut b = submit(&mut s, letters(5, 2), 2, 64, LONG, None);
    assert_eq!(s.stats.waiting(), 2);
    assert!(s.step(&fake));
    assert_eq!(s.stats.waiting(), 1, "a started, b waits");
    assert!(!read(&mut b).2, "b has no seat yet");
    while s.step(&fake) {}
    assert_eq!(read(&mut a).0, "cde");
    assert_eq!(read(&mut b).0, "gh");
    assert_eq!(s.stats.waiting(), 0);
    // One sequence per pass: never both.
    assert!(fake.passes().iter().all(|p| p.len() == 1));
}

#[test]
fn a_preempted_sequence_is_recomputed_and_continues_its_text() {
    let fake = Fake::new();
    // Four blocks of 16: two 20-token prompts fill them; when `a` grows
    // past 32 positions, `b`, the newest, gives its blocks back.
    let mut s = scheduler(4, 64, 4);
    let mut a = submit(&mut s, letters(1, 20), 20, 256, LONG, None);
    let mut b = submit(&mut s, letters(1, 20), 16, 256, LONG, None);
    let mut steps = 0;
    while s.step(&fake) {
        steps += 1;
        assert!(steps < 100, "no progress");
    }
    let expected = |from: u32, n: usize| -> String {
        letters(from, n)
            .iter()
            .map(|&t| char::from(b'a' + t as u8 - 1))
            .collect()
    };
    assert_eq!(read(&mut a).0, expected(21, 20));
    assert_eq!(
        read(&mut b).0,
        expected(21, 16),
        "b's text has no gap or repeat"
    );
    // b's prompt and the tokens it had made were computed twice.
    assert!(s.stats.prompt_tokens() > 40, "{}", s.stats.prompt_tokens());
    assert_eq!(s.kv.free_blocks(), 4);
}

#[test]
fn a_client_that_leaves_frees_its_seat_and_blocks_at_the_next_step() {
    let fake = Fake::new();
    let mut s = scheduler(4, 64, 8);
    let a = submit(&mut s, letters(1, 20), 50, 256, LONG, None);
    let mut b = submit(&mut s, letters(1, 4), 3, 256, LONG, None);
    assert!(s.step(&fake));
    assert!(s.kv.free_blocks() < 8);
    drop(a);
    while s.step(&fake) {}
    assert_eq!(read(&mut b).0, "efg");
    assert!(s.is_idle());
    assert_eq!(s.kv.free_blocks(), 8);
    // a took part in the first pass only.
    assert!(fake.passes()[1..]
        .iter()
        .all(|p| p.iter().all(|i| i.1 == 1)));
}

#[test]
fn a_stalled_client_sits_out_names_its_timeout_then_is_dropped() {
    let fake = Fake::new();
    let mut s = scheduler(4, 64, 8);
    let stall = Duration::from_millis(30);
    // Room for one step's events only: it is behind after its first token.
    let stalled = submit(&mut s, letters(1, 2), 50, 3, stall, None);
    let mut reader = submit(&mut s, letters(1, 2), 6, 256, LONG, None);
    assert!(s.step(&fake));
    assert!(s.step(&fake), "the reading client runs on");
    let before = Instant::now();
    while s.step(&fake) {}
    assert_eq!(read(&mut reader).0, "cdefgh");
    assert!(!s.is_idle(), "the stalled request is still held");
    assert!(!s.step(&fake), "nothing to run: the worker may park");
    let timeout = s
        .next_timeout()
        .expect("the stall timeout wakes the worker");
    assert!(timeout <= before + stall, "{:?}", timeout - before);
    std::thread::sleep(stall + Duration::from_millis(5));
    assert!(!s.step(&fake));
    assert!(s.is_idle(), "given up after the stall timeout");
    assert_eq!(s.kv.free_blocks(), 8);
    drop(stalled);
}

#[test]
fn deadlines_and_failed_passes_end_only_the_requests_they_concern() {
    let fake = Fake::new();
    let mut s = scheduler(4, 64, 8);
    let past = Instant::now();
    let mut late = submit(&mut s, letters(1, 2), 5, 64, LONG, Some(past));
    assert!(!s.step(&fake));
    assert!(matches!(
        late.try_recv(),
        Ok(GenerateEvent::Failed(EngineError::DeadlineExceeded { .. }))
    ));
    let mut a = submit(&mut s, letters(1, 2), 5, 64, LONG, None);
    *fake.fail_next.borrow_mut() = true;
    assert!(s.step(&fake));
    let mut failed = false;
    while let Ok(event) = a.try_recv() {
        failed |= matches!(event, GenerateEvent::Failed(EngineError::Compute(_)));
    }
    assert!(failed);
    assert!(s.is_idle());
    let mut b = submit(&mut s, letters(1, 2), 2, 64, LONG, None);
    while s.step(&fake) {}
    assert_eq!(
        read(&mut b).0,
        "cd",
        "the scheduler serves on after a failed pass"
    );
}

fn text_of(ids: &[u32]) -> String {
    ids.iter()
        .map(|&i| char::from(b'a' + (i - 1) as u8))
        .collect()
}

#[test]
fn a_flooding_tenant_gives_up_seats_to_one_that_waits() {
    for fair in [true, false] {
        let fake = Fake::new();
        let mut s = scheduler(4, 64, 256);
        s.limits.fair = fair;
        let mut flood: Vec<_> = (0..6)
            .map(|i| submit_as(&mut s, Some("a"), letters(1 + i, 3), 12, 256, LONG, None))
            .collect();
        assert!(s.step(&fake));
        assert!(s.step(&fake));
        let mut b = submit_as(&mut s, Some("b"), letters(3, 3), 3, 256, LONG, None);
        assert!(s.step(&fake));
        let seats = s.seats_by_tenant();
        let (first, _, started) = read(&mut b);
        assert_eq!(started, fair);
        if fair {
            assert_eq!(seats.get(&Some(Arc::from("a"))), Some(&3));
        } else {
            // First come, first served: b waits.
            assert_eq!(seats.get(&Some(Arc::from("a"))), Some(&4));
        }
        while s.step(&fake) {}
        assert_eq!(first + &read(&mut b).0, "fgh");
        // The preempted sequences were recomputed: their text is unchanged.
        for (i, rx) in flood.iter_mut().enumerate() {
            let (text, finish, _) = read(rx);
            assert_eq!(text, text_of(&letters(4 + i as u32, 12)), "request {i}");
            assert_eq!(finish, Some(FinishReason::Length));
        }
        assert_eq!(s.kv.free_blocks(), 256);
    }
}

#[test]
fn a_repeated_prompt_starts_after_its_cached_blocks() {
    let fake = Fake::new();
    let mut s = scheduler(4, 64, 16);
    s.kv.set_prefix_caching(true);
    let prompt = letters(1, 40);
    let mut a = submit(&mut s, prompt.clone(), 3, 64, LONG, None);
    while s.step(&fake) {}
    let first = read(&mut a);
    let mut b = submit(&mut s, prompt, 3, 64, LONG, None);
    while s.step(&fake) {}
    assert_eq!(read(&mut b), first, "the same text, from the cached blocks");
    let passes = fake.passes();
    // a prefilled all 40 tokens; b only what follows its two whole cached blocks.
    assert_eq!(passes[0], vec![(0, 40)]);
    let b_first = passes.iter().rposition(|p| p[0].1 > 1).unwrap();
    assert_eq!(passes[b_first], vec![(32, 8)]);
    assert_eq!(s.stats.prefix_cache(), (80, 32));
    assert_eq!(
        s.kv.free_blocks(),
        16,
        "cached blocks are free for new work"
    );
}

#[test]
fn prompt_lookup_drafts_change_the_passes_not_the_text() {
    // A prompt the fake's successor rule goes on repeating (the alphabet
    // again) accepts every draft; one whose earlier continuation the rule
    // does not follow accepts none. Either way the text is the same.
    for (prompt, helps) in [(letters(1, 30), true), (vec![1, 2, 9, 5, 6, 1, 2], false)] {
        let run = |lookahead: usize| {
            let fake = Fake::new();
            let mut s = scheduler(4, 64, 64);
            let mut rx = submit(&mut s, prompt.clone(), 21, 256, LONG, None);
            s.waiting.back_mut().unwrap().drafter = super::Drafter::new(lookahead);
            while s.step(&fake) {}
            assert_eq!(s.kv.free_blocks(), 64, "every block came back");
            (read(&mut rx), fake.passes().len(), s.stats.drafts())
        };
        let (plain, plain_passes, none) = run(0);
        assert_eq!(none, (0, 0));
        assert_eq!(plain.1, Some(FinishReason::Length));
        let (spec, spec_passes, (drafted, accepted)) = run(4);
        assert_eq!(spec, plain, "the same text and finish");
        assert!(drafted > 0);
        if helps {
            assert_eq!(accepted, drafted);
            assert!(
                spec_passes * 3 < plain_passes,
                "{spec_passes} vs {plain_passes}"
            );
        } else {
            assert_eq!(accepted, 0);
        }
    }
}
