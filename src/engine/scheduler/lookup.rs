//! Prompt-lookup speculative decoding. A decoding sequence's last few
//! tokens are looked up in its own text (prompt and output so far); the
//! tokens that followed their most recent earlier occurrence are drafted
//! and run in the same forward pass as the sequence's next token, one
//! logits row each. The choice then samples from the rows in order, as it
//! would one step at a time, for as long as each sample equals the draft
//! the next row was computed after: every token comes from the row of its
//! true context, so the output (greedy, seeded sampling, penalties,
//! grammars, stops) is exactly what one token per step gives. Editing or
//! summarising a given text repeats long runs of it, and several tokens
//! land per pass; elsewhere the lookup rarely finds a match, and a pass
//! with no draft costs what it did. Each row costs a little (the output
//! projection above all), so a [`Drafter`] drafts fewer tokens after a
//! partial match and, after drafts that all missed, none for a few steps
//! (twice as many each time, up to [`MAX_PAUSE`]).

use super::{Events, Scheduler, Sequence, StepModel};

/// The longest run of last tokens looked up.
const NGRAM_MAX: usize = 3;
/// The shortest: a lone token matches too often to be worth a draft.
const NGRAM_MIN: usize = 2;

/// Up to `max` tokens that followed the most recent earlier occurrence of
/// the last `NGRAM_MAX` (else fewer, down to `NGRAM_MIN`) tokens of
/// `tokens`; empty when there is none.
pub(super) fn draft(tokens: &[u32], max: usize) -> &[u32] {
    if max == 0 {
        return &[];
    }
    for n in (NGRAM_MIN..=NGRAM_MAX).rev() {
        if tokens.len() <= n {
            continue;
        }
        let tail = &tokens[tokens.len() - n..];
        let found = (0..tokens.len() - n)
            .rev()
            .find(|&i| &tokens[i..i + n] == tail);
        if let Some(i) = found {
            let from = i + n;
            return &tokens[from..(from + max).min(tokens.len())];
        }
    }
    &[]
}

/// Most steps a sequence goes without drafting after its drafts missed.
pub(super) const MAX_PAUSE: usize = 16;

/// One sequence's drafting state.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Drafter {
    /// Draft tokens per step the request allows (0 = off).
    max: usize,
    /// Draft tokens it will try next.
    len: usize,
    /// Steps left without drafting.
    pause: usize,
    /// The pause after the next miss.
    backoff: usize,
}

impl Drafter {
    /// Up to `max` draft tokens per step (0: never drafts).
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            len: max,
            pause: 0,
            backoff: 1,
        }
    }

    /// Draft tokens to try this step.
    pub(super) fn budget(&mut self) -> usize {
        if self.pause > 0 {
            self.pause -= 1;
            return 0;
        }
        self.len
    }

    /// Learns from `accepted` of `drafted` drafts kept.
    pub(super) fn record(&mut self, drafted: usize, accepted: usize) {
        if accepted == 0 {
            self.pause = self.backoff;
            self.backoff = (2 * self.backoff).min(MAX_PAUSE);
            self.len = 1.min(self.max);
        } else {
            self.backoff = 1;
            self.len = if accepted == drafted {
                (2 * self.len).min(self.max)
            } else {
                accepted + 1
            };
        }
    }
}

/// What verifying one sequence's drafts did.
pub(super) struct Verified {
    /// The choice finished (or its client left).
    pub(super) finished: bool,
    /// Drafts its samples matched.
    pub(super) accepted: usize,
}

impl Scheduler {
    /// Samples `s`'s tokens from `rows` — the row after its last token,
    /// then one after each of `drafts` — stopping at the first sample that
    /// is not the draft its next row assumed. `s.computed` ends past the
    /// matched drafts (their keys and values are in the cache); the
    /// rejected drafts' cache slots are overwritten by later passes.
    pub(super) fn verify(
        model: &impl StepModel,
        s: &mut Sequence,
        rows: &[Vec<f32>],
        drafts: &[u32],
        events: &mut Events,
        generated: &mut u64,
    ) -> Verified {
        let mut accepted = 0;
        for (j, row) in rows.iter().enumerate() {
            if Self::advance(model, s, row, events, generated) {
                return Verified {
                    finished: true,
                    accepted,
                };
            }
            match drafts.get(j) {
                Some(&d) if s.tokens.last() == Some(&d) => {
                    s.computed += 1;
                    accepted += 1;
                }
                _ => break,
            }
        }
        Verified {
            finished: false,
            accepted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drafters_back_off_after_misses_and_grow_after_hits() {
        let mut d = Drafter::new(8);
        assert_eq!(d.budget(), 8);
        d.record(8, 0);
        // One step without drafts, then a single one.
        assert_eq!((d.budget(), d.budget()), (0, 1));
        d.record(1, 0);
        assert_eq!((d.budget(), d.budget(), d.budget()), (0, 0, 1));
        d.record(1, 1);
        assert_eq!(d.budget(), 2);
        d.record(2, 2);
        d.record(4, 4);
        assert_eq!(d.budget(), 8);
        d.record(8, 3);
        assert_eq!(d.budget(), 4);
        for _ in 0..10 {
            d.record(1, 0);
        }
        assert_eq!((0..MAX_PAUSE).map(|_| d.budget()).sum::<usize>(), 0);
        assert_eq!(d.budget(), 1);
        assert_eq!(Drafter::new(0).budget(), 0);
    }

    #[test]
    fn drafts_follow_the_most_recent_longest_match() {
        // "1 2 3 4 5 ... 1 2 3" drafts "4 5" from the first occurrence.
        assert_eq!(draft(&[1, 2, 3, 4, 5, 9, 1, 2, 3], 2), [4, 5]);
        // The most recent of two occurrences wins.
        assert_eq!(draft(&[2, 3, 7, 2, 3, 8, 2, 3], 4), [8, 2, 3]);
        // A three-token match beats a later two-token one.
        assert_eq!(draft(&[1, 2, 3, 6, 9, 2, 3, 7, 1, 2, 3], 1), [6]);
        // Only a lone token repeats: no draft.
        assert!(draft(&[5, 1, 6, 1], 4).is_empty());
        assert!(draft(&[1, 2], 4).is_empty());
        assert!(draft(&[1, 2, 1, 2], 0).is_empty());
        // A run of one token drafts more of it.
        assert_eq!(draft(&[7, 7, 7, 7], 3), [7]);
    }
}
