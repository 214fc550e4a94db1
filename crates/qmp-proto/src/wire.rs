//! Wire types: what QEMU sends and how requests are written.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

/// A JSON value kept as raw text, sliced out of the message it arrived in.
///
/// Deserialise it into your own type with [`RawJson::deserialize`]; the bytes are parsed once,
/// straight into that type, with no intermediate `serde_json::Value`.
#[derive(Clone)]
pub struct RawJson {
    text: String,
    range: Range<usize>,
}

impl RawJson {
    pub(crate) fn new(text: String, range: Range<usize>) -> Self {
        debug_assert!(text.get(range.clone()).is_some());
        Self { text, range }
    }

    /// Builds one from JSON text, checking that it is one valid JSON value.
    ///
    /// # Errors
    /// When `text` is not exactly one JSON value.
    pub fn from_string(text: String) -> Result<Self, serde_json::Error> {
        let trimmed = {
            let raw: &RawValue = serde_json::from_str(&text)?;
            let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
            start..start + raw.get().len()
        };
        Ok(Self::new(text, trimmed))
    }

    /// `null`: what a command sent without expecting a reply ([`crate::Outcome::Sent`])
    /// returns, so that it deserialises into `()` or `Option<T>`.
    pub fn null() -> Self {
        Self::new("null".to_owned(), 0..4)
    }

    /// The raw JSON text.
    pub fn get(&self) -> &str {
        &self.text[self.range.clone()]
    }

    /// Deserialises the value into `T`.
    ///
    /// # Errors
    /// When the JSON does not match `T`.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.get())
    }

    /// A `serde_json` raw value holding a copy of the text.
    pub fn to_raw_value(&self) -> Box<RawValue> {
        RawValue::from_string(self.get().to_owned()).expect("RawJson always holds valid JSON")
    }

    /// The text as an owned string (without copying when the value is the whole message).
    pub fn into_string(mut self) -> String {
        if self.range.start == 0 && self.range.end == self.text.len() {
            self.text
        } else {
            self.text.truncate(self.range.end);
            self.text.split_off(self.range.start)
        }
    }
}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawJson({})", self.get())
    }
}

impl fmt::Display for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for RawJson {}

impl Serialize for RawJson {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(self.get()).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

/// The greeting a QMP server sends first: `{"QMP": {"version": ..., "capabilities": [...]}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Greeting {
    /// The server's version, shaped like the `query-version` reply.
    pub version: VersionInfo,
    /// Capabilities the server offers (unordered; unknown names are kept).
    pub capabilities: Vec<String>,
}

impl Greeting {
    /// A greeting with the given version and capabilities.
    pub fn new(version: VersionInfo, capabilities: Vec<String>) -> Self {
        Self {
            version,
            capabilities,
        }
    }

    /// Whether the server offers capability `name`.
    pub fn offers(&self, name: &str) -> bool {
        self.capabilities.iter().any(|c| c == name)
    }
}

/// QEMU's version as in the greeting and `query-version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VersionInfo {
    /// The numeric version.
    pub qemu: VersionTriple,
    /// The distributor's package string (may be empty).
    #[serde(default)]
    pub package: String,
}

impl VersionInfo {
    /// A version with an empty package string.
    pub fn new(major: u32, minor: u32, micro: u32) -> Self {
        Self {
            qemu: VersionTriple {
                major,
                minor,
                micro,
            },
            package: String::new(),
        }
    }
}

impl fmt::Display for VersionInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let VersionTriple {
            major,
            minor,
            micro,
        } = self.qemu;
        write!(f, "{major}.{minor}.{micro}")?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package)?;
        }
        Ok(())
    }
}

/// `major.minor.micro`. A micro of 50 marks a development tree, 90 and above a release candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Event {
    /// The event name, such as `STOP` or `JOB_STATUS_CHANGE`.
    pub name: String,
    /// The `data` member, kept raw; `None` when absent.
    pub data: Option<RawJson>,
    /// The host wall-clock time QEMU stamped it with.
    pub timestamp: Timestamp,
}

impl Event {
    /// Deserialises `data` into `T`, treating a missing `data` as JSON `null`.
    ///
    /// # Errors
    /// When the data does not match `T`.
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        match &self.data {
            Some(raw) => raw.deserialize(),
            None => serde_json::from_str("null"),
        }
    }
}

/// An event timestamp. Both fields are -1 when QEMU could not read the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Default for Timestamp {
    fn default() -> Self {
        Self {
            seconds: -1,
            microseconds: -1,
        }
    }
}

/// The error a command failed with: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{class}: {desc}")]
#[non_exhaustive]
pub struct CommandError {
    /// The error class. Most errors are `GenericError`.
    pub class: ErrorClass,
    /// A human-readable description. Do not parse it.
    pub desc: String,
}

impl CommandError {
    /// QEMU's answer to a command it does not have.
    pub fn not_found(name: &str) -> Self {
        Self::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    }

    /// An error of the given class and description.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self {
            class,
            desc: desc.into(),
        }
    }
}

/// The `class` of a QMP error: an open set, with the classes QEMU defines as variants.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// `GenericError`: nearly every error.
    GenericError,
    /// `CommandNotFound`: unknown command, or not allowed in the current mode.
    CommandNotFound,
    /// `DeviceNotActive`.
    DeviceNotActive,
    /// `DeviceNotFound`.
    DeviceNotFound,
    /// `KVMMissingCap`.
    KvmMissingCap,
    /// Any other class name, kept as sent.
    Other(String),
}

impl ErrorClass {
    /// The class name as it appears on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Self::GenericError => "GenericError",
            Self::CommandNotFound => "CommandNotFound",
            Self::DeviceNotActive => "DeviceNotActive",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::KvmMissingCap => "KVMMissingCap",
            Self::Other(s) => s,
        }
    }
}

impl From<&str> for ErrorClass {
    fn from(s: &str) -> Self {
        match s {
            "GenericError" => Self::GenericError,
            "CommandNotFound" => Self::CommandNotFound,
            "DeviceNotActive" => Self::DeviceNotActive,
            "DeviceNotFound" => Self::DeviceNotFound,
            "KVMMissingCap" => Self::KvmMissingCap,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorClass {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorClass {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s: Cow<'de, str> = Deserialize::deserialize(d)?;
        Ok(Self::from(&*s))
    }
}

/// A message as QEMU (or a QMP client) sends it, before interpretation.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "QMP", borrow, default, deserialize_with = "present")]
    qmp: Option<&'a RawValue>,
    #[serde(rename = "return", borrow, default, deserialize_with = "present")]
    ret: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<CommandError>,
    #[serde(borrow, default)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(default)]
    timestamp: Option<Timestamp>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
}

/// Deserialises a member that is present, even when its value is `null`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// A reply's id as this crate reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireId {
    /// No `id` member.
    Missing,
    /// A non-negative integer id, as this crate sends.
    Number(u64),
    /// Some other JSON value, which this crate never sends.
    Foreign,
}

/// What one complete message turned out to be.
#[derive(Debug)]
pub(crate) enum Incoming {
    Greeting(Greeting),
    Return {
        id: WireId,
        value: RawJson,
    },
    Error {
        id: WireId,
        error: CommandError,
    },
    Event(Event),
    /// Valid JSON that is none of the above: the text (shortened), and what it may have been.
    Unexpected(String, Unread),
}

/// What a message that could not be read or interpreted may have been.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unread {
    /// The reply to this id of ours.
    Reply(u64),
    /// No id could be read in it, so it may have been an event.
    MaybeEvent,
    /// Neither: a greeting, a reply with an id this crate never sends, or bytes that are no
    /// message at all.
    Neither,
}

impl Unread {
    /// From the id read at either end of a message, if any.
    pub(crate) fn from_id(id: Option<u64>) -> Self {
        id.map_or(Self::MaybeEvent, Self::Reply)
    }
}

/// Why a complete value could not be read.
#[derive(Debug)]
pub(crate) struct BadMessage(pub(crate) String, pub(crate) Option<u64>);

impl BadMessage {
    /// What the parser said of `bytes`, with the id that could be read at either end of
    /// them, if any.
    fn new(bytes: &[u8], error: String) -> Self {
        Self(error, legible_id(bytes))
    }
}

/// The id of ours at the start or end of a message that cannot be read as a whole, if any.
fn legible_id(bytes: &[u8]) -> Option<u64> {
    let (head, tail) = crate::framer::id_ends(bytes);
    crate::framer::top_level_id(head, tail)
}

fn offset_of(text: &str, part: &str) -> Range<usize> {
    let start = part.as_ptr() as usize - text.as_ptr() as usize;
    start..start + part.len()
}

fn read_id(raw: Option<&RawValue>) -> WireId {
    match raw {
        None => WireId::Missing,
        Some(raw) => raw
            .get()
            .parse::<u64>()
            .map_or(WireId::Foreign, WireId::Number),
    }
}

/// The first `max` characters of `text`, for diagnostics.
pub(crate) fn excerpt(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
    }
}

/// Interprets one complete value. `ascii` MUST only be true when every byte is below 0x80.
pub(crate) fn classify(bytes: Vec<u8>, ascii: bool) -> Result<Incoming, BadMessage> {
    let text = if ascii {
        debug_assert!(bytes.is_ascii());
        // SAFETY: the framer saw no byte of 0x80 or above, and ASCII is valid UTF-8. QMP output
        // is pure ASCII, so this skips a validation pass on nearly every message.
        unsafe { String::from_utf8_unchecked(bytes) }
    } else {
        String::from_utf8(bytes)
            .map_err(|e| BadMessage::new(e.as_bytes(), format!("invalid UTF-8: {e}")))?
    };
    let parsed = if text.starts_with('{') {
        serde_json::from_str::<Envelope<'_>>(&text)
    } else {
        // An array would otherwise be accepted as a struct written as a sequence.
        Err(serde::de::Error::custom("QMP messages are objects"))
    };
    let env = match parsed {
        Ok(env) => env,
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            // Valid JSON of the wrong shape (not an object, a member of the wrong type...): an
            // id at either end makes it a reply, as for invalid JSON.
            return match serde_json::from_str::<serde::de::IgnoredAny>(&text) {
                Ok(_) => {
                    let unread = Unread::from_id(legible_id(text.as_bytes()));
                    Ok(Incoming::Unexpected(excerpt(&text, 200), unread))
                }
                Err(e) => Err(BadMessage::new(text.as_bytes(), e.to_string())),
            };
        }
        Err(e) => return Err(BadMessage::new(text.as_bytes(), e.to_string())),
    };
    if let Some(raw) = env.qmp {
        return serde_json::from_str::<Greeting>(raw.get())
            .map(Incoming::Greeting)
            .or_else(|_| Ok(Incoming::Unexpected(excerpt(&text, 200), Unread::Neither)));
    }
    if let Some(name) = env.event {
        let name = name.into_owned();
        let data = env.data.map(|d| offset_of(&text, d.get()));
        let timestamp = env.timestamp.unwrap_or_default();
        return Ok(Incoming::Event(Event {
            name,
            data: data.map(|range| RawJson::new(text, range)),
            timestamp,
        }));
    }
    let id = read_id(env.id);
    if let Some(ret) = env.ret {
        let range = offset_of(&text, ret.get());
        return Ok(Incoming::Return {
            id,
            value: RawJson::new(text, range),
        });
    }
    if let Some(error) = env.error {
        return Ok(Incoming::Error { id, error });
    }
    let unread = match id {
        WireId::Number(id) => Unread::Reply(id),
        WireId::Missing => Unread::MaybeEvent,
        WireId::Foreign => Unread::Neither,
    };
    Ok(Incoming::Unexpected(excerpt(&text, 200), unread))
}

/// Whether `name` can be written between quotes without escaping.
fn is_plain(name: &str) -> bool {
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Appends a compact request: `{"execute":NAME,"arguments":ARGS,"id":ID}`.
pub(crate) fn encode_request(
    out: &mut Vec<u8>,
    name: &str,
    arguments: Option<&str>,
    oob: bool,
    id: Option<u64>,
) {
    out.extend_from_slice(if oob {
        b"{\"exec-oob\":"
    } else {
        b"{\"execute\":"
    });
    if is_plain(name) {
        out.push(b'"');
        out.extend_from_slice(name.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, name).expect("writing a string to a Vec cannot fail");
    }
    if let Some(args) = arguments {
        out.extend_from_slice(b",\"arguments\":");
        out.extend_from_slice(args.as_bytes());
    }
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        let mut digits = [0u8; 20];
        out.extend_from_slice(format_u64(id, &mut digits));
    }
    out.push(b'}');
}

fn format_u64(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cls(s: &str) -> Incoming {
        classify(s.as_bytes().to_vec(), s.is_ascii()).expect("valid")
    }

    #[test]
    fn requests_are_compact() {
        let mut out = Vec::new();
        encode_request(&mut out, "query-status", None, false, Some(7));
        encode_request(
            &mut out,
            "yank",
            Some(r#"{"instances":[]}"#),
            true,
            Some(18_446_744_073_709_551_615),
        );
        encode_request(&mut out, "we\"ird", None, false, None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"execute":"query-status","id":7}{"exec-oob":"yank","arguments":{"instances":[]},"id":18446744073709551615}{"execute":"we\"ird"}"#
        );
    }

    #[test]
    fn classifies_every_shape() {
        match cls(
            r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "x"}, "capabilities": ["oob"], "future": 1}}"#,
        ) {
            Incoming::Greeting(g) => {
                assert_eq!(
                    g.version.qemu,
                    VersionTriple {
                        major: 10,
                        minor: 0,
                        micro: 2
                    }
                );
                assert_eq!(g.capabilities, vec!["oob"]);
                assert!(g.offers("oob"));
            }
            other => panic!("{other:?}"),
        }
        match cls(r#"{"return": {"status": "running"}, "id": 4}"#) {
            Incoming::Return { id, value } => {
                assert_eq!(id, WireId::Number(4));
                assert_eq!(value.get(), r#"{"status": "running"}"#);
            }
            other => panic!("{other:?}"),
        }
        match cls(r#"{"return": null}"#) {
            Incoming::Return { id, value } => {
                assert_eq!(id, WireId::Missing);
                assert_eq!(value.get(), "null");
            }
            other => panic!("{other:?}"),
        }
        match cls(r#"{"id": "x", "error": {"class": "Weird", "desc": "d\u00e9"}}"#) {
            Incoming::Error { id, error } => {
                assert_eq!(id, WireId::Foreign);
                assert_eq!(error.class, ErrorClass::Other("Weird".into()));
                assert_eq!(error.desc, "dé");
            }
            other => panic!("{other:?}"),
        }
        match cls(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#) {
            Incoming::Event(e) => {
                assert_eq!(e.name, "STOP");
                assert_eq!(e.data, None);
                assert_eq!(
                    e.timestamp,
                    Timestamp {
                        seconds: 1,
                        microseconds: 2
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        match cls(r#"{"event": "X", "data": {"a": [1]}}"#) {
            Incoming::Event(e) => {
                assert_eq!(e.data.unwrap().get(), r#"{"a": [1]}"#);
                assert_eq!(e.timestamp, Timestamp::default());
            }
            other => panic!("{other:?}"),
        }
        let unexpected = |text: &str| match cls(text) {
            Incoming::Unexpected(excerpt, unread) => {
                assert_eq!(excerpt, text);
                unread
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(unexpected(r#"{"something": 1}"#), Unread::MaybeEvent);
        assert_eq!(unexpected(r#"[1, 2]"#), Unread::MaybeEvent);
        assert_eq!(unexpected(r#"{"event": 5}"#), Unread::MaybeEvent);
        assert_eq!(
            unexpected(r#"{"event": "STOP", "timestamp": 1}"#),
            Unread::MaybeEvent
        );
        // A member of the wrong type: the id at either end still names the request.
        assert_eq!(unexpected(r#"{"error": "no", "id": 4}"#), Unread::Reply(4));
        assert_eq!(unexpected(r#"{"id": 5, "error": 1}"#), Unread::Reply(5));
        // No member it could be: the id is read exactly, wherever it is.
        assert_eq!(unexpected(r#"{"a": 1, "id": 6, "b": 2}"#), Unread::Reply(6));
        assert_eq!(unexpected(r#"{"a": 1, "id": "x"}"#), Unread::Neither);
        assert_eq!(unexpected(r#"{"QMP": 5}"#), Unread::Neither);
        assert!(classify(br#"{"id": -inf, "error": {}}"#.to_vec(), true).is_err());
        assert!(classify(b"{\"return\": \"\xff\"}".to_vec(), false).is_err());
    }

    #[test]
    fn raw_json_round_trips() {
        let raw = RawJson::from_string(" [1, {\"a\": 2}] ".to_owned()).unwrap();
        assert_eq!(raw.get(), "[1, {\"a\": 2}]");
        let v: (u8, std::collections::BTreeMap<String, u8>) = raw.deserialize().unwrap();
        assert_eq!(v.0, 1);
        assert_eq!(raw.clone().into_string(), "[1, {\"a\": 2}]");
        assert_eq!(serde_json::to_string(&raw).unwrap(), "[1, {\"a\": 2}]");
    }
}
