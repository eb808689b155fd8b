//! What a text generation request is, once validated, and what the worker
//! reports back while serving it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use kindling_models::tools::Tool;
use kindling_models::{ChatMessage, Grammar, SamplingParams};
use tokio::sync::mpsc;

use super::shell::Wake;
use super::EngineError;

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Raw text, tokenized as is.
    Text(String),
    /// Token ids, used as is.
    Tokens(Vec<u32>),
}

/// Most choices one request may make, over all its prompts.
pub const MAX_CHOICES: usize = 128;
/// Most stop sequences.
pub const MAX_STOP: usize = 4;

/// A generation request as the client shaped it, its values already parsed
/// and range-checked at the edge; [`GenerateSpec::validate`] checks it as a
/// whole.
#[derive(Debug, Clone)]
pub struct GenerateSpec {
    /// The inputs: one for chat, one or more for text completions. Choice
    /// `i` of prompt `p` is numbered `p * n + i`.
    pub prompts: Vec<Prompt>,
    /// Most tokens to generate per choice, as the client asked; prompt plus
    /// this must fit the context. `None` = up to the context length.
    pub max_tokens: Option<usize>,
    /// A default limit for when the client named none; unlike `max_tokens`
    /// it shrinks to fit the context instead of failing the request.
    pub default_max_tokens: Option<usize>,
    /// Stop sequences; the output ends before the first one.
    pub stop: Vec<String>,
    /// Choices to generate from each prompt.
    pub n: usize,
    /// Sampling parameters of choice 0; choice `i` uses seed `seed + i`.
    pub sampling: SamplingParams,
    /// Prefix each choice's text with the prompt text (legacy completions `echo`).
    pub echo: bool,
    /// Keep generating past end-of-turn tokens (benchmarks, fixed-length tests).
    pub ignore_eos: bool,
    /// Tokens each choice generates before an end-of-turn token may end it.
    pub min_tokens: usize,
    /// Functions the model may call (chat only).
    pub tools: Option<ToolUse>,
    /// What every choice's output must match (structured outputs).
    pub constraint: Option<OutputConstraint>,
    /// Prefix-cache salt (vLLM's `cache_salt`): cached blocks are shared
    /// only between requests with the same salt.
    pub cache_salt: Option<String>,
    /// Prompt-lookup speculative decoding: draft tokens per step (0 = off).
    pub prompt_lookup: usize,
}

/// The tools offered to a chat request and how the model may use them.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolUse {
    /// The functions.
    pub tools: Vec<Tool>,
    /// Whether and which to call.
    pub choice: ToolChoice,
    /// Whether one turn may make several calls.
    pub parallel: bool,
}

/// OpenAI's `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The tools are shown to the model, but its text is not read for calls.
    None,
    /// The model decides; its calls are read from its text.
    Auto,
    /// At least one call, decoded under a grammar so it is valid.
    Required,
    /// A call of this function, decoded under a grammar.
    Named(String),
}

/// A grammar the output must match and the request field it came from
/// (named in the error if the grammar does not compile).
#[derive(Debug, Clone, PartialEq)]
pub struct OutputConstraint {
    /// The grammar.
    pub grammar: Grammar,
    /// The field, e.g. `response_format`.
    pub param: &'static str,
}

/// A generation request the engine trusts: made only by
/// [`GenerateSpec::validate`]. The worker re-checks only what depends on
/// the loaded model (vocabulary, context length, the tokenized prompt).
#[derive(Debug, Clone)]
pub struct ValidGenerate {
    pub(super) spec: GenerateSpec,
    /// When the request must be done by; past it, it fails and frees its slot.
    pub(super) deadline: Option<Instant>,
    /// The API key's name: the batch and the queue are shared fairly
    /// between keys.
    pub(super) tenant: Option<Arc<str>>,
}

fn invalid(param: &'static str, message: String) -> EngineError {
    EngineError::InvalidInput { param, message }
}

impl GenerateSpec {
    /// Checks the request as a whole: at least one prompt and one choice,
    /// at most [`MAX_CHOICES`] choices in all, `max_tokens` at least 1, at
    /// most [`MAX_STOP`] stop sequences and none empty, no empty token list
    /// or conversation.
    pub fn validate(self) -> Result<ValidGenerate, EngineError> {
        let (prompts, n) = (self.prompts.len(), self.n);
        if prompts == 0 {
            return Err(invalid("prompt", "at least one prompt is needed".into()));
        }
        if n == 0 || prompts.saturating_mul(n) > MAX_CHOICES {
            let message = if prompts == 1 {
                format!("`n` must be between 1 and {MAX_CHOICES}, got {n}")
            } else {
                format!("{prompts} prompts × n = {n} asks for more than {MAX_CHOICES} choices")
            };
            return Err(invalid("n", message));
        }
        if self.max_tokens == Some(0) {
            return Err(invalid(
                "max_tokens",
                "`max_tokens` must be at least 1, got 0".into(),
            ));
        }
        if let Some(max) = self.max_tokens.filter(|m| self.min_tokens > *m) {
            return Err(invalid(
                "min_tokens",
                format!(
                    "`min_tokens` ({}) must not exceed `max_tokens` ({max})",
                    self.min_tokens
                ),
            ));
        }
        if let Some(tools) = &self.tools {
            check_tools(tools, self.constraint.as_ref())?;
        }
        if self.stop.len() > MAX_STOP {
            let message = format!(
                "at most {MAX_STOP} stop sequences are allowed, got {}",
                self.stop.len()
            );
            return Err(invalid("stop", message));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(invalid("stop", "stop sequences must not be empty".into()));
        }
        for prompt in &self.prompts {
            match prompt {
                Prompt::Tokens(ids) if ids.is_empty() => {
                    return Err(invalid("prompt", "the prompt is empty".into()))
                }
                Prompt::Chat(messages) if messages.is_empty() => {
                    return Err(invalid(
                        "messages",
                        "`messages` must contain at least one message".into(),
                    ))
                }
                _ => {}
            }
        }
        Ok(ValidGenerate {
            spec: self,
            deadline: None,
            tenant: None,
        })
    }
}

fn check_tools(tools: &ToolUse, constraint: Option<&OutputConstraint>) -> Result<(), EngineError> {
    let forced = matches!(tools.choice, ToolChoice::Required | ToolChoice::Named(_));
    if tools.tools.is_empty() && forced {
        return Err(invalid(
            "tool_choice",
            "`tool_choice` asks for a call but `tools` is empty".into(),
        ));
    }
    if let ToolChoice::Named(name) = &tools.choice {
        if !tools.tools.iter().any(|t| &t.name == name) {
            return Err(invalid(
                "tool_choice",
                format!("`tool_choice` names `{name}`, which is not in `tools`"),
            ));
        }
    }
    if let Some(c) = constraint.filter(|_| forced) {
        return Err(invalid(
            c.param,
            format!(
                "`{}` cannot be combined with a `tool_choice` that forces a call",
                c.param
            ),
        ));
    }
    Ok(())
}

impl ValidGenerate {
    /// Sets when the request must be done by.
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    /// Sets the API key the request is charged to.
    pub fn with_tenant(mut self, tenant: Option<Arc<str>>) -> Self {
        self.tenant = tenant;
        self
    }

    /// Choices over all prompts.
    pub fn choices(&self) -> usize {
        self.spec.n * self.spec.prompts.len()
    }
}

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-turn token or stop sequence.
    Stop,
    /// `max_tokens` or the context length reached.
    Length,
    /// The model called tools.
    ToolCalls,
}

/// A tool call a choice made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallEvent {
    /// Its place among the choice's calls (0, 1, …).
    pub position: usize,
    /// Its id (`call_…`).
    pub id: String,
    /// The function.
    pub name: String,
    /// The arguments: a JSON object, as text.
    pub arguments: String,
}

/// One alternative in a log-probability report.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenAlternative {
    /// The token's text (lossy where it is a partial UTF-8 sequence).
    pub token: String,
    /// Its raw bytes.
    pub bytes: Vec<u8>,
    /// Its log-probability.
    pub logprob: f32,
}

/// Log-probability of one generated token and its top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The generated token.
    pub chosen: TokenAlternative,
    /// The most likely tokens at that step.
    pub top: Vec<TokenAlternative>,
}

/// What a worker reports while it serves a request.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// Every prompt was accepted; generation begins.
    Started {
        /// Tokens in all prompts together.
        prompt_tokens: usize,
    },
    /// This many of a prompt's tokens were found in the prefix cache and
    /// not computed again (sent once per prompt, after `Started`).
    PrefixCached {
        /// Cached tokens.
        tokens: usize,
    },
    /// New text for one choice (may be empty when only log-probabilities are new).
    Delta {
        /// The choice.
        index: usize,
        /// The text.
        text: String,
        /// Log-probabilities of the tokens behind this text, when asked for.
        logprobs: Vec<TokenLogprob>,
        /// Tokens generated for this choice so far (this delta's included).
        produced: usize,
    },
    /// A choice made a tool call.
    ToolCall {
        /// The choice.
        index: usize,
        /// The call.
        call: ToolCallEvent,
    },
    /// A choice ended.
    Finished {
        /// The choice.
        index: usize,
        /// Why.
        reason: FinishReason,
        /// Tokens generated for it.
        completion_tokens: usize,
    },
    /// The request failed; no more events follow.
    Failed(EngineError),
}

/// A text request's events, in order. Reading makes room in the request's
/// buffer and wakes the worker, which leaves a request out of the batch
/// while its client is behind; dropping the stream cancels the request at
/// the next step (and wakes the worker too).
pub struct GenerateEvents {
    rx: mpsc::Receiver<GenerateEvent>,
    wake: Wake,
}

impl GenerateEvents {
    pub(super) fn new(rx: mpsc::Receiver<GenerateEvent>, wake: Wake) -> Self {
        Self { rx, wake }
    }

    /// The next event; `None` once the worker has sent the last one.
    pub async fn recv(&mut self) -> Option<GenerateEvent> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<GenerateEvent>> {
        let polled = self.rx.poll_recv(cx);
        if polled.is_ready() {
            self.wake.wake();
        }
        polled
    }
}

impl futures::Stream for GenerateEvents {
    type Item = GenerateEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<GenerateEvent>> {
        self.get_mut().poll_recv(cx)
    }
}

impl Drop for GenerateEvents {
    fn drop(&mut self) {
        // Closed before the wake-up, so the worker sees the client gone.
        self.rx.close();
        self.wake.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(prompts: usize, n: usize) -> GenerateSpec {
        GenerateSpec {
            prompts: vec![Prompt::Text("hi".into()); prompts],
            max_tokens: None,
            default_max_tokens: None,
            stop: Vec::new(),
            n,
            sampling: SamplingParams::default(),
            echo: false,
            ignore_eos: false,
            min_tokens: 0,
            tools: None,
            constraint: None,
            cache_salt: None,
            prompt_lookup: 0,
        }
    }

    fn param(r: Result<ValidGenerate, EngineError>) -> &'static str {
        match r {
            Err(EngineError::InvalidInput { param, .. }) => param,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_request_is_checked_as_a_whole_naming_the_parameter() {
        assert_eq!(spec(2, 64).validate().unwrap().choices(), 128);
        assert_eq!(param(spec(0, 1).validate()), "prompt");
        assert_eq!(param(spec(1, 0).validate()), "n");
        assert_eq!(param(spec(3, 64).validate()), "n");
        let zero = GenerateSpec {
            max_tokens: Some(0),
            ..spec(1, 1)
        };
        assert_eq!(param(zero.validate()), "max_tokens");
        let stops = GenerateSpec {
            stop: vec!["a".into(), String::new()],
            ..spec(1, 1)
        };
        assert_eq!(param(stops.validate()), "stop");
        let empty = GenerateSpec {
            prompts: vec![Prompt::Tokens(Vec::new())],
            ..spec(1, 1)
        };
        assert_eq!(param(empty.validate()), "prompt");
        let short = GenerateSpec {
            max_tokens: Some(4),
            min_tokens: 5,
            ..spec(1, 1)
        };
        assert_eq!(param(short.validate()), "min_tokens");
    }
}
