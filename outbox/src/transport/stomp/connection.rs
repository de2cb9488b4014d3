//! One open STOMP connection, as its callers see it: the login with failover across the
//! configured addresses, then SENDs with receipts, SUBSCRIBEs and other requests queued to the
//! task that owns the socket ([`super::driver`]).
//!
//! Each receipt is awaited for the receipt timeout from the moment the frame's last byte was
//! written, not from when it was queued: a large frame on a slow link, and whatever waits behind
//! it, is not given up on while it is still being written (the task gives the connection up if
//! no byte leaves for the receipt timeout). A receipt that does not come in time is forgotten at
//! once, so that a broker that never answers costs no memory; and when nothing at all was
//! answered on the connection for the receipt timeout, the connection is abandoned, and the
//! transport's next connection starts at the next address.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_stomp::{AckMode as StompAck, FromServer, Message, ToServer};
use futures::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;

use super::driver::{Backlog, Driver, Outbound};
use super::framing::{FrameDecoder, Inbound};
use super::lock;
use super::pacing::Ending;
use super::settings::StompSettings;
use super::socket::{Stream, Watched, Writer};
use super::tls::ClientTls;
use crate::transport::connecting::Observed;
use crate::transport::{
    AckMode, ConnectionEvent, Deliveries, Outcome, Outgoing, SendReport, Subscription,
    SubscriptionEvent, TransportError,
};

/// Frames a caller may queue before the writer catches up: plenty for a pipelined batch.
const WRITE_QUEUE: usize = 4096;
/// Deliveries buffered per subscription without a `prefetch-count` (RabbitMQ: no limit).
const DELIVERY_QUEUE: usize = 1024;
/// The most deliveries buffered per subscription, whatever its `prefetch-count`; more wait in
/// the task's backlog.
const MAX_DELIVERY_QUEUE: usize = 10_000;

type Waiter = oneshot::Sender<Result<(), TransportError>>;
/// The caller's end of a [`Waiter`].
type Waiting = oneshot::Receiver<Result<(), TransportError>>;

/// What came of a frame sent with a receipt request.
enum Answer {
    Receipted,
    /// No receipt: the connection ended (or the broker refused a frame) first.
    Failed(TransportError),
    /// The receipt did not come within the timeout after the frame was written.
    TimedOut,
}

/// State shared by callers and the connection's task.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) receipts: Mutex<HashMap<String, Waiter>>,
    pub(super) subscriptions: Mutex<HashMap<String, Route>>,
    /// Why the connection ended; set once.
    pub(super) ended: Mutex<Option<TransportError>>,
    /// A DISCONNECT was sent: the end of the connection is expected, not a failure.
    pub(super) closing: std::sync::atomic::AtomicBool,
    /// A receipt (or room in the write queue) did not come in time on this connection.
    pub(super) unanswered: std::sync::atomic::AtomicBool,
    /// How it ended, for the transport's reconnection pacing; set by the task just before
    /// `ended`.
    pub(super) ending: Mutex<Option<Ending>>,
    /// The highest receipt number the broker answered ([`Connection::overtaken`]).
    pub(super) highest_answered: AtomicU64,
    /// When the broker last answered a receipt.
    pub(super) last_answer: Mutex<Option<Instant>>,
    /// Why a caller gave the connection up, if one did; the task ends it when told through
    /// `abandon`.
    pub(super) abandoned: Mutex<Option<TransportError>>,
    pub(super) abandon: tokio::sync::Notify,
}

/// Where a subscription's deliveries go.
pub(super) struct Route {
    pub(super) sender: mpsc::Sender<SubscriptionEvent>,
    /// The queue it reads (`x-queue-name`, else the destination's last `/` segment): the label
    /// of what it counts.
    pub(super) queue: String,
    pub(super) ack: AckMode,
    /// It declares a dead-letter route (`x-dead-letter-*`), as a consumer's subscription does:
    /// only then is a message that does not decode rejected (a reader of a dead-letter queue
    /// would send it on to a queue that may not exist).
    pub(super) dead_letters: bool,
}

/// One open STOMP connection and the task that drives it.
pub(super) struct Connection {
    /// Which of the transport's connections this is.
    pub(super) generation: u64,
    /// The broker's `host:port`.
    pub(super) address: String,
    /// Its place in the configured addresses.
    pub(super) address_index: usize,
    outbound: mpsc::Sender<Outbound>,
    observed: Arc<Observed>,
    pub(super) shared: Arc<Shared>,
    next_receipt: AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Connection {
    /// Connects to the first address that answers, trying them in order from the one at
    /// `start` (with TLS when `tls` is given), and logs in.
    pub(super) async fn open(
        settings: &StompSettings,
        tls: Option<&ClientTls>,
        generation: u64,
        start: usize,
        observed: Arc<Observed>,
    ) -> Result<Self, TransportError> {
        let mut last_error = None;
        let count = settings.addresses.len();
        for index in (0..count).map(|step| (start + step) % count) {
            let (host, port) = &settings.addresses[index];
            let opened =
                Self::open_one(settings, tls, host, *port, generation, observed.clone()).await;
            match opened.map(|connection| connection.at(index)) {
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

    /// This connection, noted as opened to the address at `index`.
    fn at(mut self, index: usize) -> Self {
        self.address_index = index;
        self
    }

    async fn open_one(
        settings: &StompSettings,
        tls: Option<&ClientTls>,
        host: &str,
        port: u16,
        generation: u64,
        observed: Arc<Observed>,
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
        super::socket::limit_send_buffer(&tcp);
        let stream = match tls {
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
            unwritten: Default::default(),
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
            peer_closed: false,
        };
        let task = tokio::spawn(driver.run());
        tracing::info!(broker = %address, ?send_every, ?expect_every, "connected to the broker");
        Ok(Self {
            generation,
            address,
            address_index: 0,
            outbound,
            observed,
            shared,
            next_receipt: AtomicU64::new(1),
            task,
        })
    }

    pub(super) fn is_open(&self) -> bool {
        !self.task.is_finished() && self.ended().is_none() && !self.abandoned()
    }

    pub(super) fn close(&self) {
        self.task.abort();
    }

    /// How the connection ended, once it has.
    pub(super) fn ending(&self) -> Option<Ending> {
        *lock(&self.shared.ending)
    }

    /// Whether a caller gave the connection up because the broker answered nothing.
    pub(super) fn abandoned(&self) -> bool {
        lock(&self.shared.abandoned).is_some()
    }

    fn ended(&self) -> Option<TransportError> {
        lock(&self.shared.ended).clone()
    }

    fn lost(&self) -> TransportError {
        self.ended()
            .unwrap_or_else(|| TransportError::ConnectionLost("the connection closed".into()))
    }

    pub(super) fn subscriptions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        lock(&self.shared.subscriptions)
    }

    /// Takes note that `count` receipts did not come within `timeout` (reported as an event);
    /// gives the connection up when the broker answered nothing at all for that long: it is
    /// alive (heartbeats) but not confirming, and another address may be.
    fn timed_out(&self, count: usize, timeout: Duration) {
        self.shared.unanswered.store(true, Ordering::Relaxed);
        self.observed.report(ConnectionEvent::ReceiptTimeout {
            address: self.address.clone(),
            messages: count,
        });
        let answered_lately =
            lock(&self.shared.last_answer).is_some_and(|at| at.elapsed() < timeout);
        if answered_lately || self.ended().is_some() {
            return;
        }
        let mut abandoned = lock(&self.shared.abandoned);
        if abandoned.is_some() {
            return;
        }
        *abandoned = Some(TransportError::ReceiptTimeout(timeout));
        drop(abandoned);
        self.observed.abandoned(&self.address, timeout);
        self.shared.abandon.notify_one();
    }

    /// Queues a frame for writing.
    pub(super) fn write(&self, frame: Message<ToServer>) -> Result<(), TransportError> {
        self.outbound
            .try_send(Outbound::unwatched(frame))
            .map_err(|_| self.lost())
    }

    /// Adds a receipt request to `frame` and registers its waiter; returns the receipt's
    /// number and its waiter.
    fn with_receipt(&self, frame: &mut Message<ToServer>) -> (u64, Waiting) {
        let (tx, rx) = oneshot::channel();
        let mut receipts = lock(&self.shared.receipts);
        let number = self.next_receipt.fetch_add(1, Ordering::Relaxed);
        let id = number.to_string();
        receipts.insert(id.clone(), tx);
        drop(receipts);
        frame
            .extra_headers
            .push((b"receipt".to_vec(), id.into_bytes()));
        (number, rx)
    }

    /// Queues `frame`, whose receipt is `number`, telling when its last byte is written; `None`
    /// (and the waiter forgotten) when the connection has ended. The task takes frames as fast
    /// as the broker reads them and ends the connection when no byte leaves for the receipt
    /// timeout, so waiting for room here is bounded by that.
    async fn queue(
        &self,
        frame: Message<ToServer>,
        number: u64,
    ) -> Option<oneshot::Receiver<tokio::time::Instant>> {
        let (tx, written) = oneshot::channel();
        let outbound = Outbound {
            frame,
            written: Some(tx),
        };
        if self.outbound.send(outbound).await.is_err() {
            self.forget(number);
            return None;
        }
        Some(written)
    }

    /// Removes the waiter of receipt `number`: a receipt that comes later finds nobody.
    fn forget(&self, number: u64) {
        lock(&self.shared.receipts).remove(&number.to_string());
    }

    /// Waits for the frame to be written whole, then for its receipt, for `timeout` from then.
    async fn answer(
        &self,
        number: u64,
        written: oneshot::Receiver<tokio::time::Instant>,
        mut receipt: Waiting,
        timeout: Duration,
    ) -> Answer {
        let Ok(written_at) = written.await else {
            // The connection ended before the frame left (its task told every waiter why,
            // unless it was aborted).
            self.forget(number);
            return match receipt.try_recv() {
                Ok(Ok(())) => Answer::Receipted,
                Ok(Err(err)) => Answer::Failed(err),
                Err(_) => Answer::Failed(self.lost()),
            };
        };
        match tokio::time::timeout_at(written_at + timeout, &mut receipt).await {
            Ok(Ok(Ok(()))) => Answer::Receipted,
            Ok(Ok(Err(err))) => Answer::Failed(err),
            Ok(Err(_)) => Answer::Failed(self.lost()),
            Err(_) => {
                self.forget(number);
                // Answered between the deadline and the removal: it counts.
                match receipt.try_recv() {
                    Ok(Ok(())) => Answer::Receipted,
                    Ok(Err(err)) => Answer::Failed(err),
                    Err(_) => Answer::TimedOut,
                }
            }
        }
    }

    /// Sends one frame with a receipt request and waits for the receipt, for `timeout` from
    /// the moment the frame was written.
    pub(super) async fn request(
        &self,
        mut frame: Message<ToServer>,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        let (number, receipt) = self.with_receipt(&mut frame);
        let Some(written) = self.queue(frame, number).await else {
            return Err(self.lost());
        };
        match self.answer(number, written, receipt, timeout).await {
            Answer::Receipted => Ok(()),
            Answer::Failed(err) => Err(err),
            Answer::TimedOut => {
                self.timed_out(1, timeout);
                Err(TransportError::ReceiptTimeout(timeout))
            }
        }
    }

    pub(super) async fn send(&self, messages: &[Outgoing], timeout: Duration) -> SendReport {
        let mut waiting = Vec::with_capacity(messages.len());
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
            let (number, receipt) = self.with_receipt(&mut frame);
            let Some(written) = self.queue(frame, number).await else {
                break;
            };
            waiting.push((number, written, receipt));
        }
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut timed_out = Vec::new();
        for (number, written, receipt) in waiting {
            let outcome = match self.answer(number, written, receipt, timeout).await {
                Answer::Receipted => Outcome::Receipted,
                Answer::Failed(err) => Outcome::unknown(err),
                Answer::TimedOut => {
                    timed_out.push((outcomes.len(), number));
                    Outcome::unknown(TransportError::ReceiptTimeout(timeout))
                }
            };
            outcomes.push(outcome);
        }
        // Overtaken is judged before the connection may be given up below.
        for (index, number) in &timed_out {
            if self.overtaken(*number)
                && let Outcome::Unknown(unknown) = &mut outcomes[*index]
            {
                unknown.overtaken = true;
            }
        }
        if !timed_out.is_empty() {
            self.timed_out(timed_out.len(), timeout);
        }
        // Messages never queued: the connection had ended.
        while outcomes.len() < messages.len() {
            outcomes.push(Outcome::unknown(self.lost()));
        }
        SendReport { outcomes }
    }

    /// Whether a frame numbered after receipt `number` was receipted on this still-open
    /// connection while `number` was not (RabbitMQ handles a connection's frames in order).
    fn overtaken(&self, number: u64) -> bool {
        self.shared.highest_answered.load(Ordering::Relaxed) > number && self.ended().is_none()
    }

    pub(super) async fn subscribe(
        &self,
        subscription: Subscription,
        timeout: Duration,
    ) -> Result<Deliveries, TransportError> {
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
        Ok(Deliveries::new(rx))
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
