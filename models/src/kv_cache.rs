//! A per-sequence key/value cache owned by the caller, not by the model.
//!
//! Keeping the cache outside the model lets one loaded model serve many
//! sequences: each sequence carries its own cache, and `n > 1` choices fork
//! the cache after a shared prefill.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// The shape of the cache a model needs per layer.
#[derive(Debug, Clone, Copy)]
pub struct CacheShape {
    /// Number of transformer layers.
    pub layers: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Positions the cache may ever hold.
    pub max_positions: usize,
}

struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// Keys and values of every past position of one sequence, for every layer.
pub struct SequenceCache {
    shape: CacheShape,
    dtype: DType,
    device: Device,
    layers: Vec<LayerKv>,
    capacity: usize,
    len: usize,
}

/// Capacity is grown in steps of this many positions, so a short chat does
/// not reserve the whole context up front.
const GROW_STEP: usize = 256;

impl SequenceCache {
    /// An empty cache for a model of `shape`.
    pub fn new(shape: CacheShape, dtype: DType, device: &Device) -> Self {
        Self {
            shape,
            dtype,
            device: device.clone(),
            layers: Vec::new(),
            capacity: 0,
            len: 0,
        }
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes currently reserved by this cache.
    pub fn reserved_bytes(&self) -> usize {
        2 * self.shape.layers
            * self.shape.kv_heads
            * self.shape.head_dim
            * self.capacity
            * self.dtype.size_in_bytes()
    }

    /// A deep copy: appends to the copy never show in the original.
    pub fn fork(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerKv {
                    k: l.k.copy()?,
                    v: l.v.copy()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            shape: self.shape,
            dtype: self.dtype,
            device: self.device.clone(),
            layers,
            capacity: self.capacity,
            len: self.len,
        })
    }

    /// Makes room for `extra` more positions, growing every layer's buffers.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed <= self.capacity {
            return Ok(());
        }
        let capacity = needed
            .div_ceil(GROW_STEP)
            .saturating_mul(GROW_STEP)
            .min(self.shape.max_positions.max(needed));
        let dims = (1, self.shape.kv_heads, capacity, self.shape.head_dim);
        let mut layers = Vec::with_capacity(self.shape.layers);
        for i in 0..self.shape.layers {
            let k = Tensor::zeros(dims, self.dtype, &self.device)?;
            let v = Tensor::zeros(dims, self.dtype, &self.device)?;
            if let Some(old) = self.layers.get(i) {
                if self.len > 0 {
                    k.slice_set(&old.k.narrow(2, 0, self.len)?, 2, 0)?;
                    v.slice_set(&old.v.narrow(2, 0, self.len)?, 2, 0)?;
                }
            }
            layers.push(LayerKv { k, v });
        }
        self.layers = layers;
        self.capacity = capacity;
        Ok(())
    }

    /// Writes `k`/`v` (`[1, kv_heads, t, head_dim]`) for `layer` after the
    /// cached positions and returns all keys and values up to them.
    pub(crate) fn append(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let slot = &self.layers[layer];
        slot.k.slice_set(k, 2, self.len)?;
        slot.v.slice_set(v, 2, self.len)?;
        let total = self.len + t;
        Ok((slot.k.narrow(2, 0, total)?, slot.v.narrow(2, 0, total)?))
    }

    /// Marks `t` more positions as cached, once every layer has appended.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
