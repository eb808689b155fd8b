//! A diffusers pipeline folder's configs: `model_index.json` and each
//! component's `config.json`, read into what the pipeline builds from. Any
//! size loads from its own config; options Kindling cannot run are refused
//! here, by name, rather than run wrongly.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// Reads and parses one JSON file.
pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| bad(path, e.to_string()))
}

pub(crate) fn bad(path: &Path, message: String) -> ModelError {
    ModelError::BadFormat {
        path: path.to_path_buf(),
        format: "diffusers config",
        message,
    }
}

/// A number or a per-block list of numbers, as diffusers configs allow.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn expand(&self, blocks: usize, key: &str, path: &Path) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; blocks]),
            PerBlock::Each(v) if v.len() == blocks => Ok(v.clone()),
            PerBlock::Each(v) => Err(bad(
                path,
                format!("`{key}` lists {} values for {blocks} blocks", v.len()),
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawUNet {
    #[serde(default = "four")]
    in_channels: usize,
    #[serde(default = "four")]
    out_channels: usize,
    block_out_channels: Vec<usize>,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    #[serde(default = "two")]
    layers_per_block: usize,
    attention_head_dim: Option<PerBlock>,
    num_attention_heads: Option<PerBlock>,
    transformer_layers_per_block: Option<PerBlock>,
    cross_attention_dim: usize,
    #[serde(default)]
    use_linear_projection: bool,
    #[serde(default = "groups")]
    norm_num_groups: usize,
    #[serde(default = "eps")]
    norm_eps: f64,
    #[serde(default = "yes")]
    flip_sin_to_cos: bool,
    #[serde(default)]
    freq_shift: f64,
    #[serde(default = "one")]
    downsample_padding: usize,
    #[serde(default = "one_f")]
    mid_block_scale_factor: f64,
    #[serde(default)]
    center_input_sample: bool,
    sample_size: Option<usize>,
    addition_embed_type: Option<String>,
    addition_time_embed_dim: Option<usize>,
    projection_class_embeddings_input_dim: Option<usize>,
    act_fn: Option<String>,
    mid_block_type: Option<String>,
    class_embed_type: Option<String>,
    time_cond_proj_dim: Option<usize>,
    resnet_time_scale_shift: Option<String>,
    time_embedding_type: Option<String>,
    encoder_hid_dim: Option<usize>,
    #[serde(default)]
    dual_cross_attention: bool,
    #[serde(default)]
    only_cross_attention: Value,
    conv_in_kernel: Option<usize>,
    conv_out_kernel: Option<usize>,
}

fn four() -> usize {
    4
}
fn two() -> usize {
    2
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn groups() -> usize {
    32
}
fn eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

/// One level of the UNet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UNetBlock {
    /// Channels out of the level.
    pub channels: usize,
    /// Transformer layers of its cross-attention, none for a plain block.
    pub transformer_layers: Option<usize>,
    /// Attention heads.
    pub heads: usize,
}

/// SDXL's extra conditioning: the pooled text embedding and six size numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextTimeEmbedding {
    /// Width of each size number's sinusoidal embedding.
    pub time_embed_dim: usize,
    /// Width of the concatenated input (pooled text + 6 × time).
    pub input_dim: usize,
}

/// A `UNet2DConditionModel` config.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub blocks: Vec<UNetBlock>,
    pub layers_per_block: usize,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub center_input_sample: bool,
    /// Latent side the model was trained at.
    pub sample_size: usize,
    pub text_time: Option<TextTimeEmbedding>,
}

impl UNetConfig {
    /// Reads `unet/config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let raw: RawUNet = read_json(path)?;
        let refuse = |what: String| Err(bad(path, format!("{what} is not supported")));
        let n = raw.block_out_channels.len();
        if n == 0 {
            return Err(bad(path, "`block_out_channels` is empty".into()));
        }
        if raw.down_block_types.len() != n || raw.up_block_types.len() != n {
            return Err(bad(
                path,
                "block type lists do not match `block_out_channels`".into(),
            ));
        }
        for (key, v) in [
            ("act_fn", raw.act_fn.as_deref().unwrap_or("silu")),
            (
                "mid_block_type",
                raw.mid_block_type
                    .as_deref()
                    .unwrap_or("UNetMidBlock2DCrossAttn"),
            ),
            (
                "resnet_time_scale_shift",
                raw.resnet_time_scale_shift.as_deref().unwrap_or("default"),
            ),
            (
                "time_embedding_type",
                raw.time_embedding_type.as_deref().unwrap_or("positional"),
            ),
        ] {
            let wanted = ["silu", "UNetMidBlock2DCrossAttn", "default", "positional"];
            if !wanted.contains(&v) {
                return refuse(format!("`{key}` = \"{v}\""));
            }
        }
        if let Some(c) = &raw.class_embed_type {
            return refuse(format!("`class_embed_type` = \"{c}\""));
        }
        if raw.time_cond_proj_dim.is_some() {
            return refuse("`time_cond_proj_dim` (LCM distillation)".into());
        }
        if raw.encoder_hid_dim.is_some() {
            return refuse("`encoder_hid_dim`".into());
        }
        if raw.dual_cross_attention || raw.only_cross_attention.as_bool() == Some(true) {
            return refuse("dual or cross-only attention".into());
        }
        if raw.downsample_padding != 1 {
            return refuse(format!("`downsample_padding` = {}", raw.downsample_padding));
        }
        if raw.conv_in_kernel.unwrap_or(3) != 3 || raw.conv_out_kernel.unwrap_or(3) != 3 {
            return refuse("a conv_in/conv_out kernel other than 3".into());
        }
        // diffusers' `attention_head_dim` historically counts heads; a
        // `num_attention_heads` entry, when present, says so explicitly.
        let heads = raw
            .num_attention_heads
            .as_ref()
            .or(raw.attention_head_dim.as_ref())
            .unwrap_or(&PerBlock::One(8))
            .expand(n, "attention_head_dim", path)?;
        let layers = raw
            .transformer_layers_per_block
            .clone()
            .unwrap_or(PerBlock::One(1))
            .expand(n, "transformer_layers_per_block", path)?;
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let down = raw.down_block_types[i].as_str();
            let up = raw.up_block_types[n - 1 - i].as_str();
            let attn = match (down, up) {
                ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") => true,
                ("DownBlock2D", "UpBlock2D") => false,
                _ => return refuse(format!("the block pair `{down}`/`{up}`")),
            };
            let channels = raw.block_out_channels[i];
            if !channels.is_multiple_of(raw.norm_num_groups) || !channels.is_multiple_of(heads[i]) {
                return Err(bad(
                    path,
                    format!("{channels} channels do not divide into groups/heads"),
                ));
            }
            blocks.push(UNetBlock {
                channels,
                transformer_layers: attn.then_some(layers[i]),
                heads: heads[i],
            });
        }
        let text_time = match raw.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => Some(TextTimeEmbedding {
                time_embed_dim: raw
                    .addition_time_embed_dim
                    .ok_or_else(|| bad(path, "`addition_time_embed_dim` missing".into()))?,
                input_dim: raw.projection_class_embeddings_input_dim.ok_or_else(|| {
                    bad(
                        path,
                        "`projection_class_embeddings_input_dim` missing".into(),
                    )
                })?,
            }),
            Some(other) => return refuse(format!("`addition_embed_type` = \"{other}\"")),
        };
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            blocks,
            layers_per_block: raw.layers_per_block,
            cross_attention_dim: raw.cross_attention_dim,
            use_linear_projection: raw.use_linear_projection,
            norm_num_groups: raw.norm_num_groups,
            norm_eps: raw.norm_eps,
            flip_sin_to_cos: raw.flip_sin_to_cos,
            freq_shift: raw.freq_shift,
            downsample_padding: raw.downsample_padding,
            mid_block_scale_factor: raw.mid_block_scale_factor,
            center_input_sample: raw.center_input_sample,
            sample_size: raw.sample_size.unwrap_or(64),
            text_time,
        })
    }
}

#[derive(Debug, Deserialize)]
struct RawVae {
    #[serde(default = "three")]
    in_channels: usize,
    #[serde(default = "three")]
    out_channels: usize,
    block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    layers_per_block: usize,
    #[serde(default = "four")]
    latent_channels: usize,
    #[serde(default = "groups")]
    norm_num_groups: usize,
    #[serde(default = "sd_scale")]
    scaling_factor: f64,
    shift_factor: Option<f64>,
    #[serde(default = "yes")]
    use_quant_conv: bool,
    #[serde(default = "yes")]
    use_post_quant_conv: bool,
    act_fn: Option<String>,
}

fn three() -> usize {
    3
}
fn sd_scale() -> f64 {
    0.18215
}

/// An `AutoencoderKL` config.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

impl VaeConfig {
    /// Reads `vae/config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let raw: RawVae = read_json(path)?;
        if let Some(act) = raw.act_fn.as_deref().filter(|a| *a != "silu") {
            return Err(bad(path, format!("`act_fn` = \"{act}\" is not supported")));
        }
        if raw.block_out_channels.is_empty() {
            return Err(bad(path, "`block_out_channels` is empty".into()));
        }
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            block_out_channels: raw.block_out_channels,
            layers_per_block: raw.layers_per_block,
            latent_channels: raw.latent_channels,
            norm_num_groups: raw.norm_num_groups,
            scaling_factor: raw.scaling_factor,
            shift_factor: raw.shift_factor.unwrap_or(0.0),
            use_quant_conv: raw.use_quant_conv,
            use_post_quant_conv: raw.use_post_quant_conv,
        })
    }

    /// Pixels per latent along each side.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// How the text encoder's MLP activates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    QuickGelu,
    Gelu,
}

#[derive(Debug, Deserialize)]
struct RawClip {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    hidden_act: String,
    #[serde(default = "eps")]
    layer_norm_eps: f64,
    projection_dim: Option<usize>,
    eos_token_id: Option<u32>,
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}

/// A `CLIPTextModel` / `CLIPTextModelWithProjection` config.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub max_positions: usize,
    pub activation: ClipActivation,
    pub layer_norm_eps: f64,
    pub projection_dim: Option<usize>,
    pub eos_token_id: Option<u32>,
}

impl ClipConfig {
    /// Reads `text_encoder/config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let raw: RawClip = read_json(path)?;
        let activation = match raw.hidden_act.as_str() {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            other => {
                return Err(bad(
                    path,
                    format!("`hidden_act` = \"{other}\" is not supported"),
                ))
            }
        };
        if raw.num_attention_heads == 0 || !raw.hidden_size.is_multiple_of(raw.num_attention_heads)
        {
            return Err(bad(path, "`hidden_size` does not divide into heads".into()));
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            layers: raw.num_hidden_layers,
            heads: raw.num_attention_heads,
            max_positions: raw.max_position_embeddings,
            activation,
            layer_norm_eps: raw.layer_norm_eps,
            projection_dim: raw.projection_dim,
            eos_token_id: raw.eos_token_id,
        })
    }
}
