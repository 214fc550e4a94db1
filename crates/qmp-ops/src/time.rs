//! Injected time: a [`Sleep`] for waiting and a [`Clock`] for reading the time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::exec::BoxFuture;

/// Waits for a duration, on whatever runtime the caller uses.
///
/// `qmp-ops` never sleeps by itself: the retry loop and the optional per-command timeout go
/// through this trait. Adapters implement it with their runtime's timer; tests implement it
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
