//! Pure backoff computation and the retry-safety decision.

use std::time::Duration;

use qmp_proto::ErrorClass;

use crate::exec::ExecError;
use qmp_proto::SendStatus;

/// How the delay is randomised inside its exponential ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Jitter {
    /// Uniform in `[0, ceiling]` (the default: spreads retries of many clients best).
    #[default]
    Full,
    /// Uniform in `[ceiling / 2, ceiling]`.
    Equal,
    /// Exactly the ceiling (deterministic, for tests and single clients).
    None,
}

/// Exponential backoff with jitter, a cap, an attempt limit and an overall deadline.
///
/// The ceiling for the delay after failed attempt `n` (1-based) is
/// `min(cap, base * 2^(n-1))`; [`Jitter`] picks the delay inside it. Computing a delay is pure:
/// it uses only the rng it is given and never reads a clock or sleeps. The overall deadline is
/// enforced by the caller's loop ([`crate::Ops`]), which owns the clock.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Total attempts, the first included (1 means never retry).
    pub max_attempts: u32,
    /// Ceiling of the first delay.
    pub base: Duration,
    /// Upper bound of any delay.
    pub cap: Duration,
    /// Give up when the next attempt would start later than this after the first one began.
    pub deadline: Option<Duration>,
    /// How the delay is drawn.
    pub jitter: Jitter,
}

impl Default for RetryPolicy {
    /// 3 attempts, base 100 ms, cap 5 s, deadline 30 s, full jitter. Defaults may change.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            deadline: Some(Duration::from_secs(30)),
            jitter: Jitter::Full,
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Sets the total number of attempts (at least 1).
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Sets the base and the cap of the delay.
    #[must_use]
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.base = base;
        self.cap = cap;
        self
    }

    /// Sets the overall deadline.
    #[must_use]
    pub fn deadline(mut self, deadline: Option<Duration>) -> Self {
        self.deadline = deadline;
        self
    }

    /// Sets the jitter.
    #[must_use]
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The ceiling of the delay after failed attempt `attempt` (1-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(63);
        let base = u64::try_from(self.base.as_nanos()).unwrap_or(u64::MAX);
        let cap = u64::try_from(self.cap.as_nanos()).unwrap_or(u64::MAX);
        let grown = base.saturating_mul(1u64 << shift);
        Duration::from_nanos(grown.min(cap))
    }

    /// The delay before the attempt after failed attempt `attempt` (1-based), or `None` when
    /// `attempt` already reached [`RetryPolicy::max_attempts`].
    ///
    /// Draws at most one number from `rng`; the same seed gives the same schedule.
    pub fn delay(&self, attempt: u32, rng: &mut fastrand::Rng) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let ceiling = u64::try_from(self.ceiling(attempt).as_nanos()).unwrap_or(u64::MAX);
        let nanos = match self.jitter {
            Jitter::Full => rng.u64(0..=ceiling),
            Jitter::Equal => ceiling / 2 + rng.u64(0..=ceiling - ceiling / 2),
            Jitter::None => ceiling,
        };
        Some(Duration::from_nanos(nanos))
    }
}

/// Whether failure `err` may be retried for a command with these properties.
///
/// - not sent (or refused locally for a transient reason, or no connection): always;
/// - sent without an answer: only when the command is `idempotent`;
/// - answered with an error: only when its class is in `retry_classes`.
pub fn is_retry_safe(err: &ExecError, idempotent: bool, retry_classes: &[ErrorClass]) -> bool {
    match err.send_status() {
        SendStatus::NotSent => err.is_transient_local(),
        SendStatus::Unanswered => idempotent,
        SendStatus::Answered => err.class().is_some_and(|c| retry_classes.contains(c)),
        // A status added later is not known to be safe.
        _ => false,
    }
}
