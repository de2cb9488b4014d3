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

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_stomp::client::{ClientCodec, Heartbeat};
use async_stomp::{AckMode as StompAck, FromServer, Message, ToServer};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;

use super::{
    AckMode, Delivery, Outcome, Outgoing, SendReport, Subscription, Transport, TransportError,
};
use crate::OutboxConfig;

mod tls;

/// Frames a caller may queue before the writer catches up: plenty for a pipelined batch.
const WRITE_QUEUE: usize = 4096;
/// Deliveries buffered per subscription (the prefetch count bounds them in practice).
const DELIVERY_QUEUE: usize = 1024;

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
    passcode: crate::Secret,
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
        let result = connection
            .request(
                ToServer::Disconnect { receipt: None }.into(),
                self.settings.receipt_timeout,
            )
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
    subscriptions: Mutex<HashMap<String, mpsc::Sender<Delivery>>>,
    /// Why the connection ended; set once.
    ended: Mutex<Option<TransportError>>,
    /// A DISCONNECT was sent: the end of the connection is expected, not a failure.
    closing: std::sync::atomic::AtomicBool,
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
        let mut framed = Framed::new(
            watched,
            ClientCodec::with_max_frame_size(settings.max_frame_size),
        );

        let (out_ms, in_ms) = (
            settings.heartbeats.0.as_millis() as u32,
            settings.heartbeats.1.as_millis() as u32,
        );
        SinkExt::<Message<ToServer>>::send(
            &mut framed,
            ToServer::Connect {
                accept_version: "1.2".into(),
                host: settings.vhost.clone(),
                login: Some(settings.login.clone()),
                passcode: Some(settings.passcode.expose().to_owned()),
                heartbeat: Some((out_ms, in_ms)),
            }
            .into(),
        )
        .await
        .map_err(|e| connect_failed(e.to_string()))?;
        let reply = tokio::time::timeout(timeout, framed.next())
            .await
            .map_err(|_| connect_failed(format!("no CONNECTED within {timeout:?}")))?;
        let server_heartbeat = match reply {
            Some(Ok(Message {
                content: FromServer::Connected { heartbeat, .. },
                ..
            })) => heartbeat,
            Some(Ok(Message {
                content: FromServer::Error { message, body },
                ..
            })) => {
                return Err(TransportError::Refused {
                    address,
                    message: describe_error(message, body),
                });
            }
            Some(Ok(other)) => {
                return Err(connect_failed(format!(
                    "unexpected answer to CONNECT: {:?}",
                    other.content
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
            framed,
            outbound: rx,
            shared: shared.clone(),
            last_read,
            epoch,
            send_every,
            expect_every,
            generation,
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

    fn subscriptions(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Delivery>>> {
        lock(&self.shared.subscriptions)
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
        let receipt = self.with_receipt(&mut frame);
        self.outbound.send(frame).await.map_err(|_| self.lost())?;
        match tokio::time::timeout(timeout, receipt).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.lost()),
            Err(_) => Err(TransportError::ReceiptTimeout(timeout)),
        }
    }

    async fn send(&self, messages: &[Outgoing], timeout: Duration) -> SendReport {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut waiters = Vec::with_capacity(messages.len());
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
            if self.outbound.send(frame).await.is_err() {
                break;
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
                    Outcome::unknown(TransportError::ReceiptTimeout(timeout))
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
        // Messages never queued: the connection had ended.
        while outcomes.len() < messages.len() {
            outcomes.push(Outcome::unknown(self.lost()));
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
        let (tx, rx) = mpsc::channel(DELIVERY_QUEUE);
        self.subscriptions().insert(subscription.id.clone(), tx);
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

/// The task that owns the socket.
struct Driver {
    framed: Framed<Watched, ClientCodec>,
    outbound: mpsc::Receiver<Message<ToServer>>,
    shared: Arc<Shared>,
    last_read: Arc<AtomicU64>,
    epoch: Instant,
    send_every: Option<Duration>,
    expect_every: Option<Duration>,
    /// Stamped on every delivery ([`Delivery::connection`]).
    generation: u64,
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
        // Checked often enough to notice a silent broker soon after its allowance runs out.
        let tick = [self.send_every, self.expect_every]
            .into_iter()
            .flatten()
            .min()
            .map(|d| (d / 2).max(Duration::from_millis(50)))
            .unwrap_or(Duration::from_secs(3600));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_write = Instant::now();
        loop {
            tokio::select! {
                frame = self.outbound.recv() => {
                    let Some(frame) = frame else {
                        return TransportError::Closed;
                    };
                    if let Err(e) = self.framed.feed(frame).await {
                        return TransportError::ConnectionLost(e.to_string());
                    }
                    // Write everything queued behind it in the same flush.
                    while let Ok(frame) = self.outbound.try_recv() {
                        if let Err(e) = self.framed.feed(frame).await {
                            return TransportError::ConnectionLost(e.to_string());
                        }
                    }
                    if let Err(e) = SinkExt::<Message<ToServer>>::flush(&mut self.framed).await {
                        return TransportError::ConnectionLost(e.to_string());
                    }
                    last_write = Instant::now();
                }
                incoming = self.framed.next() => {
                    match incoming {
                        Some(Ok(message)) => {
                            if let Some(reason) = self.dispatch(message).await {
                                return reason;
                            }
                        }
                        Some(Err(e)) => return TransportError::ConnectionLost(e.to_string()),
                        None => return TransportError::ConnectionLost("the broker closed the connection".into()),
                    }
                }
                _ = ticker.tick() => {
                    if let Some(every) = self.send_every
                        && last_write.elapsed() >= every
                    {
                        if let Err(e) = SinkExt::<Heartbeat>::send(&mut self.framed, Heartbeat).await {
                            return TransportError::ConnectionLost(e.to_string());
                        }
                        last_write = Instant::now();
                    }
                    if let Some(every) = self.expect_every {
                        let last = Duration::from_millis(self.last_read.load(Ordering::Relaxed));
                        let silent = self.epoch.elapsed().saturating_sub(last);
                        // Twice the interval: the spec's allowance for network delay.
                        if silent > every * 2 {
                            return TransportError::ConnectionLost(format!(
                                "no heartbeat from the broker for {silent:?}"
                            ));
                        }
                    }
                }
            }
        }
    }

    /// Handles one frame from the broker; `Some(reason)` ends the connection.
    async fn dispatch(&mut self, message: Message<FromServer>) -> Option<TransportError> {
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
                let sender = lock(&self.shared.subscriptions).get(&subscription).cloned();
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
                    // A full queue waits here: the broker's prefetch keeps this short.
                    let _ = sender.send(delivery).await;
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
