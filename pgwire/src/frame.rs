// Framing of regular (tagged) messages, and the field reader/writer shared by all messages.
// Spec: https://www.postgresql.org/docs/current/protocol-overview.html#PROTOCOL-MESSAGE-CONCEPTS
// and https://www.postgresql.org/docs/current/protocol-message-types.html

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;

/// Tag byte plus the 4-byte length field.
pub(crate) const HEADER_LEN: usize = 5;

/// One framed regular message: the whole frame (tag byte + 4-byte length + body) is kept so
/// unchanged traffic is forwarded without re-encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    /// The message type byte (`b'Q'`, `b'D'`, ...).
    pub tag: u8,
    /// The complete frame as received, tag and length included.
    pub frame: Bytes,
}

impl RawMessage {
    /// The message body: the frame without its tag and length field.
    pub fn body(&self) -> &[u8] {
        self.frame.get(HEADER_LEN..).unwrap_or_default()
    }

    /// The body as a zero-copy [`Bytes`] slice of the frame.
    pub fn body_bytes(&self) -> Bytes {
        if self.frame.len() >= HEADER_LEN {
            self.frame.slice(HEADER_LEN..)
        } else {
            Bytes::new()
        }
    }
}

/// Splits one message off the front of `buf` once it is complete; `Ok(None)` if more bytes are
/// needed.
///
/// The length field is checked (at least 4, at most `max_len`) as soon as the 5-byte header is
/// there, before waiting for the body; nothing is reserved for the body, so a peer announcing a
/// huge message costs no memory. `max_len` bounds the length field, which counts itself but not
/// the tag byte.
pub fn decode_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<RawMessage>, DecodeError> {
    let Some(&[tag, l0, l1, l2, l3]) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([l0, l1, l2, l3]);
    if len < 4 {
        return Err(DecodeError::LengthTooSmall { tag, len });
    }
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > max_len {
        return Err(DecodeError::TooLong {
            tag,
            len,
            max: max_len,
        });
    }
    let Some(total) = len.checked_add(1) else {
        return Err(DecodeError::TooLong {
            tag,
            len,
            max: max_len,
        });
    };
    if buf.len() < total {
        return Ok(None);
    }
    let frame = buf.split_to(total).freeze();
    Ok(Some(RawMessage { tag, frame }))
}

/// A cursor over one message body. Every read is bounds-checked and names the message and field
/// in its error; values that may be forwarded (column values, COPY data) are zero-copy slices.
pub(crate) struct Reader {
    body: Bytes,
    pos: usize,
    message: &'static str,
}

impl Reader {
    pub(crate) fn new(body: Bytes, message: &'static str) -> Self {
        Self {
            body,
            pos: 0,
            message,
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.body.len().saturating_sub(self.pos)
    }

    fn truncated(&self, field: &'static str) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
            field,
        }
    }

    pub(crate) fn invalid(&self, detail: String) -> DecodeError {
        DecodeError::Invalid {
            what: self.message,
            detail,
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let end = self
            .pos
            .checked_add(N)
            .ok_or_else(|| self.truncated(field))?;
        let bytes = self
            .body
            .get(self.pos..end)
            .ok_or_else(|| self.truncated(field))?;
        let array = <[u8; N]>::try_from(bytes).map_err(|_| self.truncated(field))?;
        self.pos = end;
        Ok(array)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        let [b] = self.array::<1>(field)?;
        Ok(b)
    }

    pub(crate) fn i8(&mut self, field: &'static str) -> Result<i8, DecodeError> {
        Ok(i8::from_be_bytes(self.array::<1>(field)?))
    }

    pub(crate) fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array::<2>(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array::<4>(field)?))
    }

    pub(crate) fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array::<4>(field)?))
    }

    pub(crate) fn array4(&mut self, field: &'static str) -> Result<[u8; 4], DecodeError> {
        self.array::<4>(field)
    }

    /// An Int16 element count, read unsigned as PostgreSQL itself does (`pq_getmsgint(.., 2)`;
    /// libpq allows up to 65535 bind parameters), and checked against the bytes left so that the
    /// caller can allocate `count` elements of at least `min_element_len` bytes each.
    pub(crate) fn count16(
        &mut self,
        field: &'static str,
        min_element_len: usize,
    ) -> Result<usize, DecodeError> {
        let count = usize::from(u16::from_be_bytes(self.array::<2>(field)?));
        self.check_count(field, count, min_element_len)?;
        Ok(count)
    }

    /// An Int32 element count (NegotiateProtocolVersion), rejected when negative.
    pub(crate) fn count32(
        &mut self,
        field: &'static str,
        min_element_len: usize,
    ) -> Result<usize, DecodeError> {
        let value = self.i32(field)?;
        let count = usize::try_from(value).map_err(|_| DecodeError::NegativeLength {
            message: self.message,
            field,
            value,
        })?;
        self.check_count(field, count, min_element_len)?;
        Ok(count)
    }

    fn check_count(
        &self,
        field: &'static str,
        count: usize,
        min_element_len: usize,
    ) -> Result<(), DecodeError> {
        let needed = count.saturating_mul(min_element_len);
        if needed > self.remaining() {
            return Err(self.invalid(format!(
                "{field} is {count} but only {} bytes follow, too few for that many elements",
                self.remaining()
            )));
        }
        Ok(())
    }

    /// `n` bytes as a zero-copy slice.
    pub(crate) fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or_else(|| self.truncated(field))?;
        if end > self.body.len() {
            return Err(self.truncated(field));
        }
        let bytes = self.body.slice(self.pos..end);
        self.pos = end;
        Ok(bytes)
    }

    /// Everything left in the body.
    pub(crate) fn rest(&mut self) -> Bytes {
        let start = self.pos.min(self.body.len());
        self.pos = self.body.len();
        self.body.slice(start..)
    }

    /// An Int32 length followed by that many bytes; length -1 is SQL NULL.
    pub(crate) fn nullable_value(
        &mut self,
        field: &'static str,
    ) -> Result<Option<Bytes>, DecodeError> {
        let len = self.i32(field)?;
        if len == -1 {
            return Ok(None);
        }
        let n = usize::try_from(len).map_err(|_| DecodeError::NegativeLength {
            message: self.message,
            field,
            value: len,
        })?;
        self.bytes(n, field).map(Some)
    }

    /// The raw bytes of a NUL-terminated string, terminator consumed but not returned.
    pub(crate) fn cstr_bytes(&mut self, field: &'static str) -> Result<&[u8], DecodeError> {
        let rest = self.body.get(self.pos..).unwrap_or_default();
        let Some(nul) = rest.iter().position(|b| *b == 0) else {
            return Err(DecodeError::MissingTerminator {
                message: self.message,
                field,
            });
        };
        let start = self.pos;
        self.pos = start.saturating_add(nul).saturating_add(1);
        Ok(self
            .body
            .get(start..start.saturating_add(nul))
            .unwrap_or_default())
    }

    /// A NUL-terminated UTF-8 string.
    pub(crate) fn cstr(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let message = self.message;
        let bytes = self.cstr_bytes(field)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 { message, field })
    }

    /// Fails unless the whole body was consumed.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes {
                message: self.message,
                extra,
            }),
        }
    }
}

/// A message cannot be represented on the wire: a count above 65535 or a body above the Int32
/// length range. The encoders then write nothing rather than a corrupt frame.
#[derive(Debug)]
pub(crate) struct Unrepresentable;

/// Writes one frame: the optional tag, a length placeholder, then `body`, and patches the length.
///
/// If `body` reports [`Unrepresentable`] or the frame would exceed `i32::MAX` bytes, `out` is
/// restored to its previous length, so a caller never forwards a half-written or mis-framed
/// message.
pub(crate) fn write_frame(
    out: &mut BytesMut,
    tag: Option<u8>,
    body: impl FnOnce(&mut BytesMut) -> Result<(), Unrepresentable>,
) {
    let start = out.len();
    if let Some(tag) = tag {
        out.put_u8(tag);
    }
    let len_at = out.len();
    out.put_u32(0);
    let ok = body(out).is_ok();
    let len = out.len().saturating_sub(len_at);
    let len = match i32::try_from(len) {
        Ok(len) if ok => len,
        _ => {
            out.truncate(start);
            return;
        }
    };
    match out.get_mut(len_at..len_at.saturating_add(4)) {
        Some(slot) => slot.copy_from_slice(&len.to_be_bytes()),
        None => out.truncate(start),
    }
}

/// Writes `s` up to (not including) its first NUL byte, then the terminating NUL: a string with
/// an embedded NUL is read by PostgreSQL as that prefix anyway, and this keeps the frame intact.
pub(crate) fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
    out.put_slice(s.get(..end).unwrap_or_default());
    out.put_u8(0);
}

/// The prefix of `s` before its first NUL byte.
pub(crate) fn until_nul(s: &[u8]) -> &[u8] {
    let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
    s.get(..end).unwrap_or_default()
}

/// Writes an Int16 element count (unsigned on the wire, as PostgreSQL reads it).
pub(crate) fn put_count16(out: &mut BytesMut, count: usize) -> Result<(), Unrepresentable> {
    let count = u16::try_from(count).map_err(|_| Unrepresentable)?;
    out.put_u16(count);
    Ok(())
}

/// Writes an Int32 length and the bytes, or -1 for NULL.
pub(crate) fn put_nullable_value(
    out: &mut BytesMut,
    value: Option<&[u8]>,
) -> Result<(), Unrepresentable> {
    match value {
        None => out.put_i32(-1),
        Some(v) => {
            let len = i32::try_from(v.len()).map_err(|_| Unrepresentable)?;
            out.put_i32(len);
            out.put_slice(v);
        }
    }
    Ok(())
}

/// Writes a message whose body is empty.
pub(crate) fn write_empty(out: &mut BytesMut, tag: u8) {
    write_frame(out, Some(tag), |_| Ok(()));
}

/// Writes a message whose body is `body` verbatim.
pub(crate) fn write_raw(out: &mut BytesMut, tag: u8, body: &[u8]) {
    write_frame(out, Some(tag), |out| {
        out.put_slice(body);
        Ok(())
    });
}
