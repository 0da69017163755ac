//! The line format of a segment file. There is no external spec: `README.md`, section
//! "On-disk format", is the spec this file implements, and the byte-vector tests below pin it.
//!
//! Sans-IO: everything here works on byte slices. Parsing is strict: a line is accepted only if
//! re-encoding what was parsed gives back exactly the same bytes, so any edit that keeps the
//! JSON valid (whitespace, key order, an extra field, upper-case hex) is still caught.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::fmt;

/// Hard ceiling on one event, whatever the options say; it bounds what a reader allocates.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;
/// An event plus the fixed record framing (two hashes, two numbers, keys) fits in this.
pub const MAX_LINE_BYTES: usize = MAX_EVENT_BYTES + 1024;

const SEAL_DOMAIN: &[u8] = b"portcullis-audit-seal-v1\0";

/// A SHA-256 digest in the chain.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    /// The `prev` of the very first record of a store.
    pub const GENESIS: ChainHash = ChainHash([0; 32]);

    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        self.push_hex(&mut out);
        out
    }

    /// Lower-case hex, appended.
    pub fn push_hex(&self, out: &mut String) {
        for b in self.0 {
            out.push(char::from(hex_digit(b >> 4)));
            out.push(char::from(hex_digit(b & 0x0f)));
        }
    }

    /// Lower-case hex, appended to a record line being built; on the write path of every
    /// record, so neither `fmt` nor an allocation.
    fn push_hex_bytes(&self, out: &mut Vec<u8>) {
        for b in self.0 {
            out.push(hex_digit(b >> 4));
            out.push(hex_digit(b & 0x0f));
        }
    }

    /// Accepts exactly 64 hex digits; case is checked by the canonical re-encode, not here.
    pub fn from_hex(text: &str) -> Option<ChainHash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(ChainHash(out))
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({})", self.to_hex())
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

fn hex_digit(nibble: u8) -> u8 {
    if nibble < 10 {
        b'0' + nibble
    } else {
        b'a' + (nibble - 10)
    }
}

/// `sha256(prev || seq_be64 || time_ms_be64 || event)`.
///
/// `time_ms` is inside the hash so that back-dating or post-dating a record is as visible as
/// editing its event.
pub fn record_hash(prev: &ChainHash, seq: u64, time_ms: u64, event: &[u8]) -> ChainHash {
    let mut hasher = Sha256::new();
    hasher.update(prev.0);
    hasher.update(seq.to_be_bytes());
    hasher.update(time_ms.to_be_bytes());
    hasher.update(event);
    ChainHash(hasher.finalize().into())
}

/// One record as it sits in a line, borrowing the event bytes from that line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub seq: u64,
    pub time_ms: u64,
    pub prev: ChainHash,
    pub hash: ChainHash,
    /// Exactly the bytes the caller appended.
    pub event: &'a [u8],
}

impl RecordView<'_> {
    pub fn computed_hash(&self) -> ChainHash {
        record_hash(&self.prev, self.seq, self.time_ms, self.event)
    }
}

/// The line that closes a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    pub first_seq: u64,
    pub last_seq: u64,
    pub count: u64,
    /// When the segment was sealed; retention by age counts from here.
    pub time_ms: u64,
    /// The hash of the record `last_seq`; the next segment's first record chains to it.
    pub final_hash: ChainHash,
    pub sig: Option<[u8; 64]>,
}

impl Seal {
    /// The bytes an Ed25519 key signs. Every field but `sig` is covered, behind a domain tag so
    /// the signature cannot be replayed as a signature over anything else.
    pub fn signed_message(&self) -> Vec<u8> {
        let mut msg = Vec::with_capacity(SEAL_DOMAIN.len() + 32 + 32);
        msg.extend_from_slice(SEAL_DOMAIN);
        msg.extend_from_slice(&self.first_seq.to_be_bytes());
        msg.extend_from_slice(&self.last_seq.to_be_bytes());
        msg.extend_from_slice(&self.count.to_be_bytes());
        msg.extend_from_slice(&self.time_ms.to_be_bytes());
        msg.extend_from_slice(&self.final_hash.0);
        msg
    }

    pub fn sign(&mut self, key: &SigningKey) {
        self.sig = Some(key.sign(&self.signed_message()).to_bytes());
    }

    pub fn signature_is_valid(&self, key: &VerifyingKey) -> bool {
        match &self.sig {
            Some(sig) => key
                .verify(&self.signed_message(), &Signature::from_bytes(sig))
                .is_ok(),
            None => false,
        }
    }
}

/// One parsed line of a segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line<'a> {
    Record(RecordView<'a>),
    Seal(Seal),
}

/// Why one line could not be parsed. Says what is wrong with the line, never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("line is empty")]
    Empty,
    #[error("line is {len} bytes, over the {max}-byte limit")]
    TooLong { len: usize, max: usize },
    #[error("line is not UTF-8 (invalid byte at offset {valid_up_to})")]
    NotUtf8 { valid_up_to: usize },
    #[error(
        "line is neither a record (starting `{{\"seq\":`) nor a seal (starting `{{\"seal\":`)"
    )]
    UnknownKind,
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("field `{field}` is not a 64-digit hex SHA-256")]
    BadHash { field: &'static str },
    #[error("field `sig` is not a 128-digit hex Ed25519 signature")]
    BadSignature,
    #[error("line is valid JSON but not in canonical form (whitespace, key order, extra field or hex case differs)")]
    NonCanonical,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordWire<'a> {
    seq: u64,
    time_ms: u64,
    #[serde(borrow)]
    prev: &'a str,
    #[serde(borrow)]
    hash: &'a str,
    #[serde(borrow)]
    event: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SealLineWire<'a> {
    #[serde(borrow)]
    seal: SealWire<'a>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SealWire<'a> {
    first_seq: u64,
    last_seq: u64,
    count: u64,
    time_ms: u64,
    #[serde(borrow)]
    final_hash: &'a str,
    #[serde(borrow, default)]
    sig: Option<&'a str>,
}

const RECORD_PREFIX: &[u8] = b"{\"seq\":";
const SEAL_PREFIX: &[u8] = b"{\"seal\":";
/// The most a record line adds to its event: the keys, two 20-digit numbers, two hashes.
pub const RECORD_LINE_OVERHEAD: usize = 80 + 2 * 20 + 2 * 64;

/// Appends one record line, newline included. The event bytes are copied verbatim.
pub fn encode_record_line(out: &mut Vec<u8>, record: &RecordView<'_>) {
    let mut number = itoa::Buffer::new();
    out.reserve(RECORD_LINE_OVERHEAD + record.event.len());
    out.extend_from_slice(RECORD_PREFIX);
    out.extend_from_slice(number.format(record.seq).as_bytes());
    out.extend_from_slice(b",\"time_ms\":");
    out.extend_from_slice(number.format(record.time_ms).as_bytes());
    out.extend_from_slice(b",\"prev\":\"");
    record.prev.push_hex_bytes(out);
    out.extend_from_slice(b"\",\"hash\":\"");
    record.hash.push_hex_bytes(out);
    out.extend_from_slice(b"\",\"event\":");
    out.extend_from_slice(record.event);
    out.extend_from_slice(b"}\n");
}

/// Appends one seal line, newline included; `sig` is left out when the store has no key.
pub fn encode_seal_line(out: &mut Vec<u8>, seal: &Seal) {
    out.extend_from_slice(SEAL_PREFIX);
    out.extend_from_slice(b"{\"first_seq\":");
    out.extend_from_slice(seal.first_seq.to_string().as_bytes());
    out.extend_from_slice(b",\"last_seq\":");
    out.extend_from_slice(seal.last_seq.to_string().as_bytes());
    out.extend_from_slice(b",\"count\":");
    out.extend_from_slice(seal.count.to_string().as_bytes());
    out.extend_from_slice(b",\"time_ms\":");
    out.extend_from_slice(seal.time_ms.to_string().as_bytes());
    out.extend_from_slice(b",\"final_hash\":\"");
    out.extend_from_slice(seal.final_hash.to_hex().as_bytes());
    out.extend_from_slice(b"\"");
    if let Some(sig) = &seal.sig {
        out.extend_from_slice(b",\"sig\":\"");
        out.extend_from_slice(hex::encode(sig).as_bytes());
        out.extend_from_slice(b"\"");
    }
    out.extend_from_slice(b"}}\n");
}

/// Parses one line, given without its trailing `\n`.
pub fn parse_line(line: &[u8]) -> Result<Line<'_>, LineError> {
    if line.is_empty() {
        return Err(LineError::Empty);
    }
    if line.len() > MAX_LINE_BYTES {
        return Err(LineError::TooLong {
            len: line.len(),
            max: MAX_LINE_BYTES,
        });
    }
    let text = std::str::from_utf8(line).map_err(|e| LineError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    let parsed = if line.starts_with(RECORD_PREFIX) {
        Line::Record(parse_record(text)?)
    } else if line.starts_with(SEAL_PREFIX) {
        Line::Seal(parse_seal(text)?)
    } else {
        return Err(LineError::UnknownKind);
    };
    let mut reencoded = Vec::with_capacity(line.len() + 1);
    match &parsed {
        Line::Record(record) => encode_record_line(&mut reencoded, record),
        Line::Seal(seal) => encode_seal_line(&mut reencoded, seal),
    }
    if reencoded.strip_suffix(b"\n") != Some(line) {
        return Err(LineError::NonCanonical);
    }
    Ok(parsed)
}

fn parse_record(text: &str) -> Result<RecordView<'_>, LineError> {
    let wire: RecordWire<'_> =
        serde_json::from_str(text).map_err(|e| LineError::Json(e.to_string()))?;
    Ok(RecordView {
        seq: wire.seq,
        time_ms: wire.time_ms,
        prev: ChainHash::from_hex(wire.prev).ok_or(LineError::BadHash { field: "prev" })?,
        hash: ChainHash::from_hex(wire.hash).ok_or(LineError::BadHash { field: "hash" })?,
        event: wire.event.get().as_bytes(),
    })
}

fn parse_seal(text: &str) -> Result<Seal, LineError> {
    let wire: SealLineWire<'_> =
        serde_json::from_str(text).map_err(|e| LineError::Json(e.to_string()))?;
    let seal = wire.seal;
    let sig = match seal.sig {
        None => None,
        Some(hex_sig) => {
            let mut out = [0u8; 64];
            hex::decode_to_slice(hex_sig, &mut out).map_err(|_| LineError::BadSignature)?;
            Some(out)
        }
    };
    Ok(Seal {
        first_seq: seal.first_seq,
        last_seq: seal.last_seq,
        count: seal.count,
        time_ms: seal.time_ms,
        final_hash: ChainHash::from_hex(seal.final_hash).ok_or(LineError::BadHash {
            field: "final_hash",
        })?,
        sig,
    })
}

/// The trailer of a compressed segment is a zstd skippable frame (any magic of
/// `0x184D2A50..=0x184D2A5F`, little-endian on disk) holding a copy of the segment's seal
/// line, so opening a store reads a seal without decompressing.
const TRAILER_MAGIC: [u8; 4] = 0x184D_2A5E_u32.to_le_bytes();

/// The skippable frame that carries the seal line.
pub fn encode_trailer(out: &mut Vec<u8>, seal: &Seal) {
    let mut line = Vec::with_capacity(512);
    encode_seal_line(&mut line, seal);
    out.extend_from_slice(&TRAILER_MAGIC);
    out.extend_from_slice(&u32::try_from(line.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&line);
}

/// The seal a compressed segment's trailer carries, from the file's last bytes; `None` when
/// they do not end with a well-formed trailer. Never panics, whatever the bytes (the fuzz
/// target `segment_reader` feeds it).
pub fn trailer_seal(tail: &[u8]) -> Option<Seal> {
    // The trailer is last: the header whose length reaches exactly the end of the file.
    let start = (0..tail.len().saturating_sub(8)).rev().find(|&at| {
        tail.get(at..at.saturating_add(4)) == Some(&TRAILER_MAGIC[..])
            && tail
                .get(at.saturating_add(4)..at.saturating_add(8))
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .and_then(|b| usize::try_from(u32::from_le_bytes(b)).ok())
                == Some(tail.len().saturating_sub(at).saturating_sub(8))
    })?;
    let line = tail.get(start.saturating_add(8)..)?.strip_suffix(b"\n")?;
    match parse_line(line) {
        Ok(Line::Seal(seal)) => Some(seal),
        _ => None,
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]
mod tests {
    use super::*;

    const EVENT: &[u8] = br#"{"kind":"connection.opened","user":"alice","port":5432}"#;
    const TIME: u64 = 1_700_000_000_000;
    // Computed independently: python3 -c 'import hashlib,struct; print(hashlib.sha256(bytes(32)
    //   + struct.pack(">QQ", 1, 1700000000000) + EVENT).hexdigest())'
    const HASH_1: &str = "9e5285527f53fc01de8f8be674d486e8fe8b9f8fe4a8f88a20844760f2bb697e";

    fn record(prev: ChainHash, seq: u64) -> RecordView<'static> {
        let hash = record_hash(&prev, seq, TIME, EVENT);
        RecordView {
            seq,
            time_ms: TIME,
            prev,
            hash,
            event: EVENT,
        }
    }

    #[test]
    fn genesis_record_hash_matches_independent_sha256() {
        assert_eq!(
            record_hash(&ChainHash::GENESIS, 1, TIME, EVENT).to_hex(),
            HASH_1
        );
    }

    #[test]
    fn fixed_event_and_prev_give_fixed_line() {
        let mut out = Vec::new();
        encode_record_line(&mut out, &record(ChainHash::GENESIS, 1));
        let expected = format!(
            "{{\"seq\":1,\"time_ms\":1700000000000,\"prev\":\"{}\",\"hash\":\"{HASH_1}\",\"event\":{}}}\n",
            "0".repeat(64),
            std::str::from_utf8(EVENT).unwrap()
        );
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    #[test]
    fn record_line_round_trips_event_bytes_exactly() {
        let odd_event: &[u8] = br#"{ "b" : [1, 2.50, "\u00e9\n"],	"a":null }"#;
        let prev = ChainHash([0xab; 32]);
        let view = RecordView {
            seq: u64::MAX,
            time_ms: 0,
            prev,
            hash: record_hash(&prev, u64::MAX, 0, odd_event),
            event: odd_event,
        };
        let mut out = Vec::new();
        encode_record_line(&mut out, &view);
        let line = out.strip_suffix(b"\n").unwrap();
        assert_eq!(parse_line(line).unwrap(), Line::Record(view));
    }

    #[test]
    fn seal_line_round_trips_with_and_without_signature() {
        let mut seal = Seal {
            first_seq: 17,
            last_seq: 20,
            count: 4,
            time_ms: TIME,
            final_hash: ChainHash([1; 32]),
            sig: None,
        };
        let mut out = Vec::new();
        encode_seal_line(&mut out, &seal);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            format!(
                "{{\"seal\":{{\"first_seq\":17,\"last_seq\":20,\"count\":4,\"time_ms\":1700000000000,\"final_hash\":\"{}\"}}}}\n",
                "01".repeat(32)
            )
        );
        assert_eq!(
            parse_line(out.strip_suffix(b"\n").unwrap()).unwrap(),
            Line::Seal(seal.clone())
        );

        let key = SigningKey::from_bytes(&[7; 32]);
        seal.sign(&key);
        assert!(seal.signature_is_valid(&key.verifying_key()));
        let mut signed = Vec::new();
        encode_seal_line(&mut signed, &seal);
        let parsed = parse_line(signed.strip_suffix(b"\n").unwrap()).unwrap();
        assert_eq!(parsed, Line::Seal(seal.clone()));

        let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
        assert!(!seal.signature_is_valid(&other));
        seal.time_ms += 1;
        assert!(!seal.signature_is_valid(&key.verifying_key()));
    }

    #[test]
    fn non_canonical_but_valid_json_is_rejected() {
        let mut out = Vec::new();
        encode_record_line(&mut out, &record(ChainHash::GENESIS, 1));
        let line = String::from_utf8(out).unwrap();
        let line = line.trim_end();
        let cases: Vec<(&str, String)> = vec![
            (
                "space after colon",
                line.replacen("\"seq\":1", "\"seq\": 1", 1),
            ),
            (
                "upper-case hex",
                line.replacen(&HASH_1[..8], &HASH_1[..8].to_uppercase(), 1),
            ),
            (
                "extra field",
                line.replacen("{\"seq\":1,", "{\"seq\":1,\"x\":0,", 1),
            ),
            (
                "space before event",
                line.replacen("\"event\":{", "\"event\": {", 1),
            ),
        ];
        for (name, case) in cases {
            assert_ne!(case, line, "{name}: the edit did not apply");
            assert!(parse_line(case.as_bytes()).is_err(), "{name} was accepted");
        }
    }

    #[test]
    fn malformed_lines_name_their_problem() {
        let cases: &[(&[u8], LineError)] = &[
            (b"", LineError::Empty),
            (b"hello", LineError::UnknownKind),
            (b"{\"seq\":\xff}", LineError::NotUtf8 { valid_up_to: 7 }),
            (
                b"{\"seq\":1,\"time_ms\":2,\"prev\":\"00\",\"hash\":\"00\",\"event\":1}",
                LineError::BadHash { field: "prev" },
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(parse_line(line).unwrap_err(), *expected);
        }
        assert!(matches!(
            parse_line(b"{\"seq\":-1}"),
            Err(LineError::Json(_))
        ));
    }
}
