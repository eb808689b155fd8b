//! The device forward pass (fused ops, weights and KV cache as tensors on
//! one device, in the checkpoint's float type) against the host path: run
//! on the CPU here, and on `cuda:0` too where there is one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{DType, Device};
use common::convert::{gguf_to_hf, scratch_dir};
use common::{argmax, cosine, pool, Seq};
use kindling_models::{gpu, BatchItem, Placement, TextModel};

const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old clockmaker who",
    "def fibonacci(n):",
];

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Next-token logits of three sequences run together: prompts prefilled in
/// chunks of 9 beside the others' decoding, then 6 greedy steps each, all
/// in shared passes. Returns every logits vector in order.
fn batched_run(model: &TextModel) -> Vec<Vec<f32>> {
    let mut kv = pool(model, 3 * 64);
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| model.tokenizer.encode(p).unwrap())
        .collect();
    let mut seqs: Vec<(Seq, Vec<u32>)> = prompts
        .iter()
        .map(|p| (Seq::default(), p.clone()))
        .collect();
    let mut out = Vec::new();
    for _ in 0..16 {
        let mut plan = Vec::new();
        for (i, (s, tokens)) in seqs.iter_mut().enumerate() {
            if tokens.len() >= prompts[i].len() + 6 {
                continue;
            }
            let end = (s.len + 9).min(tokens.len());
            assert!(kv.grow(&mut s.table, end));
            plan.push((i, s.len, end));
        }
        if plan.is_empty() {
            break;
        }
        let batch: Vec<BatchItem> = plan
            .iter()
            .map(|&(i, start, end)| BatchItem {
                tokens: &seqs[i].1[start..end],
                start,
                blocks: seqs[i].0.table.blocks(),
                logits: usize::from(end == seqs[i].1.len()),
            })
            .collect();
        let logits = model.forward(&batch, &mut kv).unwrap();
        let mut next = logits.into_iter();
        for &(i, _, end) in &plan {
            seqs[i].0.len = end;
            if end == seqs[i].1.len() {
                let l = next.next().unwrap();
                seqs[i].1.push(argmax(&l));
                out.push(l);
            }
        }
    }
    out
}

fn demo_hf(test: &str, dtype: DType) -> std::path::PathBuf {
    let dir = scratch_dir(&format!("device-{test}-{dtype:?}"));
    gguf_to_hf(&common::demo_gguf(), &dir, dtype, 2);
    dir
}

#[test]
fn f32_on_the_device_path_matches_the_host_path() {
    let dir = demo_hf("f32", DType::F32);
    let host = TextModel::load(&dir, Some(512)).unwrap();
    let device =
        TextModel::load_on(&dir, Some(512), &Placement::Device(Device::Cpu, DType::F32)).unwrap();
    assert!(device.placement().contains("F32"), "{}", device.placement());
    let (a, b) = (batched_run(&host), batched_run(&device));
    assert_eq!(a.len(), b.len());
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        let d = max_diff(x, y);
        assert!(d < 2e-3, "step {step}: max logit difference {d}");
        assert_eq!(argmax(x), argmax(y), "step {step}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// bf16 weights, activations and cache stay close to f32 in every pass.
fn bf16_tracks_f32(device: &Device) {
    let dir = demo_hf("bf16", DType::BF16);
    let f32_dir = demo_hf("bf16", DType::F32);
    let host = TextModel::load(&f32_dir, Some(512)).unwrap();
    let placed = Placement::Device(device.clone(), DType::BF16);
    let bf16 = TextModel::load_on(&dir, Some(512), &placed).unwrap();
    let prompt = host.tokenizer.encode(PROMPTS[1]).unwrap();
    let (mut kv_h, mut kv_d) = (pool(&host, 128), pool(&bf16, 128));
    let (mut sh, mut sd) = (Seq::default(), Seq::default());
    let (mut lh, mut ld) = (
        sh.feed(&host, &mut kv_h, &prompt),
        sd.feed(&bf16, &mut kv_d, &prompt),
    );
    for step in 0..10 {
        let c = cosine(&lh, &ld);
        assert!(c > 0.99, "{device:?} step {step}: cosine {c}");
        let t = argmax(&lh);
        lh = sh.feed(&host, &mut kv_h, &[t]);
        ld = sd.feed(&bf16, &mut kv_d, &[t]);
    }
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&f32_dir).ok();
}

#[test]
fn bf16_on_the_device_path_tracks_f32() {
    bf16_tracks_f32(&Device::Cpu);
    match gpu::device(0) {
        Ok(d) => bf16_tracks_f32(&d),
        Err(why) => common::skip_cuda("the CUDA model path", &why),
    }
}

#[test]
fn a_gguf_expanded_onto_the_device_answers_like_the_host() {
    let gguf = common::demo_gguf();
    let host = TextModel::load(&gguf, Some(256)).unwrap();
    let device = TextModel::load_on(
        &gguf,
        Some(256),
        &Placement::Device(Device::Cpu, DType::F32),
    )
    .unwrap();
    // The host path quantizes activations to 8 bits; the device path does
    // not: their clear choices agree, and at least a third are clear.
    let mut clear = 0;
    for text in PROMPTS {
        let prompt = host.tokenizer.encode(text).unwrap();
        clear += common::clear_choices_agree(&host, &device, &prompt, 12);
    }
    assert!(clear >= 12, "only {clear} of 36 steps are clear");
}

/// Qwen3's per-head q/k norms and Phi-3's fused projections on the device
/// path: the known-answer fixtures (held to llama.cpp on the host path)
/// compute the host's logits and make its clear choices. Gemma's soft caps and windows are
/// refused there with a clear message.
#[test]
fn qwen3_and_phi3_fixtures_on_the_device_path_answer_like_the_host() {
    let placed = Placement::Device(Device::Cpu, DType::F32);
    for arch in ["qwen3", "phi3"] {
        let dir = scratch_dir(&format!("device-{arch}"));
        let path = dir.join("fixture.gguf");
        kindling_models::retarget::retarget(&common::demo_gguf(), &path, arch).unwrap();
        let host = TextModel::load(&path, Some(256)).unwrap();
        let device = TextModel::load_on(&path, Some(256), &placed).unwrap();
        for text in PROMPTS {
            // Teacher-forced on the host's tokens, the logits agree closely
            // (the host quantizes activations to 8 bits, the device does not).
            let prompt = host.tokenizer.encode(text).unwrap();
            common::tracks(&host, &device, &prompt, 8, 0.99);
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    let dir = scratch_dir("device-gemma2");
    let path = dir.join("fixture.gguf");
    kindling_models::retarget::retarget(&common::demo_gguf(), &path, "gemma2").unwrap();
    let err = TextModel::load_on(&path, Some(256), &placed).err().unwrap();
    assert!(
        err.to_string().contains("serve this model on the CPU"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn forked_device_sequences_continue_like_the_original() {
    let dir = demo_hf("fork", DType::F32);
    let model =
        TextModel::load_on(&dir, Some(512), &Placement::Device(Device::Cpu, DType::F32)).unwrap();
    let prompt = model.tokenizer.encode(PROMPTS[1]).unwrap();
    // 21 tokens: one full block shared, the partial second block copied.
    assert!(!prompt.len().is_multiple_of(16));
    let mut kv = pool(&model, 256);
    let mut a = Seq::default();
    let first = a.feed(&model, &mut kv, &prompt);
    let table = kv.fork(&a.table, a.len).unwrap();
    let mut b = Seq { table, len: a.len };
    let t = argmax(&first);
    let (la, lb) = (a.feed(&model, &mut kv, &[t]), b.feed(&model, &mut kv, &[t]));
    assert_eq!(la, lb);
    assert_ne!(a.table.blocks().last(), b.table.blocks().last());
    kv.release(&mut a.table);
    kv.release(&mut b.table);
    assert_eq!(kv.free_blocks(), kv.total_blocks());
    std::fs::remove_dir_all(&dir).ok();
}
