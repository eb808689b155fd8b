//! Decode throughput of Kindling's device forward pass, for
//! `benches/gpu_decode.py` (which runs PyTorch `transformers` on the same
//! weights and prints the ratios).
//!
//! ```text
//! gpu_decode write DIR PRESET            random bf16 weights: llama3-8b or tiny
//! gpu_decode run DIR DEVICE DTYPE BATCHES CONTEXT STEPS
//!            e.g. run /data/l3 cuda:0 bf16 1,16,64 128 64
//! ```
//!
//! `run` prints JSON lines: the device-to-device copy bandwidth, the load
//! (twice: the second from the page cache) with GB/s and the device's free
//! memory before, after and after unloading, then tokens/s per batch size
//! (each sequence prefilled with CONTEXT random tokens, then STEPS decode
//! steps timed), with the roofline: weight bytes per step ÷ the measured
//! bandwidth.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kindling_models::llama::DeviceLlama;
use kindling_models::synthetic::Init;
use kindling_models::{gpu, BatchItem, BlockTable, KvCache};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Shape {
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
}

fn preset(name: &str) -> Res<Shape> {
    Ok(match name {
        "llama3-8b" => Shape {
            vocab: 128_256,
            hidden: 4096,
            inter: 14_336,
            layers: 32,
            heads: 32,
            kv_heads: 8,
        },
        "tiny" => Shape {
            vocab: 1024,
            hidden: 256,
            inter: 688,
            layers: 2,
            heads: 8,
            kv_heads: 2,
        },
        other => return Err(format!("unknown preset {other}").into()),
    })
}

/// Normal values of standard deviation `std` from `seed`, as bf16.
fn random(n: usize, std: f32, seed: u64) -> Vec<half::bf16> {
    Init { mean: 0.0, std }.sample_as(n, seed, half::bf16::from_f32)
}

fn write(dir: &Path, name: &str) -> Res<()> {
    let s = preset(name)?;
    std::fs::create_dir_all(dir)?;
    let head_dim = s.hidden / s.heads;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.inter,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    let tensor = |shape: &[usize], scale: f32, seed: u64| -> Res<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(
            random(n, scale, seed),
            shape,
            &Device::Cpu,
        )?)
    };
    let ones = |n: usize| Tensor::ones(n, DType::BF16, &Device::Cpu);
    let (h, q, kv) = (s.hidden, s.heads * head_dim, s.kv_heads * head_dim);
    let w = 1.0 / (h as f32).sqrt();
    let mut index = serde_json::Map::new();
    let mut shard = |file: String, tensors: HashMap<String, Tensor>| -> Res<()> {
        for name in tensors.keys() {
            index.insert(name.clone(), file.clone().into());
        }
        candle_core::safetensors::save(&tensors, dir.join(&file))?;
        Ok(())
    };
    let mut outer = HashMap::new();
    outer.insert(
        "model.embed_tokens.weight".into(),
        tensor(&[s.vocab, h], 1.0, 1)?,
    );
    outer.insert("lm_head.weight".into(), tensor(&[s.vocab, h], w, 2)?);
    outer.insert("model.norm.weight".into(), ones(h)?);
    shard("model-outer.safetensors".into(), outer)?;
    for l in 0..s.layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let seed = 100 + 10 * l as u64;
        let mut t = HashMap::new();
        t.insert(p("input_layernorm.weight"), ones(h)?);
        t.insert(p("post_attention_layernorm.weight"), ones(h)?);
        t.insert(p("self_attn.q_proj.weight"), tensor(&[q, h], w, seed)?);
        t.insert(p("self_attn.k_proj.weight"), tensor(&[kv, h], w, seed + 1)?);
        t.insert(p("self_attn.v_proj.weight"), tensor(&[kv, h], w, seed + 2)?);
        t.insert(p("self_attn.o_proj.weight"), tensor(&[h, q], w, seed + 3)?);
        t.insert(
            p("mlp.gate_proj.weight"),
            tensor(&[s.inter, h], w, seed + 4)?,
        );
        t.insert(p("mlp.up_proj.weight"), tensor(&[s.inter, h], w, seed + 5)?);
        let wd = 1.0 / (s.inter as f32).sqrt();
        t.insert(
            p("mlp.down_proj.weight"),
            tensor(&[h, s.inter], wd, seed + 6)?,
        );
        shard(format!("model-layer-{l:03}.safetensors"), t)?;
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": index});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;
    println!("{{\"written\": {:?}}}", dir.display().to_string());
    Ok(())
}

fn device(name: &str) -> Res<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let n = name
        .strip_prefix("cuda:")
        .and_then(|n| n.parse().ok())
        .ok_or("device: cpu or cuda:N")?;
    Ok(gpu::device(n)?)
}

fn free(name: &str) -> Option<u64> {
    let n = name.strip_prefix("cuda:")?.parse().ok()?;
    gpu::memory(n).ok().map(|m| m.free)
}

/// Bytes read plus written per second by device-to-device copies of 1 GiB.
fn bandwidth(dev: &Device) -> Res<f64> {
    let n = if dev.is_cpu() { 1 << 26 } else { 1 << 29 };
    let src = Tensor::zeros(n, DType::BF16, dev)?;
    let mut keep = src.copy()?;
    dev.synchronize()?;
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        keep = src.copy()?;
    }
    dev.synchronize()?;
    drop(keep);
    Ok((2 * n * 2 * reps) as f64 / t.elapsed().as_secs_f64())
}

fn run(args: &[String]) -> Res<()> {
    let [dir, dev_name, dtype, batches, context, steps] = args else {
        return Err("run DIR DEVICE DTYPE BATCHES CONTEXT STEPS".into());
    };
    let dir = PathBuf::from(dir);
    let dev = device(dev_name)?;
    let dtype = match dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        d => return Err(format!("dtype {d}").into()),
    };
    let (context, steps): (usize, usize) = (context.parse()?, steps.parse()?);
    let batches: Vec<usize> = batches
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let bw = bandwidth(&dev)?;
    println!("{{\"d2d_bytes_per_s\": {bw:.4e}}}");
    let file_bytes: u64 = kindling_models::llama::weight_files(&dir)?
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let positions = context + steps + 1;
    let mut model = None;
    for pass in ["first", "page_cache"] {
        drop(model.take());
        dev.synchronize()?;
        let before = free(dev_name);
        let t = Instant::now();
        let m = DeviceLlama::from_safetensors(&dir, positions, &dev, dtype)?;
        dev.synchronize()?;
        let secs = t.elapsed().as_secs_f64();
        let after = free(dev_name);
        println!(
            "{{\"load\": {pass:?}, \"seconds\": {secs:.3}, \"gb_per_s\": {:.3}, \"free_before\": {}, \"free_after_load\": {}}}",
            file_bytes as f64 / secs / 1e9,
            before.unwrap_or(0),
            after.unwrap_or(0)
        );
        model = Some(m);
    }
    let model = model.ok_or("no model")?;
    let cfg = model.config().clone();
    // Weight bytes one decode step reads (the embedding lookup reads rows only).
    let step_bytes = (file_bytes as f64 - (cfg.vocab_size * cfg.hidden_size * 2) as f64)
        * dtype.size_in_bytes() as f64
        / 2.0;
    let roofline = bw / step_bytes;
    for &b in &batches {
        let shape = kindling_models::CacheShape {
            layers: cfg.layers,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
        };
        let mut kv = KvCache::on_device(shape, b * KvCache::blocks_for(positions), &dev, dtype)?;
        let mut tables: Vec<BlockTable> = (0..b).map(|_| BlockTable::default()).collect();
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|i| {
                (0..context)
                    .map(|j| ((i * 7919 + j * 104_729) % cfg.vocab_size) as u32)
                    .collect()
            })
            .collect();
        for (t, p) in tables.iter_mut().zip(&prompts) {
            if !kv.grow(t, positions) {
                return Err("cache too small".into());
            }
            let item = BatchItem {
                tokens: p,
                start: 0,
                blocks: t.blocks(),
                logits: 1,
            };
            model.forward(&[item], &mut kv)?;
        }
        let mut next: Vec<u32> = vec![1; b];
        let mut first = Vec::with_capacity(steps);
        let time = |kv: &mut KvCache, next: &mut Vec<u32>, pos: usize| -> Res<()> {
            let items: Vec<BatchItem> = tables
                .iter()
                .zip(next.iter())
                .map(|(t, tok)| BatchItem {
                    tokens: std::slice::from_ref(tok),
                    start: pos,
                    blocks: t.blocks(),
                    logits: 1,
                })
                .collect();
            let logits = model.forward(&items, kv)?;
            for (n, l) in next.iter_mut().zip(logits) {
                *n = l
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i as u32);
            }
            Ok(())
        };
        // The first sequence's greedy tokens, for comparing with the peer.
        // (Its first token comes from the prefill's logits in the peer;
        // here every sequence starts from token 1, so both feed 1 first.)
        // One warm-up step, then the timed ones.
        time(&mut kv, &mut next, context)?;
        first.push(next[0]);
        let t = Instant::now();
        for s in 1..steps {
            time(&mut kv, &mut next, context + s)?;
            first.push(next[0]);
        }
        let secs = t.elapsed().as_secs_f64();
        let tps = (b * (steps - 1)) as f64 / secs;
        println!(
            "{{\"batch\": {b}, \"tokens_per_s\": {tps:.2}, \"step_ms\": {:.3}, \"roofline_steps_per_s\": {roofline:.2}, \"of_roofline\": {:.3}, \"tokens\": {first:?}}}",
            1e3 * secs / (steps - 1) as f64,
            (tps / b as f64) / roofline
        );
    }
    let before_unload = free(dev_name);
    drop(model);
    dev.synchronize()?;
    println!(
        "{{\"free_before_unload\": {}, \"free_after_unload\": {}}}",
        before_unload.unwrap_or(0),
        free(dev_name).unwrap_or(0)
    );
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("write") if args.len() == 3 => write(Path::new(&args[1]), &args[2]),
        Some("run") => run(&args[1..]),
        _ => Err(
            "usage: gpu_decode write DIR PRESET | run DIR DEVICE DTYPE BATCHES CONTEXT STEPS"
                .into(),
        ),
    }
}
