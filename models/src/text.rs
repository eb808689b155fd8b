//! A loaded text-generation model: weights, tokenizer and chat template
//! together, plus the streaming helpers generation needs (incremental
//! detokenization and stop-sequence matching).

use std::path::Path;

use candle_core::Device;

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::SequenceCache;
use crate::llama::Llama;
use crate::tokenizer::Tokenizer;

/// A text model ready to generate.
pub struct TextModel {
    /// The network.
    pub model: Llama,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    weight_bytes: u64,
}

impl TextModel {
    /// Loads a GGUF model onto `device`; `context_length` caps the positions
    /// a sequence may use (default: the trained context).
    pub fn load_gguf(path: &Path, context_length: Option<usize>, device: &Device) -> Result<Self> {
        let mut gguf = GgufFile::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let template = if gguf.has("tokenizer.chat_template") {
            let src = gguf.string("tokenizer.chat_template")?;
            Some(ChatTemplate::new(
                &src,
                tokenizer.bos_text(),
                tokenizer.eos_text(),
            )?)
        } else {
            None
        };
        let model = Llama::from_gguf(&mut gguf, context_length.unwrap_or(usize::MAX), device)?;
        Ok(Self {
            weight_bytes: gguf.tensor_bytes(),
            model,
            tokenizer,
            template,
        })
    }

    /// Renders a conversation with the model's chat template, opening the
    /// assistant's turn.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        match &self.template {
            Some(t) => t.render(messages, true),
            None => Err(ModelError::Template(
                "the model has no chat template; use /v1/completions".into(),
            )),
        }
    }

    /// Runs `tokens` after those in `cache` and returns the next-token logits.
    pub fn forward(&self, tokens: &[u32], cache: &mut SequenceCache) -> Result<Vec<f32>> {
        Ok(self.model.forward(tokens, cache)?.to_vec1()?)
    }

    /// A fresh cache for one sequence.
    pub fn new_cache(&self) -> SequenceCache {
        self.model.new_cache()
    }

    /// Positions one sequence may hold.
    pub fn max_positions(&self) -> usize {
        self.model.max_positions()
    }

    /// Bytes of weights as stored in the file.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }
}

/// Turns a stream of token ids into text pieces, holding back bytes until
/// they form whole UTF-8 characters.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// Adds `id` and returns the text it completes (often empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = tokenizer.decode(&self.ids[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let piece = after.get(before.len()..).unwrap_or_default().to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }
}

/// What [`StopMatcher::push`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text that can be sent now (may be empty while a possible stop is pending).
    Continue(String),
    /// A stop sequence matched: the text before it, which ends the output.
    Stopped(String),
}

/// Finds stop sequences across token boundaries, never releasing text that
/// could turn out to be the start of one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// Matches any of `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds generated text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.pending.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.pending.truncate(at);
            return StopOutcome::Stopped(std::mem::take(&mut self.pending));
        }
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len())
                    .rev()
                    .filter(|&k| s.is_char_boundary(k))
                    .find(|&k| self.pending.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let ready = self.pending.len() - hold;
        let rest = self.pending.split_off(ready);
        StopOutcome::Continue(std::mem::replace(&mut self.pending, rest))
    }

    /// Releases whatever is held back, at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> StopMatcher {
        StopMatcher::new(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn stop_sequence_split_across_pieces_is_caught() {
        let mut m = stops(&["END"]);
        assert_eq!(m.push("abc E"), StopOutcome::Continue("abc ".into()));
        assert_eq!(m.push("N"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("Dxyz"), StopOutcome::Stopped("".into()));
    }

    #[test]
    fn false_start_is_released() {
        let mut m = stops(&["END"]);
        assert_eq!(m.push("E"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("x"), StopOutcome::Continue("Ex".into()));
        assert_eq!(m.push("EN"), StopOutcome::Continue(String::new()));
        assert_eq!(m.flush(), "EN");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = stops(&["world", "lo"]);
        assert_eq!(m.push("hello world"), StopOutcome::Stopped("hel".into()));
    }

    #[test]
    fn multibyte_stop_prefixes_are_held_on_char_boundaries() {
        let mut m = stops(&["é!"]);
        assert_eq!(m.push("café"), StopOutcome::Continue("caf".into()));
        assert_eq!(m.push("!"), StopOutcome::Stopped(String::new()));
    }
}
