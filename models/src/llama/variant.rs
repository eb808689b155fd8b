//! What Gemma 2 and 3 add to the Llama shape: GELU gating, a scaled
//! embedding, a query scale of their own, soft-capped attention scores and
//! logits, norms after attention and after the MLP (found by tensor name),
//! and sliding-window layers that may rotate with a base of their own.

use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// The gate's activation in the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// SiLU (Llama, Qwen, Phi-3, Mistral).
    #[default]
    Silu,
    /// GELU, tanh approximation (Gemma).
    GeluTanh,
}

/// Layers that attend to a window of recent positions only.
#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    /// Positions a query sees, its own included.
    pub window: usize,
    /// Which layers slide (the others see everything).
    pub layers: Vec<bool>,
    /// The RoPE base of the sliding layers, where it is their own (Gemma 3:
    /// a local base, without the global layers' frequency scaling).
    pub rope_theta: Option<f32>,
}

impl SlidingWindow {
    /// Whether `layer` slides.
    pub fn slides(&self, layer: usize) -> bool {
        self.layers.get(layer).copied().unwrap_or(false)
    }
}

/// Departures from the Llama computation; the default is none.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Variant {
    /// The MLP gate's activation.
    pub activation: Activation,
    /// Multiplies the token embeddings (Gemma: √hidden).
    pub embed_scale: Option<f32>,
    /// Multiplies query·key (default 1/√head_dim).
    pub query_scale: Option<f32>,
    /// Soft cap of the attention scores.
    pub attn_softcap: Option<f32>,
    /// Soft cap of the output logits.
    pub final_softcap: Option<f32>,
    /// Sliding-window layers, if any.
    pub sliding: Option<SlidingWindow>,
    /// Whether stored norm weights are offsets from one (Hugging Face's
    /// Gemma checkpoints; llama.cpp's converter adds the one).
    pub norm_offset: bool,
}

/// llama.cpp's sliding-layer rule for a repeating pattern of `n`: the last
/// layer of each `n` sees everything (`n` of 0 or 1: every layer slides).
fn pattern(layers: usize, n: usize) -> Vec<bool> {
    (0..layers).map(|i| n <= 1 || i % n < n - 1).collect()
}

/// The query scale of Gemma's 27B models, which llama.cpp knows by their
/// depth: 1/√(hidden / heads) instead of 1/√head_dim.
fn gemma_query_scale(arch: &str, layers: usize, hidden: usize, heads: usize) -> Option<f32> {
    let big = matches!((arch, layers), ("gemma2", 46) | ("gemma3", 62));
    big.then(|| 1.0 / ((hidden / heads.max(1)) as f32).sqrt())
}

impl Variant {
    /// Reads the Gemma keys of a GGUF file of architecture `arch` (the
    /// default for the others), as llama.cpp does, defaults included.
    pub(crate) fn from_gguf(
        gguf: &GgufFile,
        arch: &str,
        layers: usize,
        hidden: usize,
        heads: usize,
    ) -> Result<Self> {
        if !matches!(arch, "gemma2" | "gemma3") {
            return Ok(Self::default());
        }
        let key = |k: &str| format!("{arch}.{k}");
        let gemma2 = arch == "gemma2";
        let window = match gguf.opt_u32(&key("attention.sliding_window"))? {
            Some(w) => Some(w as usize),
            None if gemma2 => Some(4096),
            None => None,
        };
        let sliding = match window.filter(|&w| w > 0) {
            None => None,
            Some(window) => {
                let pattern_key = key("attention.sliding_window_pattern");
                let layers = if gguf.is_array(&pattern_key) {
                    gguf.bools(&pattern_key)?
                } else {
                    let n = gguf
                        .opt_u32(&pattern_key)?
                        .map_or(if gemma2 { 2 } else { 6 }, |n| n as usize);
                    pattern(layers, n)
                };
                let local = gguf.opt_f32(&key("rope.freq_base_swa"))?;
                Some(SlidingWindow {
                    window,
                    layers,
                    // Gemma 2's sliding layers rotate as the others unless
                    // the file says otherwise; Gemma 3's at 10 000.
                    rope_theta: if gemma2 {
                        local
                    } else {
                        local.or(Some(10_000.0))
                    },
                })
            }
        };
        let cap = |k: &str, default: Option<f32>| -> Result<Option<f32>> {
            Ok(gguf.opt_f32(&key(k))?.or(default).filter(|&c| c > 0.0))
        };
        Ok(Self {
            activation: Activation::GeluTanh,
            embed_scale: Some((hidden as f32).sqrt()),
            query_scale: gemma_query_scale(arch, layers, hidden, heads),
            attn_softcap: if gemma2 {
                cap("attn_logit_softcapping", Some(50.0))?
            } else {
                None
            },
            final_softcap: cap("final_logit_softcapping", gemma2.then_some(30.0))?,
            sliding,
            norm_offset: false,
        })
    }

    /// Reads the Gemma fields of a Hugging Face `config.json` whose
    /// `model_type` is `model_type` (the default for the others).
    pub(crate) fn from_hf_json(json: &str, model_type: &str, layers: usize) -> Result<Self> {
        if !matches!(model_type, "gemma2" | "gemma3_text") {
            return Ok(Self::default());
        }
        let hf: HfGemma = serde_json::from_str(json).map_err(|e| ModelError::Metadata {
            key: "config.json".into(),
            message: e.to_string(),
        })?;
        if let Some(act) = hf.hidden_activation.as_deref() {
            if !matches!(act, "gelu_pytorch_tanh" | "gelu_tanh") {
                return Err(ModelError::UnsupportedArchitecture(format!(
                    "hidden_activation `{act}` (Gemma's is gelu_pytorch_tanh)"
                )));
            }
        }
        let gemma2 = model_type == "gemma2";
        let sliding = hf.sliding_window.filter(|&w| w > 0).map(|window| {
            let layers = match &hf.layer_types {
                Some(types) => types.iter().map(|t| t == "sliding_attention").collect(),
                None => pattern(
                    layers,
                    hf.sliding_window_pattern
                        .unwrap_or(if gemma2 { 2 } else { 6 }),
                ),
            };
            SlidingWindow {
                window,
                layers,
                rope_theta: if gemma2 {
                    None
                } else {
                    Some(hf.rope_local_base_freq.unwrap_or(10_000.0))
                },
            }
        });
        Ok(Self {
            activation: Activation::GeluTanh,
            embed_scale: Some((hf.hidden_size as f32).sqrt()),
            query_scale: hf.query_pre_attn_scalar.map(|s| 1.0 / s.sqrt()),
            attn_softcap: hf.attn_logit_softcapping.filter(|&c| c > 0.0),
            final_softcap: hf.final_logit_softcapping.filter(|&c| c > 0.0),
            sliding,
            norm_offset: true,
        })
    }
}

#[derive(Deserialize)]
struct HfGemma {
    hidden_size: usize,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f32>,
    attn_logit_softcapping: Option<f32>,
    final_logit_softcapping: Option<f32>,
    sliding_window: Option<usize>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    rope_local_base_freq: Option<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_layer_of_each_pattern_sees_everything() {
        assert_eq!(pattern(4, 2), [true, false, true, false]);
        assert_eq!(pattern(7, 6), [true, true, true, true, true, false, true]);
        assert!(pattern(3, 1).iter().all(|&s| s));
    }

    #[test]
    fn gemma3_text_config_reads_its_layer_types_and_local_base() {
        let json = r#"{"hidden_size": 1152, "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 256, "sliding_window": 512,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_local_base_freq": 10000.0, "final_logit_softcapping": null}"#;
        let v = Variant::from_hf_json(json, "gemma3_text", 2).unwrap();
        let s = v.sliding.as_ref().unwrap();
        assert_eq!((s.window, s.layers.clone()), (512, vec![true, false]));
        assert_eq!(s.rope_theta, Some(10_000.0));
        assert_eq!(v.query_scale, Some(1.0 / 16.0));
        assert_eq!((v.attn_softcap, v.final_softcap), (None, None));
        assert!(v.norm_offset);
        let bad = json.replace("gelu_pytorch_tanh", "relu");
        assert!(Variant::from_hf_json(&bad, "gemma3_text", 2).is_err());
        assert_eq!(
            Variant::from_hf_json("{}", "llama", 2).unwrap(),
            Variant::default()
        );
    }
}
