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
//! reported once its end is found, or at a 0xFF byte that cuts it short (`cut_value`, which the
//! server side uses, as QEMU's lexer resets there); framing then resumes after it.

use std::ops::Range;

/// How many bytes of each end of a skipped value are kept, to find its id.
const ID_WINDOW: usize = 64;

/// Values at least this long leave the framer by handing over its buffer (copying whatever
/// follows them) instead of being copied; smaller ones are copied so the buffer is reused.
const SPLIT_MIN: usize = 4096;

/// One unit found in the input stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A complete top-level value (object or array), as a range of the framer's buffer (see
    /// [`Framer::take`]). `ascii` is true when every byte of it is below 0x80.
    ///
    /// The range stays valid until the next call that mutates the framer.
    Value { range: Range<usize>, ascii: bool },
    /// A 0xFF byte between values.
    Delimiter,
    /// Bytes between values that cannot start one; `len` bytes were skipped.
    Garbage { len: usize },
    /// A value over the size limit was skipped; `len` is its full length, `id` the numeric
    /// `"id"` member it had first or last, if that member lies within its first or last
    /// [`ID_WINDOW`] bytes (see [`top_level_id`]).
    Oversized { len: usize, id: Option<u64> },
    /// A value nested deeper than the depth limit was skipped; `len` and `id` as above.
    TooDeep { len: usize, id: Option<u64> },
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
    /// A byte of 0x80 or above was seen in a scanned block (possibly just past the value).
    non_ascii: bool,
}

/// A streaming splitter of JSON values with size and depth limits.
#[derive(Debug)]
pub(crate) struct Framer {
    /// Unconsumed input. In [`Mode::Value`] the current value starts at `consumed`.
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already handed out and waiting to be dropped.
    consumed: usize,
    /// How many bytes of the current value (from `consumed`) were scanned.
    scanned: usize,
    mode: Mode,
    state: ScanState,
    max_size: usize,
    max_depth: usize,
    /// The scanner for this CPU, chosen once.
    scan: ScanFn,
    /// The first and the last (so far) [`ID_WINDOW`] bytes of the value being skipped.
    head: Vec<u8>,
    tail: Vec<u8>,
}

/// Scans `buf[from..]` continuing from a state; see [`scan`].
type ScanFn = fn(&mut ScanState, &[u8], usize, usize) -> Option<usize>;

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
            scan: pick_scan(),
            head: Vec::new(),
            tail: Vec::new(),
        }
    }

    /// Appends input. The caller SHOULD feed at most a few tens of KiB at a time so the buffer
    /// stays near `max_size`.
    pub(crate) fn push(&mut self, data: &[u8]) {
        if self.consumed > 0 {
            // An unfinished value moves to the front here, once per read, so a large value
            // ends up at index 0 and can leave without a copy (see `take`).
            self.buf.drain(..self.consumed);
            if self.mode == Mode::Value {
                self.scanned -= self.consumed;
            }
            self.consumed = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Takes the bytes of a value range out as an owned vector, for a range just returned by
    /// [`Framer::next_frame`]. Avoids copying a large value when little input follows it.
    pub(crate) fn take(&mut self, range: Range<usize>) -> Vec<u8> {
        debug_assert_eq!(range.end, self.consumed);
        let tail = self.buf.len() - range.end;
        if range.start == 0 && range.len() >= SPLIT_MIN && range.len() >= tail {
            // Keep the (small) tail, hand out the (large) front without copying it.
            let rest = self.buf.split_off(range.end);
            self.consumed = 0;
            std::mem::replace(&mut self.buf, rest)
        } else {
            self.buf[range].to_vec()
        }
    }

    /// How many bytes the framer holds (for memory-bound checks).
    #[cfg(any(fuzzing, test, feature = "test-util"))]
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
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
                            // The value starts at `consumed`; nothing moves for a value that
                            // arrived whole.
                            self.scanned = self.consumed + 1;
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
                    let start = self.consumed;
                    let from = self.scanned;
                    let limit = (start + self.max_size).min(self.buf.len());
                    let buf = &self.buf[..limit];
                    let end = (self.scan)(&mut self.state, buf, from, self.max_depth);
                    match end {
                        Some(end) => {
                            self.mode = Mode::Idle;
                            self.scanned = 0;
                            self.consumed = end;
                            if self.state.too_deep {
                                // Only the value's ends are searched for its id, as when it
                                // is skipped across reads, so read boundaries cannot change
                                // which id is found.
                                let (head, tail) = id_ends(&self.buf[start..end]);
                                return Some(Frame::TooDeep {
                                    len: end - start,
                                    id: top_level_id(head, tail),
                                });
                            }
                            return Some(Frame::Value {
                                range: start..end,
                                ascii: !self.state.non_ascii,
                            });
                        }
                        None if self.buf.len() - start > self.max_size => {
                            // Too long: stop buffering and skip the rest as it streams in.
                            // Whether it is reported as too deep or too long depends only on
                            // its first `max_size` bytes, so read boundaries cannot change it.
                            let len = self.max_size;
                            self.consumed = start + len;
                            self.keep_ends(start, start + len);
                            self.mode = Mode::Skipping {
                                len,
                                oversized: !self.state.too_deep,
                            };
                        }
                        None => {
                            self.scanned = self.buf.len();
                            if self.state.too_deep {
                                // No need to keep the bytes: the value is already rejected.
                                let len = self.buf.len() - start;
                                self.consumed = self.buf.len();
                                self.keep_ends(start, self.buf.len());
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
                    let end = (self.scan)(&mut self.state, &self.buf, rest_start, self.max_depth);
                    match end {
                        Some(end) => {
                            let total = len + (end - rest_start);
                            keep_last(&mut self.tail, &self.buf[rest_start..end]);
                            self.consumed = end;
                            self.mode = Mode::Idle;
                            let id = top_level_id(&self.head, &self.tail);
                            return Some(if oversized {
                                Frame::Oversized { len: total, id }
                            } else {
                                Frame::TooDeep { len: total, id }
                            });
                        }
                        None => {
                            let total = len + (self.buf.len() - rest_start);
                            keep_last(&mut self.tail, &self.buf[rest_start..]);
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

    /// Keeps both ends of `buf[start..end]`, the start of a value about to be skipped.
    fn keep_ends(&mut self, start: usize, end: usize) {
        let value = &self.buf[start..end];
        // The head is taken once, when the value goes over a limit, so it does not depend on
        // reads: a value too long goes over at `max_size` bytes, and one too deep may go over
        // before `ID_WINDOW` bytes have arrived, but a leading `"id"` member (the only one
        // `top_level_id` reads in the head) ends before any nesting, so it is all there.
        self.head.clear();
        self.head.extend_from_slice(id_ends(value).0);
        self.tail.clear();
        keep_last(&mut self.tail, value);
    }

    /// Ends an unfinished value at a 0xFF byte, as QEMU's JSON lexer does wherever that byte
    /// comes: a value being read is dropped (its bytes can never parse), and a value being
    /// skipped is reported now, as it will never end. Idle and garbage states are left as
    /// they are (a 0xFF ends a garbage run by itself). Call it with all input before the
    /// 0xFF pushed and every frame drained, then push the 0xFF.
    pub(crate) fn cut_value(&mut self) -> Option<Frame> {
        let frame = match self.mode {
            Mode::Idle | Mode::Garbage(_) => return None,
            Mode::Value => None,
            Mode::Skipping { len, oversized } => {
                let len = len + (self.buf.len() - self.consumed);
                // Only its first bytes are known to belong to the top level.
                let id = top_level_id(&self.head, &[]);
                Some(if oversized {
                    Frame::Oversized { len, id }
                } else {
                    Frame::TooDeep { len, id }
                })
            }
        };
        self.reset();
        frame
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

/// The first and last [`ID_WINDOW`] bytes of `value`: where a skipped value's id is looked
/// for, whether it arrived whole or across reads.
pub(crate) fn id_ends(value: &[u8]) -> (&[u8], &[u8]) {
    let head = &value[..value.len().min(ID_WINDOW)];
    let tail = &value[value.len().saturating_sub(ID_WINDOW)..];
    (head, tail)
}

/// Appends `more` to `tail`, keeping only the last [`ID_WINDOW`] bytes.
fn keep_last(tail: &mut Vec<u8>, more: &[u8]) {
    if more.len() >= ID_WINDOW {
        tail.clear();
        tail.extend_from_slice(&more[more.len() - ID_WINDOW..]);
    } else {
        tail.extend_from_slice(more);
        let excess = tail.len().saturating_sub(ID_WINDOW);
        tail.drain(..excess);
    }
}

/// The numeric `"id"` of an object known only by its first bytes (`head`) and its last bytes
/// (`tail`): a member written first (`{"id": 5, ...`, as QEMU writes error replies) or last
/// (`..., "id": 5}`, as it writes returns), in any whitespace. A member found there belongs
/// to the top level: the `{` before it opens the value, or the `}` after it closes it.
pub(crate) fn top_level_id(head: &[u8], tail: &[u8]) -> Option<u64> {
    fn ws(b: &u8) -> bool {
        matches!(b, b' ' | b'\t' | b'\r' | b'\n')
    }
    fn front(s: &[u8]) -> &[u8] {
        &s[s.iter().position(|b| !ws(b)).unwrap_or(s.len())..]
    }
    fn back(s: &[u8]) -> &[u8] {
        &s[..s.iter().rposition(|b| !ws(b)).map_or(0, |i| i + 1)]
    }
    fn number(digits: &[u8]) -> Option<u64> {
        // JSON writes no leading zeros: `007` is not a number our requests could carry.
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        if digits.len() > 1 && digits[0] == b'0' {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    }
    let first = || {
        let rest = front(front(head).strip_prefix(b"{")?);
        let rest = front(front(rest.strip_prefix(b"\"id\"")?).strip_prefix(b":")?);
        let n = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        matches!(front(&rest[n..]).first(), Some(b',' | b'}'))
            .then(|| number(&rest[..n]))
            .flatten()
    };
    let last = || {
        let rest = back(back(tail).strip_suffix(b"}")?);
        let n = rest.iter().rev().take_while(|b| b.is_ascii_digit()).count();
        let (rest, digits) = rest.split_at(rest.len() - n);
        let rest = back(back(back(rest).strip_suffix(b":")?).strip_suffix(b"\"id\"")?);
        matches!(rest.last(), Some(b',' | b'{'))
            .then(|| number(digits))
            .flatten()
    };
    first().or_else(last)
}

/// The bit masks of one block of up to 64 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Masks {
    /// Bytes of 0x80 and above.
    high: u64,
    quote: u64,
    backslash: u64,
    open: u64,
    close: u64,
}

/// Picks the fastest scanner this CPU supports. Each returns the index just past the byte
/// that closes the value, or `None` when the value continues past the end of the buffer.
fn pick_scan() -> ScanFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("pclmulqdq") {
            return x86::scan_avx512_checked;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("pclmulqdq") {
            return x86::scan_avx2_checked;
        }
        |st, buf, from, max| {
            let tail = |rest: &[u8]| padded(rest, x86::classify_sse2);
            scan_with(st, buf, from, max, x86::classify_sse2, tail, prefix_xor)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        |st, buf, from, max| {
            let tail = |rest: &[u8]| padded(rest, classify_portable);
            scan_with(st, buf, from, max, classify_portable, tail, prefix_xor)
        }
    }
}

/// The block loop, generic over how masks and prefix XORs are computed so that each CPU
/// flavour gets one fully inlined copy.
#[inline(always)]
fn scan_with(
    state: &mut ScanState,
    buf: &[u8],
    from: usize,
    max_depth: usize,
    classify: impl Fn(&[u8; 64]) -> Masks,
    classify_tail: impl Fn(&[u8]) -> Masks,
    pxor: impl Fn(u64) -> u64,
) -> Option<usize> {
    let mut pos = from;
    while let Some(block) = buf.get(pos..pos + 64) {
        let block: &[u8; 64] = block.try_into().expect("64 bytes");
        if let Some(i) = step(state, classify(block), 64, max_depth, &pxor) {
            return Some(pos + i + 1);
        }
        pos += 64;
    }
    if pos < buf.len() {
        let rest = &buf[pos..];
        if let Some(i) = step(state, classify_tail(rest), rest.len(), max_depth, &pxor) {
            return Some(pos + i + 1);
        }
    }
    None
}

/// Classifies fewer than 64 bytes by padding them with zeros: a zero byte is neither a quote,
/// a backslash nor a bracket, so padding changes no mask.
#[inline(always)]
fn padded(rest: &[u8], classify: impl Fn(&[u8; 64]) -> Masks) -> Masks {
    let mut block = [0u8; 64];
    block[..rest.len()].copy_from_slice(rest);
    classify(&block)
}

/// Advances `state` over one block of `len` bytes. Returns the offset of the byte that brings the depth to
/// zero, if any; the state is then only meaningful up to that byte.
#[inline(always)]
fn step(
    state: &mut ScanState,
    m: Masks,
    len: usize,
    max_depth: usize,
    pxor: impl Fn(u64) -> u64,
) -> Option<usize> {
    let escaped = if m.backslash == 0 && !state.escape {
        0
    } else {
        escaped_bits(m.backslash, &mut state.escape, len)
    };
    state.non_ascii |= m.high != 0;
    let quotes = m.quote & !escaped;
    // Bit i is set when byte i is inside a string (the opening quote counts as inside, the
    // closing one as outside; neither is a bracket, so that does not matter).
    let inside = pxor(quotes) ^ 0u64.wrapping_sub(u64::from(state.in_string));
    let open = m.open & !inside;
    let close = m.close & !inside;
    let opens = open.count_ones() as usize;
    let closes = close.count_ones() as usize;
    if state.depth > closes && state.depth + opens <= max_depth {
        state.depth = state.depth + opens - closes;
        state.in_string = inside >> 63 != 0;
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
    state.in_string = inside >> 63 != 0;
    None
}

/// Marks the bytes that a backslash escapes among the first `len`, carrying an escape from the
/// last byte to the next block.
#[cold]
fn escaped_bits(backslash: u64, carry: &mut bool, len: usize) -> u64 {
    let mut escaped = 0u64;
    let mut pending = *carry;
    for i in 0..len {
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
#[inline(always)]
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
mod x86 {
    //! SIMD classifiers. Each `scan_*` is compiled with its CPU features enabled and MUST
    //! only be called after checking them at run time.

    use super::{Masks, ScanState, scan_with};

    use std::arch::x86_64::*;

    /// [`scan_avx512`], for CPUs where `pick_scan` found its features.
    pub(super) fn scan_avx512_checked(
        st: &mut ScanState,
        buf: &[u8],
        from: usize,
        max: usize,
    ) -> Option<usize> {
        // SAFETY: only handed out by `pick_scan` after detecting avx512bw and pclmulqdq.
        unsafe { scan_avx512(st, buf, from, max) }
    }

    /// [`scan_avx2`], for CPUs where `pick_scan` found its features.
    pub(super) fn scan_avx2_checked(
        st: &mut ScanState,
        buf: &[u8],
        from: usize,
        max: usize,
    ) -> Option<usize> {
        // SAFETY: only handed out by `pick_scan` after detecting avx2 and pclmulqdq.
        unsafe { scan_avx2(st, buf, from, max) }
    }

    /// Prefix XOR by carry-less multiplication with all ones.
    #[inline(always)]
    fn clmul_prefix_xor(x: u64) -> u64 {
        // SAFETY: only inlined into functions compiled with `pclmulqdq` (checked by callers).
        unsafe {
            let v = _mm_set_epi64x(0, x as i64);
            let ones = _mm_set1_epi8(-1);
            _mm_cvtsi128_si64(_mm_clmulepi64_si128(v, ones, 0)) as u64
        }
    }

    #[target_feature(enable = "avx512bw,pclmulqdq")]
    pub(super) unsafe fn scan_avx512(
        state: &mut ScanState,
        buf: &[u8],
        from: usize,
        max_depth: usize,
    ) -> Option<usize> {
        // SAFETY (both closures): features enabled above; the full load reads 64 bytes of a
        // 64-byte array, the masked load reads only the `rest.len() < 64` bytes of `rest`.
        let classify =
            |block: &[u8; 64]| unsafe { masks_avx512(_mm512_loadu_si512(block.as_ptr().cast())) };
        let tail = |rest: &[u8]| unsafe {
            let mask = (1u64 << rest.len()) - 1;
            masks_avx512(_mm512_maskz_loadu_epi8(mask, rest.as_ptr().cast()))
        };
        scan_with(
            state,
            buf,
            from,
            max_depth,
            classify,
            tail,
            clmul_prefix_xor,
        )
    }

    /// The masks of 64 loaded bytes (zeros where a masked load left bytes out).
    #[inline(always)]
    unsafe fn masks_avx512(v: __m512i) -> Masks {
        // SAFETY: only inlined into `scan_avx512`, compiled with avx512bw.
        unsafe {
            let folded = _mm512_or_si512(v, _mm512_set1_epi8(0x20));
            Masks {
                high: _mm512_movepi8_mask(v),
                quote: _mm512_cmpeq_epi8_mask(v, _mm512_set1_epi8(b'"' as i8)),
                backslash: _mm512_cmpeq_epi8_mask(v, _mm512_set1_epi8(b'\\' as i8)),
                open: _mm512_cmpeq_epi8_mask(folded, _mm512_set1_epi8(b'{' as i8)),
                close: _mm512_cmpeq_epi8_mask(folded, _mm512_set1_epi8(b'}' as i8)),
            }
        }
    }

    #[target_feature(enable = "avx2,pclmulqdq")]
    pub(super) unsafe fn scan_avx2(
        state: &mut ScanState,
        buf: &[u8],
        from: usize,
        max_depth: usize,
    ) -> Option<usize> {
        let classify = |block: &[u8; 64]| {
            let mut m = Masks::default();
            // SAFETY: two 32-byte unaligned loads at offsets 0 and 32 of a 64-byte array;
            // features enabled above.
            unsafe {
                let fold = _mm256_set1_epi8(0x20);
                for half in 0..2 {
                    let v = _mm256_loadu_si256(block.as_ptr().add(half * 32).cast());
                    let folded = _mm256_or_si256(v, fold);
                    let bits = |x| u64::from(_mm256_movemask_epi8(x) as u32) << (half * 32);
                    m.high |= bits(v);
                    m.quote |= bits(_mm256_cmpeq_epi8(v, _mm256_set1_epi8(b'"' as i8)));
                    m.backslash |= bits(_mm256_cmpeq_epi8(v, _mm256_set1_epi8(b'\\' as i8)));
                    m.open |= bits(_mm256_cmpeq_epi8(folded, _mm256_set1_epi8(b'{' as i8)));
                    m.close |= bits(_mm256_cmpeq_epi8(folded, _mm256_set1_epi8(b'}' as i8)));
                }
            }
            m
        };
        let tail = |rest: &[u8]| super::padded(rest, classify);
        scan_with(
            state,
            buf,
            from,
            max_depth,
            classify,
            tail,
            clmul_prefix_xor,
        )
    }

    /// SSE2 is part of the x86_64 baseline, so this one needs no run-time check.
    pub(super) fn classify_sse2(block: &[u8; 64]) -> Masks {
        let mut m = Masks::default();
        // SAFETY: SSE2 is always available on x86_64; each unaligned load reads 16 bytes at
        // offsets 0, 16, 32 and 48 of a 64-byte array.
        unsafe {
            // '[' | 0x20 == '{' and ']' | 0x20 == '}', and no other byte maps to either.
            let fold = _mm_set1_epi8(0x20);
            for i in 0..4 {
                let v = _mm_loadu_si128(block.as_ptr().add(i * 16).cast::<__m128i>());
                let folded = _mm_or_si128(v, fold);
                let bits = |x| u64::from(_mm_movemask_epi8(x) as u16) << (i * 16);
                m.high |= bits(v);
                m.quote |= bits(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8)));
                m.backslash |= bits(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8)));
                m.open |= bits(_mm_cmpeq_epi8(folded, _mm_set1_epi8(b'{' as i8)));
                m.close |= bits(_mm_cmpeq_epi8(folded, _mm_set1_epi8(b'}' as i8)));
            }
        }
        m
    }

    /// Runs every flavour this CPU supports over the same input, for tests.
    #[cfg(test)]
    pub(super) fn all_flavours(
        buf: &[u8],
        max_depth: usize,
    ) -> Vec<(&'static str, Option<usize>, ScanState)> {
        let mut out = Vec::new();
        let run = |f: &dyn Fn(&mut ScanState) -> Option<usize>| {
            let mut st = ScanState {
                depth: 1,
                ..ScanState::default()
            };
            let end = f(&mut st);
            (end, st)
        };
        let (e, s) = run(&|st| {
            let tail = |rest: &[u8]| super::padded(rest, super::classify_portable);
            scan_with(
                st,
                buf,
                1,
                max_depth,
                super::classify_portable,
                tail,
                super::prefix_xor,
            )
        });
        out.push(("portable", e, s));
        let (e, s) = run(&|st| {
            let tail = |rest: &[u8]| super::padded(rest, classify_sse2);
            scan_with(
                st,
                buf,
                1,
                max_depth,
                classify_sse2,
                tail,
                super::prefix_xor,
            )
        });
        out.push(("sse2", e, s));
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("pclmulqdq") {
            // SAFETY: features checked just above.
            let (e, s) = run(&|st| unsafe { scan_avx2(st, buf, 1, max_depth) });
            out.push(("avx2", e, s));
        }
        if std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("pclmulqdq") {
            // SAFETY: features checked just above.
            let (e, s) = run(&|st| unsafe { scan_avx512(st, buf, 1, max_depth) });
            out.push(("avx512", e, s));
        }
        out
    }
}

/// The portable classifier, also the reference that the SIMD ones are tested against.
#[cfg_attr(
    target_arch = "x86_64",
    allow(dead_code, reason = "reference for tests")
)]
fn classify_portable(block: &[u8; 64]) -> Masks {
    let mut m = Masks::default();
    for (i, &b) in block.iter().enumerate() {
        let bit = 1u64 << i;
        if b >= 0x80 {
            m.high |= bit;
        }
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
                Frame::Value { range, .. } => {
                    let v = f.take(range);
                    format!("V {}", String::from_utf8_lossy(&v))
                }
                Frame::Delimiter => "FF".to_owned(),
                Frame::Garbage { len } => format!("G {len}"),
                Frame::Oversized { len, .. } => format!("BIG {len}"),
                Frame::TooDeep { len, .. } => format!("DEEP {len}"),
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
    fn a_value_of_exactly_the_size_limit_passes_one_byte_more_does_not() {
        let at = br#"{"x":"abcd"}"#; // 12 bytes
        let over = br#"{"x":"abcde"}"#;
        assert_eq!(all(at, 12, 64), vec![r#"V {"x":"abcd"}"#.to_owned()]);
        assert_eq!(bytewise(at, 12, 64), all(at, 12, 64));
        assert_eq!(all(over, 12, 64), vec!["BIG 13".to_owned()]);
        assert_eq!(bytewise(over, 12, 64), all(over, 12, 64));
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
    #[cfg(target_arch = "x86_64")]
    fn every_simd_flavour_agrees_with_the_portable_scan() {
        let alphabet: &[u8] = b"{}[]\"\\ax\xff:,\x80\x7f";
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for len in [1usize, 63, 64, 65, 127, 128, 200, 1000] {
            for _ in 0..200 {
                let mut buf = vec![b'{'];
                for _ in 0..len {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    buf.push(alphabet[(x % alphabet.len() as u64) as usize]);
                }
                let results = x86::all_flavours(&buf, 6);
                for (name, end, st) in &results[1..] {
                    assert_eq!(
                        (end, st),
                        (&results[0].1, &results[0].2),
                        "{name} on {buf:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn top_level_id_reads_a_first_or_last_numeric_member_only() {
        let id = |v: &str| top_level_id(v.as_bytes(), v.as_bytes());
        assert_eq!(id(r#"{"id": 5, "error": {}}"#), Some(5));
        assert_eq!(id("{\n  \"id\" :\t5\n}\r\n"), Some(5));
        assert_eq!(
            id(r#"{"return": {}, "id": 18446744073709551615}"#),
            Some(u64::MAX)
        );
        assert_eq!(id(r#"{"return": {"id": 5}}"#), None);
        assert_eq!(id(r#"{"return": [{"id": 5}]}"#), None);
        assert_eq!(id(r#"{"return": {}, "xid": 5}"#), None);
        assert_eq!(id(r#"{"return": {}, "id": -5}"#), None);
        assert_eq!(id(r#"{"return": {}, "id": 5.5}"#), None);
        assert_eq!(id(r#"{"return": {}, "id": "5"}"#), None);
        assert_eq!(id(r#"{"return": {}, "id": 18446744073709551616}"#), None);
        assert_eq!(id(r#"{"id": 5"#), None);
        assert_eq!(id(r#"{"id": 007, "error": {}}"#), None);
        assert_eq!(id(r#"{"return": {}, "id": 05}"#), None);
        assert_eq!(id(r#"{"return": {}, "id": 0}"#), Some(0));
        // Only the given ends are looked at.
        assert_eq!(top_level_id(b"{\"return\": ", b"\"id\": 7}"), None);
        assert_eq!(
            top_level_id(b"{\"return\": ", b"\"x\", \"id\": 7}"),
            Some(7)
        );
    }

    #[test]
    fn a_too_deep_value_reports_the_same_id_whole_or_in_pieces() {
        // An id member that ends within the first or last ID_WINDOW bytes is found; one that
        // reaches past them is not, whether the value arrived in one read or many (found by
        // the `framing` fuzz target: fed whole, the whole value used to be searched).
        let pad = " ".repeat(ID_WINDOW);
        let cases = [
            (r#"{"id": 5, "a": [[[1]]]}"#.to_owned(), Some(5)),
            (r#"{"a": [[[1]]], "id": 6}"#.to_owned(), Some(6)),
            (format!("{{\"id\":{pad}5, \"a\": [[[1]]]}}"), None),
            (format!("{{\"a\": [[[1]]], \"id\":{pad}6}}"), None),
        ];
        for (value, id) in cases {
            for step in [1, 3, 10, value.len()] {
                let mut f = Framer::new(1000, 2);
                let mut frames = Vec::new();
                for chunk in value.as_bytes().chunks(step) {
                    f.push(chunk);
                    frames.extend(std::iter::from_fn(|| f.next_frame()));
                }
                let len = value.len();
                assert_eq!(
                    frames,
                    vec![Frame::TooDeep { len, id }],
                    "{value:?} step {step}"
                );
            }
        }
    }

    #[test]
    fn a_skipped_value_reports_the_id_at_its_ends_across_reads() {
        let value = format!("{{\"return\": \"{}\", \"id\": 42}}", "x".repeat(300));
        for step in [1, 7, 64, 65, 1000] {
            let mut f = Framer::new(100, 8);
            let mut frames = Vec::new();
            for chunk in value.as_bytes().chunks(step) {
                f.push(chunk);
                frames.extend(std::iter::from_fn(|| f.next_frame()));
            }
            assert_eq!(
                frames,
                vec![Frame::Oversized {
                    len: value.len(),
                    id: Some(42)
                }],
                "step {step}"
            );
        }
    }
}
