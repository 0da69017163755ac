//! Events serialized by the store's own encoder. The store checks raw event bytes with a full
//! JSON parse and a nesting scan before writing them; an [`EncodedEvent`] was produced by
//! serde_json's compact serializer with its nesting counted on the way, so it is one line of
//! valid JSON that fits the record line by construction, and only its size is checked again.
//! At tens of thousands of events a second, the second parse cost more than the write.

use serde::Serialize;
use serde_json::ser::Formatter;

use crate::store::MAX_EVENT_DEPTH;

/// One event as compact JSON, known to be valid and nested at most [`MAX_EVENT_DEPTH`] deep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedEvent(Vec<u8>);

impl EncodedEvent {
    /// Serializes `event`; an error names why it cannot be stored (serde's own error, or
    /// nesting deeper than the record line allows).
    pub fn encode<T: Serialize + ?Sized>(event: &T) -> Result<Self, String> {
        let mut out = Vec::with_capacity(1024);
        let mut depth = DepthCounting::default();
        event
            .serialize(&mut serde_json::Serializer::with_formatter(
                &mut out,
                Counting(&mut depth),
            ))
            .map_err(|e| format!("cannot serialize the event: {e}"))?;
        if depth.max > MAX_EVENT_DEPTH {
            return Err(format!("event nests deeper than {MAX_EVENT_DEPTH} levels"));
        }
        if out.is_empty() {
            return Err("event is empty".into());
        }
        Ok(Self(out))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What [`crate::Store`]'s append methods take: raw JSON bytes, checked in full before
/// anything is written, or an [`EncodedEvent`], whose encoder already did.
pub trait EventBytes: sealed::Sealed {
    fn bytes(&self) -> &[u8];
    /// True when the bytes are known valid, compact and shallow enough.
    fn encoded(&self) -> bool;
}

impl EventBytes for &[u8] {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn encoded(&self) -> bool {
        false
    }
}

impl EventBytes for EncodedEvent {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
    fn encoded(&self) -> bool {
        true
    }
}

impl EventBytes for &EncodedEvent {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
    fn encoded(&self) -> bool {
        true
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for &[u8] {}
    impl Sealed for super::EncodedEvent {}
    impl Sealed for &super::EncodedEvent {}
}

/// serde_json's compact output (the trait's default methods), counting how deep objects and
/// arrays nest.
#[derive(Default)]
struct DepthCounting {
    depth: usize,
    max: usize,
}

impl DepthCounting {
    fn open(&mut self) {
        self.depth += 1;
        self.max = self.max.max(self.depth);
    }

    fn close(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }
}

/// The formatter serde_json owns during one serialization, counting into a `DepthCounting`
/// the encoder reads afterwards.
struct Counting<'a>(&'a mut DepthCounting);

impl Formatter for Counting<'_> {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.0.open();
        writer.write_all(b"[")
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.0.close();
        writer.write_all(b"]")
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.0.open();
        writer.write_all(b"{")
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.0.close();
        writer.write_all(b"}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_serde_json_compact() {
        let value = serde_json::json!({"a": [1, {"b": "line\nbreak \"quoted\""}], "c": null});
        let encoded = EncodedEvent::encode(&value).unwrap_or_else(|e| unreachable!("{e}"));
        let compact = serde_json::to_vec(&value).unwrap_or_default();
        assert_eq!(encoded.as_bytes(), compact.as_slice());
        assert!(!encoded.as_bytes().contains(&b'\n'));
    }

    #[test]
    fn counts_nesting_and_refuses_too_deep() {
        let mut ok = serde_json::json!(1);
        for _ in 0..MAX_EVENT_DEPTH {
            ok = serde_json::json!([ok]);
        }
        assert!(EncodedEvent::encode(&ok).is_ok());
        let deep = serde_json::json!({ "x": ok });
        let err = EncodedEvent::encode(&deep).err().unwrap_or_default();
        assert!(err.contains("nests deeper"), "{err}");
    }

    #[test]
    fn a_map_with_non_string_keys_is_an_error_not_a_panic() {
        let mut m = std::collections::BTreeMap::new();
        m.insert(vec![1u8], 2);
        let err = EncodedEvent::encode(&m).err().unwrap_or_default();
        assert!(err.contains("cannot serialize"), "{err}");
    }
}
