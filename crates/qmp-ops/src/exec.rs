//! The [`Execute`] trait every layer of this crate runs commands through.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{self, Either};
use qmp_proto::{CommandError, ErrorClass, Failure, LocalError, Outcome, RawJson, SendStatus};
use serde_json::value::RawValue;

use crate::time::Sleep;

/// A boxed, `Send` future, as returned by [`Execute::execute`] and [`crate::Sleep::sleep`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs one QMP command and reports how it ended.
///
/// This is the only thing `qmp-ops` needs from a client. The trait is object safe
/// (`Arc<dyn Execute>` works) and has no runtime in it. `qmp-client` implements it behind its
/// `ops` feature; tests implement it with a scripted fake.
///
/// An implementation MUST classify every failure by send status, because the retry layer's
/// safety depends on it:
/// - [`ExecError::NotSent`] only when no byte of the request reached the transport;
/// - [`ExecError::Unknown`] when the request was (maybe partly) written but no reply came;
/// - [`ExecError::Command`] when QEMU answered with an error.
///
/// [`ExecError::from_outcome`] does this mapping from a [`qmp_proto::Outcome`].
///
/// # Cancel safety
/// Callers may drop the returned future at any time. An implementation SHOULD then abandon the
/// request (a late reply must be discarded, never handed to another caller).
pub trait Execute: Send + Sync {
    /// Runs `name` with `args` (a JSON object, or `None` for no `arguments` member) and returns
    /// the raw `return` value.
    ///
    /// # Errors
    /// An [`ExecError`] that says whether the request was sent and, if so, how it failed.
    fn execute<'a>(
        &'a self,
        name: &'a str,
        args: Option<&'a RawValue>,
    ) -> BoxFuture<'a, Result<RawJson, ExecError>>;

    /// Like [`execute`](Self::execute), but fails with [`Failure::Timeout`] when no answer came
    /// within `timeout`. [`crate::Ops`] calls this for rules with a timeout.
    ///
    /// The default races [`execute`](Self::execute) against `sleep`; it cannot know whether
    /// the request had left by then, so its timeout is [`ExecError::Unknown`]. An
    /// implementation that knows (a client with its own per-command deadline) SHOULD override
    /// this, so that a request that timed out before any of it was written fails as
    /// [`ExecError::NotSent`] and may be retried. It may then ignore `sleep`.
    fn execute_timeout<'a>(
        &'a self,
        name: &'a str,
        args: Option<&'a RawValue>,
        timeout: Duration,
        sleep: &'a dyn Sleep,
    ) -> BoxFuture<'a, Result<RawJson, ExecError>> {
        Box::pin(async move {
            within(timeout, sleep, self.execute(name, args))
                .await
                // The request may have been written already: its outcome is unknown.
                .unwrap_or(Err(ExecError::Unknown(Failure::Timeout)))
        })
    }
}

/// `fut`'s output, or `None` when `sleep` has waited `timeout` first.
pub(crate) async fn within<T>(
    timeout: Duration,
    sleep: &dyn Sleep,
    fut: impl Future<Output = T>,
) -> Option<T> {
    match future::select(pin!(fut), sleep.sleep(timeout)).await {
        Either::Left((output, _)) => Some(output),
        Either::Right(((), _)) => None,
    }
}

/// The forwarding impls below pass both methods through.
macro_rules! forward_execute {
    () => {
        fn execute<'a>(
            &'a self,
            name: &'a str,
            args: Option<&'a RawValue>,
        ) -> BoxFuture<'a, Result<RawJson, ExecError>> {
            (**self).execute(name, args)
        }

        fn execute_timeout<'a>(
            &'a self,
            name: &'a str,
            args: Option<&'a RawValue>,
            timeout: Duration,
            sleep: &'a dyn Sleep,
        ) -> BoxFuture<'a, Result<RawJson, ExecError>> {
            (**self).execute_timeout(name, args, timeout, sleep)
        }
    };
}

impl<E: Execute + ?Sized> Execute for Arc<E> {
    forward_execute!();
}

impl<E: Execute + ?Sized> Execute for &E {
    forward_execute!();
}

impl<E: Execute + ?Sized> Execute for Box<E> {
    forward_execute!();
}

/// Why one execution failed, classified by send status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// No byte of the request was written; it certainly did not run.
    #[error("not sent: {0}")]
    NotSent(Failure),
    /// The request was written but no reply came; it may or may not have run.
    #[error("sent, outcome unknown: {0}")]
    Unknown(Failure),
    /// QEMU answered with an error.
    #[error("qemu error: {0}")]
    Command(CommandError),
    /// The client refused the request before sending it (misuse, closed, queue full).
    #[error("refused locally: {0}")]
    Local(LocalError),
    /// No session could be established (used by [`crate::Reconnecting`]); nothing was sent.
    #[error("cannot connect: {0}")]
    Connect(String),
}

impl ExecError {
    /// Maps a [`qmp_proto::Outcome`] to the result [`Execute::execute`] returns.
    ///
    /// `Outcome::Sent` (a command sent with no reply expected) becomes `Ok` holding `null`
    /// ([`RawJson::null`]), as `qmp-client` returns it.
    ///
    /// # Errors
    /// The outcome's failure, classified by send status.
    pub fn from_outcome(outcome: Outcome) -> Result<RawJson, Self> {
        match outcome {
            Outcome::Replied(Ok(raw)) => Ok(raw),
            Outcome::Replied(Err(e)) => Err(Self::Command(e)),
            Outcome::NotSent(f) => Err(Self::NotSent(f)),
            Outcome::Unknown(f) => Err(Self::Unknown(f)),
            Outcome::Sent => Ok(RawJson::null()),
            // `Outcome` is non-exhaustive: a future variant we do not know is treated as the
            // least safe case.
            _ => Err(Self::Unknown(Failure::LocalClose)),
        }
    }

    /// Whether the request reached QEMU.
    pub fn send_status(&self) -> SendStatus {
        match self {
            Self::NotSent(_) | Self::Local(_) | Self::Connect(_) => SendStatus::NotSent,
            Self::Unknown(_) => SendStatus::Unanswered,
            Self::Command(_) => SendStatus::Answered,
        }
    }

    /// The error class when QEMU answered with an error.
    pub fn class(&self) -> Option<&ErrorClass> {
        match self {
            Self::Command(e) => Some(&e.class),
            _ => None,
        }
    }

    /// Whether this failure means the session is gone and a new one is needed.
    pub fn is_disconnect(&self) -> bool {
        match self {
            Self::NotSent(f) | Self::Unknown(f) => {
                matches!(
                    f,
                    Failure::PeerClosed
                        | Failure::LocalClose
                        | Failure::HandshakeFailed
                        | Failure::TransportFailed
                )
            }
            Self::Local(LocalError::Closed) | Self::Connect(_) => true,
            _ => false,
        }
    }

    /// Whether trying again could give a different answer with the same arguments, if the
    /// command may be sent again. Local misuse (bad arguments, too large) never changes.
    pub(crate) fn is_transient_local(&self) -> bool {
        match self {
            Self::Local(l) => matches!(l, LocalError::Closed | LocalError::QueueFull { .. }),
            _ => true,
        }
    }
}
