// Server-to-client (backend) regular messages.
// Spec: https://www.postgresql.org/docs/current/protocol-message-formats.html
// (Authentication*, BackendKeyData, BindComplete, CloseComplete, CommandComplete, CopyData,
// CopyDone, CopyInResponse, CopyOutResponse, CopyBothResponse, DataRow, EmptyQueryResponse,
// ErrorResponse, FunctionCallResponse, NegotiateProtocolVersion, NoData, NoticeResponse,
// NotificationResponse, ParameterDescription, ParameterStatus, ParseComplete, PortalSuspended,
// ReadyForQuery, RowDescription) and
// https://www.postgresql.org/docs/current/protocol-error-fields.html

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, Side};
use crate::frame::{
    put_count16, put_cstr, put_nullable_value, until_nul, write_empty, write_frame, write_raw,
    RawMessage, Reader, Unrepresentable,
};
use crate::startup::{MAX_CANCEL_KEY_LEN, MIN_CANCEL_KEY_LEN};

/// The transaction state reported by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InBlock,
    /// `E`: in a failed transaction block; queries are rejected until it ends.
    Failed,
}

impl TransactionStatus {
    /// The wire byte.
    pub fn as_byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InBlock => b'T',
            TransactionStatus::Failed => b'E',
        }
    }

    /// Parses the wire byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(TransactionStatus::Idle),
            b'T' => Some(TransactionStatus::InBlock),
            b'E' => Some(TransactionStatus::Failed),
            _ => None,
        }
    }
}

/// Authentication request codes (the Int32 after the `R` header).
pub mod auth_code {
    pub const OK: u32 = 0;
    pub const KERBEROS_V5: u32 = 2;
    pub const CLEARTEXT_PASSWORD: u32 = 3;
    pub const MD5_PASSWORD: u32 = 5;
    pub const GSS: u32 = 7;
    pub const GSS_CONTINUE: u32 = 8;
    pub const SSPI: u32 = 9;
    pub const SASL: u32 = 10;
    pub const SASL_CONTINUE: u32 = 11;
    pub const SASL_FINAL: u32 = 12;
}

/// An authentication message (`R`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// AuthenticationOk.
    Ok,
    /// AuthenticationCleartextPassword.
    CleartextPassword,
    /// AuthenticationMD5Password.
    Md5Password { salt: [u8; 4] },
    /// AuthenticationSASL: the mechanisms the server offers, in its order of preference.
    Sasl { mechanisms: Vec<String> },
    /// AuthenticationSASLContinue.
    SaslContinue(Bytes),
    /// AuthenticationSASLFinal.
    SaslFinal(Bytes),
    /// Any other request (KerberosV5, GSS, GSSContinue, SSPI, unknown codes); its data, if any,
    /// is not kept. Never holds a code that another variant represents.
    Unsupported(u32),
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    pub name: String,
    /// OID of the source table, or 0.
    pub table_oid: u32,
    /// Attribute number of the source column, or 0.
    pub column_attr: i16,
    pub type_oid: u32,
    /// `pg_type.typlen`; negative for variable-width types.
    pub type_size: i16,
    pub type_modifier: i32,
    /// 0 text, 1 binary.
    pub format: i16,
}

/// A DataRow. Values are zero-copy slices of the frame; `None` is SQL NULL (length -1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRow {
    pub values: Vec<Option<Bytes>>,
}

/// The body of CopyInResponse, CopyOutResponse and CopyBothResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyResponse {
    /// Overall format: 0 text (rows are lines), 1 binary.
    pub format: i8,
    /// One format code per column.
    pub column_formats: Vec<i16>,
}

/// ErrorResponse / NoticeResponse fields in order: (field type byte, value).
///
/// Field types: <https://www.postgresql.org/docs/current/protocol-error-fields.html>.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    pub fields: Vec<(u8, String)>,
}

impl ErrorFields {
    /// Builds an error as the server would: `S` and `V` = `severity` (`ERROR`, `FATAL`), `C` =
    /// `sqlstate`, `M` = `message`.
    pub fn new(severity: &str, sqlstate: &str, message: impl Into<String>) -> Self {
        Self {
            fields: vec![
                (b'S', severity.to_owned()),
                (b'V', severity.to_owned()),
                (b'C', sqlstate.to_owned()),
                (b'M', message.into()),
            ],
        }
    }

    /// Adds or replaces the `D` (detail) field.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.set(b'D', detail.into());
        self
    }

    /// Adds or replaces the `H` (hint) field.
    #[must_use]
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.set(b'H', hint.into());
        self
    }

    /// The first field of type `code`.
    pub fn get(&self, code: u8) -> Option<&str> {
        self.fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_str())
    }

    /// Replaces the first field of type `code` (dropping any repeats) or appends it.
    pub fn set(&mut self, code: u8, value: String) {
        let mut seen = false;
        self.fields.retain(|(c, _)| {
            let repeat = *c == code && seen;
            seen |= *c == code;
            !repeat
        });
        match self.fields.iter_mut().find(|(c, _)| *c == code) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((code, value)),
        }
    }

    /// `S`: localized severity.
    pub fn severity(&self) -> Option<&str> {
        self.get(b'S')
    }

    /// `C`: SQLSTATE code.
    pub fn sqlstate(&self) -> Option<&str> {
        self.get(b'C')
    }

    /// `M`: primary message.
    pub fn message(&self) -> Option<&str> {
        self.get(b'M')
    }

    /// `D`: detail.
    pub fn detail(&self) -> Option<&str> {
        self.get(b'D')
    }

    /// `H`: hint.
    pub fn hint(&self) -> Option<&str> {
        self.get(b'H')
    }
}

/// A server-to-client message after the startup phase (and during authentication).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    /// `R`.
    Authentication(Authentication),
    /// `K`: the key a client needs to cancel queries (4 bytes in protocol 3.0, up to 256 in 3.2).
    BackendKeyData { process_id: u32, secret_key: Bytes },
    /// `S`.
    ParameterStatus { name: String, value: String },
    /// `Z`.
    ReadyForQuery { status: TransactionStatus },
    /// `T`.
    RowDescription(Vec<FieldDescription>),
    /// `D`.
    DataRow(DataRow),
    /// `C`: e.g. `SELECT 3`, `INSERT 0 1`.
    CommandComplete { tag: String },
    /// `I`.
    EmptyQueryResponse,
    /// `E`.
    ErrorResponse(ErrorFields),
    /// `N`.
    NoticeResponse(ErrorFields),
    /// `1`.
    ParseComplete,
    /// `2`.
    BindComplete,
    /// `3`.
    CloseComplete,
    /// `n`.
    NoData,
    /// `s`.
    PortalSuspended,
    /// `t`: parameter type OIDs of a prepared statement.
    ParameterDescription(Vec<u32>),
    /// `G`.
    CopyInResponse(CopyResponse),
    /// `H`.
    CopyOutResponse(CopyResponse),
    /// `W`.
    CopyBothResponse(CopyResponse),
    /// `d`.
    CopyData(Bytes),
    /// `c`.
    CopyDone,
    /// `A`: LISTEN/NOTIFY delivery.
    NotificationResponse {
        process_id: u32,
        channel: String,
        payload: String,
    },
    /// `V`: `None` is a NULL result.
    FunctionCallResponse(Option<Bytes>),
    /// `v`: the server supports an older minor version or not all `_pq_.` options.
    NegotiateProtocolVersion {
        newest_minor: u32,
        unrecognized: Vec<String>,
    },
}

impl BackendMessage {
    /// The message's name in the protocol documentation, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            BackendMessage::Authentication(_) => "Authentication",
            BackendMessage::BackendKeyData { .. } => "BackendKeyData",
            BackendMessage::ParameterStatus { .. } => "ParameterStatus",
            BackendMessage::ReadyForQuery { .. } => "ReadyForQuery",
            BackendMessage::RowDescription(_) => "RowDescription",
            BackendMessage::DataRow(_) => "DataRow",
            BackendMessage::CommandComplete { .. } => "CommandComplete",
            BackendMessage::EmptyQueryResponse => "EmptyQueryResponse",
            BackendMessage::ErrorResponse(_) => "ErrorResponse",
            BackendMessage::NoticeResponse(_) => "NoticeResponse",
            BackendMessage::ParseComplete => "ParseComplete",
            BackendMessage::BindComplete => "BindComplete",
            BackendMessage::CloseComplete => "CloseComplete",
            BackendMessage::NoData => "NoData",
            BackendMessage::PortalSuspended => "PortalSuspended",
            BackendMessage::ParameterDescription(_) => "ParameterDescription",
            BackendMessage::CopyInResponse(_) => "CopyInResponse",
            BackendMessage::CopyOutResponse(_) => "CopyOutResponse",
            BackendMessage::CopyBothResponse(_) => "CopyBothResponse",
            BackendMessage::CopyData(_) => "CopyData",
            BackendMessage::CopyDone => "CopyDone",
            BackendMessage::NotificationResponse { .. } => "NotificationResponse",
            BackendMessage::FunctionCallResponse(_) => "FunctionCallResponse",
            BackendMessage::NegotiateProtocolVersion { .. } => "NegotiateProtocolVersion",
        }
    }
}

/// Parses a server message framed by [`crate::decode_frame`].
pub fn parse_backend(msg: &RawMessage) -> Result<BackendMessage, DecodeError> {
    let body = msg.body_bytes();
    match msg.tag {
        b'R' => parse_authentication(body).map(BackendMessage::Authentication),
        b'K' => {
            let mut r = Reader::new(body, "BackendKeyData");
            let process_id = r.u32("process ID")?;
            let secret_key = r.rest();
            if !(MIN_CANCEL_KEY_LEN..=MAX_CANCEL_KEY_LEN).contains(&secret_key.len()) {
                return Err(r.invalid(format!(
                    "secret key is {} bytes; it must be {MIN_CANCEL_KEY_LEN} to \
                     {MAX_CANCEL_KEY_LEN} bytes",
                    secret_key.len()
                )));
            }
            Ok(BackendMessage::BackendKeyData {
                process_id,
                secret_key,
            })
        }
        b'S' => {
            let mut r = Reader::new(body, "ParameterStatus");
            let name = r.cstr("parameter name")?;
            let value = r.cstr("parameter value")?;
            r.finish()?;
            Ok(BackendMessage::ParameterStatus { name, value })
        }
        b'Z' => {
            let mut r = Reader::new(body, "ReadyForQuery");
            let byte = r.u8("transaction status")?;
            let status = TransactionStatus::from_byte(byte).ok_or_else(|| {
                r.invalid(format!(
                    "transaction status is 0x{byte:02x}; it must be 'I', 'T' or 'E'"
                ))
            })?;
            r.finish()?;
            Ok(BackendMessage::ReadyForQuery { status })
        }
        b'T' => {
            let mut r = Reader::new(body, "RowDescription");
            // A field is at least a NUL-terminated name plus 18 bytes of fixed fields.
            let count = r.count16("field count", 19)?;
            let mut fields = Vec::with_capacity(count);
            for _ in 0..count {
                fields.push(FieldDescription {
                    name: r.cstr("field name")?,
                    table_oid: r.u32("table OID")?,
                    column_attr: r.i16("column attribute number")?,
                    type_oid: r.u32("type OID")?,
                    type_size: r.i16("type size")?,
                    type_modifier: r.i32("type modifier")?,
                    format: r.i16("format code")?,
                });
            }
            r.finish()?;
            Ok(BackendMessage::RowDescription(fields))
        }
        b'D' => {
            let mut r = Reader::new(body, "DataRow");
            let count = r.count16("column count", 4)?;
            let mut values = Vec::with_capacity(count);
            for _ in 0..count {
                values.push(r.nullable_value("column value")?);
            }
            r.finish()?;
            Ok(BackendMessage::DataRow(DataRow { values }))
        }
        b'C' => {
            let mut r = Reader::new(body, "CommandComplete");
            let tag = r.cstr("command tag")?;
            r.finish()?;
            Ok(BackendMessage::CommandComplete { tag })
        }
        b'E' => parse_error_fields(body, "ErrorResponse").map(BackendMessage::ErrorResponse),
        b'N' => parse_error_fields(body, "NoticeResponse").map(BackendMessage::NoticeResponse),
        b'I' => empty(
            body,
            "EmptyQueryResponse",
            BackendMessage::EmptyQueryResponse,
        ),
        b'1' => empty(body, "ParseComplete", BackendMessage::ParseComplete),
        b'2' => empty(body, "BindComplete", BackendMessage::BindComplete),
        b'3' => empty(body, "CloseComplete", BackendMessage::CloseComplete),
        b'n' => empty(body, "NoData", BackendMessage::NoData),
        b's' => empty(body, "PortalSuspended", BackendMessage::PortalSuspended),
        b'c' => empty(body, "CopyDone", BackendMessage::CopyDone),
        b't' => {
            let mut r = Reader::new(body, "ParameterDescription");
            let count = r.count16("parameter count", 4)?;
            let mut types = Vec::with_capacity(count);
            for _ in 0..count {
                types.push(r.u32("parameter type OID")?);
            }
            r.finish()?;
            Ok(BackendMessage::ParameterDescription(types))
        }
        b'G' => parse_copy_response(body, "CopyInResponse").map(BackendMessage::CopyInResponse),
        b'H' => parse_copy_response(body, "CopyOutResponse").map(BackendMessage::CopyOutResponse),
        b'W' => parse_copy_response(body, "CopyBothResponse").map(BackendMessage::CopyBothResponse),
        b'd' => Ok(BackendMessage::CopyData(body)),
        b'A' => {
            let mut r = Reader::new(body, "NotificationResponse");
            let process_id = r.u32("process ID")?;
            let channel = r.cstr("channel name")?;
            let payload = r.cstr("payload")?;
            r.finish()?;
            Ok(BackendMessage::NotificationResponse {
                process_id,
                channel,
                payload,
            })
        }
        b'V' => {
            let mut r = Reader::new(body, "FunctionCallResponse");
            let value = r.nullable_value("result value")?;
            r.finish()?;
            Ok(BackendMessage::FunctionCallResponse(value))
        }
        b'v' => {
            let mut r = Reader::new(body, "NegotiateProtocolVersion");
            let newest_minor = r.u32("newest minor version")?;
            let count = r.count32("unrecognized option count", 1)?;
            let mut unrecognized = Vec::with_capacity(count);
            for _ in 0..count {
                unrecognized.push(r.cstr("option name")?);
            }
            r.finish()?;
            Ok(BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            })
        }
        tag => Err(DecodeError::UnknownTag {
            tag,
            side: Side::Backend,
        }),
    }
}

fn empty(
    body: Bytes,
    message: &'static str,
    parsed: BackendMessage,
) -> Result<BackendMessage, DecodeError> {
    Reader::new(body, message).finish()?;
    Ok(parsed)
}

fn parse_authentication(body: Bytes) -> Result<Authentication, DecodeError> {
    let mut r = Reader::new(body, "Authentication");
    let code = r.u32("request code")?;
    let auth = match code {
        auth_code::OK => Authentication::Ok,
        auth_code::CLEARTEXT_PASSWORD => Authentication::CleartextPassword,
        auth_code::MD5_PASSWORD => Authentication::Md5Password {
            salt: r.array4("MD5 salt")?,
        },
        auth_code::SASL => {
            let mut mechanisms = Vec::new();
            loop {
                let name = r.cstr("SASL mechanism name")?;
                if name.is_empty() {
                    break;
                }
                mechanisms.push(name);
            }
            Authentication::Sasl { mechanisms }
        }
        auth_code::SASL_CONTINUE => Authentication::SaslContinue(r.rest()),
        auth_code::SASL_FINAL => Authentication::SaslFinal(r.rest()),
        other => {
            // GSSContinue carries data and unknown codes may; neither is interpreted.
            r.rest();
            Authentication::Unsupported(other)
        }
    };
    r.finish()?;
    Ok(auth)
}

fn parse_error_fields(body: Bytes, message: &'static str) -> Result<ErrorFields, DecodeError> {
    let mut r = Reader::new(body, message);
    let mut fields = Vec::new();
    loop {
        let code = r.u8("field type")?;
        if code == 0 {
            break;
        }
        fields.push((code, r.cstr("field value")?));
    }
    r.finish()?;
    Ok(ErrorFields { fields })
}

fn parse_copy_response(body: Bytes, message: &'static str) -> Result<CopyResponse, DecodeError> {
    let mut r = Reader::new(body, message);
    let format = r.i8("overall format")?;
    let count = r.count16("column count", 2)?;
    let mut column_formats = Vec::with_capacity(count);
    for _ in 0..count {
        column_formats.push(r.i16("column format code")?);
    }
    r.finish()?;
    Ok(CopyResponse {
        format,
        column_formats,
    })
}

/// Writes a server message.
///
/// Strings are cut at their first NUL byte, except in ErrorResponse and NoticeResponse values
/// where a NUL becomes a space (see [`encode_error_response`]); empty SASL mechanism names are
/// skipped because an empty name ends the list. A message with more than 65535 columns or
/// parameters, or a body above 2 GiB, cannot be represented: nothing is written then.
pub fn encode_backend(msg: &BackendMessage, out: &mut BytesMut) {
    match msg {
        BackendMessage::Authentication(auth) => encode_authentication(auth, out),
        BackendMessage::BackendKeyData {
            process_id,
            secret_key,
        } => write_frame(out, Some(b'K'), |out| {
            out.put_u32(*process_id);
            out.put_slice(secret_key);
            Ok(())
        }),
        BackendMessage::ParameterStatus { name, value } => write_frame(out, Some(b'S'), |out| {
            put_cstr(out, name.as_bytes());
            put_cstr(out, value.as_bytes());
            Ok(())
        }),
        BackendMessage::ReadyForQuery { status } => encode_ready_for_query(*status, out),
        BackendMessage::RowDescription(fields) => write_frame(out, Some(b'T'), |out| {
            put_count16(out, fields.len())?;
            for field in fields {
                put_cstr(out, field.name.as_bytes());
                out.put_u32(field.table_oid);
                out.put_i16(field.column_attr);
                out.put_u32(field.type_oid);
                out.put_i16(field.type_size);
                out.put_i32(field.type_modifier);
                out.put_i16(field.format);
            }
            Ok(())
        }),
        BackendMessage::DataRow(row) => write_data_row(
            out,
            row.values.iter().map(Option::as_deref),
            row.values.len(),
        ),
        BackendMessage::CommandComplete { tag } => write_frame(out, Some(b'C'), |out| {
            put_cstr(out, tag.as_bytes());
            Ok(())
        }),
        BackendMessage::EmptyQueryResponse => write_empty(out, b'I'),
        BackendMessage::ErrorResponse(fields) => encode_error_response(fields, out),
        BackendMessage::NoticeResponse(fields) => write_error_fields(out, b'N', fields),
        BackendMessage::ParseComplete => write_empty(out, b'1'),
        BackendMessage::BindComplete => write_empty(out, b'2'),
        BackendMessage::CloseComplete => write_empty(out, b'3'),
        BackendMessage::NoData => write_empty(out, b'n'),
        BackendMessage::PortalSuspended => write_empty(out, b's'),
        BackendMessage::ParameterDescription(types) => write_frame(out, Some(b't'), |out| {
            put_count16(out, types.len())?;
            for oid in types {
                out.put_u32(*oid);
            }
            Ok(())
        }),
        BackendMessage::CopyInResponse(copy) => write_copy_response(out, b'G', copy),
        BackendMessage::CopyOutResponse(copy) => write_copy_response(out, b'H', copy),
        BackendMessage::CopyBothResponse(copy) => write_copy_response(out, b'W', copy),
        BackendMessage::CopyData(data) => write_raw(out, b'd', data),
        BackendMessage::CopyDone => write_empty(out, b'c'),
        BackendMessage::NotificationResponse {
            process_id,
            channel,
            payload,
        } => write_frame(out, Some(b'A'), |out| {
            out.put_u32(*process_id);
            put_cstr(out, channel.as_bytes());
            put_cstr(out, payload.as_bytes());
            Ok(())
        }),
        BackendMessage::FunctionCallResponse(value) => write_frame(out, Some(b'V'), |out| {
            put_nullable_value(out, value.as_deref())
        }),
        BackendMessage::NegotiateProtocolVersion {
            newest_minor,
            unrecognized,
        } => write_frame(out, Some(b'v'), |out| {
            out.put_u32(*newest_minor);
            let count = i32::try_from(unrecognized.len()).map_err(|_| Unrepresentable)?;
            out.put_i32(count);
            for option in unrecognized {
                put_cstr(out, option.as_bytes());
            }
            Ok(())
        }),
    }
}

fn encode_authentication(auth: &Authentication, out: &mut BytesMut) {
    write_frame(out, Some(b'R'), |out| {
        match auth {
            Authentication::Ok => out.put_u32(auth_code::OK),
            Authentication::CleartextPassword => out.put_u32(auth_code::CLEARTEXT_PASSWORD),
            Authentication::Md5Password { salt } => {
                out.put_u32(auth_code::MD5_PASSWORD);
                out.put_slice(salt);
            }
            Authentication::Sasl { mechanisms } => {
                out.put_u32(auth_code::SASL);
                for name in mechanisms {
                    if !until_nul(name.as_bytes()).is_empty() {
                        put_cstr(out, name.as_bytes());
                    }
                }
                out.put_u8(0);
            }
            Authentication::SaslContinue(data) => {
                out.put_u32(auth_code::SASL_CONTINUE);
                out.put_slice(data);
            }
            Authentication::SaslFinal(data) => {
                out.put_u32(auth_code::SASL_FINAL);
                out.put_slice(data);
            }
            Authentication::Unsupported(code) => out.put_u32(*code),
        }
        Ok(())
    });
}

fn write_copy_response(out: &mut BytesMut, tag: u8, copy: &CopyResponse) {
    write_frame(out, Some(tag), |out| {
        out.put_i8(copy.format);
        put_count16(out, copy.column_formats.len())?;
        for format in &copy.column_formats {
            out.put_i16(*format);
        }
        Ok(())
    });
}

fn write_data_row<'a>(
    out: &mut BytesMut,
    values: impl Iterator<Item = Option<&'a [u8]>>,
    count: usize,
) {
    write_frame(out, Some(b'D'), |out| {
        put_count16(out, count)?;
        for value in values {
            put_nullable_value(out, value)?;
        }
        Ok(())
    });
}

/// Writes a DataRow, e.g. after some values were masked. `None` is SQL NULL.
pub fn encode_data_row(values: &[Option<&[u8]>], out: &mut BytesMut) {
    write_data_row(out, values.iter().copied(), values.len());
}

/// Writes an ErrorResponse.
///
/// A NUL byte inside a value becomes a space, so that text quoted from a client (which may hold
/// anything) cannot cut the message short; fields whose type byte is 0 are skipped, since 0 ends
/// the field list.
pub fn encode_error_response(fields: &ErrorFields, out: &mut BytesMut) {
    write_error_fields(out, b'E', fields);
}

fn write_error_fields(out: &mut BytesMut, tag: u8, fields: &ErrorFields) {
    write_frame(out, Some(tag), |out| {
        for (code, value) in &fields.fields {
            if *code == 0 {
                continue;
            }
            out.put_u8(*code);
            for b in value.bytes() {
                out.put_u8(if b == 0 { b' ' } else { b });
            }
            out.put_u8(0);
        }
        out.put_u8(0);
        Ok(())
    });
}

/// Writes a ReadyForQuery.
pub fn encode_ready_for_query(status: TransactionStatus, out: &mut BytesMut) {
    write_frame(out, Some(b'Z'), |out| {
        out.put_u8(status.as_byte());
        Ok(())
    });
}

/// Writes a NoticeResponse (NUL handling as [`encode_error_response`]).
pub fn encode_notice_response(fields: &ErrorFields, out: &mut BytesMut) {
    write_error_fields(out, b'N', fields);
}
