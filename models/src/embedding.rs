//! Sentence embeddings: a BERT-family encoder plus the post-processing a
//! sentence-transformers folder declares (`modules.json`: pooling from
//! `1_Pooling/config.json`, optional normalization; `max_seq_length` from
//! `sentence_bert_config.json`). A plain Hugging Face folder gets mean
//! pooling and L2 normalization.

use std::path::Path;

use serde::Deserialize;
use tokenizers::{PaddingParams, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::bert::Bert;
use crate::error::{ModelError, Result};

/// How token states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The average over the tokens.
    Mean,
    /// The first (`[CLS]`) token.
    Cls,
    /// The element-wise maximum.
    Max,
    /// The sum divided by √length.
    MeanSqrtLen,
    /// The last token.
    LastToken,
}

/// A text too long for the model, refused because truncation was off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLong {
    /// Its tokens.
    pub tokens: usize,
    /// The limit.
    pub limit: usize,
}

/// A loaded embedding model.
pub struct EmbeddingModel {
    bert: Bert,
    tokenizer: tokenizers::Tokenizer,
    pooling: Pooling,
    normalize: bool,
    max_tokens: usize,
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(Deserialize, Default)]
struct PoolingFile {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, format: &'static str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::BadFormat {
        path: path.to_path_buf(),
        format,
        message: e.to_string(),
    })
}

/// Pooling and normalization from `modules.json`, if the folder has one.
fn post_processing(dir: &Path) -> Result<(Pooling, bool)> {
    let modules_path = dir.join("modules.json");
    if !modules_path.exists() {
        return Ok((Pooling::Mean, true));
    }
    let modules: Vec<Module> = read_json(&modules_path, "modules.json")?;
    let mut pooling = None;
    let mut normalize = false;
    for m in &modules {
        let kind = m.kind.rsplit('.').next().unwrap_or(&m.kind);
        match kind {
            "Transformer" => {}
            "Normalize" => normalize = true,
            "Pooling" => {
                let file: PoolingFile = read_json(
                    &dir.join(&m.path).join("config.json"),
                    "pooling config.json",
                )?;
                let modes = [
                    (file.pooling_mode_mean_tokens, Pooling::Mean),
                    (file.pooling_mode_cls_token, Pooling::Cls),
                    (file.pooling_mode_max_tokens, Pooling::Max),
                    (file.pooling_mode_mean_sqrt_len_tokens, Pooling::MeanSqrtLen),
                    (file.pooling_mode_lasttoken, Pooling::LastToken),
                ];
                let on: Vec<Pooling> = modes.iter().filter(|m| m.0).map(|m| m.1).collect();
                if on.len() != 1 {
                    return Err(ModelError::BadFormat {
                        path: dir.join(&m.path).join("config.json"),
                        format: "pooling config.json",
                        message: format!(
                            "expected exactly one pooling mode, found {} (concatenated modes are not supported)",
                            on.len()
                        ),
                    });
                }
                pooling = Some(on[0]);
            }
            other => {
                return Err(ModelError::BadFormat {
                    path: modules_path.clone(),
                    format: "modules.json",
                    message: format!(
                        "module `{other}` is not supported (Transformer, Pooling and Normalize are)"
                    ),
                })
            }
        }
    }
    Ok((pooling.unwrap_or(Pooling::Mean), normalize))
}

impl EmbeddingModel {
    /// Loads the model folder `dir`: `config.json`, `*.safetensors`,
    /// `tokenizer.json` and the sentence-transformers files if present.
    pub fn load(dir: &Path) -> Result<Self> {
        let bert = Bert::load(dir)?;
        let (pooling, normalize) = post_processing(dir)?;
        let st_config = dir.join("sentence_bert_config.json");
        let declared = if st_config.exists() {
            read_json::<serde_json::Value>(&st_config, "sentence_bert_config.json")?
                .get("max_seq_length")
                .and_then(serde_json::Value::as_u64)
                .map(|v| v as usize)
        } else {
            None
        };
        let max_tokens = declared
            .unwrap_or(usize::MAX)
            .min(bert.config().max_positions());
        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
        // The folder's own padding and truncation are for fixed-shape
        // batches; here each input keeps its length, cut at `max_tokens`.
        tokenizer.with_padding(None::<PaddingParams>);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(Self {
            bert,
            tokenizer,
            pooling,
            normalize,
            max_tokens,
        })
    }

    /// Width of the embeddings.
    pub fn dimensions(&self) -> usize {
        self.bert.config().hidden_size
    }

    /// The longest input in tokens; longer texts are cut to it.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Vocabulary size (token ids must be below it).
    pub fn vocab_size(&self) -> usize {
        self.bert.config().vocab_size
    }

    /// The pooling the model uses.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Whether embeddings come out L2-normalized.
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// Bytes the weights take in memory.
    pub fn weight_bytes(&self) -> usize {
        self.bert.weight_bytes()
    }

    /// The dense-kernel family in use (`Amx`, `Avx512`, `Avx2`, `Reference`).
    pub fn kernels(&self) -> &'static str {
        match kindling_kernels::dense_isa() {
            kindling_kernels::DenseIsa::Amx => "amx-bf16x3",
            kindling_kernels::DenseIsa::Avx512 => "avx512",
            kindling_kernels::DenseIsa::Avx2 => "avx2",
            kindling_kernels::DenseIsa::Reference => "reference",
        }
    }

    /// Token ids of `text` with the model's special tokens, cut at
    /// [`Self::max_tokens`] unless `truncate` is false, when a longer text
    /// is refused.
    pub fn tokenize(
        &self,
        text: &str,
        truncate: bool,
    ) -> Result<std::result::Result<Vec<u32>, TooLong>> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        if !truncate && !encoding.get_overflowing().is_empty() {
            let extra: usize = encoding
                .get_overflowing()
                .iter()
                .map(|o| o.get_ids().len())
                .sum();
            return Ok(Err(TooLong {
                tokens: encoding.get_ids().len() + extra,
                limit: self.max_tokens,
            }));
        }
        Ok(Ok(encoding.get_ids().to_vec()))
    }

    /// One embedding per input (token ids as [`Self::tokenize`] gives them).
    pub fn embed(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        if let Some(long) = inputs.iter().find(|i| i.len() > self.max_tokens) {
            return Err(ModelError::Tokenizer(format!(
                "an input of {} tokens is over the model's limit of {}",
                long.len(),
                self.max_tokens
            )));
        }
        let states = crate::in_pool(|| self.bert.forward(inputs))?;
        let h = self.dimensions();
        let mut out = Vec::with_capacity(inputs.len());
        let mut start = 0;
        for input in inputs {
            let rows = &states[start * h..(start + input.len()) * h];
            start += input.len();
            out.push(self.pool(rows, input.len()));
        }
        Ok(out)
    }

    fn pool(&self, rows: &[f32], len: usize) -> Vec<f32> {
        let h = self.dimensions();
        let mut v = match self.pooling {
            Pooling::Cls => rows[..h].to_vec(),
            Pooling::LastToken => rows[(len - 1) * h..].to_vec(),
            Pooling::Max => {
                let mut m = rows[..h].to_vec();
                for row in rows.chunks(h).skip(1) {
                    for (m, &x) in m.iter_mut().zip(row) {
                        *m = m.max(x);
                    }
                }
                m
            }
            Pooling::Mean | Pooling::MeanSqrtLen => {
                let mut s = vec![0.0f32; h];
                for row in rows.chunks(h) {
                    for (s, &x) in s.iter_mut().zip(row) {
                        *s += x;
                    }
                }
                let d = if self.pooling == Pooling::Mean {
                    len as f32
                } else {
                    (len as f32).sqrt()
                };
                s.iter_mut().for_each(|x| *x /= d);
                s
            }
        };
        if self.normalize {
            normalize(&mut v);
        }
        v
    }
}

/// Scales `v` to unit L2 norm (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm.max(1e-12));
    }
}
