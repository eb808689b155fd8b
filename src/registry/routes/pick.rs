//! Choosing a version for one request. A request with a sticky identity
//! (key + `user`, or `X-Session-Id`) goes through weighted rendezvous
//! hashing: each version scores `weight / -ln(u)`, `u` a uniform number
//! hashed from the identity and the version, and the highest score wins.
//! A version is chosen with probability weight ÷ total, and raising one
//! version's weight only moves identities onto that version, so a canary
//! going from 10% to 20% takes the newly assigned tenth and nobody else
//! moves. The hash is SHA-256, stable across builds and replicas.

use sha2::{Digest, Sha256};

/// A number in (0, 1) from `id`, `version` and `identity`.
fn uniform(id: &str, version: &str, identity: &str) -> f64 {
    let mut h = Sha256::new();
    for part in [id, version, identity] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let d = h.finalize();
    let mut top = [0u8; 8];
    top.copy_from_slice(&d[..8]);
    let bits = u64::from_le_bytes(top) >> 11;
    (bits as f64 + 0.5) / (1u64 << 53) as f64
}

/// The version `identity` lands on among `weights` (positive ones only),
/// or a weighted random draw without an identity. `None` if no weight is
/// positive.
pub fn pick<'a>(id: &str, weights: &'a [(String, f64)], identity: Option<&str>) -> Option<&'a str> {
    let live = weights.iter().filter(|(_, w)| *w > 0.0);
    match identity {
        Some(who) => live
            .map(|(v, w)| (v, w / -uniform(id, v, who).ln()))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(v, _)| v.as_str()),
        None => {
            let total: f64 = weights.iter().map(|(_, w)| w.max(0.0)).sum();
            let mut at = rand::random::<f64>() * total;
            let mut last = None;
            for (v, w) in live {
                last = Some(v.as_str());
                if at < *w {
                    return last;
                }
                at -= w;
            }
            last
        }
    }
}

/// Whether a request falls in a `percent` share (by identity when there
/// is one, so a mirrored session is mirrored whole).
pub fn in_share(id: &str, percent: f64, identity: Option<&str>) -> bool {
    let u = match identity {
        Some(who) => uniform(id, "\u{0}shadow", who),
        None => rand::random::<f64>(),
    };
    u * 100.0 < percent
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
        pairs.iter().map(|(v, x)| (v.to_string(), *x)).collect()
    }

    #[test]
    fn splits_follow_the_weights_and_moving_weight_moves_only_the_new_share() {
        let users: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
        let at10 = w(&[("v1", 90.0), ("v2", 10.0)]);
        let at20 = w(&[("v1", 80.0), ("v2", 20.0)]);
        let first: Vec<&str> = users
            .iter()
            .map(|u| pick("m", &at10, Some(u)).unwrap())
            .collect();
        let second: Vec<&str> = users
            .iter()
            .map(|u| pick("m", &at20, Some(u)).unwrap())
            .collect();
        let share = |picks: &[&str]| {
            picks.iter().filter(|v| **v == "v2").count() as f64 / picks.len() as f64
        };
        // 20,000 draws: the standard error of a 10% share is 0.2 points.
        assert!((share(&first) - 0.10).abs() < 0.01, "{}", share(&first));
        assert!((share(&second) - 0.20).abs() < 0.01, "{}", share(&second));
        let mut moved = 0;
        for (a, b) in first.iter().zip(&second) {
            assert!(
                !(*a == "v2" && *b == "v1"),
                "nobody leaves the version that grew"
            );
            moved += usize::from(a != b);
        }
        let moved = moved as f64 / users.len() as f64;
        assert!((moved - 0.10).abs() < 0.01, "moved {moved}");
        // Sticky: the same identity always lands on the same version.
        for u in users.iter().take(100) {
            assert_eq!(pick("m", &at10, Some(u)), pick("m", &at10, Some(u)));
        }
        // Ids hash apart: the same user is not on the canary of every id.
        let other: Vec<&str> = users
            .iter()
            .map(|u| pick("n", &at10, Some(u)).unwrap())
            .collect();
        let both = first
            .iter()
            .zip(&other)
            .filter(|(a, b)| **a == "v2" && **b == "v2")
            .count() as f64
            / users.len() as f64;
        assert!(both < 0.02, "{both}");
    }

    #[test]
    fn three_versions_zero_weights_and_random_draws() {
        let ws = w(&[("a", 50.0), ("b", 30.0), ("c", 20.0), ("d", 0.0)]);
        let mut counts = std::collections::BTreeMap::new();
        for i in 0..10_000 {
            let v = pick("m", &ws, Some(&format!("s{i}"))).unwrap();
            *counts.entry(v).or_insert(0) += 1;
        }
        assert!(!counts.contains_key("d"));
        assert!((counts["a"] as f64 / 1e4 - 0.5).abs() < 0.02, "{counts:?}");
        assert!((counts["c"] as f64 / 1e4 - 0.2).abs() < 0.02, "{counts:?}");
        let mut random = 0;
        for _ in 0..10_000 {
            random += usize::from(pick("m", &ws, None) == Some("b"));
        }
        assert!((random as f64 / 1e4 - 0.3).abs() < 0.03, "{random}");
        assert_eq!(pick("m", &w(&[("a", 0.0)]), Some("x")), None);
        assert_eq!(pick("m", &w(&[("a", 0.0)]), None), None);
        let shared = (0..10_000)
            .filter(|i| in_share("m", 25.0, Some(&format!("u{i}"))))
            .count();
        assert!((shared as f64 / 1e4 - 0.25).abs() < 0.02, "{shared}");
        assert!(in_share("m", 100.0, None));
    }
}
