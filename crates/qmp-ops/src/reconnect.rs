//! [`Reconnecting`]: an [`Execute`] that opens a fresh session when the current one is gone.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_channel::mpsc;
use futures_util::future::{FutureExt, WeakShared};
use qmp_proto::RawJson;
use serde_json::value::RawValue;

use crate::exec::{BoxFuture, ExecError, Execute, within};
use crate::time::Sleep;

/// Sent to subscribers when a session replaced an earlier one: events emitted between the two
/// sessions were missed, and state learnt from them SHOULD be refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reconnected {
    /// The new session's generation (the first session is 1, so this is at least 2).
    pub generation: u64,
}

/// An executor that connects lazily and reconnects after a disconnect.
///
/// `connect` is any async function returning a ready, negotiated session (for `qmp-client`:
/// connect the socket, handshake, spawn the driver, return the client). Each command runs on
/// the current session; a failure that means the session is gone
/// ([`ExecError::is_disconnect`]) drops it, so the next call, typically a retry made by
/// [`crate::Ops`], runs on a new session. The failure itself is returned unchanged, so the
/// retry layer still decides by send status whether a retry is safe.
///
/// Callers that find no session share one connect attempt: the first starts it, the others
/// join it, and all get its session, or its failure as [`ExecError::Connect`] (nothing was
/// sent, so the retry layer may retry it; the next call starts a new attempt). A caller that
/// gives up (its timeout, or its future dropped) leaves the attempt to the others; once all
/// have given up, it is dropped, so a connect that hangs does not hold later calls.
///
/// A rule's timeout ([`Execute::execute_timeout`]) bounds connecting and then the command, each
/// on its own, so one attempt may take up to twice the timeout. The command runs with the
/// session's own deadline, so the session still tells a request that timed out unsent from one
/// that timed out after it was written. So make `connect` bound its own phases (as
/// `qmp-client`'s connect and greeting timeouts do) well within the rule's timeout: a connect
/// that always takes longer than the timeout never completes for a lone caller.
pub struct Reconnecting<E, F> {
    connect: F,
    state: Arc<State<E>>,
    /// The connect attempt under way, while some caller still waits for it.
    connecting: Mutex<Option<WeakShared<Attempt<E>>>>,
}

/// What a connect attempt updates once it has a session.
struct State<E> {
    session: Mutex<Option<(u64, Arc<E>)>>,
    generation: AtomicU64,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<Reconnected>>>,
}

/// One connect attempt, shared by the callers waiting for it.
type Attempt<E> = BoxFuture<'static, Result<(u64, Arc<E>), ExecError>>;

impl<E, F> fmt::Debug for Reconnecting<E, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reconnecting")
            .field("generation", &self.state.generation.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Single-step updates only: a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<E, F, Fut, Err> Reconnecting<E, F>
where
    E: Execute + 'static,
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = Result<E, Err>> + Send + 'static,
    Err: fmt::Display,
{
    /// An executor that calls `connect` for its first session and after each disconnect.
    pub fn new(connect: F) -> Self {
        Self {
            connect,
            state: Arc::new(State {
                session: Mutex::new(None),
                generation: AtomicU64::new(0),
                subscribers: Mutex::new(Vec::new()),
            }),
            connecting: Mutex::new(None),
        }
    }

    /// The current session's generation: 0 before the first connect, then 1, 2, ...
    pub fn generation(&self) -> u64 {
        self.state.generation.load(Ordering::Acquire)
    }

    /// Whether a session is currently held.
    pub fn is_connected(&self) -> bool {
        lock(&self.state.session).is_some()
    }

    /// A channel told about every reconnection from now on. Dropping the receiver
    /// unsubscribes.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Reconnected> {
        let (tx, rx) = mpsc::unbounded();
        let mut subscribers = lock(&self.state.subscribers);
        // The receivers dropped since go now, not only at the next reconnection.
        let gone = extract_closed(&mut subscribers);
        subscribers.push(tx);
        drop(subscribers);
        drop(gone);
        rx
    }

    /// Drops the current session (if it is still generation `generation`).
    pub fn invalidate(&self, generation: u64) {
        let mut s = lock(&self.state.session);
        if s.as_ref().is_some_and(|(g, _)| *g == generation) {
            *s = None;
        }
    }

    /// The session held now, if any.
    fn current(&self) -> Option<(u64, Arc<E>)> {
        lock(&self.state.session)
            .as_ref()
            .map(|(g, s)| (*g, Arc::clone(s)))
    }

    /// Passes `result` through, dropping session `generation` if it says the session is gone.
    fn checked(
        &self,
        generation: u64,
        result: Result<RawJson, ExecError>,
    ) -> Result<RawJson, ExecError> {
        if result.as_ref().is_err_and(ExecError::is_disconnect) {
            self.invalidate(generation);
        }
        result
    }

    /// The current session, connecting first if there is none (joining the connect attempt
    /// under way, if any).
    ///
    /// # Errors
    /// [`ExecError::Connect`] when `connect` fails.
    pub async fn session(&self) -> Result<(u64, Arc<E>), ExecError> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let attempt = {
            let mut slot = lock(&self.connecting);
            // A session may have come since the check above.
            if let Some(current) = self.current() {
                return Ok(current);
            }
            let running = slot
                .as_ref()
                .and_then(WeakShared::upgrade)
                .filter(|a| a.peek().is_none());
            if let Some(attempt) = running {
                attempt
            } else if let Some(current) = self.current() {
                // The attempt seen installed its session and completed meanwhile.
                return Ok(current);
            } else {
                let attempt = self.attempt().shared();
                *slot = attempt.downgrade();
                attempt
            }
        };
        attempt.await
    }

    /// A new connect attempt: on success it installs the session and tells subscribers.
    fn attempt(&self) -> Attempt<E> {
        let connecting = (self.connect)();
        let state = Arc::clone(&self.state);
        Box::pin(async move {
            // A panic would poison the shared attempt for every caller waiting on it (and
            // wake none of them): it fails the attempt instead.
            let connected = AssertUnwindSafe(connecting)
                .catch_unwind()
                .await
                .map_err(|_| ExecError::Connect("the connect function panicked".to_owned()))?;
            let session = Arc::new(connected.map_err(|e| ExecError::Connect(e.to_string()))?);
            let generation = state.generation.fetch_add(1, Ordering::AcqRel) + 1;
            *lock(&state.session) = Some((generation, Arc::clone(&session)));
            if generation > 1 {
                // Sent, and the closed ones dropped, without the lock: a send wakes the
                // receiver's task, which an executor may poll at once (and it may subscribe).
                let mut told = std::mem::take(&mut *lock(&state.subscribers));
                told.retain(|tx| tx.unbounded_send(Reconnected { generation }).is_ok());
                let mut subscribers = lock(&state.subscribers);
                // Those who subscribed meanwhile come after.
                told.append(&mut subscribers);
                *subscribers = told;
            }
            Ok((generation, session))
        })
    }
}

/// Takes the senders whose receiver is gone out of `subscribers`, to be dropped after the
/// lock is released.
fn extract_closed(
    subscribers: &mut Vec<mpsc::UnboundedSender<Reconnected>>,
) -> Vec<mpsc::UnboundedSender<Reconnected>> {
    let (open, closed) = std::mem::take(subscribers)
        .into_iter()
        .partition(|tx| !tx.is_closed());
    *subscribers = open;
    closed
}

impl<E, F, Fut, Err> Execute for Reconnecting<E, F>
where
    E: Execute + 'static,
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = Result<E, Err>> + Send + 'static,
    Err: fmt::Display,
{
    fn execute<'a>(
        &'a self,
        name: &'a str,
        args: Option<&'a RawValue>,
    ) -> BoxFuture<'a, Result<RawJson, ExecError>> {
        Box::pin(async move {
            let (generation, session) = self.session().await?;
            let result = session.execute(name, args).await;
            self.checked(generation, result)
        })
    }

    /// Connects first if there is no session, then runs the command with the session's own
    /// [`Execute::execute_timeout`], so a request that timed out before it was written is
    /// still reported as [`ExecError::NotSent`].
    ///
    /// Connecting and the command each get `timeout`: a connect that takes longer fails as
    /// [`ExecError::Connect`] (nothing was sent).
    fn execute_timeout<'a>(
        &'a self,
        name: &'a str,
        args: Option<&'a RawValue>,
        timeout: Duration,
        sleep: &'a dyn Sleep,
    ) -> BoxFuture<'a, Result<RawJson, ExecError>> {
        Box::pin(async move {
            let (generation, session) = match self.current() {
                Some(current) => current,
                None => within(timeout, sleep, self.session())
                    .await
                    .ok_or_else(|| {
                        ExecError::Connect(format!(
                            "no session within the command's timeout ({timeout:?})"
                        ))
                    })??,
            };
            let result = session.execute_timeout(name, args, timeout, sleep).await;
            self.checked(generation, result)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session that is never asked anything.
    struct Idle;

    impl Execute for Idle {
        fn execute<'a>(
            &'a self,
            _: &'a str,
            _: Option<&'a RawValue>,
        ) -> BoxFuture<'a, Result<RawJson, ExecError>> {
            Box::pin(async { Ok(RawJson::from_string("{}".to_owned()).expect("JSON")) })
        }
    }

    #[test]
    fn dropped_subscriptions_do_not_pile_up_between_reconnections() {
        let r = Reconnecting::new(|| async { Ok::<_, String>(Idle) });
        for _ in 0..1000 {
            drop(r.subscribe());
        }
        let _kept = r.subscribe();
        assert_eq!(lock(&r.state.subscribers).len(), 1);
    }
}
