//! The byte streams on both sides of a PostgreSQL session (plain TCP or TLS) and the framed
//! reading the session loop uses. Reads are bounded: a message longer than the configured
//! maximum is an error before its body is read, so a client cannot make the agent buffer it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use portcullis_pgwire::{decode_frame, DecodeError, RawMessage};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Read this much at a time; also the granularity of backpressure.
pub const READ_CHUNK: usize = 64 * 1024;

pub enum Stream {
    Plain(TcpStream),
    /// The client side after the agent answered `S` to an SSLRequest.
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// The upstream side when the agent speaks TLS to the server.
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::ServerTls(s) => s.is_write_vectored(),
            Stream::ClientTls(s) => s.is_write_vectored(),
        }
    }
}

/// Why reading a message failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed message: {0}")]
    Decode(#[from] DecodeError),
    #[error("the peer closed the connection")]
    Closed,
}

/// Reads one complete message, pulling more bytes as needed.
pub async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<RawMessage, ReadError> {
    loop {
        if let Some(msg) = decode_frame(buf, max_len)? {
            return Ok(msg);
        }
        if fill(stream, buf).await? == 0 {
            return Err(ReadError::Closed);
        }
    }
}

/// Writes all of `bytes`, then flushes. Over TLS, `write_all` can return with records still
/// in the TLS layer's buffer (the socket was full when the last record was sealed), and
/// nothing sends them until the next write or a flush; after a burst (the end of a COPY) the
/// next write may never come, because the peer waits for an answer to what it did not get.
/// So every write to a [`Stream`] goes through here.
pub async fn write_out<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// One read of up to [`READ_CHUNK`] bytes into `buf`; 0 at end of stream.
///
/// The read lands in the worker thread's scratch buffer and only what arrived is copied
/// into `buf`: a session waiting for its peer holds no read buffer of its own (a 64 KiB
/// one reserved before each wait, times two per session, was most of an idle session's
/// memory), and [`release_if_drained`] can free `buf` between messages.
pub async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut BytesMut) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        SCRATCH.with_borrow_mut(|scratch| {
            let scratch = scratch.get_or_insert_with(|| vec![0u8; READ_CHUNK].into_boxed_slice());
            let mut read = ReadBuf::new(scratch);
            match Pin::new(&mut *stream).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    buf.extend_from_slice(read.filled());
                    Poll::Ready(Ok(read.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    })
    .await
}

thread_local! {
    /// Filled and emptied within one poll, so a task moving between threads never sees
    /// another's bytes.
    static SCRATCH: std::cell::RefCell<Option<Box<[u8]>>> = const { std::cell::RefCell::new(None) };
}

/// Frees `buf`'s memory once everything in it was consumed, so an idle session keeps no
/// buffer; the next [`fill`] allocates only what arrives.
pub fn release_if_drained(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn tls_pair() -> (tokio_rustls::TlsConnector, tokio_rustls::TlsAcceptor) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        (
            tokio_rustls::TlsConnector::from(Arc::new(client)),
            tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        )
    }

    /// A session waiting for its peer keeps no read buffer: a read takes only what arrived
    /// (not a 64 KiB reservation made before the wait), and a drained buffer is freed.
    #[tokio::test]
    async fn a_read_holds_only_what_arrived_and_a_drained_buffer_is_freed() {
        let (mut near, mut far) = tokio::io::duplex(4096);
        far.write_all(b"Q\0\0\0\x0dSELECT 1\0").await.unwrap();
        let mut buf = BytesMut::new();
        assert_eq!(fill(&mut near, &mut buf).await.unwrap(), 14);
        assert_eq!(&buf[..], b"Q\0\0\0\x0dSELECT 1\0");
        assert!(buf.capacity() < 1024, "holds {} bytes", buf.capacity());
        let message = buf.split();
        release_if_drained(&mut buf);
        assert_eq!(buf.capacity(), 0);
        assert_eq!(
            message.len(),
            14,
            "what was taken out is not freed with the buffer"
        );
        // Messages longer than one read still accumulate whole.
        let long = vec![7u8; 3 * READ_CHUNK];
        let writer = async { far.write_all(&long).await.unwrap() };
        let reader = async {
            while buf.len() < long.len() {
                assert!(fill(&mut near, &mut buf).await.unwrap() <= READ_CHUNK);
            }
        };
        tokio::join!(writer, reader);
        assert!(buf[..] == long[..]);
    }

    /// The end of a burst over TLS reaches the peer although nothing is written after it:
    /// through a 4 KiB pipe, most of a 48 KiB write is still sealed records in the TLS layer
    /// when the write is accepted.
    #[tokio::test]
    async fn a_write_over_tls_reaches_the_peer_without_a_later_write() {
        let (near, far) = tokio::io::duplex(4096);
        let (connector, acceptor) = tls_pair();
        let name = ServerName::try_from("localhost").unwrap();
        let (client, server) = tokio::join!(connector.connect(name, near), acceptor.accept(far));
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        let data: Vec<u8> = (0..48 * 1024).map(|i| (i % 251) as u8).collect();
        let writer = async {
            write_out(&mut client, &data).await.unwrap();
            // Written out: from here on nothing polls the client stream.
            std::future::pending::<()>().await;
        };
        let reader = async {
            let mut got = vec![0u8; data.len()];
            let read = tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut got));
            assert!(
                matches!(read.await, Ok(Ok(_))),
                "the peer did not get the whole write"
            );
            got
        };
        let got = tokio::select! {
            got = reader => got,
            () = writer => unreachable!(),
        };
        assert!(got == data);
    }
}
