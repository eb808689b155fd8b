//! A loaded text-generation model: weights, tokenizer and chat template
//! together, plus the streaming helpers generation needs (incremental
//! detokenization and stop-sequence matching).

use std::path::Path;

use candle_core::{DType, Device};

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::{CacheShape, KvCache};
use crate::llama::{BatchItem, DeviceLlama, Llama};
use crate::tokenizer::Tokenizer;

/// Where a model's weights live and run.
pub enum Network {
    /// Host memory, our CPU kernels (f32 and quantized weights).
    Host(Llama),
    /// A device (a CUDA GPU) in bf16/f16/f32, the fused ops.
    Device(DeviceLlama),
}

/// Where to load a text model.
#[derive(Debug, Clone)]
pub enum Placement {
    /// The CPU path.
    Host,
    /// A device, with the float type of weights, activations and cache.
    Device(Device, DType),
}

/// A text model ready to generate.
pub struct TextModel {
    /// The network.
    pub model: Network,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    weight_bytes: u64,
}

impl TextModel {
    /// Loads a model from a GGUF file or a Hugging Face folder
    /// (`config.json`, `tokenizer.json`, `*.safetensors`); `context_length`
    /// caps the positions a sequence may use (default: the trained context).
    pub fn load(path: &Path, context_length: Option<usize>) -> Result<Self> {
        Self::load_on(path, context_length, &Placement::Host)
    }

    /// Loads a model onto `placement`.
    pub fn load_on(
        path: &Path,
        context_length: Option<usize>,
        placement: &Placement,
    ) -> Result<Self> {
        if path.is_dir() {
            Self::load_safetensors(path, context_length, placement)
        } else {
            Self::load_gguf(path, context_length, placement)
        }
    }

    fn load_gguf(
        path: &Path,
        context_length: Option<usize>,
        placement: &Placement,
    ) -> Result<Self> {
        let mut gguf = GgufFile::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let template = if gguf.has("tokenizer.chat_template") {
            Some(gguf.string("tokenizer.chat_template")?)
        } else {
            None
        };
        let positions = context_length.unwrap_or(usize::MAX);
        let model = match placement {
            Placement::Host => Network::Host(Llama::from_gguf(&mut gguf, positions)?),
            Placement::Device(d, t) => {
                Network::Device(DeviceLlama::from_gguf(&mut gguf, positions, d, *t)?)
            }
        };
        Self::assemble(model, tokenizer, template, gguf.tensor_bytes())
    }

    fn load_safetensors(
        dir: &Path,
        context_length: Option<usize>,
        placement: &Placement,
    ) -> Result<Self> {
        let (tokenizer, template) = Tokenizer::from_hf_dir(dir)?;
        let positions = context_length.unwrap_or(usize::MAX);
        let model = match placement {
            Placement::Host => Network::Host(Llama::from_safetensors(dir, positions)?),
            Placement::Device(d, t) => {
                Network::Device(DeviceLlama::from_safetensors(dir, positions, d, *t)?)
            }
        };
        let mut bytes = 0;
        for file in crate::llama::weight_files(dir)? {
            bytes += std::fs::metadata(&file)
                .map_err(|source| ModelError::Io { path: file, source })?
                .len();
        }
        Self::assemble(model, tokenizer, template, bytes)
    }

    fn assemble(
        model: Network,
        tokenizer: Tokenizer,
        template: Option<String>,
        weight_bytes: u64,
    ) -> Result<Self> {
        let template = template
            .map(|src| ChatTemplate::new(&src, tokenizer.bos_text(), tokenizer.eos_text()))
            .transpose()?;
        Ok(Self {
            model,
            tokenizer,
            template,
            weight_bytes,
        })
    }

    /// Renders a conversation with the model's chat template, opening the
    /// assistant's turn.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        self.render_chat_with_tools(messages, &[], self.tool_format())
    }

    /// Renders a conversation that may offer `tools` and carry tool calls
    /// and results, for a model that writes calls in `format`.
    pub fn render_chat_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[crate::tools::Tool],
        format: crate::tools::ToolFormat,
    ) -> Result<String> {
        let (messages, tools) = crate::tools::prepare_messages(messages, tools, format);
        match &self.template {
            Some(t) => t.render_with_tools(&messages, tools.as_deref(), true),
            None => Err(ModelError::Template(
                "the model has no chat template; use /v1/completions".into(),
            )),
        }
    }

    /// How the model writes tool calls, as its chat template shows.
    pub fn tool_format(&self) -> crate::tools::ToolFormat {
        self.template
            .as_ref()
            .map_or(crate::tools::ToolFormat::Generic, |t| t.tool_format())
    }

    /// Runs one batched forward pass (see [`Llama::forward`]). On the CPU
    /// the whole pass runs on one of the thread pool's workers (see
    /// [`crate::in_pool`]).
    pub fn forward(&self, batch: &[BatchItem<'_>], cache: &mut KvCache) -> Result<Vec<Vec<f32>>> {
        match &self.model {
            Network::Host(m) => crate::in_pool(|| m.forward(batch, cache)),
            Network::Device(m) => m.forward(batch, cache),
        }
    }

    /// The KV cache shape the model needs.
    pub fn cache_shape(&self) -> CacheShape {
        let cfg = self.config();
        CacheShape {
            layers: cfg.layers,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
        }
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &crate::llama::LlamaConfig {
        match &self.model {
            Network::Host(m) => m.config(),
            Network::Device(m) => m.config(),
        }
    }

    /// A KV cache pool of `blocks` blocks where the model runs.
    pub fn new_cache(&self, blocks: usize) -> Result<KvCache> {
        match &self.model {
            Network::Host(_) => Ok(KvCache::new(self.cache_shape(), blocks)),
            Network::Device(m) => {
                KvCache::on_device(self.cache_shape(), blocks, m.device(), m.dtype())
            }
        }
    }

    /// Where the model runs ("cpu", or the device and dtype).
    pub fn placement(&self) -> String {
        match &self.model {
            Network::Host(_) => "cpu".into(),
            Network::Device(m) => format!("{:?} {:?}", m.device().location(), m.dtype()),
        }
    }

    /// Positions one sequence may hold.
    pub fn max_positions(&self) -> usize {
        match &self.model {
            Network::Host(m) => m.max_positions(),
            Network::Device(m) => m.max_positions(),
        }
    }

    /// Bytes of weights as stored in the files.
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
