//! The task that owns a STOMP connection's socket: it writes the frames callers queue, reads
//! the broker's, and keeps the connection alive or declares it dead.
//!
//! It writes many frames at a time, so a batch of SENDs leaves in few packets; routes RECEIPTs
//! to the callers waiting on them and MESSAGEs to their subscriptions; sends heartbeats; and
//! ends the connection when the broker goes quiet for longer than its heartbeats allow. When the
//! connection dies, every caller still waiting learns why.
//!
//! Nothing the task waits for holds up the rest: a write the broker does not read (RabbitMQ stops
//! reading publishing connections during a memory or disk alarm) goes on beside the reading and
//! the heartbeats, and ends the connection when no byte has left for the receipt timeout;
//! deliveries beyond a subscription's buffer wait in the task's backlog, not in the socket. A
//! frame that does not decode, or exceeds the maximum frame size, is rejected to its dead-letter
//! queue and the connection goes on ([`super::framing`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_stomp::{FromServer, Message, ToServer};
use futures::StreamExt;
use tokio::io::ReadHalf;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use super::connection::Shared;
use super::framing::{FrameDecoder, Inbound, Undecodable};
use super::lock;
use super::pacing::Ending;
use super::socket::{Watched, Writer};
use crate::transport::{AckMode, Delivery, SubscriptionEvent, TransportError, UndecodableMessage};

/// Encoded bytes waiting for the socket past which the task stops taking queued frames: callers
/// then wait on the queue (with a deadline) instead of the task's memory growing.
const WRITE_HIGH_WATER: usize = 4 * 1024 * 1024;
/// How long a message that did not decode waits before it is rejected (see `Driver::set_aside`).
const REJECT_AFTER: Duration = Duration::from_millis(100);

/// Deliveries that found their subscription's buffer full, in arrival order: the task keeps
/// reading (heartbeats, receipts) and hands these over as room appears.
#[derive(Default)]
pub(super) struct Backlog {
    waiting: VecDeque<(mpsc::Sender<SubscriptionEvent>, SubscriptionEvent)>,
    /// Warned about on this connection already.
    warned: bool,
}

impl Backlog {
    /// Hands the event over now if its buffer has room and nothing waits before it.
    fn deliver(&mut self, sender: mpsc::Sender<SubscriptionEvent>, event: SubscriptionEvent) {
        if self.waiting.is_empty() {
            match sender.try_send(event) {
                Ok(()) => {}
                // The subscriber went away: the broker redelivers what it did not settle.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    if !self.warned {
                        self.warned = true;
                        tracing::warn!(
                            subscription = %event.subscription(),
                            "the broker delivers more than the subscription's buffer holds (no or a huge prefetch-count); the rest wait in memory"
                        );
                    }
                    self.waiting.push_back((sender, event));
                }
            }
        } else {
            self.waiting.push_back((sender, event));
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
        if let Some((_, event)) = self.waiting.pop_front()
            && let Ok(permit) = permit
        {
            permit.send(event);
        }
    }
}

/// The task that owns the socket.
pub(super) struct Driver {
    pub(super) reader: FramedRead<ReadHalf<Watched>, FrameDecoder>,
    pub(super) writer: Writer,
    pub(super) outbound: mpsc::Receiver<Message<ToServer>>,
    pub(super) shared: Arc<Shared>,
    pub(super) last_read: Arc<AtomicU64>,
    pub(super) epoch: Instant,
    pub(super) send_every: Option<Duration>,
    pub(super) expect_every: Option<Duration>,
    /// How long bytes may wait for the broker to read them before the connection is given up.
    pub(super) write_deadline: Duration,
    /// Stamped on every delivery ([`Delivery::connection`]).
    pub(super) generation: u64,
    pub(super) backlog: Backlog,
    /// Messages that did not decode, to reject at `reject_at`.
    pub(super) rejections: Vec<Undecodable>,
    pub(super) reject_at: tokio::time::Instant,
    /// The socket was closed or reset from the other side (as opposed to heartbeats missed, a
    /// write that made no progress, or an ERROR).
    pub(super) peer_closed: bool,
}

impl Driver {
    pub(super) async fn run(mut self) {
        let reason = self.drive().await;
        if self.shared.closing.load(Ordering::Relaxed) {
            tracing::debug!(reason = %reason, "broker connection closed after DISCONNECT");
        } else {
            tracing::warn!(error = %reason, "broker connection ended");
        }
        let closing = self.shared.closing.load(Ordering::Relaxed);
        let outstanding = lock(&self.shared.receipts).len();
        *lock(&self.shared.ending) = Some(Ending {
            lived: self.epoch.elapsed(),
            at: Instant::now(),
            outstanding,
            // No ERROR: the broker closed the socket. RabbitMQ 3.10's STOMP plugin ends a
            // connection so when a publish is rejected (reject-publish).
            silently: !closing && self.peer_closed,
        });
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
                        Some(Err(e)) => {
                            self.peer_closed = true;
                            Some(TransportError::ConnectionLost(e.to_string()))
                        }
                        None => {
                            self.peer_closed = true;
                            Some(TransportError::ConnectionLost("the broker closed the connection".into()))
                        }
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
                    self.backlog
                        .deliver(sender, SubscriptionEvent::Delivery(delivery));
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
    /// reported to the subscriber ([`SubscriptionEvent::Undecodable`]); to any other it is left unacknowledged, and goes back to its queue when the
    /// connection closes, as a message that decodes does.
    fn reject(&mut self, frame: Undecodable) -> Option<TransportError> {
        let route = frame.subscription.as_ref().and_then(|id| {
            lock(&self.shared.subscriptions).get(id).map(|route| {
                // A subscription nobody reads (one that only declares a queue) leaves it
                // unacknowledged, as it does a message that decodes: it goes back to its queue.
                let consumed = route.dead_letters && !route.sender.is_closed();
                (
                    route.queue.clone(),
                    route.ack,
                    consumed,
                    route.sender.clone(),
                )
            })
        });
        let message_id = frame.message_id.as_deref().unwrap_or("");
        let destination = frame.destination.as_deref().unwrap_or("");
        let Some((queue, ack, true, sender)) = route else {
            tracing::warn!(
                subscription = ?frame.subscription,
                message_id,
                destination,
                reason = %frame.reason,
                "a message that cannot be decoded came to a subscription that neither consumes it nor dead-letters; left unacknowledged"
            );
            return None;
        };
        // The consumer records it: the transport knows no metrics.
        let report = UndecodableMessage {
            subscription: frame.subscription.clone().unwrap_or_default(),
            queue: queue.clone(),
            message_id: frame.message_id.clone(),
            reason: frame.reason.clone(),
        };
        self.backlog
            .deliver(sender, SubscriptionEvent::Undecodable(report));
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
