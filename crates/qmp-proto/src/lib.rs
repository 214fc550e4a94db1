//! A sans-IO implementation of QEMU's machine protocol (QMP) and guest agent protocol (QGA).
//!
//! [`Connection`] is a pure state machine: bytes in, outputs and bytes out. It frames the
//! peer's stream of JSON values (any line structure, pretty-printed or not), parses the
//! greeting, negotiates capabilities, assigns ids and correlates replies, delivers events,
//! caps in-flight commands, tracks deadlines you drive with `now`, and resolves every request
//! exactly once with an [`Outcome`] that says whether it was sent. It performs no I/O, reads no
//! clock and uses no randomness, so it runs the same under any runtime, in tests and in fuzzers.
//!
//! # Example
//! ```
//! use std::time::{Duration, Instant};
//! use qmp_proto::{Command, Config, Connection, Outcome, Output};
//!
//! let t0 = Instant::now();
//! let mut conn = Connection::new(t0, Config::default());
//! // A command submitted early waits until the session is ready.
//! let id = conn.send(t0, Command::new("query-status")).unwrap();
//!
//! // The server greets; the machine answers with qmp_capabilities on its own.
//! conn.handle_input(t0, b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n");
//! let out = conn.poll_transmit().unwrap().to_vec();
//! assert_eq!(out, br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":0}"#);
//! conn.handle_transmitted(t0, out.len());
//!
//! // Negotiation done: the queued command goes out.
//! conn.handle_input(t0, b"{\"return\": {}, \"id\": 0}\r\n");
//! let out = conn.poll_transmit().unwrap().to_vec();
//! assert_eq!(out, br#"{"execute":"query-status","id":1}"#);
//! conn.handle_transmitted(t0, out.len());
//!
//! conn.handle_input(t0 + Duration::from_millis(1), b"{\"return\": {\"status\": \"running\", \"running\": true}, \"id\": 1}\r\n");
//! let mut reply = None;
//! while let Some(output) = conn.poll_output() {
//!     if let Output::Completed { id: done, outcome: Outcome::Replied(Ok(value)) } = output {
//!         assert_eq!(done, id);
//!         reply = Some(value);
//!     }
//! }
//! assert_eq!(reply.unwrap().get(), r#"{"status": "running", "running": true}"#);
//! ```
#![cfg_attr(not(fuzzing), warn(missing_docs))]

mod connection;
mod framer;
#[cfg(any(fuzzing, test, feature = "test-util"))]
#[doc(hidden)]
pub mod fuzzing;
mod server;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
mod wire;

pub use connection::{
    Anomaly, CloseReason, Command, Config, Connection, Failure, LocalError, Mode, Outcome, Output,
    Ready, RemoteError, RequestId, SendStatus, State, Stats,
};
pub use server::{EncodeError, Received, Server, ServerConfig, ServerRequest};
pub use wire::{
    CommandError, ErrorClass, Event, Greeting, RawJson, Timestamp, VersionInfo, VersionTriple,
};

/// The clock type every `now` argument uses. The crate never reads a clock itself.
pub type Instant = std::time::Instant;
