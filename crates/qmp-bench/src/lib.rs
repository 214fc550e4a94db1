//! Support for the `qmp-load` tool: the measured loops, runtime-neutral.
#![cfg_attr(not(fuzzing), warn(missing_docs))]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use futures_util::future::join_all;
use qmp_client::Client;
use serde::de::IgnoredAny;

/// The command every loop sends.
pub const COMMAND: &str = "query-version";

/// Runs `n` commands one after another.
///
/// # Panics
/// When a command fails.
pub async fn sequential(client: &Client, n: usize) {
    for _ in 0..n {
        let _: IgnoredAny = client.execute(COMMAND, &()).await.expect("command failed");
    }
}

/// Runs `n` commands from `concurrency` concurrent callers (within one task).
///
/// # Panics
/// When a command fails.
pub async fn concurrent(client: &Client, n: usize, concurrency: usize) {
    let concurrency = concurrency.max(1);
    let callers = (0..concurrency).map(|i| {
        let share = n / concurrency + usize::from(i < n % concurrency);
        async move { sequential(client, share).await }
    });
    join_all(callers).await;
}

/// The baseline: a blocking socket, no library, compact requests, `oob` negotiated, up to
/// `concurrency` requests in flight. Counts replies by their line ends.
///
/// # Errors
/// When the socket fails.
pub fn raw(path: &Path, n: usize, concurrency: usize) -> std::io::Result<()> {
    let stream = UnixStream::connect(path)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?; // greeting
    writer.write_all(br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#)?;
    line.clear();
    reader.read_until(b'\n', &mut line)?;
    let mut sent = 0usize;
    let mut received = 0usize;
    let mut batch = Vec::new();
    while received < n {
        batch.clear();
        while sent < n && sent - received < concurrency.max(1) {
            batch.extend_from_slice(br#"{"execute":"query-version","id":"#);
            batch.extend_from_slice(sent.to_string().as_bytes());
            batch.push(b'}');
            sent += 1;
        }
        if !batch.is_empty() {
            writer.write_all(&batch)?;
        }
        line.clear();
        reader.read_until(b'\n', &mut line)?;
        if line.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line.starts_with(b"{\"return\"") || line.starts_with(b"{\"id\"") {
            received += 1;
        }
    }
    Ok(())
}

/// User plus system CPU time of this process so far, in microseconds.
pub fn cpu_micros() -> f64 {
    // SAFETY: getrusage only writes the struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}
