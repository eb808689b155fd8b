//! Wire types and validation shared by the OpenAI text endpoints.

use std::time::Duration;

use kindling_models::SamplingParams;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::config::{GenerationDefaults, KeepAlive, MAX_PROMPT_LOOKUP};

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    /// A single stop sequence.
    One(String),
    /// Up to four stop sequences.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields common to chat and text completions, including the
/// extensions (`top_k`, `min_p`, `repetition_penalty`) other servers accept.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<i64>,
    pub stop: Option<StopSpec>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    /// End-user id; recorded in the request log.
    pub user: Option<String>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub ignore_eos: bool,
    /// Token id (as a string) → bias added to its logit, -100 to 100.
    pub logit_bias: Option<serde_json::Value>,
    /// Tokens to generate before an end-of-turn token may end a choice.
    pub min_tokens: Option<i64>,
    /// Prefix-cache salt (vLLM's `cache_salt`): cached prompt blocks are
    /// shared only between requests that send the same salt.
    pub cache_salt: Option<String>,
    /// Prompt-lookup speculative decoding: `true` (the model's setting, or
    /// 4 draft tokens), `false`, or draft tokens per step (0 = off).
    pub prompt_lookup: Option<serde_json::Value>,
    #[serde(flatten)]
    pub lifetime: LifetimeFields,
}

/// Most entries of `logit_bias`.
pub const MAX_LOGIT_BIAS: usize = 1024;

/// Parses OpenAI's `logit_bias`: `{"<token id>": bias}`, bias in [-100, 100].
fn logit_bias(v: Option<&serde_json::Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad = |why: String| ApiError::invalid("logit_bias", format!("`logit_bias`: {why}"));
    let map = match v {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(serde_json::Value::Object(map)) => map,
        Some(other) => {
            return Err(bad(format!(
                "expected an object of token ids to biases, got {other}"
            )))
        }
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(bad(format!(
            "at most {MAX_LOGIT_BIAS} entries, got {}",
            map.len()
        )));
    }
    let mut out = Vec::with_capacity(map.len());
    for (id, bias) in map {
        let id: u32 = id
            .trim()
            .parse()
            .map_err(|_| bad(format!("keys are token ids, got `{id}`")))?;
        let bias = bias
            .as_f64()
            .filter(|b| (-100.0..=100.0).contains(b))
            .ok_or_else(|| {
                bad(format!(
                    "the bias of token {id} must be a number from -100 to 100, got {bias}"
                ))
            })?;
        out.push((id, bias as f32));
    }
    out.sort_by_key(|(id, _)| *id);
    Ok(out)
}

impl SamplingFields {
    /// The validated `timeout`.
    pub fn timeout(&self) -> Result<Option<Duration>, ApiError> {
        self.lifetime.timeout()
    }

    /// The validated `keep_alive`.
    pub fn keep_alive(&self) -> Result<Option<KeepAlive>, ApiError> {
        self.lifetime.keep_alive()
    }
}

/// Extension fields every model request accepts.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LifetimeFields {
    /// How long the model stays loaded after this request: a duration like
    /// `"10m"`, seconds, `0` (unload right after) or `-1` (forever).
    pub keep_alive: Option<serde_json::Value>,
    /// Seconds (or a duration like `"30s"`) the request may take in all,
    /// waiting included; past it, it fails with 504 and frees its slot.
    pub timeout: Option<serde_json::Value>,
}

impl LifetimeFields {
    /// The validated `timeout`.
    pub fn timeout(&self) -> Result<Option<Duration>, ApiError> {
        let bad = |why: String| ApiError::invalid("timeout", format!("`timeout`: {why}"));
        let Some(v) = &self.timeout else {
            return Ok(None);
        };
        let d = match v {
            serde_json::Value::Number(n) => {
                let secs = n.as_f64().unwrap_or(-1.0);
                if !(secs > 0.0 && secs <= 86_400.0) {
                    return Err(bad(format!(
                        "expected seconds between 0 and 86400, got {n}"
                    )));
                }
                Duration::from_secs_f64(secs)
            }
            serde_json::Value::String(s) => humantime::parse_duration(s)
                .map_err(|e| bad(format!("expected a duration like \"30s\": {e}")))?,
            other => {
                return Err(bad(format!(
                    "expected seconds or a duration string, got {other}"
                )))
            }
        };
        if d.is_zero() {
            return Err(bad("must be more than zero".into()));
        }
        Ok(Some(d))
    }

    /// The validated `keep_alive`.
    pub fn keep_alive(&self) -> Result<Option<KeepAlive>, ApiError> {
        self.keep_alive
            .as_ref()
            .map(|v| {
                KeepAlive::from_value(v)
                    .map_err(|e| ApiError::invalid("keep_alive", format!("`keep_alive`: {e}")))
            })
            .transpose()
    }
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// Text generation: how much of the prompt came from the prefix cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// OpenAI's breakdown of prompt tokens.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values were reused, not computed.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
        }
    }

    /// With the count of prompt tokens served from the prefix cache.
    pub fn with_cached(mut self, cached_tokens: usize) -> Self {
        self.prompt_tokens_details = Some(PromptTokensDetails { cached_tokens });
        self
    }
}

/// The validated sampling part of a request.
#[derive(Debug, Clone)]
pub struct ValidSampling {
    pub params: SamplingParams,
    pub stop: Vec<String>,
    pub n: usize,
    /// Tokens before an end-of-turn token may end a choice.
    pub min_tokens: usize,
    /// Prompt-lookup draft tokens per step (0 = off).
    pub prompt_lookup: usize,
}

/// Draft tokens per step when a request turns prompt lookup on and the
/// model names no number.
pub const DEFAULT_PROMPT_LOOKUP: usize = 4;

/// Parses `prompt_lookup`: a boolean or draft tokens per step.
fn prompt_lookup(
    v: Option<&serde_json::Value>,
    defaults: &GenerationDefaults,
) -> Result<usize, ApiError> {
    let model = defaults.prompt_lookup.map_or(0, |n| n as usize);
    match v {
        None | Some(serde_json::Value::Null) => Ok(model),
        Some(serde_json::Value::Bool(false)) => Ok(0),
        Some(serde_json::Value::Bool(true)) => Ok(if model > 0 {
            model
        } else {
            DEFAULT_PROMPT_LOOKUP
        }),
        Some(other) => other
            .as_u64()
            .filter(|&n| n as usize <= MAX_PROMPT_LOOKUP)
            .map(|n| n as usize)
            .ok_or_else(|| {
                ApiError::invalid(
                    "prompt_lookup",
                    format!(
                        "`prompt_lookup`: expected true, false or draft tokens per step \
                         from 0 to {MAX_PROMPT_LOOKUP}, got {other}"
                    ),
                )
            }),
    }
}

/// Most choices one request may ask for.
pub const MAX_N: i64 = 128;

fn in_range(param: &str, v: Option<f32>, lo: f32, hi: f32, lo_open: bool) -> Result<(), ApiError> {
    match v {
        Some(x) if x.is_nan() || x > hi || x < lo || (lo_open && x == lo) => {
            let open = if lo_open { "(" } else { "[" };
            Err(ApiError::invalid(
                param,
                format!("`{param}` must be in {open}{lo}, {hi}], got {x}"),
            ))
        }
        _ => Ok(()),
    }
}

impl SamplingFields {
    /// Checks every value, then fills what the request left out from the
    /// model's defaults and OpenAI's.
    pub fn validate(
        &self,
        defaults: &GenerationDefaults,
        top_logprobs: Option<usize>,
    ) -> Result<ValidSampling, ApiError> {
        in_range("temperature", self.temperature, 0.0, 2.0, false)?;
        in_range("top_p", self.top_p, 0.0, 1.0, true)?;
        in_range("presence_penalty", self.presence_penalty, -2.0, 2.0, false)?;
        in_range(
            "frequency_penalty",
            self.frequency_penalty,
            -2.0,
            2.0,
            false,
        )?;
        in_range("min_p", self.min_p, 0.0, 1.0, false)?;
        in_range(
            "repetition_penalty",
            self.repetition_penalty,
            0.0,
            10.0,
            true,
        )?;
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::invalid(
                "n",
                format!("`n` must be between 1 and {MAX_N}, got {n}"),
            ));
        }
        let top_k = match self.top_k {
            None => defaults.top_k.unwrap_or(0) as usize,
            Some(-1) => 0,
            Some(k) if k >= 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("`top_k` must be -1 (off), 0 (off) or positive, got {k}"),
                ))
            }
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopSpec::One(s)) => vec![s.clone()],
            Some(StopSpec::Many(v)) => v.clone(),
        };
        let params = SamplingParams {
            temperature: self.temperature.or(defaults.temperature).unwrap_or(1.0),
            top_p: self.top_p.or(defaults.top_p).unwrap_or(1.0),
            top_k,
            min_p: self.min_p.or(defaults.min_p).unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            repetition_penalty: self
                .repetition_penalty
                .or(defaults.repetition_penalty)
                .unwrap_or(1.0),
            // Same seed + same request = same output; no seed = a fresh one.
            seed: self.seed.map_or_else(rand::random, |s| s as u64),
            top_logprobs,
            logit_bias: logit_bias(self.logit_bias.as_ref())?,
        };
        let min_tokens = match self.min_tokens {
            None => 0,
            Some(m) if m >= 0 => usize::try_from(m).unwrap_or(usize::MAX),
            Some(m) => {
                return Err(ApiError::invalid(
                    "min_tokens",
                    format!("`min_tokens` must be 0 or more, got {m}"),
                ))
            }
        };
        Ok(ValidSampling {
            params,
            stop,
            n: n as usize,
            min_tokens,
            prompt_lookup: prompt_lookup(self.prompt_lookup.as_ref(), defaults)?,
        })
    }
}

/// Validates a token limit named `param` (at least 1).
pub fn token_limit(param: &str, v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x >= 1 => Ok(Some(usize::try_from(x).unwrap_or(usize::MAX))),
        Some(x) => Err(ApiError::invalid(
            param,
            format!("`{param}` must be at least 1, got {x}"),
        )),
    }
}

/// Seconds since the Unix epoch, for `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> SamplingFields {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn bad_values_name_their_parameter() {
        let d = GenerationDefaults::default();
        for (json, param) in [
            (r#"{"temperature": -0.1}"#, "temperature"),
            (r#"{"temperature": 2.5}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"top_p": 1.5}"#, "top_p"),
            (r#"{"n": 0}"#, "n"),
            (r#"{"presence_penalty": 3}"#, "presence_penalty"),
            (r#"{"frequency_penalty": -2.5}"#, "frequency_penalty"),
            (r#"{"top_k": -3}"#, "top_k"),
            (r#"{"min_p": 1.1}"#, "min_p"),
            (r#"{"repetition_penalty": 0}"#, "repetition_penalty"),
        ] {
            let err = fields(json).validate(&d, None).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{json}");
            assert_eq!(err.status, 400);
        }
    }

    #[test]
    fn prompt_lookup_comes_from_the_request_or_the_model() {
        let d = GenerationDefaults::default();
        let get = |json: &str, d: &GenerationDefaults| fields(json).validate(d, None);
        assert_eq!(get("{}", &d).unwrap().prompt_lookup, 0);
        assert_eq!(
            get(r#"{"prompt_lookup": true}"#, &d).unwrap().prompt_lookup,
            4
        );
        assert_eq!(get(r#"{"prompt_lookup": 7}"#, &d).unwrap().prompt_lookup, 7);
        let model = GenerationDefaults {
            prompt_lookup: Some(6),
            ..Default::default()
        };
        assert_eq!(get("{}", &model).unwrap().prompt_lookup, 6);
        assert_eq!(
            get(r#"{"prompt_lookup": true}"#, &model)
                .unwrap()
                .prompt_lookup,
            6
        );
        assert_eq!(
            get(r#"{"prompt_lookup": false}"#, &model)
                .unwrap()
                .prompt_lookup,
            0
        );
        for bad in [r#""yes""#, "17", "-1", "2.5"] {
            let e = get(&format!(r#"{{"prompt_lookup": {bad}}}"#), &d).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("prompt_lookup"), "{bad}");
        }
    }

    #[test]
    fn defaults_fill_gaps_and_requests_win() {
        let d = GenerationDefaults {
            temperature: Some(0.3),
            top_k: Some(40),
            ..Default::default()
        };
        let v = fields(r#"{"stop": "x", "seed": 5}"#)
            .validate(&d, Some(2))
            .unwrap();
        assert_eq!(v.params.temperature, 0.3);
        assert_eq!(v.params.top_k, 40);
        assert_eq!(v.prompt_lookup, 0);
        assert_eq!(v.params.seed, 5);
        assert_eq!(v.params.top_logprobs, Some(2));
        assert_eq!(v.stop, vec!["x".to_string()]);
        let v = fields(r#"{"temperature": 0, "top_k": -1}"#)
            .validate(&d, None)
            .unwrap();
        assert_eq!((v.params.temperature, v.params.top_k), (0.0, 0));
    }
}
