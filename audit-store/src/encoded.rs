//! Events serialized by the store's own encoder. The store checks raw event bytes with a full
//! JSON parse and a nesting scan before writing them; an [`EncodedEvent`] was produced by
//! serde_json's compact serializer with its nesting counted on the way, so it is one line of
//! valid JSON that fits the record line by construction, and only its size is checked again.
//! At tens of thousands of events a second, the second parse cost more than the write.

use serde::Serialize;
use serde_json::ser::Formatter;

/// Far below serde_json's limit of 128 levels, which the record line adds one to.
pub(crate) const MAX_EVENT_DEPTH: usize = 64;

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

/// A key of an event object: ASCII letters, digits and `_`, written as it is (nothing to
/// escape). `Key::new` is `const`: declared as a constant, a key that is not plain does not
/// compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key(&'static str);

impl Key {
    pub const fn new(key: &'static str) -> Self {
        let mut rest = key.as_bytes();
        assert!(!rest.is_empty(), "an event key is not empty");
        while let [c, tail @ ..] = rest {
            assert!(
                c.is_ascii_alphanumeric() || *c == b'_',
                "an event key is ASCII letters, digits and _"
            );
            rest = tail;
        }
        Self(key)
    }

    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

/// Writes one event object field by field, for events whose constant parts are kept
/// encoded ([`Fields`]): what serde_json's compact output of a struct with these fields in
/// this order would be, valid by construction, its nesting counted as it is written. A value
/// that cannot be serialized makes [`ObjectWriter::finish`] an error.
pub struct ObjectWriter {
    out: Vec<u8>,
    depth: DepthCounting,
    first: bool,
    failed: Option<String>,
}

impl ObjectWriter {
    pub fn with_capacity(capacity: usize) -> Self {
        let mut out = Vec::with_capacity(capacity);
        out.push(b'{');
        Self {
            out,
            depth: DepthCounting { depth: 1, max: 1 },
            first: true,
            failed: None,
        }
    }

    fn separate(&mut self) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
    }

    /// `"key":value`, the value as serde_json writes it.
    pub fn field<T: Serialize + ?Sized>(&mut self, key: Key, value: &T) {
        if self.failed.is_some() {
            return;
        }
        self.separate();
        self.out.push(b'"');
        self.out.extend_from_slice(key.0.as_bytes());
        self.out.extend_from_slice(b"\":");
        let written = value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut self.out,
            Counting(&mut self.depth),
        ));
        if let Err(e) = written {
            self.failed = Some(format!("cannot serialize `{}`: {e}", key.0));
        }
    }

    /// Fields encoded earlier, copied as they are.
    pub fn fields(&mut self, fields: &Fields) {
        if fields.json.is_empty() {
            return;
        }
        self.separate();
        self.out.extend_from_slice(&fields.json);
        self.depth.max = self.depth.max.max(fields.depth);
    }

    /// The event; an error names a value that could not be serialized, or nesting deeper
    /// than the record line allows.
    pub fn finish(mut self) -> Result<EncodedEvent, String> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.depth.max > MAX_EVENT_DEPTH {
            return Err(format!("event nests deeper than {MAX_EVENT_DEPTH} levels"));
        }
        self.out.push(b'}');
        Ok(EncodedEvent(self.out))
    }
}

/// Fields serialized once and copied into many events by [`ObjectWriter::fields`]: what a
/// connection's events all say about the connection, for instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    /// `"a":1,"b":"x"`: the fields without the object's braces; empty for none.
    json: Box<[u8]>,
    /// How deep they nest, counting the object they are written into as 1.
    depth: usize,
}

impl Fields {
    /// The fields `write` writes; an error as [`ObjectWriter::finish`] gives one.
    pub fn encode(write: impl FnOnce(&mut ObjectWriter)) -> Result<Self, String> {
        let mut writer = ObjectWriter::with_capacity(256);
        write(&mut writer);
        let depth = writer.depth.max;
        let object = writer.finish()?.0;
        let json = object
            .get(1..object.len() - 1)
            .map(Box::from)
            .unwrap_or_default();
        Ok(Self { json, depth })
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

    #[derive(Serialize)]
    struct Sample<'a> {
        a: u64,
        text: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        absent: Option<u8>,
        list: &'a [Option<&'a str>],
        nested: serde_json::Value,
        last: bool,
    }

    /// Field by field, with some fields encoded earlier, the output is serde_json's for the
    /// same struct: byte for byte, escapes included.
    #[test]
    fn an_object_written_field_by_field_is_serde_jsons_own() {
        const A: Key = Key::new("a");
        const TEXT: Key = Key::new("text");
        const LIST: Key = Key::new("list");
        const NESTED: Key = Key::new("nested");
        const LAST: Key = Key::new("last");
        let text = "quote \" backslash \\ newline \n tab \t nul \u{0} é \u{2028}";
        let list = [Some("x\"y"), None, Some("")];
        let nested = serde_json::json!({"k": [1, {"deep": "v"}], "s": "\u{1}"});
        let sample = Sample {
            a: u64::MAX,
            text,
            absent: None,
            list: &list,
            nested: nested.clone(),
            last: true,
        };
        let expected = serde_json::to_vec(&sample).unwrap_or_default();
        let kept = Fields::encode(|w| {
            w.field(TEXT, text);
            w.field(LIST, &list);
        })
        .unwrap_or_default();
        let mut w = ObjectWriter::with_capacity(16);
        w.field(A, &u64::MAX);
        w.fields(&kept);
        w.fields(&Fields::default());
        w.field(NESTED, &nested);
        w.field(LAST, &true);
        let written = w.finish().unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(
            String::from_utf8_lossy(written.as_bytes()),
            String::from_utf8_lossy(&expected)
        );
        let empty = ObjectWriter::with_capacity(0)
            .finish()
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(empty.as_bytes(), b"{}");
    }

    #[test]
    fn written_objects_count_nesting_and_keep_errors() {
        const X: Key = Key::new("x");
        let mut ok = serde_json::json!(1);
        for _ in 0..MAX_EVENT_DEPTH - 1 {
            ok = serde_json::json!([ok]);
        }
        let mut w = ObjectWriter::with_capacity(0);
        w.field(X, &ok);
        assert!(w.finish().is_ok());
        let deep = serde_json::json!([ok]);
        let mut w = ObjectWriter::with_capacity(0);
        w.field(X, &deep);
        let err = w.finish().err().unwrap_or_default();
        assert!(err.contains("nests deeper"), "{err}");
        // Nesting kept in encoded fields counts where they are copied.
        let kept = Fields::encode(|w| w.field(X, &deep))
            .err()
            .unwrap_or_default();
        assert!(kept.contains("nests deeper"), "{kept}");
        let mut m = std::collections::BTreeMap::new();
        m.insert(vec![1u8], 2);
        let mut w = ObjectWriter::with_capacity(0);
        w.field(X, &m);
        w.field(X, &1);
        let err = w.finish().err().unwrap_or_default();
        assert!(err.contains("cannot serialize `x`"), "{err}");
    }

    #[test]
    fn a_map_with_non_string_keys_is_an_error_not_a_panic() {
        let mut m = std::collections::BTreeMap::new();
        m.insert(vec![1u8], 2);
        let err = EncodedEvent::encode(&m).err().unwrap_or_default();
        assert!(err.contains("cannot serialize"), "{err}");
    }
}
