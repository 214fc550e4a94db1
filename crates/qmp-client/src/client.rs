//! The client handle and the builder that performs the handshake.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use futures_io::{AsyncRead, AsyncWrite};
use qmp_proto::{Command, Config, Event, Greeting, Outcome, RawJson, RequestId, Stats};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::driver::{Connection, Plain, Transport};
use crate::error::{Error, ErrorKind};
use crate::events::{EventFilter, EventItem, EventStream, Subscriber};
use crate::rt::Timer;
use crate::shared::{Handle, Shared};
use qmp_proto::SendStatus;

/// Default capacity of each subscriber's event queue.
const DEFAULT_EVENT_QUEUE: usize = 1024;

/// Configures a session and performs the handshake. Defaults may change between releases.
///
/// # Example
/// ```no_run
/// # async fn demo(io: impl futures_io::AsyncRead + futures_io::AsyncWrite + Send + Unpin + 'static,
/// #               timer: impl qmp_client::rt::Timer) -> Result<(), qmp_client::Error> {
/// use std::time::Duration;
/// let (client, connection) = qmp_client::Builder::new()
///     .command_timeout(Duration::from_secs(30))
///     .event_queue(256)
///     .handshake(io, timer)
///     .await?;
/// // Spawn `connection` on your runtime, then use `client` from any task.
/// # drop((client, connection)); Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .handshake() is awaited"]
pub struct Builder {
    config: Config,
    event_queue: usize,
    connect_timeout: Option<Duration>,
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    /// QMP with the defaults: `oob` enabled when offered, 10 s connect and handshake
    /// timeouts, no command timeout, 8 in-band commands in flight, 16 MiB message limit, 1024
    /// events per subscriber.
    pub fn new() -> Self {
        Self {
            config: Config::qmp(),
            event_queue: DEFAULT_EVENT_QUEUE,
            connect_timeout: Some(Duration::from_secs(10)),
        }
    }

    /// How long an adapter's `connect_tcp` waits for the connection (name resolution
    /// included), before the handshake timeout starts (`None`: as long as the system tries,
    /// about two minutes on Linux for a host that drops packets). Default: 10 s.
    pub fn connect_timeout(mut self, t: Option<Duration>) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Runs `connect`, an adapter's connect future, within the
    /// [`connect_timeout`](Self::connect_timeout) on `timer`.
    ///
    /// # Errors
    /// `connect`'s error, or [`ErrorKind::Io`] with an [`std::io::ErrorKind::TimedOut`]
    /// source when the time runs out.
    pub async fn connect_within<S>(
        &self,
        timer: &dyn Timer,
        connect: impl Future<Output = std::io::Result<S>>,
    ) -> Result<S, Error> {
        let Some(limit) = self.connect_timeout else {
            return Ok(connect.await?);
        };
        let Some(deadline) = timer.now().checked_add(limit) else {
            return Ok(connect.await?);
        };
        let mut connect = std::pin::pin!(connect);
        let mut sleep = timer.sleep_until(deadline);
        futures_util::future::poll_fn(|cx| {
            if let Poll::Ready(res) = connect.as_mut().poll(cx) {
                return Poll::Ready(res.map_err(Error::from));
            }
            if sleep.as_mut().poll(cx).is_ready() {
                let e = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {limit:?}"),
                );
                return Poll::Ready(Err(Error::from(e)));
            }
            Poll::Pending
        })
        .await
    }

    /// The protocol configuration this builder holds.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Starts from a complete protocol configuration.
    pub fn with_config(config: Config) -> Self {
        Self {
            config,
            ..Self::new()
        }
    }

    /// The guest agent protocol (no greeting; the session starts with a
    /// `guest-sync-delimited` whose id is chosen at random). Other settings made before or
    /// after this call are kept; capabilities do not apply to the agent.
    pub fn qga(mut self) -> Self {
        let sync_seed = u64::from(fastrand::u32(1..)) << 8 | u64::from(fastrand::u8(..));
        self.config.mode = qmp_proto::Mode::Qga { sync_seed };
        self.config.capabilities.clear();
        self
    }

    /// Default timeout of every command, counted from when it is submitted. Default: none, so
    /// a command QEMU never answers waits until the session ends; services usually set one (a
    /// call can override it with [`Client::execute_timeout`]).
    pub fn command_timeout(mut self, t: Duration) -> Self {
        self.config.command_timeout = Some(t);
        self
    }

    /// Guest agent only: how long `guest-shutdown` and `guest-suspend-*`, which answer only
    /// when they fail, wait for that answer once written. Silence that long (or the agent's
    /// connection closing, or a later command's reply) means they succeeded: they return
    /// `null` (ask for `()` or [`serde::de::IgnoredAny`]). A command timeout shorter than
    /// this still fails them as unanswered. Default: 2 s. A command marked with
    /// [`Command::no_reply`] or [`Command::reply_optional`] keeps its own mark.
    pub fn quiet_grace(mut self, t: Duration) -> Self {
        self.config.quiet_grace = t;
        self
    }

    /// Budget for the greeting plus negotiation (or the QGA sync). `None`: wait forever.
    /// Default: 10 s.
    pub fn handshake_timeout(mut self, t: Option<Duration>) -> Self {
        self.config.handshake_timeout = t;
        self
    }

    /// Capacity of each subscriber's queue (at least 1), and the most events kept from the
    /// handshake for the first subscribers. Default: 1,024.
    pub fn event_queue(mut self, n: usize) -> Self {
        self.event_queue = n.max(1);
        self
    }

    /// In-band commands on the wire without a reply (at least 1); more wait locally.
    /// Default: 8, the most QEMU queues before it stops reading.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.config.max_in_flight = n.max(1);
        self
    }

    /// Commands allowed to wait locally for a free slot; more are refused, not sent.
    /// Default: 65,536.
    pub fn max_queued(mut self, n: usize) -> Self {
        self.config.max_queued = n;
        self
    }

    /// Largest message accepted from the server, in bytes; a larger reply fails its command
    /// alone ([`ErrorKind::ReplyLost`]). Default: 16 MiB.
    pub fn max_message_size(mut self, n: usize) -> Self {
        self.config.max_message_size = n;
        self
    }

    /// Capabilities to enable when the server offers them (default `["oob"]`).
    pub fn capabilities<I: IntoIterator<Item = S>, S: Into<String>>(mut self, caps: I) -> Self {
        self.config.capabilities = caps.into_iter().map(Into::into).collect();
        self
    }

    /// Performs the handshake over a plain futures-io transport and returns the client handle
    /// and the driver future, which the caller MUST spawn.
    ///
    /// # Errors
    /// [`ErrorKind::Handshake`] when the server never greets within the handshake timeout (for
    /// instance because another client holds the monitor), refuses negotiation, or closes the
    /// connection first; [`ErrorKind::Io`] when the transport fails.
    pub async fn handshake<IO, T>(self, io: IO, timer: T) -> Result<(Client, Connection), Error>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        T: Timer,
    {
        self.start(Box::pin(Plain(io)), Arc::new(timer), false)
            .await
    }

    /// Like [`handshake`](Self::handshake), over a unix transport that can pass file
    /// descriptors, enabling [`Client::execute_with_fds`].
    ///
    /// # Errors
    /// As for [`handshake`](Self::handshake).
    #[cfg(unix)]
    pub async fn handshake_with_fds<IO, T>(
        self,
        io: IO,
        timer: T,
    ) -> Result<(Client, Connection), Error>
    where
        IO: AsyncRead + crate::rt::FdWrite + Send + Unpin + 'static,
        T: Timer,
    {
        self.start(Box::pin(crate::driver::WithFds(io)), Arc::new(timer), true)
            .await
    }

    async fn start(
        self,
        io: Pin<Box<dyn Transport>>,
        timer: Arc<dyn Timer>,
        fds: bool,
    ) -> Result<(Client, Connection), Error> {
        let shared = Shared::new(self.config, timer, self.event_queue, fds);
        let mut conn = Connection::new(Arc::clone(&shared), io);
        futures_util::future::poll_fn(|cx| {
            let res = conn.poll_drive(cx);
            let inner = shared.lock();
            if inner.proto.is_ready() {
                return Poll::Ready(Ok(()));
            }
            if let Poll::Ready(res) = res {
                res?;
                let reason = inner
                    .closed
                    .clone()
                    .unwrap_or(qmp_proto::CloseReason::PeerClosed);
                let err = match reason {
                    qmp_proto::CloseReason::PeerClosed => Error::new(
                        ErrorKind::Handshake,
                        if inner.proto.greeting().is_some() {
                            "the server closed the connection during capability negotiation"
                        } else if inner.proto.config().mode == qmp_proto::Mode::Qmp {
                            "the server closed the connection before greeting"
                        } else {
                            "the guest agent closed the connection before the sync step ended"
                        },
                    ),
                    other => Error::closed(&other),
                };
                return Poll::Ready(Err(err));
            }
            Poll::Pending
        })
        .await?;
        // From here a subscriber may exist: the driver's next turn hands it the events read
        // during the handshake.
        shared.lock().handshaking = false;
        Ok((
            Client {
                shared: Handle::new(&shared),
            },
            conn,
        ))
    }
}

/// Performs a QMP handshake with the default settings: see [`Builder::handshake`].
///
/// # Errors
/// As for [`Builder::handshake`].
pub async fn handshake<IO, T>(io: IO, timer: T) -> Result<(Client, Connection), Error>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    T: Timer,
{
    Builder::new().handshake(io, timer).await
}

/// A handle on a QMP (or QGA) session: cheap to clone, usable from many tasks at once.
///
/// Every command resolves exactly once: with its return value, with the server's error, or
/// with an [`Error`] whose [`send_status`](Error::send_status) says whether it was sent. It
/// does no I/O itself; the [`Connection`] future does, and MUST be running.
///
/// # Cancel safety
/// Dropping a command's future abandons it: if it was not written it never will be, and if it
/// was, its late reply is discarded, never given to another command.
///
/// # Drop behavior
/// The session stays open while any clone of the client is alive. Dropping the last one
/// closes it as [`close`](Self::close) does, without waiting for the driver: event streams
/// end with [`EventItem::Closed`], and the driver shuts the transport down and completes with
/// `Ok(())`, so the monitor (which QEMU serves to one client at a time) is free for the next
/// connection.
#[derive(Clone)]
pub struct Client {
    shared: Handle,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.shared.lock();
        let mut d = f.debug_struct("Client");
        d.field("proto", &inner.proto)
            .field("waiters", &inner.waiters.len());
        #[cfg(unix)]
        d.field("fd_sets", &inner.fds.len());
        d.field("subscriber_slots", &inner.subscribers.len())
            .finish()
    }
}

/// A command submitted to the machine, waiting for its outcome. It borrows the shared state
/// from the [`Client`], so no reference count is touched per command.
pub(crate) struct Call<'a> {
    shared: &'a Shared,
    id: RequestId,
    rx: oneshot::Receiver<Outcome>,
    done: bool,
}

impl Future for Call<'_> {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(res) => {
                self.done = true;
                // A dropped sender means the session ended without a word for this request.
                Poll::Ready(res.unwrap_or(Outcome::Unknown(qmp_proto::Failure::LocalClose)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.done {
            // The lock is released at the end of the statement, before the channel drops.
            let tx = self.shared.lock().abandon(self.id);
            drop(tx);
        }
    }
}

/// Why a command was not submitted; nothing of it was sent.
pub(crate) enum Refused {
    /// The session is closed, for this reason.
    Closed(qmp_proto::CloseReason),
    /// A graceful close is under way.
    Draining,
    /// The machine refused it.
    Local(qmp_proto::LocalError),
}

/// The most descriptors one `SCM_RIGHTS` message may carry (Linux's `SCM_MAX_FD`); more make
/// `sendmsg` fail, so such a command is refused before it is queued.
#[cfg(unix)]
const MAX_FDS: usize = 253;

impl Client {
    /// Registers `cmd` (with the descriptors to pass with it) and wakes the driver when it has
    /// something new to do.
    pub(crate) fn submit(
        &self,
        cmd: Command,
        #[cfg(unix)] fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Call<'_>, Refused> {
        let mut inner = self.shared.lock();
        if let Some(reason) = &inner.closed {
            return Err(Refused::Closed(reason.clone()));
        }
        if inner.draining > 0 {
            return Err(Refused::Draining);
        }
        let now = inner.now(&*self.shared.timer);
        let (queued, deadline) = (inner.proto.queued(), inner.proto.poll_timeout());
        let id = inner.proto.send(now, cmd).map_err(Refused::Local)?;
        let (tx, rx) = oneshot::channel();
        inner.waiters.insert(id, tx);
        #[cfg(unix)]
        if !fds.is_empty() {
            inner.fds.insert(id, fds);
        }
        // A command that only joined the local queue, with no earlier deadline, gives the
        // driver nothing to do until a reply frees a slot.
        if inner.proto.queued() == queued || inner.proto.poll_timeout() != deadline {
            inner.wake_driver();
        }
        Ok(Call {
            shared: &self.shared,
            id,
            rx,
            done: false,
        })
    }

    /// [`submit`](Self::submit), with a refusal as this crate's [`Error`] for command `name`.
    fn submit_named(
        &self,
        name: &str,
        cmd: Command,
        #[cfg(unix)] fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Call<'_>, Error> {
        #[cfg(unix)]
        let call = self.submit(cmd, fds);
        #[cfg(not(unix))]
        let call = self.submit(cmd);
        call.map_err(|refused| {
            match refused {
                Refused::Closed(reason) => Error::closed(&reason),
                Refused::Draining => closing(),
                Refused::Local(e) => Error::local(e),
            }
            .with_command(name)
        })
    }

    /// Runs `cmd`; `name` is its name, borrowed for the error messages so that nothing is
    /// copied per command.
    async fn outcome(&self, name: &str, cmd: Command) -> Result<Outcome, Error> {
        #[cfg(unix)]
        let call = self.submit_named(name, cmd, Vec::new());
        #[cfg(not(unix))]
        let call = self.submit_named(name, cmd);
        Ok(call?.await)
    }

    /// Runs `cmd` and deserialises its return value (`name` as for [`outcome`](Self::outcome)).
    async fn outcome_as<T: DeserializeOwned>(&self, name: &str, cmd: Command) -> Result<T, Error> {
        finish_as(name, self.outcome(name, cmd).await?)
    }

    /// Runs a command built with [`Command`] (per-call timeout, oob, no reply) and returns its
    /// raw `return` value (`null` for a [`Command::no_reply`] command once written).
    ///
    /// # Errors
    /// See [`Error`]: the server's error, a timeout, a closed connection, invalid arguments.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the command (see [`Client`]).
    pub async fn run_raw(&self, cmd: Command) -> Result<RawJson, Error> {
        let name = cmd.name().to_owned();
        finish(&name, self.outcome(&name, cmd).await?)
    }

    /// Runs a command built with [`Command`] and deserialises its return value into `T`
    /// straight from the reply's bytes.
    ///
    /// # Errors
    /// As for [`run_raw`](Self::run_raw), plus [`ErrorKind::Decode`].
    pub async fn run<T: DeserializeOwned>(&self, cmd: Command) -> Result<T, Error> {
        let name = cmd.name().to_owned();
        self.outcome_as(&name, cmd).await
    }

    /// Executes `name` with `args` (any value that serialises to a JSON object, or `&()` for
    /// none) and deserialises the return value into `T`. Use [`serde::de::IgnoredAny`] when
    /// the return value does not matter.
    ///
    /// # Errors
    /// As for [`run`](Self::run).
    ///
    /// # Cancel safety
    /// Dropping the future abandons the command (see [`Client`]).
    pub async fn execute<T: DeserializeOwned, A: Serialize + ?Sized>(
        &self,
        name: &str,
        args: &A,
    ) -> Result<T, Error> {
        self.outcome_as(name, command(name, args)?).await
    }

    /// Executes `name` with `args` and returns the raw JSON of the return value.
    ///
    /// # Errors
    /// As for [`run_raw`](Self::run_raw).
    pub async fn execute_raw<A: Serialize + ?Sized>(
        &self,
        name: &str,
        args: &A,
    ) -> Result<RawJson, Error> {
        finish(name, self.outcome(name, command(name, args)?).await?)
    }

    /// Executes `name` out of band (`exec-oob`), overtaking queued in-band commands. Needs
    /// the `oob` capability.
    ///
    /// # Errors
    /// As for [`run`](Self::run); [`ErrorKind::Unsupported`] without `oob`.
    pub async fn exec_oob<T: DeserializeOwned, A: Serialize + ?Sized>(
        &self,
        name: &str,
        args: &A,
    ) -> Result<T, Error> {
        self.outcome_as(name, command(name, args)?.oob()).await
    }

    /// Executes `name` with a timeout for this call only, overriding the default.
    ///
    /// # Errors
    /// As for [`run`](Self::run); [`ErrorKind::Timeout`] with
    /// [`SendStatus::Unanswered`] (or [`SendStatus::NotSent`] if it never left the queue).
    pub async fn execute_timeout<T: DeserializeOwned, A: Serialize + ?Sized>(
        &self,
        name: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<T, Error> {
        self.outcome_as(name, command(name, args)?.timeout(Some(timeout)))
            .await
    }

    /// Executes `name` with file descriptors attached (`SCM_RIGHTS`), for `getfd` and
    /// `add-fd`. The descriptors are closed on this side once sent or once the command ends.
    ///
    /// Calls made at once from several tasks are safe: a command with descriptors is written
    /// only after QEMU has answered the in-band one with descriptors before it (the in-band
    /// commands sent after it wait too, keeping their order). QEMU keeps only the descriptors
    /// of its latest read and, with `oob`, reads ahead of the commands it runs, so two sets on
    /// the wire together would bind the wrong file. Should the reply to such a command never
    /// be readable, the ones queued behind it wait until their own timeouts.
    ///
    /// # Errors
    /// As for [`run`](Self::run); [`ErrorKind::Unsupported`] when the session was not started
    /// with [`Builder::handshake_with_fds`].
    #[cfg(unix)]
    pub async fn execute_with_fds<T: DeserializeOwned, A: Serialize + ?Sized>(
        &self,
        name: &str,
        args: &A,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<T, Error> {
        if !self.shared.supports_fds {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "this transport cannot pass file descriptors",
            )
            .with_command(name)
            .with_status(SendStatus::NotSent));
        }
        if fds.len() > MAX_FDS {
            return Err(Error::new(
                ErrorKind::InvalidRequest,
                format!(
                    "{} file descriptors in one message; the kernel passes at most {MAX_FDS}",
                    fds.len()
                ),
            )
            .with_command(name)
            .with_status(SendStatus::NotSent));
        }
        let cmd = command(name, args)?.with_fds();
        let call = self.submit_named(name, cmd, fds)?;
        finish_as(name, call.await)
    }

    /// Subscribes to the events that pass `filter`, with the builder's queue capacity. Only
    /// events that arrive after this call are seen, with one exception: the events read
    /// during the handshake (QEMU may send some before or with the negotiation reply) are
    /// kept, up to the builder's queue size, until the [`Connection`] first runs. A stream
    /// subscribed before it is spawned gets them, preceded by [`EventItem::Lagged`] if some
    /// did not fit.
    pub fn subscribe(&self, filter: impl Into<EventFilter>) -> EventStream {
        self.add_subscriber(filter.into(), None, true)
    }

    /// Subscribes with a queue of `capacity` events (at least 1).
    pub fn subscribe_with_capacity(
        &self,
        filter: impl Into<EventFilter>,
        capacity: usize,
    ) -> EventStream {
        self.add_subscriber(filter.into(), Some(capacity), true)
    }

    /// A subscription for a wait: it sees only events read after this call, never those kept
    /// from the handshake.
    fn subscribe_for_wait(&self, filter: impl Into<EventFilter>) -> EventStream {
        self.add_subscriber(filter.into(), None, false)
    }

    /// Adds a subscriber with `capacity` (default: the builder's queue size).
    fn add_subscriber(
        &self,
        filter: EventFilter,
        capacity: Option<usize>,
        backlog: bool,
    ) -> EventStream {
        let mut inner = self.shared.lock();
        let sub = Subscriber::new(filter, capacity.unwrap_or(inner.event_queue), backlog);
        match &inner.closed {
            // Nobody polls the new stream yet: there is no waker.
            Some(reason) => drop(sub.close(reason)),
            None => {
                // Streams already gone leave before the list grows, so subscribing and dropping
                // in a loop without events stays bounded.
                crate::shared::push_pruned(&mut inner.subscribers, Arc::downgrade(&sub), |w| {
                    w.strong_count() > 0
                });
            }
        }
        EventStream::new(sub)
    }

    /// Waits for the first event passing `filter` and `predicate`, up to `timeout`. Only events
    /// arriving after this call count; to catch an event caused by a command, use
    /// [`execute_then_wait`](Self::execute_then_wait).
    ///
    /// The subscription is made by this call, before the returned future is first polled: an
    /// event arriving in between is not missed.
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`]; [`ErrorKind::Lagged`] when events were dropped from the full
    /// queue meanwhile, or a message that could not be read came before the awaited event;
    /// [`ErrorKind::Disconnected`],
    /// [`ErrorKind::Closed`] or [`ErrorKind::Io`] when the connection ends first.
    pub fn wait_event(
        &self,
        filter: impl Into<EventFilter>,
        predicate: impl FnMut(&Event) -> bool,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Event, Error>> {
        let stream = self.subscribe_for_wait(filter);
        self.wait_on(stream, predicate, self.deadline(timeout))
    }

    /// `now + timeout` on the client's clock; `None` for no timeout or one too long to
    /// represent.
    fn deadline(&self, timeout: Option<Duration>) -> Option<Instant> {
        timeout.and_then(|t| self.shared.timer.now().checked_add(t))
    }

    /// Executes a command and waits for the event it causes, race-free: the subscription is
    /// made before the command is sent, so an event QEMU emits before its reply is not missed.
    /// Returns the command's return value and the event. `timeout` bounds the whole: it is the
    /// command's own timeout, and the event must come before it runs out, counted from this
    /// call.
    ///
    /// # Errors
    /// The command's error; after its reply, as for [`wait_event`](Self::wait_event), with the
    /// command's name and [`SendStatus::Answered`].
    pub async fn execute_then_wait<T: DeserializeOwned, A: Serialize + ?Sized>(
        &self,
        name: &str,
        args: &A,
        filter: impl Into<EventFilter>,
        predicate: impl FnMut(&Event) -> bool,
        timeout: Option<Duration>,
    ) -> Result<(T, Event), Error> {
        let deadline = self.deadline(timeout);
        let stream = self.subscribe_for_wait(filter);
        let cmd = command(name, args)?;
        let cmd = match timeout {
            Some(t) => cmd.timeout(Some(t)),
            None => cmd,
        };
        let value = self.outcome_as(name, cmd).await?;
        // The command was answered: whatever goes wrong now, it must not look unsent.
        let event = self
            .wait_on(stream, predicate, deadline)
            .await
            .map_err(|e| e.with_command(name).with_status(SendStatus::Answered))?;
        Ok((value, event))
    }

    async fn wait_on(
        &self,
        mut stream: EventStream,
        mut predicate: impl FnMut(&Event) -> bool,
        deadline: Option<Instant>,
    ) -> Result<Event, Error> {
        let mut sleep = deadline.map(|at| self.shared.timer.sleep_until(at));
        futures_util::future::poll_fn(|cx| {
            loop {
                match stream.poll_item(cx) {
                    Poll::Ready(Some(EventItem::Event(ev))) => {
                        if predicate(&ev) {
                            return Poll::Ready(Ok(ev));
                        }
                    }
                    Poll::Ready(Some(EventItem::Lagged(n))) => {
                        return Poll::Ready(Err(Error::new(
                            ErrorKind::Lagged,
                            format!(
                                "{n} events were lost while waiting (dropped from the full \
                                 queue, or unreadable); the one awaited may be among them"
                            ),
                        )));
                    }
                    Poll::Ready(Some(EventItem::Closed(reason))) => {
                        return Poll::Ready(Err(Error::wait_ended(&reason)));
                    }
                    Poll::Ready(None) => {
                        return Poll::Ready(Err(Error::new(
                            ErrorKind::Closed,
                            "the event stream ended",
                        )));
                    }
                    Poll::Pending => break,
                }
            }
            if sleep
                .as_mut()
                .is_some_and(|s| s.as_mut().poll(cx).is_ready())
            {
                return Poll::Ready(Err(Error::new(
                    ErrorKind::Timeout,
                    "no matching event arrived in time",
                )));
            }
            Poll::Pending
        })
        .await
    }

    /// Closes the session: every pending command resolves at once (not sent, or sent but
    /// unanswered), event streams end, and the driver shuts the transport down. Returns once
    /// the driver has finished.
    pub async fn close(&self) {
        self.shared.lock().close_now(&*self.shared.timer);
        self.closed().await;
    }

    /// Closes gracefully: new commands are refused at once (not sent), the pending ones get up
    /// to `timeout` to finish, then the session closes as with [`close`](Self::close) (any
    /// command still pending resolves as closed, with its send status).
    ///
    /// # Cancel safety
    /// Dropping the future before it completes calls the close off: new commands are accepted
    /// again and nothing is closed.
    pub async fn close_gracefully(&self, timeout: Duration) {
        /// Counts this close among those under way for as long as it runs. Dropped before
        /// the close, it calls this one off; the others go on.
        struct Draining<'a>(&'a Shared);
        impl Drop for Draining<'_> {
            fn drop(&mut self) {
                self.0.lock().draining -= 1;
            }
        }
        self.shared.lock().draining += 1;
        let _guard = Draining(&self.shared);
        let mut sleep = self
            .deadline(Some(timeout))
            .map(|at| self.shared.timer.sleep_until(at));
        loop {
            let mut idle = {
                let mut inner = self.shared.lock();
                if inner.waiters.is_empty() || inner.closed.is_some() {
                    break;
                }
                // Waiting under the lock: the notification cannot slip in between.
                inner.wait_idle()
            };
            let timed_out = futures_util::future::poll_fn(|cx| {
                if Pin::new(&mut idle).poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                match &mut sleep {
                    Some(sleep) => sleep.as_mut().poll(cx).map(|()| true),
                    None => Poll::Pending,
                }
            })
            .await;
            if timed_out {
                break;
            }
        }
        // `close` closes the session in this same poll; dropping the future after that only
        // skips waiting for the driver.
        self.close().await;
    }

    /// Completes once the driver has finished: the session is closed, and the driver has asked
    /// the transport to close (or was dropped, and with it the transport).
    pub async fn closed(&self) {
        loop {
            let done = {
                let mut inner = self.shared.lock();
                if inner.driver_done {
                    return;
                }
                // Waiting under the lock: the notification cannot slip in between.
                inner.wait_done()
            };
            // Told, or (never while this `Client` holds the session) the channel dropped:
            // either way `driver_done` is checked again.
            let _ = done.await;
        }
    }

    /// Whether the session is closed.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().proto.is_closed()
    }

    /// The server's greeting (QMP only).
    pub fn greeting(&self) -> Option<Greeting> {
        self.shared.lock().proto.greeting().cloned()
    }

    /// The capabilities negotiated for this session.
    pub fn capabilities(&self) -> Vec<String> {
        self.shared.lock().proto.capabilities().to_vec()
    }

    /// Whether capability `name` was negotiated.
    pub fn has_capability(&self, name: &str) -> bool {
        self.shared.lock().proto.has_capability(name)
    }

    /// The protocol counters.
    pub fn stats(&self) -> Stats {
        self.shared.lock().proto.stats()
    }

    /// Commands not yet resolved (queued, on the wire, or awaiting a reply).
    pub fn pending(&self) -> usize {
        self.shared.lock().proto.pending()
    }

    /// In-band commands on the wire without a reply.
    pub fn in_flight(&self) -> usize {
        self.shared.lock().proto.in_flight()
    }
}

fn closing() -> Error {
    Error::new(ErrorKind::Closed, "the connection is closing (not sent)")
        .with_status(SendStatus::NotSent)
}

fn command<A: Serialize + ?Sized>(name: &str, args: &A) -> Result<Command, Error> {
    Command::new(name)
        .arguments(args)
        .map_err(|e| Error::local(e).with_command(name))
}

fn finish(name: &str, outcome: Outcome) -> Result<RawJson, Error> {
    let status = outcome.send_status();
    match outcome {
        Outcome::Replied(Ok(raw)) => Ok(raw),
        Outcome::Replied(Err(e)) => Err(Error::server(name, e)),
        Outcome::Sent => Ok(RawJson::null()),
        Outcome::NotSent(f) | Outcome::Unknown(f) => {
            Err(Error::failure(f, status).with_command(name))
        }
        _ => Err(Error::new(ErrorKind::Closed, "unknown outcome")
            .with_command(name)
            .with_status(status)),
    }
}

/// [`finish`], then the return value deserialised into `T`.
fn finish_as<T: DeserializeOwned>(name: &str, outcome: Outcome) -> Result<T, Error> {
    let status = outcome.send_status();
    finish(name, outcome)?
        .deserialize()
        .map_err(|e| Error::decode(name, e, status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    struct NoTimer;

    impl Timer for NoTimer {
        fn sleep_until(&self, _deadline: Instant) -> crate::rt::Sleep {
            Box::pin(std::future::pending())
        }
    }

    #[test]
    fn waits_dropped_unfinished_stay_bounded() {
        let shared = Shared::new(Config::default(), Arc::new(NoTimer), 8, false);
        let client = Client {
            shared: Handle::new(&shared),
        };
        // Many short-lived tasks each wait a moment for the close, then give up.
        for _ in 0..1000 {
            assert_eq!(client.closed().now_or_never(), None);
        }
        // Those given up are dropped whenever the list is full: it stops growing.
        let (len, capacity) = shared.lock().done_waiters();
        assert!(len <= capacity && capacity <= 8, "{len} of {capacity}");
        let mut waiting = Box::pin(client.closed());
        assert_eq!(waiting.as_mut().now_or_never(), None);
        assert!(shared.lock().done_waiters().0 <= capacity);
        shared.lock().finish_driver();
        assert_eq!(waiting.now_or_never(), Some(()));
        assert_eq!(client.closed().now_or_never(), Some(()));
    }
}
