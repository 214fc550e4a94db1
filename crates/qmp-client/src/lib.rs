//! A runtime-agnostic async client for QEMU's machine protocol (QMP) and guest agent (QGA).
//!
//! [`handshake`] (or [`Builder::handshake`]) takes any futures-io transport and a
//! [`rt::Timer`], waits until the session is ready, and returns a [`Client`] and its
//! [`Connection`]. The connection is the driver future: spawn it on your runtime (the
//! `qmp-tokio`, `qmp-smol` and `qmp-async-std` adapters do this for you). The client is a cheap
//! clonable handle usable from many tasks: typed and raw commands, exec-oob, fd passing,
//! per-call timeouts, and event subscriptions with bounded, drop-oldest queues. A stream
//! subscribed before the connection is spawned also gets the events read during the
//! handshake (as many as the event queue holds; `Lagged` counts the rest, and messages that
//! could not be read, in their place). Dropping the last client closes the session.
//!
//! This crate does no I/O of its own, spawns nothing, and depends on no runtime. The protocol
//! logic lives in the sans-IO [`qmp_proto`] machine. It wakes (and drops) your tasks' wakers
//! only after releasing its locks, so it also works on an executor that polls a task inside
//! `wake`.
//!
//! # Example
//! ```no_run
//! # async fn demo(io: impl futures_io::AsyncRead + futures_io::AsyncWrite + Send + Unpin + 'static,
//! #               timer: impl qmp_client::rt::Timer) -> Result<(), qmp_client::Error> {
//! let (client, connection) = qmp_client::handshake(io, timer).await?;
//! // spawn(connection);
//! let status: serde_json::Value = client.execute("query-status", &()).await?;
//! # drop((status, connection)); Ok(()) }
//! ```
//!
//! # Connecting to a QEMU you have just started
//! QEMU 10.0's monitor socket listens a moment before the monitor's I/O thread owns it. A
//! client that connects in that window (as `connect_unix_wait` in the adapters may) can be
//! greeted twice (the client reports the second greeting as an anomaly and goes on), never be
//! answered (the handshake timeout, 10 s by default, ends the wait), or be cut off before any
//! greeting. A monitor that has cut a client off does not recover: in 2,400 launches under
//! load, 9 did, and each then refused connections for 5 s or cut off the next client too. So
//! `connect_unix_wait` reports the cut-off at once instead of trying again
//! (`cargo run --release -p qmp-bench --example startup_client`). Starting the monitor with
//! `wait=on` avoids all of it: QEMU then accepts the first connection before it sets up the
//! monitor. The testkit launcher measures and documents it.
#![cfg_attr(not(fuzzing), warn(missing_docs))]

mod client;
mod driver;
mod error;
mod events;
#[cfg(feature = "ops")]
mod ops;
pub mod rt;
mod shared;

pub use client::{Builder, Client, handshake};
pub use driver::Connection;
pub use error::{Error, ErrorKind};
pub use events::{EventFilter, EventItem, EventStream};
pub use qmp_proto::{
    CloseReason, Command, CommandError, Config, ErrorClass, Event, Greeting, Mode, RawJson,
    RemoteError, SendStatus, Stats, Timestamp, VersionInfo,
};
