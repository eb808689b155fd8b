//! Failing requests: the batch of a forward pass that failed, or every
//! request after a panic outside the pass; the others run on.

use std::collections::HashSet;

use super::{EngineError, Planned, Scheduler};

impl Scheduler {
    /// Fails the requests of a batch whose forward pass failed; the
    /// others run on.
    pub(super) fn fail_batch(&mut self, plan: &[Planned], message: String) -> bool {
        tracing::error!(error = %message, "forward pass failed");
        let ids: HashSet<u64> = plan.iter().map(|p| self.running[p.seq].request).collect();
        self.fail(ids, &message);
        true
    }

    /// Fails every request in hand (after a panic outside the forward pass).
    pub(in crate::engine) fn fail_all(&mut self) {
        let ids: HashSet<u64> = self.requests.keys().copied().collect();
        self.fail(ids, "the scheduler failed");
    }

    fn fail(&mut self, ids: HashSet<u64>, message: &str) {
        for id in ids {
            if let Some(req) = self.requests.get_mut(&id) {
                req.events.fail(EngineError::Compute(message.to_string()));
            }
            self.remove(id);
        }
    }
}
