//! Turning RGB pixels into the bytes a client asked for, and a cheap
//! preview of latents for progress events.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder};

use crate::error::{ModelError, Result};

/// An image file format a request may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
    /// Lossless WebP (the encoder at hand has no lossy mode).
    Webp,
}

impl ImageFormat {
    /// Parses `png`, `jpeg`/`jpg` or `webp`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "png" => Some(Self::Png),
            "jpeg" | "jpg" => Some(Self::Jpeg),
            "webp" => Some(Self::Webp),
            _ => None,
        }
    }

    /// The name clients use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }
}

/// Encodes row-major RGB bytes; `quality` (0–100) applies to JPEG.
pub fn encode_image(
    rgb: &[u8],
    width: usize,
    height: usize,
    format: ImageFormat,
    quality: u8,
) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    let (w, h) = (width as u32, height as u32);
    let ty = ExtendedColorType::Rgb8;
    let done = match format {
        ImageFormat::Png => PngEncoder::new(&mut out).write_image(rgb, w, h, ty),
        ImageFormat::Jpeg => JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100))
            .write_image(rgb, w, h, ty),
        ImageFormat::Webp => WebPEncoder::new_lossless(&mut out).write_image(rgb, w, h, ty),
    };
    done.map_err(|e| ModelError::Tensor {
        name: "image".into(),
        message: e.to_string(),
    })?;
    Ok(out.into_inner())
}

/// A rough RGB rendering of SD latents at latent resolution, without the
/// VAE: a fixed linear map of the first four channels (the factors the SD
/// community uses for live previews).
pub fn latent_preview(latents: &[f32], channels: usize, width: usize, height: usize) -> Vec<u8> {
    const FACTORS: [[f32; 3]; 4] = [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ];
    let plane = width * height;
    let mut rgb = vec![0u8; plane * 3];
    for p in 0..plane {
        for (k, out) in rgb[p * 3..p * 3 + 3].iter_mut().enumerate() {
            let v: f32 = (0..channels.min(4))
                .map(|c| latents[c * plane + p] * FACTORS[c][k])
                .sum();
            *out = ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8;
        }
    }
    rgb
}
