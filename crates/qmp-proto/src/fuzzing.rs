//! Fuzz harnesses, shared by the cargo-fuzz targets in `fuzz/` and by the stable tests that
//! replay the committed seeds. Each takes raw bytes and panics when an invariant breaks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::framer::{Frame, Framer};
use crate::{Command, Config, Connection, Outcome, Output, Received, Server, ServerConfig};

/// The origin of the virtual clock the harnesses drive; only differences from it matter.
#[allow(
    clippy::disallowed_methods,
    reason = "any instant serves as virtual time zero"
)]
fn virtual_t0() -> Instant {
    Instant::now()
}

/// A byte reader that yields zeros once the input runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

/// `input` cut into pieces whose sizes come from `sizes` (cycled, each byte `s` meaning
/// `s + 1` bytes); no sizes means one piece.
fn pieces<'a>(input: &'a [u8], sizes: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = input;
    let mut i = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let step = sizes
            .get(i % sizes.len().max(1))
            .map_or(rest.len(), |&s| usize::from(s) + 1);
        i += 1;
        let (piece, tail) = rest.split_at(step.min(rest.len()));
        rest = tail;
        Some(piece)
    })
}

/// Frames of `input` fed in pieces whose sizes come from `sizes` (cycled).
fn frames_of(input: &[u8], sizes: &[u8], max_size: usize, max_depth: usize) -> Vec<String> {
    let mut f = Framer::new(max_size, max_depth);
    let mut out = Vec::new();
    for piece in pieces(input, sizes) {
        f.push(piece);
        while let Some(fr) = f.next_frame() {
            out.push(match fr {
                Frame::Value { range, ascii } => {
                    let v = f.take(range);
                    assert!(v.len() <= max_size, "value over the size limit");
                    // The flag may be conservative, never optimistic: it licenses skipping
                    // UTF-8 validation.
                    assert!(!ascii || v.is_ascii(), "ascii flag set on non-ASCII bytes");
                    format!("V{}", String::from_utf8_lossy(&v))
                }
                other => format!("{other:?}"),
            });
        }
        // What stays buffered is at most an unfinished value within the limit plus the read
        // that just arrived: never the whole stream.
        assert!(
            f.buffered() <= max_size + piece.len(),
            "buffer grew to {} with a {max_size}-byte limit and a {}-byte read",
            f.buffered(),
            piece.len()
        );
    }
    out.push(format!("partial {}", f.partial_len()));
    out
}

/// The framer gives the same frames whatever the read boundaries, never keeps a value over
/// its size limit, and never panics.
pub fn framing(data: &[u8]) {
    let mut b = Bytes(data);
    let max_size = 16 + usize::from(b.byte()) * 4;
    let max_depth = 1 + usize::from(b.byte() % 32);
    let nsizes = usize::from(b.byte() % 8);
    let sizes = b.take(nsizes).to_vec();
    let input = b.0;
    let whole = frames_of(input, &[], max_size, max_depth);
    let split = frames_of(input, &sizes, max_size, max_depth);
    let bytewise = frames_of(input, &[0], max_size, max_depth);
    assert_eq!(whole, split, "split feeding changed the frames");
    assert_eq!(whole, bytewise, "byte-by-byte feeding changed the frames");
}

fn outputs_of(config: &Config, greet: bool, input: &[u8], sizes: &[u8]) -> Vec<String> {
    let t0 = virtual_t0();
    let mut c = Connection::new(t0, config.clone());
    let mut log = Vec::new();
    // Requests are sent and written before any fuzz input, and only on a ready session with
    // free slots: a reply can only answer a request the driver already wrote, and the driver
    // writes between reads, so sending mid-input would make outputs depend on read sizes.
    if greet {
        c.handle_input(t0, b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n{\"return\": {}, \"id\": 0}\r\n");
    }
    if let crate::Mode::Qga { sync_seed } = config.mode {
        while let Some(n) = c.poll_transmit().map(<[u8]>::len) {
            c.handle_transmitted(t0, n);
        }
        let mut sync = vec![0xFF];
        sync.extend_from_slice(format!("{{\"return\": {sync_seed}}}\n").as_bytes());
        c.handle_input(t0, &sync);
    }
    if c.is_ready() {
        for _ in 0..4 {
            let _ = c.send(t0, Command::new("q"));
        }
    }
    let flush = |c: &mut Connection, log: &mut Vec<String>| {
        while let Some(n) = c.poll_transmit().map(<[u8]>::len) {
            c.handle_transmitted(t0, n);
        }
        log.extend(std::iter::from_fn(|| c.poll_output()).map(|o| format!("{o:?}")));
    };
    flush(&mut c, &mut log);
    for piece in pieces(input, sizes) {
        c.handle_input(t0, piece);
        flush(&mut c, &mut log);
    }
    c.handle_eof(t0);
    while let Some(o) = c.poll_output() {
        log.push(format!("{o:?}"));
    }
    assert!(c.is_closed());
    assert_eq!(c.pending(), 0, "EOF must resolve everything");
    log.push(format!("{:?}", c.stats()));
    log
}

/// The whole client machine, fed arbitrary bytes in arbitrary pieces, gives the same outputs
/// as when fed in one piece, and resolves everything at EOF.
pub fn bytes_to_outputs(data: &[u8]) {
    let mut b = Bytes(data);
    let mode = b.byte();
    let nsizes = usize::from(b.byte() % 8);
    let sizes = b.take(nsizes).to_vec();
    let config = match mode % 3 {
        0 => Config::default().max_message_size(512).max_depth(8),
        1 => Config::qga(u64::from(mode))
            .max_message_size(512)
            .max_depth(8),
        _ => Config::default(),
    };
    let greet = mode % 3 != 1 && mode & 0x80 != 0;
    let whole = outputs_of(&config, greet, b.0, &[]);
    let split = outputs_of(&config, greet, b.0, &sizes);
    assert_eq!(whole, split, "read boundaries changed the outputs");
}

/// Builds a JSON value from bytes (strings full of brackets, quotes and escapes included).
fn value_from(b: &mut Bytes<'_>, depth: usize) -> serde_json::Value {
    match b.byte() % 7 {
        0 => serde_json::Value::Null,
        1 => serde_json::Value::Bool(b.byte() & 1 == 1),
        2 => serde_json::Value::from(i64::from(b.byte() as i8) * 1_000_003),
        3 | 4 => {
            let n = usize::from(b.byte() % 16);
            let raw = b.take(n);
            serde_json::Value::from(String::from_utf8_lossy(raw).into_owned())
        }
        5 if depth < 8 => {
            let n = usize::from(b.byte() % 5);
            serde_json::Value::Array((0..n).map(|_| value_from(b, depth + 1)).collect())
        }
        _ if depth < 8 => {
            let n = usize::from(b.byte() % 5);
            let mut m = serde_json::Map::new();
            for i in 0..n {
                let key = format!("{i}{}", String::from_utf8_lossy(b.take(3)));
                m.insert(key, value_from(b, depth + 1));
            }
            serde_json::Value::Object(m)
        }
        _ => serde_json::Value::Null,
    }
}

/// A value encoded as a reply (compact, spaced or pretty), split at arbitrary points, parses
/// back to exactly that value.
pub fn roundtrip(data: &[u8]) {
    let mut b = Bytes(data);
    let style = b.byte();
    let value = value_from(&mut b, 0);
    let nsizes = usize::from(b.byte() % 8);
    let sizes = b.take(nsizes).to_vec();
    let t0 = virtual_t0();
    let mut c = Connection::new(t0, Config::default());
    c.handle_input(t0, b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": []}}\n{\"return\": {}, \"id\": 0}\n");
    let id = c.send(t0, Command::new("x")).expect("ready");
    while let Some(n) = c.poll_transmit().map(<[u8]>::len) {
        c.handle_transmitted(t0, n);
    }
    while c.poll_output().is_some() {}
    let msg = serde_json::json!({ "return": value, "id": id.get() });
    let text = match style % 3 {
        0 => serde_json::to_string(&msg).expect("serialisable"),
        1 => format!(
            "{}\r\n",
            serde_json::to_string_pretty(&msg).expect("serialisable")
        ),
        _ => format!("{}\n", serde_json::to_string(&msg).expect("serialisable")),
    };
    for piece in pieces(text.as_bytes(), &sizes) {
        c.handle_input(t0, piece);
    }
    match c.poll_output() {
        Some(Output::Completed {
            id: got,
            outcome: Outcome::Replied(Ok(raw)),
        }) => {
            assert_eq!(got, id);
            let back: serde_json::Value = raw.deserialize().expect("valid JSON");
            assert_eq!(back, value, "round trip changed the value");
        }
        other => panic!("expected the reply, got {other:?}"),
    }
}

/// Checks that written bytes are whole requests, one after another (QGA sync markers
/// allowed), with at most the last one unfinished.
fn check_wire(wire: &[u8]) {
    let text: Vec<u8> = wire.iter().copied().filter(|&b| b != 0xFF).collect();
    let mut stream = serde_json::Deserializer::from_slice(&text).into_iter::<serde_json::Value>();
    for value in stream.by_ref() {
        match value {
            Ok(v) => assert!(
                v.get("execute")
                    .or_else(|| v.get("exec-oob"))
                    .is_some_and(|n| n.is_string()),
                "not a request on the wire: {v}"
            ),
            Err(e) if e.is_eof() => return,
            Err(e) => panic!(
                "corrupt bytes on the wire ({e}): {}",
                String::from_utf8_lossy(&text)
            ),
        }
    }
}

/// A random sequence of operations: ids stay unique, each request resolves at most once (and
/// exactly once unless abandoned), nothing stays pending after EOF, the in-flight cap and
/// the local queue's limit hold.
pub fn op_sequence(data: &[u8]) {
    let mut b = Bytes(data);
    let t0 = virtual_t0();
    let mut now = t0;
    let qga = b.byte() & 1 == 1;
    let config = if qga {
        Config::qga(9).command_timeout(Some(Duration::from_secs(3)))
    } else {
        Config::default()
            .max_in_flight(2)
            .max_queued(16)
            .max_message_size(256)
    };
    let mut c = Connection::new(t0, config);
    let mut issued: BTreeMap<u64, &'static str> = BTreeMap::new();
    let replies: [&[u8]; 8] = [
        b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n",
        b"{\"return\": {}, \"id\": 0}\r\n",
        b"{\"return\": {}, \"id\": 1}\r\n{\"return\": 2, \"id\": 2}\r\n",
        b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error\"}}\r\n",
        b"\xff{\"return\": 9}\n",
        b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n",
        b"{\"return\": {\"x\": [1, 2, 3]}, \"id\": 3}{\"return\": 4, \"id\": 4}",
        b"{\"return\": \"partial",
    ];
    // Everything "written" so far, to check no byte is lost, duplicated or reordered.
    let mut wire = Vec::new();
    let drain = |c: &mut Connection, issued: &mut BTreeMap<u64, &'static str>| {
        while let Some(o) = c.poll_output() {
            if let Output::Completed { id, .. } = o {
                let state = issued
                    .get_mut(&id.get())
                    .expect("completed an id never issued");
                assert_eq!(
                    *state,
                    "open",
                    "request {} resolved twice or after abandon",
                    id.get()
                );
                *state = "done";
            }
        }
    };
    for _ in 0..64 {
        if b.0.is_empty() {
            break;
        }
        match b.byte() % 9 {
            0 | 1 => {
                let cmd = match b.byte() % 6 {
                    0 => Command::new("a"),
                    1 => Command::new("b").oob(),
                    2 => Command::new("c")
                        .timeout(Some(Duration::from_millis(u64::from(b.byte()) * 10))),
                    3 => Command::new("d").no_reply(),
                    // Answers only on failure: by name on the guest agent, by mark anywhere.
                    4 => Command::new("guest-shutdown"),
                    _ => Command::new("e")
                        .reply_optional(Duration::from_millis(u64::from(b.byte()) * 10)),
                };
                if let Ok(id) = c.send(now, cmd) {
                    assert!(issued.insert(id.get(), "open").is_none(), "id reused");
                }
            }
            2 => {
                if let Some(bytes) = c.poll_transmit() {
                    let part = usize::from(b.byte()) % (bytes.len() + 1);
                    wire.extend_from_slice(&bytes[..part]);
                    c.handle_transmitted(now, part);
                    check_wire(&wire);
                }
            }
            3 => {
                let r = replies[usize::from(b.byte() % 8)];
                c.handle_input(now, r);
            }
            4 => {
                let n = usize::from(b.byte() % 32);
                let raw = b.take(n).to_vec();
                c.handle_input(now, &raw);
            }
            5 => {
                now += Duration::from_millis(u64::from(b.byte()) * 20);
                c.handle_timeout(now);
            }
            6 => {
                let target = u64::from(b.byte() % 8) + 1;
                if let Some(state) = issued.get_mut(&target)
                    && c.abandon(crate::RequestId::from_raw(target))
                {
                    assert_eq!(*state, "open", "abandoned a resolved request");
                    *state = "abandoned";
                }
            }
            7 => c.resync(now),
            _ => {
                if b.byte() % 8 == 0 {
                    c.handle_eof(now);
                }
            }
        }
        drain(&mut c, &mut issued);
        assert!(
            c.in_flight() <= c.config().max_in_flight,
            "in-flight cap exceeded"
        );
        assert!(c.queued() <= c.config().max_queued, "queue limit exceeded");
        let open = issued.values().filter(|s| **s == "open").count();
        assert!(
            c.pending() <= open + 1,
            "pending holds only open requests (and a sync)"
        );
    }
    c.handle_eof(now);
    drain(&mut c, &mut issued);
    assert_eq!(c.pending(), 0);
    for (id, state) in &issued {
        assert_ne!(*state, "open", "request {id} never resolved");
    }
}

/// The server machine (the test kit's fake QEMU) on arbitrary client input, as a QMP monitor
/// or a guest agent with small limits: it never panics, and the requests it reads do not
/// depend on how the input was cut into reads (0xFF and 0xFE resets included).
pub fn server_input(data: &[u8]) {
    let mut b = Bytes(data);
    let mode = b.byte();
    let nsizes = usize::from(b.byte() % 8);
    let sizes = b.take(nsizes).to_vec();
    let input = b.0;
    let read = |chunks: &mut dyn Iterator<Item = &[u8]>| -> Vec<Received> {
        let config = if mode & 1 == 0 {
            ServerConfig::qmp()
        } else {
            ServerConfig::qga()
        };
        let mut server = Server::new(
            config
                .max_message_size(16 + usize::from(mode >> 4) * 8)
                .max_depth(1 + usize::from((mode >> 1) & 7)),
        );
        let mut got = Vec::new();
        for chunk in chunks {
            server.handle_input(chunk);
            got.extend(std::iter::from_fn(|| server.poll_received()));
        }
        got
    };
    let whole = read(&mut std::iter::once(input));
    let split = read(&mut pieces(input, &sizes));
    assert_eq!(whole, split, "the cut into reads changed what was read");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harnesses_accept_simple_inputs() {
        for input in [
            &b""[..],
            b"\x05\x03\x02{\"a\":[1]}\r\n\xffjunk",
            b"\x80\x01\x02{\"return\": 1, \"id\": 1}",
        ] {
            framing(input);
            bytes_to_outputs(input);
            roundtrip(input);
            op_sequence(input);
        }
    }
}
