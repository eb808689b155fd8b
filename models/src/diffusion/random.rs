//! Writes a Stable Diffusion pipeline with random weights in the diffusers
//! layout: the configs, safetensors (f32 or f16) and a tiny CLIP BPE
//! vocabulary. `sd-tiny` (Kindling's demo and test pipeline) and the
//! full-size architectures used by the benchmarks come from here. The
//! weights are drawn from a fixed seed, so every run writes the same bytes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde_json::{json, Value};

use super::clip::ClipTextEncoder;
use super::config::{ClipConfig, UNetConfig, VaeConfig};
use super::sampler::Noise;
use super::unet::UNet;
use crate::error::{ModelError, Result};
use crate::synthetic::{init_for, io};

/// Which architecture to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// SD 1.5-shaped, a few thousand times smaller: the demo and test pipeline.
    Tiny,
    /// SDXL-shaped (two text encoders, `text_time` conditioning), tiny.
    TinyXl,
    /// SD 2.x/Turbo-shaped, tiny: v-prediction, trailing timesteps, linear
    /// projections, a GELU text encoder, `!` padding.
    TinyV,
    /// The SD 1.5 architecture at full size.
    Sd15,
}

impl Preset {
    /// Parses `tiny`, `tiny-xl`, `tiny-v` or `sd15`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Self::Tiny),
            "tiny-xl" => Some(Self::TinyXl),
            "tiny-v" => Some(Self::TinyV),
            "sd15" => Some(Self::Sd15),
            _ => None,
        }
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    std::fs::write(path, text + "\n").map_err(io(path))
}

fn clip_json(
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    vocab: usize,
    act: &str,
    projection: bool,
) -> Value {
    json!({
        "architectures": [if projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
        "model_type": "clip_text_model",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "max_position_embeddings": 77, "hidden_act": act, "layer_norm_eps": 1e-5,
        "projection_dim": hidden, "bos_token_id": special_ids().0, "eos_token_id": special_ids().1,
        "pad_token_id": 1, "initializer_range": 0.02, "initializer_factor": 1.0,
        "attention_dropout": 0.0, "dropout": 0.0, "torch_dtype": "float32"
    })
}

fn scheduler_json(class: &str) -> Value {
    json!({
        "_class_name": class, "num_train_timesteps": 1000,
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
        "set_alpha_to_one": false, "clip_sample": false, "skip_prk_steps": true
    })
}

fn vae_json(blocks: &[usize], layers: usize, sample: usize) -> Value {
    json!({
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
        "down_block_types": vec!["DownEncoderBlock2D"; blocks.len()],
        "up_block_types": vec!["UpDecoderBlock2D"; blocks.len()],
        "block_out_channels": blocks, "layers_per_block": layers, "latent_channels": 4,
        "norm_num_groups": 32, "act_fn": "silu", "sample_size": sample, "scaling_factor": 0.18215
    })
}

/// Every config of a preset: model_index, unet, vae, text encoder(s), scheduler.
fn configs(preset: Preset) -> Vec<(&'static str, Value)> {
    let tiny_unet = |cross: usize, xl: bool| {
        let mut u = json!({
            "_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4,
            "block_out_channels": [32, 64], "layers_per_block": 2, "sample_size": 32,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [2, 4], "cross_attention_dim": cross, "norm_num_groups": 32
        });
        if xl {
            u["addition_embed_type"] = json!("text_time");
            u["addition_time_embed_dim"] = json!(8);
            u["projection_class_embeddings_input_dim"] = json!(32 + 6 * 8);
            u["transformer_layers_per_block"] = json!([1, 2]);
            u["use_linear_projection"] = json!(true);
        }
        u
    };
    let index = |class: &str, xl: bool| {
        let mut v = json!({
            "_class_name": class, "_diffusers_version": "0.42.1",
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", if xl { "EulerDiscreteScheduler" } else { "DDIMScheduler" }],
            "safety_checker": [null, null], "feature_extractor": [null, null], "requires_safety_checker": false
        });
        if xl {
            v["text_encoder_2"] = json!(["transformers", "CLIPTextModelWithProjection"]);
            v["tokenizer_2"] = json!(["transformers", "CLIPTokenizer"]);
            v["force_zeros_for_empty_prompt"] = json!(true);
            for k in [
                "safety_checker",
                "feature_extractor",
                "requires_safety_checker",
            ] {
                v.as_object_mut().map(|o| o.remove(k));
            }
        }
        v
    };
    match preset {
        Preset::Tiny => vec![
            ("model_index.json", index("StableDiffusionPipeline", false)),
            ("unet/config.json", tiny_unet(32, false)),
            ("vae/config.json", vae_json(&[32, 64], 1, 64)),
            (
                "text_encoder/config.json",
                clip_json(32, 37, 5, 4, 1000, "quick_gelu", false),
            ),
            (
                "scheduler/scheduler_config.json",
                scheduler_json("DDIMScheduler"),
            ),
        ],
        Preset::TinyXl => vec![
            ("model_index.json", index("StableDiffusionXLPipeline", true)),
            ("unet/config.json", tiny_unet(64, true)),
            ("vae/config.json", vae_json(&[32, 64], 1, 64)),
            (
                "text_encoder/config.json",
                clip_json(32, 37, 5, 4, 1000, "quick_gelu", false),
            ),
            (
                "text_encoder_2/config.json",
                clip_json(32, 37, 5, 4, 1000, "gelu", true),
            ),
            (
                "scheduler/scheduler_config.json",
                scheduler_json("EulerDiscreteScheduler"),
            ),
        ],
        Preset::TinyV => {
            let mut unet = tiny_unet(32, false);
            unet["use_linear_projection"] = json!(true);
            let mut scheduler = scheduler_json("EulerDiscreteScheduler");
            scheduler["prediction_type"] = json!("v_prediction");
            scheduler["timestep_spacing"] = json!("trailing");
            scheduler["steps_offset"] = json!(0);
            vec![
                ("model_index.json", index("StableDiffusionPipeline", false)),
                ("unet/config.json", unet),
                ("vae/config.json", vae_json(&[32, 64], 1, 64)),
                (
                    "text_encoder/config.json",
                    clip_json(32, 37, 5, 4, 1000, "gelu", false),
                ),
                ("scheduler/scheduler_config.json", scheduler),
            ]
        }
        Preset::Sd15 => vec![
            ("model_index.json", index("StableDiffusionPipeline", false)),
            (
                "unet/config.json",
                json!({
                    "_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4,
                    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "sample_size": 64,
                    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                    "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32
                }),
            ),
            ("vae/config.json", vae_json(&[128, 256, 512, 512], 2, 512)),
            (
                "text_encoder/config.json",
                clip_json(768, 3072, 12, 12, 49408, "quick_gelu", false),
            ),
            (
                "scheduler/scheduler_config.json",
                scheduler_json("DDIMScheduler"),
            ),
        ],
    }
}

/// Gives every variable a value drawn from `seed`, one stream for the whole
/// map in name order (see [`init_for`] for the scales).
fn fill(varmap: &VarMap, seed: u64, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| ModelError::Tokenizer("poisoned".into()))?;
    let sorted: BTreeMap<_, _> = data.iter().collect();
    let mut noise = Noise::new(seed);
    let mut out = HashMap::new();
    for (name, var) in sorted {
        let shape = var.shape().clone();
        let init = init_for(name, shape.dims());
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| init.draw(&mut noise))
            .collect();
        out.insert(
            name.clone(),
            Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?,
        );
    }
    Ok(out)
}

fn save(dir: &Path, file: &str, tensors: &HashMap<String, Tensor>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    candle_core::safetensors::save(tensors, dir.join(file))?;
    Ok(())
}

/// The ids of `<|startoftext|>` and `<|endoftext|>` in [`vocabulary`].
fn special_ids() -> (usize, usize) {
    let n = vocabulary().1.len() + 512;
    (n, n + 1)
}

/// A CLIP vocabulary of bytes, bytes ending a word, and merges that build
/// a few hundred common words; the two special tokens end it.
fn vocabulary() -> (Value, Vec<String>) {
    let mut chars: Vec<char> = Vec::new();
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    let byte_char: Vec<char> = (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect();
    chars.extend(&byte_char);
    let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    tokens.extend(chars.iter().map(|c| format!("{c}</w>")));
    let words = "a an the of and in on with at by for to from photo picture painting portrait \
        drawing sketch render image art style cat dog horse bird fish astronaut robot man woman \
        child city street forest mountain river lake sea ocean beach sky cloud sun moon star night \
        day red green blue yellow orange purple black white golden silver bright dark soft light \
        riding sitting standing running flying under over above beautiful detailed high quality \
        realistic cinematic lighting landscape castle house tree flower garden snow rain fire water \
        space mars planet futuristic ancient old new small big tiny giant lowres blurry ugly bad";
    let mut merges: Vec<String> = Vec::new();
    let mut known: std::collections::HashSet<String> = tokens.iter().cloned().collect();
    'words: for word in words.split_whitespace() {
        let letters: Vec<String> = word.chars().map(|c| c.to_string()).collect();
        let mut acc = letters[0].clone();
        for (i, next) in letters.iter().enumerate().skip(1) {
            let right = if i + 1 == letters.len() {
                format!("{next}</w>")
            } else {
                next.clone()
            };
            let merged = format!("{acc}{right}");
            if !known.contains(&merged) {
                if tokens.len() >= 998 {
                    break 'words;
                }
                merges.push(format!("{acc} {right}"));
                known.insert(merged.clone());
                tokens.push(merged.clone());
            }
            acc = merged;
        }
    }
    tokens.push("<|startoftext|>".into());
    tokens.push("<|endoftext|>".into());
    let vocab: serde_json::Map<String, Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, json!(i)))
        .collect();
    (Value::Object(vocab), merges)
}

fn write_tokenizer(dir: &Path, pad: &str) -> Result<()> {
    let (vocab, merges) = vocabulary();
    write_json(&dir.join("vocab.json"), &vocab)?;
    let text = format!("#version: 0.2\n{}\n", merges.join("\n"));
    std::fs::write(dir.join("merges.txt"), text).map_err(io(dir))?;
    let special = json!({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                         "unk_token": "<|endoftext|>", "pad_token": pad});
    write_json(&dir.join("special_tokens_map.json"), &special)?;
    let mut config = special.clone();
    config["model_max_length"] = json!(77);
    config["tokenizer_class"] = json!("CLIPTokenizer");
    config["do_lower_case"] = json!(true);
    config["errors"] = json!("replace");
    write_json(&dir.join("tokenizer_config.json"), &config)
}

fn seeded_builder(map: &VarMap, seed_names: &[(String, usize)]) -> Result<VarBuilder<'static>> {
    let vb = VarBuilder::from_varmap(map, DType::F32, &Device::Cpu);
    // Create the diffusers spellings first, so the builders that probe for
    // them pick them over legacy names.
    for (name, width) in seed_names {
        vb.get_with_hints(
            (*width, *width),
            &format!("{name}.weight"),
            Init::Const(0.0),
        )?;
    }
    Ok(vb)
}

/// Writes a random-weight pipeline of `preset` into `dir`, in `dtype`
/// (f32 or f16), from `seed`.
pub fn write_pipeline(dir: &Path, preset: Preset, dtype: DType, seed: u64) -> Result<()> {
    for (file, value) in configs(preset) {
        write_json(&dir.join(file), &value)?;
    }
    let (weights, text_weights) = ("diffusion_pytorch_model.safetensors", "model.safetensors");
    // UNet.
    let unet_cfg = UNetConfig::read(&dir.join("unet/config.json"))?;
    let map = VarMap::new();
    UNet::new(seeded_builder(&map, &[])?, &unet_cfg)?;
    save(&dir.join("unet"), weights, &fill(&map, seed, dtype)?)?;
    // VAE, with diffusers' attention names.
    let vae_cfg = VaeConfig::read(&dir.join("vae/config.json"))?;
    let map = VarMap::new();
    let top = *vae_cfg.block_out_channels.last().unwrap_or(&32);
    let names: Vec<(String, usize)> = ["encoder", "decoder"]
        .iter()
        .flat_map(|side| {
            ["to_q", "to_k", "to_v", "to_out.0"]
                .map(|p| (format!("{side}.mid_block.attentions.0.{p}"), top))
        })
        .collect();
    AutoEncoderKL::new(
        seeded_builder(&map, &names)?,
        3,
        3,
        AutoEncoderKLConfig {
            block_out_channels: vae_cfg.block_out_channels.clone(),
            layers_per_block: vae_cfg.layers_per_block,
            latent_channels: vae_cfg.latent_channels,
            norm_num_groups: vae_cfg.norm_num_groups,
            use_quant_conv: vae_cfg.use_quant_conv,
            use_post_quant_conv: vae_cfg.use_post_quant_conv,
        },
    )?;
    save(&dir.join("vae"), weights, &fill(&map, seed + 1, dtype)?)?;
    // Text encoder(s) and tokenizer(s).
    for (k, (enc, tok)) in [
        ("text_encoder", "tokenizer"),
        ("text_encoder_2", "tokenizer_2"),
    ]
    .iter()
    .enumerate()
    {
        let config = dir.join(enc).join("config.json");
        if !config.exists() {
            continue;
        }
        let cfg = ClipConfig::read(&config)?;
        let map = VarMap::new();
        let vb = seeded_builder(&map, &[])?;
        vb.get_with_hints(
            cfg.hidden_size,
            "text_model.final_layer_norm.weight",
            Init::Const(1.0),
        )?;
        if k == 1 {
            vb.get_with_hints(
                (cfg.hidden_size, cfg.hidden_size),
                "text_projection.weight",
                Init::Const(0.0),
            )?;
        }
        ClipTextEncoder::new(vb, &cfg)?;
        save(
            &dir.join(enc),
            text_weights,
            &fill(&map, seed + 2 + k as u64, dtype)?,
        )?;
        write_tokenizer(
            &dir.join(tok),
            if preset == Preset::TinyV {
                "!"
            } else {
                "<|endoftext|>"
            },
        )?;
    }
    Ok(())
}
