//! Safe operations over QMP: an allow-list policy, retries that only repeat what is safe to
//! repeat, per-group FIFO locks, deduplication of identical idempotent calls, a result cache,
//! reconnection and observability hooks.
//!
//! Everything works over the small [`Execute`] trait, so this crate depends on no runtime and
//! no client: `qmp-client` implements [`Execute`] behind its `ops` feature, and tests use a
//! scripted fake. Waiting goes through an injected [`Sleep`], time through an injected
//! [`Clock`], randomness through a seedable [`fastrand::Rng`].
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use qmp_ops::{BoxFuture, ExecError, Execute, Ops, Policy, Sleep};
//! use qmp_proto::RawJson;
//! use serde_json::value::RawValue;
//!
//! struct Fake;
//! impl Execute for Fake {
//!     fn execute<'a>(&'a self, name: &'a str, _: Option<&'a RawValue>)
//!         -> BoxFuture<'a, Result<RawJson, ExecError>> {
//!         let reply = match name {
//!             "query-status" => r#"{"running": false, "status": "prelaunch"}"#,
//!             _ => "{}",
//!         };
//!         Box::pin(async move { Ok(RawJson::from_string(reply.to_owned()).unwrap()) })
//!     }
//! }
//! struct NoWait;
//! impl Sleep for NoWait {
//!     fn sleep(&self, _: Duration) -> BoxFuture<'static, ()> { Box::pin(async {}) }
//! }
//!
//! let ops = Ops::builder(Fake, Policy::read_only(), NoWait).seed(7).build();
//! futures_executor::block_on(async {
//!     let status = ops.query_status().await.unwrap();
//!     assert_eq!(status.status, qmp_ops::RunState::Prelaunch);
//!     let denied = ops.stop().await.unwrap_err();
//!     assert_eq!(denied.kind(), qmp_ops::ErrorKind::Denied);
//! });
//! ```
#![cfg_attr(not(fuzzing), warn(missing_docs))]

mod cache;
pub mod commands;
mod error;
mod exec;
mod hooks;
mod mutex;
mod ops;
pub mod policy;
mod reconnect;
mod retry;
mod time;

pub use cache::call_key;
pub use commands::{RunState, StatusInfo};
pub use error::{ErrorKind, OpsError};
pub use exec::{BoxFuture, ExecError, Execute};
pub use hooks::{Hooks, NoHooks};
pub use mutex::{KeyedGuard, KeyedMutex, Lock};
pub use ops::{Ops, OpsBuilder};
pub use policy::{
    Allowed, ArgRule, Denial, Mode, Pattern, Policy, PolicyError, Profile, Rule, RuleRef,
};
pub use qmp_proto::SendStatus;
pub use reconnect::{Reconnected, Reconnecting};
pub use retry::{Jitter, RetryPolicy, is_retry_safe};
pub use time::{Clock, Sleep, SystemClock};
