//! The socket of a STOMP connection: TCP or TLS, noting when bytes last arrived, and a write
//! side that the connection's task drives a step at a time.

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
        }
    }

    /// Encodes a frame into the buffer.
    pub(super) fn queue(&mut self, frame: Message<ToServer>) -> Result<(), TransportError> {
        self.mark_waiting();
        self.codec
            .encode(frame, &mut self.buffer)
            .map_err(|e| TransportError::ConnectionLost(format!("encoding a frame: {e}")))
    }

    pub(super) fn queue_heartbeat(&mut self) {
        self.mark_waiting();
        self.buffer.put_u8(b'\n');
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
