//! Tokio adapter for [`qmp_client`]: opens sockets, provides [`TokioTimer`], passes file
//! descriptors over unix sockets, and spawns the driver. It holds no protocol logic.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), qmp_tokio::Error> {
//! let (client, connection) = qmp_tokio::connect_unix("/tmp/qmp.sock", qmp_tokio::Builder::new()).await?;
//! qmp_tokio::spawn_connection(connection);
//! let status: serde_json::Value = client.execute("query-status", &()).await?;
//! # drop(status); Ok(()) }
//! ```
#![cfg_attr(not(fuzzing), warn(missing_docs))]

use std::io;
use std::path::Path;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

pub use qmp_client::*;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::compat::TokioAsyncReadCompatExt;
#[cfg(unix)]
use {
    std::os::unix::net::UnixStream,
    tokio::io::{Interest, unix::AsyncFd},
};

/// The tokio clock and timer. Honours `tokio::time::pause` (virtual time in tests).
///
/// It keeps a handle on the runtime it was made in and starts its timers there, so that a
/// [`Client`] used from a thread outside that runtime (a `wait_event` with a timeout under
/// `futures::executor::block_on`, say) does not panic for want of a tokio context.
#[derive(Debug, Clone)]
pub struct TokioTimer {
    handle: tokio::runtime::Handle,
}

impl TokioTimer {
    /// A timer on the current tokio runtime, which must have its time driver enabled
    /// (`enable_time` or `enable_all` on its builder; `#[tokio::main]` does it): the client
    /// arms a timer for the handshake timeout at least, and tokio panics on a timer without
    /// it.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub fn new() -> Self {
        Self::with_handle(tokio::runtime::Handle::current())
    }

    /// A timer on `handle`'s runtime.
    pub fn with_handle(handle: tokio::runtime::Handle) -> Self {
        Self { handle }
    }
}

impl Default for TokioTimer {
    /// [`TokioTimer::new`].
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    fn default() -> Self {
        Self::new()
    }
}

impl rt::Timer for TokioTimer {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn sleep_until(&self, deadline: Instant) -> rt::Sleep {
        let _runtime = self.handle.enter();
        // Outside tokio's cooperative budget: a sleep polled when the task's budget is used
        // up returns Pending without arming its timer, and the driver (as rt::Timer allows)
        // polls an armed sleep again only when it is due.
        Box::pin(tokio::task::unconstrained(tokio::time::sleep_until(
            deadline.into(),
        )))
    }
}

/// A unix stream on the tokio reactor, registered for readability only. tokio's own
/// `UnixStream` registers both directions, edge-triggered, so each time the peer drains what
/// we wrote the reactor wakes up for nothing: one extra `epoll_wait` (and often a context
/// switch) per command. Writes go straight to the socket ([`rt::UnixTransport`]); only a
/// write that would block registers a duplicate of the descriptor for writability, until it
/// may be writable.
#[cfg(unix)]
struct TokioReadiness {
    io: AsyncFd<UnixStream>,
    writable: Option<AsyncFd<std::os::fd::OwnedFd>>,
}

/// Registers an owned descriptor on the reactor for `interest` only.
#[cfg(unix)]
fn register<T: std::os::fd::AsRawFd>(owned: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: callers pass owned descriptors (a stream, an OwnedFd), which stay open and the
    // same for the life of the AsyncFd that owns them.
    Ok(unsafe { AsyncFd::register_with_interest(owned, interest) }?)
}

#[cfg(unix)]
impl rt::Readiness for TokioReadiness {
    fn stream(&self) -> &UnixStream {
        self.io.get_ref()
    }

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Cleared before the read the transport makes: a newer event sets it again.
        ready!(self.io.poll_read_ready(cx))?.clear_ready();
        Poll::Ready(Ok(()))
    }

    fn poll_writable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let w = match &mut self.writable {
            Some(w) => w,
            None => {
                let fd = std::os::fd::AsFd::as_fd(self.io.get_ref()).try_clone_to_owned()?;
                self.writable.insert(register(fd, Interest::WRITABLE)?)
            }
        };
        ready!(w.poll_write_ready(cx))?.retain_ready();
        // Deregistered: the next write that blocks registers afresh (the registration
        // reports the current state, so nothing is missed).
        self.writable = None;
        Poll::Ready(Ok(()))
    }

    fn wrote(&mut self) {
        // A write went through after a wait that was not polled to the end: stop watching
        // writability, or the reactor would wake each time the peer reads.
        self.writable = None;
    }
}

/// Performs the handshake over a std unix stream, with fd passing.
#[cfg(unix)]
async fn start(stream: UnixStream, builder: Builder) -> Result<(Client, Connection), Error> {
    stream.set_nonblocking(true)?;
    let io = register(stream, Interest::READABLE)?;
    let ready = TokioReadiness { io, writable: None };
    builder
        .handshake_with_fds(rt::UnixTransport::new(ready), TokioTimer::new())
        .await
}

/// Connects to a QMP unix socket and performs the handshake; fd passing is enabled.
///
/// # Errors
/// [`ErrorKind::Io`] when the socket cannot be opened, else as for [`Builder::handshake`].
#[cfg(unix)]
pub async fn connect_unix(
    path: impl AsRef<Path>,
    builder: Builder,
) -> Result<(Client, Connection), Error> {
    connect_unix_wait(path, builder, Duration::ZERO).await
}

/// Like [`connect_unix`], retrying every 10 ms for up to `wait` while the socket does not
/// exist yet, refuses connections (QEMU still starting) or has a full listen backlog (QEMU
/// not accepting while another client holds the monitor); any other error (no permission,
/// not a socket, a path too long) is reported at once. A connection that the server
/// closes before the session is ready is reported at once: a QEMU 10.0 monitor that does
/// that does not recover. `Duration::MAX` waits for ever. Start the monitor with `wait=on`
/// when connecting this early: see [`qmp_client`]'s notes on a QEMU that has just started.
///
/// # Errors
/// As for [`connect_unix`], with the last connect error once `wait` has passed.
#[cfg(unix)]
pub async fn connect_unix_wait(
    path: impl AsRef<Path>,
    builder: Builder,
    wait: Duration,
) -> Result<(Client, Connection), Error> {
    // `None`: a wait too long to represent (`Duration::MAX`), which never runs out.
    let end = tokio::time::Instant::now().checked_add(wait);
    let stream = loop {
        match tokio::net::UnixStream::connect(path.as_ref()).await {
            Ok(s) => break s,
            Err(e)
                if !rt::worth_retrying(&e)
                    || end.is_some_and(|end| tokio::time::Instant::now() >= end) =>
            {
                return Err(e.into());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    start(stream.into_std()?, builder).await
}

/// Uses an already-connected std unix stream (one end of a socketpair whose other end QEMU
/// got as `fd=N`); fd passing is enabled. An inherited descriptor becomes one with
/// `UnixStream::from(owned_fd)`. MUST be called within a tokio runtime.
///
/// # Errors
/// As for [`connect_unix`].
#[cfg(unix)]
pub async fn from_unix_stream(
    stream: UnixStream,
    builder: Builder,
) -> Result<(Client, Connection), Error> {
    start(stream, builder).await
}

/// Accepts one connection (QEMU started with `server=off` dials us) and performs the
/// handshake; fd passing is enabled.
///
/// # Errors
/// As for [`connect_unix`].
#[cfg(unix)]
pub async fn accept(
    listener: &tokio::net::UnixListener,
    builder: Builder,
) -> Result<(Client, Connection), Error> {
    let (stream, _) = listener.accept().await?;
    start(stream.into_std()?, builder).await
}

/// Accepts one TCP connection (QEMU started with `-qmp tcp:HOST:PORT,server=off` dials us)
/// and performs the handshake.
///
/// # Errors
/// As for [`connect_tcp`].
pub async fn accept_tcp(
    listener: &tokio::net::TcpListener,
    builder: Builder,
) -> Result<(Client, Connection), Error> {
    let (stream, _) = listener.accept().await?;
    stream.set_nodelay(true)?;
    from_stream(stream, builder).await
}

/// Connects to a QMP TCP socket within the builder's
/// [`connect_timeout`](Builder::connect_timeout) and performs the handshake.
///
/// # Errors
/// As for [`connect_unix`].
pub async fn connect_tcp(
    addr: impl tokio::net::ToSocketAddrs,
    builder: Builder,
) -> Result<(Client, Connection), Error> {
    let connect = tokio::net::TcpStream::connect(addr);
    let stream = builder.connect_within(&TokioTimer::new(), connect).await?;
    stream.set_nodelay(true)?;
    from_stream(stream, builder).await
}

/// Performs the handshake over any tokio stream (no fd passing).
///
/// # Errors
/// As for [`Builder::handshake`].
pub async fn from_stream<S>(stream: S, builder: Builder) -> Result<(Client, Connection), Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    builder.handshake(stream.compat(), TokioTimer::new()).await
}

/// Spawns the driver on the current tokio runtime. Dropping the returned `JoinHandle` detaches
/// the task; the session runs until it closes, which at the latest is when the last `Client`
/// is dropped.
pub fn spawn_connection(connection: Connection) -> tokio::task::JoinHandle<Result<(), Error>> {
    tokio::spawn(connection)
}
