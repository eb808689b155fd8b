//! One request's output side: its event channel (never blocking the
//! worker), and each choice's sampling, detokenization and stop matching.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use kindling_models::tokenizer::Tokenizer;
use kindling_models::tools::{Piece, ToolFormat, ToolParser};
use kindling_models::{
    Constraint, Detokenizer, Sampler, SamplingParams, StopMatcher, StopOutcome, TokenLogprobs,
    TokenMask,
};
use tokio::sync::mpsc;

use super::{
    EngineError, FinishReason, GenerateEvent, TokenAlternative, TokenLogprob, ToolCallEvent,
};

/// The client went away.
#[derive(Debug)]
pub(super) struct Gone;

/// Where a request's events go. Sends never wait: events the client has no
/// room for yet are held here, and the scheduler leaves the request's
/// sequences out of the batch until the client catches up, or cancels it
/// once it has stalled for the stall timeout.
pub(crate) struct Events {
    tx: mpsc::Sender<GenerateEvent>,
    held: VecDeque<GenerateEvent>,
    stall_timeout: Duration,
    stalled_since: Option<Instant>,
}

/// Whether a request may take part in the next step.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Readiness {
    Ready,
    /// Its client is behind; skip it this step.
    Behind,
    /// Its client has been behind for too long, or has left.
    Gone,
}

impl Events {
    pub(crate) fn new(tx: mpsc::Sender<GenerateEvent>, stall_timeout: Duration) -> Self {
        Self {
            tx,
            held: VecDeque::new(),
            stall_timeout,
            stalled_since: None,
        }
    }

    /// Whether the client went away.
    pub(super) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Sends `event`, holding it if the client's buffer is full.
    pub(super) fn send(&mut self, event: GenerateEvent) -> Result<(), Gone> {
        self.held.push_back(event);
        self.flush()
    }

    fn flush(&mut self) -> Result<(), Gone> {
        while let Some(event) = self.held.pop_front() {
            match self.tx.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.held.push_front(event);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(Gone),
            }
        }
        Ok(())
    }

    /// Whether the client can take `events` more events now.
    pub(super) fn readiness(&mut self, events: usize, now: Instant) -> Readiness {
        if self.flush().is_err() || self.tx.is_closed() {
            return Readiness::Gone;
        }
        if self.held.is_empty() && self.tx.capacity() >= events {
            self.stalled_since = None;
            return Readiness::Ready;
        }
        let since = *self.stalled_since.get_or_insert(now);
        if now.duration_since(since) > self.stall_timeout {
            tracing::warn!("generation cancelled: the client stopped reading");
            Readiness::Gone
        } else {
            Readiness::Behind
        }
    }

    /// When a client that is behind will have stalled for too long.
    pub(super) fn stall_expiry(&self) -> Option<Instant> {
        self.stalled_since.map(|since| since + self.stall_timeout)
    }

    /// Reports a failure; the request ends.
    pub(super) fn fail(&mut self, error: EngineError) {
        let _ = self.send(GenerateEvent::Failed(error));
    }
}

/// Events one sequence may send in one step: echo, text, a tool call and
/// the text around it, finish (a step that ends a choice may flush several
/// calls; events the client has no room for are held, never lost).
pub(super) const EVENTS_PER_STEP: usize = 5;

/// What a choice did with one token.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Feed this token back and continue.
    Continue(u32),
    /// The choice is finished.
    Done,
}

/// The output state of one choice.
pub(super) struct Choice {
    pub(super) index: usize,
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopMatcher,
    produced: usize,
    max_tokens: usize,
    min_tokens: usize,
    ignore_eos: bool,
    echo: Option<String>,
    constraint: Option<Constraint>,
    /// The next token's mask, when computed ahead (during the forward pass).
    mask: Option<Result<TokenMask, String>>,
    tools: Option<(ToolParser, ToolFormat)>,
    calls: usize,
}

/// What a choice is made from.
pub(super) struct ChoiceSpec<'a> {
    pub(super) index: usize,
    pub(super) prompt: &'a [u32],
    pub(super) max_tokens: usize,
    pub(super) params: SamplingParams,
    pub(super) stop: &'a [String],
    pub(super) ignore_eos: bool,
    pub(super) min_tokens: usize,
    pub(super) echo: Option<String>,
    /// The grammar its output must match, in its start state.
    pub(super) constraint: Option<Constraint>,
    /// The tool-call syntax to read calls in, when tools were offered.
    pub(super) tools: Option<ToolFormat>,
}

impl Choice {
    pub(super) fn new(spec: ChoiceSpec<'_>, vocab: usize) -> Self {
        Self {
            index: spec.index,
            sampler: Sampler::new(spec.params, spec.prompt, vocab),
            detok: Detokenizer::default(),
            stops: StopMatcher::new(spec.stop),
            produced: 0,
            max_tokens: spec.max_tokens,
            min_tokens: spec.min_tokens,
            ignore_eos: spec.ignore_eos,
            echo: spec.echo,
            constraint: spec.constraint,
            mask: None,
            tools: spec.tools.map(|f| (ToolParser::new(f), f)),
            calls: 0,
        }
    }

    /// Samples from `logits`, sends what the token completes, and says
    /// whether to go on.
    pub(super) fn accept(
        &mut self,
        tok: &Tokenizer,
        logits: &[f32],
        events: &mut Events,
    ) -> Result<Next, Gone> {
        if let Some(echo) = self.echo.take() {
            self.delta(events, echo, Vec::new())?;
        }
        let eog = tok.end_of_generation();
        let mut banned = if self.produced < self.min_tokens && !self.ignore_eos {
            eog
        } else {
            &[]
        };
        if self.mask.is_none() {
            self.prepare_mask();
        }
        let mask = match self.mask.take() {
            None => None,
            Some(Ok(mask)) => Some(mask),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the output grammar failed; the choice ends");
                return self.end(events, FinishReason::Stop);
            }
        };
        if let Some(mask) = &mask {
            if !banned.is_empty() && !mask.allows_any_but(banned) {
                // The grammar allows nothing but the end: it wins over min_tokens.
                banned = &[];
            }
        }
        let sampled = self
            .sampler
            .sample_constrained(logits, banned, mask.as_ref());
        self.produced += 1;
        let constrained = self.constraint.is_some();
        if (constrained || !self.ignore_eos) && tok.is_end_of_generation(sampled.token) {
            // The end-of-turn token is not part of the text, nor of its log-probabilities.
            return self.end(events, FinishReason::Stop);
        }
        let mut grammar_done = false;
        if let Some(c) = &mut self.constraint {
            if let Err(e) = c.commit(sampled.token) {
                tracing::warn!(error = %e, "the output grammar refused a sampled token");
            }
            grammar_done = c.is_finished();
        }
        let logprobs: Vec<TokenLogprob> = sampled
            .logprobs
            .as_ref()
            .map(|lp| vec![token_logprob(tok, sampled.token, lp)])
            .unwrap_or_default();
        let piece = self.detok.push(tok, sampled.token).unwrap_or_default();
        match self.stops.push(&piece) {
            StopOutcome::Stopped(text) => {
                self.delta(events, text, logprobs)?;
                return self.end(events, FinishReason::Stop);
            }
            StopOutcome::Continue(text) => self.delta(events, text, logprobs)?,
        }
        if grammar_done {
            return self.end(events, FinishReason::Stop);
        }
        if self.produced >= self.max_tokens {
            return self.end(events, FinishReason::Length);
        }
        Ok(Next::Continue(sampled.token))
    }

    /// Flushes held text and tool calls, then finishes with `reason`
    /// (`tool_calls` instead of `stop` when the choice called tools).
    fn end(&mut self, events: &mut Events, reason: FinishReason) -> Result<Next, Gone> {
        let rest = self.stops.flush();
        self.delta(events, rest, Vec::new())?;
        let mut reason = reason;
        if let Some((parser, format)) = &mut self.tools {
            let pieces = parser.finish();
            let called = parser.calls() > 0;
            let format = *format;
            self.send_pieces(events, pieces, format, Vec::new())?;
            if called && reason == FinishReason::Stop {
                reason = FinishReason::ToolCalls;
            }
        }
        self.finish(events, reason)
    }

    /// Whether its output follows a grammar.
    pub(super) fn is_constrained(&self) -> bool {
        self.constraint.is_some()
    }

    /// Computes the next token's mask now, for [`Choice::accept`] to use.
    pub(super) fn prepare_mask(&mut self) {
        if let Some(c) = &mut self.constraint {
            self.mask = Some(c.mask().map_err(|e| e.to_string()));
        }
    }

    /// Tokens generated so far.
    pub(super) fn produced(&self) -> usize {
        self.produced
    }

    /// Tokens it may still generate.
    pub(super) fn remaining(&self) -> usize {
        self.max_tokens.saturating_sub(self.produced)
    }

    /// Sends new text, through the tool-call parser when tools were offered.
    fn delta(
        &mut self,
        events: &mut Events,
        text: String,
        logprobs: Vec<TokenLogprob>,
    ) -> Result<(), Gone> {
        if let Some((parser, format)) = &mut self.tools {
            let pieces = if text.is_empty() {
                Vec::new()
            } else {
                parser.push(&text)
            };
            let format = *format;
            return self.send_pieces(events, pieces, format, logprobs);
        }
        self.send_text(events, text, logprobs)
    }

    fn send_pieces(
        &mut self,
        events: &mut Events,
        pieces: Vec<Piece>,
        format: ToolFormat,
        logprobs: Vec<TokenLogprob>,
    ) -> Result<(), Gone> {
        let mut text = String::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => text.push_str(&t),
                Piece::Call(call) => {
                    self.send_text(events, std::mem::take(&mut text), Vec::new())?;
                    let position = self.calls;
                    self.calls += 1;
                    events.send(GenerateEvent::ToolCall {
                        index: self.index,
                        call: ToolCallEvent {
                            position,
                            id: format.call_id(&mut rand::rng()),
                            name: call.name,
                            arguments: call.arguments,
                        },
                    })?;
                }
            }
        }
        self.send_text(events, text, logprobs)
    }

    fn send_text(
        &self,
        events: &mut Events,
        text: String,
        logprobs: Vec<TokenLogprob>,
    ) -> Result<(), Gone> {
        if text.is_empty() && logprobs.is_empty() {
            return Ok(());
        }
        events.send(GenerateEvent::Delta {
            index: self.index,
            text,
            logprobs,
            produced: self.produced,
        })
    }

    fn finish(&self, events: &mut Events, reason: FinishReason) -> Result<Next, Gone> {
        events.send(GenerateEvent::Finished {
            index: self.index,
            reason,
            completion_tokens: self.produced,
        })?;
        Ok(Next::Done)
    }
}

fn token_logprob(tok: &Tokenizer, token: u32, lp: &TokenLogprobs) -> TokenLogprob {
    let alt = |id: u32, logprob: f32| {
        let bytes = tok.token_bytes(id).to_vec();
        TokenAlternative {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob,
        }
    };
    TokenLogprob {
        chosen: alt(token, lp.logprob),
        top: lp.top.iter().map(|&(id, l)| alt(id, l)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(i: usize) -> GenerateEvent {
        GenerateEvent::Delta {
            index: i,
            text: "x".into(),
            logprobs: Vec::new(),
            produced: 1,
        }
    }

    #[test]
    fn a_client_that_stops_reading_is_skipped_then_given_up_on() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut events = Events::new(tx, Duration::from_millis(50));
        let t0 = Instant::now();
        assert_eq!(events.readiness(3, t0), Readiness::Ready);
        for i in 0..6 {
            assert!(events.send(delta(i)).is_ok(), "sends never block or fail");
        }
        assert_eq!(events.readiness(3, t0), Readiness::Behind);
        // The client reads everything: the held events go out, in order.
        let mut got = Vec::new();
        while let Ok(GenerateEvent::Delta { index, .. }) = rx.try_recv() {
            got.push(index);
        }
        assert_eq!(
            events.readiness(3, t0),
            Readiness::Behind,
            "two were still held"
        );
        while let Ok(GenerateEvent::Delta { index, .. }) = rx.try_recv() {
            got.push(index);
        }
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(events.readiness(3, t0), Readiness::Ready);
        // Now it stops reading for longer than the stall timeout.
        for i in 0..4 {
            events.send(delta(i)).unwrap();
        }
        assert_eq!(events.readiness(3, t0), Readiness::Behind);
        assert_eq!(
            events.readiness(3, t0 + Duration::from_millis(60)),
            Readiness::Gone
        );
    }

    #[test]
    fn a_client_that_left_is_gone_at_once() {
        let (tx, rx) = mpsc::channel(2);
        let mut events = Events::new(tx, Duration::from_secs(60));
        drop(rx);
        assert!(events.is_closed());
        assert!(events.send(delta(0)).is_err());
        assert_eq!(events.readiness(1, Instant::now()), Readiness::Gone);
    }
}
