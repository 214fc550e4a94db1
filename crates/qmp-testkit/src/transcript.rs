//! Exact-byte transcripts of QMP/QGA sessions: record from real QEMU, replay to a client.
//!
//! # File format
//!
//! JSON lines (UTF-8, one JSON object per line, LF separated):
//!
//! 1. A header: `{"transcript":1,"program":"qemu-storage-daemon","version":"10.0.2","note":"..."}`.
//!    `transcript` is the format version (1).
//! 2. Then one line per chunk, in the order the recorder read them:
//!    - `{"from":"client","text":"..."}` or `{"from":"server","text":"..."}` when the chunk is
//!      valid UTF-8 (JSON string escapes keep CR, LF and every other byte exact);
//!    - `{"from":"server","hex":"ff7b22..."}` otherwise (lowercase hex of the raw bytes, such as
//!      the guest agent's 0xFF sync byte);
//!    - a client chunk that carried file descriptors (SCM_RIGHTS) adds `"fds":N`.
//!
//! Chunk boundaries are those of the recorder's reads; they are informative only. What is
//! exact is the byte sequence in each direction and the order between directions (a server
//! chunk after a client chunk was read after it).
//!
//! [`Recorder`] proxies between a client and a real QEMU socket and records every chunk;
//! [`Replay`] serves a transcript's server bytes to a client and checks that the client sends
//! the recorded client bytes, in the recorded order.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{self, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, poll};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, ReturnFlags, Shutdown, recvmsg, shutdown,
};
use serde::{Deserialize, Serialize};

/// Who wrote a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The QMP client.
    Client,
    /// QEMU.
    Server,
}

/// The first line of a transcript.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Format version; 1.
    pub transcript: u32,
    /// The program recorded, such as `qemu-storage-daemon`.
    pub program: String,
    /// Its version, such as `10.0.2`.
    pub version: String,
    /// What the session shows.
    pub note: String,
}

impl Header {
    /// A version-1 header.
    pub fn new(program: &str, version: &str, note: &str) -> Self {
        Self {
            transcript: 1,
            program: program.to_owned(),
            version: version.to_owned(),
            note: note.to_owned(),
        }
    }
}

/// One chunk of bytes as read by the recorder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Its direction.
    pub from: Direction,
    /// The exact bytes.
    pub bytes: Vec<u8>,
    /// How many file descriptors came with it (client chunks only).
    pub fds: usize,
}

#[derive(Serialize, Deserialize)]
struct Line {
    from: Direction,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    hex: Option<String>,
    #[serde(skip_serializing_if = "is_zero", default)]
    fds: usize,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// An error reading a transcript or replaying one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TranscriptError {
    /// The file could not be read or written.
    #[error("transcript i/o: {0}")]
    Io(#[from] io::Error),
    /// A line is not valid.
    #[error("transcript line {line}: {reason}")]
    Format {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// During replay the client sent other bytes than the transcript's.
    #[error("client chunk {chunk}: expected {expected:?}, got {got:?}")]
    Mismatch {
        /// Index of the client chunk in the transcript.
        chunk: usize,
        /// The recorded bytes (lossy UTF-8).
        expected: String,
        /// What the client sent (lossy UTF-8).
        got: String,
    },
    /// During replay the client stopped sending before the transcript's end.
    #[error("client chunk {chunk}: client sent {got} of {expected} bytes, then {why}")]
    Short {
        /// Index of the client chunk in the transcript.
        chunk: usize,
        /// Bytes expected in that chunk.
        expected: usize,
        /// Bytes received.
        got: usize,
        /// EOF or timeout.
        why: String,
    },
    /// During replay the client passed another number of file descriptors than recorded.
    #[error(
        "client chunk {chunk}: {expected} file descriptors recorded up to here, {got} received"
    )]
    Fds {
        /// Index of the client chunk in the transcript.
        chunk: usize,
        /// Descriptors the recorded client chunks carried, up to this one.
        expected: usize,
        /// Descriptors received by then.
        got: usize,
    },
    /// During replay the client sent bytes after its last recorded chunk.
    #[error("the client sent more than the transcript: {extra:?}")]
    Extra {
        /// The bytes beyond the transcript (lossy UTF-8).
        extra: String,
    },
}

/// A whole transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transcript {
    /// The header line.
    pub header: Header,
    /// The chunks in order.
    pub chunks: Vec<Chunk>,
}

impl Transcript {
    /// Parses the JSON-lines text.
    ///
    /// # Errors
    /// When a line is not valid JSON of the documented shape.
    pub fn parse(text: &str) -> Result<Self, TranscriptError> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let (_, first) = lines.next().ok_or(TranscriptError::Format {
            line: 1,
            reason: "empty transcript".to_owned(),
        })?;
        let header: Header = serde_json::from_str(first).map_err(|e| TranscriptError::Format {
            line: 1,
            reason: e.to_string(),
        })?;
        if header.transcript != 1 {
            return Err(TranscriptError::Format {
                line: 1,
                reason: format!("unknown transcript version {}", header.transcript),
            });
        }
        let mut chunks = Vec::new();
        for (i, l) in lines {
            let bad = |reason: String| TranscriptError::Format {
                line: i + 1,
                reason,
            };
            let line: Line = serde_json::from_str(l).map_err(|e| bad(e.to_string()))?;
            let bytes = match (line.text, line.hex) {
                (Some(t), None) => t.into_bytes(),
                (None, Some(h)) => decode_hex(&h).ok_or_else(|| bad("invalid hex".to_owned()))?,
                _ => return Err(bad("exactly one of text and hex is required".to_owned())),
            };
            chunks.push(Chunk {
                from: line.from,
                bytes,
                fds: line.fds,
            });
        }
        Ok(Self { header, chunks })
    }

    /// Reads and parses a file.
    ///
    /// # Errors
    /// When the file cannot be read or parsed.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TranscriptError> {
        Self::parse(&std::fs::read_to_string(path)?)
    }

    /// The JSON-lines text.
    pub fn to_jsonl(&self) -> String {
        let mut out = serde_json::to_string(&self.header).expect("header serialises");
        out.push('\n');
        for c in &self.chunks {
            let (text, hex) = match std::str::from_utf8(&c.bytes) {
                Ok(t) => (Some(t.to_owned()), None),
                Err(_) => (None, Some(encode_hex(&c.bytes))),
            };
            let line = Line {
                from: c.from,
                text,
                hex,
                fds: c.fds,
            };
            out.push_str(&serde_json::to_string(&line).expect("line serialises"));
            out.push('\n');
        }
        out
    }

    /// Writes the file.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), TranscriptError> {
        std::fs::write(path, self.to_jsonl())?;
        Ok(())
    }

    /// Every byte one side sent, concatenated.
    pub fn bytes_from(&self, from: Direction) -> Vec<u8> {
        self.chunks
            .iter()
            .filter(|c| c.from == from)
            .flat_map(|c| c.bytes.iter().copied())
            .collect()
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() & 1 == 1 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Reads a chunk and the fds that came with it.
fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = recvmsg(
        fd,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        crate::sys::RECV,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights.map(crate::sys::cloexec));
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::other(
            "more file descriptors in one message than the 16 this recorder takes",
        ));
    }
    Ok((msg.bytes, fds))
}

/// Records the bytes between a client and a real QEMU socket.
///
/// [`Recorder::connect`] connects to QEMU and returns the client's end of a socketpair; a
/// thread forwards every chunk (with file descriptors) both ways and logs it.
#[derive(Debug)]
pub struct Recorder {
    chunks: Arc<Mutex<Vec<Chunk>>>,
    thread: Option<JoinHandle<()>>,
    stop: UnixStream,
}

impl Recorder {
    /// Connects to the QEMU socket at `upstream`; returns the recorder and the stream the
    /// client MUST use instead of connecting itself.
    ///
    /// # Errors
    /// When the connection or the socketpair fails.
    pub fn connect(upstream: &Path) -> io::Result<(Self, UnixStream)> {
        let server = UnixStream::connect(upstream)?;
        let (client, ours) = UnixStream::pair()?;
        let (stop, stop_rx) = UnixStream::pair()?;
        let chunks = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&chunks);
        let thread = std::thread::Builder::new()
            .name("qmp-recorder".to_owned())
            .spawn(move || proxy(&ours, &server, &stop_rx, &log))?;
        Ok((
            Self {
                chunks,
                thread: Some(thread),
                stop,
            },
            client,
        ))
    }

    /// The chunks so far.
    pub fn chunks(&self) -> Vec<Chunk> {
        self.chunks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Stops the proxy (closing both sides) and returns the transcript.
    pub fn finish(mut self, header: Header) -> Transcript {
        let _ = self.stop.write_all(&[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Transcript {
            header,
            chunks: self.chunks(),
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.stop.write_all(&[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bytes read from one side, waiting to be written to the other; `fds` go with their first
/// byte.
struct Outgoing {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
    sent: usize,
}

/// Writes what `to` takes of `queue` now (descriptors with the first byte of their chunk).
/// `Ok(true)` once the queue is empty.
fn flush(to: BorrowedFd<'_>, queue: &mut VecDeque<Outgoing>) -> io::Result<bool> {
    while let Some(out) = queue.front_mut() {
        let data = &out.bytes[out.sent..];
        let sent = if out.sent == 0 && !out.fds.is_empty() {
            let borrowed: Vec<BorrowedFd<'_>> = out.fds.iter().map(AsFd::as_fd).collect();
            crate::fake::send_with_fds(to, data, &borrowed)
        } else {
            rustix::net::send(to, data, crate::sys::SEND).map_err(io::Error::from)
        };
        match sent {
            Ok(n) => {
                out.sent += n;
                if out.sent == out.bytes.len() {
                    queue.pop_front();
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Forwards both ways until both sides have finished or `stop` is readable. It never blocks
/// on a write: what a side does not take yet waits in memory (as QEMU keeps output a client
/// has not read), so a client that writes all its requests before reading a reply cannot
/// wedge it, and a stop is seen at once.
fn proxy(client: &UnixStream, server: &UnixStream, stop: &UnixStream, log: &Mutex<Vec<Chunk>>) {
    if client.set_nonblocking(true).is_err() || server.set_nonblocking(true).is_err() {
        return;
    }
    let ends = [client, server];
    // Per direction (0: client to server, 1: server to client): still reading, what waits to
    // be written, and whether the write side was shut down.
    let mut reading = [true, true];
    let mut queues: [VecDeque<Outgoing>; 2] = [VecDeque::new(), VecDeque::new()];
    let mut shut = [false, false];
    let mut buf = vec![0u8; 65536];
    while !(shut[0] && shut[1]) {
        let mut fds = vec![PollFd::new(stop, PollFlags::IN)];
        for (i, end) in ends.into_iter().enumerate() {
            // `end` is read for direction i and written for the other one.
            let mut flags = PollFlags::empty();
            if reading[i] {
                flags |= PollFlags::IN;
            }
            if !queues[1 - i].is_empty() {
                flags |= PollFlags::OUT;
            }
            fds.push(PollFd::new(end, flags));
        }
        if poll(&mut fds, None).is_err() || !fds[0].revents().is_empty() {
            return;
        }
        let ready: Vec<bool> = fds[1..].iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        for i in 0..2 {
            let (from, to) = (ends[i], ends[1 - i]);
            if reading[i] && ready[i] {
                match recv(from.as_fd(), &mut buf) {
                    Ok((0, _)) => reading[i] = false,
                    Ok((n, passed)) => {
                        log.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(Chunk {
                                from: if i == 0 {
                                    Direction::Client
                                } else {
                                    Direction::Server
                                },
                                bytes: buf[..n].to_vec(),
                                fds: passed.len(),
                            });
                        queues[i].push_back(Outgoing {
                            bytes: buf[..n].to_vec(),
                            fds: passed,
                            sent: 0,
                        });
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    Err(_) => reading[i] = false,
                }
            }
            if shut[i] {
                continue;
            }
            // A side that cannot be written to any more gets nothing more.
            let drained = flush(to.as_fd(), &mut queues[i]).unwrap_or_else(|_| {
                queues[i].clear();
                true
            });
            if drained && !reading[i] {
                let _ = shutdown(to, Shutdown::Write);
                shut[i] = true;
            }
        }
    }
}

/// Serves a transcript to one client over a socketpair and checks what the client sends.
///
/// Server chunks are written in order; before each one, every client chunk recorded before it
/// must have been received (byte for byte, with as many file descriptors; chunk boundaries may
/// differ). After the last chunk the replay shuts down its side for writing and reads until
/// the client closes: any further byte is an error. Close the client's stream before
/// [`Replay::finish`], which otherwise waits for the read timeout.
#[derive(Debug)]
pub struct Replay {
    thread: Option<JoinHandle<Result<(), TranscriptError>>>,
}

impl Replay {
    /// Starts serving; returns the replay and the client's stream. `timeout` bounds each wait
    /// to read from the client and each wait to write to it (a client that stops reading is
    /// then treated as gone).
    ///
    /// # Errors
    /// When the socketpair cannot be created.
    pub fn start(transcript: Transcript, timeout: Duration) -> io::Result<(Self, UnixStream)> {
        let (client, ours) = UnixStream::pair()?;
        ours.set_read_timeout(Some(timeout))?;
        ours.set_write_timeout(Some(timeout))?;
        let thread = std::thread::Builder::new()
            .name("qmp-replay".to_owned())
            .spawn(move || replay(&transcript, ours))?;
        Ok((
            Self {
                thread: Some(thread),
            },
            client,
        ))
    }

    /// Waits for the replay to end and reports whether the client matched the transcript.
    ///
    /// # Errors
    /// The first mismatch or shortfall.
    pub fn finish(mut self) -> Result<(), TranscriptError> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(TranscriptError::Io(io::Error::other(
                "replay thread panicked",
            ))),
            None => Ok(()),
        }
    }
}

fn replay(t: &Transcript, mut stream: UnixStream) -> Result<(), TranscriptError> {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 65536];
    // Descriptors received, and those the client chunks so far were recorded with.
    let (mut fds_got, mut fds_expected) = (0, 0);
    let mut gone = false;
    for (index, chunk) in t.chunks.iter().enumerate() {
        match chunk.from {
            Direction::Server => {
                // Once the client went away, its next recorded chunk (if any) comes up short.
                gone = gone || stream.write_all(&chunk.bytes).is_err();
            }
            Direction::Client => {
                fds_expected += chunk.fds;
                while pending.len() < chunk.bytes.len() {
                    match recv(stream.as_fd(), &mut buf) {
                        Ok((0, _)) => {
                            return Err(short(index, chunk, &pending, "EOF"));
                        }
                        Ok((n, fds)) => {
                            pending.extend_from_slice(&buf[..n]);
                            fds_got += fds.len();
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            return Err(short(index, chunk, &pending, "nothing more in time"));
                        }
                        Err(e) => return Err(short(index, chunk, &pending, &e.to_string())),
                    }
                }
                let rest = pending.split_off(chunk.bytes.len());
                if pending != chunk.bytes {
                    return Err(TranscriptError::Mismatch {
                        chunk: index,
                        expected: String::from_utf8_lossy(&chunk.bytes).into_owned(),
                        got: String::from_utf8_lossy(&pending).into_owned(),
                    });
                }
                // Descriptors come with the first byte they were sent with: once no byte of a
                // later chunk has been read, exactly this chunk's and earlier ones' are here.
                if fds_got < fds_expected || (rest.is_empty() && fds_got != fds_expected) {
                    return Err(TranscriptError::Fds {
                        chunk: index,
                        expected: fds_expected,
                        got: fds_got,
                    });
                }
                pending = rest;
            }
        }
    }
    // Past the transcript's end: the client must send nothing more before it closes.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    loop {
        match recv(stream.as_fd(), &mut buf) {
            Ok((0, _)) => break,
            Ok((n, fds)) => {
                pending.extend_from_slice(&buf[..n]);
                fds_got += fds.len();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A client that stays connected without sending more is fine; so is a reset.
            Err(_) => break,
        }
    }
    if !pending.is_empty() {
        return Err(TranscriptError::Extra {
            extra: String::from_utf8_lossy(&pending).into_owned(),
        });
    }
    if fds_got != fds_expected {
        return Err(TranscriptError::Fds {
            chunk: t.chunks.len(),
            expected: fds_expected,
            got: fds_got,
        });
    }
    Ok(())
}

fn short(index: usize, chunk: &Chunk, pending: &[u8], why: &str) -> TranscriptError {
    TranscriptError::Short {
        chunk: index,
        expected: chunk.bytes.len(),
        got: pending.len(),
        why: why.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn jsonl_round_trip_keeps_exact_bytes() {
        let t = Transcript {
            header: Header::new("qemu-ga", "10.0.2", "sync"),
            chunks: vec![
                Chunk {
                    from: Direction::Client,
                    bytes: b"\xff{\"execute\":\"guest-sync-delimited\"}".to_vec(),
                    fds: 0,
                },
                Chunk {
                    from: Direction::Server,
                    bytes: b"{\"return\": {}}\r\n".to_vec(),
                    fds: 0,
                },
                Chunk {
                    from: Direction::Client,
                    bytes: b" ".to_vec(),
                    fds: 1,
                },
            ],
        };
        let text = t.to_jsonl();
        assert_eq!(
            text,
            concat!(
                "{\"transcript\":1,\"program\":\"qemu-ga\",\"version\":\"10.0.2\",\"note\":\"sync\"}\n",
                "{\"from\":\"client\",\"hex\":\"ff7b2265786563757465223a2267756573742d73796e632d64656c696d69746564227d\"}\n",
                "{\"from\":\"server\",\"text\":\"{\\\"return\\\": {}}\\r\\n\"}\n",
                "{\"from\":\"client\",\"text\":\" \",\"fds\":1}\n",
            )
        );
        assert_eq!(Transcript::parse(&text).unwrap(), t);
        assert_eq!(t.bytes_from(Direction::Server), b"{\"return\": {}}\r\n");
    }

    #[test]
    fn bad_lines_are_reported() {
        let err = Transcript::parse(
            "{\"transcript\":1,\"program\":\"p\",\"version\":\"v\",\"note\":\"\"}\n{\"from\":\"client\",\"hex\":\"f\"}\n",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "transcript line 2: invalid hex");
        let err = Transcript::parse("").unwrap_err();
        assert_eq!(err.to_string(), "transcript line 1: empty transcript");
    }

    #[test]
    fn replay_checks_client_bytes() {
        let t = Transcript {
            header: Header::new("p", "v", ""),
            chunks: vec![
                Chunk {
                    from: Direction::Server,
                    bytes: b"hello\n".to_vec(),
                    fds: 0,
                },
                Chunk {
                    from: Direction::Client,
                    bytes: b"abc".to_vec(),
                    fds: 0,
                },
                Chunk {
                    from: Direction::Server,
                    bytes: b"bye\n".to_vec(),
                    fds: 0,
                },
            ],
        };
        let (replay, mut s) = Replay::start(t.clone(), Duration::from_secs(10)).unwrap();
        let mut got = [0u8; 6];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello\n");
        s.write_all(b"a").unwrap();
        s.write_all(b"bc").unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"bye\n");
        drop(s);
        replay.finish().unwrap();

        let (replay, mut s) = Replay::start(t, Duration::from_secs(10)).unwrap();
        s.write_all(b"abd").unwrap();
        let err = replay.finish().unwrap_err();
        assert_eq!(
            err.to_string(),
            "client chunk 1: expected \"abc\", got \"abd\""
        );
    }

    #[test]
    fn a_client_that_stops_reading_fails_the_replay_instead_of_hanging_it() {
        let t = Transcript {
            header: Header::new("test", "0", "a reply larger than the socket holds"),
            chunks: vec![
                Chunk {
                    from: Direction::Server,
                    bytes: vec![b' '; 4 << 20],
                    fds: 0,
                },
                Chunk {
                    from: Direction::Client,
                    bytes: b"x".to_vec(),
                    fds: 0,
                },
            ],
        };
        let (report, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (replay, s) = Replay::start(t, Duration::from_millis(200)).unwrap();
            // Neither reads nor writes, and stays open.
            let result = replay.finish().map_err(|e| e.to_string());
            drop(s);
            let _ = report.send(result);
        });
        let result = outcome
            .recv_timeout(Duration::from_secs(20))
            .expect("the replay gives up");
        assert_eq!(
            result,
            Err("client chunk 1: client sent 0 of 1 bytes, then nothing more in time".to_owned())
        );
    }

    /// A client chunk `bytes` recorded with `fds` descriptors, answered with `ok\n`.
    fn one_exchange(bytes: &[u8], fds: usize) -> Transcript {
        Transcript {
            header: Header::new("test", "0", "fds"),
            chunks: vec![
                Chunk {
                    from: Direction::Client,
                    bytes: bytes.to_vec(),
                    fds,
                },
                Chunk {
                    from: Direction::Server,
                    bytes: b"ok\n".to_vec(),
                    fds: 0,
                },
            ],
        }
    }

    /// Sends `bytes` with `fds` attached, as the recorder's proxy does.
    fn send_with_fds(s: &UnixStream, bytes: &[u8], fds: Vec<OwnedFd>) {
        let mut queue = VecDeque::from([Outgoing {
            bytes: bytes.to_vec(),
            fds,
            sent: 0,
        }]);
        assert!(flush(s.as_fd(), &mut queue).unwrap(), "all sent");
    }

    fn dev_null() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn replay_checks_the_descriptors_the_client_passes() {
        let (replay, s) = Replay::start(one_exchange(b"ab", 1), Duration::from_secs(10)).unwrap();
        send_with_fds(&s, b"ab", vec![dev_null()]);
        drop(s);
        replay.finish().unwrap();

        let (replay, mut s) =
            Replay::start(one_exchange(b"ab", 1), Duration::from_secs(10)).unwrap();
        s.write_all(b"ab").unwrap();
        assert_eq!(
            replay.finish().unwrap_err().to_string(),
            "client chunk 0: 1 file descriptors recorded up to here, 0 received"
        );

        let (replay, s) = Replay::start(one_exchange(b"ab", 0), Duration::from_secs(10)).unwrap();
        send_with_fds(&s, b"ab", vec![dev_null(), dev_null()]);
        assert_eq!(
            replay.finish().unwrap_err().to_string(),
            "client chunk 0: 0 file descriptors recorded up to here, 2 received"
        );
    }

    #[test]
    fn replay_reports_bytes_beyond_the_transcript() {
        let (replay, mut s) =
            Replay::start(one_exchange(b"ab", 0), Duration::from_secs(10)).unwrap();
        s.write_all(b"abc").unwrap();
        drop(s);
        assert_eq!(
            replay.finish().unwrap_err().to_string(),
            "the client sent more than the transcript: \"c\""
        );
        // Sent after the last reply came: still read, and still an error.
        let (replay, mut s) =
            Replay::start(one_exchange(b"ab", 0), Duration::from_secs(10)).unwrap();
        s.write_all(b"ab").unwrap();
        let mut reply = [0u8; 3];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"ok\n");
        s.write_all(b"more").unwrap();
        drop(s);
        assert_eq!(
            replay.finish().unwrap_err().to_string(),
            "the client sent more than the transcript: \"more\""
        );
    }
}
