//! The client-side state machine.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::Instant;
use crate::framer::{Frame, Framer};
use crate::wire::{
    self, CommandError, ErrorClass, Event, Greeting, Incoming, RawJson, Unread, WireId,
};

/// Which protocol the connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// The QEMU machine protocol: greeting, then `qmp_capabilities`, then commands and events.
    Qmp,
    /// The guest agent protocol: no greeting; the session starts with a 0xFF byte and
    /// `guest-sync-delimited`. `sync_seed` is the first sync id (later syncs count up from it);
    /// the caller SHOULD pick it at random so replies meant for an earlier client cannot match.
    /// The agent takes sync ids as signed 64-bit integers and refuses larger ones, so sync ids
    /// are taken modulo 2^63: a seed above `i64::MAX` loses its top bit.
    Qga {
        /// The id sent with the first `guest-sync-delimited`.
        sync_seed: u64,
    },
}

/// Guest-agent commands that answer only when they fail (`'success-response': false` in
/// `qga/qapi-schema.json`): sent as [`Command::reply_optional`] unless marked otherwise.
const QGA_QUIET: [&str; 4] = [
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
];

/// Sync ids stay below 2^63: the guest agent takes them as signed 64-bit integers.
const SYNC_ID_MASK: u64 = (1 << 63) - 1;

/// Settings for a [`Connection`]. Defaults may change between releases.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The protocol. Default: [`Mode::Qmp`].
    pub mode: Mode,
    /// Capabilities to enable when the server offers them. Default: `["oob"]`.
    pub capabilities: Vec<String>,
    // --- Time ---
    /// Budget for the greeting plus negotiation (QMP) or the first sync (QGA). Default 10 s.
    pub handshake_timeout: Option<Duration>,
    /// Default per-command timeout, counted from `send`. Default: none.
    pub command_timeout: Option<Duration>,
    /// How long a guest-agent command that answers only when it fails (`guest-shutdown`,
    /// `guest-suspend-*`) waits for that answer, once written and once the requests before it
    /// are answered, before it counts as done ([`Command::reply_optional`]); its own timeout,
    /// if shorter, still fails it. Default 2 s.
    pub quiet_grace: Duration,
    // --- Flow control ---
    /// Maximum in-band commands on the wire without a reply. Default 8 (QEMU's queue length).
    /// Taken as 1 when set to 0, which would never let a command out.
    pub max_in_flight: usize,
    /// Maximum commands waiting locally for a free slot. Default 65,536.
    pub max_queued: usize,
    // --- Limits ---
    /// Largest message accepted from the peer, in bytes. Default 16 MiB.
    pub max_message_size: usize,
    /// Deepest nesting accepted from the peer. Default 1024 (QEMU's own input limit).
    pub max_depth: usize,
    /// Largest request this side will write, in bytes. Default 32 MiB (QEMU accepts 64 MiB).
    pub max_request_size: usize,
    /// Deepest arguments this side will write. Default 512 (QEMU accepts 1024).
    pub max_request_depth: usize,
    /// Most JSON tokens (brackets, commas, colons, strings, numbers, keywords) in the
    /// arguments this side will write. Default 1,048,576 (QEMU accepts 2,097,152 in a whole
    /// request, and past that parses the rest of it as new input).
    pub max_request_tokens: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Qmp,
            capabilities: vec!["oob".to_owned()],
            handshake_timeout: Some(Duration::from_secs(10)),
            command_timeout: None,
            quiet_grace: Duration::from_secs(2),
            max_in_flight: 8,
            max_queued: 65_536,
            max_message_size: 16 << 20,
            max_depth: 1024,
            max_request_size: 32 << 20,
            max_request_depth: 512,
            max_request_tokens: 1 << 20,
        }
    }
}

impl Config {
    /// The defaults for QMP.
    pub fn qmp() -> Self {
        Self::default()
    }

    /// The defaults for the guest agent, with the first sync id.
    pub fn qga(sync_seed: u64) -> Self {
        Self {
            mode: Mode::Qga { sync_seed },
            capabilities: Vec::new(),
            ..Self::default()
        }
    }

    /// Sets the capabilities to enable when offered.
    #[must_use]
    pub fn capabilities<I: IntoIterator<Item = S>, S: Into<String>>(mut self, caps: I) -> Self {
        self.capabilities = caps.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the handshake timeout (`None`: wait forever).
    #[must_use]
    pub fn handshake_timeout(mut self, t: Option<Duration>) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// Sets the default command timeout (`None`: no timeout).
    #[must_use]
    pub fn command_timeout(mut self, t: Option<Duration>) -> Self {
        self.command_timeout = t;
        self
    }

    /// Sets the in-band in-flight cap (at least 1).
    #[must_use]
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Sets the local queue bound.
    #[must_use]
    pub fn max_queued(mut self, n: usize) -> Self {
        self.max_queued = n;
        self
    }

    /// Sets the largest accepted message.
    #[must_use]
    pub fn max_message_size(mut self, n: usize) -> Self {
        self.max_message_size = n;
        self
    }

    /// Sets the deepest accepted nesting.
    #[must_use]
    pub fn max_depth(mut self, n: usize) -> Self {
        self.max_depth = n;
        self
    }
}

/// Identifies one request for the life of a [`Connection`]. Never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(u64);

impl RequestId {
    /// An id from its wire number, for tests and fuzzing.
    #[cfg(any(fuzzing, test, feature = "test-util"))]
    #[doc(hidden)]
    pub fn from_raw(n: u64) -> Self {
        Self(n)
    }

    /// The number written as the request's `id` on the wire.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A command to send, built by chaining.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    name: String,
    arguments: Option<String>,
    oob: bool,
    timeout: Option<Option<Duration>>,
    expect_reply: bool,
    quiet: Option<Duration>,
    fds: bool,
}

impl Command {
    /// A command with no arguments.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            arguments: None,
            oob: false,
            timeout: None,
            expect_reply: true,
            quiet: None,
            fds: false,
        }
    }

    /// Serialises `args` (which must serialise to a JSON object, or to `null` for none).
    ///
    /// # Errors
    /// [`LocalError::Serialize`] or [`LocalError::InvalidArguments`].
    pub fn arguments<T: Serialize + ?Sized>(mut self, args: &T) -> Result<Self, LocalError> {
        let text = serde_json::to_string(args).map_err(|e| LocalError::Serialize(e.to_string()))?;
        self.arguments = check_arguments(text)?;
        Ok(self)
    }

    /// Uses `json`, which must be a JSON object (or `null`), as the arguments, written as given.
    ///
    /// # Errors
    /// [`LocalError::InvalidArguments`] when it is not a single JSON object.
    pub fn raw_arguments(mut self, json: impl Into<String>) -> Result<Self, LocalError> {
        let text = json.into();
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| LocalError::InvalidArguments(e.to_string()))?;
        self.arguments = check_arguments(text.trim().to_owned())?;
        Ok(self)
    }

    /// Sends it as `exec-oob` (needs the `oob` capability).
    #[must_use]
    pub fn oob(mut self) -> Self {
        self.oob = true;
        self
    }

    /// Overrides the connection's command timeout for this command (`None`: no timeout).
    #[must_use]
    pub fn timeout(mut self, t: Option<Duration>) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Marks a command that sends no success reply (QGA's `guest-shutdown` and friends). It
    /// resolves as [`Outcome::Sent`] once written; an error reply, if any, is then discarded
    /// (a reply that arrives before its last byte is written resolves it instead).
    #[must_use]
    pub fn no_reply(mut self) -> Self {
        self.expect_reply = false;
        self.quiet = None;
        self
    }

    /// Marks a command that answers only when it fails, as QGA's `guest-shutdown` and
    /// `guest-suspend-*` do: a reply resolves it as usual, and so does a later request's
    /// reply or a completed resync (replies come in order, so it succeeded silently:
    /// [`Outcome::Sent`]). If no reply has come `grace` after its last byte was written
    /// ([`Connection::handle_transmitted`]'s instant), or the peer closes the connection after
    /// that byte (the guest powered off), it resolves as [`Outcome::Sent`] too. Its own
    /// timeout, if that comes first, fails it as usual ([`Outcome::Unknown`]). In guest-agent
    /// mode those four commands get this with [`Config::quiet_grace`] unless marked
    /// [`no_reply`](Self::no_reply) or given their own grace here.
    #[must_use]
    pub fn reply_optional(mut self, grace: Duration) -> Self {
        self.expect_reply = true;
        self.quiet = Some(grace);
        self
    }

    /// Marks a command that carries file descriptors. [`Connection::poll_fds`] names it when its
    /// first byte is next to go out, and the driver MUST attach the descriptors to that write.
    ///
    /// Such a command goes on the wire only once every earlier in-band command with
    /// descriptors has been answered (it waits in the queue meanwhile, and so do the in-band
    /// commands sent after it): QEMU keeps only the descriptors of its latest read, closing
    /// those before, and with `oob` its monitor reads ahead of the commands it runs, so a
    /// second set read early would replace the first before `getfd` or `add-fd` takes it.
    #[must_use]
    pub fn with_fds(mut self) -> Self {
        self.fds = true;
        self
    }

    /// The command name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The arguments as compact JSON text, if any.
    pub fn arguments_json(&self) -> Option<&str> {
        self.arguments.as_deref()
    }

    /// Whether it goes out as `exec-oob`.
    pub fn is_oob(&self) -> bool {
        self.oob
    }
}

fn check_arguments(text: String) -> Result<Option<String>, LocalError> {
    match text.as_bytes().first() {
        Some(b'{') => Ok(Some(text)),
        _ if text == "null" => Ok(None),
        _ => Err(LocalError::InvalidArguments(format!(
            "arguments must be a JSON object, got {}",
            wire::excerpt(&text, 40)
        ))),
    }
}

/// The caller misused the API. The connection is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// The connection is closed; nothing more can be sent.
    #[error("the connection is closed")]
    Closed,
    /// `exec-oob` needs the `oob` capability, which this session did not negotiate.
    #[error("exec-oob needs the oob capability, which this session did not negotiate")]
    OobNotNegotiated,
    /// The guest agent has no out-of-band execution.
    #[error("the guest agent protocol has no exec-oob")]
    OobUnsupported,
    /// The arguments are not a JSON object.
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// The arguments could not be serialised.
    #[error("cannot serialise the arguments: {0}")]
    Serialize(String),
    /// The request would be larger than the configured limit.
    #[error("the request is {size} bytes, over the {max}-byte limit")]
    RequestTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The arguments nest deeper than the configured limit.
    #[error("the arguments nest deeper than {max} levels")]
    RequestTooDeep {
        /// The limit.
        max: usize,
    },
    /// The arguments hold more JSON tokens than the configured limit.
    #[error("the arguments hold {tokens} JSON tokens, over the {max}-token limit")]
    RequestTooManyTokens {
        /// How many they hold.
        tokens: usize,
        /// The limit.
        max: usize,
    },
    /// Too many commands are already waiting locally.
    #[error("{max} commands are already waiting to be sent")]
    QueueFull {
        /// The limit.
        max: usize,
    },
}

/// The peer broke the protocol badly enough to end the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// No greeting arrived in time: the monitor accepted the connection but is not greeting,
    /// typically because another client holds it.
    #[error(
        "the server accepted the connection but sent no greeting in time (is another client \
         attached to this monitor, or is it a guest agent?)"
    )]
    GreetingTimeout,
    /// No greeting that could be read arrived in time, but something else did: the greeting
    /// over [`Config::max_message_size`] or [`Config::max_depth`], or text from a peer that
    /// is no QMP monitor (an HMP monitor's banner, say).
    #[error(
        "no readable greeting came in time, but something else did: a message over the size or \
         depth limits (are they too small?), or text that is no QMP greeting (is this an HMP \
         monitor?)"
    )]
    GreetingUnreadable,
    /// A guest agent was expected, but the peer greeted as a QMP monitor.
    #[error("the peer greeted as a QMP monitor, not a guest agent (connect to it as QMP)")]
    QmpNotQga,
    /// The server greeted but did not answer `qmp_capabilities` in time.
    #[error("the server greeted but did not answer qmp_capabilities in time")]
    NegotiationTimeout,
    /// The guest agent answered the session's first `guest-sync-delimited` with an error: the
    /// command is disabled (`--block-rpcs`, or an allow-list without it) or unknown.
    #[error("the guest agent refused guest-sync-delimited: {0}")]
    SyncRefused(CommandError),
    /// The guest agent did not answer `guest-sync-delimited` in time.
    #[error(
        "the guest agent did not answer guest-sync-delimited in time (is the agent running, and \
         no other client attached?)"
    )]
    SyncTimeout,
    /// The server refused `qmp_capabilities`.
    #[error("capability negotiation failed: {0}")]
    NegotiationFailed(CommandError),
}

/// Why the connection closed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer closed the stream (EOF, reset or broken pipe).
    PeerClosed,
    /// [`Connection::close`] was called.
    Local,
    /// The peer broke the protocol.
    Remote(RemoteError),
    /// The transport failed on this side ([`Connection::handle_transport_error`]).
    TransportFailed,
}

impl CloseReason {
    /// What a request that this close ended, or that came after it, fails with.
    pub fn failure(&self) -> Failure {
        match self {
            Self::PeerClosed => Failure::PeerClosed,
            Self::Local => Failure::LocalClose,
            Self::Remote(_) => Failure::HandshakeFailed,
            Self::TransportFailed => Failure::TransportFailed,
        }
    }
}

/// Why a request did not get an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// Its deadline passed.
    Timeout,
    /// The peer closed the connection.
    PeerClosed,
    /// The connection was closed locally.
    LocalClose,
    /// The handshake failed, so the session never became ready.
    HandshakeFailed,
    /// It needs `oob`, which the server did not offer.
    OobUnavailable,
    /// The server answered, but the reply could not be read: over the message size limit,
    /// nested too deep, or not JSON. Either its id was still legible, or a reply to a later
    /// in-band request came first (QEMU answers those in order). It ran; how is unknown.
    ReplyLost,
    /// The transport failed on this side (an I/O error, not the peer going away).
    TransportFailed,
    /// The transport refused the file descriptors attached to it; nothing of it was sent.
    FdsRefused,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Timeout => "timed out",
            Self::PeerClosed => "the peer closed the connection",
            Self::LocalClose => "the connection was closed",
            Self::HandshakeFailed => "the handshake failed",
            Self::OobUnavailable => "the server does not offer oob",
            Self::ReplyLost => "its reply could not be read",
            Self::TransportFailed => "the connection failed",
            Self::FdsRefused => "the transport refused its file descriptors",
        })
    }
}

/// How a request ended. Every request gets exactly one, unless the caller abandons it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The server answered: the raw `return` value, or the error.
    Replied(Result<RawJson, CommandError>),
    /// A [`Command::no_reply`] command was written in full, or a
    /// [`Command::reply_optional`] one was and no failure came back.
    Sent,
    /// No byte of it reached the transport: retrying is always safe.
    NotSent(Failure),
    /// It was (at least partly) written but no answer came: it may or may not have run.
    Unknown(Failure),
}

impl Outcome {
    /// How far the request got. A [`Sent`](Self::Sent) no-reply command counts as
    /// [`SendStatus::Unanswered`]: it was written, and nothing says what it did.
    pub fn send_status(&self) -> SendStatus {
        match self {
            Self::Replied(_) => SendStatus::Answered,
            Self::NotSent(_) => SendStatus::NotSent,
            Self::Sent | Self::Unknown(_) => SendStatus::Unanswered,
        }
    }
}

/// How far a request got, so that a retry layer can decide whether another try is safe. The
/// same type in every layer: `qmp-client` errors and `qmp-ops` execution errors report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SendStatus {
    /// No byte of it reached the transport: retrying is always safe.
    NotSent,
    /// It was written but no answer was read: it may or may not have had its effect. A
    /// reply that arrived but could not be read ([`Failure::ReplyLost`]) counts here too: the
    /// command ran, with a result nobody knows.
    Unanswered,
    /// The server answered (with an error, or with a value the caller could not use).
    Answered,
}

/// Something the peer sent that does not fit the protocol. The session continues.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Anomaly {
    /// A complete value that is not valid JSON (or not UTF-8), skipped.
    InvalidJson {
        /// Its length in bytes.
        len: usize,
        /// What the parser said.
        error: String,
    },
    /// Bytes between messages that cannot start one, skipped.
    Garbage {
        /// How many.
        len: usize,
    },
    /// A message over [`Config::max_message_size`], skipped.
    Oversized {
        /// Its length in bytes.
        len: usize,
    },
    /// A message nested deeper than [`Config::max_depth`], skipped.
    TooDeep {
        /// Its length in bytes.
        len: usize,
    },
    /// Valid JSON that is not a message this state expects (the text, shortened).
    Unexpected(String),
    /// An error reply without an id: QEMU's answer to input it could not parse. This crate
    /// always sends an id, so such errors are never matched to a request.
    IdlessError(CommandError),
    /// The stream ended inside a message of this many bytes.
    Truncated {
        /// How many bytes of it arrived.
        len: usize,
    },
}

/// The negotiated session, reported once by [`Output::Ready`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Ready {
    /// The capabilities that were enabled.
    pub capabilities: Vec<String>,
}

/// What the machine emits, drained with [`Connection::poll_output`].
#[must_use = "outputs carry replies and events that would otherwise be lost"]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Output {
    /// The server's greeting (QMP only).
    Greeting(Greeting),
    /// The session is ready for commands.
    Ready(Ready),
    /// A request finished.
    Completed {
        /// Which one.
        id: RequestId,
        /// How.
        outcome: Outcome,
    },
    /// An asynchronous event.
    Event(Event),
    /// A protocol anomaly; the session goes on.
    Anomaly(Anomaly),
    /// A message that could not be read (not JSON, too large, too deep or of no known shape;
    /// the [`Output::Anomaly`] before this says which) in which no id could be read: if it was an
    /// event, that event is lost. Clients report it to event subscribers as a loss.
    Unreadable,
    /// The connection is closed; nothing follows.
    Closed(CloseReason),
}

/// The phase of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// Waiting for the QMP greeting.
    AwaitingGreeting,
    /// `qmp_capabilities` is on its way.
    Negotiating,
    /// The guest agent sync is on its way.
    Syncing,
    /// Commands flow.
    Ready,
    /// Done.
    Closed,
}

/// Counters a caller can read at any time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Bytes fed to `handle_input`.
    pub bytes_received: u64,
    /// Bytes reported by `handle_transmitted`.
    pub bytes_sent: u64,
    /// Complete messages received (valid or not).
    pub messages_received: u64,
    /// Requests whose first byte was written (including internal ones).
    pub requests_sent: u64,
    /// Replies delivered to their request.
    pub replies: u64,
    /// Events delivered.
    pub events: u64,
    /// Replies for requests that had timed out or been abandoned, dropped.
    pub late_replies: u64,
    /// Replies whose id this session never sent (or stale replies during a QGA sync), dropped.
    pub unknown_replies: u64,
    /// Anomalies reported.
    pub anomalies: u64,
}

/// How much of a request reached the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Nothing,
    Partly,
    All,
}

/// What an id on the wire belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    User,
    Negotiation,
    Sync,
}

#[derive(Debug)]
struct Pending {
    purpose: Purpose,
    inband: bool,
    expect_reply: bool,
    written: Written,
    deadline: Option<Instant>,
    /// Encoded bytes while still waiting in the local queue.
    queued: Option<Vec<u8>>,
    fds: bool,
    /// [`Command::reply_optional`]: silence this long after the write means success.
    quiet: Option<Duration>,
    /// When that silence is long enough: set once the last byte is written.
    quiet_at: Option<Instant>,
}

impl Pending {
    /// Whether it holds one of the [`Config::max_in_flight`] slots while on the wire: a user
    /// request, in-band, that gets a reply.
    fn takes_slot(&self) -> bool {
        self.purpose == Purpose::User && self.inband && self.expect_reply
    }
}

/// A request's bytes inside the transmit buffer.
#[derive(Debug, Clone, Copy)]
struct Segment {
    id: u64,
    start: usize,
    end: usize,
    /// File descriptors go with its first byte ([`Command::with_fds`]).
    fds: bool,
}

/// Hashes the ids this machine generates (sequential integers) with one multiplication. The
/// peer cannot insert keys, so there is nothing to flood.
#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;
type IdSet = HashSet<u64, std::hash::BuildHasherDefault<IdHasher>>;

/// The wire id reserved for `qmp_capabilities`; user requests count up from 1.
const NEGOTIATION_ID: u64 = 0;
/// Input is framed in pieces of at most this size so buffers stay near the message limit.
const FEED_CHUNK: usize = 256 * 1024;
/// Ids of abandoned or timed-out requests remembered to tell late replies from unknown ones.
const MAX_TOMBSTONES: usize = 4096;

/// A sans-IO QMP or QGA client connection.
///
/// It does no I/O, reads no clock and spawns nothing: bytes and time go in through `handle_*`
/// calls, and bytes to write, the next deadline and outputs come out through `poll_*` calls.
///
/// After **every** `handle_*` call and every [`send`](Self::send), [`abandon`](Self::abandon)
/// or [`close`](Self::close), the driver MUST, in this order:
/// 1. write what [`poll_transmit`](Self::poll_transmit) shows (attaching file descriptors when
///    [`poll_fds`](Self::poll_fds) names a request) and report the count with
///    [`handle_transmitted`](Self::handle_transmitted), until it shows nothing or the
///    transport would block;
/// 2. re-arm its single timer from [`poll_timeout`](Self::poll_timeout) and call
///    [`handle_timeout`](Self::handle_timeout) when it fires;
/// 3. drain [`poll_output`](Self::poll_output).
///
/// `now` values MUST never go backwards.
///
/// # Correlation rules
/// - Every request carries a numeric id; replies are matched by id alone, never by order.
/// - A reply whose id belongs to a timed-out or abandoned request is counted in
///   [`Stats::late_replies`] and dropped; an id never sent is counted in
///   [`Stats::unknown_replies`] and dropped. Ids are never reused, so nothing is misrouted.
/// - An error without an id (QEMU's answer to unparsable input) is reported as
///   [`Anomaly::IdlessError`], never matched to a request: this crate always sends ids and
///   never leaves half a request on the wire, so such an error cannot answer one of ours.
/// - At most [`Config::max_in_flight`] in-band requests are on the wire without a reply
///   (abandoned and timed-out ones still count until a later in-band reply shows QEMU got past
///   them); more wait in a local queue. `exec-oob` requests skip that queue, unless they carry
///   descriptors while an in-band request with descriptors awaits its reply
///   ([`Command::with_fds`]).
pub struct Connection {
    config: Config,
    state: State,
    framer: Framer,
    greeting: Option<Greeting>,
    capabilities: Vec<String>,
    handshake_deadline: Option<Instant>,
    /// The next user id.
    next_id: u64,
    /// The next QGA sync id.
    next_sync: u64,
    /// The latest instant given to a method (time never goes back for the machine).
    last_now: Instant,
    /// The sync id being waited for, and whether its 0xFF was seen.
    syncing: Option<(u64, bool)>,
    /// A message that could not be read came before the greeting.
    unreadable_before_greeting: bool,
    /// Every unresolved request, by wire id.
    pending: IdMap<Pending>,
    /// Requests waiting for admission, in order.
    /// May also hold ids forgotten since (skipped by `admit`, dropped in bulk by `forget`).
    queue: VecDeque<u64>,
    /// Requests in `queue` still waiting (pending, with bytes queued).
    queued: usize,
    /// In-band requests on the wire without a reply (including tombstoned ones), in order.
    inband: VecDeque<u64>,
    /// The last in-band request with descriptors put on the wire. While it is in `inband`, no
    /// other request with descriptors goes out ([`Command::with_fds`]).
    fds_on_wire: Option<u64>,
    /// Abandoned or timed-out ids whose replies may still arrive.
    tombstones: IdSet,
    tombstone_order: VecDeque<u64>,
    deadlines: BTreeSet<(Instant, u64)>,
    out: Vec<u8>,
    out_pos: usize,
    segments: VecDeque<Segment>,
    outputs: VecDeque<Output>,
    stats: Stats,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("state", &self.state)
            .field("pending", &self.pending.len())
            .field("queued", &self.queued)
            .field("in_flight", &self.inband.len())
            .field("unsent_bytes", &(self.out.len() - self.out_pos))
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A connection that has just been opened at `now`.
    pub fn new(now: Instant, mut config: Config) -> Self {
        config.max_in_flight = config.max_in_flight.max(1);
        // A timeout too long to represent is no timeout.
        let handshake_deadline = config.handshake_timeout.and_then(|t| now.checked_add(t));
        let framer = Framer::new(config.max_message_size, config.max_depth);
        let mut conn = Self {
            state: State::AwaitingGreeting,
            framer,
            greeting: None,
            capabilities: Vec::new(),
            handshake_deadline,
            next_id: 1,
            next_sync: 0,
            last_now: now,
            syncing: None,
            unreadable_before_greeting: false,
            pending: IdMap::default(),
            queue: VecDeque::new(),
            queued: 0,
            inband: VecDeque::new(),
            fds_on_wire: None,
            tombstones: IdSet::default(),
            tombstone_order: VecDeque::new(),
            deadlines: BTreeSet::new(),
            out: Vec::new(),
            out_pos: 0,
            segments: VecDeque::new(),
            outputs: VecDeque::new(),
            stats: Stats::default(),
            config,
        };
        if let Mode::Qga { sync_seed } = conn.config.mode {
            conn.next_sync = sync_seed & SYNC_ID_MASK;
            conn.start_sync(now);
        }
        conn
    }

    // --- Inputs ---

    /// Feeds bytes read from the transport. (`now` is part of the contract for every input;
    /// input alone never fires a deadline.)
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) {
        if self.state == State::Closed {
            return;
        }
        self.last_now = self.last_now.max(now);
        self.stats.bytes_received += data.len() as u64;
        for chunk in data.chunks(FEED_CHUNK) {
            self.feed(chunk);
            if self.state == State::Closed {
                return;
            }
        }
    }

    fn feed(&mut self, mut chunk: &[u8]) {
        // While a QGA sync waits for its 0xFF, bytes before that marker are stale: complete
        // messages in them are still routed by id, partial ones are dropped at the marker.
        while let Some((sync, false)) = self.syncing {
            match chunk.iter().position(|&b| b == 0xFF) {
                Some(i) => {
                    self.framer.push(&chunk[..i]);
                    self.drain_frames();
                    if self.state == State::Closed {
                        // A message before the marker ended the session (a QMP greeting):
                        // nothing after it counts, not even the sync's reply.
                        return;
                    }
                    self.framer.reset();
                    self.syncing = Some((sync, true));
                    chunk = &chunk[i + 1..];
                }
                None => break,
            }
        }
        self.framer.push(chunk);
        self.drain_frames();
    }

    fn drain_frames(&mut self) {
        while let Some(frame) = self.framer.next_frame() {
            match frame {
                Frame::Value { range, ascii } => {
                    self.stats.messages_received += 1;
                    let len = range.len();
                    let bytes = self.framer.take(range);
                    match wire::classify(bytes, ascii) {
                        Ok(msg) => self.on_message(msg),
                        Err(bad) => {
                            self.anomaly(Anomaly::InvalidJson { len, error: bad.0 });
                            // An id at either end makes it a reply (QEMU can print `inf` in
                            // a return value, which is no JSON).
                            self.on_unreadable(Unread::from_id(bad.1));
                        }
                    }
                }
                // Outside a sync the 0xFF marker carries no meaning.
                Frame::Delimiter => {}
                Frame::Garbage { len } => {
                    self.anomaly(Anomaly::Garbage { len });
                    // No message at all, so no lost event; but before a greeting, the
                    // handshake's timeout error says something else came.
                    self.on_unreadable(Unread::Neither);
                }
                Frame::Oversized { len, id } => {
                    self.stats.messages_received += 1;
                    self.anomaly(Anomaly::Oversized { len });
                    self.on_unreadable(Unread::from_id(id));
                }
                Frame::TooDeep { len, id } => {
                    self.stats.messages_received += 1;
                    self.anomaly(Anomaly::TooDeep { len });
                    self.on_unreadable(Unread::from_id(id));
                }
            }
            if self.state == State::Closed {
                return;
            }
        }
    }

    /// Reports that the peer closed the stream (EOF, reset, broken pipe).
    pub fn handle_eof(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
        self.end_stream(CloseReason::PeerClosed);
    }

    /// Reports that reading or writing failed on this side for another reason than the peer
    /// going away (the session cannot go on; the I/O error itself is the driver's to report).
    pub fn handle_transport_error(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
        self.end_stream(CloseReason::TransportFailed);
    }

    /// Reports that the transport refused the descriptors of the request
    /// [`poll_fds`](Self::poll_fds) names, sending nothing (Linux's `sendmsg` fails so when,
    /// for one, the process has too many descriptors in flight). The request resolves as not
    /// sent, its bytes leave the transmit buffer, and the session goes on. Returns whether it
    /// did: false when `poll_fds` names no request (nothing changes then).
    pub fn handle_fds_refused(&mut self, now: Instant) -> bool {
        self.last_now = self.last_now.max(now);
        let Some(RequestId(id)) = self.poll_fds() else {
            return false;
        };
        let outcome = self.forget(id, Failure::FdsRefused);
        self.complete(id, outcome);
        self.admit();
        true
    }

    fn end_stream(&mut self, reason: CloseReason) {
        if self.state == State::Closed {
            return;
        }
        let len = self.framer.partial_len();
        if len > 0 {
            self.anomaly(Anomaly::Truncated { len });
        }
        self.shut(reason);
    }

    /// Expires every deadline at or before `now`. Harmless when nothing is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        self.last_now = self.last_now.max(now);
        if self.handshake_deadline.is_some_and(|d| d <= now) {
            self.handshake_deadline = None;
            let why = match self.state {
                State::AwaitingGreeting if self.unreadable_before_greeting => {
                    RemoteError::GreetingUnreadable
                }
                State::AwaitingGreeting => RemoteError::GreetingTimeout,
                State::Negotiating => RemoteError::NegotiationTimeout,
                _ => RemoteError::SyncTimeout,
            };
            self.shut(CloseReason::Remote(why));
            return;
        }
        let mut resync = false;
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(p) = self.pending.get(&id) else {
                continue;
            };
            match p.purpose {
                Purpose::User => {}
                Purpose::Sync => {
                    // The agent did not answer the sync in time: sync again (below), which
                    // drops this one (and its bytes, if none went out).
                    resync = true;
                    continue;
                }
                Purpose::Negotiation => continue,
            }
            let written = p.written;
            if p.quiet_at.is_some_and(|at| at <= now) {
                // No reply for the grace since its turn came: it succeeded, as such commands
                // do (`forget` frees its slot).
                let _ = self.forget(id, Failure::Timeout);
                self.complete(id, Outcome::Sent);
                continue;
            }
            resync |= written != Written::Nothing;
            let outcome = self.forget(id, Failure::Timeout);
            self.complete(id, outcome);
        }
        if resync && matches!(self.config.mode, Mode::Qga { .. }) && self.state == State::Ready {
            // The agent may hold a half-read request or owe us stale replies: resynchronise.
            self.start_sync(now);
        }
        self.admit();
    }

    /// Reports that the first `n` bytes shown by [`poll_transmit`](Self::poll_transmit) were
    /// written at `now` (the grace of a [`Command::reply_optional`] command counts from it).
    pub fn handle_transmitted(&mut self, now: Instant, n: usize) {
        self.last_now = self.last_now.max(now);
        let n = n.min(self.out.len() - self.out_pos);
        if n == 0 {
            return;
        }
        self.out_pos += n;
        self.stats.bytes_sent += n as u64;
        while let Some(seg) = self.segments.front().copied() {
            if seg.start >= self.out_pos {
                break;
            }
            let done = seg.end <= self.out_pos;
            if let Some(p) = self.pending.get_mut(&seg.id) {
                if p.written == Written::Nothing {
                    self.stats.requests_sent += 1;
                }
                p.written = if done { Written::All } else { Written::Partly };
                if done && !p.expect_reply {
                    self.take_pending(seg.id);
                    self.complete(seg.id, Outcome::Sent);
                }
            }
            if !done {
                break;
            }
            self.segments.pop_front();
        }
        self.start_front_grace();
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            self.segments.clear();
        }
    }

    // --- Commands from the application ---

    /// Submits a command. It is written once the session is ready and an in-flight slot is
    /// free; its deadline counts from `now`.
    ///
    /// # Errors
    /// See [`LocalError`]; on error nothing changed.
    pub fn send(&mut self, now: Instant, mut cmd: Command) -> Result<RequestId, LocalError> {
        if self.state == State::Closed {
            return Err(LocalError::Closed);
        }
        self.last_now = self.last_now.max(now);
        if matches!(self.config.mode, Mode::Qga { .. })
            && cmd.expect_reply
            && cmd.quiet.is_none()
            && QGA_QUIET.contains(&cmd.name.as_str())
        {
            cmd.quiet = Some(self.config.quiet_grace);
        }
        if cmd.oob {
            if matches!(self.config.mode, Mode::Qga { .. }) {
                return Err(LocalError::OobUnsupported);
            }
            if self.state == State::Ready && !self.has_capability("oob") {
                return Err(LocalError::OobNotNegotiated);
            }
        }
        if let Some(args) = &cmd.arguments {
            let (depth, tokens) = shape(args.as_bytes());
            if depth > self.config.max_request_depth {
                return Err(LocalError::RequestTooDeep {
                    max: self.config.max_request_depth,
                });
            }
            if tokens > self.config.max_request_tokens {
                return Err(LocalError::RequestTooManyTokens {
                    tokens,
                    max: self.config.max_request_tokens,
                });
            }
        }
        let id = self.next_id;
        let ready = self.state == State::Ready && self.syncing.is_none();
        // As `admit` decides: oob goes at once; an in-band request goes in turn, behind any
        // that wait (a no-reply `guest-shutdown` must not overtake them), and waits for a
        // slot only if it takes one. One with descriptors waits while an in-band one with
        // descriptors is unanswered (see `Command::with_fds`).
        let takes_slot = !cmd.oob && cmd.expect_reply;
        let direct = ready
            && !(cmd.fds && self.fds_busy())
            && (cmd.oob
                || (self.queued == 0
                    && (!takes_slot || self.inband.len() < self.config.max_in_flight)));
        // A request that can go now is encoded straight into the transmit buffer; one that
        // waits gets its own buffer in the queue.
        let (start, mut queued) = if direct {
            (self.begin_segment(), None)
        } else {
            let capacity = 32 + cmd.name.len() + cmd.arguments.as_ref().map_or(0, String::len);
            (0, Some(Vec::with_capacity(capacity)))
        };
        let out = queued.as_mut().unwrap_or(&mut self.out);
        wire::encode_request(out, &cmd.name, cmd.arguments.as_deref(), cmd.oob, Some(id));
        let size = out.len() - start;
        if size > self.config.max_request_size {
            out.truncate(start);
            return Err(LocalError::RequestTooLarge {
                size,
                max: self.config.max_request_size,
            });
        }
        if !direct && self.queued >= self.config.max_queued {
            return Err(LocalError::QueueFull {
                max: self.config.max_queued,
            });
        }
        self.next_id += 1;
        let deadline = cmd
            .timeout
            .unwrap_or(self.config.command_timeout)
            .and_then(|t| now.checked_add(t));
        if let Some(at) = deadline {
            self.deadlines.insert((at, id));
        }
        self.pending.insert(
            id,
            Pending {
                purpose: Purpose::User,
                inband: !cmd.oob,
                expect_reply: cmd.expect_reply,
                written: Written::Nothing,
                deadline,
                queued,
                fds: cmd.fds,
                quiet: cmd.quiet,
                quiet_at: None,
            },
        );
        if direct {
            self.end_segment(id, start);
        } else {
            self.queue.push_back(id);
            self.queued += 1;
        }
        Ok(RequestId(id))
    }

    /// Gives up on a request without an outcome. If none of its bytes were written it is
    /// dropped; if some were, the rest is still written (a request is never cut short) and its
    /// reply, when it comes, is discarded. Returns whether the request was still pending.
    pub fn abandon(&mut self, id: RequestId) -> bool {
        let id = id.0;
        match self.pending.get(&id) {
            Some(p) if p.purpose == Purpose::User => {
                let _ = self.forget(id, Failure::LocalClose);
                self.admit();
                true
            }
            _ => false,
        }
    }

    /// Starts a new guest-agent sync (0xFF plus `guest-sync-delimited`), for instance after a
    /// reconnect of the transport or an anomaly. New commands wait until it completes. Has no
    /// effect in QMP mode or when closed.
    pub fn resync(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
        if matches!(self.config.mode, Mode::Qga { .. }) && self.state != State::Closed {
            self.start_sync(now);
        }
    }

    /// Closes the connection: every pending request resolves now, unsent bytes are dropped, and
    /// [`Output::Closed`] follows. The driver SHOULD then shut the transport down.
    pub fn close(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
        if self.state != State::Closed {
            self.shut(CloseReason::Local);
        }
    }

    // --- Outputs ---

    /// The bytes to write next, if any. Peek only: report progress with
    /// [`handle_transmitted`](Self::handle_transmitted).
    #[must_use]
    pub fn poll_transmit(&self) -> Option<&[u8]> {
        if self.out_pos == self.out.len() {
            return None;
        }
        // Bytes of a request that carries fds start a write of their own, so the descriptors
        // travel with its first byte; the write before stops short of it.
        let end = self
            .segments
            .iter()
            .find(|seg| seg.fds && seg.start > self.out_pos)
            .map_or(self.out.len(), |seg| seg.start);
        Some(&self.out[self.out_pos..end])
    }

    /// The request whose file descriptors MUST be attached to the next write, when the bytes
    /// that [`poll_transmit`](Self::poll_transmit) shows begin a request marked
    /// [`Command::with_fds`].
    #[must_use]
    pub fn poll_fds(&self) -> Option<RequestId> {
        let seg = self.segments.front()?;
        if !seg.fds || seg.start != self.out_pos {
            return None;
        }
        let p = self.pending.get(&seg.id)?;
        (p.written == Written::Nothing).then_some(RequestId(seg.id))
    }

    /// The earliest deadline, if any.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Closed {
            return None;
        }
        let first = self.deadlines.first().map(|&(at, _)| at);
        match (self.handshake_deadline, first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next output, if any.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    // --- Getters ---

    /// The phase of the session.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether commands flow.
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The server's greeting, once received.
    pub fn greeting(&self) -> Option<&Greeting> {
        self.greeting.as_ref()
    }

    /// The capabilities enabled by negotiation.
    pub fn capabilities(&self) -> &[String] {
        &self.capabilities
    }

    /// Whether capability `name` was enabled.
    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities.iter().any(|c| c == name)
    }

    /// In-band requests on the wire without a reply (counting abandoned ones QEMU still holds).
    pub fn in_flight(&self) -> usize {
        self.inband.len()
    }

    /// Requests waiting locally.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Unresolved requests of the caller's (queued, on the wire or awaiting a reply).
    pub fn pending(&self) -> usize {
        self.pending
            .values()
            .filter(|p| p.purpose == Purpose::User)
            .count()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    // --- Internals ---

    fn anomaly(&mut self, a: Anomaly) {
        self.stats.anomalies += 1;
        self.outputs.push_back(Output::Anomaly(a));
    }

    fn complete(&mut self, id: u64, outcome: Outcome) {
        self.outputs.push_back(Output::Completed {
            id: RequestId(id),
            outcome,
        });
    }

    fn on_message(&mut self, msg: Incoming) {
        match msg {
            Incoming::Event(ev) => {
                if self.syncing.is_some_and(|(_, seen)| !seen) && self.state != State::Ready {
                    // QGA sends no events; anything before the sync marker is stale.
                    self.stats.unknown_replies += 1;
                    return;
                }
                self.stats.events += 1;
                self.outputs.push_back(Output::Event(ev));
            }
            Incoming::Greeting(g) => {
                if self.state == State::AwaitingGreeting && self.config.mode == Mode::Qmp {
                    self.on_greeting(g);
                } else if matches!(self.config.mode, Mode::Qga { .. }) && self.state != State::Ready
                {
                    // A guest agent never greets: waiting for the sync would only time out.
                    self.shut(CloseReason::Remote(RemoteError::QmpNotQga));
                } else {
                    self.anomaly(Anomaly::Unexpected("a second greeting".to_owned()));
                }
            }
            Incoming::Return { id, value } => self.on_reply(id, Ok(value)),
            Incoming::Error { id, error } => self.on_reply(id, Err(error)),
            Incoming::Unexpected(text, unread) => {
                self.anomaly(Anomaly::Unexpected(text));
                self.on_unreadable(unread);
            }
        }
    }

    fn on_greeting(&mut self, g: Greeting) {
        let caps: Vec<String> = self
            .config
            .capabilities
            .iter()
            .filter(|c| g.offers(c))
            .cloned()
            .collect();
        self.outputs.push_back(Output::Greeting(g.clone()));
        self.greeting = Some(g);
        self.state = State::Negotiating;
        let args = (!caps.is_empty()).then(|| serde_json::json!({ "enable": caps }).to_string());
        self.capabilities = caps;
        let mut bytes = Vec::new();
        wire::encode_request(
            &mut bytes,
            "qmp_capabilities",
            args.as_deref(),
            false,
            Some(NEGOTIATION_ID),
        );
        self.pending.insert(
            NEGOTIATION_ID,
            Pending {
                purpose: Purpose::Negotiation,
                inband: false,
                expect_reply: true,
                written: Written::Nothing,
                deadline: None,
                queued: None,
                fds: false,
                quiet: None,
                quiet_at: None,
            },
        );
        self.put_on_wire(NEGOTIATION_ID, &bytes);
    }

    fn on_reply(&mut self, id: WireId, result: Result<RawJson, CommandError>) {
        let id = match id {
            WireId::Number(id) => id,
            WireId::Missing => {
                if let Some((sync, true)) = self.syncing
                    && let Ok(v) = &result
                    && v.get().trim().parse::<u64>() == Ok(sync)
                {
                    self.finish_sync();
                    return;
                }
                if self.syncing.is_some() {
                    // An error naming the sync while the session starts is the agent's answer
                    // to it (the sync is our only request without an id): without the command
                    // no sync can succeed, so say so now rather than at the deadline.
                    if self.state == State::Syncing
                        && let Err(e) = &result
                        && e.class == ErrorClass::CommandNotFound
                        && e.desc.contains("guest-sync-delimited")
                    {
                        let e = e.clone();
                        self.shut(CloseReason::Remote(RemoteError::SyncRefused(e)));
                        return;
                    }
                    // The parse error our 0xFF provokes, or replies meant for someone else.
                    self.stats.unknown_replies += 1;
                    return;
                }
                match result {
                    Err(e) => self.anomaly(Anomaly::IdlessError(e)),
                    Ok(_) => self.stats.unknown_replies += 1,
                }
                return;
            }
            WireId::Foreign => {
                self.stats.unknown_replies += 1;
                return;
            }
        };
        if self.state == State::AwaitingGreeting
            || (self.syncing.is_some() && self.state != State::Ready)
        {
            // Before the handshake no id of ours is on the wire: stale output.
            self.stats.unknown_replies += 1;
            return;
        }
        // One lookup: take the entry out, and put it back when this is not its answer (its
        // deadline stays armed meanwhile).
        match self.pending.remove(&id) {
            Some(p) if p.purpose == Purpose::Negotiation => match result {
                Ok(_) => self.become_ready(),
                Err(e) => self.shut(CloseReason::Remote(RemoteError::NegotiationFailed(e))),
            },
            Some(p) if p.purpose == Purpose::User && p.written != Written::Nothing => {
                if let Some(at) = p.deadline {
                    self.deadlines.remove(&(at, id));
                }
                self.retire_inband(id);
                self.stats.replies += 1;
                // Still pending means unresolved, even for a no-reply command answered before
                // its last byte went out (a no-reply command leaves `pending` once written).
                self.complete(id, Outcome::Replied(result));
                self.admit();
            }
            // Not an answer: a request not yet written, or a key of a sync (which has no wire
            // id, so a peer naming it is making it up).
            other => {
                let late = match other {
                    Some(p) => {
                        self.pending.insert(id, p);
                        false
                    }
                    None => self.take_late(id),
                };
                if !late {
                    self.stats.unknown_replies += 1;
                }
                self.admit();
            }
        }
    }

    /// Takes a reply to `id`, which is not pending, as a late reply to an abandoned request:
    /// frees its in-band slot and counts it. False if `id` was never abandoned. An abandoned
    /// request still holding a slot counts even when its tombstone was evicted (over
    /// `MAX_TOMBSTONES` abandoned since): otherwise the slot would stay taken.
    fn take_late(&mut self, id: u64) -> bool {
        if !self.tombstones.remove(&id) && !self.inband.contains(&id) {
            return false;
        }
        self.retire_inband(id);
        self.stats.late_replies += 1;
        true
    }

    /// In-band replies come in order: a reply to `id` means QEMU is done with every earlier
    /// in-band request, including abandoned ones whose replies were lost or discarded. One
    /// still pending will never be answered (its reply was unreadable, or the server skipped
    /// it): it resolves as [`Failure::ReplyLost`].
    fn retire_inband(&mut self, id: u64) {
        if self.inband.front() == Some(&id) {
            // The usual case: replies arrive in the order the requests went out.
            self.inband.pop_front();
            self.start_front_grace();
            return;
        }
        if !self.inband.contains(&id) {
            return;
        }
        while let Some(first) = self.inband.pop_front() {
            if first == id {
                break;
            }
            if let Some(p) = self.pending.get(&first)
                && p.purpose == Purpose::User
                && p.written == Written::All
            {
                // A later request's reply came first: one that answers only on failure
                // succeeded; any other reply was lost.
                let outcome = if p.quiet.is_some() {
                    Outcome::Sent
                } else {
                    Outcome::Unknown(Failure::ReplyLost)
                };
                self.take_pending(first);
                self.complete(first, outcome);
            }
        }
        self.start_front_grace();
    }

    /// Starts the grace of the [`Command::reply_optional`] request at the front of the
    /// in-band line once it is written whole: requests run in turn, so its silence counts only
    /// from when those before it were answered. Its own timeout, if earlier, still fails it.
    fn start_front_grace(&mut self) {
        let Some(&id) = self.inband.front() else {
            return;
        };
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        if p.written != Written::All || p.quiet_at.is_some() {
            return;
        }
        let Some(at) = p.quiet.and_then(|grace| self.last_now.checked_add(grace)) else {
            return;
        };
        p.quiet_at = Some(at);
        if p.deadline.is_none_or(|d| at < d) {
            if let Some(old) = p.deadline.replace(at) {
                self.deadlines.remove(&(old, id));
            }
            self.deadlines.insert((at, id));
        }
    }

    /// A message skipped as unreadable (invalid, too large, too deep or of no known shape),
    /// with what it may have been. The reply to an id of ours: the request resolves as
    /// [`Failure::ReplyLost`] instead of waiting for a reply that has come and gone (events
    /// carry no id). With no id, it may have been an event: [`Output::Unreadable`] says so.
    fn on_unreadable(&mut self, unread: Unread) {
        if self.state == State::AwaitingGreeting {
            self.unreadable_before_greeting = true;
        }
        if self.state == State::Closed {
            return;
        }
        if self.syncing.is_some()
            && !(self.state == State::Ready && matches!(unread, Unread::Reply(_)))
        {
            // Stale output before the sync's answer; only a reply to a request of ours, on
            // a session that was ready, still counts.
            return;
        }
        let id = match unread {
            Unread::Reply(id) => id,
            Unread::MaybeEvent => {
                self.outputs.push_back(Output::Unreadable);
                return;
            }
            Unread::Neither => return,
        };
        match self.pending.get(&id) {
            Some(p) if p.purpose == Purpose::User && p.written == Written::All => {
                self.retire_inband(id);
                self.take_pending(id);
                self.complete(id, Outcome::Unknown(Failure::ReplyLost));
                self.admit();
            }
            // Ours, but not all written yet: a reply that came too early.
            Some(_) => {}
            // Events carry no id: whatever this answered, it was no event.
            None => {
                if self.take_late(id) {
                    self.admit();
                }
            }
        }
    }

    fn become_ready(&mut self) {
        self.state = State::Ready;
        self.handshake_deadline = None;
        self.outputs.push_back(Output::Ready(Ready {
            capabilities: self.capabilities.clone(),
        }));
        // `exec-oob` requests queue only before this point (afterwards they skip the queue,
        // unless they carry descriptors while others are out): they go out now, ahead of the
        // in-band cap, or fail if oob was not negotiated. From here on the queue holds in-band
        // requests only, and those with descriptors.
        let pending = &self.pending;
        let oob: Vec<u64> = self
            .queue
            .iter()
            .copied()
            .filter(|id| pending.get(id).is_some_and(|p| !p.inband))
            .collect();
        if !oob.is_empty() {
            self.queue
                .retain(|id| pending.get(id).is_some_and(|p| p.inband));
            let negotiated = self.has_capability("oob");
            for id in oob {
                if negotiated {
                    let bytes = self.pending.get_mut(&id).and_then(|p| p.queued.take());
                    self.queued -= 1;
                    self.put_on_wire(id, &bytes.unwrap_or_default());
                } else {
                    let outcome = self.forget(id, Failure::OobUnavailable);
                    self.complete(id, outcome);
                }
            }
        }
        self.admit();
    }

    /// Sends a sync. Once the session is ready, a sync not answered within
    /// [`Config::handshake_timeout`] is sent again (the first one is bounded by the handshake
    /// deadline instead).
    fn start_sync(&mut self, now: Instant) {
        let deadline = match self.state {
            State::Ready => self
                .config
                .handshake_timeout
                .and_then(|t| now.checked_add(t)),
            _ => None,
        };
        // A newer sync supersedes any earlier one (its late answer is stale).
        self.drop_syncs();
        let sync = self.next_sync;
        self.next_sync = self.next_sync.wrapping_add(1) & SYNC_ID_MASK;
        self.syncing = Some((sync, false));
        if self.state != State::Ready {
            self.state = State::Syncing;
        }
        let mut bytes = vec![0xFF];
        let args = format!("{{\"id\":{sync}}}");
        wire::encode_request(&mut bytes, "guest-sync-delimited", Some(&args), false, None);
        // Sync requests have no wire id; they are tracked under a key no user id can take.
        let key = u64::MAX - (sync % (1 << 20));
        self.pending.insert(
            key,
            Pending {
                purpose: Purpose::Sync,
                inband: false,
                expect_reply: true,
                written: Written::Nothing,
                deadline,
                queued: None,
                fds: false,
                quiet: None,
                quiet_at: None,
            },
        );
        if let Some(at) = deadline {
            self.deadlines.insert((at, key));
        }
        self.put_on_wire(key, &bytes);
    }

    /// Forgets every sync request, with its deadline; one not written at all leaves the
    /// transmit buffer too (an agent that does not read would otherwise collect a stale sync
    /// per timeout).
    fn drop_syncs(&mut self) {
        let keys: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.purpose == Purpose::Sync)
            .map(|(&key, _)| key)
            .collect();
        for key in keys {
            if self
                .take_pending(key)
                .is_some_and(|p| p.written == Written::Nothing)
            {
                self.cut_segment(key);
            }
        }
    }

    /// Removes the bytes of request `id`, none of which were written, from the transmit
    /// buffer.
    fn cut_segment(&mut self, id: u64) {
        if let Some(i) = self.segments.iter().position(|s| s.id == id) {
            let seg = self.segments.remove(i).expect("in range");
            let len = seg.end - seg.start;
            self.out.drain(seg.start..seg.end);
            for later in self.segments.iter_mut().skip(i) {
                later.start -= len;
                later.end -= len;
            }
        }
    }

    fn finish_sync(&mut self) {
        self.syncing = None;
        self.drop_syncs();
        // The agent answers in order and drops a half-read request at the 0xFF, so every
        // request written before the sync and still unanswered never will be: resolve them,
        // forget their tombstones, and free their slots.
        while let Some(id) = self.inband.pop_front() {
            self.tombstones.remove(&id);
            if let Some(p) = self.pending.get(&id)
                && p.written != Written::Nothing
            {
                // One that answers only on failure and was written whole did not fail.
                let outcome = if p.quiet.is_some() && p.written == Written::All {
                    Outcome::Sent
                } else {
                    Outcome::Unknown(Failure::ReplyLost)
                };
                self.take_pending(id);
                self.complete(id, outcome);
            }
        }
        if self.state != State::Ready {
            self.become_ready();
        } else {
            self.admit();
        }
    }

    /// Moves queued requests onto the wire while slots are free.
    fn admit(&mut self) {
        if self.state != State::Ready || self.syncing.is_some() {
            return;
        }
        // Runs after every reply, so it stays O(admitted): once the session is ready the
        // queue holds in-band requests only (see `become_ready`), and `exec-oob` ones with
        // descriptors, which wait their turn like them.
        while let Some(&id) = self.queue.front() {
            let fds_busy = self.fds_busy();
            let Some(p) = self.pending.get_mut(&id) else {
                self.queue.pop_front();
                continue;
            };
            if (p.takes_slot() && self.inband.len() >= self.config.max_in_flight)
                || (p.fds && fds_busy)
            {
                break;
            }
            let bytes = p.queued.take().unwrap_or_default();
            self.queue.pop_front();
            self.queued -= 1;
            self.put_on_wire(id, &bytes);
        }
    }

    fn put_on_wire(&mut self, id: u64, bytes: &[u8]) {
        let start = self.begin_segment();
        self.out.extend_from_slice(bytes);
        self.end_segment(id, start);
    }

    /// Makes room at the end of the transmit buffer for a request's bytes and returns where
    /// they start; [`end_segment`](Self::end_segment) records them once appended.
    fn begin_segment(&mut self) -> usize {
        if self.out_pos > 0 && self.out_pos >= self.out.len() / 2 {
            // Compact so the buffer does not grow while the transport drains it slowly.
            self.out.drain(..self.out_pos);
            for seg in &mut self.segments {
                // A partly written request starts before `out_pos`; whether it started is
                // tracked in `Pending::written`, so clamping its start loses nothing.
                seg.start = seg.start.saturating_sub(self.out_pos);
                seg.end -= self.out_pos;
            }
            self.out_pos = 0;
        }
        self.out.len()
    }

    /// Records the bytes appended since `start` as request `id`'s.
    fn end_segment(&mut self, id: u64, start: usize) {
        let p = self.pending.get(&id);
        self.segments.push_back(Segment {
            id,
            start,
            end: self.out.len(),
            fds: p.is_some_and(|p| p.fds),
        });
        if let Some(p) = p
            && p.takes_slot()
        {
            if p.fds {
                self.fds_on_wire = Some(id);
            }
            self.inband.push_back(id);
        }
    }

    /// Whether an in-band request with descriptors is on the wire without its reply (answered,
    /// abandoned before any byte went out, or the session ended: it has left `inband`).
    fn fds_busy(&self) -> bool {
        self.fds_on_wire.is_some_and(|id| self.inband.contains(&id))
    }

    /// Removes a request's entry together with its deadline, so no stale deadline stays
    /// armed.
    fn take_pending(&mut self, id: u64) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        if let Some(at) = p.deadline {
            self.deadlines.remove(&(at, id));
        }
        Some(p)
    }

    /// Drops a request's state. Unwritten bytes are removed from the wire buffer; a request
    /// already (partly) written is tombstoned and its remaining bytes still go out. Returns the
    /// outcome it would resolve with.
    fn forget(&mut self, id: u64, why: Failure) -> Outcome {
        let Some(p) = self.take_pending(id) else {
            return Outcome::NotSent(why);
        };
        if p.queued.is_some() {
            // Left in `queue` for `admit` to skip: removing it here would cost a scan per
            // cancelled request. The stale ids go in bulk, so the queue stays O(waiting).
            self.queued -= 1;
            if self.queued == 0 {
                self.queue.clear();
            } else if self.queue.len() > 2 * self.queued + 32 {
                let pending = &self.pending;
                self.queue
                    .retain(|id| pending.get(id).is_some_and(|p| p.queued.is_some()));
            }
            return Outcome::NotSent(why);
        }
        if p.written == Written::Nothing {
            self.cut_segment(id);
            self.inband.retain(|&q| q != id);
            return Outcome::NotSent(why);
        }
        if p.expect_reply {
            self.tombstones.insert(id);
            self.tombstone_order.push_back(id);
            if self.tombstone_order.len() > MAX_TOMBSTONES
                && let Some(old) = self.tombstone_order.pop_front()
            {
                self.tombstones.remove(&old);
            }
        }
        if p.quiet.is_some() {
            // It may never answer (that is how it succeeds): no later reply would free its
            // slot, so it goes now; a late error is still known by its tombstone.
            self.inband.retain(|&q| q != id);
            self.start_front_grace();
        }
        Outcome::Unknown(why)
    }

    fn shut(&mut self, reason: CloseReason) {
        debug_assert_ne!(self.state, State::Closed, "closed twice");
        let why = reason.failure();
        let mut ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.purpose == Purpose::User)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        for id in ids {
            let p = self.pending.remove(&id).expect("listed");
            let outcome = if p.written == Written::Nothing {
                Outcome::NotSent(why)
            } else if p.quiet.is_some()
                && p.written == Written::All
                && reason == CloseReason::PeerClosed
            {
                // The peer went away without a word after it: a guest powering off.
                Outcome::Sent
            } else {
                Outcome::Unknown(why)
            };
            self.complete(id, outcome);
        }
        self.pending.clear();
        self.queue.clear();
        self.queued = 0;
        self.inband.clear();
        self.deadlines.clear();
        self.tombstones.clear();
        self.tombstone_order.clear();
        self.out.clear();
        self.out_pos = 0;
        self.segments.clear();
        self.framer.reset();
        self.syncing = None;
        self.handshake_deadline = None;
        self.state = State::Closed;
        // Callers check first: a connection closes once, and says so once.
        self.outputs.push_back(Output::Closed(reason));
    }
}

/// The deepest bracket nesting in JSON text (brackets inside strings do not count) and its
/// number of tokens as QEMU's lexer counts them: each bracket, comma and colon, each string,
/// each number or keyword.
fn shape(json: &[u8]) -> (usize, usize) {
    let (mut depth, mut max, mut tokens) = (0usize, 0usize, 0usize);
    let (mut in_str, mut esc, mut in_scalar) = (false, false, false);
    for &b in json {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        let scalar = !matches!(
            b,
            b'"' | b'{' | b'[' | b'}' | b']' | b',' | b':' | b' ' | b'\t' | b'\n' | b'\r'
        );
        if scalar {
            // A number or keyword is one token however long.
            tokens += usize::from(!in_scalar);
            in_scalar = true;
            continue;
        }
        in_scalar = false;
        match b {
            b'"' => {
                in_str = true;
                tokens += 1;
            }
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
                tokens += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                tokens += 1;
            }
            b',' | b':' => tokens += 1,
            _ => {}
        }
    }
    (max, tokens)
}
