//! Observability hooks: a trait whose methods all default to doing nothing.

use std::time::Duration;

use qmp_proto::RawJson;

use crate::error::OpsError;
use crate::exec::ExecError;
use crate::policy::{Denial, Policy};

/// Called by [`crate::Ops`] at each step of an operation. Every method has a no-op default, so
/// an implementation overrides only what it needs.
///
/// Hooks run inline, while locks may be held: they MUST be quick and MUST NOT block or call
/// back into the same [`crate::Ops`].
pub trait Hooks: Send + Sync {
    /// Attempt `attempt` (1-based) of `command` is about to be sent.
    fn on_attempt(&self, command: &str, attempt: u32) {
        let _ = (command, attempt);
    }

    /// Attempt `attempt` failed with `error`; the next one starts after `delay`.
    fn on_retry(&self, command: &str, attempt: u32, delay: Duration, error: &ExecError) {
        let _ = (command, attempt, delay, error);
    }

    /// A call finished (after any retries), `latency` after it started. Called once per
    /// caller, also for callers that shared another caller's execution or hit the cache.
    fn on_outcome(&self, command: &str, latency: Duration, result: Result<&RawJson, &OpsError>) {
        let _ = (command, latency, result);
    }

    /// The policy refused a call; nothing was sent.
    fn on_denied(&self, denial: &Denial) {
        let _ = denial;
    }

    /// A call joined an identical execution already in flight instead of sending its own.
    fn on_shared(&self, command: &str) {
        let _ = command;
    }

    /// A call was answered from the result cache.
    fn on_cache_hit(&self, command: &str) {
        let _ = command;
    }

    /// An [`crate::Ops`] was built over an unrestricted policy.
    fn on_unrestricted(&self, policy: &Policy) {
        let _ = policy;
    }
}

/// Hooks that do nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl Hooks for NoHooks {}
