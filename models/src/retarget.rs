//! Rewrites a Llama-architecture GGUF as Qwen2, Qwen3, Phi-3, Gemma 2 or
//! Gemma 3 of the same shape, adding what those architectures have beyond
//! Llama (Qwen2: q/k/v biases; Qwen3: per-head q/k RMS norms; Gemma: norms
//! after attention and after the MLP, and Gemma 3's q/k norms) as seeded
//! pseudo-random values, or fusing projections as Phi-3 stores them. Gemma
//! files get sliding windows short enough to bite on short prompts, soft
//! caps that bite (Gemma 2) and a local RoPE base beside a scaled global
//! one (Gemma 3). The
//! known-answer tests run such files in Kindling and in llama.cpp: the same
//! bytes through both sides' Qwen code paths (NeoX-style rotation, biases,
//! norms), with no Qwen weights to download. The output is the same bytes
//! on every machine.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};
use crate::requantize::{open, read_all, write_file};

/// What [`retarget`] writes: five architectures, `spm` (the same model
/// with its byte-level vocabulary recast as a SentencePiece one: the
/// fixture of the SentencePiece tokenizer's parity tests) and
/// `spm-no-prefix` (the same without the space before the text, as
/// Gemma's vocabularies are).
pub const TARGETS: [&str; 7] = [
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3",
    "spm",
    "spm-no-prefix",
];

/// A small deterministic generator (SplitMix64), so fixtures do not depend
/// on a random-number crate's version.
struct SplitMix(u64);

impl SplitMix {
    /// Uniform in [-1, 1).
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn tensor(&mut self, n: usize, center: f32, spread: f32) -> Result<QTensor> {
        let v: Vec<f32> = (0..n).map(|_| center + spread * self.next()).collect();
        Ok(QTensor::quantize(
            &Tensor::from_vec(v, n, &Device::Cpu)?,
            GgmlDType::F32,
        )?)
    }
}

/// Writes `src` (a `llama` GGUF) as architecture `arch` (one of [`TARGETS`]).
pub fn retarget(src: &Path, dst: &Path, arch: &str) -> Result<()> {
    if !TARGETS.contains(&arch) {
        return Err(ModelError::UnsupportedArchitecture(format!(
            "{arch} (fixtures: {})",
            TARGETS.join(", ")
        )));
    }
    let (mut reader, content) = open(src)?;
    let meta_u32 = |k: &str| content.metadata.get(k).and_then(|v| v.to_u32().ok());
    let (Some(hidden), Some(heads), Some(layers)) = (
        meta_u32("llama.embedding_length"),
        meta_u32("llama.attention.head_count"),
        meta_u32("llama.block_count"),
    ) else {
        return Err(ModelError::Metadata {
            key: "llama.*".into(),
            message: format!("{} is not a llama GGUF", src.display()),
        });
    };
    let kv_heads = meta_u32("llama.attention.head_count_kv").unwrap_or(heads);
    if arch == "phi3" {
        let tensors = fuse_for_phi3(read_all(&mut reader, &content)?)?;
        return write_file(metadata_for(&content, arch), tensors, dst);
    }
    if arch.starts_with("spm") {
        let mut metadata = content.metadata.clone();
        sentencepiece_vocab(&mut metadata, arch == "spm")?;
        let mut metadata: Vec<(String, Value)> = metadata.into_iter().collect();
        metadata.sort_by(|a, b| a.0.cmp(&b.0));
        return write(&mut reader, &content, metadata, Vec::new(), dst);
    }
    let head_dim = (hidden / heads) as usize;
    let mut metadata = metadata_for(&content, arch);
    let mut set = |k: &str, v: Value| {
        metadata.retain(|(name, _)| name != &format!("{arch}.{k}"));
        metadata.push((format!("{arch}.{k}"), v));
    };
    if arch != "qwen2" {
        set("attention.key_length", Value::U32(head_dim as u32));
        set("attention.value_length", Value::U32(head_dim as u32));
    }
    match arch {
        "gemma2" => {
            set("attention.sliding_window", Value::U32(8));
            set("attn_logit_softcapping", Value::F32(10.0));
            set("final_logit_softcapping", Value::F32(15.0));
        }
        "gemma3" => {
            set("attention.sliding_window", Value::U32(8));
            set("attention.sliding_window_pattern", Value::U32(3));
            set("rope.freq_base", Value::F32(1_000_000.0));
            set("rope.freq_base_swa", Value::F32(10_000.0));
            set("rope.scaling.type", Value::String("linear".into()));
            set("rope.scaling.factor", Value::F32(8.0));
        }
        _ => {}
    }
    metadata.sort_by(|a, b| a.0.cmp(&b.0));

    let mut rng = SplitMix(0x4b69_6e64_6c69_6e67);
    let mut added: Vec<(String, QTensor)> = Vec::new();
    for layer in 0..layers as usize {
        let blk = |part: &str| format!("blk.{layer}.{part}");
        if arch == "qwen2" {
            let kv = kv_heads as usize * head_dim;
            for (part, n) in [
                ("attn_q.bias", hidden as usize),
                ("attn_k.bias", kv),
                ("attn_v.bias", kv),
            ] {
                added.push((blk(part), rng.tensor(n, 0.0, 0.1)?));
            }
        }
        if matches!(arch, "qwen3" | "gemma3") {
            for part in ["attn_q_norm.weight", "attn_k_norm.weight"] {
                added.push((blk(part), rng.tensor(head_dim, 1.0, 0.2)?));
            }
        }
        if arch.starts_with("gemma") {
            for part in ["post_attention_norm.weight", "post_ffw_norm.weight"] {
                added.push((blk(part), rng.tensor(hidden as usize, 1.0, 0.2)?));
            }
        }
    }
    write(&mut reader, &content, metadata, added, dst)
}

/// `content`'s metadata with `llama.*` keys renamed for `arch`.
fn metadata_for(content: &Content, arch: &str) -> Vec<(String, Value)> {
    let mut metadata: Vec<(String, Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| match k.strip_prefix("llama.") {
            Some(rest) => (format!("{arch}.{rest}"), v.clone()),
            None if k == "general.architecture" => (k.clone(), Value::String(arch.into())),
            None => (k.clone(), v.clone()),
        })
        .collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    metadata
}

/// Writes `dst`: `metadata`, the tensors of `content` (read through
/// `reader`, in file order), then `added`.
fn write(
    reader: &mut BufReader<File>,
    content: &Content,
    metadata: Vec<(String, Value)>,
    added: Vec<(String, QTensor)>,
    dst: &Path,
) -> Result<()> {
    let mut tensors = read_all(reader, content)?;
    tensors.extend(added);
    write_file(metadata, tensors, dst)
}

/// Phi-3's layout: each block's q, k and v fused into `attn_qkv` and its
/// gate and up into `ffn_up` (gate rows first), byte for byte.
fn fuse_for_phi3(tensors: Vec<(String, QTensor)>) -> Result<Vec<(String, QTensor)>> {
    let order: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    let mut by_name: std::collections::HashMap<String, QTensor> = tensors.into_iter().collect();
    let mut take = |name: &str| {
        by_name.remove(name).ok_or_else(|| ModelError::Tensor {
            name: name.into(),
            message: "missing from the source".into(),
        })
    };
    let fuse = |parts: Vec<QTensor>| -> Result<QTensor> {
        let dtype = parts[0].dtype();
        let cols = parts[0].shape().dims2()?.1;
        let mut rows = 0;
        let mut bytes = Vec::new();
        for p in &parts {
            if p.dtype() != dtype {
                return Err(ModelError::Tensor {
                    name: "fused projection".into(),
                    message: "parts of different types".into(),
                });
            }
            rows += p.shape().dims2()?.0;
            bytes.extend_from_slice(&p.data()?);
        }
        Ok(qtensor_from_ggml(
            dtype,
            &bytes,
            vec![rows, cols],
            &Device::Cpu,
        )?)
    };
    let mut out = Vec::new();
    for name in order {
        let Some(prefix) = name
            .strip_suffix(".attn_q.weight")
            .or(name.strip_suffix(".ffn_gate.weight"))
        else {
            if !(name.ends_with(".attn_k.weight")
                || name.ends_with(".attn_v.weight")
                || name.ends_with(".ffn_up.weight"))
            {
                let tensor = take(&name)?;
                out.push((name, tensor));
            }
            continue;
        };
        if name.ends_with(".attn_q.weight") {
            let parts = vec![
                take(&name)?,
                take(&format!("{prefix}.attn_k.weight"))?,
                take(&format!("{prefix}.attn_v.weight"))?,
            ];
            out.push((format!("{prefix}.attn_qkv.weight"), fuse(parts)?));
        } else {
            let parts = vec![take(&name)?, take(&format!("{prefix}.ffn_up.weight"))?];
            out.push((format!("{prefix}.ffn_up.weight"), fuse(parts)?));
        }
    }
    Ok(out)
}

/// Recasts a byte-level BPE vocabulary as SentencePiece pieces: tokens
/// become their text with `▁` for spaces (scored by id, so earlier merges
/// rank higher), other single bytes `<0xNN>` byte tokens (those of
/// printable ASCII are appended), tokens that are not whole UTF-8, repeat
/// a piece or hold a character that is no piece (a newline, say) unused;
/// special tokens stay. The vocabulary grows past
/// the embedding table: a tokenizer fixture, not a model to run.
fn sentencepiece_vocab(
    metadata: &mut std::collections::HashMap<String, Value>,
    space_prefix: bool,
) -> Result<()> {
    let bad = |m: &str| ModelError::Metadata {
        key: "tokenizer.ggml.tokens".into(),
        message: m.into(),
    };
    let strings = |v: Option<&Value>| -> Option<Vec<String>> {
        v?.to_vec()
            .ok()?
            .iter()
            .map(|x| x.to_string().ok().cloned())
            .collect()
    };
    let tokens = strings(metadata.get("tokenizer.ggml.tokens")).ok_or_else(|| bad("no tokens"))?;
    let types: Vec<i32> = metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .and_then(|v| v.iter().map(|x| x.to_i32().ok()).collect())
        .ok_or_else(|| bad("no token types"))?;
    let mut seen = std::collections::HashSet::new();
    let mut ascii = Vec::new();
    let (mut pieces, mut kinds, mut scores) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
        let (piece, kind, score) = if matches!(ty, 3 | 4) {
            (t.clone(), ty, 0.0)
        } else {
            let bytes = crate::tokenizer::byte_level_bytes(t);
            match (bytes.len(), String::from_utf8(bytes.clone())) {
                // Printable ASCII is a piece of its own, as in real
                // SentencePiece vocabularies (its byte token comes last).
                (1, _) if (0x20..0x7F).contains(&bytes[0]) => {
                    ascii.push(bytes[0]);
                    let text = char::from(bytes[0]).to_string();
                    (text.replace(' ', "\u{2581}"), 1, -(i as f32))
                }
                (1, _) => (format!("<0x{:02X}>", bytes[0]), 6, 0.0),
                (_, Ok(text)) => (text.replace(' ', "\u{2581}"), 1, -(i as f32)),
                _ => (format!("<unused{i}>"), 5, 0.0),
            }
        };
        let (piece, kind) = if seen.insert(piece.clone()) {
            (piece, kind)
        } else {
            (format!("<unused{i}>"), 5)
        };
        pieces.push(Value::String(piece));
        kinds.push(Value::I32(kind));
        scores.push(Value::F32(score));
    }
    // As in real SentencePiece vocabularies, every character of a piece is
    // a piece itself: others (with a newline, say) become unused.
    let chars: std::collections::HashSet<String> = pieces
        .iter()
        .zip(&kinds)
        .filter_map(|(p, k)| match (p, k) {
            (Value::String(p), Value::I32(1)) if p.chars().count() == 1 => Some(p.clone()),
            _ => None,
        })
        .collect();
    for (i, (p, k)) in pieces.iter_mut().zip(kinds.iter_mut()).enumerate() {
        if let (Value::String(text), Value::I32(1)) = (&*p, &*k) {
            if !text.chars().all(|c| chars.contains(&c.to_string())) {
                *p = Value::String(format!("<unused{i}>"));
                *k = Value::I32(5);
                scores[i] = Value::F32(0.0);
            }
        }
    }
    for b in ascii {
        pieces.push(Value::String(format!("<0x{b:02X}>")));
        kinds.push(Value::I32(6));
        scores.push(Value::F32(0.0));
    }
    metadata.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    metadata.insert("tokenizer.ggml.tokens".into(), Value::Array(pieces));
    metadata.insert("tokenizer.ggml.token_type".into(), Value::Array(kinds));
    metadata.insert("tokenizer.ggml.scores".into(), Value::Array(scores));
    metadata.insert(
        "tokenizer.ggml.add_space_prefix".into(),
        Value::Bool(space_prefix),
    );
    metadata.remove("tokenizer.ggml.merges");
    metadata.remove("tokenizer.ggml.pre");
    Ok(())
}
