//! Samplers, run on the host per image: DDIM, Euler, Euler ancestral and
//! DPM++ 2M (optionally with Karras sigmas), following diffusers'
//! schedulers step for step, with the schedule from the pipeline's
//! `scheduler_config.json`. Each image keeps its own state and its own
//! noise stream, so its result never depends on what it is batched with.

use super::layout::SchedulerConfig;

/// A sampler a request may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mKarras,
}

impl SamplerKind {
    /// Every accepted name, for error messages.
    pub const NAMES: &'static [&'static str] =
        &["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"];

    /// Parses a request's `sampler` (A1111-style spellings accepted).
    pub fn parse(name: &str) -> Option<Self> {
        let n = name
            .trim()
            .to_ascii_lowercase()
            .replace("++", "pp")
            .replace([' ', '-'], "_");
        Some(match n.as_str() {
            "ddim" => Self::Ddim,
            "euler" => Self::Euler,
            "euler_a" | "euler_ancestral" => Self::EulerAncestral,
            "dpmpp_2m" | "dpm_solver_multistep" => Self::DpmPp2m,
            "dpmpp_2m_karras" => Self::DpmPp2mKarras,
            _ => return None,
        })
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_a",
            Self::DpmPp2m => "dpmpp_2m",
            Self::DpmPp2mKarras => "dpmpp_2m_karras",
        }
    }

    /// The sampler matching a diffusers scheduler class; DDIM for classes
    /// Kindling does not implement (PNDM, LMS, …).
    pub fn from_class(class: &str, karras: bool) -> Self {
        match class {
            "EulerDiscreteScheduler" => Self::Euler,
            "EulerAncestralDiscreteScheduler" => Self::EulerAncestral,
            "DPMSolverMultistepScheduler" if karras => Self::DpmPp2mKarras,
            "DPMSolverMultistepScheduler" => Self::DpmPp2m,
            _ => Self::Ddim,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Prediction {
    Epsilon,
    V,
    Sample,
}

/// A schedule fixed for one sampler and step count.
#[derive(Debug, Clone)]
pub struct Schedule {
    kind: SamplerKind,
    timesteps: Vec<f64>,
    /// Euler/DPM: the noise level at each step, plus the final one.
    sigmas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    final_alpha: f64,
    step_ratio: i64,
    prediction: Prediction,
    clip: Option<f64>,
    init_noise_sigma: f64,
}

/// What one image's sampler carries between steps.
#[derive(Debug, Clone, Default)]
pub struct SamplerState {
    previous_x0: Option<Vec<f32>>,
}

fn interp(x: f64, ys: &[f64]) -> f64 {
    let x = x.clamp(0.0, (ys.len() - 1) as f64);
    let lo = x.floor() as usize;
    let hi = (lo + 1).min(ys.len() - 1);
    ys[lo] + (ys[hi] - ys[lo]) * (x - lo as f64)
}

fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let ls = sigma.max(1e-10).ln();
    let below = log_sigmas.iter().filter(|&&l| ls - l >= 0.0).count();
    let low = below.saturating_sub(1).min(log_sigmas.len() - 2);
    let w = ((log_sigmas[low] - ls) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

fn karras(first: f64, last: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (max_inv, min_inv) = (first.powf(1.0 / rho), last.powf(1.0 / rho));
    (0..n)
        .map(|i| {
            let ramp = if n > 1 {
                i as f64 / (n - 1) as f64
            } else {
                0.0
            };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect()
}

/// Spaces `n` of `t` training steps as diffusers' `timestep_spacing` does.
fn spaced(cfg: &SchedulerConfig, spacing: &str, n: usize, round_linspace: bool) -> Vec<f64> {
    let t = cfg.num_train_timesteps;
    match spacing {
        "linspace" => (0..n)
            .rev()
            .map(|i| {
                let v = if n > 1 {
                    i as f64 * (t - 1) as f64 / (n - 1) as f64
                } else {
                    0.0
                };
                if round_linspace {
                    v.round_ties_even()
                } else {
                    v
                }
            })
            .collect(),
        "trailing" => {
            let ratio = t as f64 / n as f64;
            (0..n)
                .map(|i| (t as f64 - i as f64 * ratio).round_ties_even() - 1.0)
                .collect()
        }
        _ => {
            let ratio = t / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + cfg.steps_offset) as f64)
                .collect()
        }
    }
}

impl Schedule {
    /// Fixes the schedule for `steps` steps of `kind`.
    pub fn new(cfg: &SchedulerConfig, kind: SamplerKind, steps: usize) -> Self {
        let t = cfg.num_train_timesteps;
        let betas: Vec<f64> = match cfg.beta_schedule.as_str() {
            "scaled_linear" => {
                let (a, b) = (cfg.beta_start.sqrt(), cfg.beta_end.sqrt());
                (0..t)
                    .map(|i| (a + (b - a) * i as f64 / (t - 1) as f64).powi(2))
                    .collect()
            }
            "squaredcos_cap_v2" => {
                let f = |x: f64| {
                    ((x + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..t)
                    .map(|i| {
                        (1.0 - f((i + 1) as f64 / t as f64) / f(i as f64 / t as f64)).min(0.999)
                    })
                    .collect()
            }
            _ => (0..t)
                .map(|i| {
                    cfg.beta_start + (cfg.beta_end - cfg.beta_start) * i as f64 / (t - 1) as f64
                })
                .collect(),
        };
        let mut acc = 1.0;
        let alphas_cumprod: Vec<f64> = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        let all_sigmas: Vec<f64> = alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect();
        let log_sigmas: Vec<f64> = all_sigmas.iter().map(|s| s.ln()).collect();
        let prediction = match cfg.prediction_type.as_str() {
            "v_prediction" => Prediction::V,
            "sample" => Prediction::Sample,
            _ => Prediction::Epsilon,
        };
        // Karras sigmas: asked for by name, or by the folder for Euler (as
        // diffusers' Euler class honours `use_karras_sigmas`; its ancestral
        // class does not, and plain `dpmpp_2m` stays plain).
        let use_karras = kind == SamplerKind::DpmPp2mKarras
            || (cfg.use_karras_sigmas && kind == SamplerKind::Euler);
        let spacing = cfg
            .timestep_spacing
            .as_deref()
            .unwrap_or(if kind == SamplerKind::Ddim {
                "leading"
            } else {
                "linspace"
            });
        let (timesteps, sigmas) = match kind {
            SamplerKind::Ddim => (spaced(cfg, spacing, steps, true), Vec::new()),
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let ts = spaced(cfg, spacing, steps, false);
                let mut sig: Vec<f64> = ts.iter().map(|&x| interp(x, &all_sigmas)).collect();
                let ts = if use_karras {
                    sig = karras(sig[0], sig[sig.len() - 1], steps);
                    sig.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect()
                } else {
                    ts
                };
                sig.push(0.0);
                (ts, sig)
            }
            SamplerKind::DpmPp2m | SamplerKind::DpmPp2mKarras => {
                let ts: Vec<f64> = match spacing {
                    "linspace" => (1..=steps)
                        .rev()
                        .map(|i| (i as f64 * (t - 1) as f64 / steps as f64).round_ties_even())
                        .collect(),
                    "trailing" => spaced(cfg, spacing, steps, true),
                    _ => {
                        let ratio = t / (steps + 1);
                        (1..=steps)
                            .rev()
                            .map(|i| (i * ratio + cfg.steps_offset) as f64)
                            .collect()
                    }
                };
                let mut sig: Vec<f64> = ts.iter().map(|&x| interp(x, &all_sigmas)).collect();
                let ts = if use_karras {
                    // diffusers' DPM solver spans the whole training range.
                    sig = karras(all_sigmas[t - 1], all_sigmas[0], steps);
                    sig.iter()
                        .map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even())
                        .collect()
                } else {
                    ts
                };
                sig.push(0.0);
                (ts, sig)
            }
        };
        let max_sigma = sigmas.iter().copied().fold(0.0, f64::max);
        let init_noise_sigma = match kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                if matches!(spacing, "linspace" | "trailing") {
                    max_sigma
                } else {
                    (max_sigma * max_sigma + 1.0).sqrt()
                }
            }
            _ => 1.0,
        };
        Self {
            kind,
            timesteps,
            sigmas,
            final_alpha: if cfg.set_alpha_to_one {
                1.0
            } else {
                alphas_cumprod[0]
            },
            alphas_cumprod,
            step_ratio: (t / steps.max(1)) as i64,
            prediction,
            clip: cfg.clip_sample.then_some(cfg.clip_sample_range),
            init_noise_sigma,
        }
    }

    /// The UNet timestep at each step.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// How far initial unit noise is scaled.
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// The factor the latents are scaled by before the UNet at step `i`.
    pub fn input_scale(&self, i: usize) -> f64 {
        match self.kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                1.0 / (self.sigmas[i].powi(2) + 1.0).sqrt()
            }
            _ => 1.0,
        }
    }

    /// Whether the sampler draws fresh noise each step.
    pub fn is_ancestral(&self) -> bool {
        self.kind == SamplerKind::EulerAncestral
    }

    /// Advances `sample` by step `i` given the (guided) model output.
    /// `noise` supplies unit normals for ancestral sampling.
    pub fn step(
        &self,
        i: usize,
        state: &mut SamplerState,
        sample: &mut [f32],
        output: &[f32],
        noise: &mut dyn FnMut() -> f32,
    ) {
        match self.kind {
            SamplerKind::Ddim => self.ddim(i, sample, output),
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                self.euler(i, sample, output, noise)
            }
            SamplerKind::DpmPp2m | SamplerKind::DpmPp2mKarras => self.dpm(i, state, sample, output),
        }
    }

    fn ddim(&self, i: usize, sample: &mut [f32], output: &[f32]) {
        let t = self.timesteps[i] as i64;
        let prev = t - self.step_ratio;
        let a = self.alphas_cumprod[t as usize];
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha
        };
        let (sa, sb) = (a.sqrt() as f32, (1.0 - a).sqrt() as f32);
        let (sa_prev, sb_prev) = (a_prev.sqrt() as f32, (1.0 - a_prev).sqrt() as f32);
        for (x, &m) in sample.iter_mut().zip(output) {
            let (mut x0, eps) = match self.prediction {
                Prediction::Epsilon => ((*x - sb * m) / sa, m),
                Prediction::V => (sa * *x - sb * m, sa * m + sb * *x),
                Prediction::Sample => (m, (*x - sa * m) / sb),
            };
            if let Some(r) = self.clip {
                x0 = x0.clamp(-r as f32, r as f32);
            }
            *x = sa_prev * x0 + sb_prev * eps;
        }
    }

    fn euler(&self, i: usize, sample: &mut [f32], output: &[f32], noise: &mut dyn FnMut() -> f32) {
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
        let (up, down) = if self.kind == SamplerKind::EulerAncestral {
            let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
            (up, (next * next - up * up).sqrt())
        } else {
            (0.0, next)
        };
        let s = sigma as f32;
        let v_in = (-sigma / (sigma * sigma + 1.0).sqrt()) as f32;
        let v_skip = (1.0 / (sigma * sigma + 1.0)) as f32;
        let dt = (down - sigma) as f32;
        for (x, &m) in sample.iter_mut().zip(output) {
            let x0 = match self.prediction {
                Prediction::Epsilon => *x - s * m,
                Prediction::V => m * v_in + *x * v_skip,
                Prediction::Sample => m,
            };
            let derivative = (*x - x0) / s;
            *x += derivative * dt;
        }
        if up > 0.0 {
            let up = up as f32;
            for x in sample.iter_mut() {
                *x += noise() * up;
            }
        }
    }

    fn dpm(&self, i: usize, state: &mut SamplerState, sample: &mut [f32], output: &[f32]) {
        let alpha_sigma = |s: f64| {
            let a = 1.0 / (s * s + 1.0).sqrt();
            (a, s * a)
        };
        let (s0, t1) = (self.sigmas[i], self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(s0);
        let x0: Vec<f32> = sample
            .iter()
            .zip(output)
            .map(|(&x, &m)| match self.prediction {
                Prediction::Epsilon => ((x as f64 - sigma_s0 * m as f64) / alpha_s0) as f32,
                Prediction::V => (alpha_s0 * x as f64 - sigma_s0 * m as f64) as f32,
                Prediction::Sample => m,
            })
            .collect();
        let last = i + 1 == self.timesteps.len();
        if t1 == 0.0 {
            // The final step lands on the denoised estimate.
            sample.copy_from_slice(&x0);
        } else {
            let (alpha_t, sigma_t) = alpha_sigma(t1);
            let lambda = |a: f64, s: f64| a.ln() - s.ln();
            let h = lambda(alpha_t, sigma_t) - lambda(alpha_s0, sigma_s0);
            let ratio = (sigma_t / sigma_s0) as f32;
            let c = (alpha_t * ((-h).exp() - 1.0)) as f32;
            match state.previous_x0.as_ref().filter(|_| i > 0 && !last) {
                Some(m1) => {
                    let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
                    let h0 = lambda(alpha_s0, sigma_s0) - lambda(alpha_s1, sigma_s1);
                    let r0 = (h0 / h) as f32;
                    for ((x, &d0), &m1) in sample.iter_mut().zip(&x0).zip(m1) {
                        let d1 = (d0 - m1) / r0;
                        *x = ratio * *x - c * d0 - 0.5 * c * d1;
                    }
                }
                None => {
                    for (x, &d0) in sample.iter_mut().zip(&x0) {
                        *x = ratio * *x - c * d0;
                    }
                }
            }
        }
        state.previous_x0 = Some(x0);
    }
}

/// Kindling's seeded noise: SplitMix64 with Box–Muller, the same on every
/// machine and independent of any library's generator.
#[derive(Debug, Clone)]
pub struct Noise {
    state: u64,
    spare: Option<f32>,
}

impl Noise {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform number in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// A standard normal number.
    pub fn normal(&mut self) -> f32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let (u, v) = (self.uniform(), self.uniform());
        let r = (-2.0 * u.ln()).sqrt();
        let angle = std::f64::consts::TAU * v;
        self.spare = Some((r * angle.sin()) as f32);
        (r * angle.cos()) as f32
    }

    /// `n` standard normal numbers.
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(spacing: Option<&str>) -> SchedulerConfig {
        let mut json = serde_json::json!({
            "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "steps_offset": 1
        });
        if let Some(s) = spacing {
            json["timestep_spacing"] = serde_json::json!(s);
        }
        serde_json::from_value(json).unwrap()
    }

    /// Without `timestep_spacing` each sampler spaces as its diffusers class
    /// does by default (SD 1.5's scheduler config has no such key).
    #[test]
    fn timesteps_follow_each_class_default_spacing() {
        let cfg = config(None);
        let ts = |kind| Schedule::new(&cfg, kind, 4).timesteps().to_vec();
        assert_eq!(ts(SamplerKind::Ddim), vec![751.0, 501.0, 251.0, 1.0]);
        assert_eq!(ts(SamplerKind::Euler), vec![999.0, 666.0, 333.0, 0.0]);
        assert_eq!(
            ts(SamplerKind::EulerAncestral),
            vec![999.0, 666.0, 333.0, 0.0]
        );
        assert_eq!(ts(SamplerKind::DpmPp2m), vec![999.0, 749.0, 500.0, 250.0]);
        let leading = config(Some("leading"));
        assert_eq!(
            Schedule::new(&leading, SamplerKind::Euler, 4).timesteps(),
            &[751.0, 501.0, 251.0, 1.0]
        );
        let trailing = config(Some("trailing"));
        assert_eq!(
            Schedule::new(&trailing, SamplerKind::Ddim, 4).timesteps(),
            &[999.0, 749.0, 499.0, 249.0]
        );
    }

    /// DPM++ 2M Karras spans the whole training range of noise levels.
    #[test]
    fn karras_sigmas_span_the_training_range() {
        let s = Schedule::new(&config(None), SamplerKind::DpmPp2mKarras, 20);
        let first = s.sigmas[0];
        let last = s.sigmas[19];
        assert!((first - 14.61).abs() < 0.01, "{first}");
        assert!((last - 0.0292).abs() < 0.001, "{last}");
        assert_eq!(s.sigmas[20], 0.0);
    }
}
