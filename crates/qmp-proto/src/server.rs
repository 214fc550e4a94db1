//! A sans-IO QMP/QGA *server* machine, the counterpart of [`Connection`](crate::Connection).
//!
//! It exists for test doubles (the `qmp-testkit` fake QEMU): it splits the client's byte stream
//! into requests with the same framer the client uses, checks each request the way QEMU's
//! `qapi/qmp-dispatch.c` and `monitor/qmp.c` do, tracks capabilities negotiation, and encodes
//! greetings, replies and events byte for byte in QEMU's style (`", "` and `": "` separators,
//! CRLF line endings, optional pretty printing; in guest-agent mode LF endings, no greeting and
//! a 0xFF byte before a `guest-sync-delimited` reply).
//!
//! Known differences from QEMU: single-quoted strings are not accepted; a top-level scalar
//! (`42`) draws a "JSON parse error" rather than "QMP input must be a JSON object"; a value over
//! the size or depth limit draws one error, not QEMU's burst of follow-up errors for the bytes
//! after the cut; numeric ids are echoed as written (QEMU re-prints them, `-1e999` as `-inf`);
//! a 0xFF inside a string draws `stray '\u{FFFD}'` where QEMU quotes the string read so far.
//!
//! It decides nothing about which commands exist: every well-formed command in command mode is
//! handed to the caller as [`Received::Command`], and the caller answers it.

use std::collections::VecDeque;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::framer::{Frame, Framer};
use crate::wire::{CommandError, ErrorClass, Greeting, Timestamp};

/// The QEMU text for a command sent before negotiation.
const NEGOTIATION_FIRST: &str = "Expecting capabilities negotiation with 'qmp_capabilities'";

/// How a [`Server`] frames and checks the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Guest-agent mode: no greeting, no negotiation, LF line endings, `exec-oob` refused.
    pub qga: bool,
    /// Pretty-print every message over several lines (QMP `pretty=on`).
    pub pretty: bool,
    /// The capabilities offered in the greeting; `qmp_capabilities` may enable only these.
    pub capabilities: Vec<String>,
    /// Input values longer than this are refused ("JSON token size limit exceeded").
    pub max_message_size: usize,
    /// Input values nested deeper than this are refused ("JSON nesting depth limit exceeded").
    pub max_depth: usize,
}

impl ServerConfig {
    /// A QMP monitor offering `oob`, compact output, QEMU's input limits (64 MiB, depth 1024).
    pub fn qmp() -> Self {
        Self {
            qga: false,
            pretty: false,
            capabilities: vec!["oob".to_owned()],
            max_message_size: 64 << 20,
            max_depth: 1024,
        }
    }

    /// A guest agent.
    pub fn qga() -> Self {
        Self {
            qga: true,
            capabilities: Vec::new(),
            ..Self::qmp()
        }
    }

    /// Sets pretty printing.
    #[must_use]
    pub fn pretty(mut self, on: bool) -> Self {
        self.pretty = on;
        self
    }

    /// Sets the offered capabilities.
    #[must_use]
    pub fn capabilities<I: IntoIterator<Item = S>, S: Into<String>>(mut self, caps: I) -> Self {
        self.capabilities = caps.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the input size limit.
    #[must_use]
    pub fn max_message_size(mut self, n: usize) -> Self {
        self.max_message_size = n;
        self
    }

    /// Sets the input depth limit.
    #[must_use]
    pub fn max_depth(mut self, n: usize) -> Self {
        self.max_depth = n;
        self
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self::qmp()
    }
}

/// A well-formed command, as the server read it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerRequest {
    /// The command name.
    pub name: String,
    /// The `arguments` object as raw JSON text, when present.
    pub arguments: Option<String>,
    /// The `id` as raw JSON text, when present. Echo it with the reply.
    pub id: Option<String>,
    /// Sent with `exec-oob` rather than `execute`.
    pub oob: bool,
}

impl ServerRequest {
    /// A request, as the server would classify it (`arguments` and `id` are raw JSON text).
    pub fn new(name: &str, arguments: Option<String>, id: Option<String>, oob: bool) -> Self {
        Self {
            name: name.to_owned(),
            arguments,
            id,
            oob,
        }
    }

    /// The value of argument `key` as raw JSON text, if present.
    pub fn argument(&self, key: &str) -> Option<String> {
        let args = self.arguments.as_deref()?;
        let members: Members = serde_json::from_str(args).ok()?;
        members
            .0
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.get().to_owned())
    }

    /// What qemu-ga answers to `guest-sync` or `guest-sync-delimited`: its `id` argument,
    /// echoed, or the error for a missing one (the argument is required).
    ///
    /// # Errors
    /// The agent's error when there is no `id`.
    pub fn sync_answer(&self) -> Result<String, CommandError> {
        self.argument("id")
            .ok_or_else(|| CommandError::new(ErrorClass::GenericError, "Parameter 'id' is missing"))
    }
}

/// What the server made of the next piece of client input.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Received {
    /// A valid command the caller MUST answer (or deliberately leave unanswered).
    Command(ServerRequest),
    /// A valid `qmp_capabilities`: the session is now in command mode (QEMU switches before the
    /// reply is queued). The caller SHOULD answer it with `{"return": {}}`.
    Negotiated {
        /// The `id` as raw JSON text.
        id: Option<String>,
        /// The capabilities enabled.
        enable: Vec<String>,
    },
    /// Input QEMU refuses before running anything; the caller SHOULD send `error` with `id`.
    Rejected {
        /// The request id as raw JSON text, when the input had a readable one.
        id: Option<String>,
        /// The error QEMU would answer with.
        error: CommandError,
        /// The command name, when the input named one.
        name: Option<String>,
    },
}

/// An error encoding an outgoing message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A value handed in as raw JSON text is not valid JSON.
    #[error("invalid json for {what}: {reason}")]
    InvalidJson {
        /// Which part of the message.
        what: &'static str,
        /// The parser's complaint.
        reason: String,
    },
}

/// A sans-IO QMP or QGA server.
///
/// It performs no I/O and reads no clock. The caller MUST feed every byte read from the client to
/// [`handle_input`](Self::handle_input), drain [`poll_received`](Self::poll_received), answer
/// with the `send_*` methods, and write what [`poll_transmit`](Self::poll_transmit) shows,
/// reporting it with [`handle_transmitted`](Self::handle_transmitted).
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    framer: Framer,
    negotiated: bool,
    oob: bool,
    out: Vec<u8>,
    out_pos: usize,
    received: VecDeque<Received>,
}

impl Server {
    /// A server in negotiation mode (QMP) or ready (QGA).
    pub fn new(config: ServerConfig) -> Self {
        let framer = Framer::new(config.max_message_size, config.max_depth);
        Self {
            negotiated: config.qga,
            config,
            framer,
            oob: false,
            out: Vec::new(),
            out_pos: 0,
            received: VecDeque::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Whether the session is in command mode (always true for QGA).
    pub fn is_negotiated(&self) -> bool {
        self.negotiated
    }

    /// Whether the client enabled `oob`.
    pub fn is_oob_enabled(&self) -> bool {
        self.oob
    }

    /// Starts a new client session: forgets buffered input and goes back to negotiation mode
    /// (QEMU resets its parser and capabilities when a client connects).
    pub fn reset(&mut self) {
        self.framer.reset();
        self.negotiated = self.config.qga;
        self.oob = false;
        self.received.clear();
        self.out.clear();
        self.out_pos = 0;
    }

    // --- Input ---

    /// Feeds bytes read from the client.
    ///
    /// A 0xFF or 0xFE byte resets the parser wherever it comes, as in QEMU: an unfinished
    /// request before it is dropped, and the byte draws one parse error.
    pub fn handle_input(&mut self, mut data: &[u8]) {
        while let Some(at) = data.iter().position(|&b| b >= 0xFE) {
            self.framer.push(&data[..at]);
            self.drain_frames();
            if let Some(frame) = self.framer.cut_value() {
                self.receive(frame);
            }
            // QEMU's lexer treats the two bytes alike; the framer knows 0xFF.
            self.framer.push(&[0xFF]);
            self.drain_frames();
            data = &data[at + 1..];
        }
        self.framer.push(data);
        self.drain_frames();
    }

    fn drain_frames(&mut self) {
        while let Some(frame) = self.framer.next_frame() {
            self.receive(frame);
        }
    }

    fn receive(&mut self, frame: Frame) {
        let item = match frame {
            Frame::Value { range, .. } => {
                let bytes = self.framer.take(range);
                self.classify(&bytes)
            }
            Frame::Delimiter => parse_error("stray '\u{FFFD}'"),
            Frame::Garbage { .. } => parse_error("invalid input"),
            Frame::Oversized { .. } => rejected(None, "JSON token size limit exceeded"),
            Frame::TooDeep { .. } => rejected(None, "JSON nesting depth limit exceeded"),
        };
        self.received.push_back(item);
    }

    /// The next classified request, in input order.
    #[must_use]
    pub fn poll_received(&mut self) -> Option<Received> {
        self.received.pop_front()
    }

    fn classify(&mut self, bytes: &[u8]) -> Received {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return parse_error("invalid UTF-8 sequence in string");
        };
        if text.trim_start().starts_with('[') {
            return match serde_json::from_str::<&RawValue>(text) {
                Ok(_) => rejected(None, "QMP input must be a JSON object"),
                Err(_) => parse_error("expecting value"),
            };
        }
        let members = match serde_json::from_str::<Members>(text) {
            Ok(m) => m.0,
            Err(_) => return parse_error("expecting value"),
        };
        let id = members
            .iter()
            .find(|(k, _)| k == "id")
            .map(|(_, v)| v.get().to_owned());
        let mut execute = None;
        let mut exec_oob = None;
        let mut arguments = None;
        for (key, value) in &members {
            match key.as_str() {
                "execute" => match serde_json::from_str::<String>(value.get()) {
                    Ok(name) => execute = Some(name),
                    Err(_) => {
                        return rejected(id, "QMP input member 'execute' must be a string");
                    }
                },
                "exec-oob" if self.oob => match serde_json::from_str::<String>(value.get()) {
                    Ok(name) => exec_oob = Some(name),
                    Err(_) => {
                        return rejected(id, "QMP input member 'exec-oob' must be a string");
                    }
                },
                "arguments" => {
                    if !value.get().starts_with('{') {
                        return rejected(id, "QMP input member 'arguments' must be an object");
                    }
                    arguments = Some(value.get().to_owned());
                }
                "id" => {}
                other => return rejected(id, format!("QMP input member '{other}' is unexpected")),
            }
        }
        let (name, oob) = match (execute, exec_oob) {
            (Some(_), Some(_)) => {
                return rejected(id, "QMP input member 'execute' clashes with 'exec-oob'");
            }
            (Some(name), None) => (name, false),
            (None, Some(name)) => (name, true),
            (None, None) => return rejected(id, "QMP input lacks member 'execute'"),
        };
        if self.config.qga {
            return Received::Command(ServerRequest {
                name,
                arguments,
                id,
                oob,
            });
        }
        if name == "qmp_capabilities" {
            return self.negotiate(id, arguments.as_deref());
        }
        if !self.negotiated {
            return Received::Rejected {
                id,
                error: CommandError::new(ErrorClass::CommandNotFound, NEGOTIATION_FIRST),
                name: Some(name),
            };
        }
        Received::Command(ServerRequest {
            name,
            arguments,
            id,
            oob,
        })
    }

    fn negotiate(&mut self, id: Option<String>, arguments: Option<&str>) -> Received {
        let name = Some("qmp_capabilities".to_owned());
        if self.negotiated {
            return Received::Rejected {
                id,
                error: CommandError::new(
                    ErrorClass::CommandNotFound,
                    "Capabilities negotiation is already complete, command ignored",
                ),
                name,
            };
        }
        let mut enable = Vec::new();
        if let Some(args) = arguments {
            let members = match serde_json::from_str::<Members>(args) {
                Ok(m) => m.0,
                Err(_) => return parse_error("expecting value"),
            };
            for (key, value) in members {
                if key != "enable" {
                    return rejected(id, format!("Parameter '{key}' is unexpected"));
                }
                let Ok(list) = serde_json::from_str::<Vec<String>>(value.get()) else {
                    return rejected(id, "Parameter 'enable' expects array");
                };
                for cap in list {
                    if cap != "oob" {
                        return rejected(
                            id,
                            format!("Parameter 'enable' does not accept value '{cap}'"),
                        );
                    }
                    if !self.config.capabilities.contains(&cap) {
                        return rejected(id, format!("Capability {cap} not available"));
                    }
                    enable.push(cap);
                }
            }
        }
        self.negotiated = true;
        self.oob = enable.iter().any(|c| c == "oob");
        Received::Negotiated { id, enable }
    }

    // --- Output ---

    /// Queues the greeting (nothing in QGA mode). The capabilities sent are those of the
    /// greeting given, which SHOULD match [`ServerConfig::capabilities`].
    pub fn send_greeting(&mut self, greeting: &Greeting) {
        if self.config.qga {
            return;
        }
        let v = &greeting.version;
        let version = Node::Obj(vec![
            (
                "qemu".to_owned(),
                Node::Obj(vec![
                    ("micro".to_owned(), Node::Num(v.qemu.micro.into())),
                    ("minor".to_owned(), Node::Num(v.qemu.minor.into())),
                    ("major".to_owned(), Node::Num(v.qemu.major.into())),
                ]),
            ),
            ("package".to_owned(), Node::Str(v.package.clone())),
        ]);
        let caps = greeting
            .capabilities
            .iter()
            .map(|c| Node::Str(c.clone()))
            .collect();
        let msg = Node::Obj(vec![(
            "QMP".to_owned(),
            Node::Obj(vec![
                ("version".to_owned(), version),
                ("capabilities".to_owned(), Node::Arr(caps)),
            ]),
        )]);
        self.push_message(&msg);
    }

    /// Queues `{"return": VALUE, "id": ID}`; `value` and `id` are raw JSON text.
    ///
    /// # Errors
    /// When `value` or `id` is not valid JSON; nothing is queued then.
    pub fn send_return(&mut self, id: Option<&str>, value: &str) -> Result<(), EncodeError> {
        let mut members = vec![("return".to_owned(), parse_node(value, "return value")?)];
        if let Some(id) = id {
            members.push(("id".to_owned(), parse_id(id)?));
        }
        self.push_message(&Node::Obj(members));
        Ok(())
    }

    /// Queues `{"id": ID, "error": {"class": ..., "desc": ...}}`; `id` is raw JSON text.
    ///
    /// # Errors
    /// When `id` is not valid JSON; nothing is queued then.
    pub fn send_error(
        &mut self,
        id: Option<&str>,
        error: &CommandError,
    ) -> Result<(), EncodeError> {
        let mut members = Vec::new();
        if let Some(id) = id {
            members.push(("id".to_owned(), parse_id(id)?));
        }
        members.push((
            "error".to_owned(),
            Node::Obj(vec![
                (
                    "class".to_owned(),
                    Node::Str(error.class.as_str().to_owned()),
                ),
                ("desc".to_owned(), Node::Str(error.desc.clone())),
            ]),
        ));
        self.push_message(&Node::Obj(members));
        Ok(())
    }

    /// Queues `{"timestamp": {...}, "event": NAME, "data": DATA}`; `data` is raw JSON text.
    ///
    /// # Errors
    /// When `data` is not valid JSON; nothing is queued then.
    pub fn send_event(
        &mut self,
        name: &str,
        data: Option<&str>,
        timestamp: Timestamp,
    ) -> Result<(), EncodeError> {
        let mut members = vec![
            (
                "timestamp".to_owned(),
                Node::Obj(vec![
                    ("seconds".to_owned(), Node::Num(timestamp.seconds.into())),
                    (
                        "microseconds".to_owned(),
                        Node::Num(timestamp.microseconds.into()),
                    ),
                ]),
            ),
            ("event".to_owned(), Node::Str(name.to_owned())),
        ];
        if let Some(data) = data {
            members.push(("data".to_owned(), parse_node(data, "event data")?));
        }
        self.push_message(&Node::Obj(members));
        Ok(())
    }

    /// Queues any JSON value as one message, re-encoded in QEMU's style.
    ///
    /// # Errors
    /// When `json` is not valid JSON; nothing is queued then.
    pub fn send_json(&mut self, json: &str) -> Result<(), EncodeError> {
        let node = parse_node(json, "message")?;
        self.push_message(&node);
        Ok(())
    }

    /// Queues the guest agent's 0xFF sync delimiter (sent before a `guest-sync-delimited` reply).
    pub fn send_delimiter(&mut self) {
        self.out.push(0xFF);
    }

    /// Queues bytes exactly as given (for malformed output).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// The bytes to write next, if any (a peek).
    #[must_use]
    pub fn poll_transmit(&self) -> Option<&[u8]> {
        (self.out_pos < self.out.len()).then(|| &self.out[self.out_pos..])
    }

    /// Reports that `n` bytes of [`poll_transmit`](Self::poll_transmit) were written.
    pub fn handle_transmitted(&mut self, n: usize) {
        self.out_pos = (self.out_pos + n).min(self.out.len());
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
    }

    /// Takes all unwritten bytes at once.
    pub fn take_transmit(&mut self) -> Vec<u8> {
        let rest = self.out.split_off(self.out_pos);
        self.out.clear();
        self.out_pos = 0;
        rest
    }

    fn push_message(&mut self, node: &Node) {
        let mut text = String::new();
        node.write(&mut text, self.config.pretty, 0);
        text.push('\n');
        if self.config.qga {
            self.out.extend_from_slice(text.as_bytes());
        } else {
            for b in text.bytes() {
                if b == b'\n' {
                    self.out.push(b'\r');
                }
                self.out.push(b);
            }
        }
    }
}

fn rejected(id: Option<String>, desc: impl Into<String>) -> Received {
    Received::Rejected {
        id,
        error: CommandError::new(ErrorClass::GenericError, desc),
        name: None,
    }
}

fn parse_error(what: &str) -> Received {
    rejected(None, format!("JSON parse error, {what}"))
}

/// An id is re-encoded like QEMU does, except numbers, which are echoed as written (QEMU
/// would print `1e400` as `inf`, which is not JSON).
fn parse_id(text: &str) -> Result<Node, EncodeError> {
    let trimmed = text.trim();
    if trimmed.starts_with(|c: char| c == '-' || c.is_ascii_digit())
        && serde_json::from_str::<&RawValue>(trimmed).is_ok()
    {
        // Numbers are echoed digit for digit (serde would turn 2^64 into a float).
        return Ok(Node::Raw(trimmed.to_owned()));
    }
    parse_node(text, "id").or_else(|e| match serde_json::from_str::<&RawValue>(text) {
        Ok(raw) => Ok(Node::Raw(raw.get().to_owned())),
        Err(_) => Err(e),
    })
}

fn parse_node(text: &str, what: &'static str) -> Result<Node, EncodeError> {
    serde_json::from_str(text).map_err(|e| EncodeError::InvalidJson {
        what,
        reason: e.to_string(),
    })
}

/// The members of a JSON object in input order, values kept raw.
struct Members(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A JSON value that keeps member order, for re-encoding in QEMU's style.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Null,
    Bool(bool),
    Num(serde_json::Number),
    Str(String),
    Arr(Vec<Self>),
    Obj(Vec<(String, Self)>),
    /// Valid JSON text written as is.
    Raw(String),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
                Ok(Node::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
                Ok(Node::Num(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
                Ok(Node::Num(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
                serde_json::Number::from_f64(v)
                    .map(Node::Num)
                    .ok_or_else(|| E::custom("non-finite number"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
                Ok(Node::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(Node::Arr(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry()? {
                    out.push((k, v));
                }
                Ok(Node::Obj(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl Node {
    /// Writes QEMU's `qobject_to_json(_pretty)` form: `", "`/`": "` separators compact, or
    /// four-space indentation with empty containers opened and closed on separate lines.
    fn write(&self, out: &mut String, pretty: bool, level: usize) {
        match self {
            Self::Null => out.push_str("null"),
            Self::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Self::Num(n) => out.push_str(&n.to_string()),
            Self::Raw(text) => out.push_str(text),
            Self::Str(s) => write_string(out, s),
            Self::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    separator(out, pretty, level + 1, i == 0);
                    item.write(out, pretty, level + 1);
                }
                close(out, pretty, level, ']');
            }
            Self::Obj(members) => {
                out.push('{');
                for (i, (key, value)) in members.iter().enumerate() {
                    separator(out, pretty, level + 1, i == 0);
                    write_string(out, key);
                    out.push_str(": ");
                    value.write(out, pretty, level + 1);
                }
                close(out, pretty, level, '}');
            }
        }
    }
}

fn separator(out: &mut String, pretty: bool, level: usize, first: bool) {
    if !first {
        out.push(',');
        if !pretty {
            out.push(' ');
        }
    }
    if pretty {
        indent(out, level);
    }
}

fn close(out: &mut String, pretty: bool, level: usize, c: char) {
    if pretty {
        indent(out, level);
    }
    out.push(c);
}

fn indent(out: &mut String, level: usize) {
    out.push('\n');
    for _ in 0..level {
        out.push_str("    ");
    }
}

/// A JSON string in QEMU's ASCII-only form: non-ASCII and control characters as `\uXXXX`.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='\u{7e}' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::VersionInfo;

    fn received(server: &mut Server, input: &[u8]) -> Vec<Received> {
        server.handle_input(input);
        std::iter::from_fn(|| server.poll_received()).collect()
    }

    fn generic(id: Option<&str>, desc: &str) -> Received {
        Received::Rejected {
            id: id.map(str::to_owned),
            error: CommandError::new(ErrorClass::GenericError, desc),
            name: None,
        }
    }

    fn command(name: &str, arguments: Option<&str>, id: Option<&str>, oob: bool) -> Received {
        Received::Command(ServerRequest {
            name: name.to_owned(),
            arguments: arguments.map(str::to_owned),
            id: id.map(str::to_owned),
            oob,
        })
    }

    fn negotiated() -> Server {
        let mut s = Server::new(ServerConfig::qmp());
        let r = received(
            &mut s,
            br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":0}"#,
        );
        assert_eq!(
            r,
            vec![Received::Negotiated {
                id: Some("0".to_owned()),
                enable: vec!["oob".to_owned()]
            }]
        );
        s
    }

    #[test]
    fn greeting_matches_qemu_bytes() {
        let mut s = Server::new(ServerConfig::qmp());
        let mut version = VersionInfo::new(10, 0, 2);
        version.package = "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1".to_owned();
        s.send_greeting(&Greeting::new(version, vec!["oob".to_owned()]));
        assert_eq!(
            s.take_transmit(),
            b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"Debian 1:10.0.2+ds-2+deb13u1~bpo12+1\"}, \"capabilities\": [\"oob\"]}}\r\n"
        );
        assert_eq!(s.poll_transmit(), None);
    }

    #[test]
    fn negotiation_mode_refuses_other_commands() {
        let mut s = Server::new(ServerConfig::qmp());
        let r = received(&mut s, br#"{"execute":"query-version","id":{"a" :1}}"#);
        assert_eq!(
            r,
            vec![Received::Rejected {
                id: Some(r#"{"a" :1}"#.to_owned()),
                error: CommandError::new(ErrorClass::CommandNotFound, NEGOTIATION_FIRST),
                name: Some("query-version".to_owned()),
            }]
        );
        assert!(!s.is_negotiated());
        if let Received::Rejected { id, error, .. } = &r[0] {
            s.send_error(id.as_deref(), error).unwrap();
        }
        assert_eq!(
            s.take_transmit(),
            b"{\"id\": {\"a\": 1}, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\r\n"
        );
    }

    #[test]
    fn negotiation_checks_capabilities() {
        let mut s = Server::new(ServerConfig::qmp().capabilities(Vec::<String>::new()));
        let r = received(
            &mut s,
            br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":0}{"execute":"qmp_capabilities","arguments":{"x":1},"id":1}{"execute":"qmp_capabilities","id":2}{"execute":"qmp_capabilities","id":3}"#,
        );
        assert_eq!(
            r,
            vec![
                generic(Some("0"), "Capability oob not available"),
                generic(Some("1"), "Parameter 'x' is unexpected"),
                Received::Negotiated {
                    id: Some("2".to_owned()),
                    enable: vec![]
                },
                Received::Rejected {
                    id: Some("3".to_owned()),
                    error: CommandError::new(
                        ErrorClass::CommandNotFound,
                        "Capabilities negotiation is already complete, command ignored"
                    ),
                    name: Some("qmp_capabilities".to_owned()),
                },
            ]
        );
        assert!(s.is_negotiated());
        assert!(!s.is_oob_enabled());
    }

    #[test]
    fn dispatch_rules() {
        let mut s = negotiated();
        assert!(s.is_oob_enabled());
        let r = received(
            &mut s,
            b"[1]\n{\"execute\":\"nope\",\"id\":2}{\"execute\":\"q\",\"id\":3,\"x\":1}{\"execute\":\"q\",\"arguments\":[],\"id\":4}{\"execute\":1,\"id\":8}{\"id\":9}{\"execute\":\"x\",\"exec-oob\":\"y\",\"id\":10}{\"exec-oob\":\"query-yank\",\"id\":\"o\"}{\"execute\":\"q\",\"arguments\":{\"a\":[1]}}",
        );
        assert_eq!(
            r,
            vec![
                generic(None, "QMP input must be a JSON object"),
                command("nope", None, Some("2"), false),
                generic(Some("3"), "QMP input member 'x' is unexpected"),
                generic(Some("4"), "QMP input member 'arguments' must be an object"),
                generic(Some("8"), "QMP input member 'execute' must be a string"),
                generic(Some("9"), "QMP input lacks member 'execute'"),
                generic(
                    Some("10"),
                    "QMP input member 'execute' clashes with 'exec-oob'"
                ),
                command("query-yank", None, Some("\"o\""), true),
                command("q", Some(r#"{"a":[1]}"#), None, false),
            ]
        );
    }

    #[test]
    fn exec_oob_needs_oob_enabled() {
        let mut s = Server::new(ServerConfig::qmp());
        let _ = received(&mut s, br#"{"execute":"qmp_capabilities"}"#);
        let r = received(&mut s, br#"{"exec-oob":"query-yank","id":1}"#);
        assert_eq!(
            r,
            vec![generic(
                Some("1"),
                "QMP input member 'exec-oob' is unexpected"
            )]
        );
    }

    #[test]
    fn parse_errors_have_no_id() {
        let mut s = negotiated();
        let r = received(&mut s, b"\xff{\"execute\":}\n42\n");
        assert_eq!(
            r,
            vec![
                generic(None, "JSON parse error, stray '\u{FFFD}'"),
                generic(None, "JSON parse error, expecting value"),
                generic(None, "JSON parse error, invalid input"),
            ]
        );
    }

    #[test]
    fn a_0xff_byte_drops_an_unfinished_request_as_qemu_does() {
        // Checked against qemu-storage-daemon and qemu-ga 10.0.2: an unfinished value and then
        // 0xFF (or 0xFE) draw one error, each further 0xFF one more, garbage and then 0xFF two;
        // the next request is answered.
        for (input, errors) in [
            (
                &b"{\"execute\": \"q\", \"arguments\": {\"a\": [1, \xff"[..],
                1,
            ),
            (b"[\xff", 1),
            (b"\xff", 1),
            (b"\xff\xff", 2),
            (b"{\"a\": \xff\xff", 2),
            (b"{\"a\": [1, \xfe", 1),
            (b"\xfe", 1),
            (b"abc\xff", 2),
        ] {
            for split in [false, true] {
                let mut s = negotiated();
                let mut r = Vec::new();
                if split {
                    for b in input {
                        r.extend(received(&mut s, &[*b]));
                    }
                } else {
                    r.extend(received(&mut s, input));
                }
                r.extend(received(&mut s, br#"{"execute":"ok","id":1}"#));
                let garbage = usize::from(input.starts_with(b"abc"));
                let mut expected = vec![generic(None, "JSON parse error, invalid input"); garbage];
                expected.extend(vec![
                    generic(None, "JSON parse error, stray '\u{FFFD}'");
                    errors - garbage
                ]);
                expected.push(command("ok", None, Some("1"), false));
                assert_eq!(r, expected, "{input:?}, split: {split}");
            }
        }
    }

    #[test]
    fn a_0xff_byte_ends_a_value_over_the_limits_that_would_never_end() {
        let mut s = Server::new(ServerConfig::qmp().max_depth(4).max_message_size(64));
        let _ = received(&mut s, br#"{"execute":"qmp_capabilities"}"#);
        let mut input = Vec::from(&b"{\"id\": \""[..]);
        input.extend_from_slice("x".repeat(100).as_bytes());
        input.push(0xFF);
        input.extend_from_slice(b"[[[[[[\xff");
        input.extend_from_slice(br#"{"execute":"ok"}"#);
        let r = received(&mut s, &input);
        let mut bytewise = Server::new(ServerConfig::qmp().max_depth(4).max_message_size(64));
        let _ = received(&mut bytewise, br#"{"execute":"qmp_capabilities"}"#);
        let mut split = Vec::new();
        for b in &input {
            split.extend(received(&mut bytewise, &[*b]));
        }
        assert_eq!(split, r);
        assert_eq!(
            r,
            vec![
                generic(None, "JSON token size limit exceeded"),
                generic(None, "JSON parse error, stray '\u{FFFD}'"),
                generic(None, "JSON nesting depth limit exceeded"),
                generic(None, "JSON parse error, stray '\u{FFFD}'"),
                command("ok", None, None, false),
            ]
        );
    }

    #[test]
    fn limits_are_reported_and_reading_resumes() {
        let mut s = Server::new(ServerConfig::qmp().max_depth(4).max_message_size(64));
        let _ = received(&mut s, br#"{"execute":"qmp_capabilities"}"#);
        let mut input = Vec::new();
        input.extend_from_slice(br#"{"id":[[[[[1]]]]]}"#);
        input.extend_from_slice(format!("[\"{}\"]", "x".repeat(100)).as_bytes());
        input.extend_from_slice(br#"{"execute":"ok"}"#);
        let r = received(&mut s, &input);
        assert_eq!(
            r,
            vec![
                generic(None, "JSON nesting depth limit exceeded"),
                generic(None, "JSON token size limit exceeded"),
                command("ok", None, None, false),
            ]
        );
    }

    #[test]
    fn split_input_gives_the_same_requests() {
        let input = br#"{"execute":"a","id":1}  {"execute":"b","arguments":{"s":"}{"},"id":2}"#;
        let mut whole = negotiated();
        let expected = received(&mut whole, input);
        assert_eq!(expected.len(), 2);
        let mut bytewise = negotiated();
        let mut got = Vec::new();
        for b in input {
            got.extend(received(&mut bytewise, &[*b]));
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn replies_and_events_are_encoded_like_qemu() {
        let mut s = negotiated();
        s.send_return(Some("0"), "{}").unwrap();
        s.send_return(Some("-1"), r#"{"a":[1,2],"s":"é\n"}"#)
            .unwrap();
        s.send_return(None, "[]").unwrap();
        s.send_error(
            Some("2"),
            &CommandError::new(
                ErrorClass::CommandNotFound,
                "The command nope has not been found",
            ),
        )
        .unwrap();
        s.send_event(
            "STOP",
            None,
            Timestamp {
                seconds: 1,
                microseconds: 2,
            },
        )
        .unwrap();
        s.send_event("X", Some(r#"{"k":true}"#), Timestamp::default())
            .unwrap();
        let out = String::from_utf8(s.take_transmit()).unwrap();
        assert_eq!(
            out,
            concat!(
                "{\"return\": {}, \"id\": 0}\r\n",
                "{\"return\": {\"a\": [1, 2], \"s\": \"\\u00E9\\n\"}, \"id\": -1}\r\n",
                "{\"return\": []}\r\n",
                "{\"id\": 2, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}\r\n",
                "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n",
                "{\"timestamp\": {\"seconds\": -1, \"microseconds\": -1}, \"event\": \"X\", \"data\": {\"k\": true}}\r\n",
            )
        );
        assert_eq!(
            s.send_return(Some("1"), "{"),
            Err(EncodeError::InvalidJson {
                what: "return value",
                reason: "EOF while parsing an object at line 1 column 1".to_owned()
            })
        );
        assert_eq!(s.poll_transmit(), None);
    }

    #[test]
    fn ids_serde_cannot_hold_are_echoed_raw() {
        let mut s = negotiated();
        let r = received(&mut s, br#"{"execute":"q","id":1e400}"#);
        assert_eq!(r, vec![command("q", None, Some("1e400"), false)]);
        s.send_return(Some("1e400"), "{}").unwrap();
        s.send_return(Some(" 18446744073709551616 "), "{}").unwrap();
        assert_eq!(
            s.take_transmit(),
            b"{\"return\": {}, \"id\": 1e400}\r\n{\"return\": {}, \"id\": 18446744073709551616}\r\n"
        );
        assert!(s.send_return(Some("-inf"), "{}").is_err());
    }

    #[test]
    fn pretty_output_matches_qemu() {
        let mut s = Server::new(ServerConfig::qmp().pretty(true));
        s.send_return(Some("0"), "{}").unwrap();
        s.send_return(Some("1"), r#"[{"a":1,"b":{"c":[]}}]"#)
            .unwrap();
        let out = String::from_utf8(s.take_transmit()).unwrap();
        assert_eq!(
            out,
            concat!(
                "{\r\n    \"return\": {\r\n    },\r\n    \"id\": 0\r\n}\r\n",
                "{\r\n    \"return\": [\r\n        {\r\n            \"a\": 1,\r\n            \"b\": {\r\n                \"c\": [\r\n                ]\r\n            }\r\n        }\r\n    ],\r\n    \"id\": 1\r\n}\r\n",
            )
        );
    }

    #[test]
    fn qga_mode() {
        let mut s = Server::new(ServerConfig::qga());
        s.send_greeting(&Greeting::new(VersionInfo::new(10, 0, 2), vec![]));
        assert_eq!(s.poll_transmit(), None);
        let r = received(
            &mut s,
            b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":5}}{\"execute\":\"qmp_capabilities\",\"id\":3}{\"exec-oob\":\"guest-ping\"}",
        );
        assert_eq!(
            r,
            vec![
                generic(None, "JSON parse error, stray '\u{FFFD}'"),
                command("guest-sync-delimited", Some(r#"{"id":5}"#), None, false),
                command("qmp_capabilities", None, Some("3"), false),
                generic(None, "QMP input member 'exec-oob' is unexpected"),
            ]
        );
        if let Received::Command(req) = &r[1] {
            assert_eq!(req.argument("id").as_deref(), Some("5"));
            assert_eq!(req.argument("missing"), None);
        }
        s.send_delimiter();
        s.send_return(None, "5").unwrap();
        s.send_return(Some("1"), "{}").unwrap();
        assert_eq!(
            s.take_transmit(),
            b"\xff{\"return\": 5}\n{\"return\": {}, \"id\": 1}\n"
        );
    }

    #[test]
    fn transmit_is_incremental() {
        let mut s = Server::new(ServerConfig::qga());
        s.send_raw(b"abc");
        assert_eq!(s.poll_transmit(), Some(&b"abc"[..]));
        s.handle_transmitted(1);
        assert_eq!(s.poll_transmit(), Some(&b"bc"[..]));
        s.handle_transmitted(5);
        assert_eq!(s.poll_transmit(), None);
    }
}
