//! BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa) over packed batches:
//! the batch's tokens lie end to end with no padding, the dense layers run
//! once over all of them, and attention stays inside each sequence. Every
//! kernel computes a row on its own, so a sequence's hidden states are the
//! same, bit for bit, alone or in any batch.

mod config;

use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use kindling_kernels::activation::layer_norm;
use kindling_kernels::{encoder_attention_into, DenseMatrix, DenseScratch, Epilogue};

pub use config::{BertConfig, Positions};

use crate::error::{ModelError, Result};
use crate::llama::map_folder;

/// Layer-norm weight and bias.
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

struct Layer {
    qkv: DenseMatrix,
    attn_out: DenseMatrix,
    attn_norm: Norm,
    up: DenseMatrix,
    down: DenseMatrix,
    out_norm: Norm,
}

/// Buffers one forward pass reuses from the last (no fresh pages per pass).
#[derive(Default)]
struct Workspace {
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    y: Vec<f32>,
    inner: Vec<f32>,
    dense: DenseScratch,
}

/// A loaded encoder.
pub struct Bert {
    workspace: std::sync::Mutex<Workspace>,
    config: BertConfig,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    weight_bytes: usize,
}

/// Reads tensors by their checkpoint names, whatever prefix the
/// checkpoint uses (`bert.`, `roberta.`, none).
struct Weights {
    files: MmapedSafetensors,
    prefix: &'static str,
    dir: std::path::PathBuf,
}

impl Weights {
    fn open(dir: &Path) -> Result<Self> {
        let (files, names) = map_folder(dir)?;
        let prefix = ["", "bert.", "roberta.", "model."]
            .into_iter()
            .find(|p| names.contains(&format!("{p}embeddings.word_embeddings.weight")))
            .ok_or_else(|| ModelError::Tensor {
                name: "embeddings.word_embeddings.weight".into(),
                message: format!(
                    "not found in {} (is this a BERT checkpoint?)",
                    dir.display()
                ),
            })?;
        Ok(Self {
            files,
            prefix,
            dir: dir.to_path_buf(),
        })
    }

    /// A tensor as f32 values, checked against its expected element count.
    fn get(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let full = format!("{}{name}", self.prefix);
        let t = self
            .files
            .load(&full, &Device::Cpu)
            .map_err(|e| ModelError::Tensor {
                name: full.clone(),
                message: format!("cannot load from {}: {e}", self.dir.display()),
            })?;
        let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if values.len() != len {
            return Err(ModelError::Tensor {
                name: full,
                message: format!("expected {len} values, found {}", values.len()),
            });
        }
        Ok(values)
    }

    /// `name.weight`/`name.bias` (or the older `gamma`/`beta`).
    fn norm(&self, name: &str, width: usize) -> Result<Norm> {
        let has = |n: &str| {
            self.files
                .get(&format!("{}{name}.{n}", self.prefix))
                .is_ok()
        };
        let (g, b) = if has("weight") {
            ("weight", "bias")
        } else {
            ("gamma", "beta")
        };
        Ok(Norm {
            gamma: self.get(&format!("{name}.{g}"), width)?,
            beta: self.get(&format!("{name}.{b}"), width)?,
        })
    }

    /// A linear layer `[n, k]` with bias; several stacked along `n` become one.
    fn dense(&self, names: &[&str], n: usize, k: usize) -> Result<DenseMatrix> {
        let mut weight = Vec::with_capacity(names.len() * n * k);
        let mut bias = Vec::with_capacity(names.len() * n);
        for name in names {
            weight.extend(self.get(&format!("{name}.weight"), n * k)?);
            bias.extend(self.get(&format!("{name}.bias"), n)?);
        }
        Ok(DenseMatrix::new(&weight, Some(&bias), names.len() * n, k))
    }
}

impl Bert {
    /// Loads the encoder in the Hugging Face folder `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = BertConfig::from_dir(dir)?;
        let w = Weights::open(dir)?;
        let h = config.hidden_size;
        let word = w.get("embeddings.word_embeddings.weight", config.vocab_size * h)?;
        let position = w.get(
            "embeddings.position_embeddings.weight",
            config.max_position_embeddings * h,
        )?;
        let types = w.get(
            "embeddings.token_type_embeddings.weight",
            config.type_vocab_size * h,
        )?;
        let embed_norm = w.norm("embeddings.LayerNorm", h)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let (q, k, v) = (
                format!("{p}.attention.self.query"),
                format!("{p}.attention.self.key"),
                format!("{p}.attention.self.value"),
            );
            layers.push(Layer {
                qkv: w.dense(&[&q, &k, &v], h, h)?,
                attn_out: w.dense(&[&format!("{p}.attention.output.dense")], h, h)?,
                attn_norm: w.norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                up: w.dense(
                    &[&format!("{p}.intermediate.dense")],
                    config.intermediate_size,
                    h,
                )?,
                down: w.dense(&[&format!("{p}.output.dense")], h, config.intermediate_size)?,
                out_norm: w.norm(&format!("{p}.output.LayerNorm"), h)?,
            });
        }
        let mut weight_bytes = 4 * (word.len() + position.len() + h * 2);
        for l in &layers {
            weight_bytes += l.qkv.bytes() + l.attn_out.bytes() + l.up.bytes() + l.down.bytes();
            weight_bytes += 4 * 4 * h;
        }
        Ok(Self {
            workspace: Default::default(),
            token_type: types[..h].to_vec(),
            config,
            word,
            position,
            embed_norm,
            layers,
            weight_bytes,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Bytes the weights take in memory.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// The last hidden states of every sequence, packed end to end:
    /// `[Σ lengths, hidden]`. Sequences must be non-empty, within
    /// [`BertConfig::max_positions`], with ids below the vocabulary size.
    pub fn forward(&self, sequences: &[&[u32]]) -> Result<Vec<f32>> {
        let c = &self.config;
        let h = c.hidden_size;
        let mut spans = Vec::with_capacity(sequences.len());
        let mut tokens = 0;
        for s in sequences {
            if s.is_empty() || s.len() > c.max_positions() {
                return Err(ModelError::Tokenizer(format!(
                    "an input of {} tokens is outside 1..={}",
                    s.len(),
                    c.max_positions()
                )));
            }
            if let Some(&bad) = s.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(ModelError::Tokenizer(format!(
                    "token id {bad} is outside the vocabulary (0..{})",
                    c.vocab_size
                )));
            }
            spans.push((tokens, s.len()));
            tokens += s.len();
        }
        let mut x = vec![0.0f32; tokens * h];
        let first = c.first_position();
        for (s, &(start, _)) in sequences.iter().zip(&spans) {
            for (i, &t) in s.iter().enumerate() {
                let row = &mut x[(start + i) * h..(start + i + 1) * h];
                let word = &self.word[t as usize * h..(t as usize + 1) * h];
                let pos = &self.position[(first + i) * h..(first + i + 1) * h];
                for j in 0..h {
                    row[j] = word[j] + pos[j] + self.token_type[j];
                }
            }
        }
        let norm = |x: &mut [f32], n: &Norm| layer_norm(x, &n.gamma, &n.beta, c.layer_norm_eps);
        norm(&mut x, &self.embed_norm);
        // Scratch only: a panic mid-pass leaves nothing that matters behind.
        let mut guard = self
            .workspace
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Workspace {
            qkv,
            ctx,
            y,
            inner,
            dense,
        } = &mut *guard;
        for layer in &self.layers {
            layer
                .qkv
                .forward_into(&x, tokens, Epilogue::None, qkv, dense);
            encoder_attention_into(qkv, &spans, c.num_attention_heads, c.head_dim(), ctx);
            let residual = Epilogue::Residual(&x);
            layer.attn_out.forward_into(ctx, tokens, residual, y, dense);
            norm(y, &layer.attn_norm);
            layer
                .up
                .forward_into(y, tokens, Epilogue::Gelu, inner, dense);
            layer
                .down
                .forward_into(inner, tokens, Epilogue::Residual(y), &mut x, dense);
            norm(&mut x, &layer.out_norm);
        }
        Ok(x)
    }
}
