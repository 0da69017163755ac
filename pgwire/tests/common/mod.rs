//! Helpers shared by the test suites: hand-framing, prefix feeding and a deterministic RNG.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use bytes::BytesMut;
use portcullis_pgwire::{decode_frame, DecodeError, RawMessage, DEFAULT_MAX_MESSAGE_LEN};

/// Tag, big-endian length (counting itself) and body: the frame layout of every regular message.
pub fn framed(tag: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len() + 4).unwrap();
    let mut out = vec![tag];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Concatenates byte pieces.
pub fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Frames exactly one message out of `bytes`, asserting nothing is left over.
pub fn frame_one(bytes: &[u8]) -> RawMessage {
    let mut buf = BytesMut::from(bytes);
    let msg = decode_frame(&mut buf, DEFAULT_MAX_MESSAGE_LEN)
        .unwrap()
        .expect("a complete frame");
    assert!(buf.is_empty(), "decode_frame left {} bytes", buf.len());
    msg
}

/// Every strict prefix of `bytes` is incomplete (Ok(None), buffer untouched); the whole is one
/// message and consumes the buffer.
pub fn assert_every_prefix_incomplete(bytes: &[u8]) {
    for n in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..n]);
        let got = decode_frame(&mut buf, DEFAULT_MAX_MESSAGE_LEN);
        assert_eq!(got, Ok(None), "prefix of {n}/{} bytes", bytes.len());
        assert_eq!(buf.len(), n, "prefix of {n} bytes was consumed");
    }
    let _ = frame_one(bytes);
}

/// Compares errors exactly, except `Invalid`, whose free-text detail is only checked to be there.
pub fn same_error(got: &DecodeError, want: &DecodeError) -> bool {
    match (got, want) {
        (DecodeError::Invalid { what: a, detail }, DecodeError::Invalid { what: b, .. }) => {
            a == b && !detail.is_empty()
        }
        _ => got == want,
    }
}

/// xorshift64*: deterministic, std-only.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn bool(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    pub fn u8(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn u16(&mut self) -> u16 {
        self.next_u64() as u16
    }

    pub fn u32(&mut self) -> u32 {
        self.next_u64() as u32
    }

    pub fn bytes(&mut self, max_len: usize) -> Vec<u8> {
        let len = self.below(max_len + 1);
        (0..len).map(|_| self.u8()).collect()
    }

    /// A string without NUL: ASCII, some multi-byte characters, sometimes empty.
    pub fn string(&mut self, max_chars: usize) -> String {
        const CHARS: &[char] = &[
            'a', 'Z', '0', ' ', '\'', ';', '\n', 'é', 'ß', '€', '😀', '\u{7f}',
        ];
        let len = self.below(max_chars + 1);
        (0..len).map(|_| CHARS[self.below(CHARS.len())]).collect()
    }

    pub fn non_empty_string(&mut self, max_chars: usize) -> String {
        let mut s = self.string(max_chars);
        if s.is_empty() {
            s.push('x');
        }
        s
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}
