//! Projections that read the same input (q|k|v, gate|up), run as one
//! product where their weights share a format: the input is quantized once
//! and the products of all of them are one parallel pass, rather than one
//! pass (and one wait for the slowest thread) each. A decode step of a
//! small model is dozens of such passes, so each one saved is time saved.

use candle_core::Tensor;

use super::weights::{Linear, Part, Source};
use crate::error::{ModelError, Result};

/// The most output bytes one product of a fused group makes at once.
const SLICE_BYTES: usize = 1 << 20;

/// A projection `x · Wᵀ (+ b)`.
pub(super) struct Projection {
    pub(super) weight: Linear,
    pub(super) bias: Option<Tensor>,
}

impl Projection {
    /// Part `part` of layer `layer`, with its bias where the file has one.
    pub(super) fn load(src: &mut dyn Source, layer: usize, part: Part) -> Result<Self> {
        let bias = src.block_name(layer, part, true);
        Ok(Self {
            weight: src.linear(&src.block_name(layer, part, false))?,
            bias: if src.contains(&bias) {
                Some(src.dense(&bias)?)
            } else {
                None
            },
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Projections of one input: one product whose output columns are the
/// parts side by side, or one product per part.
pub(super) enum Group {
    Fused {
        weight: Projection,
        /// Each part's output width, in order.
        widths: Vec<usize>,
    },
    Apart(Vec<Projection>),
}

impl Group {
    /// The parts of layer `layer`, fused where the source can.
    pub(super) fn load(src: &mut dyn Source, layer: usize, parts: &[Part]) -> Result<Self> {
        let names: Vec<String> = parts
            .iter()
            .map(|&p| src.block_name(layer, p, false))
            .collect();
        let biases: Vec<String> = parts
            .iter()
            .map(|&p| src.block_name(layer, p, true))
            .collect();
        let with_bias = biases.iter().filter(|b| src.contains(b)).count();
        // Fused only where every part has a bias or none does.
        if with_bias == 0 || with_bias == parts.len() {
            if let Some((weight, widths)) = src.linear_fused(&names)? {
                let bias = if with_bias == 0 {
                    None
                } else {
                    let parts = biases
                        .iter()
                        .map(|b| src.dense(b))
                        .collect::<Result<Vec<_>>>()?;
                    Some(Tensor::cat(&parts, 0)?)
                };
                return Ok(Self::Fused {
                    weight: Projection { weight, bias },
                    widths,
                });
            }
        }
        let apart = parts
            .iter()
            .map(|&p| Projection::load(src, layer, p))
            .collect::<Result<_>>()?;
        Ok(Self::Apart(apart))
    }

    /// A projection stored fused in the file (Phi-3's q|k|v and gate|up),
    /// whose output rows are `widths` in order.
    pub(super) fn stored_fused(src: &mut dyn Source, name: &str, widths: &[usize]) -> Result<Self> {
        let weight = src.linear(name)?;
        let rows = weight.rows()?;
        if widths.iter().sum::<usize>() != rows {
            return Err(ModelError::Tensor {
                name: name.into(),
                message: format!("{rows} rows do not split into {widths:?}"),
            });
        }
        Ok(Self::Fused {
            weight: Projection { weight, bias: None },
            widths: widths.to_vec(),
        })
    }

    /// Each part's output for `x` (`[rows, in]` → `[rows, width]` each,
    /// contiguous).
    pub(super) fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Fused { weight, widths } => {
                // A prompt's rows go through in slices, so that the product's
                // buffers stay small enough to be reused from the heap
                // rather than mapped and faulted in anew (a 512-row gate|up
                // product of SmolLM2 is 6 MB); each slice's output is split
                // straight into the parts.
                let (m, total) = (x.dim(0)?, widths.iter().sum::<usize>().max(1));
                let slice = (SLICE_BYTES / (4 * total)).max(8);
                let mut parts: Vec<Vec<f32>> =
                    widths.iter().map(|w| Vec::with_capacity(m * w)).collect();
                for start in (0..m).step_by(slice) {
                    let rows = slice.min(m - start);
                    let y = weight.forward(&x.narrow(0, start, rows)?)?;
                    let y = y.flatten_all()?.to_vec1::<f32>()?;
                    for row in y.chunks_exact(total) {
                        let mut at = 0;
                        for (part, &w) in parts.iter_mut().zip(widths) {
                            part.extend_from_slice(&row[at..at + w]);
                            at += w;
                        }
                    }
                }
                parts
                    .into_iter()
                    .zip(widths)
                    .map(|(p, &w)| Ok(Tensor::from_vec(p, (m, w), x.device())?))
                    .collect()
            }
            Self::Apart(parts) => parts.iter().map(|p| p.forward(x)).collect(),
        }
    }
}
