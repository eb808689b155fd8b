//! Group normalization over NCHW activations, optionally fused with SiLU
//! (the pair every Stable Diffusion resnet starts with). A group's channels
//! are contiguous planes, so each (image, group) is one contiguous slice:
//! its mean and variance come from one pass in f64, then each channel is
//! scaled, shifted and activated in place. Every (image, group) is computed
//! on its own, so results do not depend on the batch.

use rayon::prelude::*;

/// Normalizes `x` (`[batch, channels, plane]`) into `out`, with `gamma`
/// and `beta` per channel, then applies SiLU when `silu`.
///
/// # Panics
/// If the lengths disagree or `channels` is not a multiple of `groups`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    out: &mut [f32],
    channels: usize,
    plane: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    silu: bool,
) {
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
#[allow(clippy::too_many_arguments)]
pub fn group_norm_reference(
    x: &[f32],
    channels: usize,
    plane: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    silu: bool,
) -> Vec<f32> {
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
                        * f64::from(gamma[ch])
                        + f64::from(beta[ch]);
                    out[at] = if silu {
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
                let mut out = vec![0f32; x.len()];
                group_norm(
                    &x, &mut out, channels, plane, groups, &gamma, &beta, 1e-5, silu,
                );
                let want =
                    group_norm_reference(&x, channels, plane, groups, &gamma, &beta, 1e-5, silu);
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
        let mut all = vec![0f32; x.len()];
        group_norm(
            &x, &mut all, channels, plane, groups, &gamma, &beta, 1e-6, true,
        );
        let one = &x[channels * plane..2 * channels * plane];
        let mut alone = vec![0f32; one.len()];
        group_norm(
            one, &mut alone, channels, plane, groups, &gamma, &beta, 1e-6, true,
        );
        assert_eq!(alone, all[channels * plane..2 * channels * plane]);
    }
}
