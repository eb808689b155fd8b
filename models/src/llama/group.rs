//! Projections that read the same input (q|k|v, gate|up), run as one
//! product where their weights share a format: the input is quantized once
//! and the products of all of them are one parallel pass, rather than one
//! pass (and one wait for the slowest thread) each. A decode step of a
//! small model is dozens of such passes, so each one saved is time saved.

use candle_core::Tensor;

use super::weights::{Linear, Part, Source};
use crate::error::{ModelError, Result};

/// A projection `x · Wᵀ (+ b)`.
pub(super) struct Projection {
    pub(super) weight: Linear,
    pub(super) bias: Option<Tensor>,
}

impl Projection {
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
        let mut apart = Vec::with_capacity(parts.len());
        for (name, bias) in names.iter().zip(&biases) {
            apart.push(Projection {
                weight: src.linear(name)?,
                bias: if src.contains(bias) {
                    Some(src.dense(bias)?)
                } else {
                    None
                },
            });
        }
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
                let y = weight.forward(x)?;
                let mut at = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(1, at, w)?.contiguous()?;
                        at += w;
                        Ok(part)
                    })
                    .collect()
            }
            Self::Apart(parts) => parts.iter().map(|p| p.forward(x)).collect(),
        }
    }
}
