//! Changes to the set of models while the daemon runs (manifests added,
//! edited or removed): a new model starts cold; an edited one keeps
//! serving until its next load when only its serving settings changed,
//! and drains so the next request loads the new one otherwise; a removed
//! one takes no new requests, drains and leaves.

use super::{lock, Lifecycle, Loader, Phase, Policy, Reason, Slot};

/// What a manifest change asks of a model's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Only its policy changed: applies from now on.
    Policy,
    /// What a load makes changed: drain and load afresh on demand.
    Reload,
}

impl<L: Loader> Lifecycle<L> {
    /// Adds a model, cold; a model being removed comes back as it is.
    pub fn add(&self, id: &str, policy: Policy) {
        let mut st = lock(&self.core.state);
        match st.models.get_mut(id) {
            Some(slot) => {
                // Back before it was gone: a load under way was for the old
                // manifest.
                slot.stale |= slot.retired && matches!(slot.phase, Phase::Loading(_));
                slot.retired = false;
                slot.policy = policy;
            }
            None => {
                st.models.insert(id.to_string(), Slot::new(policy));
            }
        }
    }

    /// Applies a changed manifest's policy, and with [`Refresh::Reload`]
    /// drains the loaded instance (in-flight requests finish on it) so the
    /// next request loads the new one. A failed load's back-off is cleared:
    /// the new manifest may fix it.
    pub fn update(&self, id: &str, policy: Policy, refresh: Refresh) {
        let core = &self.core;
        let mut st = lock(&core.state);
        let Some(slot) = st.models.get_mut(id) else {
            return;
        };
        let pin_dropped = slot.policy.pin && !policy.pin;
        slot.policy = policy;
        if refresh == Refresh::Reload {
            match &slot.phase {
                Phase::Resident { .. } => {
                    core.begin_unload(id, slot, Reason::Reload);
                }
                Phase::Loading(_) => slot.stale = true,
                Phase::Failed { .. } => {
                    slot.phase = Phase::Cold;
                    slot.failures = 0;
                }
                Phase::Cold | Phase::Draining(_) => {}
            }
        } else if pin_dropped && slot.idle() {
            core.arm_keep_alive(id, slot);
        }
        drop(st);
        core.room.notify_waiters();
    }

    /// Removes a model: new requests are refused at once; a loaded one
    /// drains and unloads, and its memory is released as usual.
    pub fn remove(&self, id: &str) {
        let core = &self.core;
        let mut st = lock(&core.state);
        let Some(slot) = st.models.get_mut(id) else {
            return;
        };
        slot.retired = true;
        match &slot.phase {
            Phase::Resident { .. } => {
                core.begin_unload(id, slot, Reason::Removed);
            }
            Phase::Cold | Phase::Failed { .. } => {
                st.models.remove(id);
            }
            // Unloaded when the load ends, gone when drained.
            Phase::Loading(_) | Phase::Draining(_) => {}
        }
        drop(st);
        core.room.notify_waiters();
    }
}
