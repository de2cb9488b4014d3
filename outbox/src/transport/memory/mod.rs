//! The in-memory transport: [`MemoryTransport`], a handle on an in-process broker that behaves
//! like RabbitMQ's STOMP plugin, for tests (ours and our users') and for running the relay
//! without a broker. The broker itself is in [`broker`]; the faults a test can inject, in
//! [`faults`].
//!
//! What it reproduces, because code written against it must also work against RabbitMQ:
//! - `/topic/<key>` publishes to `amq.topic`: every queue bound to a matching key gets a copy
//!   (binding keys may use `*` and `#`); with no queue bound the message is receipted and dropped.
//!   A SUBSCRIBE to `/topic/<key>` binds the queue named by `x-queue-name` (durable when the
//!   `durable` header says so, else deleted with its last consumer), or a temporary queue of its
//!   own.
//! - `/queue/<q>` and a bare `<q>` declare `<q>` (durable), on SEND as on SUBSCRIBE; `/amq/queue/<q>`
//!   needs `<q>` to exist (a SEND to a missing one is receipted and dropped, a SUBSCRIBE is refused).
//! - A queue keeps the arguments of its first declaration; a declaration with other `x-*`
//!   arguments, durability or auto-delete is refused with `PRECONDITION_FAILED`.
//! - Errors that RabbitMQ answers with a channel error (`NOT_FOUND`, `PRECONDITION_FAILED`, a
//!   duplicated subscription id) close the connection: its subscriptions end, its unacked
//!   deliveries go back to their queues, and the rest of a `send` batch is not receipted. The
//!   [`TransportError::Broker`] carries what RabbitMQ's ERROR frame carries: `message` is the short
//!   code (`not_found`), `detail` the full text (`NOT_FOUND - no exchange ...`).
//! - Unacked deliveries stay with the connection, not the subscription: after UNSUBSCRIBE they can
//!   no longer be acked (a non-fatal "Subscription not found" error) and return to their queue,
//!   marked `redelivered:true`, only when the connection closes, as RabbitMQ does.
//! - NACK dead-letters through the queue's `x-dead-letter-exchange` (`""` or `amq.topic`) with its
//!   `x-dead-letter-routing-key` (default: the message's routing key), adding the
//!   `x-first-death-*` headers RabbitMQ adds; a queue without `x-dead-letter-exchange` drops it.
//!
//! - A connection is shared by every `send` in flight on it, as the relay's batches share one
//!   STOMP connection: a refused SEND closes the connection and fails the receipt of every
//!   message pending on it, in every batch, while the messages before it stay routed
//!   ([`Outcome::Unknown`] with the broker's error: RabbitMQ's ERROR names no receipt).
//!   Receipts can be made to arrive late ([`MemoryTransport::set_receipt_delay`]), a
//!   destination can be silently discarded (never receipted, the connection stays up:
//!   [`MemoryTransport::discard`]), and the broker can block publishers as under a memory alarm
//!   (frames wait unread until it unblocks: [`MemoryTransport::set_blocked`]). A receipt not
//!   come within the receipt timeout ([`MemoryTransport::set_receipt_timeout`]) is a
//!   [`TransportError::ReceiptTimeout`], `overtaken` when a later message on the connection was
//!   receipted.
//!
//! - A queue can be limited as `x-max-length` with `x-overflow: reject-publish` limits it
//!   ([`MemoryTransport::limit_queue`]): a publish it has no room for is rejected, which
//!   RabbitMQ 3.10's STOMP plugin answers by closing the connection with no ERROR and no receipt
//!   for anything pending ([`Outcome::Unknown`], [`TransportError::ConnectionLost`]).
//!
//! With [`MemoryTransport::set_mandatory`] it answers as RabbitMQ answers the AMQP transport's
//! `mandatory` publishes with confirms: a message that reaches no queue is
//! [`Outcome::Unroutable`] instead of receipted and dropped, and a rejected one is
//! [`Outcome::Nacked`], that message alone, the connection staying up.
//!
//! Clones share the broker and the connection; [`MemoryTransport::new_connection`] opens another
//! client connection to the same broker, as a second process would.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{
    Deliveries, Delivery, Outcome, Outgoing, SendReport, Subscription, SubscriptionEvent,
    Transport, TransportError, Unknown,
};
use broker::{Answer, Broker, lost};

mod broker;
mod faults;
mod queues;
#[cfg(test)]
mod tests;

/// The receipt timeout of a new [`MemoryTransport`], as `OUTBOX_RECEIPT_TIMEOUT`'s default.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Deliveries a subscription's receiver buffers before its forwarding task waits.
const RECEIVER_CAPACITY: usize = 64;
/// An in-process broker with RabbitMQ's STOMP semantics (see the module docs).
///
/// ```
/// # async fn demo() {
/// use outbox::transport::{AckMode, MemoryTransport, Outgoing, Subscription, Transport};
///
/// let broker = MemoryTransport::new();
/// let mut deliveries = broker
///     .subscribe(Subscription {
///         destination: "/topic/orders.v1".into(),
///         id: "orders".into(),
///         ack: AckMode::ClientIndividual,
///         headers: vec![("x-queue-name".into(), "orders_q".into())],
///     })
///     .await
///     .unwrap();
/// let report = broker
///     .send(&[Outgoing {
///         destination: "/topic/orders.v1".into(),
///         headers: vec![],
///         body: b"{}".to_vec(),
///     }])
///     .await;
/// assert!(report.all_receipted());
/// let delivery = deliveries.recv().await.unwrap();
/// broker.ack(&delivery).await.unwrap();
/// # }
/// ```
#[derive(Clone, Default)]
pub struct MemoryTransport {
    broker: Arc<Mutex<Broker>>,
    /// This handle's client connection (clones share it).
    connection: u64,
}

impl fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("connection", &self.connection)
            .finish_non_exhaustive()
    }
}

impl MemoryTransport {
    /// A new, empty broker, and a handle on its first connection.
    pub fn new() -> MemoryTransport {
        MemoryTransport::default()
    }

    /// Another client connection to the same broker: its own subscriptions, acks and
    /// disconnect, as a second process connecting to RabbitMQ would have.
    pub fn new_connection(&self) -> MemoryTransport {
        let mut broker = self.broker();
        broker.last_connection += 1;
        MemoryTransport {
            broker: self.broker.clone(),
            connection: broker.last_connection,
        }
    }

    /// Every message the broker receipted, in order (topic messages that reached no queue too).
    pub fn sent(&self) -> Vec<Outgoing> {
        self.broker().sent.clone()
    }

    /// Forgets what [`MemoryTransport::sent`] returns so far.
    pub fn clear_sent(&self) {
        self.broker().sent.clear();
    }

    /// How many times [`Transport::send`] was called, failed calls included.
    pub fn send_count(&self) -> usize {
        self.broker().send_calls
    }

    /// How many connections were opened (by any handle), reconnections included.
    pub fn connect_count(&self) -> usize {
        self.broker().connects
    }

    /// Whether this handle's connection is open.
    pub fn is_connected(&self) -> bool {
        self.broker().connections.contains_key(&self.connection)
    }

    /// Whether the queue exists.
    pub fn queue_exists(&self, queue: &str) -> bool {
        self.broker().queues.contains_key(queue)
    }

    /// Messages waiting in the queue, not counting those delivered and not yet acked (RabbitMQ's
    /// `messages_ready`); 0 for a queue that does not exist.
    pub fn queue_len(&self, queue: &str) -> usize {
        self.broker().queues.get(queue).map_or(0, |q| q.ready.len())
    }

    /// Messages of the queue delivered and awaiting an ack or nack (`messages_unacknowledged`).
    pub fn unacked_len(&self, queue: &str) -> usize {
        let broker = self.broker();
        broker
            .connections
            .values()
            .flat_map(|c| &c.unacked)
            .filter(|u| u.queue == queue)
            .count()
    }

    /// The messages waiting in the queue, oldest first, as a consumer would get them less the
    /// per-delivery headers (`subscription`, `message-id`, `redelivered`, `ack`,
    /// `content-length`): `destination` is the one a consumer sees (`/topic/<key>`, or
    /// `/queue/<q>` for a message sent to a queue or dead-lettered), `headers` include those the
    /// broker added when dead-lettering (`x-first-death-*`).
    pub fn queue_messages(&self, queue: &str) -> Vec<Outgoing> {
        let broker = self.broker();
        let Some(queue) = broker.queues.get(queue) else {
            return Vec::new();
        };
        queue
            .ready
            .iter()
            .map(|m| Outgoing {
                destination: m.destination(),
                headers: m.headers.clone(),
                body: m.body.clone(),
            })
            .collect()
    }

    fn broker(&self) -> MutexGuard<'_, Broker> {
        // A test that panicked while holding the lock leaves consistent enough state to inspect.
        self.broker.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl Transport for MemoryTransport {
    async fn connect(&self) -> Result<(), TransportError> {
        self.broker().open_connection(self.connection)
    }

    async fn send(&self, messages: &[Outgoing]) -> SendReport {
        let (generation, timeout, waiters, closed_by) = {
            let mut broker = self.broker();
            broker.send_calls += 1;
            if let Err(error) = broker.open_connection(self.connection) {
                return SendReport::unsent(messages.len(), error);
            }
            let generation = broker.connections[&self.connection].generation;
            let timeout = broker.receipt_timeout.unwrap_or(RECEIPT_TIMEOUT);
            let mut waiters = Vec::with_capacity(messages.len());
            let mut closed_by = None;
            for message in messages {
                // A refusal earlier in the batch closed the connection: the rest is not written.
                let Some(open) = broker.connections.get_mut(&self.connection) else {
                    break;
                };
                if open.generation != generation {
                    break;
                }
                open.last_frame += 1;
                let number = open.last_frame;
                let (tx, rx) = oneshot::channel();
                open.pending.insert(number, tx);
                waiters.push((number, rx));
                if broker.blocked {
                    // Unread: frames behind it wait as well, in order.
                    if let Some(open) = broker.connections.get_mut(&self.connection) {
                        open.unread.push_back((number, message.clone()));
                    }
                } else if let Some(error) =
                    broker.read(&self.broker, self.connection, number, message)
                {
                    closed_by = Some(error);
                    break;
                }
            }
            (generation, timeout, waiters, closed_by)
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut outcomes = Vec::with_capacity(messages.len());
        for (number, mut waiter) in waiters {
            let outcome = match tokio::time::timeout_at(deadline, &mut waiter).await {
                Ok(Ok(Ok(Answer::Receipted))) => Outcome::Receipted,
                Ok(Ok(Ok(Answer::Returned))) => Outcome::Unroutable("312 NO_ROUTE".to_owned()),
                Ok(Ok(Ok(Answer::Nacked))) => Outcome::Nacked,
                Ok(Ok(Err(error))) => Outcome::unknown(error),
                Ok(Err(_)) => Outcome::unknown(lost()),
                Err(_) => {
                    let broker = self.broker();
                    let overtaken = broker
                        .connections
                        .get(&self.connection)
                        .is_some_and(|c| c.generation == generation && c.last_receipted > number);
                    Outcome::Unknown(Unknown {
                        reason: TransportError::ReceiptTimeout(timeout),
                        overtaken,
                    })
                }
            };
            outcomes.push(outcome);
        }
        // Written after the refused one, on a connection RabbitMQ then closed: failed with it.
        let rest = closed_by.unwrap_or_else(lost);
        while outcomes.len() < messages.len() {
            outcomes.push(Outcome::unknown(rest.clone()));
        }
        SendReport { outcomes }
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Deliveries, TransportError> {
        let mut broker = self.broker();
        broker.open_connection(self.connection)?;
        let (outbox, receiver) = mpsc::channel(RECEIVER_CAPACITY);
        let (inbox, forwarded) = mpsc::unbounded_channel();
        let (closed, on_close) = oneshot::channel();
        match broker.add_consumer(self.connection, &subscription, inbox, closed) {
            Ok(queue) => {
                tokio::spawn(forward(forwarded, outbox, on_close));
                broker.dispatch(&queue);
                Ok(Deliveries::new(receiver))
            }
            Err(error) => {
                broker.close_connection(self.connection);
                Err(error)
            }
        }
    }

    async fn unsubscribe(&self, id: &str) -> Result<(), TransportError> {
        let mut broker = self.broker();
        broker.usable(self.connection)?;
        let consumer = broker
            .connections
            .get_mut(&self.connection)
            .and_then(|c| c.subscriptions.remove(id));
        match consumer {
            Some(consumer) => {
                broker.remove_consumer(self.connection, id, &consumer.queue);
                Ok(())
            }
            None => Err(TransportError::Broker {
                message: "No subscription found".to_owned(),
                detail: format!(
                    "UNSUBSCRIBE must refer to an existing subscription.\n\
                     Subscription to \"id='{id}'\" not found."
                ),
            }),
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), TransportError> {
        let mut broker = self.broker();
        broker.usable_for(self.connection, delivery)?;
        let settled = broker.settle(self.connection, &delivery.ack_id)?;
        broker.dispatch(&settled.queue);
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery) -> Result<(), TransportError> {
        let mut broker = self.broker();
        broker.usable_for(self.connection, delivery)?;
        let settled = broker.settle(self.connection, &delivery.ack_id)?;
        broker.dispatch(&settled.queue);
        broker.dead_letter(&settled.queue, settled.message);
        Ok(())
    }

    async fn disconnect(&self) -> Result<(), TransportError> {
        self.broker().close_connection(self.connection);
        Ok(())
    }
}

/// Moves a subscription's deliveries to its receiver, in order, as the socket between RabbitMQ
/// and a client would; stops as soon as the subscription or its connection ends.
async fn forward(
    mut inbox: mpsc::UnboundedReceiver<SubscriptionEvent>,
    outbox: mpsc::Sender<SubscriptionEvent>,
    mut closed: oneshot::Receiver<()>,
) {
    loop {
        let delivery = tokio::select! {
            biased;
            _ = &mut closed => return,
            delivery = inbox.recv() => match delivery {
                Some(delivery) => delivery,
                None => return,
            },
        };
        tokio::select! {
            biased;
            _ = &mut closed => return,
            sent = outbox.send(delivery) => if sent.is_err() { return },
        }
    }
}
