// PostgreSQL frontend/backend protocol v3.
// Spec: https://www.postgresql.org/docs/current/protocol.html (chapter "Frontend/Backend
// Protocol": "Message Flow" and "Message Formats").

//! Sans-IO codec for the PostgreSQL frontend/backend protocol, version 3 (3.0 and 3.2).
//!
//! No sockets and no async runtime: callers append received bytes to a [`bytes::BytesMut`] and
//! call [`decode_startup`] (first message of a connection) or [`decode_frame`] (every later
//! message), which return `Ok(None)` until a whole message is buffered. A framed
//! [`RawMessage`] keeps the exact bytes, so traffic that passes unchanged is forwarded as is;
//! [`parse_frontend`] and [`parse_backend`] give the typed view, and the `encode_*` functions
//! write messages the proxy builds or changes.
//!
//! Hostile input: every length is checked against a bound before anything waits for or allocates
//! the bytes it announces (startup packets at most [`MAX_STARTUP_LEN`], other messages at most the
//! caller's `max_len`, element counts against the bytes actually present), and no input makes a
//! decoder panic. Any [`DecodeError`] means the stream is out of sync: end that session.
//!
//! Encoding never produces a mis-framed message: strings are cut at an embedded NUL (the receiver
//! would stop there anyway) except ErrorResponse/NoticeResponse text, where NUL becomes a space;
//! a message that cannot be represented (more than 65535 elements, body above 2 GiB) is not
//! written at all.
//!
//! [`copy`] splits and re-joins COPY text and CSV rows carried in CopyData.

pub mod backend;
pub mod copy;
mod error;
mod frame;
pub mod frontend;
pub mod startup;

pub use backend::{
    encode_backend, encode_data_row, encode_error_response, encode_notice_response,
    encode_ready_for_query, parse_backend, Authentication, BackendMessage, CopyResponse, DataRow,
    ErrorFields, FieldDescription, TransactionStatus,
};
pub use copy::{
    join_binary_tuple, join_csv_row, join_text_row, split_binary, split_csv_row, split_text_row,
    BinaryPart, BINARY_SIGNATURE, BINARY_TRAILER,
};
pub use error::{DecodeError, Side};
pub use frame::{decode_frame, RawMessage};
pub use frontend::{
    encode_frontend, encode_password, encode_sasl_initial_response, encode_sasl_response,
    parse_frontend, parse_password, parse_sasl_initial_response, DescribeTarget, FrontendMessage,
    SaslInitialResponse,
};
pub use startup::{
    decode_startup, encode_cancel, encode_gssenc_request, encode_ssl_request, encode_startup,
    encode_startup_request, StartupMessage, StartupRequest, MAX_STARTUP_LEN,
};

/// A sensible default for `decode_frame`'s `max_len` (64 MiB); callers pass their own limit.
pub const DEFAULT_MAX_MESSAGE_LEN: usize = 64 * 1024 * 1024;
