//! CLIP's byte-level BPE tokenizer, built from a pipeline's `tokenizer/`
//! files (`vocab.json`, `merges.txt`, `tokenizer_config.json`) the way
//! transformers' fast CLIP tokenizer is: NFC, collapsed whitespace,
//! lower case, CLIP's word pattern, bytes as unicode, `</w>` word ends.

use std::path::Path;

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::config::read_json;
use crate::error::{ModelError, Result};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A prompt as token rows of the encoder's fixed length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// `[bos] prompt [eos] pad…`, exactly `max_length` ids.
    pub ids: Vec<u32>,
    /// The prompt's own tokens before truncation (no bos/eos).
    pub prompt_tokens: usize,
}

/// A CLIP tokenizer with its fixed length and padding.
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
}

impl ClipTokenizer {
    /// Loads `dir` (a pipeline's `tokenizer/` folder); `max_positions`
    /// caps the length at what the text encoder can take.
    pub fn from_dir(dir: &Path, max_positions: usize) -> Result<Self> {
        let vocab: Value = read_json(&dir.join("vocab.json"))?;
        let merges_path = dir.join("merges.txt");
        let merges_text =
            std::fs::read_to_string(&merges_path).map_err(|source| ModelError::Io {
                path: merges_path,
                source,
            })?;
        let merges: Vec<String> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        let id_of = |tok: &str| -> Result<u32> {
            vocab
                .get(tok)
                .and_then(Value::as_u64)
                .map(|v| v as u32)
                .ok_or_else(|| ModelError::Tokenizer(format!("`{tok}` is not in vocab.json")))
        };
        let (bos, eos) = (id_of(BOS)?, id_of(EOS)?);
        let config: Value = read_json(&dir.join("tokenizer_config.json")).unwrap_or(Value::Null);
        let token_text = |key: &str| -> Option<String> {
            match config.get(key)? {
                Value::String(s) => Some(s.clone()),
                v => v.get("content").and_then(Value::as_str).map(str::to_string),
            }
        };
        let pad = match token_text("pad_token") {
            Some(p) => id_of(&p)?,
            None => eos,
        };
        let max_length = config
            .get("model_max_length")
            .and_then(Value::as_u64)
            .map_or(max_positions, |m| (m as usize).min(max_positions));
        let special = |id: u32, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": true, "special": true})
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(bos, BOS), special(eos, EOS)],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            "model": {"type": "BPE", "dropout": null, "unk_token": EOS,
                      "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        });
        let inner = Tokenizer::from_bytes(spec.to_string().as_bytes())
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", dir.display())))?;
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_length,
        })
    }

    /// Tokenizes `text` into one row: cut to fit, wrapped in bos/eos, padded.
    pub fn encode(&self, text: &str) -> Result<Tokens> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let body = enc.get_ids();
        let room = self.max_length.saturating_sub(2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend(body.iter().take(room));
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        Ok(Tokens {
            ids,
            prompt_tokens: body.len(),
        })
    }

    /// The fixed row length.
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}
