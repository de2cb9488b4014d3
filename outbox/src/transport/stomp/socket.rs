//! The socket of a STOMP connection: TCP or TLS, noting when bytes last arrived, and a write
//! side that the connection's task drives a step at a time.
//!
//! A frame counts as written once the socket took its last byte; the receipt timeout runs from
//! then. The kernel's send buffer grows to megabytes by itself, and what it holds may take
//! seconds to cross a slow link: [`limit_send_buffer`] bounds it, so that "written" means "on
//! its way, close behind".

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use async_stomp::client::ClientCodec;
use async_stomp::{Message, ToServer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, WriteHalf};
use tokio::net::TcpStream;
use tokio_util::bytes::{BufMut, BytesMut};
use tokio_util::codec::Encoder;

use crate::transport::TransportError;

/// The send buffer asked of the kernel for a broker socket (Linux reserves twice this for its
/// own bookkeeping): room for a few pipelined batches, and at most about a second of a
/// 512 kB/s link between a frame's last byte written and its arrival.
pub(crate) const SEND_BUFFER: usize = 256 * 1024;

/// Bounds `tcp`'s send buffer to [`SEND_BUFFER`] (see the module docs). Best effort: a system
/// that refuses keeps its own.
pub(crate) fn limit_send_buffer(tcp: &TcpStream) {
    if let Err(err) = socket2::SockRef::from(tcp).set_send_buffer_size(SEND_BUFFER) {
        tracing::debug!(error = %err, "the socket's send buffer could not be bounded");
    }
}

/// The socket, as the codec sees it: TCP or TLS, counting when bytes last arrived.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

pub(super) struct Watched {
    pub(super) stream: Stream,
    pub(super) last_read: Arc<AtomicU64>,
    pub(super) epoch: Instant,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if buf.filled().len() > before {
            let now = this.epoch.elapsed().as_millis() as u64;
            this.last_read.store(now, Ordering::Relaxed);
        }
        poll
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The socket's write side: frames are encoded into a buffer that the task writes out as fast
/// as the broker reads, beside its other work (never awaited to the end inside one step).
pub(super) struct Writer {
    half: WriteHalf<Watched>,
    pub(super) buffer: BytesMut,
    codec: ClientCodec,
    /// Bytes went out since the last flush (TLS holds records until flushed).
    unflushed: bool,
    /// Since when bytes have waited without one leaving; `None` when nothing waits.
    pub(super) waiting_since: Option<Instant>,
    /// When a byte last left, for the outgoing heartbeats.
    pub(super) last_write: Instant,
    /// Bytes put in the buffer since the connection opened (frames and heartbeats): where the
    /// frame queued last ends in the stream.
    pub(super) encoded: u64,
    /// Bytes the socket took since the connection opened: every frame that ends at or before
    /// this has been written whole.
    pub(super) written: u64,
}

impl Writer {
    pub(super) fn new(half: WriteHalf<Watched>) -> Self {
        Self {
            half,
            buffer: BytesMut::with_capacity(64 * 1024),
            codec: ClientCodec::new(),
            unflushed: false,
            waiting_since: None,
            last_write: Instant::now(),
            encoded: 0,
            written: 0,
        }
    }

    /// Encodes a frame into the buffer; returns where it ends in the stream (see
    /// [`Writer::written`]).
    pub(super) fn queue(&mut self, frame: Message<ToServer>) -> Result<u64, TransportError> {
        self.mark_waiting();
        let before = self.buffer.len();
        self.codec
            .encode(frame, &mut self.buffer)
            .map_err(|e| TransportError::ConnectionLost(format!("encoding a frame: {e}")))?;
        self.encoded += (self.buffer.len() - before) as u64;
        Ok(self.encoded)
    }

    pub(super) fn queue_heartbeat(&mut self) {
        self.mark_waiting();
        self.buffer.put_u8(b'\n');
        self.encoded += 1;
    }

    fn mark_waiting(&mut self) {
        if self.buffer.is_empty() {
            self.waiting_since = Some(Instant::now());
        }
    }

    /// Whether anything waits to be written or flushed.
    pub(super) fn busy(&self) -> bool {
        !self.buffer.is_empty() || self.unflushed
    }

    /// Writes what the socket takes now, or flushes. Cancel-safe: dropped while waiting, it
    /// has written nothing.
    pub(super) async fn progress(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            self.half.flush().await?;
            self.unflushed = false;
            return Ok(());
        }
        let written = self.half.write_buf(&mut self.buffer).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let now = Instant::now();
        self.written += written as u64;
        self.unflushed = true;
        self.last_write = now;
        self.waiting_since = (!self.buffer.is_empty()).then_some(now);
        Ok(())
    }

    /// Writes and flushes everything (the login, before the task starts).
    pub(super) async fn write_all(&mut self) -> std::io::Result<()> {
        while self.busy() {
            self.progress().await?;
        }
        Ok(())
    }
}
