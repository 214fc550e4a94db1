//! Support for the `qmp-load` tool: the measured loops (runtime-neutral), the raw baseline,
//! the separate-process fake server, and the statistics.
#![cfg_attr(not(fuzzing), warn(missing_docs))]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use futures_util::future::join_all;
use qmp_client::Client;
use serde::de::IgnoredAny;

/// The command every loop sends.
pub const COMMAND: &str = "query-version";

/// One measured run: wall time and this process's CPU time over the commands only (after the
/// handshake, before the close).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Commands run.
    pub n: usize,
    /// Wall-clock seconds.
    pub secs: f64,
    /// User plus system CPU microseconds of this process (all its threads).
    pub cpu_us: f64,
    /// Voluntary context switches of this process (a thread blocked: in `epoll_wait`, on a
    /// futex, in a blocking read).
    pub switches: u64,
}

impl Sample {
    /// Commands per second.
    pub fn ops_per_sec(&self) -> f64 {
        self.n as f64 / self.secs
    }

    /// CPU microseconds per command.
    pub fn cpu_us_per_op(&self) -> f64 {
        self.cpu_us / self.n as f64
    }

    /// Voluntary context switches per command.
    pub fn switches_per_op(&self) -> f64 {
        self.switches as f64 / self.n as f64
    }
}

/// A start point for a [`Sample`].
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch {
    t0: Instant,
    cpu0: f64,
    switches0: u64,
}

impl Stopwatch {
    /// Starts measuring now.
    pub fn start() -> Self {
        let (cpu0, switches0) = usage();
        Self {
            t0: Instant::now(),
            cpu0,
            switches0,
        }
    }

    /// The sample for `n` commands since [`start`](Self::start).
    pub fn stop(&self, n: usize) -> Sample {
        let secs = self.t0.elapsed().as_secs_f64();
        let (cpu, switches) = usage();
        Sample {
            n,
            secs,
            cpu_us: cpu - self.cpu0,
            switches: switches - self.switches0,
        }
    }
}

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

/// Measures `n` commands (`seq`: one after another; `conc`: `concurrency` callers), then
/// closes the client.
///
/// # Panics
/// When a command fails.
pub async fn workload(client: Client, mode: &str, n: usize, concurrency: usize) -> Sample {
    let watch = Stopwatch::start();
    match mode {
        "conc" => concurrent(&client, n, concurrency).await,
        _ => sequential(&client, n).await,
    }
    let sample = watch.stop(n);
    client.close().await;
    sample
}

/// How the raw baseline waits for a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawWait {
    /// In a blocking `recv`, as the issue's baseline does. On Linux a thread blocked there is
    /// also woken (spuriously) when the peer has read our request, because the socket's
    /// write-space wake-up goes to the same wait queue.
    Block,
    /// In `poll(2)` for `POLLIN` before each `recv`, as any event loop does: woken only when
    /// a reply arrives.
    Poll,
    /// As [`Poll`](Self::Poll), but the first wait for each reply times out after this many
    /// microseconds and waits again: one timer wake-up in the middle of each round trip. An
    /// experiment, to see whether a wake-up alone (and not what the thread does then) makes
    /// the blocking client faster on this VM.
    Tick(u32),
}

/// Which ids the raw baseline writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawIds {
    /// 0, 1, 2, ...: a new number per request, as the issue's baseline does. Its requests grow
    /// by a byte at every power of ten.
    Sequential,
    /// 1 to `concurrency`, each reused once its reply is in (replies come in order): the
    /// shortest ids a client can write.
    Reuse,
    /// No id at all: QEMU answers in-band requests in order, so replies can be matched by
    /// position. An experiment to price the id's bytes; `exec-oob` needs an id.
    None,
}

/// The baseline: a blocking socket, no library, compact requests, `oob` negotiated, up to
/// `concurrency` requests in flight. Counts replies by their line ends.
///
/// # Errors
/// When the socket fails.
pub fn raw(
    path: &Path,
    n: usize,
    concurrency: usize,
    wait: RawWait,
    ids: RawIds,
) -> std::io::Result<Sample> {
    let stream = UnixStream::connect(path)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut line = Vec::new();
    next_line(&mut reader, &mut line, RawWait::Block)?; // greeting
    writer.write_all(br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#)?;
    next_line(&mut reader, &mut line, RawWait::Block)?;
    let watch = Stopwatch::start();
    let mut sent = 0usize;
    let mut received = 0usize;
    let mut batch = Vec::new();
    while received < n {
        batch.clear();
        while sent < n && sent - received < concurrency.max(1) {
            let id = match ids {
                RawIds::Sequential => Some(sent),
                RawIds::Reuse => Some(sent % concurrency.max(1) + 1),
                RawIds::None => None,
            };
            match id {
                // Into the reused buffer, no allocation.
                Some(id) => write!(batch, r#"{{"execute":"query-version","id":{id}}}"#)?,
                None => batch.extend_from_slice(br#"{"execute":"query-version"}"#),
            }
            sent += 1;
        }
        if !batch.is_empty() {
            writer.write_all(&batch)?;
        }
        next_line(&mut reader, &mut line, wait)?;
        if line.starts_with(b"{\"return\"") || line.starts_with(b"{\"id\"") {
            received += 1;
        }
    }
    Ok(watch.stop(n))
}

/// Reads one line into `line` (cleared first), waiting as `wait` says whenever the buffer
/// holds no whole line.
fn next_line(
    reader: &mut BufReader<UnixStream>,
    line: &mut Vec<u8>,
    wait: RawWait,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    line.clear();
    loop {
        let buffered = reader.buffer();
        if let Some(end) = buffered.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buffered[..=end]);
            reader.consume(end + 1);
            return Ok(());
        }
        line.extend_from_slice(buffered);
        let len = buffered.len();
        reader.consume(len);
        let tick = match wait {
            RawWait::Block => None,
            RawWait::Poll => Some(None),
            RawWait::Tick(us) => Some(Some(libc::timespec {
                tv_sec: libc::time_t::from(us / 1_000_000),
                tv_nsec: libc::c_long::from(us % 1_000_000) * 1000,
            })),
        };
        if let Some(mut tick) = tick {
            let mut pfd = libc::pollfd {
                fd: reader.get_ref().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            loop {
                let timeout = tick.take();
                let timeout = timeout
                    .as_ref()
                    .map_or(std::ptr::null(), std::ptr::from_ref);
                // SAFETY: one valid pollfd and an optional timespec, both live for the call.
                match unsafe { libc::ppoll(&mut pfd, 1, timeout, std::ptr::null()) } {
                    0 => continue, // the tick: wait again, now without a timeout
                    n if n > 0 => break,
                    _ => {
                        let e = std::io::Error::last_os_error();
                        if e.kind() != std::io::ErrorKind::Interrupted {
                            return Err(e);
                        }
                    }
                }
            }
        }
        if reader.fill_buf()?.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// The fake QEMU the load is served by: the testkit's, answering every command at once, and
/// reading up to `queue_limit` queued in-band commands (QEMU: 8).
///
/// # Errors
/// When the socket cannot be created.
pub fn fake_server(queue_limit: usize) -> std::io::Result<qmp_testkit::fake::FakeQemu> {
    let script = qmp_testkit::fake::Script::new().queue_limit(queue_limit);
    qmp_testkit::fake::FakeQemu::unix(script)
}

/// The median of `values` (the mean of the middle two for an even count); NaN when empty.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// CPU microseconds and voluntary context switches of this process so far (getrusage
/// `RUSAGE_SELF`: all threads, no children).
fn usage() -> (f64, u64) {
    // SAFETY: getrusage only writes the struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    let cpu = tv(usage.ru_utime) + tv(usage.ru_stime);
    (cpu, u64::try_from(usage.ru_nvcsw).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_line_joins_pieces_and_keeps_what_follows() {
        for wait in [RawWait::Block, RawWait::Poll, RawWait::Tick(5_000)] {
            let (a, mut b) = UnixStream::pair().unwrap();
            let mut reader = BufReader::new(a);
            let mut line = Vec::new();
            let writer = std::thread::spawn(move || {
                b.write_all(b"{\"return\": {}").unwrap();
                std::thread::sleep(std::time::Duration::from_millis(20));
                b.write_all(b", \"id\": 1}\r\n{\"id\": 2").unwrap();
                b.write_all(b"}\r\n").unwrap();
            });
            next_line(&mut reader, &mut line, wait).unwrap();
            assert_eq!(line, b"{\"return\": {}, \"id\": 1}\r\n");
            next_line(&mut reader, &mut line, wait).unwrap();
            assert_eq!(line, b"{\"id\": 2}\r\n");
            writer.join().unwrap();
            let e = next_line(&mut reader, &mut line, wait).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        }
    }

    #[test]
    fn raw_baseline_runs_against_the_fake_in_both_wait_modes() {
        let fake = fake_server(64).unwrap();
        let path = fake.socket_path().unwrap().to_owned();
        let runs = [
            (RawWait::Block, 1, RawIds::Sequential),
            (RawWait::Poll, 1, RawIds::Sequential),
            (RawWait::Poll, 8, RawIds::Sequential),
            (RawWait::Block, 1, RawIds::Reuse),
            (RawWait::Tick(50), 3, RawIds::Reuse),
            (RawWait::Poll, 8, RawIds::None),
        ];
        for (wait, conc, ids) in runs {
            let s = raw(&path, 100, conc, wait, ids).unwrap();
            assert_eq!(s.n, 100);
            assert!(s.secs > 0.0);
        }
        let requests = fake.requests();
        assert_eq!(requests.len(), 606);
        let ids: Vec<Vec<Option<String>>> = requests
            .chunks(101)
            .map(|run| {
                assert_eq!(run[0].name.as_deref(), Some("qmp_capabilities"));
                assert!(run[1..].iter().all(|r| r.name.as_deref() == Some(COMMAND)));
                run[1..].iter().map(|r| r.id.clone()).collect()
            })
            .collect();
        let expect =
            |f: fn(usize) -> usize| (0..100).map(|i| Some(f(i).to_string())).collect::<Vec<_>>();
        assert_eq!(ids[0], expect(|i| i));
        assert_eq!(ids[2], expect(|i| i));
        assert_eq!(ids[3], expect(|_| 1));
        assert_eq!(ids[4], expect(|i| i % 3 + 1));
        assert_eq!(ids[5], vec![None; 100]);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }
}
