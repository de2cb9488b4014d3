//! The STOMP transport: async-stomp's frame codec over a TCP or TLS stream that this module owns,
//! so that it controls what async-stomp's own connector does not: failover across the configured
//! hosts, a private CA and client certificates, heartbeats, receipts and typed errors.
//!
//! One connection at a time. A task owns the socket: it writes the frames callers queue (many at
//! a time, so a batch of SENDs leaves in few packets), reads the broker's frames, routes RECEIPTs
//! to the callers waiting on them and MESSAGEs to their subscriptions, sends heartbeats, and
//! declares the connection dead when the broker goes quiet for longer than its heartbeats allow.
//! When the connection dies, every caller still waiting learns why, and the next call connects
//! again.
//!
//! Nothing the task waits for holds up the rest: a write the broker does not read (RabbitMQ stops
//! reading publishing connections during a memory or disk alarm) goes on beside the reading and
//! the heartbeats, and ends the connection when no byte has left for the receipt timeout;
//! deliveries beyond a subscription's buffer wait in the task's backlog, not in the socket. A
//! frame that does not decode, or exceeds the maximum frame size, is rejected to its dead-letter
//! queue and the connection goes on ([`framing`]).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_stomp::client::ClientCodec;
use async_stomp::{AckMode as StompAck, FromServer, Message, ToServer};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::bytes::{BufMut, BytesMut};
use tokio_util::codec::{Encoder, FramedRead};

use super::{
    AckMode, Delivery, Outcome, Outgoing, SendReport, Subscription, Transport, TransportError,
};
use crate::config::OutboxConfig;
use framing::{FrameDecoder, Inbound, Undecodable};

mod framing;
pub(crate) mod tls;

/// Frames a caller may queue before the writer catches up: plenty for a pipelined batch.
const WRITE_QUEUE: usize = 4096;
/// Encoded bytes waiting for the socket past which the task stops taking queued frames: callers
/// then wait on the queue (with a deadline) instead of the task's memory growing.
const WRITE_HIGH_WATER: usize = 4 * 1024 * 1024;
/// How long a message that did not decode waits before it is rejected (see `Driver::set_aside`).
const REJECT_AFTER: Duration = Duration::from_millis(100);
/// How long a DISCONNECT waits for its receipt on a connection where one already timed out.
const UNANSWERED_DISCONNECT_WAIT: Duration = Duration::from_secs(1);
/// Deliveries buffered per subscription without a `prefetch-count` (RabbitMQ: no limit).
const DELIVERY_QUEUE: usize = 1024;
/// The most deliveries buffered per subscription, whatever its `prefetch-count`; more wait in
/// the task's backlog.
const MAX_DELIVERY_QUEUE: usize = 10_000;

/// A STOMP 1.2 broker connection with failover, heartbeats and receipts.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use outbox::transport::{Outgoing, StompTransport, Transport};
///
/// let broker = StompTransport::new(&outbox::OutboxConfig::from_env()?)?;
/// let report = broker
///     .send(&[Outgoing {
///         destination: "/topic/orders".into(),
///         headers: vec![],
///         body: br#"{"id": 1}"#.to_vec(),
///     }])
///     .await;
/// assert!(report.all_receipted());
/// # Ok(()) }
/// ```
pub struct StompTransport {
    settings: Arc<Settings>,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// Numbers the connections this transport opens ([`Delivery::connection`]).
    connections_opened: AtomicU64,
}

/// What a connection needs from [`OutboxConfig`].
struct Settings {
    addresses: Vec<(String, u16)>,
    vhost: String,
    login: String,
    passcode: crate::config::Secret,
    tls: Option<tls::TlsSettings>,
    heartbeats: (Duration, Duration),
    receipt_timeout: Duration,
    max_frame_size: usize,
}

impl StompTransport {
    /// A transport for the broker of `config`; it connects on first use. TLS files are read now,
    /// so a wrong path fails here.
    pub fn new(config: &OutboxConfig) -> Result<Self, TransportError> {
        let tls = if config.stomp_use_ssl {
            Some(tls::TlsSettings::from_config(config)?)
        } else {
            None
        };
        Ok(Self {
            settings: Arc::new(Settings {
                addresses: config.stomp_host_and_ports.clone(),
                vhost: config.stomp_vhost.clone(),
                login: config.stomp_username.clone(),
                passcode: config.stomp_passcode.clone(),
                tls,
                heartbeats: config.stomp_heartbeats,
                receipt_timeout: config.receipt_timeout,
                max_frame_size: config.stomp_max_frame_size,
            }),
            connection: tokio::sync::Mutex::new(None),
            connections_opened: AtomicU64::new(0),
        })
    }

    /// The open connection, or a new one.
    async fn connection(&self) -> Result<Arc<Connection>, TransportError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref()
            && connection.is_open()
        {
            return Ok(connection.clone());
        }
        *slot = None;
        let generation = self.connections_opened.fetch_add(1, Ordering::Relaxed) + 1;
        let connection = Arc::new(Connection::open(&self.settings, generation).await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// The open connection, if any, without connecting.
    async fn current(&self) -> Result<Arc<Connection>, TransportError> {
        match self.connection.lock().await.as_ref() {
            Some(connection) if connection.is_open() => Ok(connection.clone()),
            _ => Err(TransportError::ConnectionLost("not connected".into())),
        }
    }

    /// The open connection, if `delivery` came on it: an ack id is only meaningful there.
    async fn current_for(&self, delivery: &Delivery) -> Result<Arc<Connection>, TransportError> {
        let connection = self.current().await?;
        if connection.generation != delivery.connection {
            return Err(TransportError::stale_delivery());
        }
        Ok(connection)
    }
}

#[async_trait::async_trait]
impl Transport for StompTransport {
    async fn connect(&self) -> Result<(), TransportError> {
        self.connection().await.map(|_| ())
    }

    async fn send(&self, messages: &[Outgoing]) -> SendReport {
        let connection = match self.connection().await {
            Ok(connection) => connection,
            Err(err) => return SendReport::unsent(messages.len(), err),
        };
        connection
            .send(messages, self.settings.receipt_timeout)
            .await
    }

    async fn subscribe(
        &self,
        subscription: Subscription,
    ) -> Result<mpsc::Receiver<Delivery>, TransportError> {
        let connection = self.connection().await?;
        connection
            .subscribe(subscription, self.settings.receipt_timeout)
            .await
    }

    async fn unsubscribe(&self, id: &str) -> Result<(), TransportError> {
        let connection = self.current().await?;
        connection.subscriptions().remove(id);
        connection
            .request(
                ToServer::Unsubscribe { id: id.to_owned() }.into(),
                self.settings.receipt_timeout,
            )
            .await
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), TransportError> {
        let connection = self.current_for(delivery).await?;
        connection.write(
            ToServer::Ack {
                id: delivery.ack_id.clone(),
                transaction: None,
            }
            .into(),
        )
    }

    async fn nack(&self, delivery: &Delivery) -> Result<(), TransportError> {
        let connection = self.current_for(delivery).await?;
        let mut frame: Message<ToServer> = ToServer::Nack {
            id: delivery.ack_id.clone(),
            transaction: None,
        }
        .into();
        frame
            .extra_headers
            .push((b"requeue".to_vec(), b"false".to_vec()));
        connection.write(frame)
    }

    async fn disconnect(&self) -> Result<(), TransportError> {
        let Some(connection) = self.connection.lock().await.take() else {
            return Ok(());
        };
        if !connection.is_open() {
            return Ok(());
        }
        connection.shared.closing.store(true, Ordering::Relaxed);
        // A broker that let a receipt time out on this connection (blocked by an alarm, say)
        // would most likely let the DISCONNECT's time out too: a stopping process then waits
        // only briefly, long enough for frames queued before it (acknowledgements) to leave.
        let wait = if connection.shared.unanswered.load(Ordering::Relaxed) {
            self.settings
                .receipt_timeout
                .min(UNANSWERED_DISCONNECT_WAIT)
        } else {
            self.settings.receipt_timeout
        };
        let result = connection
            .request(ToServer::Disconnect { receipt: None }.into(), wait)
            .await;
        connection.close();
        result
    }
}

/// The socket, as the codec sees it: TCP or TLS, counting when bytes last arrived.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

struct Watched {
    stream: Stream,
    last_read: Arc<AtomicU64>,
    epoch: Instant,
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

type Waiter = oneshot::Sender<Result<(), TransportError>>;

/// State shared by callers and the connection's task.
#[derive(Default)]
struct Shared {
    receipts: Mutex<HashMap<String, Waiter>>,
    subscriptions: Mutex<HashMap<String, Route>>,
    /// Why the connection ended; set once.
    ended: Mutex<Option<TransportError>>,
    /// A DISCONNECT was sent: the end of the connection is expected, not a failure.
    closing: std::sync::atomic::AtomicBool,
    /// A receipt (or room in the write queue) did not come in time on this connection.
    unanswered: std::sync::atomic::AtomicBool,
}

/// Where a subscription's deliveries go.
struct Route {
    sender: mpsc::Sender<Delivery>,
    /// The queue it reads (`x-queue-name`, else the destination's last `/` segment): the label
    /// of what it counts.
    queue: String,
    ack: AckMode,
    /// It declares a dead-letter route (`x-dead-letter-*`), as a consumer's subscription does:
    /// only then is a message that does not decode rejected (a reader of a dead-letter queue
    /// would send it on to a queue that may not exist).
    dead_letters: bool,
}

/// One open STOMP connection and the task that drives it.
struct Connection {
    /// Which of the transport's connections this is.
    generation: u64,
    outbound: mpsc::Sender<Message<ToServer>>,
    shared: Arc<Shared>,
    next_receipt: AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Connection {
    /// Connects to the first address that answers, and logs in.
    async fn open(settings: &Settings, generation: u64) -> Result<Self, TransportError> {
        let mut last_error = None;
        for (host, port) in &settings.addresses {
            match Self::open_one(settings, host, *port, generation).await {
                Ok(connection) => return Ok(connection),
                // A refused login is the same everywhere: say so rather than try the others.
                Err(err @ TransportError::Refused { .. }) | Err(err @ TransportError::Tls(_)) => {
                    return Err(err);
                }
                Err(err) => {
                    tracing::debug!(host = %host, port, error = %err, "broker address failed");
                    last_error = Some(err);
                }
            }
        }
        let addresses = settings
            .addresses
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        Err(match last_error {
            Some(TransportError::Connect { reason, .. }) => {
                TransportError::Connect { addresses, reason }
            }
            Some(other) => TransportError::Connect {
                addresses,
                reason: other.to_string(),
            },
            None => TransportError::Connect {
                addresses,
                reason: "no address configured".into(),
            },
        })
    }

    async fn open_one(
        settings: &Settings,
        host: &str,
        port: u16,
        generation: u64,
    ) -> Result<Self, TransportError> {
        let address = format!("{host}:{port}");
        let connect_failed = |reason: String| TransportError::Connect {
            addresses: address.clone(),
            reason,
        };
        let timeout = settings.receipt_timeout;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
            .await
            .map_err(|_| connect_failed(format!("no answer within {timeout:?}")))?
            .map_err(|e| connect_failed(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let stream = match &settings.tls {
            Some(tls) => {
                let stream = tokio::time::timeout(timeout, tls.connect(host, tcp))
                    .await
                    .map_err(|_| {
                        connect_failed(format!("no TLS handshake within {timeout:?}"))
                    })??;
                Stream::Tls(Box::new(stream))
            }
            None => Stream::Plain(tcp),
        };
        let last_read = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let watched = Watched {
            stream,
            last_read: last_read.clone(),
            epoch,
        };
        let (read_half, write_half) = tokio::io::split(watched);
        let mut reader = FramedRead::new(read_half, FrameDecoder::new(settings.max_frame_size));
        let mut writer = Writer::new(write_half);

        let (out_ms, in_ms) = (
            settings.heartbeats.0.as_millis() as u32,
            settings.heartbeats.1.as_millis() as u32,
        );
        writer
            .queue(
                ToServer::Connect {
                    accept_version: "1.2".into(),
                    host: settings.vhost.clone(),
                    login: Some(settings.login.clone()),
                    passcode: Some(settings.passcode.expose().to_owned()),
                    heartbeat: Some((out_ms, in_ms)),
                }
                .into(),
            )
            .map_err(|e| connect_failed(e.to_string()))?;
        tokio::time::timeout(timeout, writer.write_all())
            .await
            .map_err(|_| connect_failed(format!("could not send CONNECT within {timeout:?}")))?
            .map_err(|e| connect_failed(e.to_string()))?;
        let reply = tokio::time::timeout(timeout, reader.next())
            .await
            .map_err(|_| connect_failed(format!("no CONNECTED within {timeout:?}")))?;
        let server_heartbeat = match reply {
            Some(Ok(Inbound::Frame(Message {
                content: FromServer::Connected { heartbeat, .. },
                ..
            }))) => heartbeat,
            Some(Ok(Inbound::Frame(Message {
                content: FromServer::Error { message, body },
                ..
            }))) => {
                return Err(TransportError::Refused {
                    address,
                    message: describe_error(message, body),
                });
            }
            Some(Ok(Inbound::Frame(other))) => {
                return Err(connect_failed(format!(
                    "unexpected answer to CONNECT: {:?}",
                    other.content
                )));
            }
            Some(Ok(Inbound::Undecodable(frame))) => {
                return Err(connect_failed(format!(
                    "the answer to CONNECT ({}) does not decode: {}",
                    frame.command, frame.reason
                )));
            }
            Some(Err(e)) => return Err(connect_failed(e.to_string())),
            None => {
                return Err(connect_failed(
                    "the broker closed the connection during login".into(),
                ));
            }
        };
        let (server_out, server_in) = parse_heartbeat(server_heartbeat.as_deref());
        // STOMP 1.2 §Heart-beating: each side's interval is the larger of what one offers and
        // the other wants, and zero on either side turns that direction off.
        let send_every = negotiated(out_ms, server_in);
        let expect_every = negotiated(in_ms, server_out);

        let (outbound, rx) = mpsc::channel(WRITE_QUEUE);
        let shared = Arc::new(Shared::default());
        let driver = Driver {
            reader,
            writer,
            outbound: rx,
            shared: shared.clone(),
            last_read,
            epoch,
            send_every,
            expect_every,
            write_deadline: timeout,
            generation,
            backlog: Backlog::default(),
            rejections: Vec::new(),
            reject_at: tokio::time::Instant::now(),
        };
        let task = tokio::spawn(driver.run());
        tracing::info!(broker = %address, ?send_every, ?expect_every, "connected to the broker");
        Ok(Self {
            generation,
            outbound,
            shared,
            next_receipt: AtomicU64::new(1),
            task,
        })
    }

    fn is_open(&self) -> bool {
        !self.task.is_finished() && self.ended().is_none()
    }

    fn close(&self) {
        self.task.abort();
    }

    fn ended(&self) -> Option<TransportError> {
        lock(&self.shared.ended).clone()
    }

    fn lost(&self) -> TransportError {
        self.ended()
            .unwrap_or_else(|| TransportError::ConnectionLost("the connection closed".into()))
    }

    fn subscriptions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        lock(&self.shared.subscriptions)
    }

    /// The error of a receipt that did not come in time, noting that the broker left one
    /// unanswered on this connection.
    fn unanswered(&self, timeout: Duration) -> TransportError {
        self.shared.unanswered.store(true, Ordering::Relaxed);
        TransportError::ReceiptTimeout(timeout)
    }

    /// Queues a frame for writing.
    fn write(&self, frame: Message<ToServer>) -> Result<(), TransportError> {
        self.outbound.try_send(frame).map_err(|_| self.lost())
    }

    /// Adds a receipt request to `frame` and registers its waiter.
    fn with_receipt(
        &self,
        frame: &mut Message<ToServer>,
    ) -> oneshot::Receiver<Result<(), TransportError>> {
        let (tx, rx) = oneshot::channel();
        // Numbered and registered under one lock, so that every number below `next_receipt` is
        // either pending in the map or answered ([`Connection::overtaken`]).
        let mut receipts = lock(&self.shared.receipts);
        let id = self
            .next_receipt
            .fetch_add(1, Ordering::Relaxed)
            .to_string();
        receipts.insert(id.clone(), tx);
        drop(receipts);
        frame
            .extra_headers
            .push((b"receipt".to_vec(), id.into_bytes()));
        rx
    }

    /// Sends one frame with a receipt request and waits for the receipt.
    async fn request(
        &self,
        mut frame: Message<ToServer>,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let receipt = self.with_receipt(&mut frame);
        match tokio::time::timeout_at(deadline, self.outbound.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(self.lost()),
            Err(_) => return Err(self.unanswered(timeout)),
        }
        match tokio::time::timeout_at(deadline, receipt).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.lost()),
            Err(_) => Err(self.unanswered(timeout)),
        }
    }

    async fn send(&self, messages: &[Outgoing], timeout: Duration) -> SendReport {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut waiters = Vec::with_capacity(messages.len());
        let mut unqueued = None;
        for message in messages {
            let mut headers = Vec::with_capacity(message.headers.len() + 3);
            headers.extend(message.headers.iter().cloned());
            headers.push(("content-length".into(), message.body.len().to_string()));
            let mut frame: Message<ToServer> = ToServer::Send {
                destination: message.destination.clone(),
                transaction: None,
                headers: Some(headers),
                body: Some(message.body.clone()),
            }
            .into();
            let receipt = self.with_receipt(&mut frame);
            let number = frame
                .extra_headers
                .last()
                .and_then(|(_, id)| std::str::from_utf8(id).ok()?.parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            // A broker that stops reading fills the queue: wait for room only until the deadline.
            match tokio::time::timeout_at(deadline, self.outbound.send(frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    unqueued = Some(self.unanswered(timeout));
                    break;
                }
            }
            waiters.push((number, receipt));
        }
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut timed_out = Vec::new();
        for (number, mut waiter) in waiters {
            let outcome = match tokio::time::timeout_at(deadline, &mut waiter).await {
                Ok(Ok(Ok(()))) => Outcome::Receipted,
                Ok(Ok(Err(err))) => Outcome::unknown(err),
                Ok(Err(_)) => Outcome::unknown(self.lost()),
                Err(_) => {
                    timed_out.push((outcomes.len(), number));
                    Outcome::unknown(self.unanswered(timeout))
                }
            };
            outcomes.push(outcome);
        }
        for (index, number) in timed_out {
            if self.overtaken(number)
                && let Outcome::Unknown(unknown) = &mut outcomes[index]
            {
                unknown.overtaken = true;
            }
        }
        // Messages never queued: the connection had ended, or the broker stopped reading.
        while outcomes.len() < messages.len() {
            let reason = unqueued.clone().unwrap_or_else(|| self.lost());
            outcomes.push(Outcome::unknown(reason));
        }
        SendReport { outcomes }
    }

    /// Whether a frame numbered after receipt `number` was receipted on this still-open
    /// connection while `number` was not: the numbers below `next_receipt` that are no longer
    /// in the map were answered, and the map is emptied only when the connection ends.
    fn overtaken(&self, number: u64) -> bool {
        let answered_later = {
            let receipts = lock(&self.shared.receipts);
            let next = self.next_receipt.load(Ordering::Relaxed);
            (number + 1..next).any(|later| !receipts.contains_key(&later.to_string()))
        };
        answered_later && self.ended().is_none()
    }

    async fn subscribe(
        &self,
        subscription: Subscription,
        timeout: Duration,
    ) -> Result<mpsc::Receiver<Delivery>, TransportError> {
        let (tx, rx) = mpsc::channel(delivery_queue(&subscription.headers));
        let route = Route {
            sender: tx,
            queue: queue_of(&subscription),
            ack: subscription.ack,
            dead_letters: subscription
                .headers
                .iter()
                .any(|(name, _)| name.starts_with("x-dead-letter-")),
        };
        self.subscriptions().insert(subscription.id.clone(), route);
        let mut frame: Message<ToServer> = ToServer::Subscribe {
            destination: subscription.destination,
            id: subscription.id.clone(),
            ack: Some(match subscription.ack {
                AckMode::Auto => StompAck::Auto,
                AckMode::ClientIndividual => StompAck::ClientIndividual,
            }),
        }
        .into();
        frame.extra_headers.extend(
            subscription
                .headers
                .into_iter()
                .map(|(k, v)| (k.into_bytes(), v.into_bytes())),
        );
        if let Err(err) = self.request(frame, timeout).await {
            self.subscriptions().remove(&subscription.id);
            return Err(err);
        }
        Ok(rx)
    }
}

/// The socket's write side: frames are encoded into a buffer that the task writes out as fast
/// as the broker reads, beside its other work (never awaited to the end inside one step).
struct Writer {
    half: WriteHalf<Watched>,
    buffer: BytesMut,
    codec: ClientCodec,
    /// Bytes went out since the last flush (TLS holds records until flushed).
    unflushed: bool,
    /// Since when bytes have waited without one leaving; `None` when nothing waits.
    waiting_since: Option<Instant>,
    /// When a byte last left, for the outgoing heartbeats.
    last_write: Instant,
}

impl Writer {
    fn new(half: WriteHalf<Watched>) -> Self {
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
    fn queue(&mut self, frame: Message<ToServer>) -> Result<(), TransportError> {
        self.mark_waiting();
        self.codec
            .encode(frame, &mut self.buffer)
            .map_err(|e| TransportError::ConnectionLost(format!("encoding a frame: {e}")))
    }

    fn queue_heartbeat(&mut self) {
        self.mark_waiting();
        self.buffer.put_u8(b'\n');
    }

    fn mark_waiting(&mut self) {
        if self.buffer.is_empty() {
            self.waiting_since = Some(Instant::now());
        }
    }

    /// Whether anything waits to be written or flushed.
    fn busy(&self) -> bool {
        !self.buffer.is_empty() || self.unflushed
    }

    /// Writes what the socket takes now, or flushes. Cancel-safe: dropped while waiting, it
    /// has written nothing.
    async fn progress(&mut self) -> std::io::Result<()> {
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
    async fn write_all(&mut self) -> std::io::Result<()> {
        while self.busy() {
            self.progress().await?;
        }
        Ok(())
    }
}

/// Deliveries that found their subscription's buffer full, in arrival order: the task keeps
/// reading (heartbeats, receipts) and hands these over as room appears.
#[derive(Default)]
struct Backlog {
    waiting: VecDeque<(mpsc::Sender<Delivery>, Delivery)>,
    /// Warned about on this connection already.
    warned: bool,
}

impl Backlog {
    /// Hands the delivery over now if its buffer has room and nothing waits before it.
    fn deliver(&mut self, sender: mpsc::Sender<Delivery>, delivery: Delivery) {
        if self.waiting.is_empty() {
            match sender.try_send(delivery) {
                Ok(()) => {}
                // The subscriber went away: the broker redelivers what it did not settle.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(delivery)) => {
                    if !self.warned {
                        self.warned = true;
                        tracing::warn!(
                            subscription = %delivery.subscription,
                            "the broker delivers more than the subscription's buffer holds (no or a huge prefetch-count); the rest wait in memory"
                        );
                    }
                    self.waiting.push_back((sender, delivery));
                }
            }
        } else {
            self.waiting.push_back((sender, delivery));
        }
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Waits for room for the oldest waiting delivery and hands it over. Cancel-safe.
    async fn forward(&mut self) {
        let Some((sender, _)) = self.waiting.front() else {
            return std::future::pending().await;
        };
        let permit = sender.clone().reserve_owned().await;
        if let Some((_, delivery)) = self.waiting.pop_front()
            && let Ok(permit) = permit
        {
            permit.send(delivery);
        }
    }
}

/// The task that owns the socket.
struct Driver {
    reader: FramedRead<ReadHalf<Watched>, FrameDecoder>,
    writer: Writer,
    outbound: mpsc::Receiver<Message<ToServer>>,
    shared: Arc<Shared>,
    last_read: Arc<AtomicU64>,
    epoch: Instant,
    send_every: Option<Duration>,
    expect_every: Option<Duration>,
    /// How long bytes may wait for the broker to read them before the connection is given up.
    write_deadline: Duration,
    /// Stamped on every delivery ([`Delivery::connection`]).
    generation: u64,
    backlog: Backlog,
    /// Messages that did not decode, to reject at `reject_at`.
    rejections: Vec<Undecodable>,
    reject_at: tokio::time::Instant,
}

impl Driver {
    async fn run(mut self) {
        let reason = self.drive().await;
        if self.shared.closing.load(Ordering::Relaxed) {
            tracing::debug!(reason = %reason, "broker connection closed after DISCONNECT");
        } else {
            tracing::warn!(error = %reason, "broker connection ended");
        }
        *lock(&self.shared.ended) = Some(reason.clone());
        for (_, waiter) in lock(&self.shared.receipts).drain() {
            let _ = waiter.send(Err(reason.clone()));
        }
        lock(&self.shared.subscriptions).clear();
        self.outbound.close();
    }

    /// Runs until the connection ends, and says why.
    async fn drive(&mut self) -> TransportError {
        // Checked often enough to notice a silent broker, or one that stopped reading, soon
        // after its allowance runs out.
        let tick = [
            self.send_every,
            self.expect_every,
            Some(self.write_deadline / 2),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|d| (d / 2).max(Duration::from_millis(50)))
        .unwrap_or(Duration::from_secs(1));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                frame = self.outbound.recv(), if self.writer.buffer.len() < WRITE_HIGH_WATER => {
                    let Some(frame) = frame else {
                        return TransportError::Closed;
                    };
                    if let Err(err) = self.writer.queue(frame) {
                        return err;
                    }
                    // Everything queued behind it leaves in the same writes.
                    while self.writer.buffer.len() < WRITE_HIGH_WATER
                        && let Ok(frame) = self.outbound.try_recv()
                    {
                        if let Err(err) = self.writer.queue(frame) {
                            return err;
                        }
                    }
                }
                written = self.writer.progress(), if self.writer.busy() => {
                    if let Err(e) = written {
                        return TransportError::ConnectionLost(e.to_string());
                    }
                }
                incoming = self.reader.next() => {
                    let reason = match incoming {
                        Some(Ok(Inbound::Frame(message))) => self.dispatch(message),
                        Some(Ok(Inbound::Undecodable(frame))) => self.set_aside(frame),
                        Some(Err(e)) => Some(TransportError::ConnectionLost(e.to_string())),
                        None => Some(TransportError::ConnectionLost("the broker closed the connection".into())),
                    };
                    if let Some(reason) = reason {
                        return reason;
                    }
                }
                () = self.backlog.forward(), if !self.backlog.is_empty() => {}
                () = tokio::time::sleep_until(self.reject_at), if !self.rejections.is_empty() => {
                    for frame in std::mem::take(&mut self.rejections) {
                        if let Some(reason) = self.reject(frame) {
                            return reason;
                        }
                    }
                }
                _ = ticker.tick() => {
                    if let Some(reason) = self.check_liveness() {
                        return reason;
                    }
                }
            }
        }
    }

    /// Sends a heartbeat when one is due, and ends the connection when the broker has been
    /// silent, or has read nothing, for longer than allowed.
    fn check_liveness(&mut self) -> Option<TransportError> {
        if let Some(every) = self.send_every
            && self.writer.last_write.elapsed() >= every
            && !self.writer.busy()
        {
            self.writer.queue_heartbeat();
        }
        if let Some(since) = self.writer.waiting_since
            && since.elapsed() > self.write_deadline
        {
            return Some(TransportError::Blocked(since.elapsed()));
        }
        if let Some(every) = self.expect_every {
            let last = Duration::from_millis(self.last_read.load(Ordering::Relaxed));
            let silent = self.epoch.elapsed().saturating_sub(last);
            // Twice the interval: the spec's allowance for network delay.
            if silent > every * 2 {
                return Some(TransportError::ConnectionLost(format!(
                    "no heartbeat from the broker for {silent:?}"
                )));
            }
        }
        None
    }

    /// Handles one frame from the broker; `Some(reason)` ends the connection.
    fn dispatch(&mut self, message: Message<FromServer>) -> Option<TransportError> {
        match message.content {
            FromServer::Receipt { receipt_id } => {
                if let Some(waiter) = lock(&self.shared.receipts).remove(&receipt_id) {
                    let _ = waiter.send(Ok(()));
                }
                None
            }
            FromServer::Message {
                destination,
                message_id,
                subscription,
                ack,
                headers,
                body,
            } => {
                let sender = lock(&self.shared.subscriptions)
                    .get(&subscription)
                    .map(|route| route.sender.clone());
                if let Some(sender) = sender {
                    let delivery = Delivery {
                        ack_id: ack.unwrap_or_else(|| message_id.clone()),
                        subscription,
                        destination,
                        message_id,
                        headers,
                        body: body.unwrap_or_default(),
                        connection: self.generation,
                    };
                    self.backlog.deliver(sender, delivery);
                }
                None
            }
            // RabbitMQ closes the connection after most ERRORs, and an ERROR names no receipt
            // when it answers a SEND: end the connection, so every waiter learns the reason.
            FromServer::Error { message, body } => Some(TransportError::Broker {
                message: message.unwrap_or_else(|| "ERROR".into()),
                detail: body
                    .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
                    .unwrap_or_default(),
            }),
            FromServer::Connected { .. } => None,
        }
    }

    /// A complete frame that did not decode, or exceeded the maximum size. A MESSAGE waits
    /// [`REJECT_AFTER`] to be rejected ([`Driver::reject`]); the connection goes on. Anything
    /// else ends the connection.
    fn set_aside(&mut self, frame: Undecodable) -> Option<TransportError> {
        match frame.command.as_str() {
            "MESSAGE" => {}
            "ERROR" => {
                return Some(TransportError::Broker {
                    message: "ERROR (not decodable)".into(),
                    detail: frame.reason,
                });
            }
            other => {
                return Some(TransportError::ConnectionLost(format!(
                    "the broker sent a {other} frame that does not decode: {}",
                    frame.reason
                )));
            }
        }
        // A subscription that only declares a queue is closed right after its receipt, and
        // the broker may hand it a message first: deciding a moment later leaves that message
        // alone instead of moving it on (from a dead-letter queue, to one that may not exist).
        if self.rejections.is_empty() {
            self.reject_at = tokio::time::Instant::now() + REJECT_AFTER;
        }
        self.rejections.push(frame);
        None
    }

    /// Rejects a MESSAGE that did not decode: to a consumer's subscription (one that reads its
    /// deliveries and declares a dead-letter route) a NACK with `requeue:false`, logged and
    /// counted; to any other it is left unacknowledged, and goes back to its queue when the
    /// connection closes, as a message that decodes does.
    fn reject(&mut self, frame: Undecodable) -> Option<TransportError> {
        let route = frame.subscription.as_ref().and_then(|id| {
            lock(&self.shared.subscriptions).get(id).map(|route| {
                // A subscription nobody reads (one that only declares a queue) leaves it
                // unacknowledged, as it does a message that decodes: it goes back to its queue.
                let consumed = route.dead_letters && !route.sender.is_closed();
                (route.queue.clone(), route.ack, consumed)
            })
        });
        let message_id = frame.message_id.as_deref().unwrap_or("");
        let destination = frame.destination.as_deref().unwrap_or("");
        let Some((queue, ack, true)) = route else {
            tracing::warn!(
                subscription = ?frame.subscription,
                message_id,
                destination,
                reason = %frame.reason,
                "a message that cannot be decoded came to a subscription that neither consumes it nor dead-letters; left unacknowledged"
            );
            return None;
        };
        crate::metrics::consumed(&queue, crate::metrics::Outcome::Undecodable);
        let ack_id = frame.ack.clone().or_else(|| frame.message_id.clone());
        match (ack, ack_id) {
            (AckMode::ClientIndividual, Some(id)) => {
                let mut nack: Message<ToServer> = ToServer::Nack {
                    id,
                    transaction: None,
                }
                .into();
                nack.extra_headers
                    .push((b"requeue".to_vec(), b"false".to_vec()));
                if let Err(err) = self.writer.queue(nack) {
                    return Some(err);
                }
                tracing::error!(
                    queue = %queue,
                    message_id,
                    destination,
                    size = frame.size,
                    reason = %frame.reason,
                    "a message that cannot be decoded was rejected to the dead-letter queue without running the callback"
                );
            }
            (AckMode::ClientIndividual, None) => tracing::error!(
                queue = %queue,
                destination,
                reason = %frame.reason,
                "a message that cannot be decoded carries no ack id; it stays unacknowledged until the connection closes"
            ),
            (AckMode::Auto, _) => tracing::error!(
                queue = %queue,
                message_id,
                destination,
                reason = %frame.reason,
                "a message that cannot be decoded was dropped (the subscription acknowledges automatically)"
            ),
        }
        None
    }
}

/// The buffer of a subscription's deliveries: its prefetch count, so that every message the
/// broker may hand over unacknowledged has room and the task never waits for the subscriber.
fn delivery_queue(headers: &[(String, String)]) -> usize {
    headers
        .iter()
        .find(|(name, _)| name == "prefetch-count")
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .filter(|&prefetch| prefetch > 0)
        .map_or(DELIVERY_QUEUE, |prefetch| prefetch.min(MAX_DELIVERY_QUEUE))
}

/// The queue a subscription reads, as the consumer names it: `x-queue-name`, else the
/// destination's last `/` segment.
fn queue_of(subscription: &Subscription) -> String {
    subscription
        .headers
        .iter()
        .find(|(name, _)| name == "x-queue-name")
        .map(|(_, value)| value.clone())
        .unwrap_or_else(|| {
            subscription
                .destination
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the map inside is still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn describe_error(message: Option<String>, body: Option<Vec<u8>>) -> String {
    let body = body
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    match (message, body.is_empty()) {
        (Some(m), true) => m,
        (Some(m), false) => format!("{m}: {body}"),
        (None, false) => body,
        (None, true) => "ERROR".into(),
    }
}

fn parse_heartbeat(value: Option<&str>) -> (u32, u32) {
    let Some((a, b)) = value.and_then(|v| v.split_once(',')) else {
        return (0, 0);
    };
    (a.trim().parse().unwrap_or(0), b.trim().parse().unwrap_or(0))
}

fn negotiated(ours: u32, theirs: u32) -> Option<Duration> {
    (ours != 0 && theirs != 0).then(|| Duration::from_millis(u64::from(ours.max(theirs))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_negotiated_as_stomp_says() {
        assert_eq!(negotiated(10_000, 5_000), Some(Duration::from_secs(10)));
        assert_eq!(negotiated(0, 5_000), None);
        assert_eq!(negotiated(1_000, 0), None);
        assert_eq!(parse_heartbeat(Some("0,10000")), (0, 10_000));
        assert_eq!(parse_heartbeat(None), (0, 0));
    }
}
