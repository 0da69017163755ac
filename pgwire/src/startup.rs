// The untagged first message of a connection: StartupMessage, SSLRequest, GSSENCRequest,
// CancelRequest.
// Spec: https://www.postgresql.org/docs/current/protocol-message-formats.html
// (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest) and
// https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::frame::{put_cstr, until_nul, write_frame, Reader};

/// Largest startup packet accepted, length field included (PostgreSQL's
/// `MAX_STARTUP_PACKET_LENGTH`; the server measures it without the length field, so this is 4
/// bytes stricter).
pub const MAX_STARTUP_LEN: usize = 10_000;

/// Protocol code of an SSLRequest (1234 << 16 | 5679).
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// Protocol code of a GSSENCRequest (1234 << 16 | 5680).
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Protocol code of a CancelRequest (1234 << 16 | 5678).
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// Shortest cancel key: 4 bytes, the only length in protocol 3.0.
pub const MIN_CANCEL_KEY_LEN: usize = 4;
/// Longest cancel key allowed by protocol 3.2.
pub const MAX_CANCEL_KEY_LEN: usize = 256;

/// The first message a client sends on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupRequest {
    /// Asks the server to start TLS; answered with a single byte `S` or `N`.
    SslRequest,
    /// Asks the server to start GSSAPI encryption; answered with a single byte `G` or `N`.
    GssEncRequest,
    /// Cancels the running query of another connection, then the connection closes.
    Cancel {
        process_id: u32,
        /// 4 bytes in protocol 3.0, 4 to 256 bytes in 3.2.
        secret_key: Bytes,
    },
    /// Starts a session.
    Startup(StartupMessage),
}

/// A StartupMessage: protocol version and the connection parameters in the order sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    /// `(name, value)` pairs in wire order. Names are never empty (an empty name is the list
    /// terminator on the wire).
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    /// A protocol 3.0 startup message with these parameters.
    pub fn new(params: Vec<(String, String)>) -> Self {
        Self {
            major: 3,
            minor: 0,
            params,
        }
    }

    /// The value of parameter `name`; the last one wins if it was sent twice, as in PostgreSQL.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `user` parameter.
    pub fn user(&self) -> Option<&str> {
        self.param("user")
    }

    /// The `database` parameter, or the user name when it is absent or empty, as PostgreSQL does.
    pub fn database(&self) -> Option<&str> {
        match self.param("database") {
            Some(db) if !db.is_empty() => Some(db),
            _ => self.user(),
        }
    }

    /// Whether this is a replication connection (physical or logical).
    ///
    /// True when `replication` is present and is not one of the spellings PostgreSQL's
    /// `parse_bool` reads as false (`false`/`off`/`no`/`0` and their unambiguous prefixes, any
    /// case). Values PostgreSQL would reject also count as replication, so a caller that denies
    /// replication fails closed.
    pub fn is_replication(&self) -> bool {
        match self.param("replication") {
            None => false,
            Some(value) => !is_false_bool(value),
        }
    }
}

/// PostgreSQL's `parse_bool` false spellings: prefixes of `false` and `no`, `of`/`off`, `0`;
/// like PostgreSQL, no surrounding whitespace is allowed.
fn is_false_bool(value: &str) -> bool {
    let v = value.to_ascii_lowercase();
    if v.is_empty() {
        return false;
    }
    "false".starts_with(&v) || "no".starts_with(&v) || v == "of" || v == "off" || v == "0"
}

/// Splits the first message of a connection off `buf`; `Ok(None)` if more bytes are needed.
///
/// The length (at least 8, at most [`MAX_STARTUP_LEN`]) is checked as soon as its 4 bytes are
/// there, before waiting for the rest. Protocol major versions other than 3 are
/// [`DecodeError::UnsupportedProtocol`].
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<StartupRequest>, DecodeError> {
    let Some(&[l0, l1, l2, l3]) = buf.get(..4) else {
        return Ok(None);
    };
    let len = usize::try_from(u32::from_be_bytes([l0, l1, l2, l3])).unwrap_or(usize::MAX);
    if len > MAX_STARTUP_LEN {
        return Err(DecodeError::StartupTooLong { len });
    }
    if len < 8 {
        return Err(DecodeError::StartupTooShort { len });
    }
    if buf.len() < len {
        return Ok(None);
    }
    let packet = buf.split_to(len).freeze();
    parse_startup_packet(packet.slice(4..)).map(Some)
}

fn parse_startup_packet(body: Bytes) -> Result<StartupRequest, DecodeError> {
    let mut r = Reader::new(body, "startup");
    let code = r.u32("protocol code")?;
    match code {
        SSL_REQUEST_CODE => {
            let r = Reader::new(r.rest(), "SSLRequest");
            r.finish()?;
            Ok(StartupRequest::SslRequest)
        }
        GSSENC_REQUEST_CODE => {
            let r = Reader::new(r.rest(), "GSSENCRequest");
            r.finish()?;
            Ok(StartupRequest::GssEncRequest)
        }
        CANCEL_REQUEST_CODE => {
            let mut r = Reader::new(r.rest(), "CancelRequest");
            let process_id = r.u32("process ID")?;
            let secret_key = r.rest();
            if !(MIN_CANCEL_KEY_LEN..=MAX_CANCEL_KEY_LEN).contains(&secret_key.len()) {
                return Err(r.invalid(format!(
                    "secret key is {} bytes; it must be {MIN_CANCEL_KEY_LEN} to \
                     {MAX_CANCEL_KEY_LEN} bytes",
                    secret_key.len()
                )));
            }
            Ok(StartupRequest::Cancel {
                process_id,
                secret_key,
            })
        }
        _ => {
            let major = u16::try_from(code >> 16).unwrap_or(u16::MAX);
            let minor = u16::try_from(code & 0xffff).unwrap_or(u16::MAX);
            if major != 3 {
                return Err(DecodeError::UnsupportedProtocol { major, minor });
            }
            let mut r = Reader::new(r.rest(), "StartupMessage");
            let mut params = Vec::new();
            loop {
                let name = r.cstr("parameter name")?;
                if name.is_empty() {
                    break;
                }
                let value = r.cstr("parameter value")?;
                params.push((name, value));
            }
            r.finish()?;
            Ok(StartupRequest::Startup(StartupMessage {
                major,
                minor,
                params,
            }))
        }
    }
}

/// Writes a StartupMessage.
///
/// Names and values are cut at their first NUL byte (PostgreSQL would read them so anyway);
/// parameters whose name is then empty are skipped, since an empty name ends the list.
pub fn encode_startup(msg: &StartupMessage, out: &mut BytesMut) {
    write_frame(out, None, |out| {
        out.put_u32(u32::from(msg.major) << 16 | u32::from(msg.minor));
        for (name, value) in &msg.params {
            if until_nul(name.as_bytes()).is_empty() {
                continue;
            }
            put_cstr(out, name.as_bytes());
            put_cstr(out, value.as_bytes());
        }
        out.put_u8(0);
        Ok(())
    });
}

/// Writes a CancelRequest. `secret_key` is the key from BackendKeyData (4 to 256 bytes).
pub fn encode_cancel(process_id: u32, secret_key: &[u8], out: &mut BytesMut) {
    write_frame(out, None, |out| {
        out.put_u32(CANCEL_REQUEST_CODE);
        out.put_u32(process_id);
        out.put_slice(secret_key);
        Ok(())
    });
}

/// Writes an SSLRequest.
pub fn encode_ssl_request(out: &mut BytesMut) {
    out.put_u32(8);
    out.put_u32(SSL_REQUEST_CODE);
}

/// Writes a GSSENCRequest.
pub fn encode_gssenc_request(out: &mut BytesMut) {
    out.put_u32(8);
    out.put_u32(GSSENC_REQUEST_CODE);
}

/// Writes any first message of a connection.
pub fn encode_startup_request(msg: &StartupRequest, out: &mut BytesMut) {
    match msg {
        StartupRequest::SslRequest => encode_ssl_request(out),
        StartupRequest::GssEncRequest => encode_gssenc_request(out),
        StartupRequest::Cancel {
            process_id,
            secret_key,
        } => encode_cancel(*process_id, secret_key, out),
        StartupRequest::Startup(msg) => encode_startup(msg, out),
    }
}
