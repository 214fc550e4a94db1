//! smol adapter for [`qmp_client`]: opens sockets on the async-io reactor, provides
//! [`SmolTimer`], passes file descriptors over unix sockets, and spawns the driver. It holds no
//! protocol logic.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), qmp_smol::Error> {
//! let (client, connection) = qmp_smol::connect_unix("/tmp/qmp.sock", qmp_smol::Builder::new()).await?;
//! qmp_smol::spawn_connection(connection).detach();
//! let status: serde_json::Value = client.execute("query-status", &()).await?;
//! # drop(status); Ok(()) }
//! ```
#![cfg_attr(not(fuzzing), warn(missing_docs))]

use std::io;
use std::path::Path;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_io::Async;
pub use qmp_client::*;

/// The async-io timer (what smol and async-std use).
#[derive(Debug, Clone, Copy, Default)]
pub struct SmolTimer;

impl rt::Timer for SmolTimer {
    fn sleep_until(&self, deadline: Instant) -> rt::Sleep {
        Box::pin(async move {
            async_io::Timer::at(deadline).await;
        })
    }
}

/// A std unix stream on the async-io reactor, read and written by [`rt::UnixTransport`]
/// (async-io's own `poll_read` tries the socket before waiting, and again after each event:
/// up to four `recv` calls per reply instead of one).
#[cfg(unix)]
struct Unix(Async<std::os::unix::net::UnixStream>);

#[cfg(unix)]
impl rt::Readiness for Unix {
    fn stream(&self) -> &std::os::unix::net::UnixStream {
        self.0.get_ref()
    }

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_readable(cx)
    }

    fn poll_writable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_writable(cx)
    }
}

/// Performs the handshake over a unix stream, with fd passing.
#[cfg(unix)]
async fn start(
    stream: Async<std::os::unix::net::UnixStream>,
    builder: Builder,
) -> Result<(Client, Connection), Error> {
    let io = rt::UnixTransport::new(Unix(stream));
    builder.handshake_with_fds(io, SmolTimer).await
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
    let end = Instant::now().checked_add(wait);
    let stream = loop {
        match Async::<std::os::unix::net::UnixStream>::connect(path.as_ref()).await {
            Ok(s) => break s,
            Err(e) if !rt::worth_retrying(&e) || end.is_some_and(|end| Instant::now() >= end) => {
                return Err(e.into());
            }
            Err(_) => _ = async_io::Timer::after(Duration::from_millis(10)).await,
        }
    };
    start(stream, builder).await
}

/// Uses an already-connected std unix stream (one end of a socketpair whose other end QEMU
/// got as `fd=N`); fd passing is enabled. An inherited descriptor becomes one with
/// `UnixStream::from(owned_fd)`.
///
/// # Errors
/// As for [`connect_unix`].
#[cfg(unix)]
pub async fn from_unix_stream(
    stream: std::os::unix::net::UnixStream,
    builder: Builder,
) -> Result<(Client, Connection), Error> {
    let stream = Async::new(stream)?;
    start(stream, builder).await
}

/// Accepts one connection (QEMU started with `server=off` dials us) and performs the
/// handshake; fd passing is enabled.
///
/// # Errors
/// As for [`connect_unix`].
#[cfg(unix)]
pub async fn accept(
    listener: &Async<std::os::unix::net::UnixListener>,
    builder: Builder,
) -> Result<(Client, Connection), Error> {
    let (stream, _) = listener.accept().await?;
    start(stream, builder).await
}

/// Accepts one TCP connection (QEMU started with `-qmp tcp:HOST:PORT,server=off` dials us)
/// and performs the handshake.
///
/// # Errors
/// As for [`connect_tcp`].
pub async fn accept_tcp(
    listener: &smol::net::TcpListener,
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
    addr: impl smol::net::AsyncToSocketAddrs,
    builder: Builder,
) -> Result<(Client, Connection), Error> {
    let connect = smol::net::TcpStream::connect(addr);
    let stream = builder.connect_within(&SmolTimer, connect).await?;
    stream.set_nodelay(true)?;
    from_stream(stream, builder).await
}

/// Performs the handshake over any futures-io stream (a TLS stream, a pipe...), without fd
/// passing.
///
/// # Errors
/// As for [`Builder::handshake`].
pub async fn from_stream<S>(stream: S, builder: Builder) -> Result<(Client, Connection), Error>
where
    S: futures_io::AsyncRead + futures_io::AsyncWrite + Send + Unpin + 'static,
{
    builder.handshake(stream, SmolTimer).await
}

/// Spawns the driver on smol's global executor. Call `.detach()` on the task to let the
/// session run until it closes (at the latest when the last `Client` is dropped); dropping
/// the task cancels the driver (which closes the session).
///
/// The global executor runs on its own threads, so each command crosses threads twice. For
/// the least CPU per command, run the driver on the callers' thread instead: spawn the
/// [`Connection`] on a `smol::LocalExecutor` that the thread runs (`block_on(ex.run(...))`),
/// or await it alongside the work (`join`).
pub fn spawn_connection(connection: Connection) -> smol::Task<Result<(), Error>> {
    smol::spawn(connection)
}
