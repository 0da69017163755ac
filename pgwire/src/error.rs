// Errors for every decoder in this crate.
// Spec: https://www.postgresql.org/docs/current/protocol-message-formats.html

use std::fmt;

/// Which peer sent the message that failed to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Client to server.
    Frontend,
    /// Server to client.
    Backend,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Frontend => "client",
            Side::Backend => "server",
        })
    }
}

/// Prints a message type byte as `'Q' (0x51)`, or just `0x00` when it is not printable, so logs
/// never carry raw control bytes from a peer.
pub(crate) struct TagName(pub(crate) u8);

impl fmt::Display for TagName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}' (0x{:02x})", char::from(self.0), self.0)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// Why bytes from a peer are not a valid PostgreSQL v3 protocol message.
///
/// Every variant means the connection can no longer be trusted to be in sync: the caller ends
/// that session (after sending the client an ErrorResponse where appropriate), never the process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length field of a regular message is below 4 (it counts itself).
    #[error(
        "message type {} declares length {len}, below the minimum of 4 (the length counts \
         itself): the peer does not speak PostgreSQL protocol v3 or the stream lost sync",
        TagName(*.tag)
    )]
    LengthTooSmall { tag: u8, len: u32 },

    /// The length field of a regular message is above the caller's maximum.
    #[error(
        "message type {} declares length {len} bytes, above the configured maximum of {max}: \
         raise the maximum message length if legitimate traffic needs bigger messages",
        TagName(*.tag)
    )]
    TooLong { tag: u8, len: usize, max: usize },

    /// The startup packet declares more than [`crate::MAX_STARTUP_LEN`] bytes.
    #[error(
        "startup packet declares length {len} bytes, above the limit of {} bytes that PostgreSQL \
         also enforces: the client is not a PostgreSQL client or the connection is corrupted",
        crate::MAX_STARTUP_LEN
    )]
    StartupTooLong { len: usize },

    /// The startup packet declares fewer than 8 bytes (length and protocol code).
    #[error(
        "startup packet declares length {len} bytes, below the minimum of 8 (length and \
         protocol code): the client is not a PostgreSQL client"
    )]
    StartupTooShort { len: usize },

    /// A message type byte that this side of the protocol never sends.
    #[error(
        "unknown message type {} from the {side}: not a PostgreSQL protocol v3 message",
        TagName(*.tag)
    )]
    UnknownTag { tag: u8, side: Side },

    /// The body ends before a field that must be present.
    #[error("{message} message ends before its {field}: its length field and content disagree")]
    Truncated {
        message: &'static str,
        field: &'static str,
    },

    /// A string field has no terminating NUL byte inside the message.
    #[error("{message} message: {field} has no terminating NUL byte")]
    MissingTerminator {
        message: &'static str,
        field: &'static str,
    },

    /// A string field is not valid UTF-8.
    #[error(
        "{message} message: {field} is not valid UTF-8; Portcullis requires client_encoding \
         UTF8 on proxied connections"
    )]
    InvalidUtf8 {
        message: &'static str,
        field: &'static str,
    },

    /// A length or count field is negative where only -1 (NULL) or a non-negative value is allowed.
    #[error("{message} message: {field} is {value}, which is negative and not -1 (NULL)")]
    NegativeLength {
        message: &'static str,
        field: &'static str,
        value: i32,
    },

    /// Bytes left over after the last field of a message.
    #[error(
        "{message} message has {extra} unexpected trailing bytes: its length field and content \
         disagree"
    )]
    TrailingBytes { message: &'static str, extra: usize },

    /// The startup packet asks for a protocol other than 3.x.
    #[error(
        "client requested protocol {major}.{minor}; only protocol 3.x is supported (PostgreSQL \
         7.4 and later clients)"
    )]
    UnsupportedProtocol { major: u16, minor: u16 },

    /// A field holds a value the protocol does not allow.
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}
