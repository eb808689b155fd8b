//! Turning logits into the next token: penalties, temperature, top-k,
//! top-p, min-p, a seeded random source, and log-probabilities.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick tokens. Validated by the caller; values here are trusted.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1].
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = off).
    pub min_p: f32,
    /// OpenAI presence penalty, subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty, subtracted per occurrence in the generated text.
    pub frequency_penalty: f32,
    /// Multiplicative penalty on tokens seen in prompt or output (1 = off).
    pub repetition_penalty: f32,
    /// Seed of the random source.
    pub seed: u64,
    /// How many alternatives to report with each token's log-probability
    /// (`None` = no log-probabilities).
    pub top_logprobs: Option<usize>,
    /// Added to these tokens' logits before sampling (OpenAI's
    /// `logit_bias`: -100 all but bans a token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
            top_logprobs: None,
            logit_bias: Vec::new(),
        }
    }
}

/// The chosen token and, when asked, its log-probability and the alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The token id.
    pub token: u32,
    /// Log-probabilities, when `top_logprobs` was set.
    pub logprobs: Option<TokenLogprobs>,
}

/// Log-probability of the chosen token and the most likely alternatives,
/// from the model's distribution after penalties, before temperature and truncation.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token's log-probability.
    pub logprob: f32,
    /// The most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Samples one sequence's tokens; keeps the state penalties need.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    generated: HashMap<u32, u32>,
    seen: Vec<bool>,
}

impl Sampler {
    /// A sampler for a sequence whose prompt was `prompt`.
    pub fn new(params: SamplingParams, prompt: &[u32], vocab_size: usize) -> Self {
        let mut seen = vec![false; vocab_size];
        for &t in prompt {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            generated: HashMap::new(),
            seen,
        }
    }

    /// Picks the next token from `logits` and records it for the penalties.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        self.sample_excluding(logits, &[])
    }

    /// Like [`Sampler::sample`], never picking a token of `banned` (while a
    /// sequence is shorter than its `min_tokens`, its end-of-turn tokens).
    pub fn sample_excluding(&mut self, logits: &[f32], banned: &[u32]) -> Sampled {
        self.sample_constrained(logits, banned, None)
    }

    /// Like [`Sampler::sample_excluding`], picking only tokens `mask`
    /// allows (constrained decoding). Log-probabilities are those of the
    /// constrained distribution.
    pub fn sample_constrained(
        &mut self,
        logits: &[f32],
        banned: &[u32],
        mask: Option<&crate::grammar::TokenMask>,
    ) -> Sampled {
        let mut logits = logits.to_vec();
        if let Some(mask) = mask {
            mask.apply(&mut logits);
        }
        self.apply_penalties(&mut logits);
        for &(t, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        for &t in banned {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let logprobs = self
            .params
            .top_logprobs
            .map(|k| (k, log_normalizer(&logits)));
        let token = if self.params.temperature <= 0.0 {
            argmax(&logits)
        } else {
            self.draw(&logits)
        };
        self.record(token);
        let logprobs = logprobs.map(|(k, norm)| TokenLogprobs {
            logprob: logits
                .get(token as usize)
                .map_or(f32::NEG_INFINITY, |l| l - norm),
            top: top_k(&logits, k)
                .into_iter()
                .map(|i| (i, logits[i as usize] - norm))
                .collect(),
        });
        Sampled { token, logprobs }
    }

    fn record(&mut self, token: u32) {
        *self.generated.entry(token).or_insert(0) += 1;
        if let Some(s) = self.seen.get_mut(token as usize) {
            *s = true;
        }
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for (l, _) in logits.iter_mut().zip(&self.seen).filter(|(_, s)| **s) {
                let penalized = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
                // A tiny penalty must not turn a logit into ±infinity.
                *l = penalized.clamp(f32::MIN, f32::MAX);
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &count) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let top = logits
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        // Scale the distance from the top logit, so a tiny temperature gives
        // 0 and -inf (greedy), never inf - inf.
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, (l - top) / p.temperature))
            .collect();
        if cands.is_empty() {
            return argmax(logits);
        }
        cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cands.truncate(p.top_k);
        }
        let mut probs: Vec<f32> = cands.iter().map(|(_, l)| l.exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            keep = probs.iter().take_while(|&&x| x >= floor).count().max(1);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let nucleus = probs
                .iter()
                .take(keep)
                .take_while(|&&x| {
                    let inside = acc < p.top_p;
                    acc += x;
                    inside
                })
                .count();
            keep = nucleus.max(1);
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &x) in probs[..keep].iter().enumerate() {
            r -= x;
            if r <= 0.0 {
                return cands[i].0;
            }
        }
        cands[keep - 1].0
    }
}

/// log Σ exp(logits), computed stably.
fn log_normalizer(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    max + sum.ln()
}

/// The first index of the largest value.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Indices of the `k` largest values, largest first.
fn top_k(logits: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let by_value = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    idx.select_nth_unstable_by(k - 1, by_value);
    idx.truncate(k);
    idx.sort_unstable_by(by_value);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..Default::default()
        }
    }

    #[test]
    fn logit_bias_and_banned_tokens_steer_the_choice() {
        let logits = [0.1, 3.0, 2.0, 1.0];
        let mut s = Sampler::new(
            SamplingParams {
                logit_bias: vec![(3, 100.0), (1, -100.0)],
                ..params(0.0)
            },
            &[],
            4,
        );
        assert_eq!(s.sample(&logits).token, 3);
        let mut s = Sampler::new(
            SamplingParams {
                logit_bias: vec![(3, 100.0)],
                ..params(0.8)
            },
            &[],
            4,
        );
        for _ in 0..50 {
            assert_ne!(s.sample_excluding(&logits, &[3]).token, 3);
        }
        let mut s = Sampler::new(params(0.0), &[], 4);
        assert_eq!(s.sample_excluding(&logits, &[1]).token, 2);
    }

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = Sampler::new(params(0.0), &[], 4);
        assert_eq!(s.sample(&[0.1, 3.0, 2.0, 3.0]).token, 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(
                SamplingParams {
                    seed,
                    ..params(1.0)
                },
                &[],
                50,
            );
            (0..20).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.5, 2.0, 1.9, -1.0];
        for p in [
            SamplingParams {
                top_k: 1,
                ..params(5.0)
            },
            SamplingParams {
                top_p: 1e-6,
                ..params(5.0)
            },
            SamplingParams {
                min_p: 0.99,
                ..params(5.0)
            },
        ] {
            let mut s = Sampler::new(p, &[], 4);
            for _ in 0..20 {
                assert_eq!(s.sample(&logits).token, 1);
            }
        }
    }

    #[test]
    fn extreme_temperatures_and_penalties_stay_sane() {
        let logits: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32) * 0.3 - 5.0)
            .collect();
        let best = argmax(&logits);
        for p in [
            params(1e-38),
            SamplingParams {
                repetition_penalty: 1e-38,
                ..params(1.0)
            },
            SamplingParams {
                repetition_penalty: 1e-38,
                top_logprobs: Some(2),
                ..params(1e-38)
            },
        ] {
            let mut s = Sampler::new(p, &[best], 64);
            let out = s.sample(&logits);
            assert_eq!(out.token, best);
            if let Some(lp) = out.logprobs {
                assert!(lp.logprob.is_finite() && lp.top.iter().all(|t| t.1.is_finite()));
            }
        }
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let logits = [2.0, 1.9];
        let mut s = Sampler::new(
            SamplingParams {
                frequency_penalty: 0.5,
                ..params(0.0)
            },
            &[],
            2,
        );
        assert_eq!(s.sample(&logits).token, 0);
        assert_eq!(s.sample(&logits).token, 1);
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 1.2,
                ..params(0.0)
            },
            &[0],
            2,
        );
        assert_eq!(s.sample(&logits).token, 1);
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let mut s = Sampler::new(
            SamplingParams {
                top_logprobs: Some(3),
                ..params(0.0)
            },
            &[],
            4,
        );
        let lp = s.sample(&[1.0, 3.0, 2.0, 0.0]).logprobs.unwrap();
        let total: f32 = [1.0f32, 3.0, 2.0, 0.0]
            .iter()
            .map(|l| (l - 3.0f32).exp())
            .sum();
        assert!((lp.logprob - (-total.ln())).abs() < 1e-5);
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 2, 0]
        );
    }
}
