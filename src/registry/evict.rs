//! Which idle models to evict to make room: least recently used first, and
//! no more of them than needed.

use tokio::time::Instant;

/// An idle, unpinned, resident model that may be evicted.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The model.
    pub id: String,
    /// Bytes its eviction frees.
    pub bytes: u64,
    /// When its last request ended.
    pub last_used: Instant,
}

/// The models to evict to free at least `needed` bytes, or `None` when even
/// evicting every candidate would not be enough. Takes candidates least
/// recently used first until enough is freed, then hands back any of those
/// that turn out not to be needed (most recently used first), so a large
/// stale model is not evicted together with small ones it alone would cover.
pub fn choose_victims(mut candidates: Vec<Candidate>, needed: u64) -> Option<Vec<String>> {
    if needed == 0 {
        return Some(Vec::new());
    }
    candidates.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.id.cmp(&b.id)));
    let mut chosen = Vec::new();
    let mut freed = 0u64;
    for c in candidates {
        if freed >= needed {
            break;
        }
        freed += c.bytes;
        chosen.push(c);
    }
    if freed < needed {
        return None;
    }
    // Spare the most recently used victims that the others already cover.
    let mut i = chosen.len();
    while i > 0 {
        i -= 1;
        if freed - chosen[i].bytes >= needed {
            freed -= chosen[i].bytes;
            chosen.remove(i);
        }
    }
    Some(chosen.into_iter().map(|c| c.id).collect())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cands(list: &[(&str, u64, u64)]) -> Vec<Candidate> {
        let base = Instant::now();
        list.iter()
            .map(|&(id, bytes, age)| Candidate {
                id: id.into(),
                bytes,
                // Larger `age` = used longer ago.
                last_used: base - Duration::from_secs(age),
            })
            .collect()
    }

    #[test]
    fn least_recently_used_goes_first() {
        let c = cands(&[("new", 100, 1), ("old", 100, 50), ("mid", 100, 10)]);
        assert_eq!(choose_victims(c, 80), Some(vec!["old".to_string()]));
    }

    #[test]
    fn only_as_many_as_needed() {
        let c = cands(&[("a", 100, 30), ("b", 100, 20), ("c", 100, 10)]);
        assert_eq!(
            choose_victims(c, 150),
            Some(vec!["a".to_string(), "b".to_string()])
        );
    }

    #[test]
    fn a_small_stale_model_is_spared_when_a_larger_one_suffices() {
        // LRU order takes `tiny` then `big`; `big` alone frees enough.
        let c = cands(&[("tiny", 10, 60), ("big", 500, 30), ("recent", 500, 1)]);
        assert_eq!(choose_victims(c, 400), Some(vec!["big".to_string()]));
    }

    #[test]
    fn nothing_to_evict_or_not_enough() {
        assert_eq!(choose_victims(Vec::new(), 1), None);
        assert_eq!(choose_victims(cands(&[("a", 10, 5)]), 11), None);
        assert_eq!(choose_victims(cands(&[("a", 10, 5)]), 0), Some(vec![]));
    }
}
