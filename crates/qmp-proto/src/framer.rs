//! Splits a byte stream into top-level JSON values.
//!
//! The framer never parses JSON. It tracks string state (quotes and backslash escapes) and
//! bracket depth, which is enough to find where each top-level value ends, whatever the line
//! structure: CRLF or LF endings, pretty-printed multi-line values, several values per read or
//! one value over many reads all give the same frames. The validation itself is left to serde,
//! which runs once per complete value.
//!
//! Scanning works on 64-byte blocks: one bit mask per interesting byte class (quote, backslash,
//! opening and closing bracket), the in-string mask by a prefix XOR over the unescaped quotes,
//! and the depth by population counts. A block that cannot end the value nor exceed the depth
//! limit costs a handful of instructions. On x86_64 the masks come from SSE2 (part of the
//! baseline ABI); elsewhere from a portable loop with the same results.
//!
//! Between values, the framer skips whitespace (space, tab, CR, LF), reports each 0xFF byte as
//! a [`Frame::Delimiter`] (the guest agent's sync marker) and reports any other run of bytes up
//! to the next `{`, `[`, LF or 0xFF as [`Frame::Garbage`]. A value larger than the size limit or
//! nested deeper than the depth limit is dropped while it streams in (memory stays bounded) and
//! reported once its end is found; framing then resumes after it.

use std::ops::Range;

/// One unit found in the input stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A complete top-level value (object or array), as a range of the framer's buffer (see [`Framer::take`]).
    ///
    /// The range stays valid until the next call that mutates the framer.
    Value(Range<usize>),
    /// A 0xFF byte between values.
    Delimiter,
    /// Bytes between values that cannot start one; `len` bytes were skipped.
    Garbage { len: usize },
    /// A value over the size limit was skipped; `len` is its full length.
    Oversized { len: usize },
    /// A value nested deeper than the depth limit was skipped.
    TooDeep { len: usize },
}

/// Where the framer is between calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Between values.
    Idle,
    /// Inside a run of garbage of the given length so far.
    Garbage(usize),
    /// Inside a value that starts at `buf[0]`; `buf[..scanned]` has been scanned.
    Value,
    /// Inside a value that is being dropped; `len` bytes of it were seen so far.
    Skipping { len: usize, oversized: bool },
}

/// Incremental scan state inside one value. Exact after every byte.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ScanState {
    depth: usize,
    in_string: bool,
    /// The previous byte was an unescaped backslash.
    escape: bool,
    /// The depth limit was exceeded somewhere in this value.
    too_deep: bool,
}

/// A streaming splitter of JSON values with size and depth limits.
#[derive(Debug)]
pub(crate) struct Framer {
    /// Unconsumed input. In [`Mode::Value`] the current value starts at index 0.
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already handed out and waiting to be dropped.
    consumed: usize,
    /// How many bytes of the current value (from `consumed`) were scanned.
    scanned: usize,
    mode: Mode,
    state: ScanState,
    max_size: usize,
    max_depth: usize,
}

impl Framer {
    /// A framer that drops values longer than `max_size` bytes or deeper than `max_depth`.
    pub(crate) fn new(max_size: usize, max_depth: usize) -> Self {
        Self {
            buf: Vec::new(),
            consumed: 0,
            scanned: 0,
            mode: Mode::Idle,
            state: ScanState::default(),
            max_size: max_size.max(2),
            max_depth: max_depth.max(1),
        }
    }

    /// Appends input. The caller SHOULD feed at most a few tens of KiB at a time so the buffer
    /// stays near `max_size`.
    pub(crate) fn push(&mut self, data: &[u8]) {
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Takes the bytes of a value range out as an owned vector, for a range just returned by
    /// [`Framer::next_frame`]. Avoids copying a large value when little input follows it.
    pub(crate) fn take(&mut self, range: Range<usize>) -> Vec<u8> {
        debug_assert_eq!(range.end, self.consumed);
        let tail = self.buf.len() - range.end;
        if range.start == 0 && range.len() >= tail {
            // Keep the (small) tail, hand out the (large) front without copying it.
            let rest = self.buf.split_off(range.end);
            self.consumed = 0;
            std::mem::replace(&mut self.buf, rest)
        } else {
            self.buf[range].to_vec()
        }
    }

    /// Whether bytes of an unfinished value or garbage run are pending.
    pub(crate) fn has_partial(&self) -> bool {
        match self.mode {
            Mode::Idle => false,
            Mode::Value | Mode::Skipping { .. } | Mode::Garbage(_) => true,
        }
    }

    /// Forgets all buffered input and starts again between values.
    pub(crate) fn reset(&mut self) {
        self.buf.clear();
        self.consumed = 0;
        self.scanned = 0;
        self.mode = Mode::Idle;
        self.state = ScanState::default();
    }

    /// Finds the next frame in the buffered input, or `None` when more input is needed.
    pub(crate) fn next_frame(&mut self) -> Option<Frame> {
        loop {
            match self.mode {
                Mode::Idle => {
                    let rest = &self.buf[self.consumed..];
                    let skip = rest
                        .iter()
                        .position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
                        .unwrap_or(rest.len());
                    self.consumed += skip;
                    let &first = self.buf.get(self.consumed)?;
                    match first {
                        b'{' | b'[' => {
                            // Move the value to the front so ranges and `take` are cheap.
                            self.buf.drain(..self.consumed);
                            self.consumed = 0;
                            self.scanned = 1;
                            self.state = ScanState {
                                depth: 1,
                                ..ScanState::default()
                            };
                            self.mode = Mode::Value;
                        }
                        0xFF => {
                            self.consumed += 1;
                            return Some(Frame::Delimiter);
                        }
                        _ => self.mode = Mode::Garbage(0),
                    }
                }
                Mode::Garbage(len) => {
                    let rest = &self.buf[self.consumed..];
                    match rest
                        .iter()
                        .position(|b| matches!(b, b'{' | b'[' | b'\n' | 0xFF))
                    {
                        Some(i) => {
                            let newline = rest[i] == b'\n';
                            let n = i + usize::from(newline);
                            self.consumed += n;
                            self.mode = Mode::Idle;
                            return Some(Frame::Garbage { len: len + n });
                        }
                        None => {
                            self.mode = Mode::Garbage(len + rest.len());
                            self.consumed = self.buf.len();
                            return None;
                        }
                    }
                }
                Mode::Value => {
                    let from = self.scanned;
                    let limit = self.max_size.min(self.buf.len());
                    let end = scan(&mut self.state, &self.buf[..limit], from, self.max_depth);
                    match end {
                        Some(end) => {
                            self.mode = Mode::Idle;
                            self.scanned = 0;
                            self.consumed = end;
                            if self.state.too_deep {
                                return Some(Frame::TooDeep { len: end });
                            }
                            return Some(Frame::Value(0..end));
                        }
                        None if self.buf.len() > self.max_size => {
                            // Too long: stop buffering and skip the rest as it streams in.
                            let len = self.max_size;
                            self.consumed = len;
                            self.mode = Mode::Skipping {
                                len,
                                oversized: true,
                            };
                        }
                        None => {
                            self.scanned = self.buf.len();
                            if self.state.too_deep {
                                // No need to keep the bytes: the value is already rejected.
                                let len = self.buf.len();
                                self.consumed = len;
                                self.mode = Mode::Skipping {
                                    len,
                                    oversized: false,
                                };
                            }
                            return None;
                        }
                    }
                }
                Mode::Skipping { len, oversized } => {
                    let rest_start = self.consumed;
                    let end = scan(&mut self.state, &self.buf, rest_start, self.max_depth);
                    match end {
                        Some(end) => {
                            let total = len + (end - rest_start);
                            self.consumed = end;
                            self.mode = Mode::Idle;
                            return Some(if oversized {
                                Frame::Oversized { len: total }
                            } else {
                                Frame::TooDeep { len: total }
                            });
                        }
                        None => {
                            let total = len + (self.buf.len() - rest_start);
                            self.consumed = self.buf.len();
                            self.mode = Mode::Skipping {
                                len: total,
                                oversized,
                            };
                            return None;
                        }
                    }
                }
            }
        }
    }

    /// The length of the unfinished value or garbage run at end of input, if any.
    pub(crate) fn partial_len(&self) -> usize {
        match self.mode {
            Mode::Idle => 0,
            Mode::Garbage(len) => len,
            Mode::Value => self.buf.len() - self.consumed,
            Mode::Skipping { len, .. } => len + (self.buf.len() - self.consumed),
        }
    }
}

/// The bit masks of one block of up to 64 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Masks {
    quote: u64,
    backslash: u64,
    open: u64,
    close: u64,
}

/// Scans `buf[from..]` continuing from `state`. Returns the index just past the byte that closes
/// the value, or `None` when the value continues past the end of `buf`.
fn scan(state: &mut ScanState, buf: &[u8], from: usize, max_depth: usize) -> Option<usize> {
    let mut pos = from;
    while pos < buf.len() {
        let n = (buf.len() - pos).min(64);
        let masks = if n == 64 {
            let block: &[u8; 64] = buf[pos..pos + 64].try_into().expect("64 bytes");
            classify(block)
        } else {
            let mut block = [0u8; 64];
            block[..n].copy_from_slice(&buf[pos..pos + n]);
            classify(&block)
        };
        if let Some(i) = step(state, masks, n, max_depth) {
            return Some(pos + i + 1);
        }
        pos += n;
    }
    None
}

/// Advances `state` over one block of `n` bytes. Returns the offset of the byte that brings the
/// depth to zero, if any; the state is then only meaningful up to that byte.
fn step(state: &mut ScanState, m: Masks, n: usize, max_depth: usize) -> Option<usize> {
    let valid = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
    let escaped = if m.backslash == 0 && !state.escape {
        0
    } else {
        escaped_bits(m.backslash, &mut state.escape, n)
    };
    let quotes = m.quote & !escaped;
    let mut inside = prefix_xor(quotes);
    if state.in_string {
        inside = !inside;
    }
    // Brackets count only outside strings. An opening quote is marked inside, the closing one
    // outside, which does not matter since neither is a bracket.
    let open = m.open & !inside & valid;
    let close = m.close & !inside & valid;
    let next_in_string = (quotes & valid).count_ones() % 2 == 1;
    let opens = open.count_ones() as usize;
    let closes = close.count_ones() as usize;
    if state.depth > closes && state.depth + opens <= max_depth {
        state.depth = state.depth + opens - closes;
        state.in_string ^= next_in_string;
        return None;
    }
    let mut bits = open | close;
    while bits != 0 {
        let i = bits.trailing_zeros() as usize;
        bits &= bits - 1;
        if open >> i & 1 == 1 {
            state.depth += 1;
            if state.depth > max_depth {
                state.too_deep = true;
            }
        } else {
            state.depth -= 1;
            if state.depth == 0 {
                return Some(i);
            }
        }
    }
    state.in_string ^= next_in_string;
    None
}

/// Marks the bytes that a backslash escapes, over the first `n` bits, carrying across blocks.
fn escaped_bits(backslash: u64, carry: &mut bool, n: usize) -> u64 {
    let mut escaped = 0u64;
    let mut pending = *carry;
    for i in 0..n {
        if pending {
            escaped |= 1 << i;
            pending = false;
        } else if backslash >> i & 1 == 1 {
            pending = true;
        }
    }
    *carry = pending;
    escaped
}

/// Bit `i` of the result is the XOR of bits `0..=i` of `x`.
fn prefix_xor(mut x: u64) -> u64 {
    x ^= x << 1;
    x ^= x << 2;
    x ^= x << 4;
    x ^= x << 8;
    x ^= x << 16;
    x ^= x << 32;
    x
}

#[cfg(target_arch = "x86_64")]
fn classify(block: &[u8; 64]) -> Masks {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
    };
    let mut m = Masks::default();
    // SAFETY: SSE2 is part of the x86_64 baseline, so these intrinsics are always available;
    // each unaligned load reads 16 bytes at offsets 0, 16, 32 and 48 of a 64-byte array.
    unsafe {
        let quote = _mm_set1_epi8(b'"' as i8);
        let backslash = _mm_set1_epi8(b'\\' as i8);
        let open = _mm_set1_epi8(b'{' as i8);
        let close = _mm_set1_epi8(b'}' as i8);
        // '[' | 0x20 == '{' and ']' | 0x20 == '}', and no other byte maps to either.
        let fold = _mm_set1_epi8(0x20);
        for i in 0..4 {
            let v = _mm_loadu_si128(block.as_ptr().add(i * 16).cast::<__m128i>());
            let folded = _mm_or_si128(v, fold);
            let shift = i * 16;
            let bits = |x| u64::from(_mm_movemask_epi8(x) as u16) << shift;
            m.quote |= bits(_mm_cmpeq_epi8(v, quote));
            m.backslash |= bits(_mm_cmpeq_epi8(v, backslash));
            m.open |= bits(_mm_cmpeq_epi8(folded, open));
            m.close |= bits(_mm_cmpeq_epi8(folded, close));
        }
    }
    m
}

#[cfg(not(target_arch = "x86_64"))]
fn classify(block: &[u8; 64]) -> Masks {
    classify_portable(block)
}

/// The portable classifier, also the reference that the SIMD one is tested against.
#[cfg_attr(
    target_arch = "x86_64",
    allow(dead_code, reason = "reference for tests")
)]
fn classify_portable(block: &[u8; 64]) -> Masks {
    let mut m = Masks::default();
    for (i, &b) in block.iter().enumerate() {
        let bit = 1u64 << i;
        match b {
            b'"' => m.quote |= bit,
            b'\\' => m.backslash |= bit,
            b'{' | b'[' => m.open |= bit,
            b'}' | b']' => m.close |= bit,
            _ => {}
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects frames as (kind, bytes) for readable asserts.
    fn frames(f: &mut Framer) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(fr) = f.next_frame() {
            out.push(match fr {
                Frame::Value(r) => {
                    let v = f.take(r);
                    format!("V {}", String::from_utf8_lossy(&v))
                }
                Frame::Delimiter => "FF".to_owned(),
                Frame::Garbage { len } => format!("G {len}"),
                Frame::Oversized { len } => format!("BIG {len}"),
                Frame::TooDeep { len } => format!("DEEP {len}"),
            });
        }
        out
    }

    fn all(input: &[u8], max_size: usize, max_depth: usize) -> Vec<String> {
        let mut f = Framer::new(max_size, max_depth);
        f.push(input);
        frames(&mut f)
    }

    fn bytewise(input: &[u8], max_size: usize, max_depth: usize) -> Vec<String> {
        let mut f = Framer::new(max_size, max_depth);
        let mut out = Vec::new();
        for b in input {
            f.push(std::slice::from_ref(b));
            out.extend(frames(&mut f));
        }
        out
    }

    #[test]
    fn crlf_lf_pretty_and_packed_give_the_same_values() {
        let input = b"{\"a\": 1}\r\n{\"b\": [1, 2]}\n{\n  \"c\": {\r\n    \"d\": \"}\"\r\n  }\r\n}\r\n{\"e\":2}{\"f\":3}";
        let expect = vec![
            "V {\"a\": 1}",
            "V {\"b\": [1, 2]}",
            "V {\n  \"c\": {\r\n    \"d\": \"}\"\r\n  }\r\n}",
            "V {\"e\":2}",
            "V {\"f\":3}",
        ];
        assert_eq!(all(input, 1 << 20, 64), expect);
        assert_eq!(bytewise(input, 1 << 20, 64), expect);
    }

    #[test]
    fn strings_hide_brackets_and_escapes_hide_quotes() {
        let input = br#"{"a":"{[\"]}\\","b":"\\\""}{"c":"\\\\"}"#;
        assert_eq!(
            all(input, 1 << 20, 64),
            vec![
                r#"V {"a":"{[\"]}\\","b":"\\\""}"#.to_owned(),
                r#"V {"c":"\\\\"}"#.to_owned()
            ]
        );
        assert_eq!(all(input, 1 << 20, 64), bytewise(input, 1 << 20, 64));
    }

    #[test]
    fn garbage_and_delimiters_between_values() {
        let input = b"hello world\r\n\xff{\"a\":1} junk {\"b\":2}\xff\xff";
        let expect = vec![
            "G 13",
            "FF",
            "V {\"a\":1}",
            "G 5",
            "V {\"b\":2}",
            "FF",
            "FF",
        ];
        assert_eq!(all(input, 1 << 20, 64), expect);
        assert_eq!(bytewise(input, 1 << 20, 64), expect);
    }

    #[test]
    fn oversized_value_is_skipped_with_bounded_memory_then_framing_resumes() {
        let big = format!("{{\"x\":\"{}\"}}", "y".repeat(10_000));
        let input = format!("{big}\r\n{{\"ok\":1}}");
        let expect = vec![format!("BIG {}", big.len()), "V {\"ok\":1}".to_owned()];
        assert_eq!(all(input.as_bytes(), 1000, 64), expect);
        let mut f = Framer::new(1000, 64);
        let mut out = Vec::new();
        for chunk in input.as_bytes().chunks(100) {
            f.push(chunk);
            out.extend(frames(&mut f));
            assert!(f.buf.len() <= 1100, "buffer grew to {}", f.buf.len());
        }
        assert_eq!(out, expect);
    }

    #[test]
    fn too_deep_value_is_skipped_and_framing_resumes() {
        let deep = format!("{{\"id\":{}1{}}}", "[".repeat(70), "]".repeat(70));
        let input = format!("{deep}{{\"ok\":[[1]]}}");
        let expect = vec![
            format!("DEEP {}", deep.len()),
            "V {\"ok\":[[1]]}".to_owned(),
        ];
        assert_eq!(all(input.as_bytes(), 1 << 20, 64), expect);
        assert_eq!(bytewise(input.as_bytes(), 1 << 20, 64), expect);
        // Exactly at the limit is fine.
        let edge = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert_eq!(all(edge.as_bytes(), 1 << 20, 64), vec![format!("V {edge}")]);
    }

    #[test]
    fn simd_and_portable_classifiers_agree() {
        let mut block = [0u8; 64];
        for seed in 0..2000u32 {
            let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
            for b in &mut block {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = b"{}[]\"\\ax\xff\x7b\x5b"[(x % 11) as usize]
                    ^ if x & 1 << 20 != 0 { 0x20 } else { 0 };
            }
            assert_eq!(classify(&block), classify_portable(&block), "{block:?}");
        }
    }
}

#[cfg(test)]
mod cost_probe {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore = "manual cost probe"]
    fn probe() {
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/data/schema-qsd.json")).unwrap();
        let n = 2000;
        let t = Instant::now();
        for _ in 0..n {
            let mut v = Vec::new();
            v.extend_from_slice(&bytes);
            std::hint::black_box(v);
        }
        println!("copy {:?}", t.elapsed() / n);
        let t = Instant::now();
        for _ in 0..n {
            let mut f = Framer::new(16 << 20, 1024);
            f.push(&bytes);
            std::hint::black_box(f.next_frame());
        }
        println!("copy+scan {:?}", t.elapsed() / n);
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(std::str::from_utf8(&bytes).unwrap());
        }
        println!("utf8 {:?}", t.elapsed() / n);
        let s = std::str::from_utf8(&bytes).unwrap();
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(serde_json::from_str::<serde::de::IgnoredAny>(s).unwrap());
        }
        println!("ignored(str) {:?}", t.elapsed() / n);
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(crate::wire::classify(bytes.clone()).unwrap());
        }
        println!("clone+classify {:?}", t.elapsed() / n);
    }
}
