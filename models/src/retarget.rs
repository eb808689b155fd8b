//! Rewrites a Llama-architecture GGUF as Qwen2 or Qwen3 of the same shape,
//! adding what those architectures have beyond Llama (Qwen2: q/k/v biases;
//! Qwen3: per-head q/k RMS norms) as seeded pseudo-random values. The
//! known-answer tests run such files in Kindling and in llama.cpp: the same
//! bytes through both sides' Qwen code paths (NeoX-style rotation, biases,
//! norms), with no Qwen weights to download. The output is the same bytes
//! on every machine.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};

/// The architectures [`retarget`] writes.
pub const TARGETS: [&str; 2] = ["qwen2", "qwen3"];

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
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    let mut reader = BufReader::new(File::open(src).map_err(io(src))?);
    let content = Content::read(&mut reader).map_err(|e| ModelError::BadFormat {
        path: src.to_path_buf(),
        format: "GGUF",
        message: e.to_string(),
    })?;
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
    let head_dim = (hidden / heads) as usize;
    let mut metadata: Vec<(String, Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| match k.strip_prefix("llama.") {
            Some(rest) => (format!("{arch}.{rest}"), v.clone()),
            None if k == "general.architecture" => (k.clone(), Value::String(arch.into())),
            None => (k.clone(), v.clone()),
        })
        .collect();
    if arch == "qwen3" {
        metadata.push((
            format!("{arch}.attention.key_length"),
            Value::U32(head_dim as u32),
        ));
        metadata.push((
            format!("{arch}.attention.value_length"),
            Value::U32(head_dim as u32),
        ));
    }
    metadata.sort_by(|a, b| a.0.cmp(&b.0));

    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, info)| info.offset);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, _) in infos {
        tensors.push((
            name.clone(),
            content.tensor(&mut reader, name, &Device::Cpu)?,
        ));
    }
    let mut rng = SplitMix(0x4b69_6e64_6c69_6e67);
    for layer in 0..layers as usize {
        let blk = |part: &str| format!("blk.{layer}.{part}");
        if arch == "qwen2" {
            let kv = kv_heads as usize * head_dim;
            for (part, n) in [
                ("attn_q.bias", hidden as usize),
                ("attn_k.bias", kv),
                ("attn_v.bias", kv),
            ] {
                tensors.push((blk(part), rng.tensor(n, 0.0, 0.1)?));
            }
        } else {
            for part in ["attn_q_norm.weight", "attn_k_norm.weight"] {
                tensors.push((blk(part), rng.tensor(head_dim, 1.0, 0.2)?));
            }
        }
    }
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = BufWriter::new(File::create(dst).map_err(io(dst))?);
    gguf_file::write(&mut out, &metadata, &tensors)?;
    std::io::Write::flush(&mut out).map_err(io(dst))?;
    Ok(())
}
