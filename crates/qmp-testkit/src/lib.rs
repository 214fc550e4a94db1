//! Test helpers for the QMP workspace.
//!
//! - [`fake`]: a scriptable fake QEMU on a real socket (Unix, TCP or a socketpair), on its own
//!   thread, with every fault the protocol allows (delays, silence, id-less errors, unknown
//!   ids, invalid JSON, oversized and deep messages, EOF mid-message, resets, stalls).
//! - [`launch`]: starts real QEMU programs (qemu-storage-daemon, qemu-system-x86_64, qemu-ga)
//!   in their own temp dirs, skipping (or failing under `QMP_REQUIRE_QEMU=1`) when missing.
//! - [`example`]: runs an adapter's status example against a real qemu-system-x86_64 and
//!   checks its output.
//! - [`transcript`]: records the exact bytes between a client and a real QEMU, and replays a
//!   recorded transcript to a client while checking what it sends.
#![cfg_attr(not(fuzzing), warn(missing_docs))]

pub mod example;
pub mod fake;
pub mod launch;
mod sys;
pub mod transcript;
