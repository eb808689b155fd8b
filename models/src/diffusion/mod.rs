//! Stable Diffusion (1.x, 2.x, SDXL and their Turbo variants) from
//! diffusers-layout folders: configs, CLIP tokenizer and text encoder, the
//! conditional UNet, the VAE (candle's), host-side samplers, output
//! encoding, and a writer of random-weight pipelines for tests and
//! benchmarks.

pub mod blocks;
pub mod clip;
pub mod config;
pub mod layout;
pub mod ops;
pub mod output;
pub mod pipeline;
pub mod random;
pub mod sampler;
pub mod tokenizer;
pub mod unet;
pub mod vae;

pub use output::{encode_image, latent_preview, ImageFormat};
pub use pipeline::{EncodedPrompt, ImageJob, Pipeline};
pub use sampler::{Noise, SamplerKind, Schedule};
