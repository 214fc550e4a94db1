//! async-std adapter for [`qmp_client`]. async-std runs on the async-io reactor, so the unix
//! sockets, fd passing and timer are `qmp-smol`'s (async-io based, no smol executor involved);
//! this crate adds [`accept`] and [`accept_tcp`] on async-std's own listeners,
//! [`connect_tcp`] and [`from_stream`] on its streams, and [`spawn_connection`] on its
//! executor. It holds no protocol logic.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), qmp_async_std::Error> {
//! let (client, connection) =
//!     qmp_async_std::connect_unix("/tmp/qmp.sock", qmp_async_std::Builder::new()).await?;
//! qmp_async_std::spawn_connection(connection);
//! let status: serde_json::Value = client.execute("query-status", &()).await?;
//! # drop(status); Ok(()) }
//! ```
#![cfg_attr(not(fuzzing), warn(missing_docs))]

pub use qmp_client::*;
pub use qmp_smol::SmolTimer as AsyncStdTimer;
#[cfg(unix)]
pub use qmp_smol::{connect_unix, connect_unix_wait, from_unix_stream};

/// Accepts one connection on async-std's unix listener (QEMU started with `server=off` dials
/// us) and performs the handshake; fd passing is enabled.
///
/// # Errors
/// As for [`connect_unix`].
#[cfg(unix)]
pub async fn accept(
    listener: &async_std::os::unix::net::UnixListener,
    builder: Builder,
) -> Result<(Client, Connection), Error> {
    let (stream, _) = listener.accept().await?;
    // Taken off async-std's reactor registration (the only reference, just accepted) and
    // registered again by the fd-passing transport.
    let stream = std::os::unix::net::UnixStream::try_from(stream)?;
    from_unix_stream(stream, builder).await
}

/// Accepts one TCP connection on async-std's listener (QEMU started with
/// `-qmp tcp:HOST:PORT,server=off` dials us) and performs the handshake.
///
/// # Errors
/// As for [`connect_tcp`].
pub async fn accept_tcp(
    listener: &async_std::net::TcpListener,
    builder: Builder,
) -> Result<(Client, Connection), Error> {
    let (stream, _) = listener.accept().await?;
    stream.set_nodelay(true)?;
    from_stream(stream, builder).await
}

/// Connects to a QMP TCP socket with async-std's `TcpStream` within the builder's
/// [`connect_timeout`](Builder::connect_timeout) and performs the handshake.
///
/// # Errors
/// [`ErrorKind::Io`] when the socket cannot be opened, else as for [`Builder::handshake`].
pub async fn connect_tcp(
    addr: impl async_std::net::ToSocketAddrs,
    builder: Builder,
) -> Result<(Client, Connection), Error> {
    let connect = async_std::net::TcpStream::connect(addr);
    let stream = builder.connect_within(&AsyncStdTimer, connect).await?;
    stream.set_nodelay(true)?;
    from_stream(stream, builder).await
}

/// Performs the handshake over any async-std (futures-io) stream, without fd passing.
///
/// # Errors
/// As for [`Builder::handshake`].
pub async fn from_stream<S>(stream: S, builder: Builder) -> Result<(Client, Connection), Error>
where
    S: async_std::io::Read + async_std::io::Write + Send + Unpin + 'static,
{
    builder.handshake(stream, AsyncStdTimer).await
}

/// Spawns the driver on async-std's executor. Dropping the returned `JoinHandle` detaches the
/// task; the session runs until it closes, which at the latest is when the last `Client` is
/// dropped.
///
/// The executor's threads are not the caller's, so each command crosses threads twice: 1.6-2.2x
/// the CPU per command of the alternatives below, measured against qemu-storage-daemon
/// (`qmp-load --driver spawn`, see qmp-bench's README). For the least CPU per command, run the
/// driver on the callers' thread: await it alongside the work (`join`), or spawn it on a
/// same-thread executor (`async-executor`'s `LocalExecutor` inside `block_on`).
///
/// The cost comes from async-std's pool having more than one thread (one per CPU by default):
/// the driver and the task calling the client end up on different threads. With
/// `ASYNC_STD_THREAD_COUNT=1` in the environment, the same `qmp-load --runtime async-std
/// --driver spawn` runs measured as the raw client did (one separate 5-round comparison on
/// 2026-11-24, so its figures differ a little from the README's tables; medians, one at a time:
/// 0.95x its commands/s and 1.12x its CPU, against 0.81x and 2.5x on the default two-thread
/// pool; 8 in flight: 1.02x and 1.03x, against 0.99x and 1.9x).
pub fn spawn_connection(connection: Connection) -> async_std::task::JoinHandle<Result<(), Error>> {
    async_std::task::spawn(connection)
}
