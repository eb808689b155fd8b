//! A Stable Diffusion pipeline loaded from a diffusers folder: prompt
//! encoding, one batched denoising step for any set of images that share a
//! size, sampler and step count, and decoding. The engine drives it step
//! by step; so do the known-answer tests.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::clip::ClipTextEncoder;
use super::config::{ClipConfig, UNetConfig, VaeConfig};
use super::layout::{component_weights, PipelineIndex, SchedulerConfig};
use super::sampler::{Noise, SamplerKind, SamplerState, Schedule};
use super::tokenizer::ClipTokenizer;
use super::unet::{AddedCond, UNet};
use super::vae::VaeDecoder;
use crate::error::{ModelError, Result};

fn vars(dir: &Path, device: &Device, dtype: DType) -> Result<VarBuilder<'static>> {
    let files = component_weights(dir)?;
    // SAFETY: weight files are mapped read-only and never written while
    // loaded (downloads land under new names). Each tensor goes from the
    // mapped file to the device and is converted there.
    Ok(unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? })
}

struct TextStack {
    tokenizer: ClipTokenizer,
    encoder: ClipTextEncoder,
}

/// One prompt's conditioning: per-token states and, for SDXL, the pooled
/// embedding.
#[derive(Debug, Clone)]
pub struct Conditioning {
    context: Tensor,
    pooled: Option<Tensor>,
}

/// A request's encoded prompt and negative prompt.
#[derive(Debug, Clone)]
pub struct EncodedPrompt {
    cond: Conditioning,
    uncond: Conditioning,
    /// Prompt plus negative-prompt tokens, before truncation.
    pub tokens: usize,
}

/// One image being generated.
#[derive(Debug)]
pub struct ImageJob {
    /// Latents, channels × height × width.
    pub latents: Vec<f32>,
    /// Classifier-free guidance scale; ≤ 1 runs the prompt alone.
    pub guidance: f32,
    pub state: SamplerState,
    pub noise: Noise,
}

impl ImageJob {
    /// Starts an image from `seed`: its initial latents are the first
    /// normals of the seed's stream, scaled for the schedule; ancestral
    /// noise continues the same stream.
    pub fn from_seed(seed: u64, guidance: f32, len: usize, schedule: &Schedule) -> Self {
        let mut noise = Noise::new(seed);
        let sigma = schedule.init_noise_sigma() as f32;
        let latents = noise.normals(len).into_iter().map(|x| x * sigma).collect();
        Self::from_latents(latents, guidance, noise)
    }

    /// Starts an image from given latents (already scaled).
    pub fn from_latents(latents: Vec<f32>, guidance: f32, noise: Noise) -> Self {
        Self {
            latents,
            guidance,
            state: SamplerState::default(),
            noise,
        }
    }

    fn guided(&self) -> bool {
        self.guidance > 1.0
    }
}

/// A loaded pipeline.
pub struct Pipeline {
    index: PipelineIndex,
    text: Vec<TextStack>,
    unet: UNet,
    unet_cfg: UNetConfig,
    vae: VaeDecoder,
    vae_cfg: VaeConfig,
    scheduler: SchedulerConfig,
    device: Device,
    dtype: DType,
}

impl Pipeline {
    /// Loads every component of the pipeline folder `dir` in f32 (on the
    /// CPU: our dense kernels).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_as(dir, device, DType::F32)
    }

    /// Loads the pipeline onto `device` with weights and activations in
    /// `dtype` (bf16/f16 on a GPU). Sampling stays in f32 on the host.
    pub fn load_as(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let index = PipelineIndex::read(dir)?;
        let unet_cfg = UNetConfig::read(&dir.join("unet/config.json"))?;
        let vae_cfg = VaeConfig::read(&dir.join("vae/config.json"))?;
        let scheduler = SchedulerConfig::read(&dir.join("scheduler/scheduler_config.json"))?;
        let mut stacks = vec![("text_encoder", "tokenizer")];
        if index.dual_text_encoder {
            stacks.push(("text_encoder_2", "tokenizer_2"));
        }
        let mut text = Vec::new();
        let mut width = 0;
        for (enc, tok) in stacks {
            let cfg = ClipConfig::read(&dir.join(enc).join("config.json"))?;
            width += cfg.hidden_size;
            text.push(TextStack {
                tokenizer: ClipTokenizer::from_dir(&dir.join(tok), cfg.max_positions)?,
                encoder: ClipTextEncoder::new(vars(&dir.join(enc), device, dtype)?, &cfg)?,
            });
        }
        if width != unet_cfg.cross_attention_dim {
            return Err(ModelError::BadFormat {
                path: dir.join("unet/config.json"),
                format: "diffusers config",
                message: format!(
                    "`cross_attention_dim` {} does not match the text encoders' width {width}",
                    unet_cfg.cross_attention_dim
                ),
            });
        }
        if unet_cfg.text_time.is_some() != index.dual_text_encoder {
            return Err(ModelError::BadFormat {
                path: dir.join("model_index.json"),
                format: "diffusers config",
                message: "SDXL conditioning needs `text_encoder_2`, and only SDXL uses it".into(),
            });
        }
        let unet = UNet::new(vars(&dir.join("unet"), device, dtype)?, &unet_cfg)?;
        let vae = VaeDecoder::new(vars(&dir.join("vae"), device, dtype)?, &vae_cfg)?;
        Ok(Self {
            index,
            text,
            unet,
            unet_cfg,
            vae,
            vae_cfg,
            scheduler,
            device: device.clone(),
            dtype,
        })
    }

    /// Pixels per latent along a side.
    pub fn latent_factor(&self) -> usize {
        self.vae_cfg.scale_factor()
    }

    /// The image side the model was trained at.
    pub fn native_size(&self) -> usize {
        self.unet_cfg.sample_size * self.latent_factor()
    }

    /// Latent values per image of `width` × `height` pixels.
    pub fn latent_len(&self, width: usize, height: usize) -> usize {
        let f = self.latent_factor();
        self.unet_cfg.in_channels * (width / f) * (height / f)
    }

    /// The sampler the folder's scheduler config names.
    pub fn default_sampler(&self) -> SamplerKind {
        SamplerKind::from_class(&self.scheduler.class_name, self.scheduler.use_karras_sigmas)
    }

    /// Training timesteps of the noise schedule (the most steps a sampler
    /// can take).
    pub fn train_timesteps(&self) -> usize {
        self.scheduler.num_train_timesteps
    }

    /// The schedule of `kind` over `steps` steps.
    pub fn schedule(&self, kind: SamplerKind, steps: usize) -> Schedule {
        Schedule::new(&self.scheduler, kind, steps)
    }

    /// The pipeline class from `model_index.json`.
    pub fn class_name(&self) -> &str {
        &self.index.class_name
    }

    /// The first tokenizer's row for `text` (what the UNet is conditioned on).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.text[0].tokenizer.encode(text)?.ids)
    }

    fn encode_one(&self, text: &str) -> Result<(Conditioning, usize)> {
        let sdxl = self.text.len() > 1;
        let mut contexts = Vec::new();
        let mut pooled = None;
        let mut tokens = 0;
        for stack in &self.text {
            let t = stack.tokenizer.encode(text)?;
            tokens = tokens.max(t.prompt_tokens);
            let out = stack
                .encoder
                .forward(std::slice::from_ref(&t.ids), &self.device)?;
            contexts.push(if sdxl { out.penultimate } else { out.last });
            pooled = Some(out.pooled);
        }
        let context = Tensor::cat(&contexts, 2)?;
        Ok((
            Conditioning {
                context,
                pooled: if sdxl { pooled } else { None },
            },
            tokens,
        ))
    }

    /// Encodes a prompt and its negative prompt (empty when absent).
    pub fn encode_prompt(&self, prompt: &str, negative: Option<&str>) -> Result<EncodedPrompt> {
        let (cond, tokens) = self.encode_one(prompt)?;
        let negative = negative.unwrap_or("");
        let (uncond, neg_tokens) = if negative.is_empty() && self.index.force_zeros_for_empty_prompt
        {
            let zeros = Conditioning {
                context: cond.context.zeros_like()?,
                pooled: cond.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
            };
            (zeros, 0)
        } else {
            self.encode_one(negative)?
        };
        Ok(EncodedPrompt {
            cond,
            uncond,
            tokens: tokens + neg_tokens,
        })
    }

    /// Runs step `i` of `schedule` for every image in `images` with one
    /// UNet call: guided images contribute an unconditioned and a
    /// conditioned row, the others one row.
    pub fn step(
        &self,
        schedule: &Schedule,
        i: usize,
        images: &mut [(&EncodedPrompt, &mut ImageJob)],
        width: usize,
        height: usize,
    ) -> Result<()> {
        let f = self.latent_factor();
        let (c, h, w) = (self.unet_cfg.in_channels, height / f, width / f);
        let scale = schedule.input_scale(i) as f32;
        let mut input = Vec::new();
        let mut contexts = Vec::new();
        let mut pooled = Vec::new();
        let mut rows = 0;
        for (prompt, job) in images.iter() {
            let mut conds = vec![&prompt.cond];
            if job.guided() {
                conds.insert(0, &prompt.uncond);
            }
            for cond in conds {
                input.extend(job.latents.iter().map(|x| x * scale));
                contexts.push(cond.context.clone());
                pooled.extend(cond.pooled.clone());
                rows += 1;
            }
        }
        if rows == 0 {
            return Ok(());
        }
        let xs = Tensor::from_vec(input, (rows, c, h, w), &self.device)?.to_dtype(self.dtype)?;
        let context = Tensor::cat(&contexts, 0)?;
        let text_embeds = if pooled.is_empty() {
            None
        } else {
            Some(Tensor::cat(&pooled, 0)?)
        };
        let time_ids = match &text_embeds {
            Some(_) => {
                let (hh, ww) = (height as f32, width as f32);
                let one = [hh, ww, 0.0, 0.0, hh, ww];
                Some(Tensor::from_vec(one.repeat(rows), (rows, 6), &self.device)?)
            }
            None => None,
        };
        let added = match (&text_embeds, &time_ids) {
            (Some(text_embeds), Some(time_ids)) => Some(AddedCond {
                text_embeds,
                time_ids,
            }),
            _ => None,
        };
        let out = self
            .unet
            .forward(&xs, schedule.timesteps()[i], &context, added)?;
        let out: Vec<f32> = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let per = c * h * w;
        let mut row = 0;
        for (_, job) in images.iter_mut() {
            let guided = if job.guided() {
                let (u, t) = (
                    &out[row * per..(row + 1) * per],
                    &out[(row + 1) * per..(row + 2) * per],
                );
                row += 2;
                u.iter()
                    .zip(t)
                    .map(|(u, t)| u + job.guidance * (t - u))
                    .collect()
            } else {
                row += 1;
                out[(row - 1) * per..row * per].to_vec()
            };
            let ImageJob {
                latents,
                state,
                noise,
                ..
            } = &mut **job;
            schedule.step(i, state, latents, &guided, &mut || noise.normal());
        }
        Ok(())
    }

    /// Decodes one image's latents to RGB bytes, row-major.
    pub fn decode(&self, latents: &[f32], width: usize, height: usize) -> Result<Vec<u8>> {
        let f = self.latent_factor();
        let c = self.vae_cfg.latent_channels;
        let xs = Tensor::from_vec(
            latents.to_vec(),
            (1, c, height / f, width / f),
            &self.device,
        )?;
        let xs = ((xs / self.vae_cfg.scaling_factor)? + self.vae_cfg.shift_factor)?;
        let img = self
            .vae
            .forward(&xs.to_dtype(self.dtype)?)?
            .to_dtype(DType::F32)?;
        let img = ((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        let img = (img * 255.0)?.round()?.squeeze(0)?.permute((1, 2, 0))?;
        let values: Vec<f32> = img.flatten_all()?.to_vec1()?;
        Ok(values.into_iter().map(|v| v as u8).collect())
    }
}
