//! SFTP as OpenSSH speaks it: version 3 of the SSH File Transfer Protocol
//! (draft-ietf-secsh-filexfer-02, <https://datatracker.ietf.org/doc/html/draft-ietf-secsh-filexfer-02>)
//! with OpenSSH's extensions (PROTOCOL, section 4). Sans-IO: [`Framer`] cuts a channel's byte
//! stream into packets whatever the SSH data messages' boundaries; [`ClientPacket::decode`] and
//! [`ServerPacket::decode`] read one packet's fields without copying; [`status`] and
//! [`version`] write the two packets the agent itself sends; [`Transfer`] counts and hashes the
//! bytes a handle moved.
//!
//! Hostile input: a packet's length is checked before anything is buffered for it, and a
//! packet over [`MAX_PACKET`] is an error, never an allocation of the claimed size. Every
//! field is read with its length checked against what is left of the packet.

use sha2::{Digest, Sha256};

/// The largest packet accepted (the length field's value): OpenSSH's own limit
/// (`SFTP_MAX_MSG_LENGTH` in sftp-common.h), which its server and client never exceed.
pub const MAX_PACKET: usize = 256 * 1024;

/// The protocol version the agent relays (OpenSSH's).
pub const VERSION: u32 = 3;

// Packet types (draft section 3).
const FXP_INIT: u8 = 1;
const FXP_VERSION: u8 = 2;
const FXP_OPEN: u8 = 3;
const FXP_CLOSE: u8 = 4;
const FXP_READ: u8 = 5;
const FXP_WRITE: u8 = 6;
const FXP_LSTAT: u8 = 7;
const FXP_FSTAT: u8 = 8;
const FXP_SETSTAT: u8 = 9;
const FXP_FSETSTAT: u8 = 10;
const FXP_OPENDIR: u8 = 11;
const FXP_READDIR: u8 = 12;
const FXP_REMOVE: u8 = 13;
const FXP_MKDIR: u8 = 14;
const FXP_RMDIR: u8 = 15;
const FXP_REALPATH: u8 = 16;
const FXP_STAT: u8 = 17;
const FXP_RENAME: u8 = 18;
const FXP_READLINK: u8 = 19;
const FXP_SYMLINK: u8 = 20;
const FXP_STATUS: u8 = 101;
const FXP_HANDLE: u8 = 102;
const FXP_DATA: u8 = 103;
const FXP_NAME: u8 = 104;
const FXP_ATTRS: u8 = 105;
const FXP_EXTENDED: u8 = 200;
const FXP_EXTENDED_REPLY: u8 = 201;

/// Open flags (draft section 6.3).
pub const FXF_READ: u32 = 0x01;
pub const FXF_WRITE: u32 = 0x02;
pub const FXF_APPEND: u32 = 0x04;
pub const FXF_CREAT: u32 = 0x08;
pub const FXF_TRUNC: u32 = 0x10;
pub const FXF_EXCL: u32 = 0x20;

/// Status codes (draft section 7).
pub const FX_OK: u32 = 0;
pub const FX_EOF: u32 = 1;
pub const FX_PERMISSION_DENIED: u32 = 3;
pub const FX_FAILURE: u32 = 4;
pub const FX_BAD_MESSAGE: u32 = 5;
pub const FX_OP_UNSUPPORTED: u32 = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SftpError {
    #[error("an SFTP packet of {0} bytes is over the limit of {MAX_PACKET}")]
    TooLong(usize),
    #[error("an empty SFTP packet")]
    Empty,
    #[error("SFTP packet type {0} is not one this side sends")]
    UnknownType(u8),
    #[error("SFTP packet type {kind} ends inside its {field}")]
    Truncated { kind: u8, field: &'static str },
    #[error("SFTP packet type {kind} has {extra} bytes after its last field")]
    TrailingBytes { kind: u8, extra: usize },
}

/// Cuts one direction of an SFTP channel into whole packets.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// Where the next packet starts in `buf`: taking a packet out moves it instead of
    /// shifting the rest, so a message of thousands of tiny packets costs no more than one.
    start: usize,
    /// Set once the stream is broken: nothing after it is a packet.
    failed: Option<SftpError>,
}

impl Framer {
    /// Adds bytes as they arrived; takes whole packets out with [`Framer::next_packet`].
    pub fn push(&mut self, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next whole packet (its length field included), `None` until one is complete. An
    /// error is final: the stream has no packet boundaries any more.
    pub fn next_packet(&mut self) -> Result<Option<Vec<u8>>, SftpError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let rest = self.buf.get(self.start..).unwrap_or_default();
        let Some(len) = read_u32(rest) else {
            return Ok(None);
        };
        let len = len as usize;
        let fail = |e: SftpError, me: &mut Self| {
            me.failed = Some(e.clone());
            me.buf = Vec::new();
            me.start = 0;
            Err(e)
        };
        if len > MAX_PACKET {
            return fail(SftpError::TooLong(len), self);
        }
        if len == 0 {
            return fail(SftpError::Empty, self);
        }
        let total = len + 4;
        let Some(packet) = rest.get(..total) else {
            return Ok(None);
        };
        let packet = packet.to_vec();
        self.start += total;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(packet))
    }

    /// Bytes held for a packet not yet complete.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

fn read_u32(b: &[u8]) -> Option<u32> {
    let bytes: [u8; 4] = b.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// Reads a packet's fields in order, each checked against what is left.
struct Reader<'a> {
    rest: &'a [u8],
    kind: u8,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], SftpError> {
        if self.rest.len() < n {
            return Err(SftpError::Truncated {
                kind: self.kind,
                field,
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, SftpError> {
        let b = self.take(4, field)?;
        read_u32(b).ok_or(SftpError::Truncated {
            kind: self.kind,
            field,
        })
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, SftpError> {
        let b = self.take(8, field)?;
        let bytes: [u8; 8] = b.try_into().map_err(|_| SftpError::Truncated {
            kind: self.kind,
            field,
        })?;
        Ok(u64::from_be_bytes(bytes))
    }

    fn string(&mut self, field: &'static str) -> Result<&'a [u8], SftpError> {
        let n = self.u32(field)? as usize;
        self.take(n, field)
    }

    /// ATTRS (draft section 5): only skipped, its fields are the server's business.
    fn attrs(&mut self) -> Result<(), SftpError> {
        const SIZE: u32 = 0x01;
        const UIDGID: u32 = 0x02;
        const PERMISSIONS: u32 = 0x04;
        const ACMODTIME: u32 = 0x08;
        const EXTENDED: u32 = 0x8000_0000;
        let flags = self.u32("attribute flags")?;
        if flags & SIZE != 0 {
            self.take(8, "size attribute")?;
        }
        if flags & UIDGID != 0 {
            self.take(8, "uid and gid attributes")?;
        }
        if flags & PERMISSIONS != 0 {
            self.take(4, "permissions attribute")?;
        }
        if flags & ACMODTIME != 0 {
            self.take(8, "time attributes")?;
        }
        if flags & EXTENDED != 0 {
            let count = self.u32("extended attribute count")?;
            for _ in 0..count {
                self.string("extended attribute name")?;
                self.string("extended attribute value")?;
            }
        }
        Ok(())
    }

    fn end(self) -> Result<(), SftpError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(SftpError::TrailingBytes {
                kind: self.kind,
                extra: self.rest.len(),
            })
        }
    }
}

/// Opens a whole packet (length field included) for reading: its type and a reader of the rest.
fn open(packet: &[u8]) -> Result<Reader<'_>, SftpError> {
    let body = packet.get(4..).ok_or(SftpError::Empty)?;
    let (&kind, rest) = body.split_first().ok_or(SftpError::Empty)?;
    Ok(Reader { rest, kind })
}

/// A packet the client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientPacket<'a> {
    Init { version: u32 },
    Request { id: u32, op: Op<'a> },
}

/// A client request, by what it does. Paths are bytes as sent (SFTP v3 does not say their
/// encoding; OpenSSH sends what the file system holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    Open {
        path: &'a [u8],
        pflags: u32,
    },
    Close {
        handle: &'a [u8],
    },
    Read {
        handle: &'a [u8],
        offset: u64,
        len: u32,
    },
    Write {
        handle: &'a [u8],
        offset: u64,
        data: &'a [u8],
    },
    Lstat {
        path: &'a [u8],
    },
    Fstat {
        handle: &'a [u8],
    },
    Setstat {
        path: &'a [u8],
    },
    Fsetstat {
        handle: &'a [u8],
    },
    Opendir {
        path: &'a [u8],
    },
    Readdir {
        handle: &'a [u8],
    },
    Remove {
        path: &'a [u8],
    },
    Mkdir {
        path: &'a [u8],
    },
    Rmdir {
        path: &'a [u8],
    },
    Realpath {
        path: &'a [u8],
    },
    Stat {
        path: &'a [u8],
    },
    Rename {
        from: &'a [u8],
        to: &'a [u8],
    },
    Readlink {
        path: &'a [u8],
    },
    /// The two paths in wire order. OpenSSH sends the link's target first and the link
    /// second, the reverse of the draft (OpenSSH PROTOCOL, section 4.1).
    Symlink {
        first: &'a [u8],
        second: &'a [u8],
    },
    /// An extension request: its name and the bytes after it, unread.
    Extended {
        name: &'a [u8],
        data: &'a [u8],
    },
}

impl<'a> ClientPacket<'a> {
    pub fn decode(packet: &'a [u8]) -> Result<Self, SftpError> {
        let mut r = open(packet)?;
        let kind = r.kind;
        if kind == FXP_INIT {
            let version = r.u32("version")?;
            // Extension pairs may follow; version 3 clients send none, and they are not ours.
            return Ok(ClientPacket::Init { version });
        }
        let id = r.u32("request id")?;
        let op = match kind {
            FXP_OPEN => {
                let path = r.string("path")?;
                let pflags = r.u32("open flags")?;
                r.attrs()?;
                Op::Open { path, pflags }
            }
            FXP_CLOSE => Op::Close {
                handle: r.string("handle")?,
            },
            FXP_READ => Op::Read {
                handle: r.string("handle")?,
                offset: r.u64("offset")?,
                len: r.u32("length")?,
            },
            FXP_WRITE => Op::Write {
                handle: r.string("handle")?,
                offset: r.u64("offset")?,
                data: r.string("data")?,
            },
            FXP_LSTAT => Op::Lstat {
                path: r.string("path")?,
            },
            FXP_FSTAT => Op::Fstat {
                handle: r.string("handle")?,
            },
            FXP_SETSTAT => {
                let path = r.string("path")?;
                r.attrs()?;
                Op::Setstat { path }
            }
            FXP_FSETSTAT => {
                let handle = r.string("handle")?;
                r.attrs()?;
                Op::Fsetstat { handle }
            }
            FXP_OPENDIR => Op::Opendir {
                path: r.string("path")?,
            },
            FXP_READDIR => Op::Readdir {
                handle: r.string("handle")?,
            },
            FXP_REMOVE => Op::Remove {
                path: r.string("path")?,
            },
            FXP_MKDIR => {
                let path = r.string("path")?;
                r.attrs()?;
                Op::Mkdir { path }
            }
            FXP_RMDIR => Op::Rmdir {
                path: r.string("path")?,
            },
            FXP_REALPATH => Op::Realpath {
                path: r.string("path")?,
            },
            FXP_STAT => Op::Stat {
                path: r.string("path")?,
            },
            FXP_RENAME => Op::Rename {
                from: r.string("old path")?,
                to: r.string("new path")?,
            },
            FXP_READLINK => Op::Readlink {
                path: r.string("path")?,
            },
            FXP_SYMLINK => Op::Symlink {
                first: r.string("first path")?,
                second: r.string("second path")?,
            },
            FXP_EXTENDED => {
                let name = r.string("extension name")?;
                let data = std::mem::take(&mut r.rest);
                return Ok(ClientPacket::Request {
                    id,
                    op: Op::Extended { name, data },
                });
            }
            other => return Err(SftpError::UnknownType(other)),
        };
        r.end()?;
        Ok(ClientPacket::Request { id, op })
    }
}

/// Reads the fields of an extension request's data: `count` strings (the paths of
/// `posix-rename@openssh.com`, `hardlink@openssh.com`, `statvfs@openssh.com`, ...).
pub fn extension_strings(data: &[u8], count: usize) -> Result<Vec<&[u8]>, SftpError> {
    let mut r = Reader {
        rest: data,
        kind: FXP_EXTENDED,
    };
    let mut out = Vec::with_capacity(count.min(4));
    for _ in 0..count {
        out.push(r.string("extension argument")?);
    }
    Ok(out)
}

/// A packet the server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerPacket<'a> {
    Version {
        version: u32,
        /// Extension names and their data, in order.
        extensions: Vec<(&'a [u8], &'a [u8])>,
    },
    Status {
        id: u32,
        code: u32,
        /// Empty when a version 3 server leaves it out.
        message: &'a [u8],
    },
    Handle {
        id: u32,
        handle: &'a [u8],
    },
    Data {
        id: u32,
        data: &'a [u8],
    },
    /// NAME, ATTRS and EXTENDED_REPLY: what they carry is not needed, only whom they answer.
    Other {
        id: u32,
    },
}

impl<'a> ServerPacket<'a> {
    pub fn decode(packet: &'a [u8]) -> Result<Self, SftpError> {
        let mut r = open(packet)?;
        let kind = r.kind;
        if kind == FXP_VERSION {
            let version = r.u32("version")?;
            let mut extensions = Vec::new();
            while !r.rest.is_empty() {
                let name = r.string("extension name")?;
                let data = r.string("extension data")?;
                extensions.push((name, data));
            }
            return Ok(ServerPacket::Version {
                version,
                extensions,
            });
        }
        let id = r.u32("request id")?;
        let packet = match kind {
            FXP_STATUS => {
                let code = r.u32("status code")?;
                // Version 3 servers may end the packet after the code (draft section 7).
                let message = if r.rest.is_empty() {
                    &[][..]
                } else {
                    let m = r.string("status message")?;
                    r.string("language tag")?;
                    m
                };
                ServerPacket::Status { id, code, message }
            }
            FXP_HANDLE => ServerPacket::Handle {
                id,
                handle: r.string("handle")?,
            },
            FXP_DATA => ServerPacket::Data {
                id,
                data: r.string("data")?,
            },
            FXP_NAME | FXP_ATTRS | FXP_EXTENDED_REPLY => return Ok(ServerPacket::Other { id }),
            other => return Err(SftpError::UnknownType(other)),
        };
        r.end()?;
        Ok(packet)
    }
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn finish(mut body: Vec<u8>) -> Vec<u8> {
    let len = (body.len() - 4) as u32;
    if let Some(head) = body.get_mut(..4) {
        head.copy_from_slice(&len.to_be_bytes());
    }
    body
}

/// A STATUS packet answering request `id` (the agent's own answer to a refused request).
pub fn status(id: u32, code: u32, message: &str) -> Vec<u8> {
    let mut out = vec![0; 4];
    out.push(FXP_STATUS);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    put_string(&mut out, message.as_bytes());
    put_string(&mut out, b"en");
    finish(out)
}

/// A VERSION packet with the given extensions (the server's, less those the agent does not
/// relay).
pub fn version(version: u32, extensions: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = vec![0; 4];
    out.push(FXP_VERSION);
    out.extend_from_slice(&version.to_be_bytes());
    for (name, data) in extensions {
        put_string(&mut out, name);
        put_string(&mut out, data);
    }
    finish(out)
}

/// A REALPATH request: the harmless request the relay sends upstream in place of a refused
/// one, so the agent's answer takes its turn among the server's replies.
pub fn realpath(id: u32, path: &[u8]) -> Vec<u8> {
    let mut out = vec![0; 4];
    out.push(FXP_REALPATH);
    out.extend_from_slice(&id.to_be_bytes());
    put_string(&mut out, path);
    finish(out)
}

/// The bytes one handle moved in one direction: how many, and their SHA-256 while they came
/// in file order. Out of order or overlapping pieces (a client reading with gaps, or
/// re-writing a range) make the hash meaningless, so it is dropped and the reason kept.
#[derive(Debug, Clone, Default)]
pub struct Transfer {
    pub bytes: u64,
    next_offset: u64,
    hasher: Sha256,
    not_sequential: Option<String>,
}

/// What a [`Transfer`] says at its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferSummary {
    pub bytes: u64,
    /// Lower-case hex SHA-256 of the bytes in file order from offset 0, when they came so.
    pub sha256: Option<String>,
    /// Why there is no hash.
    pub not_sequential: Option<String>,
}

impl Transfer {
    /// `data` moved at `offset`.
    pub fn add(&mut self, offset: u64, data: &[u8]) {
        self.bytes = self.bytes.saturating_add(data.len() as u64);
        if self.not_sequential.is_some() {
            return;
        }
        if offset != self.next_offset {
            self.not_sequential = Some(format!(
                "bytes at offset {offset} came when offset {} was next; no hash",
                self.next_offset
            ));
            return;
        }
        self.hasher.update(data);
        self.next_offset = offset.saturating_add(data.len() as u64);
    }

    pub fn summary(&self) -> TransferSummary {
        TransferSummary {
            bytes: self.bytes,
            sha256: self
                .not_sequential
                .is_none()
                .then(|| hex::encode(self.hasher.clone().finalize())),
            not_sequential: self.not_sequential.clone(),
        }
    }
}

/// The open flags as words, in the draft's order: `read,write,creat,trunc`.
pub fn open_flags(pflags: u32) -> String {
    let names = [
        (FXF_READ, "read"),
        (FXF_WRITE, "write"),
        (FXF_APPEND, "append"),
        (FXF_CREAT, "creat"),
        (FXF_TRUNC, "trunc"),
        (FXF_EXCL, "excl"),
    ];
    let mut words: Vec<String> = names
        .iter()
        .filter(|(bit, _)| pflags & bit != 0)
        .map(|(_, n)| (*n).to_string())
        .collect();
    let unknown = pflags & !0x3f;
    if unknown != 0 {
        words.push(format!("{unknown:#x}"));
    }
    words.join(",")
}

/// A status code as the draft names it.
pub fn status_name(code: u32) -> String {
    match code {
        FX_OK => "ok".into(),
        FX_EOF => "eof".into(),
        2 => "no such file".into(),
        FX_PERMISSION_DENIED => "permission denied".into(),
        FX_FAILURE => "failure".into(),
        FX_BAD_MESSAGE => "bad message".into(),
        6 => "no connection".into(),
        7 => "connection lost".into(),
        FX_OP_UNSUPPORTED => "operation unsupported".into(),
        other => format!("status {other}"),
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests: a failure is a test failure"
)]
mod tests {
    use super::*;

    fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        out.push(kind);
        out.extend_from_slice(body);
        out
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut out = (s.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(s);
        out
    }

    fn open_request(id: u32, path: &[u8], pflags: u32) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        body.extend(string(path));
        body.extend(pflags.to_be_bytes());
        // attrs: permissions only
        body.extend(4u32.to_be_bytes());
        body.extend(0o644u32.to_be_bytes());
        packet(FXP_OPEN, &body)
    }

    fn write_request(id: u32, handle: &[u8], offset: u64, data: &[u8]) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        body.extend(string(handle));
        body.extend(offset.to_be_bytes());
        body.extend(string(data));
        packet(FXP_WRITE, &body)
    }

    #[test]
    fn packets_are_cut_whatever_the_message_boundaries() {
        let mut stream = open_request(1, b"/etc/secret/a", FXF_READ);
        stream.extend(write_request(2, b"h0", 5, b"hello"));
        stream.extend(packet(FXP_INIT, &3u32.to_be_bytes()));
        // Every split point, and every byte on its own.
        for cut in 0..=stream.len() {
            let mut f = Framer::default();
            let mut got = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                f.push(part);
                while let Some(p) = f.next_packet().unwrap() {
                    got.push(p);
                }
            }
            assert_eq!(got.concat(), stream, "cut at {cut}");
            assert_eq!(got.len(), 3);
            assert_eq!(f.pending(), 0);
        }
        let mut f = Framer::default();
        let mut n = 0;
        for b in &stream {
            f.push(std::slice::from_ref(b));
            while f.next_packet().unwrap().is_some() {
                n += 1;
            }
        }
        assert_eq!(n, 3);
    }

    #[test]
    fn an_oversized_length_is_an_error_before_any_buffering() {
        let mut f = Framer::default();
        f.push(&(MAX_PACKET as u32 + 1).to_be_bytes());
        assert_eq!(f.next_packet(), Err(SftpError::TooLong(MAX_PACKET + 1)));
        // Final: later bytes are not packets and are not kept.
        f.push(&[0; 100]);
        assert!(f.next_packet().is_err());
        assert_eq!(f.pending(), 0);
        let mut f = Framer::default();
        f.push(&u32::MAX.to_be_bytes());
        assert!(matches!(f.next_packet(), Err(SftpError::TooLong(_))));
        let mut f = Framer::default();
        f.push(&0u32.to_be_bytes());
        assert_eq!(f.next_packet(), Err(SftpError::Empty));
        // The limit itself is fine.
        let mut f = Framer::default();
        f.push(&(MAX_PACKET as u32).to_be_bytes());
        assert_eq!(f.next_packet(), Ok(None));
    }

    #[test]
    fn client_requests_decode_with_their_paths_and_handles() {
        let p = open_request(7, b"/etc/secret/a", FXF_READ);
        assert_eq!(
            ClientPacket::decode(&p).unwrap(),
            ClientPacket::Request {
                id: 7,
                op: Op::Open {
                    path: b"/etc/secret/a",
                    pflags: FXF_READ
                }
            }
        );
        let p = write_request(8, b"h1", 32768, b"abc");
        assert_eq!(
            ClientPacket::decode(&p).unwrap(),
            ClientPacket::Request {
                id: 8,
                op: Op::Write {
                    handle: b"h1",
                    offset: 32768,
                    data: b"abc"
                }
            }
        );
        let mut body = 9u32.to_be_bytes().to_vec();
        body.extend(string(b"/a"));
        body.extend(string(b"/b"));
        assert_eq!(
            ClientPacket::decode(&packet(FXP_RENAME, &body)).unwrap(),
            ClientPacket::Request {
                id: 9,
                op: Op::Rename {
                    from: b"/a",
                    to: b"/b"
                }
            }
        );
        let mut body = 10u32.to_be_bytes().to_vec();
        body.extend(string(b"posix-rename@openssh.com"));
        body.extend(string(b"/a"));
        body.extend(string(b"/b"));
        let p = packet(FXP_EXTENDED, &body);
        let ClientPacket::Request {
            id: 10,
            op: Op::Extended { name, data },
        } = ClientPacket::decode(&p).unwrap()
        else {
            panic!("not an extension")
        };
        assert_eq!(name, b"posix-rename@openssh.com");
        assert_eq!(
            extension_strings(data, 2).unwrap(),
            vec![&b"/a"[..], &b"/b"[..]]
        );
        assert!(extension_strings(data, 3).is_err());
    }

    #[test]
    fn every_prefix_of_a_request_is_refused_not_misread() {
        let full = open_request(7, b"/etc/secret/a", FXF_READ | FXF_WRITE);
        let body = &full[4..];
        for cut in 1..body.len() {
            let mut p = (cut as u32).to_be_bytes().to_vec();
            p.extend_from_slice(&body[..cut]);
            assert!(
                matches!(ClientPacket::decode(&p), Err(SftpError::Truncated { .. })),
                "prefix {cut}"
            );
        }
        let mut long = full.clone();
        long.push(0);
        long[3] += 1;
        assert_eq!(
            ClientPacket::decode(&long),
            Err(SftpError::TrailingBytes { kind: 3, extra: 1 })
        );
        // A string length past the packet's end.
        let mut body = 1u32.to_be_bytes().to_vec();
        body.extend(u32::MAX.to_be_bytes());
        assert!(ClientPacket::decode(&packet(FXP_REMOVE, &body)).is_err());
        assert_eq!(
            ClientPacket::decode(&packet(99, &1u32.to_be_bytes())),
            Err(SftpError::UnknownType(99))
        );
    }

    #[test]
    fn server_replies_decode_and_the_agents_own_packets_read_back() {
        let s = status(4, FX_PERMISSION_DENIED, "denied by policy");
        assert_eq!(
            ServerPacket::decode(&s).unwrap(),
            ServerPacket::Status {
                id: 4,
                code: FX_PERMISSION_DENIED,
                message: b"denied by policy"
            }
        );
        // A version 3 server may leave the message out.
        let mut body = 5u32.to_be_bytes().to_vec();
        body.extend(FX_EOF.to_be_bytes());
        assert_eq!(
            ServerPacket::decode(&packet(FXP_STATUS, &body)).unwrap(),
            ServerPacket::Status {
                id: 5,
                code: FX_EOF,
                message: b""
            }
        );
        let v = version(3, &[(b"limits@openssh.com", b"1")]);
        assert_eq!(
            ServerPacket::decode(&v).unwrap(),
            ServerPacket::Version {
                version: 3,
                extensions: vec![(&b"limits@openssh.com"[..], &b"1"[..])]
            }
        );
        let mut body = 6u32.to_be_bytes().to_vec();
        body.extend(string(b"payload"));
        assert_eq!(
            ServerPacket::decode(&packet(FXP_DATA, &body)).unwrap(),
            ServerPacket::Data {
                id: 6,
                data: b"payload"
            }
        );
        let r = realpath(11, b"/");
        assert_eq!(
            ClientPacket::decode(&r).unwrap(),
            ClientPacket::Request {
                id: 11,
                op: Op::Realpath { path: b"/" }
            }
        );
        // Each framed whole.
        let mut f = Framer::default();
        f.push(&s);
        assert_eq!(f.next_packet().unwrap().unwrap(), s);
    }

    #[test]
    fn a_transfer_hashes_in_order_and_says_when_it_cannot() {
        let mut t = Transfer::default();
        t.add(0, b"hello ");
        t.add(6, b"world");
        let s = t.summary();
        assert_eq!(s.bytes, 11);
        assert_eq!(
            s.sha256.as_deref(),
            Some("b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9")
        );
        let mut t = Transfer::default();
        t.add(0, b"hello ");
        t.add(0, b"hello ");
        let s = t.summary();
        assert_eq!(s.bytes, 12);
        assert_eq!(s.sha256, None);
        assert!(s.not_sequential.unwrap().contains("offset 0"));
        assert_eq!(
            open_flags(FXF_WRITE | FXF_CREAT | FXF_TRUNC),
            "write,creat,trunc"
        );
        assert_eq!(open_flags(FXF_READ | 0x100), "read,0x100");
    }
}
