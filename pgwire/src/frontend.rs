// Client-to-server (frontend) regular messages.
// Spec: https://www.postgresql.org/docs/current/protocol-message-formats.html
// (Bind, Close, CopyData, CopyDone, CopyFail, Describe, Execute, Flush, FunctionCall,
// GSSResponse, Parse, PasswordMessage, Query, SASLInitialResponse, SASLResponse, Sync, Terminate)

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, Side};
use crate::frame::{
    put_count16, put_cstr, put_nullable_value, write_empty, write_frame, write_raw, RawMessage,
    Reader,
};

/// What a Describe or Close message refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DescribeTarget {
    /// A prepared statement (`S`).
    Statement,
    /// A portal (`P`).
    Portal,
}

impl DescribeTarget {
    /// The wire byte.
    pub fn as_byte(self) -> u8 {
        match self {
            DescribeTarget::Statement => b'S',
            DescribeTarget::Portal => b'P',
        }
    }

    /// Parses the wire byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'S' => Some(DescribeTarget::Statement),
            b'P' => Some(DescribeTarget::Portal),
            _ => None,
        }
    }
}

/// A client-to-server message after the startup phase.
///
/// Strings must be UTF-8 ([`DecodeError::InvalidUtf8`] otherwise) and never contain NUL once
/// decoded. When encoding, strings are cut at their first NUL byte, which is where PostgreSQL
/// would stop reading them anyway; the frame stays well-formed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage {
    /// Simple query (`Q`).
    Query { sql: String },
    /// Parse (`P`): prepare `sql` as `statement` (empty name: the unnamed statement).
    Parse {
        statement: String,
        sql: String,
        /// Parameter type OIDs; 0 leaves the type unspecified.
        param_types: Vec<u32>,
    },
    /// Bind (`B`): create `portal` from `statement` with parameter values.
    Bind {
        portal: String,
        statement: String,
        /// Zero (all text), one (applies to all) or one per parameter; 0 text, 1 binary.
        param_formats: Vec<i16>,
        /// `None` is SQL NULL.
        params: Vec<Option<Bytes>>,
        result_formats: Vec<i16>,
    },
    /// Describe (`D`).
    Describe {
        target: DescribeTarget,
        name: String,
    },
    /// Execute (`E`): run `portal`, returning at most `max_rows` rows (0: no limit).
    Execute { portal: String, max_rows: i32 },
    /// Close (`C`).
    Close {
        target: DescribeTarget,
        name: String,
    },
    /// Sync (`S`).
    Sync,
    /// Flush (`H`).
    Flush,
    /// CopyData (`d`).
    CopyData(Bytes),
    /// CopyDone (`c`).
    CopyDone,
    /// CopyFail (`f`).
    CopyFail { message: String },
    /// FunctionCall (`F`), the legacy fast-path interface.
    FunctionCall {
        function_oid: u32,
        /// Zero, one or one per argument, like Bind's parameter formats.
        arg_formats: Vec<i16>,
        args: Vec<Option<Bytes>>,
        result_format: i16,
    },
    /// Terminate (`X`).
    Terminate,
    /// `p`: PasswordMessage, SASLInitialResponse, SASLResponse or GSSResponse. Which one depends
    /// on the authentication request the server sent, so the body is kept raw; see
    /// [`parse_password`] and [`parse_sasl_initial_response`].
    PasswordLike(Bytes),
}

/// Parses a client message framed by [`crate::decode_frame`].
pub fn parse_frontend(msg: &RawMessage) -> Result<FrontendMessage, DecodeError> {
    let body = msg.body_bytes();
    match msg.tag {
        b'Q' => {
            let mut r = Reader::new(body, "Query");
            let sql = r.cstr("query string")?;
            r.finish()?;
            Ok(FrontendMessage::Query { sql })
        }
        b'P' => {
            let mut r = Reader::new(body, "Parse");
            let statement = r.cstr("statement name")?;
            let sql = r.cstr("query string")?;
            let count = r.count16("parameter type count", 4)?;
            let mut param_types = Vec::with_capacity(count);
            for _ in 0..count {
                param_types.push(r.u32("parameter type OID")?);
            }
            r.finish()?;
            Ok(FrontendMessage::Parse {
                statement,
                sql,
                param_types,
            })
        }
        b'B' => {
            let mut r = Reader::new(body, "Bind");
            let portal = r.cstr("portal name")?;
            let statement = r.cstr("statement name")?;
            let param_formats = read_formats(&mut r, "parameter format count")?;
            let params = read_values(&mut r, "parameter count", "parameter value")?;
            check_format_count(&r, "parameter", param_formats.len(), params.len())?;
            let result_formats = read_formats(&mut r, "result format count")?;
            r.finish()?;
            Ok(FrontendMessage::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            })
        }
        b'D' | b'C' => {
            let (message, kind) = if msg.tag == b'D' {
                ("Describe", FrontendKind::Describe)
            } else {
                ("Close", FrontendKind::Close)
            };
            let mut r = Reader::new(body, message);
            let byte = r.u8("target type")?;
            let target = DescribeTarget::from_byte(byte).ok_or_else(|| {
                r.invalid(format!(
                    "target type is 0x{byte:02x}; it must be 'S' (statement) or 'P' (portal)"
                ))
            })?;
            let name = r.cstr("name")?;
            r.finish()?;
            Ok(match kind {
                FrontendKind::Describe => FrontendMessage::Describe { target, name },
                FrontendKind::Close => FrontendMessage::Close { target, name },
            })
        }
        b'E' => {
            let mut r = Reader::new(body, "Execute");
            let portal = r.cstr("portal name")?;
            let max_rows = r.i32("maximum row count")?;
            r.finish()?;
            Ok(FrontendMessage::Execute { portal, max_rows })
        }
        b'S' => empty(body, "Sync", FrontendMessage::Sync),
        b'H' => empty(body, "Flush", FrontendMessage::Flush),
        b'X' => empty(body, "Terminate", FrontendMessage::Terminate),
        b'c' => empty(body, "CopyDone", FrontendMessage::CopyDone),
        b'd' => Ok(FrontendMessage::CopyData(body)),
        b'f' => {
            let mut r = Reader::new(body, "CopyFail");
            let message = r.cstr("error message")?;
            r.finish()?;
            Ok(FrontendMessage::CopyFail { message })
        }
        b'F' => {
            let mut r = Reader::new(body, "FunctionCall");
            let function_oid = r.u32("function OID")?;
            let arg_formats = read_formats(&mut r, "argument format count")?;
            let args = read_values(&mut r, "argument count", "argument value")?;
            check_format_count(&r, "argument", arg_formats.len(), args.len())?;
            let result_format = r.i16("result format")?;
            r.finish()?;
            Ok(FrontendMessage::FunctionCall {
                function_oid,
                arg_formats,
                args,
                result_format,
            })
        }
        b'p' => Ok(FrontendMessage::PasswordLike(body)),
        tag => Err(DecodeError::UnknownTag {
            tag,
            side: Side::Frontend,
        }),
    }
}

enum FrontendKind {
    Describe,
    Close,
}

fn empty(
    body: Bytes,
    message: &'static str,
    parsed: FrontendMessage,
) -> Result<FrontendMessage, DecodeError> {
    Reader::new(body, message).finish()?;
    Ok(parsed)
}

fn read_formats(r: &mut Reader, count_field: &'static str) -> Result<Vec<i16>, DecodeError> {
    let count = r.count16(count_field, 2)?;
    let mut formats = Vec::with_capacity(count);
    for _ in 0..count {
        formats.push(r.i16("format code")?);
    }
    Ok(formats)
}

fn read_values(
    r: &mut Reader,
    count_field: &'static str,
    value_field: &'static str,
) -> Result<Vec<Option<Bytes>>, DecodeError> {
    let count = r.count16(count_field, 4)?;
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        values.push(r.nullable_value(value_field)?);
    }
    Ok(values)
}

/// PostgreSQL rejects a format list that is neither empty, one entry, nor one per value; so do
/// we, so that callers can trust which format applies to each value.
fn check_format_count(
    r: &Reader,
    what: &str,
    formats: usize,
    values: usize,
) -> Result<(), DecodeError> {
    if formats > 1 && formats != values {
        return Err(r.invalid(format!(
            "{formats} {what} format codes for {values} {what}s; there must be 0, 1 or \
             one per {what}"
        )));
    }
    Ok(())
}

/// Writes a client message.
///
/// Strings are cut at their first NUL byte. A message with more than 65535 parameters, formats or
/// arguments, or a body above 2 GiB, cannot be represented: nothing is written then.
pub fn encode_frontend(msg: &FrontendMessage, out: &mut BytesMut) {
    match msg {
        FrontendMessage::Query { sql } => write_frame(out, Some(b'Q'), |out| {
            put_cstr(out, sql.as_bytes());
            Ok(())
        }),
        FrontendMessage::Parse {
            statement,
            sql,
            param_types,
        } => write_frame(out, Some(b'P'), |out| {
            put_cstr(out, statement.as_bytes());
            put_cstr(out, sql.as_bytes());
            put_count16(out, param_types.len())?;
            for oid in param_types {
                out.put_u32(*oid);
            }
            Ok(())
        }),
        FrontendMessage::Bind {
            portal,
            statement,
            param_formats,
            params,
            result_formats,
        } => write_frame(out, Some(b'B'), |out| {
            put_cstr(out, portal.as_bytes());
            put_cstr(out, statement.as_bytes());
            put_formats(out, param_formats)?;
            put_count16(out, params.len())?;
            for value in params {
                put_nullable_value(out, value.as_deref())?;
            }
            put_formats(out, result_formats)
        }),
        FrontendMessage::Describe { target, name } => {
            write_target_message(out, b'D', *target, name);
        }
        FrontendMessage::Close { target, name } => write_target_message(out, b'C', *target, name),
        FrontendMessage::Execute { portal, max_rows } => write_frame(out, Some(b'E'), |out| {
            put_cstr(out, portal.as_bytes());
            out.put_i32(*max_rows);
            Ok(())
        }),
        FrontendMessage::Sync => write_empty(out, b'S'),
        FrontendMessage::Flush => write_empty(out, b'H'),
        FrontendMessage::Terminate => write_empty(out, b'X'),
        FrontendMessage::CopyDone => write_empty(out, b'c'),
        FrontendMessage::CopyData(data) => write_raw(out, b'd', data),
        FrontendMessage::CopyFail { message } => write_frame(out, Some(b'f'), |out| {
            put_cstr(out, message.as_bytes());
            Ok(())
        }),
        FrontendMessage::FunctionCall {
            function_oid,
            arg_formats,
            args,
            result_format,
        } => write_frame(out, Some(b'F'), |out| {
            out.put_u32(*function_oid);
            put_formats(out, arg_formats)?;
            put_count16(out, args.len())?;
            for value in args {
                put_nullable_value(out, value.as_deref())?;
            }
            out.put_i16(*result_format);
            Ok(())
        }),
        FrontendMessage::PasswordLike(body) => write_raw(out, b'p', body),
    }
}

fn put_formats(out: &mut BytesMut, formats: &[i16]) -> Result<(), crate::frame::Unrepresentable> {
    put_count16(out, formats.len())?;
    for format in formats {
        out.put_i16(*format);
    }
    Ok(())
}

fn write_target_message(out: &mut BytesMut, tag: u8, target: DescribeTarget, name: &str) {
    write_frame(out, Some(tag), |out| {
        out.put_u8(target.as_byte());
        put_cstr(out, name.as_bytes());
        Ok(())
    });
}

/// Writes a SASLInitialResponse: the chosen mechanism (cut at a NUL) and the client-first data.
pub fn encode_sasl_initial_response(mechanism: &str, data: &[u8], out: &mut BytesMut) {
    write_frame(out, Some(b'p'), |out| {
        put_cstr(out, mechanism.as_bytes());
        put_nullable_value(out, Some(data))
    });
}

/// Writes a SASLResponse carrying `data` verbatim.
pub fn encode_sasl_response(data: &[u8], out: &mut BytesMut) {
    write_raw(out, b'p', data);
}

/// Writes a PasswordMessage (cleartext or `md5...` hash); the terminating NUL is added, and a
/// password containing a NUL is cut there, which is what the server would read.
pub fn encode_password(password: &[u8], out: &mut BytesMut) {
    write_frame(out, Some(b'p'), |out| {
        put_cstr(out, password);
        Ok(())
    });
}

/// A SASLInitialResponse as received from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslInitialResponse {
    /// The mechanism the client chose, e.g. `SCRAM-SHA-256`.
    pub mechanism: String,
    /// The mechanism's initial data; `None` when the client sent length -1.
    pub data: Option<Bytes>,
}

/// Reads the body of a `p` message sent in answer to AuthenticationSASL.
pub fn parse_sasl_initial_response(body: &Bytes) -> Result<SaslInitialResponse, DecodeError> {
    let mut r = Reader::new(body.clone(), "SASLInitialResponse");
    let mechanism = r.cstr("mechanism name")?;
    let data = r.nullable_value("initial response")?;
    r.finish()?;
    Ok(SaslInitialResponse { mechanism, data })
}

/// Reads the body of a `p` message sent in answer to AuthenticationCleartextPassword or
/// AuthenticationMD5Password: the password bytes without their NUL terminator.
pub fn parse_password(body: &[u8]) -> Result<&[u8], DecodeError> {
    match body.split_last() {
        Some((0, password)) if !password.contains(&0) => Ok(password),
        Some((0, _)) => Err(DecodeError::TrailingBytes {
            message: "PasswordMessage",
            extra: body
                .iter()
                .position(|b| *b == 0)
                .map_or(0, |nul| body.len().saturating_sub(nul).saturating_sub(1)),
        }),
        _ => Err(DecodeError::MissingTerminator {
            message: "PasswordMessage",
            field: "password",
        }),
    }
}
