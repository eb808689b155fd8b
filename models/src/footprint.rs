//! How much memory a model will take, read from its weight files' headers
//! before any weight is loaded: the registry uses it to decide whether a
//! load fits and what to evict.

use std::io::Read;
use std::path::Path;

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::llama::LlamaConfig;

/// A model's expected memory use, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    /// Weights as they sit in memory once loaded.
    pub weights: u64,
    /// KV cache for every sequence slot at the full context length.
    pub cache: u64,
    /// Activations of the largest forward pass.
    pub scratch: u64,
}

impl Footprint {
    /// Everything together.
    pub fn total(&self) -> u64 {
        self.weights + self.cache + self.scratch
    }
}

/// How a text model will be run, for its estimate.
#[derive(Debug, Clone, Copy)]
pub struct TextServing {
    /// Cap on positions per sequence (default: the trained context).
    pub context_length: Option<usize>,
    /// Positions the paged KV cache holds, across all sequences.
    pub kv_cache_tokens: usize,
    /// Tokens per forward pass (the prefill chunk budget).
    pub batch_tokens: usize,
    /// Sequences per forward pass.
    pub sequences: usize,
    /// Bytes per element of weights, activations and cache on a device
    /// (2 for bf16/f16); `None` for the CPU path (f32, GGUF kept quantized).
    pub device_element_bytes: Option<u64>,
}

/// Estimates a text model (a GGUF file or a Hugging Face folder) served as
/// `serving` says. Also checks that the weight files hold every tensor
/// their headers declare, so a truncated download fails here, clearly.
pub fn estimate_text(path: &Path, serving: TextServing) -> Result<Footprint> {
    let f32s = 4u64;
    // Activations and cache elements: f32 on the CPU, the dtype on a device.
    let act = serving.device_element_bytes.unwrap_or(f32s);
    let (cfg, weights) = if path.is_dir() {
        let config = path.join("config.json");
        let json = std::fs::read_to_string(&config).map_err(|source| ModelError::Io {
            path: config,
            source,
        })?;
        let cfg = LlamaConfig::from_hf_json(&json)?;
        let elements = folder_elements(path)?;
        // Checkpoints are widened to f32 on the CPU; a tied output shares
        // the table.
        (cfg, elements * act)
    } else {
        let gguf = GgufFile::open(path)?;
        gguf.check_complete()?;
        let cfg = LlamaConfig::from_gguf(&gguf)?;
        match serving.device_element_bytes {
            // A device holds every tensor expanded to its dtype.
            Some(bytes) => (cfg, gguf.tensor_elements() * bytes),
            None => {
                // Lookups read the token-embedding table's mapped blocks
                // where our kernels read its type (a tied output projection
                // holds a second, parsed copy); others get an f32 table.
                let raw = gguf.raw("token_embd.weight")?;
                let table = if kindling_kernels::quant::dequantizes(raw.dtype) {
                    if cfg.tie_embeddings {
                        raw.bytes.len() as u64
                    } else {
                        0
                    }
                } else {
                    (cfg.vocab_size * cfg.hidden_size) as u64 * f32s
                };
                (cfg, gguf.tensor_bytes() + table)
            }
        }
    };
    let positions = serving
        .context_length
        .unwrap_or(cfg.trained_context)
        .min(cfg.trained_context) as u64;
    let (hidden, vocab) = (cfg.hidden_size as u64, cfg.vocab_size as u64);
    let (heads, kv_heads, head_dim) = (cfg.heads as u64, cfg.kv_heads as u64, cfg.head_dim as u64);
    let intermediate = cfg.intermediate_size as u64;
    // Rotary tables hold cos and sin for every position.
    let weights = weights + positions * head_dim * f32s;
    let per_position = 2 * cfg.layers as u64 * kv_heads * head_dim * act;
    let cache = per_position * serving.kv_cache_tokens.max(positions as usize) as u64;
    let t = serving.batch_tokens as u64;
    // Per token of a pass: q/k/v and attention output, the MLP's gate, up
    // and product, the residual stream and norms; then logits per sequence.
    let scratch = t * ((2 * heads + 2 * kv_heads) * head_dim + 3 * intermediate + 6 * hidden) * act
        + serving.sequences as u64 * vocab * (f32s + act);
    Ok(Footprint {
        weights,
        cache,
        scratch,
    })
}

/// Estimates an embedding model (a Hugging Face folder) that packs up to
/// `batch_tokens` tokens per encoder pass. Weights are held as f32 (or as
/// two bf16 halves, the same bytes); the header check catches truncated files.
pub fn estimate_embedding(path: &Path, batch_tokens: usize) -> Result<Footprint> {
    let f32s = 4u64;
    let cfg = crate::bert::BertConfig::from_dir(path)?;
    let elements = folder_elements(path)?;
    let t = batch_tokens.max(cfg.max_positions()) as u64;
    let (hidden, inner) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    // Per packed token: the residual stream, q/k/v, context, the MLP's inner
    // activations and the bf16 copies of a product's input; plus one
    // sequence's attention scores per head task.
    let scratch = t * (3 * hidden + 3 * hidden + hidden + inner + 2 * inner) * f32s
        + cfg.max_positions() as u64 * 2 * hidden * f32s;
    Ok(Footprint {
        weights: elements * f32s,
        cache: 0,
        scratch,
    })
}

/// Elements of every tensor in a model folder's safetensors files (each
/// header checked against its file's size).
fn folder_elements(dir: &Path) -> Result<u64> {
    let mut elements = 0u64;
    for file in crate::llama::weight_files(dir)? {
        elements += safetensors_header(&file)?
            .iter()
            .map(|t| t.elements)
            .sum::<u64>();
    }
    Ok(elements)
}

/// A tensor as a safetensors header declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its name.
    pub name: String,
    /// Number of elements.
    pub elements: u64,
    /// Bytes of data.
    pub bytes: u64,
}

/// Bytes of tensor data a safetensors file declares, read from its header
/// alone (8-byte length, then JSON with each tensor's `data_offsets`).
pub fn safetensors_tensor_bytes(path: &Path) -> Result<u64> {
    Ok(safetensors_header(path)?.iter().map(|t| t.bytes).sum())
}

/// The tensors a safetensors file declares, read from its header alone;
/// fails if the file is shorter than the header says.
pub fn safetensors_header(path: &Path) -> Result<Vec<TensorInfo>> {
    let bad = |message: String| ModelError::BadFormat {
        path: path.to_path_buf(),
        format: "safetensors",
        message,
    };
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io)?;
    let header_len = u64::from_le_bytes(len);
    if header_len > 100 << 20 || 8 + header_len > file_len {
        return Err(bad(format!(
            "header length {header_len} does not fit the file"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let mut end = 0u64;
    let mut tensors = Vec::new();
    for (name, info) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)))
            .ok_or_else(|| bad(format!("tensor `{name}` has no valid data_offsets")))?;
        if offsets.1 < offsets.0 {
            return Err(bad(format!("tensor `{name}` ends before it starts")));
        }
        let elements = info
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|dims| dims.iter().filter_map(|d| d.as_u64()).product())
            .unwrap_or(0);
        tensors.push(TensorInfo {
            name: name.clone(),
            elements,
            bytes: offsets.1 - offsets.0,
        });
        end = end.max(offsets.1);
    }
    if 8 + header_len + end > file_len {
        return Err(bad(format!(
            "truncated: tensors need {} bytes, the file has {file_len}",
            8 + header_len + end
        )));
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_safetensors(dir: &Path, data_len: usize, declared: u64) -> std::path::PathBuf {
        let header = format!(
            "{{\"__metadata__\":{{\"format\":\"pt\"}},\"a\":{{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}},\"b\":{{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,{declared}]}}}}"
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend(vec![0u8; data_len]);
        let p = dir.join(format!("t-{data_len}-{declared}.safetensors"));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn safetensors_sizes_come_from_the_header() {
        let dir = std::env::temp_dir().join(format!("kindling-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            safetensors_tensor_bytes(&write_safetensors(&dir, 12, 12)).unwrap(),
            12
        );
        let e = safetensors_tensor_bytes(&write_safetensors(&dir, 10, 12)).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// How an image model will be run, for its estimate.
#[derive(Debug, Clone, Copy)]
pub struct ImageServing {
    /// Largest image side in pixels.
    pub max_side: usize,
    /// Images per UNet call.
    pub max_batch: usize,
    /// Bytes per element on a device (2 for bf16/f16); `None`: f32 on the CPU.
    pub device_element_bytes: Option<u64>,
}

/// Estimates a Stable Diffusion pipeline folder: every component's
/// weights widened to f32, plus the activations of one UNet call over the
/// largest batch (two rows per image for guidance) at the largest size —
/// dominated by the full attention maps of the highest-resolution
/// attention level — and one VAE decode.
pub fn estimate_image(dir: &Path, serving: ImageServing) -> Result<Footprint> {
    use crate::diffusion::config::{UNetConfig, VaeConfig};
    use crate::diffusion::layout::component_weights;
    let f32s = serving.device_element_bytes.unwrap_or(4);
    let mut elements = 0u64;
    for component in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        let sub = dir.join(component);
        if !sub.is_dir() {
            continue;
        }
        for file in component_weights(&sub)? {
            elements += safetensors_header(&file)?
                .iter()
                .map(|t| t.elements)
                .sum::<u64>();
        }
    }
    let unet = UNetConfig::read(&dir.join("unet/config.json"))?;
    let vae = VaeConfig::read(&dir.join("vae/config.json"))?;
    let latent = (serving.max_side / vae.scale_factor()).max(1) as u64;
    let rows = 2 * serving.max_batch.max(1) as u64;
    let mut positions = latent * latent;
    let mut attention = 0u64;
    let mut widest = 0u64;
    for block in &unet.blocks {
        if block.transformer_layers.is_some() {
            attention = attention.max(block.heads as u64 * positions * positions);
        }
        widest = widest.max(block.channels as u64 * positions);
        positions = (positions / 4).max(1);
    }
    // Softmax input and output, plus some twenty live feature maps (skip
    // connections included) per row.
    let unet_scratch = rows * (2 * attention + 24 * widest) * f32s;
    let side = serving.max_side as u64;
    let vae_channels = vae.block_out_channels.first().copied().unwrap_or(128) as u64;
    let vae_scratch = 6 * vae_channels * side * side * f32s;
    Ok(Footprint {
        weights: elements * f32s,
        cache: 0,
        scratch: unet_scratch + vae_scratch,
    })
}
