//! `[defaults]` in a model manifest: what requests that leave a field out
//! get.

use serde::Deserialize;

/// Most draft tokens per step prompt lookup may take.
pub const MAX_PROMPT_LOOKUP: usize = 16;

/// `[defaults]` in a manifest: sampling defaults for requests that leave them out.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerationDefaults {
    /// Tokens to generate when the request names no limit.
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Top-k cut (0 = off).
    pub top_k: Option<u32>,
    /// Min-p cut (0 = off).
    pub min_p: Option<f32>,
    /// Repetition penalty (1 = off).
    pub repetition_penalty: Option<f32>,
    /// Prompt-lookup speculative decoding: draft tokens per step, taken
    /// from earlier text that the last tokens repeat, verified in one pass
    /// (0 or absent = off unless the request asks).
    pub prompt_lookup: Option<u32>,
}

pub(super) fn check_defaults(d: &GenerationDefaults) -> std::result::Result<(), String> {
    let check = |name: &str, v: Option<f32>, ok: fn(f32) -> bool, want: &str| match v {
        Some(x) if !ok(x) => Err(format!("{name}: expected {want}, got {x}")),
        _ => Ok(()),
    };
    check(
        "temperature",
        d.temperature,
        |x| (0.0..=2.0).contains(&x),
        "a number in [0, 2]",
    )?;
    check(
        "top_p",
        d.top_p,
        |x| x > 0.0 && x <= 1.0,
        "a number in (0, 1]",
    )?;
    check(
        "min_p",
        d.min_p,
        |x| (0.0..=1.0).contains(&x),
        "a number in [0, 1]",
    )?;
    check(
        "repetition_penalty",
        d.repetition_penalty,
        |x| x > 0.0 && x <= 10.0,
        "a number in (0, 10]",
    )?;
    if d.max_tokens == Some(0) {
        return Err("max_tokens: expected at least 1".into());
    }
    if let Some(n) = d.prompt_lookup.filter(|&n| n as usize > MAX_PROMPT_LOOKUP) {
        return Err(format!(
            "prompt_lookup: expected at most {MAX_PROMPT_LOOKUP} draft tokens, got {n}"
        ));
    }
    Ok(())
}
