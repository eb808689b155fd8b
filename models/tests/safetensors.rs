//! The safetensors path: the demo GGUF converted to a Hugging Face folder
//! (dequantized weights, `config.json`, `tokenizer.json` built from the GGUF
//! vocabulary) computes what the GGUF computes, and so do the Gemma
//! fixtures; tiny random-weight Qwen2- and Llama-style models load from
//! f32, f16, bf16 and sharded checkpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::DType;
use common::convert::{gguf_to_hf, random_model, scratch_dir};
use common::{argmax, cosine, greedy_alone, pool, Seq};
use kindling_models::{BatchItem, BlockTable, ChatMessage, TextModel};
use serde_json::json;

fn chat_prompt(model: &TextModel, text: &str) -> Vec<u32> {
    let messages = [ChatMessage::new("user", text)];
    model
        .tokenizer
        .encode(&model.render_chat(&messages).unwrap())
        .unwrap()
}

#[test]
fn converted_demo_agrees_with_the_gguf() {
    let dir = scratch_dir("demo-hf");
    gguf_to_hf(&common::demo_gguf(), &dir, DType::F32, 1);
    let gguf = TextModel::load(&common::demo_gguf(), Some(512)).unwrap();
    let hf = TextModel::load(&dir, Some(512)).unwrap();

    // Same tokens and chat template from the exported tokenizer files.
    let prompt = chat_prompt(&gguf, "What is the capital of France?");
    assert_eq!(chat_prompt(&hf, "What is the capital of France?"), prompt);

    // Teacher-forced on the GGUF's greedy tokens: the logits agree closely
    // (the GGUF path quantizes activations to 8 bits, the f32 path does not).
    common::tracks(&gguf, &hf, &prompt, 8, 0.99);
    // Short greedy answers make the same choices wherever the GGUF path's
    // choice is clear. (A 135M model at 4 bits meets many near-ties, where
    // 8-bit activations and f32 may part ways: Jupiter and Neptune, say.)
    let mut clear = 0;
    for q in [
        "What is the largest planet in the solar system?",
        "Who wrote Romeo and Juliet?",
    ] {
        let prompt = chat_prompt(&gguf, q);
        clear += common::clear_choices_agree(&gguf, &hf, &prompt, 12);
    }
    assert!(clear >= 8, "only {clear} of 24 steps are clear");
    std::fs::remove_dir_all(&dir).ok();
}

/// Gemma 2 and 3 from Hugging Face folders: the known-answer fixtures (the
/// demo's weights as Gemma, checked against llama.cpp by `known_answer`)
/// converted to Gemma's checkpoint layout — its names, norm weights stored
/// as offsets from one, its config fields — compute what the GGUFs compute.
#[test]
fn converted_gemma_fixtures_agree_with_their_ggufs() {
    for arch in ["gemma2", "gemma3"] {
        let dir = scratch_dir(&format!("{arch}-hf"));
        let gguf_path = dir.join("fixture.gguf");
        kindling_models::retarget::retarget(&common::demo_gguf(), &gguf_path, arch).unwrap();
        let hf_dir = dir.join("hf");
        std::fs::create_dir_all(&hf_dir).unwrap();
        gguf_to_hf(&gguf_path, &hf_dir, DType::F32, 1);
        let gguf = TextModel::load(&gguf_path, Some(256)).unwrap();
        let hf = TextModel::load(&hf_dir, Some(256)).unwrap();
        assert_eq!(hf.config().variant, {
            let mut v = gguf.config().variant.clone();
            v.norm_offset = true;
            v.query_scale = Some(1.0 / (gguf.config().head_dim as f32).sqrt());
            v
        });
        // A prompt longer than the fixtures' eight-position window.
        let prompt = chat_prompt(
            &gguf,
            "Name three rivers of Europe and where they meet the sea.",
        );
        assert!(prompt.len() > 16);
        common::tracks(&gguf, &hf, &prompt, 8, 0.99);
        std::fs::remove_dir_all(&dir).ok();
    }
}

fn tiny_config(model_type: &str) -> serde_json::Value {
    json!({
        "model_type": model_type,
        "vocab_size": 49152,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": model_type == "qwen2",
        "sliding_window": null,
    })
}

/// Next-token logits after `prompt`, and after one more token.
fn two_steps(model: &TextModel, prompt: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let mut kv = pool(model, 128);
    let mut s = Seq::default();
    let a = s.feed(model, &mut kv, prompt);
    let b = s.feed(model, &mut kv, &[argmax(&a)]);
    (a, b)
}

#[test]
fn tiny_random_models_load_in_every_precision_and_layout() {
    let tokenizer = scratch_dir("tiny-tok");
    gguf_to_hf_tokenizer_only(&tokenizer);
    for family in ["qwen2", "llama"] {
        let cfg = tiny_config(family);
        let f32_dir = scratch_dir(&format!("tiny-{family}-f32"));
        random_model(&cfg, &tokenizer, &f32_dir, DType::F32, 1, 7);
        let base = TextModel::load(&f32_dir, None).unwrap();
        let prompt = base.tokenizer.encode("Hello there, tiny model").unwrap();
        let (a, b) = two_steps(&base, &prompt);
        assert!(a.iter().all(|x| x.is_finite()));
        // The same weights split over three shards with an index: identical.
        let sharded = scratch_dir(&format!("tiny-{family}-sharded"));
        random_model(&cfg, &tokenizer, &sharded, DType::F32, 3, 7);
        assert!(sharded.join("model.safetensors.index.json").is_file());
        assert_eq!(
            two_steps(&TextModel::load(&sharded, None).unwrap(), &prompt),
            (a.clone(), b.clone())
        );
        // Half precision: the rounded weights give nearly the same logits.
        for dtype in [DType::F16, DType::BF16] {
            let dir = scratch_dir(&format!("tiny-{family}-{dtype:?}"));
            random_model(&cfg, &tokenizer, &dir, dtype, 2, 7);
            let (ha, hb) = two_steps(&TextModel::load(&dir, None).unwrap(), &prompt);
            assert!(
                cosine(&a, &ha) > 0.999 && cosine(&b, &hb) > 0.999,
                "{family} {dtype:?}"
            );
            std::fs::remove_dir_all(&dir).ok();
        }
        batched_greedy_matches_solo(&base);
        std::fs::remove_dir_all(&f32_dir).ok();
        std::fs::remove_dir_all(&sharded).ok();
    }
    std::fs::remove_dir_all(&tokenizer).ok();
}

/// The demo's tokenizer files, for the random models.
fn gguf_to_hf_tokenizer_only(dir: &std::path::Path) {
    let gguf = kindling_models::gguf::GgufFile::open(&common::demo_gguf()).unwrap();
    let tok = kindling_models::tokenizer::Tokenizer::from_gguf(&gguf).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tok.to_json().unwrap()).unwrap();
    let config =
        json!({"bos_token": tok.bos_text(), "eos_token": tok.eos_text(), "add_bos_token": false});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

/// Three prompts decoded together give the greedy tokens each gives alone.
fn batched_greedy_matches_solo(model: &TextModel) {
    let prompts: Vec<Vec<u32>> = [
        "one",
        "two words here",
        "and a somewhat longer third prompt",
    ]
    .iter()
    .map(|p| model.tokenizer.encode(p).unwrap())
    .collect();
    let mut kv = pool(model, 3 * 64);
    let mut tables: Vec<BlockTable> = prompts.iter().map(|_| BlockTable::default()).collect();
    let mut tokens = prompts.clone();
    let mut cached = [0usize; 3];
    for _ in 0..6 {
        for (t, toks) in tables.iter_mut().zip(&tokens) {
            assert!(kv.grow(t, toks.len()));
        }
        let batch: Vec<BatchItem> = (0..3)
            .map(|i| BatchItem {
                tokens: &tokens[i][cached[i]..],
                start: cached[i],
                blocks: tables[i].blocks(),
                logits: 1,
            })
            .collect();
        let logits = model.forward(&batch, &mut kv).unwrap();
        for i in 0..3 {
            cached[i] = tokens[i].len();
            tokens[i].push(argmax(&logits[i]));
        }
    }
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(
            tokens[i][p.len()..],
            greedy_alone(model, p, 6),
            "prompt {i}"
        );
    }
}
