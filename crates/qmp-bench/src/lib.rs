//! Support for the `qmp-load` tool: the measured loops (runtime-neutral), the raw baseline,
//! the separate-process fake server, and the statistics.
#![cfg_attr(not(fuzzing), warn(missing_docs))]

use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
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
/// # Errors
/// The first command that fails.
pub async fn sequential(client: &Client, n: usize) -> Result<(), qmp_client::Error> {
    for _ in 0..n {
        let _: IgnoredAny = client.execute(COMMAND, &()).await?;
    }
    Ok(())
}

/// Runs `n` commands from `concurrency` concurrent callers (within one task).
///
/// # Errors
/// The first command that fails (the other callers stop then).
pub async fn concurrent(
    client: &Client,
    n: usize,
    concurrency: usize,
) -> Result<(), qmp_client::Error> {
    let concurrency = concurrency.max(1);
    let callers = (0..concurrency).map(|i| {
        let share = n / concurrency + usize::from(i < n % concurrency);
        sequential(client, share)
    });
    try_join_all(callers).await.map(drop)
}

/// Measures `n` commands (`conc`: `concurrency` callers; otherwise one after another), then
/// closes the client (also after a failure).
///
/// # Errors
/// The first command that fails.
pub async fn workload(
    client: Client,
    mode: &str,
    n: usize,
    concurrency: usize,
) -> Result<Sample, qmp_client::Error> {
    let watch = Stopwatch::start();
    let done = match mode {
        "conc" => concurrent(&client, n, concurrency).await,
        _ => sequential(&client, n).await,
    };
    let sample = watch.stop(n);
    client.close().await;
    done.map(|()| sample)
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

/// The baseline: a blocking socket, no library, compact requests, `oob` negotiated when the
/// greeting offers it (as the library does), up to `in_flight` requests on the wire.
///
/// It waits for data (as `wait` says), then takes every whole line that came, then writes one
/// batch of requests that brings the number on the wire back to `in_flight`: with one in
/// flight, one `send` and one `recv` per command. Each reply must be a success (`{"return"`
/// first) carrying the id of the oldest unanswered request (QEMU answers in-band commands in
/// order); events (`{"timestamp"` or `{"event"` first) are skipped, as they may come before the
/// negotiation reply too. Anything else ends the run with an error: an error reply, an
/// unexpected id, a greeting that is not one, a failed negotiation, a line over 1 MiB, EOF, or
/// `timeout` without data from the server (or without it reading our requests; a thread
/// watches that, so the loop pays no timer).
///
/// # Errors
/// The socket fails or times out, or the server breaks the rules above. The message says what
/// came (the line, cut at 200 bytes) and at which point; [`io::ErrorKind::TimedOut`] for a
/// timeout, [`io::ErrorKind::InvalidData`] for an unexpected line.
pub fn raw(
    path: &Path,
    n: usize,
    in_flight: usize,
    wait: RawWait,
    ids: RawIds,
    timeout: Duration,
) -> io::Result<Sample> {
    let in_flight = in_flight.max(1);
    let stream = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot connect to {}: {e}", path.display()),
        )
    })?;
    let mut rx = Lines::new(stream, wait, timeout)?;
    let greeting = rx
        .next_line()
        .map_err(|e| context(e, "waiting for the greeting"))?;
    if greeting == b"{" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the server pretty-prints (pretty=on); --raw reads one message per line",
        ));
    }
    if !greeting.starts_with(b"{\"QMP\"") {
        return Err(unexpected("expected the QMP greeting", greeting));
    }
    let negotiate: &[u8] = if offers_oob(greeting) {
        br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#
    } else {
        br#"{"execute":"qmp_capabilities"}"#
    };
    rx.send(negotiate)?;
    loop {
        let line = rx
            .next_line()
            .map_err(|e| context(e, "waiting for the qmp_capabilities reply"))?;
        match Line::of(line) {
            Line::Event => {}
            Line::Return => break,
            Line::Other => return Err(unexpected("qmp_capabilities failed", line)),
        }
    }
    let watch = Stopwatch::start();
    let mut sent = 0usize;
    let mut received = 0usize;
    let mut batch = Vec::new();
    loop {
        // Every whole line that came with the last read.
        while let Some(range) = rx.buffered_line() {
            let line = &rx.buf[range];
            match Line::of(line) {
                Line::Event => continue,
                Line::Return if received < sent => {}
                Line::Return => return Err(unexpected("a reply to no request", line)),
                Line::Other => {
                    return Err(unexpected(&format!("reply {received} is no success"), line));
                }
            }
            // Replies come in order: this one answers request `received`.
            let id_ok = match ids {
                RawIds::Sequential => has_id(line, received),
                RawIds::Reuse => has_id(line, received % in_flight + 1),
                RawIds::None => true,
            };
            if !id_ok {
                return Err(unexpected(
                    &format!("reply {received} does not carry the id of request {received}"),
                    line,
                ));
            }
            received += 1;
            rx.watchdog.progress();
        }
        if received == n {
            break;
        }
        // One batch: back to `in_flight` on the wire.
        batch.clear();
        while sent < n && sent - received < in_flight {
            let id = match ids {
                RawIds::Sequential => Some(sent),
                RawIds::Reuse => Some(sent % in_flight + 1),
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
            rx.send(&batch)
                .map_err(|e| context(e, &format!("after {received} of {n} replies")))?;
        }
        rx.fill()
            .map_err(|e| context(e, &format!("after {received} of {n} replies")))?;
    }
    Ok(watch.stop(n))
}

/// What a line from the server is, by its first member (QEMU's and the fake's layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// `{"return": ...}`: a success reply.
    Return,
    /// `{"timestamp": ...}` or `{"event": ...}`: an event.
    Event,
    /// Anything else: an error reply (`{"id": N, "error": ...}`, `{"error": ...}`), junk.
    Other,
}

impl Line {
    fn of(line: &[u8]) -> Self {
        if line.starts_with(b"{\"return\"") {
            Self::Return
        } else if line.starts_with(b"{\"timestamp\"") || line.starts_with(b"{\"event\"") {
            Self::Event
        } else {
            Self::Other
        }
    }
}

/// Whether a reply line (without its line end) ends with the member `"id": ID}`, as QEMU's and
/// the fake's success replies do.
fn has_id(line: &[u8], id: usize) -> bool {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = id;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    line.strip_suffix(b"}")
        .and_then(|l| l.strip_suffix(&digits[at..]))
        .and_then(|l| l.strip_suffix(b":").or_else(|| l.strip_suffix(b": ")))
        .is_some_and(|l| l.ends_with(b"\"id\""))
}

/// Whether a greeting line lists `"oob"` among its capabilities.
fn offers_oob(greeting: &[u8]) -> bool {
    let key = b"\"capabilities\"";
    let Some(at) = greeting.windows(key.len()).position(|w| w == key) else {
        return false;
    };
    let caps = &greeting[at + key.len()..];
    let caps = &caps[..caps.iter().position(|&b| b == b']').unwrap_or(caps.len())];
    caps.windows(5).any(|w| w == b"\"oob\"")
}

/// `e` with `what` appended to its message (same kind).
fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{e} ({what})"))
}

/// The server closed the connection.
fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the server closed the connection",
    )
}

/// A write or read error; the ways a closed connection shows up say so.
fn peer_gone(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => closed(),
        _ => e,
    }
}

/// An [`io::ErrorKind::InvalidData`] error quoting `line` (cut at 200 bytes).
fn unexpected(what: &str, line: &[u8]) -> io::Error {
    const SHOWN: usize = 200;
    let cut = &line[..line.len().min(SHOWN)];
    let more = if line.len() > SHOWN { "..." } else { "" };
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{what}: {}{more}", String::from_utf8_lossy(cut)),
    )
}

/// Longest line the raw baseline takes (a reply or an event).
const MAX_LINE: usize = 1 << 20;

/// The raw baseline's socket and its input: lines cut from one reused buffer.
struct Lines {
    stream: UnixStream,
    /// Input; `start..end` is not consumed yet.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// `start..scan` holds no line end.
    scan: usize,
    wait: RawWait,
    watchdog: Watchdog,
}

impl Lines {
    /// Reads and writes `stream`; a [`Watchdog`] shuts it down after `timeout` without
    /// progress.
    fn new(stream: UnixStream, wait: RawWait, timeout: Duration) -> io::Result<Self> {
        let watchdog = Watchdog::start(stream.try_clone()?, timeout)?;
        Ok(Self {
            stream,
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
            scan: 0,
            wait,
            watchdog,
        })
    }

    /// Writes all of `bytes`; each write that gets some through counts as progress.
    fn send(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.stream.write(bytes) {
                Ok(k) if k > 0 && !self.watchdog.fired() => {
                    bytes = &bytes[k..];
                    self.watchdog.progress();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ if self.watchdog.fired() => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the server stopped reading our requests for {:?}",
                            self.watchdog.timeout
                        ),
                    ));
                }
                Ok(_) => return Err(closed()),
                Err(e) => return Err(peer_gone(e)),
            }
        }
        Ok(())
    }

    /// The next whole line already read (its range in `buf`, without CR LF), if any.
    fn buffered_line(&mut self) -> Option<Range<usize>> {
        let from = self.scan.max(self.start);
        match self.buf[from..self.end].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let start = self.start;
                let mut end = from + i;
                self.start = end + 1;
                self.scan = self.start;
                if end > start && self.buf[end - 1] == b'\r' {
                    end -= 1;
                }
                Some(start..end)
            }
            None => {
                self.scan = self.end;
                None
            }
        }
    }

    /// The next line (without CR LF), reading as needed.
    fn next_line(&mut self) -> io::Result<&[u8]> {
        loop {
            if let Some(range) = self.buffered_line() {
                self.watchdog.progress();
                return Ok(&self.buf[range]);
            }
            self.fill()?;
        }
    }

    /// Waits as `wait` says, then reads once (at least one byte).
    fn fill(&mut self) -> io::Result<()> {
        if self.start == self.end {
            (self.start, self.end, self.scan) = (0, 0, 0);
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                (self.scan, self.end) = (self.scan - self.start, self.end - self.start);
                self.start = 0;
            } else if self.buf.len() < MAX_LINE {
                self.buf.resize((self.buf.len() * 2).min(MAX_LINE), 0);
            } else {
                return Err(unexpected(
                    "a line over 1 MiB",
                    &self.buf[self.start..self.end],
                ));
            }
        }
        let read = self.wait_readable().and_then(|()| {
            loop {
                match self.stream.read(&mut self.buf[self.end..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    other => break other,
                }
            }
        });
        match read {
            // Bytes are not progress yet: a server that only sends events would keep the run
            // alive for ever. What counts is a reply (or a handshake line), and a write.
            Ok(k) if k > 0 && !self.watchdog.fired() => {
                self.end += k;
                Ok(())
            }
            // The watchdog shut the socket down.
            _ if self.watchdog.fired() => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no reply from the server for {:?}", self.watchdog.timeout),
            )),
            Ok(_) => Err(closed()),
            Err(e) => Err(peer_gone(e)),
        }
    }

    /// `Poll` and `Tick`: waits in `ppoll(2)` until the socket is readable (`Block` waits in
    /// the read itself).
    fn wait_readable(&self) -> io::Result<()> {
        let mut tick = match self.wait {
            RawWait::Block => return Ok(()),
            RawWait::Poll => None,
            RawWait::Tick(us) => Some(libc::timespec {
                tv_sec: libc::time_t::from(us / 1_000_000),
                tv_nsec: libc::c_long::from(us % 1_000_000) * 1000,
            }),
        };
        let mut pfd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // The tick first (once), then no timeout: the watchdog ends a wait that is too
            // long by shutting the socket down, which makes it readable.
            match poll_one(&mut pfd, tick.take()) {
                0 => {} // the tick: wait again
                n if n > 0 => return Ok(()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
}

/// One `ppoll(2)` of one descriptor, with an optional timeout.
#[cfg(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd"
))]
fn poll_one(pfd: &mut libc::pollfd, timeout: Option<libc::timespec>) -> libc::c_int {
    let timeout = timeout
        .as_ref()
        .map_or(std::ptr::null(), std::ptr::from_ref);
    // SAFETY: one valid pollfd and an optional timespec, both live for the call.
    unsafe { libc::ppoll(pfd, 1, timeout, std::ptr::null()) }
}

/// One `poll(2)` of one descriptor where there is no `ppoll` (Apple systems, illumos): a
/// timeout is rounded up to whole milliseconds there.
#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd"
)))]
fn poll_one(pfd: &mut libc::pollfd, timeout: Option<libc::timespec>) -> libc::c_int {
    let ms = timeout.map_or(-1, |t| {
        let ms = i64::from(t.tv_sec) * 1000 + (i64::from(t.tv_nsec) + 999_999) / 1_000_000;
        libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: one valid pollfd, live for the call.
    unsafe { libc::poll(pfd, 1, ms) }
}

/// The raw baseline's timeout, off its hot path: a thread that shuts the socket down when
/// neither a read nor a write got through for `timeout`. The loop only stores a counter. (A
/// socket timeout, `SO_RCVTIMEO`, arms and cancels a kernel timer at every blocking `recv`:
/// 6.44 against 6.13 µs of CPU per command, medians of 12 interleaved rounds one at a time
/// against the fake on one CPU; with this thread, 6.22.)
struct Watchdog {
    state: Arc<WatchdogState>,
    /// The count last stored (the thread compares counts).
    count: u64,
    timeout: Duration,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct WatchdogState {
    /// Reads and writes that got through so far.
    progress: AtomicU64,
    /// The socket was shut down for want of progress.
    fired: AtomicBool,
    /// The run is over: the thread returns.
    done: AtomicBool,
}

impl Watchdog {
    /// Watches `stream` (a clone of the socket in use) from a new thread.
    fn start(stream: UnixStream, timeout: Duration) -> io::Result<Self> {
        let state = Arc::new(WatchdogState::default());
        let shared = Arc::clone(&state);
        // Checks ten times per timeout: fires between `timeout` and 1.1 x `timeout`.
        let check = timeout / 10;
        let thread = std::thread::Builder::new()
            .name("raw-watchdog".into())
            .spawn(move || {
                let mut seen = 0;
                let mut since = Instant::now();
                loop {
                    std::thread::park_timeout(check);
                    if shared.done.load(Ordering::Relaxed) {
                        return;
                    }
                    let now = shared.progress.load(Ordering::Relaxed);
                    if now != seen {
                        (seen, since) = (now, Instant::now());
                    } else if since.elapsed() >= timeout {
                        shared.fired.store(true, Ordering::SeqCst);
                        // Wakes a read or a write under way, and fails the next ones.
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                }
            })?;
        Ok(Self {
            state,
            count: 0,
            timeout,
            thread: Some(thread),
        })
    }

    /// A read or a write got through.
    fn progress(&mut self) {
        self.count += 1;
        self.state.progress.store(self.count, Ordering::Relaxed);
    }

    /// Whether the socket was shut down for want of progress.
    fn fired(&self) -> bool {
        self.state.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.state.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// The fake QEMU the load is served by: the testkit's, answering every command at once, and
/// reading up to `queue_limit` queued in-band commands (QEMU: 8). It records nothing
/// ([`Script::record`](qmp_testkit::fake::Script::record)), so its memory stays flat.
///
/// # Errors
/// When the socket cannot be created.
pub fn fake_server(queue_limit: usize) -> io::Result<qmp_testkit::fake::FakeQemu> {
    // Not recording: the log would grow with every command, under a lock on the fake's hot
    // path (and with `--fake-in-process` that CPU is the client's).
    let script = qmp_testkit::fake::Script::new()
        .queue_limit(queue_limit)
        .record(false);
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
    use qmp_testkit::fake::{Action, FakeQemu, Response, Script};

    const SECS: Duration = Duration::from_secs(10);

    #[test]
    fn lines_join_pieces_and_keep_what_follows() {
        for wait in [RawWait::Block, RawWait::Poll, RawWait::Tick(5_000)] {
            let (a, mut b) = UnixStream::pair().unwrap();
            let mut rx = Lines::new(a, wait, SECS).unwrap();
            rx.buf.truncate(16); // small, to move and grow it too
            let writer = std::thread::spawn(move || {
                b.write_all(b"{\"return\": {}").unwrap();
                std::thread::sleep(Duration::from_millis(20));
                b.write_all(b", \"id\": 1}\r\n{\"id\": 2").unwrap();
                b.write_all(b"}\r\n\n").unwrap();
            });
            assert_eq!(rx.next_line().unwrap(), b"{\"return\": {}, \"id\": 1}");
            assert_eq!(rx.next_line().unwrap(), b"{\"id\": 2}");
            assert_eq!(rx.next_line().unwrap(), b"");
            writer.join().unwrap();
            let e = rx.next_line().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        }
    }

    #[test]
    fn lines_time_out_and_refuse_huge_lines() {
        for wait in [RawWait::Block, RawWait::Poll, RawWait::Tick(1_000)] {
            let (a, _b) = UnixStream::pair().unwrap();
            let mut rx = Lines::new(a, wait, Duration::from_millis(50)).unwrap();
            let t0 = Instant::now();
            let e = rx.next_line().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
            assert_eq!(e.to_string(), "no reply from the server for 50ms");
            assert!(t0.elapsed() >= Duration::from_millis(50));
            let e = rx.send(b"x").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");

            let (a, mut b) = UnixStream::pair().unwrap();
            let mut rx = Lines::new(a, wait, SECS).unwrap();
            let writer = std::thread::spawn(move || {
                let _ = b.write_all(&vec![b'x'; MAX_LINE + 1]);
            });
            let e = rx.next_line().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            assert!(e.to_string().starts_with("a line over 1 MiB: xxx"), "{e}");
            assert!(e.to_string().len() < 250);
            drop(rx);
            writer.join().unwrap();
        }
    }

    #[test]
    fn a_server_that_does_not_read_times_out() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut rx = Lines::new(a, RawWait::Block, Duration::from_millis(50)).unwrap();
        let e = rx.send(&vec![b'x'; 16 << 20]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert_eq!(
            e.to_string(),
            "the server stopped reading our requests for 50ms"
        );
    }

    #[test]
    fn ids_and_capabilities_are_checked_byte_wise() {
        assert!(has_id(br#"{"return": {}, "id": 17}"#, 17));
        assert!(has_id(br#"{"return":{},"id":0}"#, 0));
        assert!(!has_id(br#"{"return": {}, "id": 117}"#, 17));
        assert!(!has_id(br#"{"return": {}, "id": 1}"#, 17));
        assert!(!has_id(br#"{"return": {}, "xid": 17}"#, 17));
        assert!(!has_id(br#"{"return": {}}"#, 0));
        assert!(has_id(
            b"{\"return\": {}, \"id\": 18446744073709551615}",
            usize::MAX
        ));
        assert!(offers_oob(
            br#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#
        ));
        assert!(!offers_oob(
            br#"{"QMP": {"version": {}, "capabilities": []}}"#
        ));
        assert!(!offers_oob(br#"{"QMP": {"version": {"package": "oob"}}}"#));
        assert_eq!(Line::of(br#"{"timestamp": {}, "event": "X"}"#), Line::Event);
        assert_eq!(Line::of(br#"{"event": "X", "timestamp": {}}"#), Line::Event);
        assert_eq!(Line::of(br#"{"id": 4, "error": {}}"#), Line::Other);
        assert_eq!(Line::of(br#"{"error": {}}"#), Line::Other);
    }

    #[test]
    fn raw_baseline_runs_against_the_fake_in_every_wait_mode() {
        let fake = FakeQemu::unix(Script::new().queue_limit(64)).unwrap();
        let path = fake.socket_path().unwrap().to_owned();
        let runs = [
            (RawWait::Block, 1, RawIds::Sequential),
            (RawWait::Poll, 1, RawIds::Sequential),
            (RawWait::Poll, 8, RawIds::Sequential),
            (RawWait::Block, 1, RawIds::Reuse),
            (RawWait::Tick(50), 3, RawIds::Reuse),
            (RawWait::Poll, 8, RawIds::None),
            (RawWait::Block, 32, RawIds::Sequential),
        ];
        for (wait, conc, ids) in runs {
            let s = raw(&path, 100, conc, wait, ids, SECS).unwrap();
            assert_eq!(s.n, 100);
            assert!(s.secs > 0.0);
        }
        let requests = fake.requests();
        assert_eq!(requests.len(), 707);
        let ids: Vec<Vec<Option<String>>> = requests
            .chunks(101)
            .map(|run| {
                assert_eq!(run[0].name.as_deref(), Some("qmp_capabilities"));
                assert_eq!(run[0].arguments.as_deref(), Some(r#"{"enable":["oob"]}"#));
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
        assert_eq!(ids[6], expect(|i| i));
    }

    #[test]
    fn raw_baseline_skips_events_and_negotiates_without_oob_when_not_offered() {
        let script = Script::new()
            .capabilities(Vec::<String>::new())
            .on(
                "qmp_capabilities",
                Response::ok("{}").event_before("BEFORE", None),
            )
            .on(
                COMMAND,
                Response::ok("{}")
                    .event_before("A", Some(r#"{"id": 1}"#))
                    .event_after("B", None),
            );
        let fake = FakeQemu::unix(script).unwrap();
        for conc in [1, 8] {
            let s = raw(
                fake.socket_path().unwrap(),
                50,
                conc,
                RawWait::Block,
                RawIds::Reuse,
                SECS,
            );
            assert_eq!(s.unwrap().n, 50);
        }
        let requests = fake.requests();
        assert_eq!(requests[0].name.as_deref(), Some("qmp_capabilities"));
        assert_eq!(requests[0].arguments, None);
    }

    #[test]
    fn raw_baseline_fills_its_window_and_no_more() {
        // The first command stalls, so nothing is answered until it is released: what the
        // fake has read by then is exactly the window.
        let script = Script::new().queue_limit(64).on_once(
            COMMAND,
            Response::actions(vec![Action::Stall, Action::Return("{}".into())]),
        );
        let fake = FakeQemu::unix(script).unwrap();
        let path = fake.socket_path().unwrap().to_owned();
        let run = std::thread::spawn(move || {
            raw(&path, 40, 5, RawWait::Block, RawIds::Sequential, SECS).map(|s| s.n)
        });
        // The negotiation, then five commands on the wire.
        assert_eq!(fake.wait_requests(6, SECS).len(), 6);
        assert_eq!(fake.wait_requests(7, Duration::from_millis(300)).len(), 6);
        fake.release();
        assert_eq!(run.join().unwrap().unwrap(), 40);
        let ids: Vec<_> = fake.requests()[1..]
            .iter()
            .map(|r| r.id.clone().unwrap())
            .collect();
        assert_eq!(ids, (0..40).map(|i| i.to_string()).collect::<Vec<_>>());
    }

    /// The error `raw` ends with against a fake following `script`.
    fn raw_error(script: Script, timeout: Duration) -> io::Error {
        let fake = FakeQemu::unix(script).unwrap();
        let path = fake.socket_path().unwrap();
        raw(path, 20, 4, RawWait::Block, RawIds::Sequential, timeout).unwrap_err()
    }

    #[test]
    fn raw_baseline_fails_on_errors_wrong_ids_silence_and_eof() {
        let e = raw_error(
            Script::new().on_once(COMMAND, Response::ok("{}")).on(
                COMMAND,
                Response::error(qmp_client::ErrorClass::GenericError, "no"),
            ),
            SECS,
        );
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            e.to_string(),
            r#"reply 1 is no success: {"id": 1, "error": {"class": "GenericError", "desc": "no"}}"#
        );

        let wrong = Response::actions(vec![Action::ReturnWithId {
            id: "7".into(),
            value: "{}".into(),
        }]);
        let e = raw_error(Script::new().on(COMMAND, wrong), SECS);
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            e.to_string()
                .starts_with("reply 0 does not carry the id of request 0")
        );

        let e = raw_error(
            Script::new().on(
                "qmp_capabilities",
                Response::error(qmp_client::ErrorClass::GenericError, "no"),
            ),
            SECS,
        );
        assert!(
            e.to_string()
                .starts_with("qmp_capabilities failed: {\"error\""),
            "{e}"
        );

        let short = Duration::from_millis(100);
        let e = raw_error(Script::new().no_greeting(), short);
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            e.to_string(),
            "no reply from the server for 100ms (waiting for the greeting)"
        );
        // Long enough for the handshake on a loaded machine; the stall comes after it.
        let second = Duration::from_secs(1);
        let e = raw_error(Script::new().on(COMMAND, Response::none()), second);
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            e.to_string(),
            "no reply from the server for 1s (after 0 of 20 replies)"
        );

        let e = raw_error(
            Script::new().on_once(COMMAND, Response::ok("{}").then(Action::Close)),
            SECS,
        );
        // EOF, a reset (the fake closed with requests unread) or a broken pipe (it closed
        // before the next write): all the same to the user.
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection (after 1 of 20 replies)"
            )
        );
        // A server that sends an event every 20 ms for 10 s but never answers is stuck all
        // the same: the watchdog fires after 1 s without a reply, not after the events.
        let chatty = (0..500).flat_map(|_| {
            [
                Action::Delay(Duration::from_millis(20)),
                Action::Event {
                    name: "TICK".into(),
                    data: None,
                },
            ]
        });
        let start = Instant::now();
        let e = raw_error(
            Script::new().on(COMMAND, Response::actions(chatty.collect())),
            second,
        );
        assert_eq!(
            e.to_string(),
            "no reply from the server for 1s (after 0 of 20 replies)"
        );
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );

        let e = raw(
            Path::new("/nonexistent/qmp.sock"),
            1,
            1,
            RawWait::Block,
            RawIds::Sequential,
            SECS,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot connect to /nonexistent/qmp.sock: ")
        );
    }

    #[test]
    fn workload_returns_a_failed_command_as_an_error() {
        let script = Script::new().on(
            COMMAND,
            Response::error(qmp_client::ErrorClass::GenericError, "no"),
        );
        let fake = FakeQemu::unix(script).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for mode in ["seq", "conc"] {
            let r = rt.block_on(async {
                let builder = qmp_client::Builder::new();
                let (c, conn) = qmp_tokio::connect_unix(fake.socket_path().unwrap(), builder)
                    .await
                    .unwrap();
                qmp_tokio::spawn_connection(conn);
                workload(c, mode, 10, 4).await
            });
            assert!(r.unwrap_err().to_string().contains("no"));
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }
}
