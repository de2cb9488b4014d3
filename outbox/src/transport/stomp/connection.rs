//! One open STOMP connection, as its callers see it: the login with failover across the
//! configured addresses, then SENDs with receipts, SUBSCRIBEs and other requests queued to the
//! task that owns the socket ([`super::driver`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_stomp::{AckMode as StompAck, FromServer, Message, ToServer};
use futures::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;

use super::driver::{Backlog, Driver};
use super::framing::{FrameDecoder, Inbound};
use super::lock;
use super::pacing::Ending;
use super::settings::StompSettings;
use super::socket::{Stream, Watched, Writer};
use super::tls::ClientTls;
use crate::transport::{
    AckMode, Deliveries, Outcome, Outgoing, SendReport, Subscription, SubscriptionEvent,
    TransportError,
};

/// Frames a caller may queue before the writer catches up: plenty for a pipelined batch.
const WRITE_QUEUE: usize = 4096;
/// Deliveries buffered per subscription without a `prefetch-count` (RabbitMQ: no limit).
const DELIVERY_QUEUE: usize = 1024;
/// The most deliveries buffered per subscription, whatever its `prefetch-count`; more wait in
/// the task's backlog.
const MAX_DELIVERY_QUEUE: usize = 10_000;

type Waiter = oneshot::Sender<Result<(), TransportError>>;

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
    outbound: mpsc::Sender<Message<ToServer>>,
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
    /// Connects to the first address that answers (with TLS when `tls` is given), and logs in.
    pub(super) async fn open(
        settings: &StompSettings,
        tls: Option<&ClientTls>,
        generation: u64,
    ) -> Result<Self, TransportError> {
        let mut last_error = None;
        for (host, port) in &settings.addresses {
            match Self::open_one(settings, tls, host, *port, generation).await {
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
        settings: &StompSettings,
        tls: Option<&ClientTls>,
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
            outbound,
            shared,
            next_receipt: AtomicU64::new(1),
            task,
        })
    }

    pub(super) fn is_open(&self) -> bool {
        !self.task.is_finished() && self.ended().is_none()
    }

    pub(super) fn close(&self) {
        self.task.abort();
    }

    /// How the connection ended, once it has.
    pub(super) fn ending(&self) -> Option<Ending> {
        *lock(&self.shared.ending)
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

    /// The error of a receipt that did not come in time, noting that the broker left one
    /// unanswered on this connection.
    fn unanswered(&self, timeout: Duration) -> TransportError {
        self.shared.unanswered.store(true, Ordering::Relaxed);
        TransportError::ReceiptTimeout(timeout)
    }

    /// Queues a frame for writing.
    pub(super) fn write(&self, frame: Message<ToServer>) -> Result<(), TransportError> {
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
    pub(super) async fn request(
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

    pub(super) async fn send(&self, messages: &[Outgoing], timeout: Duration) -> SendReport {
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
