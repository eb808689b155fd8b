//! Tokenizers built from GGUF metadata: vocabulary, merges or scores, token
//! types and special tokens all come from the weight file, no side files.
//! Byte-level BPE (`gpt2`) and SentencePiece (`llama`, in [`spm`]).

use std::collections::HashSet;
use std::path::Path;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

mod spm;

/// GGUF token types (`tokenizer.ggml.token_type`).
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// Control tokens that end a turn in the chat formats we know.
const END_OF_GENERATION: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Fill-in-the-middle markers, control tokens whatever type a GGUF gives
/// them (as llama.cpp reads them; so are the end-of-generation tokens).
const FILL_IN_THE_MIDDLE: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "[PAD]",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE tokenizer with the model's special tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    token_bytes: Vec<Vec<u8>>,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
    add_bos: bool,
    end_of_generation: Vec<u32>,
    /// Control tokens (sorted): never produced by text, only by id.
    control: Vec<u32>,
}

impl Tokenizer {
    /// Builds the tokenizer that `gguf` describes.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.string("tokenizer.ggml.model")?;
        let tokens = gguf.strings("tokenizer.ggml.tokens")?;
        let types = if gguf.has("tokenizer.ggml.token_type") {
            gguf.i32s("tokenizer.ggml.token_type")?
        } else {
            vec![1; tokens.len()]
        };
        // Tokens that look like end-of-turn or fill-in-the-middle markers
        // are control tokens even where the file types them as text.
        let types: Vec<i32> = types
            .into_iter()
            .zip(&tokens)
            .map(|(ty, t)| {
                let t = t.as_str();
                if END_OF_GENERATION.contains(&t) || FILL_IN_THE_MIDDLE.contains(&t) {
                    TOKEN_CONTROL
                } else {
                    ty
                }
            })
            .collect();
        let byte_level = match model.as_str() {
            "gpt2" => true,
            "llama" => false,
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "tokenizer model `{other}` is not supported (byte-level BPE `gpt2` and \
                     SentencePiece `llama` are)"
                )))
            }
        };
        let mut inner = if byte_level {
            byte_level_bpe(gguf, &tokens)?
        } else {
            let add_space_prefix = gguf
                .opt_bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(true);
            let scores = gguf.f32s("tokenizer.ggml.scores")?;
            spm::build(&tokens, &scores, &types, add_space_prefix)?
        };

        let name = if gguf.has("general.name") {
            gguf.string("general.name")?.to_lowercase()
        } else {
            String::new()
        };
        let phi3 = name.contains("phi-3") || name.contains("phi3");
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, ty)| matches!(**ty, TOKEN_UNKNOWN | TOKEN_CONTROL | TOKEN_USER_DEFINED))
            .map(|(t, ty)| {
                let token = AddedToken::from(t.clone(), *ty != TOKEN_USER_DEFINED);
                // Phi-3's special tokens swallow the whitespace after them,
                // as in its Hugging Face tokenizer (llama.cpp knows the
                // model by its name).
                let keeps = matches!(t.as_str(), "<unk>" | "<s>" | "<|endoftext|>");
                token.rstrip(phi3 && !keeps)
            })
            .collect();
        inner.add_special_tokens(&specials);

        let special_id = |key: &str| -> Result<Option<(u32, String)>> {
            Ok(match gguf.opt_u32(key)? {
                Some(id) => tokens.get(id as usize).map(|t| (id, t.clone())),
                None => None,
            })
        };
        let bos = special_id("tokenizer.ggml.bos_token_id")?;
        let eos = special_id("tokenizer.ggml.eos_token_id")?;
        let mut end_of_generation: Vec<u32> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, ty))| **ty == TOKEN_CONTROL && END_OF_GENERATION.contains(&t.as_str()))
            .map(|(i, _)| i as u32)
            .collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some((id, _)) = special_id(key)? {
                end_of_generation.push(id);
            }
        }
        end_of_generation.extend(eos.as_ref().map(|(id, _)| *id));
        end_of_generation.sort_unstable();
        end_of_generation.dedup();

        let control = types
            .iter()
            .enumerate()
            .filter(|(_, ty)| **ty == TOKEN_CONTROL)
            .map(|(i, _)| i as u32)
            .collect();
        let token_bytes = tokens
            .iter()
            .zip(&types)
            .map(|(t, ty)| {
                if matches!(*ty, TOKEN_CONTROL | TOKEN_USER_DEFINED) {
                    t.as_bytes().to_vec()
                } else if byte_level {
                    byte_level_bytes(t)
                } else {
                    sentencepiece_bytes(t)
                }
            })
            .collect();
        Ok(Self {
            inner,
            token_bytes,
            bos,
            eos,
            // llama.cpp's default: SentencePiece vocabularies add BOS.
            add_bos: gguf
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(!byte_level),
            end_of_generation,
            control,
        })
    }

    /// Builds the tokenizer of a Hugging Face model folder from its
    /// `tokenizer.json`, with special tokens from `tokenizer_config.json`
    /// and end-of-generation ids from `generation_config.json`. Also returns
    /// the chat template that `tokenizer_config.json` carries, if any.
    pub fn from_hf_dir(dir: &Path) -> Result<(Self, Option<String>)> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let generation = read_json(&dir.join("generation_config.json"))?;
        let byte_level = matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        let specials: HashSet<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        let vocab = inner.get_vocab_size(true);
        let token_bytes: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                let t = inner.id_to_token(id).unwrap_or_default();
                if specials.contains(&id) {
                    t.into_bytes()
                } else if byte_level {
                    byte_level_bytes(&t)
                } else {
                    sentencepiece_bytes(&t)
                }
            })
            .collect();
        let special = |key: &str| -> Option<(u32, String)> {
            let v = config.get(key)?;
            let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
            Some((inner.token_to_id(text)?, text.to_string()))
        };
        let bos = special("bos_token");
        let eos = special("eos_token");
        let add_bos = match config
            .get("add_bos_token")
            .and_then(serde_json::Value::as_bool)
        {
            Some(b) => b,
            // Llama 3 style: the post-processor adds BOS.
            None => match (&bos, inner.encode_fast("a", true)) {
                (Some((b, _)), Ok(enc)) => enc.get_ids().first() == Some(b),
                _ => false,
            },
        };
        let mut end_of_generation: Vec<u32> = specials
            .iter()
            .copied()
            .filter(|id| {
                inner
                    .id_to_token(*id)
                    .is_some_and(|t| END_OF_GENERATION.contains(&t.as_str()))
            })
            .collect();
        end_of_generation.extend(eos.as_ref().map(|(id, _)| *id));
        match generation.get("eos_token_id") {
            Some(serde_json::Value::Array(ids)) => {
                end_of_generation.extend(ids.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
            }
            Some(v) => end_of_generation.extend(v.as_u64().map(|v| v as u32)),
            None => {}
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        let template = match config.get("chat_template") {
            Some(serde_json::Value::String(t)) => Some(t.clone()),
            // A list of named templates: take the default one.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let mut control: Vec<u32> = specials.into_iter().collect();
        control.sort_unstable();
        let tokenizer = Self {
            inner,
            token_bytes,
            bos,
            eos,
            add_bos,
            end_of_generation,
            control,
        };
        Ok((tokenizer, template))
    }

    /// The tokenizer as `tokenizer.json` text (the Hugging Face format), for
    /// exporting a GGUF model's tokenizer.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Tokenizes `text`, reading special tokens written in it (as chat
    /// templates produce them), and adds BOS when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if let Some((bos, _)) = &self.bos {
            if self.add_bos && ids.first() != Some(bos) {
                ids.insert(0, *bos);
            }
        }
        Ok(ids)
    }

    /// Text of `ids`, leaving out control tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The raw bytes one token stands for (control tokens: their text).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// The tokens that end a sequence (sorted).
    pub fn end_of_generation(&self) -> &[u32] {
        &self.end_of_generation
    }

    /// The Hugging Face tokenizer inside.
    pub(crate) fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Whether `id` is a control token (`<|im_end|>`, `[TOOL_CALLS]`, …):
    /// text never encodes to it, and decoding leaves it out.
    pub fn is_control(&self, id: u32) -> bool {
        self.control.binary_search(&id).is_ok()
    }

    /// The id of the control token written `text`, if there is one.
    pub fn control_id(&self, text: &str) -> Option<u32> {
        self.inner
            .token_to_id(text)
            .filter(|id| self.is_control(*id))
    }

    /// Splits `text` into tokens without adding BOS (for constrained
    /// decoding, which tokenizes the text a grammar forces).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Whether generating `id` ends the sequence.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// The beginning-of-sequence token's text, for chat templates.
    pub fn bos_text(&self) -> &str {
        self.bos.as_ref().map_or("", |(_, t)| t)
    }

    /// The end-of-sequence token's text, for chat templates.
    pub fn eos_text(&self) -> &str {
        self.eos.as_ref().map_or("", |(_, t)| t)
    }

    /// Whether encoding adds the beginning-of-sequence token.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }
}

/// GPT-2-style byte-level BPE from the vocabulary, merges and
/// pre-tokenizer named in `gguf`.
fn byte_level_bpe(gguf: &GgufFile, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    let merges = gguf
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| ModelError::Tokenizer(format!("malformed merge `{m}`")))
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let pre = if gguf.has("tokenizer.ggml.pre") {
        gguf.string("tokenizer.ggml.pre")?
    } else {
        "default".to_string()
    };
    // Llama 3's vocabulary takes a piece that is a token as that token,
    // whatever the merges would make of it (llama.cpp's `ignore_merges`).
    let ignore_merges = LLAMA3_PRE.contains(&pre.as_str());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer(&pre)?));
    inner.with_decoder(Some(ByteLevel::default()));
    Ok(inner)
}

/// The `tokenizer.ggml.pre` names of Llama 3's pre-tokenizer.
const LLAMA3_PRE: [&str; 3] = ["llama-bpe", "llama3", "smaug-bpe"];

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        let pattern = SplitPattern::Regex(re.to_string());
        let split = Split::new(pattern, SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(Sequence::new(vec![split.into(), byte_level(false).into()]).into())
    };
    match pre {
        // GPT-2's split, with every digit a token of its own.
        "smollm" | "starcoder" | "refact" => {
            Ok(Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into())
        }
        p if LLAMA3_PRE.contains(&p) => split(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2_SPLIT),
        "gpt2" | "gpt-2" | "default" => Ok(byte_level(true).into()),
        other => Err(ModelError::Tokenizer(format!(
            "pre-tokenizer `{other}` is not supported (smollm, llama-bpe, qwen2, gpt2 are)"
        ))),
    }
}

/// A JSON side file of a model folder; a missing file reads as `{}`.
fn read_json(path: &Path) -> Result<serde_json::Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(serde_json::json!({})),
        Err(source) => Err(ModelError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// SentencePiece pieces: `▁` stands for a space, `<0xNN>` for a raw byte.
fn sentencepiece_bytes(token: &str) -> Vec<u8> {
    if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return vec![b];
        }
    }
    token.replace('\u{2581}', " ").into_bytes()
}

/// Undoes GPT-2's byte-to-unicode mapping: printable bytes map to themselves,
/// the rest to U+0100 onwards in byte order.
pub(crate) fn byte_level_bytes(token: &str) -> Vec<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let shifted: Vec<u8> = (0u32..=255)
        .filter(|b| !printable(*b))
        .map(|b| b as u8)
        .collect();
    token
        .chars()
        .flat_map(|c| {
            let c = c as u32;
            if printable(c) {
                vec![c as u8]
            } else if let Some(b) = c.checked_sub(256).and_then(|i| shifted.get(i as usize)) {
                vec![*b]
            } else {
                // Not a byte-level symbol: keep its UTF-8 form.
                char::from_u32(c).map_or_else(Vec::new, |ch| ch.to_string().into_bytes())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::byte_level_bytes;

    #[test]
    fn byte_level_symbols_map_back_to_bytes() {
        assert_eq!(byte_level_bytes("Ġhello"), b" hello");
        assert_eq!(byte_level_bytes("Ċ"), b"\n");
        // "é" is two UTF-8 bytes, written as two byte-level symbols.
        assert_eq!(byte_level_bytes("Ã©"), "é".as_bytes());
    }
}
