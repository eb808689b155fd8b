//! Group normalization over NCHW activations, optionally fused with SiLU
//! (the pair every Stable Diffusion resnet starts with). A group's channels
//! are contiguous planes, so each (image, group) is one contiguous slice:
//! its mean and variance come from one pass in f64, then each channel is
//! scaled, shifted and activated in place. Every (image, group) is computed
//! on its own, so results do not depend on the batch.

use rayon::prelude::*;

/// One group normalization: the shape of `[batch, channels, plane]`
/// activations, the groups, the per-channel scale and shift, epsilon, and
/// whether SiLU follows.
#[derive(Debug, Clone, Copy)]
pub struct GroupNorm<'a> {
    /// Channels per image.
    pub channels: usize,
    /// Values per channel (height × width).
    pub plane: usize,
    /// Groups the channels split into.
    pub groups: usize,
    /// Scale per channel.
    pub gamma: &'a [f32],
    /// Shift per channel.
    pub beta: &'a [f32],
    /// Added to the variance.
    pub eps: f32,
    /// Apply SiLU after the affine.
    pub silu: bool,
}

/// Normalizes `x` (`[batch, channels, plane]`) into `out` as `p` says.
///
/// # Panics
/// If the lengths disagree or `channels` is not a multiple of `groups`.
pub fn group_norm(x: &[f32], out: &mut [f32], p: &GroupNorm<'_>) {
    let GroupNorm {
        channels,
        plane,
        groups,
        gamma,
        beta,
        eps,
        silu,
    } = *p;
    assert!(
        groups > 0 && channels.is_multiple_of(groups),
        "{channels} channels in {groups} groups"
    );
    assert_eq!(x.len(), out.len());
    assert!(gamma.len() == channels && beta.len() == channels);
    let per_group = channels / groups * plane;
    assert!(x.len().is_multiple_of(per_group.max(1)));
    out.par_chunks_mut(per_group)
        .zip(x.par_chunks(per_group))
        .enumerate()
        .for_each(|(unit, (dst, src))| {
            let g = unit % groups;
            let (mut sum, mut sq) = (0f64, 0f64);
            for &v in src {
                sum += f64::from(v);
                sq += f64::from(v) * f64::from(v);
            }
            let n = src.len() as f64;
            let mean = sum / n;
            let var = (sq / n - mean * mean).max(0.0);
            let inv = (1.0 / (var + f64::from(eps)).sqrt()) as f32;
            let mean = mean as f32;
            for (c, (d, s)) in dst.chunks_mut(plane).zip(src.chunks(plane)).enumerate() {
                let ch = g * (channels / groups) + c;
                let (scale, shift) = (gamma[ch] * inv, beta[ch]);
                if silu {
                    for (o, &v) in d.iter_mut().zip(s) {
                        let y = (v - mean) * scale + shift;
                        *o = y / (1.0 + crate::activation::exp(-y));
                    }
                } else {
                    for (o, &v) in d.iter_mut().zip(s) {
                        *o = (v - mean) * scale + shift;
                    }
                }
            }
        });
}

/// The plain definition, in f64, for tests.
pub fn group_norm_reference(x: &[f32], p: &GroupNorm<'_>) -> Vec<f32> {
    let (channels, plane, groups, eps) = (p.channels, p.plane, p.groups, p.eps);
    let per = channels / groups;
    let mut out = vec![0f32; x.len()];
    for (b, img) in x.chunks(channels * plane).enumerate() {
        for g in 0..groups {
            let s = &img[g * per * plane..(g + 1) * per * plane];
            let mean = s.iter().map(|&v| f64::from(v)).sum::<f64>() / s.len() as f64;
            let var = s
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / s.len() as f64;
            for c in 0..per {
                let ch = g * per + c;
                for i in 0..plane {
                    let at = b * channels * plane + ch * plane + i;
                    let y = (f64::from(x[at]) - mean) / (var + f64::from(eps)).sqrt()
                        * f64::from(p.gamma[ch])
                        + f64::from(p.beta[ch]);
                    out[at] = if p.silu {
                        (y / (1.0 + (-y).exp())) as f32
                    } else {
                        y as f32
                    };
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1 << 24) as f32 * 6.0 - 2.5
            })
            .collect()
    }

    #[test]
    fn matches_the_reference_on_odd_shapes() {
        for (batch, channels, plane, groups) in [
            (1, 32, 1, 32),
            (2, 64, 17, 32),
            (3, 96, 63, 32),
            (1, 12, 5, 3),
            (2, 320, 64, 32),
        ] {
            let x = data(batch * channels * plane, channels as u32);
            let gamma = data(channels, 7);
            let beta = data(channels, 9);
            for silu in [false, true] {
                let p = GroupNorm {
                    channels,
                    plane,
                    groups,
                    gamma: &gamma,
                    beta: &beta,
                    eps: 1e-5,
                    silu,
                };
                let mut out = vec![0f32; x.len()];
                group_norm(&x, &mut out, &p);
                let want = group_norm_reference(&x, &p);
                let worst = out
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 2e-5,
                    "{batch}x{channels}x{plane}/{groups} silu {silu}: {worst}"
                );
            }
        }
    }

    #[test]
    fn an_image_is_the_same_alone_and_batched() {
        let (channels, plane, groups) = (64, 40, 32);
        let x = data(3 * channels * plane, 3);
        let gamma = data(channels, 1);
        let beta = data(channels, 2);
        let p = GroupNorm {
            channels,
            plane,
            groups,
            gamma: &gamma,
            beta: &beta,
            eps: 1e-6,
            silu: true,
        };
        let mut all = vec![0f32; x.len()];
        group_norm(&x, &mut all, &p);
        let one = &x[channels * plane..2 * channels * plane];
        let mut alone = vec![0f32; one.len()];
        group_norm(one, &mut alone, &p);
        assert_eq!(alone, all[channels * plane..2 * channels * plane]);
    }
}
