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
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

pub use qmp_client::*;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

/// The tokio clock and timer. Honours `tokio::time::pause` (virtual time in tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioTimer;

impl rt::Timer for TokioTimer {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn sleep_until(&self, deadline: Instant) -> rt::Sleep {
        Box::pin(tokio::time::sleep_until(deadline.into()))
    }
}

/// Writes to a tokio unix stream with descriptors attached (`SCM_RIGHTS`).
#[cfg(unix)]
fn write_fds(
    sock: Pin<&mut Compat<tokio::net::UnixStream>>,
    cx: &mut Context<'_>,
    buf: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Poll<io::Result<usize>> {
    let sock = sock.get_ref();
    loop {
        ready!(sock.poll_write_ready(cx))?;
        match sock.try_io(tokio::io::Interest::WRITABLE, || {
            send_with_fds(sock, buf, fds)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            res => return Poll::Ready(res),
        }
    }
}

/// The unix transport with fd passing.
#[cfg(unix)]
fn unix(stream: tokio::net::UnixStream) -> rt::WithFdWriter<Compat<tokio::net::UnixStream>> {
    rt::WithFdWriter::new(stream.compat(), write_fds)
}

/// One `sendmsg` with the descriptors as `SCM_RIGHTS`.
#[cfg(unix)]
fn send_with_fds(
    sock: impl std::os::fd::AsFd,
    buf: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<usize> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space =
        vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(fds));
    let iov = [io::IoSlice::new(buf)];
    Ok(rustix::net::sendmsg(
        sock,
        &iov,
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
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
/// exist yet or refuses connections (QEMU still starting).
///
/// # Errors
/// As for [`connect_unix`], with the last connect error once `wait` has passed.
#[cfg(unix)]
pub async fn connect_unix_wait(
    path: impl AsRef<Path>,
    builder: Builder,
    wait: Duration,
) -> Result<(Client, Connection), Error> {
    let end = tokio::time::Instant::now() + wait;
    let stream = loop {
        match tokio::net::UnixStream::connect(path.as_ref()).await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() >= end => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    builder.handshake_with_fds(unix(stream), TokioTimer).await
}

/// Uses an already-connected std unix stream (one end of a socketpair whose other end QEMU
/// got as `fd=N`); fd passing is enabled. MUST be called within a tokio runtime.
///
/// # Errors
/// As for [`connect_unix`].
#[cfg(unix)]
pub async fn from_unix_stream(
    stream: std::os::unix::net::UnixStream,
    builder: Builder,
) -> Result<(Client, Connection), Error> {
    stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(stream)?;
    builder.handshake_with_fds(unix(stream), TokioTimer).await
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
    builder.handshake_with_fds(unix(stream), TokioTimer).await
}

/// Connects to a QMP TCP socket and performs the handshake.
///
/// # Errors
/// As for [`connect_unix`].
pub async fn connect_tcp(
    addr: impl tokio::net::ToSocketAddrs,
    builder: Builder,
) -> Result<(Client, Connection), Error> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
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
    builder.handshake(stream.compat(), TokioTimer).await
}

/// Spawns the driver on the current tokio runtime. The session runs until it closes even if
/// the handle is dropped.
pub fn spawn_connection(connection: Connection) -> tokio::task::JoinHandle<Result<(), Error>> {
    tokio::spawn(connection)
}
