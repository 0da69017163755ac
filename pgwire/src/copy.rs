// Rows inside CopyData payloads, in COPY's text and CSV formats.
// Spec: https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.2 (Text Format) and
// https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.3 (CSV Format);
// CopyData itself: https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-COPY
//
// One row per call. PostgreSQL's server sends exactly one row per CopyData message in COPY TO
// (`CopySendEndOfRow` flushes each row as its own message), so a CopyData payload from the server
// is one row plus its newline. Clients are under no such rule in COPY FROM STDIN (psql sends
// whatever its read buffer holds): a caller that inspects client COPY data must first reassemble
// lines across messages (and, for CSV, across newlines inside quoted fields). Only the default
// NULL spellings (`\N` in text, an unquoted empty field in CSV) and ESCAPE equal to QUOTE are
// supported.

use crate::error::DecodeError;

const TEXT_ROW: &str = "COPY text-format row";
const CSV_ROW: &str = "COPY CSV-format row";

/// Default field delimiter of the text format.
pub const TEXT_DEFAULT_DELIMITER: u8 = b'\t';
/// Default field delimiter of the CSV format.
pub const CSV_DEFAULT_DELIMITER: u8 = b',';
/// Default quote character of the CSV format.
pub const CSV_DEFAULT_QUOTE: u8 = b'"';

fn invalid(what: &'static str, detail: impl Into<String>) -> DecodeError {
    DecodeError::Invalid {
        what,
        detail: detail.into(),
    }
}

/// The row without its line ending (`\n` or `\r\n`, as PostgreSQL accepts both).
fn strip_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Whether `line` is the `\.` end-of-data marker that older clients send at the end of COPY FROM
/// STDIN; it is not a row and must not be passed to [`split_text_row`] or [`split_csv_row`].
pub fn is_end_of_data_marker(line: &[u8]) -> bool {
    strip_line_end(line) == b"\\."
}

/// PostgreSQL's rule for text-format delimiters: one ASCII byte that is not a newline, carriage
/// return, backslash, dot, lowercase letter or digit (those would be read as escapes).
fn check_text_delimiter(delimiter: u8) -> Result<(), DecodeError> {
    if !delimiter.is_ascii()
        || delimiter == b'\n'
        || delimiter == b'\r'
        || delimiter == b'\\'
        || delimiter == b'.'
        || delimiter.is_ascii_lowercase()
        || delimiter.is_ascii_digit()
    {
        return Err(invalid(
            TEXT_ROW,
            format!(
                "delimiter 0x{delimiter:02x} is not allowed in text format (PostgreSQL rejects \
                 it too)"
            ),
        ));
    }
    Ok(())
}

/// Splits one text-format row into de-escaped values; `None` is NULL (`\N`).
///
/// `line` may end with its newline. Backslash escapes (`\b \f \n \r \t \v`, `\` + 1-3 octal
/// digits, `\x` + 1-2 hex digits, `\` + any other byte for that byte) are decoded. An empty line
/// is one empty field: a row of a zero-column table cannot be told apart from it.
pub fn split_text_row(line: &[u8], delimiter: u8) -> Result<Vec<Option<Vec<u8>>>, DecodeError> {
    check_text_delimiter(delimiter)?;
    let line = strip_line_end(line);
    let mut fields = Vec::new();
    let mut value = Vec::new();
    let mut raw_start = 0usize;
    let mut bytes = line.iter().copied().enumerate().peekable();
    let finish_field = |raw: &[u8], value: &mut Vec<u8>| {
        if raw == b"\\N" {
            value.clear();
            None
        } else {
            Some(std::mem::take(value))
        }
    };
    while let Some((i, b)) = bytes.next() {
        match b {
            b'\\' => {
                let Some((_, escaped)) = bytes.next() else {
                    return Err(invalid(
                        TEXT_ROW,
                        "the row ends with an unfinished backslash escape",
                    ));
                };
                let decoded = match escaped {
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'v' => 0x0b,
                    b'0'..=b'7' => {
                        let mut v = u32::from(escaped - b'0');
                        for _ in 0..2 {
                            match bytes.peek() {
                                Some(&(_, d @ b'0'..=b'7')) => {
                                    v = v * 8 + u32::from(d - b'0');
                                    bytes.next();
                                }
                                _ => break,
                            }
                        }
                        // PostgreSQL keeps the low 8 bits of `\777`.
                        u8::try_from(v & 0xff).unwrap_or(0)
                    }
                    b'x' => match bytes.peek().and_then(|&(_, d)| hex_value(d)) {
                        None => b'x',
                        Some(first) => {
                            bytes.next();
                            let mut v = first;
                            if let Some(second) = bytes.peek().and_then(|&(_, d)| hex_value(d)) {
                                bytes.next();
                                v = v * 16 + second;
                            }
                            v
                        }
                    },
                    b'\n' | b'\r' => {
                        return Err(invalid(
                            TEXT_ROW,
                            "a backslash is followed by a line break inside the row",
                        ))
                    }
                    other => other,
                };
                value.push(decoded);
            }
            b'\n' | b'\r' => {
                return Err(invalid(
                    TEXT_ROW,
                    "unescaped line break inside the row: more than one row in one CopyData \
                     message, or data that should have been escaped as \\n or \\r",
                ));
            }
            _ if b == delimiter => {
                let raw = line.get(raw_start..i).unwrap_or_default();
                fields.push(finish_field(raw, &mut value));
                raw_start = i.saturating_add(1);
            }
            _ => value.push(b),
        }
    }
    let raw = line.get(raw_start..).unwrap_or_default();
    fields.push(finish_field(raw, &mut value));
    Ok(fields)
}

fn hex_value(d: u8) -> Option<u8> {
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    }
}

/// Writes one text-format row followed by `\n`, escaping as PostgreSQL's COPY TO does: control
/// characters as `\b \f \n \r \t \v`, backslash and the delimiter with a backslash, NULL as `\N`.
///
/// `delimiter` must be one [`split_text_row`] accepts.
pub fn join_text_row(fields: &[Option<Vec<u8>>], delimiter: u8, out: &mut Vec<u8>) {
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.push(delimiter);
        }
        let Some(value) = field else {
            out.extend_from_slice(b"\\N");
            continue;
        };
        for &b in value {
            let escaped = match b {
                0x08 => Some(b'b'),
                0x0c => Some(b'f'),
                b'\n' => Some(b'n'),
                b'\r' => Some(b'r'),
                b'\t' => Some(b't'),
                0x0b => Some(b'v'),
                b'\\' => Some(b'\\'),
                _ if b == delimiter => Some(b),
                _ => None,
            };
            match escaped {
                Some(e) => out.extend_from_slice(&[b'\\', e]),
                None => out.push(b),
            }
        }
    }
    out.push(b'\n');
}

fn check_csv_options(delimiter: u8, quote: u8) -> Result<(), DecodeError> {
    let bad = |b: u8| !b.is_ascii() || b == b'\n' || b == b'\r';
    if bad(delimiter) || bad(quote) || delimiter == quote {
        return Err(invalid(
            CSV_ROW,
            format!(
                "delimiter 0x{delimiter:02x} and quote 0x{quote:02x} must be different ASCII \
                 bytes other than newline and carriage return (PostgreSQL rejects them too)"
            ),
        ));
    }
    Ok(())
}

/// Splits one CSV-format row into values; `None` is NULL (an unquoted empty field, while `""` is
/// an empty string).
///
/// `line` may end with its newline. Quoted fields may contain the delimiter, line breaks and
/// doubled quotes (`""` for `"`); quoted and unquoted parts of one field are concatenated as
/// PostgreSQL does. A line break outside quotes before the end means more than one row: error.
pub fn split_csv_row(
    line: &[u8],
    delimiter: u8,
    quote: u8,
) -> Result<Vec<Option<Vec<u8>>>, DecodeError> {
    check_csv_options(delimiter, quote)?;
    let mut fields = Vec::new();
    let mut value = Vec::new();
    let mut saw_quote = false;
    let mut in_quotes = false;
    let mut bytes = line.iter().copied().enumerate().peekable();
    while let Some((i, b)) = bytes.next() {
        if in_quotes {
            if b == quote {
                if bytes.peek().map(|&(_, next)| next) == Some(quote) {
                    bytes.next();
                    value.push(quote);
                } else {
                    in_quotes = false;
                }
            } else {
                value.push(b);
            }
        } else if b == delimiter {
            fields.push(csv_field(&mut value, saw_quote));
            saw_quote = false;
        } else if b == quote {
            in_quotes = true;
            saw_quote = true;
        } else if b == b'\n' || b == b'\r' {
            let rest = line.get(i..).unwrap_or_default();
            if rest != b"\n" && rest != b"\r\n" {
                return Err(invalid(
                    CSV_ROW,
                    "line break outside quotes before the end: more than one row in one \
                     CopyData message",
                ));
            }
            break;
        } else {
            value.push(b);
        }
    }
    if in_quotes {
        return Err(invalid(CSV_ROW, "unterminated quoted field"));
    }
    fields.push(csv_field(&mut value, saw_quote));
    Ok(fields)
}

fn csv_field(value: &mut Vec<u8>, saw_quote: bool) -> Option<Vec<u8>> {
    if value.is_empty() && !saw_quote {
        None
    } else {
        Some(std::mem::take(value))
    }
}

/// Writes one CSV-format row followed by `\n`. NULL is an empty unquoted field; a value is quoted
/// when it is empty, equals `\.`, or contains the delimiter, the quote or a line break, with
/// quotes doubled inside.
pub fn join_csv_row(fields: &[Option<Vec<u8>>], delimiter: u8, quote: u8, out: &mut Vec<u8>) {
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.push(delimiter);
        }
        let Some(value) = field else {
            continue;
        };
        let needs_quotes = value.is_empty()
            || value.as_slice() == b"\\."
            || value
                .iter()
                .any(|&b| b == delimiter || b == quote || b == b'\n' || b == b'\r');
        if !needs_quotes {
            out.extend_from_slice(value);
            continue;
        }
        out.push(quote);
        for &b in value {
            if b == quote {
                out.push(quote);
            }
            out.push(b);
        }
        out.push(quote);
    }
    out.push(b'\n');
}

// ----- binary format -------------------------------------------------------------------------
// Spec: https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4 (Binary Format).
//
// The server's COPY TO sends the file header together with the first tuple (or with the
// trailer when there are no rows), then one tuple per CopyData, then the trailer (a field count
// of -1) in its own message. [`split_binary`] reads one such payload.

const BINARY: &str = "COPY binary-format data";

/// The 11 bytes a binary COPY stream starts with.
pub const BINARY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// One piece of a binary COPY payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinaryPart<'a> {
    /// The file header: signature, flags and the header extension, byte for byte.
    Header(&'a [u8]),
    /// One tuple's values; `None` is NULL.
    Tuple(Vec<Option<&'a [u8]>>),
    /// The end of the data (field count -1).
    Trailer,
}

/// Splits one CopyData payload of a binary COPY into its header (when `expect_header`: the
/// first payload), tuples and trailer. Every length is checked against what is there; flags
/// with a bit PostgreSQL marks critical and unknown (bits 16-31, bit 16 being OIDs, which no
/// server since 12 sends) are refused, as PostgreSQL's reader refuses them.
pub fn split_binary(body: &[u8], expect_header: bool) -> Result<Vec<BinaryPart<'_>>, DecodeError> {
    let mut parts = Vec::new();
    let mut rest = body;
    if expect_header {
        let Some(after_signature) = rest.strip_prefix(BINARY_SIGNATURE.as_slice()) else {
            return Err(invalid(
                BINARY,
                "the header does not start with PGCOPY's signature",
            ));
        };
        let (flags, after_flags) = take_u32(after_signature, "header flags")?;
        if flags & 0xffff_0000 != 0 {
            return Err(invalid(
                BINARY,
                format!("header flags 0x{flags:08x} have critical bits set"),
            ));
        }
        let (extension_len, after_len) = take_u32(after_flags, "header extension length")?;
        let extension_len = usize::try_from(extension_len).unwrap_or(usize::MAX);
        if after_len.len() < extension_len {
            return Err(invalid(BINARY, "the header extension is cut short"));
        }
        let header_len = body.len() - after_len.len() + extension_len;
        parts.push(BinaryPart::Header(
            body.get(..header_len).unwrap_or_default(),
        ));
        rest = after_len.get(extension_len..).unwrap_or_default();
    }
    while !rest.is_empty() {
        let (count, after_count) = take_i16(rest)?;
        if count == -1 {
            parts.push(BinaryPart::Trailer);
            rest = after_count;
            if !rest.is_empty() {
                return Err(invalid(BINARY, "data after the trailer"));
            }
            break;
        }
        let count = usize::try_from(count)
            .map_err(|_| invalid(BINARY, format!("negative field count {count}")))?;
        let mut values = Vec::with_capacity(count.min(1600));
        let mut cursor = after_count;
        for _ in 0..count {
            let (len, after_len) = take_u32(cursor, "field length")?;
            if len == u32::MAX {
                values.push(None);
                cursor = after_len;
                continue;
            }
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > i32::MAX as usize || after_len.len() < len {
                return Err(invalid(BINARY, "a field is longer than the data left"));
            }
            let (value, after_value) = after_len.split_at(len);
            values.push(Some(value));
            cursor = after_value;
        }
        parts.push(BinaryPart::Tuple(values));
        rest = cursor;
    }
    Ok(parts)
}

/// Appends one tuple in binary COPY format.
pub fn join_binary_tuple(values: &[Option<&[u8]>], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let count = i16::try_from(values.len()).map_err(|_| {
        invalid(
            BINARY,
            format!("{} fields do not fit a tuple", values.len()),
        )
    })?;
    out.extend_from_slice(&count.to_be_bytes());
    for value in values {
        match value {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                let len = i32::try_from(v.len())
                    .map_err(|_| invalid(BINARY, "a field is longer than 2 GiB"))?;
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    Ok(())
}

/// The trailer that ends binary COPY data.
pub const BINARY_TRAILER: [u8; 2] = (-1i16).to_be_bytes();

fn take_u32<'a>(bytes: &'a [u8], what: &str) -> Result<(u32, &'a [u8]), DecodeError> {
    match bytes {
        [a, b, c, d, rest @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), rest)),
        _ => Err(invalid(BINARY, format!("the {what} is cut short"))),
    }
}

fn take_i16(bytes: &[u8]) -> Result<(i16, &[u8]), DecodeError> {
    match bytes {
        [a, b, rest @ ..] => Ok((i16::from_be_bytes([*a, *b]), rest)),
        _ => Err(invalid(BINARY, "the field count is cut short")),
    }
}
