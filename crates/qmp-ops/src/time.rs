//! Injected time: a [`Sleep`] for waiting and a [`Clock`] for reading the time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::exec::BoxFuture;

/// Waits for a duration, on whatever runtime the caller uses.
///
/// `qmp-ops` never sleeps by itself: the retry loop's delays go through this trait, and so
/// does a rule's timeout wherever the executor has no timer of its own (the default
/// [`crate::Execute::execute_timeout`], and [`crate::Reconnecting`] while it connects). Adapters implement it with their runtime's timer; tests implement it
/// with a recorder that returns at once.
pub trait Sleep: Send + Sync {
    /// A future that completes after `duration`.
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()>;
}

impl<S: Sleep + ?Sized> Sleep for Arc<S> {
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        (**self).sleep(duration)
    }
}

/// Reads the current time. Used for latency, the retry deadline and cache expiry.
pub trait Clock: Send + Sync {
    /// The current instant. MUST never go backwards.
    fn now(&self) -> Instant;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Instant {
        (**self).now()
    }
}

/// The system's monotonic clock ([`Instant::now`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}
