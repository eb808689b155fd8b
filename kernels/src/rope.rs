//! Rotary position embedding applied in place to rows of heads, each row at
//! its own position: what a batch of sequences at different positions needs.
//!
//! Two pairings exist in the wild: GGUF files permute the query/key weights
//! so each rotated pair is adjacent (`(2i, 2i+1)`, "interleaved"); Hugging
//! Face checkpoints rotate the two halves of a head (`(i, i + d/2)`).

/// Rotary tables: `cos[p * half + i]` and `sin[…]` for position `p` and
/// frequency `i` (`half` = head dim / 2).
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    positions: usize,
}

impl RopeTables {
    /// Tables for `positions` positions from per-frequency inverse
    /// wavelengths `inv_freq` (`head_dim / 2` of them).
    pub fn new(inv_freq: &[f32], positions: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            cos,
            sin,
            half,
            positions,
        }
    }

    /// Positions the tables cover.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// The tables as one f32 array `[positions, 2, half]`: each position's
    /// cosines, then its sines (what [`crate::rope_in_place`] reads).
    pub fn cos_sin(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(2 * self.cos.len());
        for (c, s) in self
            .cos
            .chunks(self.half.max(1))
            .zip(self.sin.chunks(self.half.max(1)))
        {
            out.extend_from_slice(c);
            out.extend_from_slice(s);
        }
        out
    }

    /// Bytes the tables take.
    pub fn bytes(&self) -> usize {
        2 * self.cos.len() * std::mem::size_of::<f32>()
    }

    /// Rotates `x` (`[rows, heads, 2 * half]`), row `r` at `positions[r]`.
    ///
    /// # Panics
    /// If `x` is not `positions.len()` rows of whole heads, or a position is
    /// outside the tables (callers check positions against the context).
    pub fn apply(&self, x: &mut [f32], positions: &[usize], interleaved: bool) {
        let dim = 2 * self.half;
        let row_len = x.len() / positions.len().max(1);
        assert!(
            row_len.is_multiple_of(dim) && row_len * positions.len() == x.len(),
            "rope: {} values are not {} rows of {dim}-wide heads",
            x.len(),
            positions.len()
        );
        for (row, &p) in x.chunks_exact_mut(row_len).zip(positions) {
            let cos = &self.cos[p * self.half..(p + 1) * self.half];
            let sin = &self.sin[p * self.half..(p + 1) * self.half];
            for head in row.chunks_exact_mut(dim) {
                if interleaved {
                    for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                        let (a, b) = (pair[0], pair[1]);
                        pair[0] = a * cos[i] - b * sin[i];
                        pair[1] = a * sin[i] + b * cos[i];
                    }
                } else {
                    let (lo, hi) = head.split_at_mut(self.half);
                    for i in 0..self.half {
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * cos[i] - b * sin[i];
                        hi[i] = a * sin[i] + b * cos[i];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// candle's stock rotary ops, one row at a time, are the reference.
    fn reference(
        x: &[f32],
        heads: usize,
        dim: usize,
        pos: &[usize],
        t: &RopeTables,
        interleaved: bool,
    ) -> Vec<f32> {
        let half = dim / 2;
        let mut out = Vec::new();
        for (r, &p) in pos.iter().enumerate() {
            let row = &x[r * heads * dim..(r + 1) * heads * dim];
            let xt = Tensor::from_slice(row, (1, heads, 1, dim), &Device::Cpu).unwrap();
            let cos = Tensor::from_slice(&t.cos[p * half..(p + 1) * half], (1, half), &Device::Cpu)
                .unwrap();
            let sin = Tensor::from_slice(&t.sin[p * half..(p + 1) * half], (1, half), &Device::Cpu)
                .unwrap();
            let y = if interleaved {
                candle_nn_rope_i(&xt, &cos, &sin)
            } else {
                candle_nn_rope(&xt, &cos, &sin)
            };
            out.extend(y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        out
    }

    // The rotation written with tensor ops: pairs are split, rotated, rejoined.
    fn candle_nn_rope_i(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let (b, h, t, d) = x.dims4().unwrap();
        let pairs = x.reshape((b, h, t, d / 2, 2)).unwrap();
        let a = pairs.narrow(4, 0, 1).unwrap().squeeze(4).unwrap();
        let c = pairs.narrow(4, 1, 1).unwrap().squeeze(4).unwrap();
        let (ra, rc) = rotate(&a, &c, cos, sin);
        Tensor::stack(&[ra, rc], 4)
            .unwrap()
            .reshape((b, h, t, d))
            .unwrap()
    }

    fn candle_nn_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let d = x.dim(3).unwrap();
        let a = x.narrow(3, 0, d / 2).unwrap();
        let c = x.narrow(3, d / 2, d / 2).unwrap();
        let (ra, rc) = rotate(&a, &c, cos, sin);
        Tensor::cat(&[ra, rc], 3).unwrap()
    }

    fn rotate(a: &Tensor, c: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor) {
        let ra = (a.broadcast_mul(cos).unwrap() - c.broadcast_mul(sin).unwrap()).unwrap();
        let rc = (a.broadcast_mul(sin).unwrap() + c.broadcast_mul(cos).unwrap()).unwrap();
        (ra, rc)
    }

    #[test]
    fn rows_at_their_own_positions_match_the_reference() {
        let mut rng = StdRng::seed_from_u64(11);
        for (heads, dim) in [(1, 2), (3, 64), (5, 10)] {
            let inv: Vec<f32> = (0..dim / 2)
                .map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / dim as f32))
                .collect();
            let tables = RopeTables::new(&inv, 300);
            let pos = [0usize, 7, 299, 3, 3];
            let x: Vec<f32> = (0..pos.len() * heads * dim)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            for interleaved in [true, false] {
                let mut got = x.clone();
                tables.apply(&mut got, &pos, interleaved);
                let want = reference(&x, heads, dim, &pos, &tables, interleaved);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-5,
                        "{heads}x{dim} interleaved={interleaved}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
