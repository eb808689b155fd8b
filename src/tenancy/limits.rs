//! Per-key limits: requests and tokens per minute (token buckets that
//! refill continuously, so a key may burst up to a minute's worth), and
//! token quotas per calendar period.
//!
//! Tokens are charged when a request ends, with what it really used; a
//! request is let in while its key's token bucket is above zero.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::clock::{now_ms, Period};
use super::Principal;

/// The rate-limit state a response reports (OpenAI's `x-ratelimit-*`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateState {
    /// `(limit, remaining, time until full)` for requests per minute.
    pub requests: Option<(u64, u64, Duration)>,
    /// The same for tokens per minute.
    pub tokens: Option<(u64, u64, Duration)>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Limited {
    /// Over its requests per minute.
    Requests {
        retry_after: Duration,
        state: RateState,
    },
    /// Over its tokens per minute.
    Tokens {
        retry_after: Duration,
        state: RateState,
    },
    /// Its quota for the period is used up.
    Quota {
        quota: u64,
        period: Period,
        retry_after: Duration,
    },
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn full(limit: u64, now: Instant) -> Self {
        Self {
            level: limit as f64,
            at: now,
        }
    }

    fn rate(limit: u64) -> f64 {
        limit as f64 / 60.0
    }

    fn refill(&mut self, limit: u64, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * Self::rate(limit)).min(limit as f64);
        self.at = now;
    }

    /// Time until the level reaches `level`.
    fn until(&self, limit: u64, level: f64) -> Duration {
        let missing = (level - self.level).max(0.0);
        Duration::from_secs_f64(missing / Self::rate(limit).max(1e-9))
    }

    fn report(&self, limit: u64) -> (u64, u64, Duration) {
        (
            limit,
            self.level.max(0.0).floor() as u64,
            self.until(limit, limit as f64),
        )
    }
}

#[derive(Debug, Default)]
struct KeyState {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    /// Tokens used in the current period, and the period's bounds.
    quota: Option<(u64, (i64, i64))>,
}

/// Limits of every key, by key name.
#[derive(Default)]
pub struct Limiter {
    keys: Mutex<HashMap<Arc<str>, KeyState>>,
}

fn bucket(slot: &mut Option<Bucket>, limit: u64, now: Instant) -> &mut Bucket {
    let b = slot.get_or_insert_with(|| Bucket::full(limit, now));
    b.refill(limit, now);
    b
}

impl KeyState {
    fn quota_used(&mut self, period: Period, now_ms: i64) -> &mut u64 {
        let bounds = period.bounds(now_ms);
        let q = self.quota.get_or_insert((0, bounds));
        if q.1 != bounds {
            *q = (0, bounds);
        }
        &mut q.0
    }

    fn state(&self, key: &Principal) -> RateState {
        RateState {
            requests: key.limits.rpm.zip(self.requests).map(|(l, b)| b.report(l)),
            tokens: key.limits.tpm.zip(self.tokens).map(|(l, b)| b.report(l)),
        }
    }
}

impl Limiter {
    fn with<R>(&self, key: &Principal, f: impl FnOnce(&mut KeyState) -> R) -> R {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        f(keys.entry(key.name.clone()).or_default())
    }

    /// Lets one request of `key` in (taking one from its request bucket),
    /// or says why not.
    pub fn admit(&self, key: &Principal) -> Result<RateState, Limited> {
        let l = key.limits;
        if l.rpm.is_none() && l.tpm.is_none() && l.quota.is_none() {
            return Ok(RateState::default());
        }
        let now = Instant::now();
        let ms = now_ms();
        self.with(key, |s| {
            if let Some((quota, period)) = l.quota {
                if *s.quota_used(period, ms) >= quota {
                    let end = period.bounds(ms).1;
                    return Err(Limited::Quota {
                        quota,
                        period,
                        retry_after: Duration::from_millis((end - ms).max(0) as u64),
                    });
                }
            }
            if let Some(tpm) = l.tpm {
                let b = bucket(&mut s.tokens, tpm, now);
                if b.level <= 0.0 {
                    let retry_after = b.until(tpm, 1.0);
                    return Err(Limited::Tokens {
                        retry_after,
                        state: s.state(key),
                    });
                }
            }
            if let Some(rpm) = l.rpm {
                let b = bucket(&mut s.requests, rpm, now);
                if b.level < 1.0 {
                    let retry_after = b.until(rpm, 1.0);
                    return Err(Limited::Requests {
                        retry_after,
                        state: s.state(key),
                    });
                }
                b.level -= 1.0;
            }
            Ok(s.state(key))
        })
    }

    /// Charges `tokens` a finished request of `key` used.
    pub fn charge(&self, key: &Principal, tokens: u64) {
        let l = key.limits;
        if tokens == 0 || (l.tpm.is_none() && l.quota.is_none()) {
            return;
        }
        let now = Instant::now();
        self.with(key, |s| {
            if let Some(tpm) = l.tpm {
                let b = bucket(&mut s.tokens, tpm, now);
                // Never more than a minute in debt.
                b.level = (b.level - tokens as f64).max(-(tpm as f64));
            }
            if let Some((_, period)) = l.quota {
                *s.quota_used(period, now_ms()) += tokens;
            }
        });
    }

    /// Raises `key`'s count for its quota period to what the store holds
    /// (other replicas' use, or this one's before a restart).
    pub fn sync_quota(&self, key: &Principal, stored: u64) {
        let Some((_, period)) = key.limits.quota else {
            return;
        };
        self.with(key, |s| {
            let used = s.quota_used(period, now_ms());
            *used = (*used).max(stored);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::KeyLimits;
    use super::*;

    fn key(limits: KeyLimits) -> Principal {
        Principal {
            limits,
            ..Principal::full_access("k")
        }
    }

    #[test]
    fn requests_per_minute_burst_then_refuse_with_a_retry_time() {
        let lim = Limiter::default();
        let k = key(KeyLimits {
            rpm: Some(3),
            ..KeyLimits::default()
        });
        for left in [2, 1, 0] {
            let s = lim.admit(&k).unwrap();
            assert_eq!(s.requests.map(|r| (r.0, r.1)), Some((3, left)));
        }
        match lim.admit(&k) {
            Err(Limited::Requests { retry_after, .. }) => {
                assert!(
                    retry_after > Duration::from_secs(15) && retry_after <= Duration::from_secs(20)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tokens_are_charged_after_the_fact_and_quotas_close_the_period() {
        let lim = Limiter::default();
        let k = key(KeyLimits {
            tpm: Some(100),
            quota: Some((250, Period::Month)),
            ..KeyLimits::default()
        });
        assert!(lim.admit(&k).is_ok());
        lim.charge(&k, 150);
        assert!(matches!(lim.admit(&k), Err(Limited::Tokens { .. })));
        let fresh = Limiter::default();
        fresh.sync_quota(&k, 260);
        match fresh.admit(&k) {
            Err(Limited::Quota {
                quota: 250,
                retry_after,
                ..
            }) => {
                assert!(retry_after <= Duration::from_secs(31 * 86_400));
            }
            other => panic!("{other:?}"),
        }
        let open = Principal::full_access("open");
        assert_eq!(lim.admit(&open), Ok(RateState::default()));
    }
}
