//! A scriptable fake QEMU on a real socket.
//!
//! [`FakeQemu`] listens on a Unix socket path, on TCP `127.0.0.1`, or serves one already
//! connected [`UnixStream`] (one end of a socketpair). It runs on its own thread, so tests on
//! any async runtime (or none) can use it. Protocol handling is [`qmp_proto::Server`]: the
//! greeting, QEMU's negotiation rules and request checks, and QEMU's output style (CRLF,
//! optional pretty printing, QGA framing with 0xFF before a `guest-sync-delimited` reply).
//!
//! What each command gets is decided, in this order, by the first matching [`Script::on`] /
//! [`Script::on_args`] rule, the [`Script::handler`] closure, and built-in answers
//! (`query-version`, `quit`, and on QGA `guest-sync`, `guest-sync-delimited`, `guest-ping`);
//! anything else fails with `CommandNotFound` like QEMU. A [`Response`] is a list of
//! [`Action`]s: replies, events before or after the reply, delays, raw bytes (invalid JSON,
//! oversized or too-deep messages, id-less errors, unknown ids), a stall, a close, a reset.
//!
//! Like a QEMU chardev, clients are served one at a time: a second client's `connect` succeeds
//! (kernel backlog) but it gets no greeting until the first one goes away. Like QEMU with `oob`
//! enabled, in-band commands run one after another; while one is delayed or stalled the others
//! queue, and once [`Script::queue_limit`] (8) are queued the fake stops reading the socket
//! (without `oob`: after each command). `exec-oob` commands run at once.
//!
//! | fault (testing.md) | how to script it |
//! |---|---|
//! | delay a reply / never answer | [`Response::delay`] / [`Response::none`] |
//! | event before the negotiation reply | `.on("qmp_capabilities", Response::ok("{}").event_before(..))` |
//! | event before or after a command's reply; on demand | [`Response::event_before`], [`Response::event_after`]; [`FakeQemu::push_event`] |
//! | id-less errors (one or several) | [`Action::Raw`] of [`faults::idless_error`] / [`faults::idless_errors`] |
//! | unknown id | [`Action::ReturnWithId`] |
//! | invalid JSON (`"id": -inf`) | [`Action::Raw`] of [`faults::INF_ID`] |
//! | oversized / too-deep message | [`Action::Raw`] of [`faults::oversized`] / [`faults::too_deep`] |
//! | close mid-message | [`Action::Raw`] of a partial message, then [`Action::Close`] |
//! | reset after `quit` | `.on("quit", Response::ok("{}").then(Action::Reset))` (TCP: a real RST) |
//! | second client accepted, never greeted | connect twice: the second waits, as with QEMU; or [`Script::no_greeting`] |
//! | stop reading after 8 queued commands | an [`Action::Stall`] in one command, then [`FakeQemu::release`] |
//! | pretty output / QGA framing | [`Script::pretty`] / [`Script::qga`] |
//!
//! When the client goes away (EOF, even a half-close, or a hang-up noticed while the fake is
//! not reading), the fake does what QEMU does: it drops the queued requests, sends nothing
//! more and ends the session; then it serves the next client.
//!
//! Everything received is recorded: raw bytes per connection and each request as classified
//! (see [`FakeQemu::requests`] and [`FakeQemu::wait_requests`]), unless
//! [`Script::record`]`(false)` turns that off for load tests.
//!
//! # Example
//! ```
//! use std::io::{BufRead, BufReader, Write};
//! use std::os::unix::net::UnixStream;
//! use qmp_testkit::fake::{FakeQemu, Response, Script};
//!
//! let script = Script::new()
//!     .on("query-status", Response::ok(r#"{"status":"running","running":true}"#))
//!     .on("stop", Response::ok("{}").event_after("STOP", None));
//! let fake = FakeQemu::unix(script).unwrap();
//!
//! let stream = UnixStream::connect(fake.socket_path().unwrap()).unwrap();
//! let mut lines = BufReader::new(stream.try_clone().unwrap());
//! let mut line = String::new();
//! lines.read_line(&mut line).unwrap();
//! assert!(line.starts_with(r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}"#));
//!
//! let mut w = &stream;
//! w.write_all(br#"{"execute":"qmp_capabilities","id":0}{"execute":"query-status","id":1}"#).unwrap();
//! for expected in [
//!     "{\"return\": {}, \"id\": 0}\r\n",
//!     "{\"return\": {\"status\": \"running\", \"running\": true}, \"id\": 1}\r\n",
//! ] {
//!     line.clear();
//!     lines.read_line(&mut line).unwrap();
//!     assert_eq!(line, expected);
//! }
//! let requests = fake.wait_requests(2, std::time::Duration::from_secs(5));
//! assert_eq!(requests[1].name.as_deref(), Some("query-status"));
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qmp_proto::{
    CommandError, ErrorClass, Greeting, Received, Server, ServerConfig, ServerRequest, Timestamp,
    VersionInfo,
};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, recvmsg};

/// One step of the fake's answer to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// `{"return": JSON, "id": <the request's id>}`, formatted as QEMU does. If the fake cannot
    /// parse the value (invalid, or nested deeper than 128 levels) or the id, the message is
    /// written with them as given, not reformatted; [`Action::Raw`] is the plainer way to
    /// send broken output.
    Return(String),
    /// `{"id": <the request's id>, "error": {...}}`.
    Error(CommandError),
    /// A reply carrying another id (raw JSON text), such as one the client never used. Text the
    /// fake cannot parse is written as given, as for [`Action::Return`].
    ReturnWithId {
        /// The id as raw JSON text.
        id: String,
        /// The return value as raw JSON text.
        value: String,
    },
    /// An event, timestamped with the host clock; `data` is raw JSON text, written as given
    /// if the fake cannot parse it.
    Event {
        /// The event name.
        name: String,
        /// The `data` member.
        data: Option<String>,
    },
    /// The guest agent's 0xFF sync byte.
    Delimiter,
    /// Bytes written exactly as given.
    Raw(Vec<u8>),
    /// Waits before the next action. In-band commands behind this one wait too.
    Delay(Duration),
    /// Blocks the in-band queue until [`FakeQemu::release`] (or the client goes away).
    Stall,
    /// Closes the connection (orderly EOF). The fake then serves the next client.
    Close,
    /// Closes with `SO_LINGER` 0: a TCP peer sees a connection reset. A Unix peer sees
    /// `ECONNRESET` only if it had sent bytes the fake had not read yet, otherwise EOF.
    Reset,
}

/// What the fake does for one command: a list of [`Action`]s run in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// The steps.
    pub actions: Vec<Action>,
}

impl Response {
    /// A successful reply with `value` (raw JSON text).
    pub fn ok(value: impl Into<String>) -> Self {
        Self {
            actions: vec![Action::Return(value.into())],
        }
    }

    /// An error reply.
    pub fn error(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self {
            actions: vec![Action::Error(CommandError::new(class, desc))],
        }
    }

    /// No reply at all (the command is read and recorded, then ignored).
    pub fn none() -> Self {
        Self::default()
    }

    /// Exactly these actions.
    pub fn actions(actions: Vec<Action>) -> Self {
        Self { actions }
    }

    /// Waits `d` before everything else.
    #[must_use]
    pub fn delay(mut self, d: Duration) -> Self {
        self.actions.insert(0, Action::Delay(d));
        self
    }

    /// Sends an event before everything else (so before the reply).
    #[must_use]
    pub fn event_before(mut self, name: &str, data: Option<&str>) -> Self {
        self.actions.insert(0, event(name, data));
        self
    }

    /// Sends an event after the actions so far (so after the reply).
    #[must_use]
    pub fn event_after(mut self, name: &str, data: Option<&str>) -> Self {
        self.actions.push(event(name, data));
        self
    }

    /// Appends an action.
    #[must_use]
    pub fn then(mut self, action: Action) -> Self {
        self.actions.push(action);
        self
    }
}

fn event(name: &str, data: Option<&str>) -> Action {
    Action::Event {
        name: name.to_owned(),
        data: data.map(str::to_owned),
    }
}

/// Ready-made malformed output for [`Action::Raw`].
pub mod faults {
    /// The invalid JSON QEMU writes when a client used an id like `-1e999`.
    pub const INF_ID: &[u8] = b"{\"return\": {}, \"id\": -inf}\r\n";

    /// An id-less error as QEMU sends for input it could not parse.
    pub fn idless_error(desc: &str) -> Vec<u8> {
        format!("{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"{desc}\"}}}}\r\n")
            .into_bytes()
    }

    /// `n` id-less parse errors in a row (what one bad input can produce).
    pub fn idless_errors(n: usize) -> Vec<u8> {
        idless_error("JSON parse error, expecting value").repeat(n)
    }

    /// A syntactically valid reply of at least `size` bytes (a long string return value).
    pub fn oversized(id: u64, size: usize) -> Vec<u8> {
        format!("{{\"return\": \"{}\", \"id\": {id}}}\r\n", "x".repeat(size)).into_bytes()
    }

    /// A valid reply whose return value is nested `depth` arrays deep.
    pub fn too_deep(id: u64, depth: usize) -> Vec<u8> {
        format!(
            "{{\"return\": {}{}, \"id\": {id}}}\r\n",
            "[".repeat(depth),
            "]".repeat(depth)
        )
        .into_bytes()
    }
}

/// How long a session's last writes wait for a client that takes nothing before giving up.
const END_WRITE_PATIENCE: Duration = Duration::from_secs(1);

/// How often a blocked write checks whether the fake is being dropped.
const STOP_CHECK: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 50_000_000,
};

type Handler = dyn Fn(&ServerRequest) -> Option<Response> + Send + Sync;

struct Rule {
    name: String,
    args: Option<serde_json::Value>,
    response: Response,
    once: bool,
}

/// What the fake says and how it answers. Build it, then start a [`FakeQemu`] with it.
///
/// Defaults: QMP, version 10.0.2, offers `oob`, compact output, queue limit 8, records
/// everything received.
#[must_use]
pub struct Script {
    greeting: Greeting,
    pretty: bool,
    qga: bool,
    rules: Vec<Rule>,
    handler: Option<Box<Handler>>,
    queue_limit: usize,
    max_message_size: usize,
    max_depth: usize,
    greet: bool,
    oob_commands: Vec<String>,
    record: bool,
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Script")
            .field("greeting", &self.greeting)
            .field("qga", &self.qga)
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

impl Default for Script {
    fn default() -> Self {
        Self::new()
    }
}

impl Script {
    /// A QMP monitor (qemu-storage-daemon-like) with the defaults.
    pub fn new() -> Self {
        let mut version = VersionInfo::new(10, 0, 2);
        version.package = "qmp-testkit".to_owned();
        Self {
            greeting: Greeting::new(version, vec!["oob".to_owned()]),
            pretty: false,
            qga: false,
            rules: Vec::new(),
            handler: None,
            queue_limit: 8,
            max_message_size: 64 << 20,
            max_depth: 1024,
            greet: true,
            oob_commands: ["migrate-pause", "migrate-recover", "yank", "query-yank"]
                .map(str::to_owned)
                .to_vec(),
            record: true,
        }
    }

    /// A guest agent: no greeting, LF endings, 0xFF before `guest-sync-delimited` replies.
    pub fn qga() -> Self {
        Self {
            qga: true,
            greeting: Greeting::new(VersionInfo::new(10, 0, 2), Vec::new()),
            ..Self::new()
        }
    }

    /// Sets the version in the greeting and in `query-version`.
    pub fn version(mut self, major: u32, minor: u32, micro: u32) -> Self {
        let package = std::mem::take(&mut self.greeting.version.package);
        self.greeting.version = VersionInfo::new(major, minor, micro);
        self.greeting.version.package = package;
        self
    }

    /// Sets the capabilities offered in the greeting.
    pub fn capabilities<I: IntoIterator<Item = S>, S: Into<String>>(mut self, caps: I) -> Self {
        self.greeting.capabilities = caps.into_iter().map(Into::into).collect();
        self
    }

    /// Pretty-prints every message like `pretty=on`.
    pub fn pretty(mut self) -> Self {
        self.pretty = true;
        self
    }

    /// Never sends the greeting (the client connects but is never greeted).
    pub fn no_greeting(mut self) -> Self {
        self.greet = false;
        self
    }

    /// Stops reading after this many queued in-band commands when `oob` is enabled (QEMU: 8).
    pub fn queue_limit(mut self, n: usize) -> Self {
        self.queue_limit = n.max(1);
        self
    }

    /// Whether to record what the fake receives (default `true`): each connection's raw bytes
    /// ([`FakeQemu::received_bytes`]) and every request ([`FakeQemu::requests`],
    /// [`FakeQemu::wait_requests`]). The log grows with every command and is kept under a
    /// lock the test thread shares, so a load test serving many commands turns it off: then
    /// those stay empty (`wait_requests` returns after its timeout) and the fake's memory
    /// stays flat. Connections are still counted ([`FakeQemu::connections`],
    /// [`FakeQemu::wait_closed`]).
    pub fn record(mut self, on: bool) -> Self {
        self.record = on;
        self
    }

    /// Input limits of the fake's parser (QEMU: 64 MiB, depth 1024).
    pub fn input_limits(mut self, max_message_size: usize, max_depth: usize) -> Self {
        self.max_message_size = max_message_size;
        self.max_depth = max_depth;
        self
    }

    /// The commands `exec-oob` may run (QEMU 10.0 system emulators: `migrate-pause`,
    /// `migrate-recover`, `yank`, `query-yank`; qemu-storage-daemon: none). Others get
    /// "The command X does not support OOB".
    pub fn oob_commands<I: IntoIterator<Item = S>, S: Into<String>>(mut self, names: I) -> Self {
        self.oob_commands = names.into_iter().map(Into::into).collect();
        self
    }

    /// Answers command `name` (any arguments) with `response`. Use the name
    /// `qmp_capabilities` to script the negotiation reply (for instance an event before it).
    pub fn on(mut self, name: &str, response: Response) -> Self {
        self.rules.push(Rule {
            name: name.to_owned(),
            args: None,
            response,
            once: false,
        });
        self
    }

    /// Like [`on`](Self::on), used once only; later calls fall through to the next rule.
    pub fn on_once(mut self, name: &str, response: Response) -> Self {
        self.rules.push(Rule {
            name: name.to_owned(),
            args: None,
            response,
            once: true,
        });
        self
    }

    /// Answers command `name` when its arguments contain every member of `args` (a JSON
    /// object, compared by value).
    ///
    /// # Panics
    /// When `args` is not a valid JSON object.
    pub fn on_args(mut self, name: &str, args: &str, response: Response) -> Self {
        let value: serde_json::Value = serde_json::from_str(args).expect("args: a JSON object");
        assert!(value.is_object(), "args: a JSON object");
        self.rules.push(Rule {
            name: name.to_owned(),
            args: Some(value),
            response,
            once: false,
        });
        self
    }

    /// Decides commands no rule matched; `None` falls through to the built-in answers.
    pub fn handler(
        mut self,
        f: impl Fn(&ServerRequest) -> Option<Response> + Send + Sync + 'static,
    ) -> Self {
        self.handler = Some(Box::new(f));
        self
    }

    fn respond(&mut self, req: &ServerRequest) -> Response {
        // Refused out of band, a command neither runs nor uses up a one-time rule, as QEMU
        // never runs what it refuses; a command it does not have is not found all the same.
        let refused = req.oob && !self.oob_commands.contains(&req.name);
        let response = self.decide(req, !refused);
        let not_found = matches!(
            response.actions.first(),
            Some(Action::Error(e)) if e.class == ErrorClass::CommandNotFound
        );
        if refused && !not_found {
            return Response::error(
                ErrorClass::GenericError,
                format!("The command {} does not support OOB", req.name),
            );
        }
        response
    }

    /// The response to `req`; `consume` uses up a one-time rule that matches.
    fn decide(&mut self, req: &ServerRequest, consume: bool) -> Response {
        let args: Option<serde_json::Value> = req
            .arguments
            .as_deref()
            .and_then(|a| serde_json::from_str(a).ok());
        let hit = self.rules.iter().position(|rule| {
            rule.name == req.name
                && rule.args.as_ref().is_none_or(|want| {
                    let (Some(want), Some(have)) =
                        (want.as_object(), args.as_ref().and_then(|a| a.as_object()))
                    else {
                        return false;
                    };
                    want.iter().all(|(k, v)| have.get(k) == Some(v))
                })
        });
        if let Some(i) = hit {
            if self.rules[i].once && consume {
                return self.rules.remove(i).response;
            }
            return self.rules[i].response.clone();
        }
        if let Some(r) = self.handler.as_ref().and_then(|h| h(req)) {
            return r;
        }
        self.builtin(req)
    }

    fn builtin(&self, req: &ServerRequest) -> Response {
        let sync = || match req.sync_answer() {
            Ok(id) => Ok(id),
            Err(e) => Err(Response {
                actions: vec![Action::Error(e)],
            }),
        };
        match (self.qga, req.name.as_str()) {
            (false, "qmp_capabilities") => Response::ok("{}"),
            (false, "query-version") => {
                let v = &self.greeting.version;
                Response::ok(format!(
                    r#"{{"qemu":{{"micro":{},"minor":{},"major":{}}},"package":{}}}"#,
                    v.qemu.micro,
                    v.qemu.minor,
                    v.qemu.major,
                    serde_json::Value::from(v.package.as_str())
                ))
            }
            (false, "quit") => Response::ok("{}").then(Action::Close),
            (true, "guest-sync") => sync().map_or_else(|e| e, Response::ok),
            (true, "guest-sync-delimited") => sync().map_or_else(
                |e| e,
                |id| Response::actions(vec![Action::Delimiter, Action::Return(id)]),
            ),
            (true, "guest-ping") => Response::ok("{}"),
            (_, name) => Response {
                actions: vec![Action::Error(CommandError::not_found(name))],
            },
        }
    }
}

/// One request as the fake read it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Request {
    /// Which client connection (0 for the first).
    pub connection: usize,
    /// The command name, when the input had one.
    pub name: Option<String>,
    /// The arguments object as raw JSON text.
    pub arguments: Option<String>,
    /// The id as raw JSON text.
    pub id: Option<String>,
    /// Sent with `exec-oob`.
    pub oob: bool,
    /// The error the fake's dispatcher refused it with (negotiation rules, malformed input).
    pub rejected: Option<CommandError>,
    /// File descriptors received (SCM_RIGHTS) since the previous request, up to this one.
    pub fds: usize,
}

#[derive(Debug, Default)]
struct Log {
    connections: Vec<Vec<u8>>,
    requests: Vec<Request>,
    closed: usize,
    /// The worker thread panicked (in a handler, say): the log says no more.
    panicked: bool,
}

type Shared = Arc<(Mutex<Log>, Condvar)>;

fn lock(shared: &Shared) -> MutexGuard<'_, Log> {
    shared
        .0
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

enum Control {
    Event { name: String, data: Option<String> },
    Raw(Vec<u8>),
    Release,
    Disconnect,
    Shutdown,
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
    Once(Option<UnixStream>),
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Unix(s) => s.as_fd(),
            Self::Tcp(s) => s.as_fd(),
        }
    }

    /// Reads bytes, returning how many and how many fds came with them.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<(usize, usize)> {
        match self {
            Self::Unix(s) => {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let msg = recvmsg(
                    s.as_fd(),
                    &mut [IoSliceMut::new(buf)],
                    &mut control,
                    crate::sys::RECV,
                )?;
                let mut fds = 0;
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(rights) = m {
                        // The fds are closed when dropped: the fake only counts them.
                        fds += rights.count();
                    }
                }
                Ok((msg.bytes, fds))
            }
            Self::Tcp(s) => Ok((s.read(buf)?, 0)),
        }
    }

    /// Writes what the socket takes of `data` now. With [`crate::sys::SEND`]: a client gone raises
    /// no SIGPIPE, even in a process (a fuzzer, a C host) that has not ignored it.
    fn send(&self, data: &[u8]) -> io::Result<usize> {
        rustix::net::send(self.fd(), data, crate::sys::SEND).map_err(Into::into)
    }

    /// Writes everything, waiting for room, as a session ends; gives up when `stop` is set
    /// (the fake is dropped while a client does not read) or when the client has taken
    /// nothing for [`END_WRITE_PATIENCE`] (the rest is dropped, as a closing chardev drops it).
    fn write_all(&mut self, mut data: &[u8], stop: &AtomicBool) -> io::Result<()> {
        let mut progress = Instant::now();
        while !data.is_empty() {
            let r = self.send(data);
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    data = &data[n..];
                    progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if stop.load(Ordering::Relaxed) {
                        return Err(io::ErrorKind::BrokenPipe.into());
                    }
                    if progress.elapsed() >= END_WRITE_PATIENCE {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    let mut fds = [PollFd::from_borrowed_fd(self.fd(), PollFlags::OUT)];
                    let _ = poll(&mut fds, Some(&STOP_CHECK));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes what `out` holds until the socket is full, without waiting.
    fn write_some(&mut self, out: &mut Outbox) -> io::Result<()> {
        while !out.pending().is_empty() {
            let r = self.send(out.pending());
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => out.sent(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn reset(self) {
        let _ = rustix::net::sockopt::set_socket_linger(self.fd(), Some(Duration::ZERO));
        drop(self);
    }
}

/// Output the client has not taken yet. Like QEMU's monitor, the fake keeps it in memory and
/// goes on reading requests and running commands while the client does not read.
#[derive(Default)]
struct Outbox {
    buf: Vec<u8>,
    /// How much of `buf` is written.
    done: usize,
}

impl Outbox {
    fn push(&mut self, bytes: &[u8]) {
        if self.done == self.buf.len() {
            self.buf.clear();
            self.done = 0;
            // A backlog the client has since read need not stay allocated.
            self.buf.shrink_to(64 * 1024);
        } else if self.done > self.buf.len() / 2 {
            self.buf.drain(..self.done);
            self.done = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.done..]
    }

    fn sent(&mut self, n: usize) {
        self.done += n;
    }
}

/// A running fake QEMU. Dropping it stops the thread and closes every socket.
#[derive(Debug)]
pub struct FakeQemu {
    stop: Arc<AtomicBool>,
    control: Sender<Control>,
    wake: UnixStream,
    shared: Shared,
    thread: Option<JoinHandle<()>>,
    path: Option<PathBuf>,
    addr: Option<SocketAddr>,
    _dir: Option<tempfile::TempDir>,
}

impl FakeQemu {
    /// Listens on a Unix socket in a fresh temp dir ([`socket_path`](Self::socket_path)).
    ///
    /// # Errors
    /// When the directory or socket cannot be created.
    pub fn unix(script: Script) -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&path)?;
        let mut fake = Self::start(script, Listener::Unix(listener))?;
        fake.path = Some(path);
        fake._dir = Some(dir);
        Ok(fake)
    }

    /// Listens on `127.0.0.1` with a free port ([`tcp_addr`](Self::tcp_addr)).
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub fn tcp(script: Script) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        let mut fake = Self::start(script, Listener::Tcp(listener))?;
        fake.addr = Some(addr);
        Ok(fake)
    }

    /// Serves exactly one already connected stream, such as one end of
    /// [`UnixStream::pair`].
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn from_stream(script: Script, stream: UnixStream) -> io::Result<Self> {
        Self::start(script, Listener::Once(Some(stream)))
    }

    fn start(script: Script, listener: Listener) -> io::Result<Self> {
        let (control, rx) = channel();
        let (wake, wake_rx) = UnixStream::pair()?;
        wake_rx.set_nonblocking(true)?;
        // A full wake socket already says "look at the controls": the byte is not needed.
        wake.set_nonblocking(true)?;
        match &listener {
            Listener::Unix(l) => l.set_nonblocking(true)?,
            Listener::Tcp(l) => l.set_nonblocking(true)?,
            Listener::Once(_) => {}
        }
        let shared: Shared = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            stop: Arc::clone(&stop),
            script,
            rx,
            wake: wake_rx,
            shared: Arc::clone(&shared),
            released: 0,
        };
        let thread = std::thread::Builder::new()
            .name("fake-qemu".to_owned())
            .spawn(move || {
                let _flag = PanicFlag(Arc::clone(&worker.shared));
                worker.run(listener);
            })?;
        Ok(Self {
            stop,
            control,
            wake,
            shared,
            thread: Some(thread),
            path: None,
            addr: None,
            _dir: None,
        })
    }

    /// The Unix socket path, for [`FakeQemu::unix`].
    pub fn socket_path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The TCP address, for [`FakeQemu::tcp`].
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    fn send(&self, c: Control) {
        if self.control.send(c).is_ok() {
            let _ = (&self.wake).write(&[1]);
        }
    }

    /// Sends an event to the current client now (`data` is raw JSON text). QEMU-like, it is
    /// dropped while the client has not negotiated.
    pub fn push_event(&self, name: &str, data: Option<&str>) {
        self.send(Control::Event {
            name: name.to_owned(),
            data: data.map(str::to_owned),
        });
    }

    /// Writes bytes exactly as given to the current client now.
    pub fn push_raw(&self, bytes: &[u8]) {
        self.send(Control::Raw(bytes.to_vec()));
    }

    /// Lets one [`Action::Stall`] go on.
    pub fn release(&self) {
        self.send(Control::Release);
    }

    /// Closes the current client's connection (EOF); the fake then serves the next one.
    pub fn disconnect(&self) {
        self.send(Control::Disconnect);
    }

    /// Every request read so far, in order (none with [`Script::record`]`(false)`).
    ///
    /// # Panics
    /// This and the other methods that read the log panic once the fake's thread has
    /// panicked (a [`Script::handler`] that failed an assertion, say), so the test fails there.
    pub fn requests(&self) -> Vec<Request> {
        self.log().requests.clone()
    }

    /// The log, unless the worker thread panicked.
    fn log(&self) -> MutexGuard<'_, Log> {
        checked(lock(&self.shared))
    }

    /// Waits until at least `n` requests were read (or `timeout` passes) and returns them all.
    /// With [`Script::record`]`(false)` nothing is recorded: it waits for `timeout`.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Request> {
        self.wait_until(timeout, |log| log.requests.len() >= n)
            .requests
            .clone()
    }

    /// Waits until `n` client connections have ended (or `timeout` passes); returns how many.
    pub fn wait_closed(&self, n: usize, timeout: Duration) -> usize {
        self.wait_until(timeout, |log| log.closed >= n).closed
    }

    /// The log once `done` holds for it or `timeout` has passed.
    fn wait_until(&self, timeout: Duration, done: impl Fn(&Log) -> bool) -> MutexGuard<'_, Log> {
        let log = self
            .shared
            .1
            .wait_timeout_while(lock(&self.shared), timeout, |log| {
                !done(log) && !log.panicked
            })
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
        checked(log)
    }

    /// The raw bytes received on each connection so far (index = connection; empty with
    /// [`Script::record`]`(false)`).
    pub fn received_bytes(&self) -> Vec<Vec<u8>> {
        self.log().connections.clone()
    }

    /// How many client connections were accepted (greeted or not).
    pub fn connections(&self) -> usize {
        self.log().connections.len()
    }
}

/// `log`, unless the worker thread panicked: then a panic that says so (its own message was
/// printed when it happened).
fn checked(log: MutexGuard<'_, Log>) -> MutexGuard<'_, Log> {
    assert!(
        !log.panicked,
        "the fake QEMU's thread panicked (in a script handler?); see its message above"
    );
    log
}

impl Drop for FakeQemu {
    /// Stops the thread and waits for it. If it panicked, the panic goes on here (unless this
    /// thread is already panicking), so a failed assertion in a handler fails the test.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.send(Control::Shutdown);
        if let Some(t) = self.thread.take()
            && let Err(panic) = t.join()
            && !std::thread::panicking()
        {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Marks the log when the worker thread unwinds, and wakes whoever waits on it.
struct PanicFlag(Shared);

impl Drop for PanicFlag {
    fn drop(&mut self) {
        if std::thread::panicking() {
            lock(&self.0).panicked = true;
            self.0.1.notify_all();
        }
    }
}

struct Worker {
    stop: Arc<AtomicBool>,
    script: Script,
    rx: Receiver<Control>,
    wake: UnixStream,
    shared: Shared,
    released: usize,
}

/// Why a session ended.
enum End {
    Client,
    Shutdown,
}

/// An in-band command waiting or running.
struct Job {
    id: Option<String>,
    actions: VecDeque<Action>,
    /// When the current `Delay` ends.
    until: Option<Instant>,
}

impl Worker {
    fn run(mut self, mut listener: Listener) {
        loop {
            let stream = match &mut listener {
                Listener::Once(s) => match s.take() {
                    Some(s) => Stream::Unix(s),
                    None => {
                        // Served the one stream; wait for shutdown.
                        while !matches!(self.wait(None), Some(End::Shutdown)) {}
                        return;
                    }
                },
                Listener::Unix(l) => {
                    if matches!(self.wait(Some(l.as_fd())), Some(End::Shutdown)) {
                        return;
                    }
                    match l.accept() {
                        Ok((s, _)) => Stream::Unix(s),
                        Err(_) => continue,
                    }
                }
                Listener::Tcp(l) => {
                    if matches!(self.wait(Some(l.as_fd())), Some(End::Shutdown)) {
                        return;
                    }
                    match l.accept() {
                        Ok((s, _)) => Stream::Tcp(s),
                        Err(_) => continue,
                    }
                }
            };
            let end = self.serve(stream);
            let mut log = lock(&self.shared);
            log.closed += 1;
            self.shared.1.notify_all();
            drop(log);
            if matches!(end, End::Shutdown) {
                return;
            }
        }
    }

    /// Waits for `fd` to be readable or a control message; handles controls that need no
    /// session. Returns `Some(End::Shutdown)` on shutdown, `None` when `fd` is readable.
    fn wait(&mut self, fd: Option<BorrowedFd<'_>>) -> Option<End> {
        self.poll(fd, PollFlags::IN, None);
        while let Ok(c) = self.rx.try_recv() {
            match c {
                Control::Shutdown => return Some(End::Shutdown),
                Control::Release => self.released += 1,
                _ => {}
            }
        }
        None
    }

    /// Waits for the wake pipe, for `interest` on `fd` (a hang-up or error is reported even
    /// with no interest) or for `timeout`; returns what `fd` reported. Control messages are
    /// left for the caller.
    fn poll(
        &mut self,
        fd: Option<BorrowedFd<'_>>,
        interest: PollFlags,
        timeout: Option<Duration>,
    ) -> PollFlags {
        let mut fds = vec![PollFd::new(&self.wake, PollFlags::IN)];
        if let Some(fd) = fd {
            fds.push(PollFd::from_borrowed_fd(fd, interest));
        }
        let ts = timeout.map(|t| {
            Timespec::try_from(t).unwrap_or(Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            })
        });
        let _ = poll(&mut fds, ts.as_ref());
        let revents = fds.get(1).map_or(PollFlags::empty(), PollFd::revents);
        drop(fds);
        self.drain_wake();
        revents
    }

    fn drain_wake(&mut self) {
        let mut buf = [0u8; 64];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
    }

    fn serve(&mut self, mut stream: Stream) -> End {
        let index = {
            let mut log = lock(&self.shared);
            log.connections.push(Vec::new());
            log.connections.len() - 1
        };
        let config = if self.script.qga {
            ServerConfig::qga()
        } else {
            ServerConfig::qmp().capabilities(self.script.greeting.capabilities.clone())
        }
        .pretty(self.script.pretty)
        .max_message_size(self.script.max_message_size)
        .max_depth(self.script.max_depth);
        let mut server = Server::new(config);
        if self.script.greet {
            server.send_greeting(&self.script.greeting);
        }
        let _ = match &stream {
            Stream::Unix(s) => s.set_nonblocking(true),
            Stream::Tcp(s) => s.set_nonblocking(true),
        };
        let mut session = Session {
            queue: VecDeque::new(),
            running: None,
            pending: VecDeque::new(),
            fds: 0,
        };
        let mut releases_used = self.released;
        let mut eof = false;
        let mut out = Outbox::default();
        loop {
            // Run what can run now.
            let outcome = self.step(&mut server, &mut session, &mut releases_used, index);
            out.push(&server.take_transmit());
            match outcome {
                Step::Continue => {}
                Step::Close => {
                    let _ = stream.write_all(out.pending(), &self.stop);
                    return End::Client;
                }
                Step::Reset => {
                    let _ = stream.write_all(out.pending(), &self.stop);
                    stream.reset();
                    return End::Client;
                }
            }
            // Once the client has gone, QEMU drops the requests it queued and ends the session
            // (a command already running finishes, but its reply goes nowhere).
            if eof {
                let _ = stream.write_all(out.pending(), &self.stop);
                return End::Client;
            }
            if stream.write_some(&mut out).is_err() {
                return End::Client;
            }
            // Wait for input (unless suspended: then only for a hang-up, which QEMU notices
            // even while it does not read), room for output not yet written, a control message
            // or a deadline.
            let suspended = session.is_full(&server, self.script.queue_limit);
            let timeout = session
                .running
                .as_ref()
                .and_then(|j| j.until)
                .map(|t| t.saturating_duration_since(Instant::now()));
            let mut interest = PollFlags::empty();
            if !suspended {
                interest |= PollFlags::IN;
            }
            if !out.pending().is_empty() {
                interest |= PollFlags::OUT;
            }
            let revents = self.poll(Some(stream.fd()), interest, timeout);
            let gone = revents.intersects(PollFlags::HUP | PollFlags::ERR);
            let readable = !suspended && (gone || revents.contains(PollFlags::IN));
            if suspended && gone {
                eof = true;
            }
            while let Ok(c) = self.rx.try_recv() {
                match c {
                    Control::Shutdown => return End::Shutdown,
                    Control::Release => self.released += 1,
                    Control::Disconnect => {
                        // Controls act in order: what earlier ones queued (an event pushed
                        // just before) goes out before the connection closes.
                        out.push(&server.take_transmit());
                        let _ = stream.write_all(out.pending(), &self.stop);
                        return End::Client;
                    }
                    Control::Event { name, data } => {
                        if server.is_negotiated() && !self.script.qga {
                            send_event(&mut server, &name, data.as_deref());
                        }
                    }
                    Control::Raw(b) => server.send_raw(&b),
                }
            }
            if readable {
                let mut buf = [0u8; 4096];
                match stream.read(&mut buf) {
                    Ok((0, _)) => eof = true,
                    Ok((n, fds)) => {
                        session.fds += fds;
                        if self.script.record {
                            lock(&self.shared).connections[index].extend_from_slice(&buf[..n]);
                        }
                        server.handle_input(&buf[..n]);
                        while let Some(r) = server.poll_received() {
                            session.pending.push_back(r);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => eof = true,
                }
            }
        }
    }

    /// Processes pending input and runs actions until something must wait.
    fn step(
        &mut self,
        server: &mut Server,
        session: &mut Session,
        releases_used: &mut usize,
        index: usize,
    ) -> Step {
        loop {
            // Run the current in-band job as far as it goes.
            if let Some(job) = session.running.as_mut() {
                match run_actions(job, server, self.released, releases_used) {
                    Run::Done => session.running = None,
                    Run::Wait => {}
                    Run::Close => return Step::Close,
                    Run::Reset => return Step::Reset,
                }
            }
            if session.running.is_none() && !session.queue.is_empty() {
                session.running = session.queue.pop_front();
                continue;
            }
            // Read the next request, unless the queue is full (QEMU suspends the monitor).
            if session.is_full(server, self.script.queue_limit) {
                return Step::Continue;
            }
            let Some(received) = session.pending.pop_front() else {
                return Step::Continue;
            };
            let fds = std::mem::take(&mut session.fds);
            // Negotiation is scripted and recorded as the command it is, arguments included.
            let received = match received {
                Received::Negotiated { id, enable } => {
                    let args = (!enable.is_empty())
                        .then(|| serde_json::json!({ "enable": enable }).to_string());
                    Received::Command(ServerRequest::new("qmp_capabilities", args, id, false))
                }
                other => other,
            };
            let recording = self.script.record;
            let (record, job, oob) = match received {
                Received::Command(req) => {
                    let response = self.script.respond(&req);
                    let record = recording.then(|| Request {
                        connection: index,
                        name: Some(req.name.clone()),
                        arguments: req.arguments.clone(),
                        id: req.id.clone(),
                        oob: req.oob,
                        rejected: None,
                        fds,
                    });
                    let job = Job {
                        id: req.id,
                        actions: response.actions.into(),
                        until: None,
                    };
                    (record, job, req.oob)
                }
                Received::Rejected { id, error, name } => {
                    let record = recording.then(|| Request {
                        connection: index,
                        name,
                        arguments: None,
                        id: id.clone(),
                        oob: false,
                        rejected: Some(error.clone()),
                        fds,
                    });
                    let job = Job {
                        id,
                        actions: VecDeque::from([Action::Error(error)]),
                        until: None,
                    };
                    (record, job, false)
                }
                _ => continue,
            };
            if let Some(record) = record {
                let mut log = lock(&self.shared);
                log.requests.push(record);
                self.shared.1.notify_all();
            }
            if oob {
                let mut job = job;
                // Out-of-band: runs now, beside the in-band queue (delays are not modelled).
                job.actions
                    .retain(|a| !matches!(a, Action::Delay(_) | Action::Stall));
                match run_actions(&mut job, server, self.released, releases_used) {
                    Run::Close => return Step::Close,
                    Run::Reset => return Step::Reset,
                    Run::Done | Run::Wait => {}
                }
            } else {
                session.queue.push_back(job);
            }
        }
    }
}

enum Step {
    Continue,
    Close,
    Reset,
}

enum Run {
    Done,
    Wait,
    Close,
    Reset,
}

struct Session {
    /// In-band commands read and waiting to run.
    queue: VecDeque<Job>,
    /// The in-band command running.
    running: Option<Job>,
    /// Requests classified but not yet "read" by the monitor.
    pending: VecDeque<Received>,
    /// fds received since the last request.
    fds: usize,
}

impl Session {
    fn is_full(&self, server: &Server, limit: usize) -> bool {
        if server.is_oob_enabled() {
            self.queue.len() >= limit
        } else {
            self.running.is_some() || !self.queue.is_empty()
        }
    }
}

/// The instant `d` from now; a century from now when `d` is too long to represent (as
/// `Duration::MAX`, "for ever").
fn after(d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(CENTURY))
        .unwrap_or(now)
}

fn run_actions(job: &mut Job, server: &mut Server, released: usize, used: &mut usize) -> Run {
    while let Some(action) = job.actions.front() {
        match action {
            Action::Delay(d) => {
                let until = *job.until.get_or_insert_with(|| after(*d));
                if Instant::now() < until {
                    return Run::Wait;
                }
                job.until = None;
            }
            Action::Stall => {
                if released <= *used {
                    return Run::Wait;
                }
                *used += 1;
            }
            Action::Return(v) => {
                if server.send_return(job.id.as_deref(), v).is_err() {
                    let id = job.id.as_ref().map(|id| format!(", \"id\": {id}"));
                    send_as_given(
                        server,
                        &format!("\"return\": {v}{}", id.unwrap_or_default()),
                    );
                }
            }
            Action::Error(e) => {
                let _ = server.send_error(job.id.as_deref(), e);
            }
            Action::ReturnWithId { id, value } => {
                if server.send_return(Some(id), value).is_err() {
                    send_as_given(server, &format!("\"return\": {value}, \"id\": {id}"));
                }
            }
            Action::Event { name, data } => send_event(server, name, data.as_deref()),
            Action::Delimiter => server.send_delimiter(),
            Action::Raw(b) => server.send_raw(b),
            Action::Close => {
                job.actions.pop_front();
                return Run::Close;
            }
            Action::Reset => {
                job.actions.pop_front();
                return Run::Reset;
            }
        }
        job.actions.pop_front();
    }
    Run::Done
}

/// Writes `{MEMBERS}` and the line ending, the members exactly as given: for scripted JSON
/// the fake's formatter cannot parse.
fn send_as_given(server: &mut Server, members: &str) {
    let end = if server.config().qga { "\n" } else { "\r\n" };
    server.send_raw(format!("{{{members}}}{end}").as_bytes());
}

/// Sends an event, its `data` as given if the formatter cannot parse it.
fn send_event(server: &mut Server, name: &str, data: Option<&str>) {
    let stamp = now_stamp();
    if server.send_event(name, data, stamp).is_err() {
        let name = serde_json::Value::from(name);
        let data = data.map(|d| format!(", \"data\": {d}"));
        send_as_given(
            server,
            &format!(
                "\"timestamp\": {{\"seconds\": {}, \"microseconds\": {}}}, \"event\": {name}{}",
                stamp.seconds,
                stamp.microseconds,
                data.unwrap_or_default()
            ),
        );
    }
}

fn now_stamp() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        microseconds: i64::from(d.subsec_micros()),
    }
}

/// Sends `data` on a unix socket with `fds` attached (`SCM_RIGHTS`), in one `sendmsg`; returns
/// how many bytes went (the descriptors go with the first of them). For tests of code that
/// receives descriptors; the transcript recorder uses it too.
///
/// # Errors
/// The `sendmsg` error; `fds` too many for one message.
pub fn send_with_fds(sock: impl AsFd, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage};
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    let iov = [io::IoSlice::new(data)];
    Ok(rustix::net::sendmsg(
        sock,
        &iov,
        &mut control,
        crate::sys::SEND,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// One session: the negotiation and a command, each reply read.
    fn session(fake: &FakeQemu) {
        let stream = UnixStream::connect(fake.socket_path().unwrap()).unwrap();
        let mut lines = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        lines.read_line(&mut line).unwrap();
        (&stream)
            .write_all(br#"{"execute":"qmp_capabilities"}{"execute":"query-version","id":1}"#)
            .unwrap();
        for _ in 0..2 {
            line.clear();
            lines.read_line(&mut line).unwrap();
            assert!(line.starts_with("{\"return\""), "{line}");
        }
    }

    #[test]
    fn record_false_keeps_no_log_but_counts_connections() {
        let fake = FakeQemu::unix(Script::new().record(false)).unwrap();
        session(&fake);
        session(&fake);
        // Both sessions have ended (the second as its client dropped the stream).
        assert_eq!(fake.wait_closed(2, Duration::from_secs(5)), 2);
        assert!(fake.requests().is_empty());
        assert!(fake.wait_requests(1, Duration::from_millis(10)).is_empty());
        assert_eq!(fake.received_bytes(), vec![Vec::<u8>::new(); 2]);
        assert_eq!(fake.connections(), 2);

        let fake = FakeQemu::unix(Script::new()).unwrap();
        session(&fake);
        let requests = fake.wait_requests(2, Duration::from_secs(5));
        assert_eq!(requests[1].id.as_deref(), Some("1"));
        assert!(fake.received_bytes()[0].ends_with(br#""id":1}"#));
    }
}
