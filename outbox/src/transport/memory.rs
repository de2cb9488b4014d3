//! An in-process broker that behaves like RabbitMQ's STOMP plugin, for tests (ours and our
//! users') and for running the relay without a broker.
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
//! With [`MemoryTransport::set_mandatory`] it answers as RabbitMQ answers the AMQP transport's
//! `mandatory` publishes: a message that reaches no queue is [`Outcome::Unroutable`] instead of
//! receipted and dropped.
//!
//! Clones share the broker and the connection; [`MemoryTransport::new_connection`] opens another
//! client connection to the same broker, as a second process would.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{
    AckMode, Delivery, Outcome, Outgoing, SendReport, Subscription, Transport, TransportError,
    Unknown,
};

/// The receipt timeout of a new [`MemoryTransport`], as [`crate::config::OutboxConfig`]'s default.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`TransportError::Connect`] names as the address.
const ADDRESS: &str = "memory";

/// Deliveries a subscription's receiver buffers before its forwarding task waits.
const RECEIVER_CAPACITY: usize = 64;

/// The SUBSCRIBE headers RabbitMQ's STOMP plugin turns into queue arguments (and the broker
/// compares on redeclaration); it drops any other `x-*` header (`x-overflow`, `x-queue-mode`,
/// `x-single-active-consumer`, ...). Those of RabbitMQ 3.10, and the stream arguments of later
/// versions.
const QUEUE_ARGUMENTS: &[&str] = &[
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-message-ttl",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-queue-type",
];

/// Headers the broker sets on a MESSAGE itself; a SEND's own values for them are not passed on.
const BROKER_HEADERS: &[&str] = &[
    "destination",
    "content-length",
    "receipt",
    "subscription",
    "message-id",
    "redelivered",
    "ack",
];

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

#[derive(Default)]
struct Broker {
    queues: BTreeMap<String, Queue>,
    /// `amq.topic` bindings: (binding key, queue).
    bindings: Vec<(String, String)>,
    /// Open client connections.
    connections: HashMap<u64, Connection>,
    /// Handed out by `new_connection` (0 belongs to the first handle).
    last_connection: u64,
    /// Numbers deliveries (and temporary queues) across the broker.
    last_tag: u64,
    down: bool,
    refused: Vec<String>,
    /// Destination prefixes whose SENDs are dropped without a receipt or an error.
    discarded: Vec<String>,
    /// Publishers are blocked: frames wait on their connection, unread.
    blocked: bool,
    /// Publishes are `mandatory` (AMQP): a message no queue takes is returned, not receipted.
    mandatory: bool,
    /// How long after routing a message its receipt comes.
    receipt_delay: Duration,
    /// How long `send` waits for receipts; `None`: [`RECEIPT_TIMEOUT`].
    receipt_timeout: Option<Duration>,
    sent: Vec<Outgoing>,
    send_calls: usize,
    connects: usize,
}

#[derive(Default)]
struct Connection {
    /// Which connection of the broker this is, counting every open ([`Delivery::connection`]):
    /// a handle that reconnects gets a new one.
    generation: u64,
    subscriptions: HashMap<String, Consumer>,
    /// Client-acknowledged deliveries not yet acked or nacked, oldest first, including those of
    /// subscriptions closed since.
    unacked: Vec<Unacked>,
    /// Numbers the SENDs of this connection, in the order they were written.
    last_frame: u64,
    /// SENDs awaiting their receipt, by number.
    pending: BTreeMap<u64, Waiter>,
    /// SENDs written while the broker blocked publishers, not yet read.
    unread: VecDeque<(u64, Outgoing)>,
    /// The highest number receipted.
    last_receipted: u64,
}

/// Answers a SEND: routed to a queue (`true`) or not (`false`, returned when mandatory), or why
/// not receipted.
type Waiter = oneshot::Sender<Result<bool, TransportError>>;

struct Consumer {
    queue: String,
    ack: AckMode,
    prefetch: Option<usize>,
    /// Unacked deliveries of this subscription.
    in_flight: usize,
    inbox: mpsc::UnboundedSender<Delivery>,
    /// Dropped with the consumer: stops its forwarding task at once.
    _closed: oneshot::Sender<()>,
}

impl Consumer {
    fn has_room(&self) -> bool {
        match (self.ack, self.prefetch) {
            (AckMode::ClientIndividual, Some(prefetch)) => self.in_flight < prefetch,
            _ => true,
        }
    }
}

struct Unacked {
    ack_id: String,
    subscription: String,
    queue: String,
    message: Message,
}

struct Queue {
    durable: bool,
    auto_delete: bool,
    /// The `x-*` arguments of its first declaration, sorted by name.
    arguments: Vec<(String, String)>,
    ready: VecDeque<Message>,
    /// (connection, subscription id), in subscription order: deliveries go round-robin.
    consumers: Vec<(u64, String)>,
    next_consumer: usize,
}

/// A message as stored in a queue: where it was published (which gives the `destination` a
/// consumer sees) and what it carries.
#[derive(Clone)]
struct Message {
    exchange: String,
    routing_key: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    redelivered: bool,
}

impl Message {
    /// The destination RabbitMQ shows on delivery, rebuilt from exchange and routing key.
    fn destination(&self) -> String {
        match self.exchange.as_str() {
            "" => format!("/queue/{}", self.routing_key),
            "amq.topic" => format!("/topic/{}", self.routing_key),
            exchange => format!("/exchange/{exchange}/{}", self.routing_key),
        }
    }
}

/// Where a destination leads.
enum Target {
    /// `amq.topic` with this routing key.
    Topic(String),
    /// A queue; `declare`: the destination declares it (`/queue/`, bare) rather than needing it
    /// to exist (`/amq/queue/`).
    Queue { name: String, declare: bool },
}

/// How a queue is (re)declared.
struct Declaration {
    durable: bool,
    auto_delete: bool,
    arguments: Vec<(String, String)>,
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

    /// From now on a SEND to a destination starting with `destination_prefix` is refused as
    /// RabbitMQ refuses a SEND to a missing exchange: a `NOT_FOUND` error, and the connection
    /// closes, so no later message of the same batch is receipted.
    pub fn refuse(&self, destination_prefix: &str) {
        self.broker().refused.push(destination_prefix.to_owned());
    }

    /// Undoes every [`MemoryTransport::refuse`].
    pub fn clear_refusals(&self) {
        self.broker().refused.clear();
    }

    /// `true`: the broker goes down: every connection closes (subscription receivers end,
    /// unacked deliveries return to their queues) and connect, send and subscribe fail with
    /// [`TransportError::Connect`] until `set_down(false)`. Queues and their messages survive.
    pub fn set_down(&self, down: bool) {
        let mut broker = self.broker();
        broker.down = down;
        if down {
            let open: Vec<u64> = broker.connections.keys().copied().collect();
            for connection in open {
                broker.close_connection(connection);
            }
        }
    }

    /// From now on a SEND to a destination starting with `destination_prefix` is dropped
    /// silently: no receipt, no error, the connection stays open (a frame a broker discards, or
    /// one lost on the way). Its sender learns of it only by a receipt timeout.
    pub fn discard(&self, destination_prefix: &str) {
        self.broker().discarded.push(destination_prefix.to_owned());
    }

    /// `true`: publishes are `mandatory`, as the AMQP transport's: a message that reaches no
    /// queue is answered [`Outcome::Unroutable`] (RabbitMQ's `basic.return` before the confirm)
    /// instead of receipted and dropped. `false` (the default): STOMP's behaviour.
    pub fn set_mandatory(&self, mandatory: bool) {
        self.broker().mandatory = mandatory;
    }

    /// Undoes every [`MemoryTransport::discard`].
    pub fn clear_discards(&self) {
        self.broker().discarded.clear();
    }

    /// `true`: the broker stops reading publishers, as RabbitMQ does under a memory or disk
    /// alarm: SENDs are neither routed nor receipted, and their senders time out. `false`: the
    /// frames waiting are read, in order, and receipted.
    pub fn set_blocked(&self, blocked: bool) {
        let mut broker = self.broker();
        broker.blocked = blocked;
        if !blocked {
            let open: Vec<u64> = broker.connections.keys().copied().collect();
            for connection in open {
                broker.read_unread(&self.broker, connection);
            }
        }
    }

    /// Receipts come `delay` after their message is routed (default: at once), as they do when
    /// RabbitMQ waits for a disk write before confirming. A refusal in the meantime fails them.
    pub fn set_receipt_delay(&self, delay: Duration) {
        self.broker().receipt_delay = delay;
    }

    /// How long [`Transport::send`] waits for receipts (default 10 s, as
    /// `OUTBOX_RECEIPT_TIMEOUT`).
    pub fn set_receipt_timeout(&self, timeout: Duration) {
        self.broker().receipt_timeout = Some(timeout);
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
                Ok(Ok(Ok(true))) => Outcome::Receipted,
                Ok(Ok(Ok(false))) => Outcome::Unroutable("312 NO_ROUTE".to_owned()),
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

    async fn subscribe(
        &self,
        subscription: Subscription,
    ) -> Result<mpsc::Receiver<Delivery>, TransportError> {
        let mut broker = self.broker();
        broker.open_connection(self.connection)?;
        let (outbox, receiver) = mpsc::channel(RECEIVER_CAPACITY);
        let (inbox, forwarded) = mpsc::unbounded_channel();
        let (closed, on_close) = oneshot::channel();
        match broker.add_consumer(self.connection, &subscription, inbox, closed) {
            Ok(queue) => {
                tokio::spawn(forward(forwarded, outbox, on_close));
                broker.dispatch(&queue);
                Ok(receiver)
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
    mut inbox: mpsc::UnboundedReceiver<Delivery>,
    outbox: mpsc::Sender<Delivery>,
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

impl Broker {
    /// Opens the connection unless open.
    fn open_connection(&mut self, connection: u64) -> Result<(), TransportError> {
        if self.down {
            return Err(down());
        }
        if let Entry::Vacant(vacant) = self.connections.entry(connection) {
            self.connects += 1;
            vacant.insert(Connection {
                generation: self.connects as u64,
                ..Connection::default()
            });
        }
        Ok(())
    }

    /// For ack, nack and unsubscribe: a lost connection is an error; a closed one reconnects
    /// (as a real transport would, and then the broker knows none of the old subscriptions).
    fn usable(&mut self, connection: u64) -> Result<(), TransportError> {
        if self.down {
            return Err(TransportError::ConnectionLost(
                "the in-memory broker is down".to_owned(),
            ));
        }
        self.open_connection(connection)
    }

    /// For ack and nack: [`Broker::usable`], and `delivery` came on this very connection.
    fn usable_for(&mut self, connection: u64, delivery: &Delivery) -> Result<(), TransportError> {
        self.usable(connection)?;
        match self.connections.get(&connection) {
            Some(open) if open.generation == delivery.connection => Ok(()),
            _ => Err(TransportError::stale_delivery()),
        }
    }

    /// Reads SEND `number` of `connection`: routes it and receipts it (at once, or after the
    /// receipt delay), drops it silently, or refuses it and closes the connection, failing
    /// every receipt pending on it.
    fn read(
        &mut self,
        handle: &Arc<Mutex<Broker>>,
        connection: u64,
        number: u64,
        message: &Outgoing,
    ) -> Option<TransportError> {
        if self
            .discarded
            .iter()
            .any(|prefix| message.destination.starts_with(prefix.as_str()))
        {
            return None;
        }
        let routed = match self.publish(message) {
            Ok(routed) => routed || !self.mandatory,
            Err(error) => {
                tracing::debug!(destination = %message.destination, "memory broker refused a SEND");
                self.close_connection_for(connection, error.clone());
                return Some(error);
            }
        };
        if self.receipt_delay.is_zero() {
            self.receipt(connection, number, routed);
            return None;
        }
        let generation = self.connections.get(&connection).map(|c| c.generation)?;
        let (delay, broker) = (self.receipt_delay, handle.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut broker = broker.lock().unwrap_or_else(PoisonError::into_inner);
            if broker
                .connections
                .get(&connection)
                .is_some_and(|c| c.generation == generation)
            {
                broker.receipt(connection, number, routed);
            }
        });
        None
    }

    /// Sends the receipt of SEND `number`, if it is still pending.
    fn receipt(&mut self, connection: u64, number: u64, routed: bool) {
        if let Some(open) = self.connections.get_mut(&connection)
            && let Some(waiter) = open.pending.remove(&number)
        {
            open.last_receipted = open.last_receipted.max(number);
            let _ = waiter.send(Ok(routed));
        }
    }

    /// Reads the frames that waited while publishers were blocked.
    fn read_unread(&mut self, handle: &Arc<Mutex<Broker>>, connection: u64) {
        loop {
            let Some(open) = self.connections.get_mut(&connection) else {
                return;
            };
            let Some((number, message)) = open.unread.pop_front() else {
                return;
            };
            if self.read(handle, connection, number, &message).is_some() {
                return;
            }
        }
    }

    /// Closes a connection and fails every receipt pending on it with `why`.
    fn close_connection_for(&mut self, connection: u64, why: TransportError) {
        if let Some(open) = self.connections.get_mut(&connection) {
            for (_, waiter) in std::mem::take(&mut open.pending) {
                let _ = waiter.send(Err(why.clone()));
            }
        }
        self.close_connection(connection);
    }

    /// Closes a connection: its subscriptions end, its unacked deliveries go back to the
    /// front of their queues, marked redelivered, and its pending receipts fail.
    fn close_connection(&mut self, connection: u64) {
        let Some(closed) = self.connections.remove(&connection) else {
            return;
        };
        for (_, waiter) in closed.pending {
            let _ = waiter.send(Err(lost()));
        }
        let mut touched: Vec<String> = Vec::new();
        for unacked in closed.unacked.into_iter().rev() {
            if let Some(queue) = self.queues.get_mut(&unacked.queue) {
                let mut message = unacked.message;
                message.redelivered = true;
                queue.ready.push_front(message);
                touched.push(unacked.queue);
            }
        }
        for (id, consumer) in closed.subscriptions {
            self.remove_consumer(connection, &id, &consumer.queue);
            touched.push(consumer.queue);
        }
        touched.sort();
        touched.dedup();
        for queue in touched {
            self.dispatch(&queue);
        }
    }

    /// Routes one SEND: whether a queue took it; an error is one RabbitMQ would close the
    /// connection with.
    fn publish(&mut self, outgoing: &Outgoing) -> Result<bool, TransportError> {
        if self
            .refused
            .iter()
            .any(|prefix| outgoing.destination.starts_with(prefix.as_str()))
        {
            return Err(not_found(format!(
                "no exchange '{}' in vhost '/'",
                exchange_name(&outgoing.destination)
            )));
        }
        let headers: Vec<(String, String)> = outgoing
            .headers
            .iter()
            .filter(|(key, _)| !BROKER_HEADERS.contains(&key.as_str()))
            .cloned()
            .collect();
        match target(&outgoing.destination)? {
            Target::Topic(key) => {
                let message = Message {
                    exchange: "amq.topic".to_owned(),
                    routing_key: key,
                    headers,
                    body: outgoing.body.clone(),
                    redelivered: false,
                };
                let routed = self.route_topic(message);
                self.sent.push(outgoing.clone());
                Ok(routed)
            }
            Target::Queue { name, declare } => {
                if declare {
                    // What RabbitMQ declares for a SEND to `/queue/<q>`: durable, no arguments.
                    let declaration = Declaration {
                        durable: true,
                        auto_delete: false,
                        arguments: Vec::new(),
                    };
                    self.declare(&name, &declaration)?;
                }
                let message = Message {
                    exchange: String::new(),
                    routing_key: name.clone(),
                    headers,
                    body: outgoing.body.clone(),
                    redelivered: false,
                };
                let routed = self.enqueue(&name, message);
                self.sent.push(outgoing.clone());
                Ok(routed)
            }
        }
    }

    /// Copies a message into every queue bound to a matching key (none: it is dropped).
    fn route_topic(&mut self, message: Message) -> bool {
        let mut queues: Vec<String> = self
            .bindings
            .iter()
            .filter(|(key, _)| topic_matches(key, &message.routing_key))
            .map(|(_, queue)| queue.clone())
            .collect();
        queues.sort();
        queues.dedup();
        let routed = !queues.is_empty();
        for queue in queues {
            self.enqueue(&queue, message.clone());
        }
        routed
    }

    /// Appends to a queue if it exists (the default exchange drops what has no queue).
    fn enqueue(&mut self, queue: &str, message: Message) -> bool {
        if let Some(q) = self.queues.get_mut(queue) {
            q.ready.push_back(message);
            self.dispatch(queue);
            true
        } else {
            false
        }
    }

    /// Declares a queue, or checks an existing one is declared alike.
    fn declare(&mut self, name: &str, declaration: &Declaration) -> Result<(), TransportError> {
        let Some(existing) = self.queues.get(name) else {
            self.queues.insert(
                name.to_owned(),
                Queue {
                    durable: declaration.durable,
                    auto_delete: declaration.auto_delete,
                    arguments: declaration.arguments.clone(),
                    ready: VecDeque::new(),
                    consumers: Vec::new(),
                    next_consumer: 0,
                },
            );
            return Ok(());
        };
        let inequivalent = |argument: &str, received: String, current: String| {
            precondition_failed(format!(
                "inequivalent arg '{argument}' for queue '{name}' in vhost '/': \
                 received {received} but current is {current}"
            ))
        };
        if existing.durable != declaration.durable {
            return Err(inequivalent(
                "durable",
                format!("'{}'", declaration.durable),
                format!("'{}'", existing.durable),
            ));
        }
        if existing.auto_delete != declaration.auto_delete {
            return Err(inequivalent(
                "auto_delete",
                format!("'{}'", declaration.auto_delete),
                format!("'{}'", existing.auto_delete),
            ));
        }
        for argument in QUEUE_ARGUMENTS {
            let received = lookup(&declaration.arguments, argument);
            let current = lookup(&existing.arguments, argument);
            if received != current {
                let describe = |value: Option<&str>| match value {
                    Some(value) => format!("the value '{value}' of type 'longstr'"),
                    None => "none".to_owned(),
                };
                return Err(inequivalent(
                    argument,
                    describe(received),
                    describe(current),
                ));
            }
        }
        Ok(())
    }

    /// Declares what the SUBSCRIBE asks for and registers the consumer; returns its queue.
    fn add_consumer(
        &mut self,
        connection: u64,
        subscription: &Subscription,
        inbox: mpsc::UnboundedSender<Delivery>,
        closed: oneshot::Sender<()>,
    ) -> Result<String, TransportError> {
        let open = self.connections.get(&connection);
        if open.is_some_and(|c| c.subscriptions.contains_key(&subscription.id)) {
            return Err(TransportError::Broker {
                message: "Duplicated subscription identifier".to_owned(),
                detail: format!(
                    "A subscription identified by 'T_{}' already exists.",
                    subscription.id
                ),
            });
        }
        let header = |name: &str| lookup(&subscription.headers, name);
        let is_true = |name: &str| header(name).is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let arguments = {
            let mut arguments: Vec<(String, String)> = subscription
                .headers
                .iter()
                .filter(|(key, _)| QUEUE_ARGUMENTS.contains(&key.as_str()))
                .cloned()
                .collect();
            arguments.sort();
            arguments.dedup_by(|a, b| a.0 == b.0);
            arguments
        };
        let queue = match target(&subscription.destination)? {
            Target::Topic(key) => {
                let durable = is_true("durable") || is_true("persistent");
                let name = match header("x-queue-name") {
                    Some(name) => name.to_owned(),
                    None => {
                        self.last_tag += 1;
                        format!("stomp-subscription-memory-{}", self.last_tag)
                    }
                };
                let declaration = Declaration {
                    durable,
                    // RabbitMQ: a non-durable topic subscription's queue goes with its consumer.
                    auto_delete: !durable || is_true("auto-delete"),
                    arguments,
                };
                self.declare(&name, &declaration)?;
                let binding = (key, name.clone());
                if !self.bindings.contains(&binding) {
                    self.bindings.push(binding);
                }
                name
            }
            Target::Queue {
                name,
                declare: true,
            } => {
                let declaration = Declaration {
                    durable: header("durable").is_none_or(|v| !v.eq_ignore_ascii_case("false")),
                    auto_delete: is_true("auto-delete"),
                    arguments,
                };
                self.declare(&name, &declaration)?;
                name
            }
            Target::Queue {
                name,
                declare: false,
            } => {
                if !self.queues.contains_key(&name) {
                    return Err(not_found(format!("no queue '{name}' in vhost '/'")));
                }
                name
            }
        };
        let prefetch = header("prefetch-count").and_then(|v| v.trim().parse::<usize>().ok());
        let consumer = Consumer {
            queue: queue.clone(),
            ack: subscription.ack,
            prefetch,
            in_flight: 0,
            inbox,
            _closed: closed,
        };
        self.connections
            .entry(connection)
            .or_default()
            .subscriptions
            .insert(subscription.id.clone(), consumer);
        if let Some(q) = self.queues.get_mut(&queue) {
            q.consumers.push((connection, subscription.id.clone()));
        }
        Ok(queue)
    }

    /// Takes a consumer off its queue; deletes an auto-delete queue left without consumers.
    fn remove_consumer(&mut self, connection: u64, id: &str, queue: &str) {
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        q.consumers.retain(|(c, s)| !(*c == connection && s == id));
        if q.consumers.is_empty() && q.auto_delete {
            self.queues.remove(queue);
            self.bindings.retain(|(_, bound)| bound != queue);
        }
    }

    /// Removes an unacked delivery of this connection's open subscriptions, for ack or nack.
    fn settle(&mut self, connection: u64, ack_id: &str) -> Result<Unacked, TransportError> {
        let missing = || TransportError::Broker {
            message: "Subscription not found".to_owned(),
            detail: format!("Message with id \"{ack_id}\" has no subscription"),
        };
        let open = self.connections.get_mut(&connection).ok_or_else(missing)?;
        let at = open
            .unacked
            .iter()
            .position(|u| u.ack_id == ack_id && open.subscriptions.contains_key(&u.subscription))
            .ok_or_else(missing)?;
        let settled = open.unacked.remove(at);
        if let Some(consumer) = open.subscriptions.get_mut(&settled.subscription) {
            consumer.in_flight = consumer.in_flight.saturating_sub(1);
        }
        Ok(settled)
    }

    /// Dead-letters a nacked message as RabbitMQ does, or drops it.
    fn dead_letter(&mut self, from_queue: &str, mut message: Message) {
        let Some(queue) = self.queues.get(from_queue) else {
            return;
        };
        let Some(exchange) = lookup(&queue.arguments, "x-dead-letter-exchange") else {
            return;
        };
        let exchange = exchange.to_owned();
        let routing_key = lookup(&queue.arguments, "x-dead-letter-routing-key")
            .map_or_else(|| message.routing_key.clone(), str::to_owned);
        if lookup(&message.headers, "x-first-death-reason").is_none() {
            message.headers.extend([
                (
                    "x-first-death-exchange".to_owned(),
                    message.exchange.clone(),
                ),
                ("x-first-death-queue".to_owned(), from_queue.to_owned()),
                ("x-first-death-reason".to_owned(), "rejected".to_owned()),
            ]);
        }
        // Dead-lettering re-encodes the headers as an AMQP table: RabbitMQ delivers them sorted.
        message.headers.sort_by(|a, b| a.0.cmp(&b.0));
        message.exchange = exchange;
        message.routing_key = routing_key;
        message.redelivered = false;
        match message.exchange.as_str() {
            "" => {
                let queue = message.routing_key.clone();
                self.enqueue(&queue, message);
            }
            "amq.topic" => {
                self.route_topic(message);
            }
            _ => {}
        }
    }

    /// Hands a queue's ready messages to its consumers, round-robin, within their prefetch.
    fn dispatch(&mut self, queue_name: &str) {
        loop {
            let Some(queue) = self.queues.get_mut(queue_name) else {
                return;
            };
            if queue.ready.is_empty() || queue.consumers.is_empty() {
                return;
            }
            let count = queue.consumers.len();
            let chosen = (0..count)
                .map(|step| (queue.next_consumer + step) % count)
                .find(|&at| {
                    let (connection, id) = &queue.consumers[at];
                    self.connections
                        .get(connection)
                        .and_then(|c| c.subscriptions.get(id))
                        .is_some_and(Consumer::has_room)
                });
            let Some(at) = chosen else {
                return;
            };
            queue.next_consumer = (at + 1) % count;
            let (connection, id) = queue.consumers[at].clone();
            let Some(message) = queue.ready.pop_front() else {
                return;
            };
            self.last_tag += 1;
            let tag = self.last_tag;
            let Some(open) = self.connections.get_mut(&connection) else {
                return;
            };
            let generation = open.generation;
            let Some(consumer) = open.subscriptions.get_mut(&id) else {
                return;
            };
            let message_id = format!("T_{id}@@session-memory-{connection}@@{tag}");
            let mut delivery = delivery(&id, &message_id, consumer.ack, &message);
            delivery.connection = generation;
            if consumer.ack == AckMode::ClientIndividual {
                consumer.in_flight += 1;
                open.unacked.push(Unacked {
                    ack_id: message_id,
                    subscription: id,
                    queue: queue_name.to_owned(),
                    message,
                });
            }
            // A receiver the client dropped loses the delivery (auto) or holds it unacked
            // (client), as a client that stopped reading its socket would.
            let _ = consumer.inbox.send(delivery);
        }
    }
}

/// The MESSAGE RabbitMQ would send, headers in its order.
fn delivery(subscription: &str, message_id: &str, ack: AckMode, message: &Message) -> Delivery {
    let destination = message.destination();
    let mut headers = vec![
        ("subscription".to_owned(), subscription.to_owned()),
        ("destination".to_owned(), destination.clone()),
        ("message-id".to_owned(), message_id.to_owned()),
        ("redelivered".to_owned(), message.redelivered.to_string()),
    ];
    if ack == AckMode::ClientIndividual {
        headers.push(("ack".to_owned(), message_id.to_owned()));
    }
    headers.extend(message.headers.iter().cloned());
    if !message.body.is_empty() {
        headers.push(("content-length".to_owned(), message.body.len().to_string()));
    }
    Delivery {
        subscription: subscription.to_owned(),
        destination,
        message_id: message_id.to_owned(),
        ack_id: message_id.to_owned(),
        headers,
        body: message.body.clone(),
        connection: 0,
    }
}

/// Parses a destination as RabbitMQ's STOMP plugin does (the exchanges it knows: `amq.topic`).
fn target(destination: &str) -> Result<Target, TransportError> {
    let queue = |name: &str, declare| {
        if name.is_empty() {
            Err(unknown_destination(destination))
        } else {
            Ok(Target::Queue {
                name: name.to_owned(),
                declare,
            })
        }
    };
    if let Some(key) = destination.strip_prefix("/topic/") {
        return Ok(Target::Topic(key.to_owned()));
    }
    if let Some(name) = destination.strip_prefix("/amq/queue/") {
        return queue(name, false);
    }
    if let Some(name) = destination.strip_prefix("/queue/") {
        return queue(name, true);
    }
    if let Some(rest) = destination.strip_prefix("/exchange/") {
        return match rest.split_once('/') {
            Some(("amq.topic", key)) => Ok(Target::Topic(key.to_owned())),
            _ => Err(not_found(format!(
                "no exchange '{}' in vhost '/'",
                exchange_name(destination)
            ))),
        };
    }
    if destination.starts_with('/') {
        return Err(unknown_destination(destination));
    }
    queue(destination, true)
}

/// The exchange of an `/exchange/<x>/...` destination, else the destination itself: what a
/// `NOT_FOUND - no exchange` error names.
fn exchange_name(destination: &str) -> &str {
    if let Some(rest) = destination.strip_prefix("/exchange/") {
        return rest.split('/').next().unwrap_or(rest);
    }
    destination
}

/// AMQP topic matching: `*` is one dot-separated word, `#` zero or more.
fn topic_matches(binding: &str, routing_key: &str) -> bool {
    fn matches(pattern: &[&str], words: &[&str]) -> bool {
        match pattern.split_first() {
            None => words.is_empty(),
            Some((&"#", rest)) => (0..=words.len()).any(|skip| matches(rest, &words[skip..])),
            Some((&"*", rest)) => !words.is_empty() && matches(rest, &words[1..]),
            Some((word, rest)) => words.first() == Some(word) && matches(rest, &words[1..]),
        }
    }
    let pattern: Vec<&str> = binding.split('.').collect();
    let words: Vec<&str> = routing_key.split('.').collect();
    matches(&pattern, &words)
}

fn lookup<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

fn lost() -> TransportError {
    TransportError::ConnectionLost("the in-memory broker closed the connection".to_owned())
}

fn down() -> TransportError {
    TransportError::Connect {
        addresses: ADDRESS.to_owned(),
        reason: "the in-memory broker is down".to_owned(),
    }
}

fn not_found(what: String) -> TransportError {
    TransportError::Broker {
        message: "not_found".to_owned(),
        detail: format!("NOT_FOUND - {what}"),
    }
}

fn precondition_failed(what: String) -> TransportError {
    TransportError::Broker {
        message: "precondition_failed".to_owned(),
        detail: format!("PRECONDITION_FAILED - {what}"),
    }
}

fn unknown_destination(destination: &str) -> TransportError {
    TransportError::Broker {
        message: "Unknown destination".to_owned(),
        detail: format!("'{destination}' is not a valid destination."),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const WAIT: Duration = Duration::from_secs(2);

    fn message(destination: &str, body: &str) -> Outgoing {
        Outgoing {
            destination: destination.to_owned(),
            headers: vec![("x-custom".to_owned(), "a:b".to_owned())],
            body: body.as_bytes().to_vec(),
        }
    }

    fn subscription(destination: &str, id: &str, headers: &[(&str, &str)]) -> Subscription {
        Subscription {
            destination: destination.to_owned(),
            id: id.to_owned(),
            ack: AckMode::ClientIndividual,
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    /// The headers django-outbox-pattern declares a consumer's queue with (WIRE.md §3).
    fn python_queue_headers(queue: &str, prefetch: &str) -> Vec<(String, String)> {
        [
            ("durable", "true"),
            ("auto-delete", "false"),
            ("exclusive", "False"),
            ("prefetch-count", prefetch),
            ("x-queue-name", queue),
            ("x-dead-letter-exchange", ""),
            ("x-dead-letter-routing-key", &format!("DLQ.{queue}")),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
    }

    async fn send_ok(broker: &MemoryTransport, messages: &[Outgoing]) {
        let report = broker.send(messages).await;
        assert!(
            report.all_receipted(),
            "not receipted: {:?}",
            report.failure()
        );
        assert!(report.failure().is_none());
    }

    async fn next(receiver: &mut mpsc::Receiver<Delivery>) -> Delivery {
        tokio::time::timeout(WAIT, receiver.recv())
            .await
            .expect("a delivery within 2 s")
            .expect("the subscription is open")
    }

    async fn nothing_more(receiver: &mut mpsc::Receiver<Delivery>) {
        if let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_millis(100), receiver.recv()).await
        {
            panic!("unexpected delivery {delivery:?}");
        }
    }

    async fn closes(receiver: &mut mpsc::Receiver<Delivery>) {
        let end = tokio::time::timeout(WAIT, receiver.recv()).await;
        assert!(
            matches!(end, Ok(None)),
            "receiver should have ended: {end:?}"
        );
    }

    fn detail(error: &TransportError) -> &str {
        match error {
            TransportError::Broker { detail, .. } => detail,
            other => panic!("expected a broker error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn mandatory_publishes_that_reach_no_queue_are_unroutable() {
        let broker = MemoryTransport::new();
        let report = broker.send(&[message("/topic/nobody", "{}")]).await;
        assert_eq!(
            report.outcomes,
            vec![Outcome::Receipted],
            "STOMP: receipted, dropped"
        );
        broker.set_mandatory(true);
        let report = broker
            .send(&[
                message("/topic/nobody", "{}"),
                message("/amq/queue/missing", "{}"),
                message("/queue/declared_by_send", "{}"),
            ])
            .await;
        assert!(matches!(report.outcomes[0], Outcome::Unroutable(_)));
        assert!(matches!(report.outcomes[1], Outcome::Unroutable(_)));
        assert_eq!(report.outcomes[2], Outcome::Receipted);
        let mut deliveries = broker
            .subscribe(subscription(
                "/topic/nobody",
                "a",
                &[("x-queue-name", "now")],
            ))
            .await
            .unwrap();
        send_ok(&broker, &[message("/topic/nobody", "{}")]).await;
        assert_eq!(next(&mut deliveries).await.destination, "/topic/nobody");
    }

    #[tokio::test]
    async fn topic_send_reaches_every_queue_bound_to_its_key() {
        let broker = MemoryTransport::new();
        let mut first = broker
            .subscribe(subscription(
                "/topic/orders.v1",
                "a",
                &[("x-queue-name", "billing")],
            ))
            .await
            .unwrap();
        let mut second = broker
            .subscribe(subscription(
                "/topic/orders.v1",
                "b",
                &[("x-queue-name", "shipping")],
            ))
            .await
            .unwrap();
        send_ok(&broker, &[message("/topic/orders.v1", "{}")]).await;
        assert_eq!(next(&mut first).await.destination, "/topic/orders.v1");
        assert_eq!(next(&mut second).await.destination, "/topic/orders.v1");
    }

    #[tokio::test]
    async fn topic_bindings_match_wildcards_like_amq_topic() {
        let broker = MemoryTransport::new();
        let mut star = broker
            .subscribe(subscription(
                "/topic/orders.*",
                "a",
                &[("x-queue-name", "star")],
            ))
            .await
            .unwrap();
        let mut hash = broker
            .subscribe(subscription(
                "/topic/orders.#",
                "b",
                &[("x-queue-name", "hash")],
            ))
            .await
            .unwrap();
        send_ok(&broker, &[message("/topic/orders.v1.eu", "deep")]).await;
        send_ok(&broker, &[message("/topic/orders.v1", "shallow")]).await;
        assert_eq!(next(&mut star).await.body, b"shallow");
        nothing_more(&mut star).await;
        assert_eq!(next(&mut hash).await.body, b"deep");
        assert_eq!(next(&mut hash).await.body, b"shallow");
        assert!(topic_matches("orders.#", "orders"));
        assert!(!topic_matches("orders.*", "orders"));
    }

    #[tokio::test]
    async fn topic_send_with_no_bound_queue_is_receipted_dropped_and_recorded() {
        let broker = MemoryTransport::new();
        let sent = message("/topic/nobody", "lost");
        send_ok(&broker, std::slice::from_ref(&sent)).await;
        assert_eq!(broker.sent(), vec![sent]);
        // A queue bound later does not get it.
        broker
            .subscribe(subscription(
                "/topic/nobody",
                "late",
                &[("x-queue-name", "late_q")],
            ))
            .await
            .unwrap();
        assert_eq!(broker.queue_len("late_q"), 0);
        broker.clear_sent();
        assert!(broker.sent().is_empty());
        assert_eq!(broker.send_count(), 1);
    }

    #[tokio::test]
    async fn messages_wait_in_a_named_queue_without_consumer() {
        let broker = MemoryTransport::new();
        let headers = python_queue_headers("orders_q", "1");
        let topology = Subscription {
            headers,
            ..subscription("/topic/orders", "declare", &[])
        };
        broker.subscribe(topology).await.unwrap();
        broker.unsubscribe("declare").await.unwrap();
        assert!(
            broker.queue_exists("orders_q"),
            "a durable queue outlives its consumer"
        );
        send_ok(
            &broker,
            &[
                message("/topic/orders", "one"),
                message("/topic/orders", "two"),
            ],
        )
        .await;
        assert_eq!(broker.queue_len("orders_q"), 2);
        let waiting = broker.queue_messages("orders_q");
        assert_eq!(waiting[0].destination, "/topic/orders");
        assert_eq!(
            waiting[0].headers,
            vec![("x-custom".to_owned(), "a:b".to_owned())]
        );
        assert_eq!(waiting[1].body, b"two");
    }

    #[tokio::test]
    async fn temporary_and_non_durable_topic_queues_go_with_their_consumer() {
        let broker = MemoryTransport::new();
        broker
            .subscribe(subscription(
                "/topic/k",
                "named",
                &[("x-queue-name", "transient_q")],
            ))
            .await
            .unwrap();
        broker
            .subscribe(subscription("/topic/k", "temp", &[]))
            .await
            .unwrap();
        send_ok(&broker, &[message("/topic/k", "x")]).await;
        assert!(broker.queue_exists("transient_q"));
        broker.unsubscribe("named").await.unwrap();
        broker.unsubscribe("temp").await.unwrap();
        assert!(!broker.queue_exists("transient_q"));
        assert!(broker.broker().queues.is_empty());
        assert!(broker.broker().bindings.is_empty());
    }

    #[tokio::test]
    async fn queue_destinations_reach_the_named_queue() {
        let broker = MemoryTransport::new();
        send_ok(
            &broker,
            &[message("/queue/work", "1"), message("DLQ.work", "2")],
        )
        .await;
        assert_eq!(
            broker.queue_len("work"),
            1,
            "a SEND to /queue/ declares the queue"
        );
        assert_eq!(broker.queue_len("DLQ.work"), 1, "so does a bare name");
        send_ok(&broker, &[message("/amq/queue/work", "3")]).await;
        assert_eq!(broker.queue_len("work"), 2);
        // `/amq/queue/` declares nothing: a missing queue drops the message, receipted.
        send_ok(&broker, &[message("/amq/queue/missing", "4")]).await;
        assert!(!broker.queue_exists("missing"));
        let mut work = broker
            .subscribe(subscription("/amq/queue/work", "w", &[]))
            .await
            .unwrap();
        let first = next(&mut work).await;
        assert_eq!(first.destination, "/queue/work");
        assert_eq!(first.body, b"1");
        assert_eq!(next(&mut work).await.body, b"3");
        let mut bare = broker
            .subscribe(subscription("DLQ.work", "d", &[]))
            .await
            .unwrap();
        assert_eq!(next(&mut bare).await.destination, "/queue/DLQ.work");
    }

    #[tokio::test]
    async fn subscribing_to_a_missing_amq_queue_is_not_found_and_closes_the_connection() {
        let broker = MemoryTransport::new();
        let mut open = broker
            .subscribe(subscription("/queue/q", "open", &[]))
            .await
            .unwrap();
        let error = broker
            .subscribe(subscription("/amq/queue/missing", "s", &[]))
            .await
            .unwrap_err();
        assert_eq!(
            detail(&error),
            "NOT_FOUND - no queue 'missing' in vhost '/'"
        );
        assert!(!broker.is_connected());
        closes(&mut open).await;
    }

    #[tokio::test]
    async fn redeclaring_a_queue_with_other_arguments_is_a_precondition_failure() {
        let broker = MemoryTransport::new();
        let declared = Subscription {
            headers: python_queue_headers("orders_q", "1"),
            ..subscription("/topic/orders", "a", &[])
        };
        broker.subscribe(declared.clone()).await.unwrap();
        // The same declaration again is fine (another consumer of the same queue).
        let again = Subscription {
            id: "b".into(),
            ..declared
        };
        broker.subscribe(again).await.unwrap();
        let other = subscription(
            "/topic/orders",
            "c",
            &[
                ("durable", "true"),
                ("auto-delete", "false"),
                ("x-queue-name", "orders_q"),
                ("x-dead-letter-exchange", ""),
            ],
        );
        let error = broker.subscribe(other).await.unwrap_err();
        assert!(error.is_broker_refusal());
        assert!(
            detail(&error).starts_with(
                "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-routing-key' for queue \
                 'orders_q' in vhost '/': received none but current is the value 'DLQ.orders_q'"
            ),
            "{error:?}"
        );
        assert!(
            !broker.is_connected(),
            "a channel error closes the connection"
        );
        // A SEND to /queue/ declares with no arguments: refused the same way.
        let report = broker.send(&[message("/queue/orders_q", "x")]).await;
        assert_eq!(report.receipted(), vec![false]);
        assert!(detail(report.failure().unwrap()).contains("PRECONDITION_FAILED"));
        // /amq/queue/ reaches it without declaring.
        send_ok(&broker, &[message("/amq/queue/orders_q", "x")]).await;
        assert_eq!(broker.queue_len("orders_q"), 1);
    }

    #[tokio::test]
    async fn deliveries_carry_the_sent_headers_and_fresh_ids() {
        let broker = MemoryTransport::new();
        let mut client = broker
            .subscribe(subscription(
                "/topic/t",
                "sub-1",
                &[("x-queue-name", "t_q")],
            ))
            .await
            .unwrap();
        let mut auto = broker
            .subscribe(Subscription {
                ack: AckMode::Auto,
                ..subscription("/topic/t", "sub-2", &[("x-queue-name", "t_auto")])
            })
            .await
            .unwrap();
        let mut sent = message("/topic/t", "{\"n\":1}");
        sent.headers.push(("dop-msg-id".into(), "row-1".into()));
        send_ok(&broker, &[sent.clone(), sent]).await;
        let first = next(&mut client).await;
        let second = next(&mut client).await;
        let names: Vec<&str> = first.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "subscription",
                "destination",
                "message-id",
                "redelivered",
                "ack",
                "x-custom",
                "dop-msg-id",
                "content-length"
            ]
        );
        assert_eq!(first.header("x-custom"), Some("a:b"));
        assert_eq!(first.header("content-length"), Some("7"));
        assert_eq!(first.header("redelivered"), Some("false"));
        assert_eq!(first.header("ack"), Some(first.ack_id.as_str()));
        assert_eq!(first.header("message-id"), Some(first.message_id.as_str()));
        assert_eq!(first.subscription, "sub-1");
        assert_ne!(first.message_id, second.message_id);
        let unacked = next(&mut auto).await;
        assert_eq!(
            unacked.header("ack"),
            None,
            "no ack header on an auto subscription"
        );
        let _ = next(&mut auto).await;
        assert_eq!(broker.unacked_len("t_auto"), 0);
        // An empty body has no content-length, as with RabbitMQ.
        send_ok(&broker, &[message("/topic/t", "")]).await;
        assert_eq!(next(&mut auto).await.header("content-length"), None);
    }

    #[tokio::test]
    async fn prefetch_bounds_unacked_deliveries_and_ack_releases_the_next() {
        let broker = MemoryTransport::new();
        let mut receiver = broker
            .subscribe(subscription("/queue/p", "s", &[("prefetch-count", "2")]))
            .await
            .unwrap();
        let batch: Vec<Outgoing> = (0..4)
            .map(|n| message("/queue/p", &n.to_string()))
            .collect();
        send_ok(&broker, &batch).await;
        let zero = next(&mut receiver).await;
        let one = next(&mut receiver).await;
        nothing_more(&mut receiver).await;
        assert_eq!(broker.queue_len("p"), 2);
        assert_eq!(broker.unacked_len("p"), 2);
        broker.ack(&zero).await.unwrap();
        assert_eq!(next(&mut receiver).await.body, b"2");
        nothing_more(&mut receiver).await;
        broker.ack(&one).await.unwrap();
        assert_eq!(next(&mut receiver).await.body, b"3");
        assert_eq!(broker.queue_len("p"), 0);
        // Acking twice: the delivery is no longer known.
        let error = broker.ack(&zero).await.unwrap_err();
        assert!(detail(&error).contains("has no subscription"));
        assert!(broker.is_connected(), "an unknown ack id is not fatal");
    }

    #[tokio::test]
    async fn without_prefetch_every_message_is_delivered_at_once() {
        let broker = MemoryTransport::new();
        let mut receiver = broker
            .subscribe(subscription("/queue/u", "s", &[]))
            .await
            .unwrap();
        let batch: Vec<Outgoing> = (0..100)
            .map(|n| message("/queue/u", &n.to_string()))
            .collect();
        send_ok(&broker, &batch).await;
        for n in 0..100 {
            assert_eq!(next(&mut receiver).await.body, n.to_string().as_bytes());
        }
        assert_eq!(broker.unacked_len("u"), 100);
    }

    #[tokio::test]
    async fn consumers_of_one_queue_share_it_round_robin() {
        let broker = MemoryTransport::new();
        let mut a = broker
            .subscribe(subscription("/queue/rr", "a", &[]))
            .await
            .unwrap();
        let mut b = broker
            .subscribe(subscription("/queue/rr", "b", &[]))
            .await
            .unwrap();
        let batch: Vec<Outgoing> = (0..4)
            .map(|n| message("/queue/rr", &n.to_string()))
            .collect();
        send_ok(&broker, &batch).await;
        assert_eq!(next(&mut a).await.body, b"0");
        assert_eq!(next(&mut b).await.body, b"1");
        assert_eq!(next(&mut a).await.body, b"2");
        assert_eq!(next(&mut b).await.body, b"3");
    }

    #[tokio::test]
    async fn nack_dead_letters_to_the_dead_letter_routing_key() {
        let broker = MemoryTransport::new();
        let dlq = Subscription {
            headers: python_queue_headers("DLQ.orders_q", "1"),
            ..subscription("DLQ.orders_q", "dlq", &[])
        };
        broker.subscribe(dlq).await.unwrap();
        broker.unsubscribe("dlq").await.unwrap();
        let mut receiver = broker
            .subscribe(Subscription {
                headers: python_queue_headers("orders_q", "1"),
                ..subscription("/topic/orders", "s", &[])
            })
            .await
            .unwrap();
        send_ok(&broker, &[message("/topic/orders", "poison")]).await;
        let delivery = next(&mut receiver).await;
        broker.nack(&delivery).await.unwrap();
        assert_eq!(broker.queue_len("orders_q"), 0);
        assert_eq!(broker.unacked_len("orders_q"), 0);
        let dead = broker.queue_messages("DLQ.orders_q");
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].destination, "/queue/DLQ.orders_q");
        assert_eq!(dead[0].body, b"poison");
        let headers: Vec<(&str, &str)> = dead[0]
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            headers,
            [
                ("x-custom", "a:b"),
                ("x-first-death-exchange", "amq.topic"),
                ("x-first-death-queue", "orders_q"),
                ("x-first-death-reason", "rejected"),
            ]
        );
    }

    #[tokio::test]
    async fn nack_without_a_dead_letter_exchange_drops_the_message() {
        let broker = MemoryTransport::new();
        let mut receiver = broker
            .subscribe(subscription(
                "/queue/plain",
                "s",
                &[("x-dead-letter-routing-key", "DLQ.plain")],
            ))
            .await
            .unwrap();
        send_ok(
            &broker,
            &[
                message("/queue/DLQ.plain", "keep"),
                message("/amq/queue/plain", "x"),
            ],
        )
        .await;
        let delivery = next(&mut receiver).await;
        broker.nack(&delivery).await.unwrap();
        assert_eq!(broker.queue_len("plain"), 0);
        assert_eq!(
            broker.queue_len("DLQ.plain"),
            1,
            "nothing was dead-lettered"
        );
    }

    #[tokio::test]
    async fn disconnect_returns_unacked_deliveries_marked_redelivered() {
        let broker = MemoryTransport::new();
        let mut receiver = broker
            .subscribe(subscription("/queue/r", "s", &[]))
            .await
            .unwrap();
        send_ok(
            &broker,
            &[message("/queue/r", "a"), message("/queue/r", "b")],
        )
        .await;
        let first = next(&mut receiver).await;
        let _second = next(&mut receiver).await;
        broker.ack(&first).await.unwrap();
        broker.disconnect().await.unwrap();
        closes(&mut receiver).await;
        assert!(!broker.is_connected());
        assert_eq!(broker.queue_len("r"), 1);
        let mut again = broker
            .subscribe(subscription("/queue/r", "s", &[]))
            .await
            .unwrap();
        let redelivered = next(&mut again).await;
        assert_eq!(redelivered.body, b"b");
        assert_eq!(redelivered.header("redelivered"), Some("true"));
        assert_ne!(redelivered.message_id, _second.message_id);
        // The old delivery cannot be acked on the new connection.
        assert!(broker.ack(&_second).await.is_err());
        assert_eq!(broker.connect_count(), 2);
    }

    #[tokio::test]
    async fn a_delivery_of_an_earlier_connection_is_never_settled_on_the_current_one() {
        let broker = MemoryTransport::new();
        let mut receiver = broker
            .subscribe(subscription("/queue/g", "s", &[]))
            .await
            .unwrap();
        send_ok(&broker, &[message("/queue/g", "a")]).await;
        let old = next(&mut receiver).await;
        broker.disconnect().await.unwrap();
        let mut again = broker
            .subscribe(subscription("/queue/g", "s", &[]))
            .await
            .unwrap();
        let current = next(&mut again).await;
        assert_ne!(old.connection, current.connection);
        // RabbitMQ reads only subscription and delivery tag from an ack id, so an old id can
        // name a delivery of the new connection: the connection number is what tells them apart.
        let colliding = Delivery {
            ack_id: current.ack_id.clone(),
            ..old
        };
        for settle in [broker.ack(&colliding).await, broker.nack(&colliding).await] {
            assert_eq!(settle, Err(TransportError::stale_delivery()));
        }
        assert_eq!(
            broker.unacked_len("g"),
            1,
            "the current delivery is untouched"
        );
        broker.ack(&current).await.unwrap();
        assert_eq!(broker.unacked_len("g"), 0);
    }

    #[tokio::test]
    async fn unsubscribe_keeps_unacked_deliveries_until_the_connection_closes() {
        let broker = MemoryTransport::new();
        let mut receiver = broker
            .subscribe(subscription("/queue/h", "s", &[]))
            .await
            .unwrap();
        send_ok(&broker, &[message("/queue/h", "held")]).await;
        let delivery = next(&mut receiver).await;
        broker.unsubscribe("s").await.unwrap();
        closes(&mut receiver).await;
        // As with RabbitMQ: no longer ackable, not yet back in the queue.
        let error = broker.ack(&delivery).await.unwrap_err();
        assert_eq!(
            error,
            TransportError::Broker {
                message: "Subscription not found".into(),
                detail: format!(
                    "Message with id \"{}\" has no subscription",
                    delivery.ack_id
                ),
            }
        );
        assert_eq!(broker.queue_len("h"), 0);
        assert_eq!(broker.unacked_len("h"), 1);
        broker.disconnect().await.unwrap();
        assert_eq!(broker.queue_len("h"), 1);
        assert_eq!(broker.queue_messages("h")[0].body, b"held");
        let error = broker.unsubscribe("s").await.unwrap_err();
        assert!(detail(&error).contains("not found"));
    }

    #[tokio::test]
    async fn a_duplicated_subscription_id_is_refused_and_closes_the_connection() {
        let broker = MemoryTransport::new();
        let mut first = broker
            .subscribe(subscription("/queue/d", "same", &[]))
            .await
            .unwrap();
        let error = broker
            .subscribe(subscription("/queue/d", "same", &[]))
            .await
            .unwrap_err();
        assert!(error.is_broker_refusal());
        closes(&mut first).await;
    }

    #[tokio::test]
    async fn a_refused_send_fails_the_rest_of_the_batch_and_closes_the_connection() {
        let broker = MemoryTransport::new();
        let mut receiver = broker
            .subscribe(subscription("/queue/in", "s", &[]))
            .await
            .unwrap();
        send_ok(&broker, &[message("/queue/in", "unacked")]).await;
        let _ = next(&mut receiver).await;
        broker.refuse("/topic/poison");
        let batch = [
            message("/topic/ok", "1"),
            message("/topic/poison.v1", "2"),
            message("/topic/ok", "3"),
        ];
        let report = broker.send(&batch).await;
        assert_eq!(report.receipted(), vec![true, false, false]);
        let failure = report.failure().cloned().unwrap();
        assert_eq!(
            failure,
            TransportError::Broker {
                message: "not_found".into(),
                detail: "NOT_FOUND - no exchange '/topic/poison.v1' in vhost '/'".into(),
            }
        );
        assert_eq!(
            broker.sent(),
            vec![message("/queue/in", "unacked"), batch[0].clone()]
        );
        closes(&mut receiver).await;
        assert_eq!(broker.queue_len("in"), 1, "the unacked delivery went back");
        // The next batch reconnects; refusals stay until cleared.
        let report = broker.send(&batch[2..]).await;
        assert!(report.all_receipted());
        broker.clear_refusals();
        assert!(broker.send(&batch[1..2]).await.all_receipted());
        assert_eq!(broker.send_count(), 4);
    }

    #[tokio::test]
    async fn a_refusal_fails_the_pending_receipts_of_another_batch_on_the_connection() {
        let broker = MemoryTransport::new();
        broker.refuse("/exchange/missing");
        // Receipts come late: the first batch is still waiting for them when the second batch,
        // on the same connection, is refused.
        broker.set_receipt_delay(Duration::from_millis(300));
        let good = [message("/topic/ok", "1"), message("/topic/ok", "2")];
        let poison = [message("/exchange/missing/x", "3")];
        let (first, second) = tokio::join!(broker.send(&good), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            broker.send(&poison).await
        });
        assert_eq!(first.receipted(), vec![false, false], "{first:?}");
        assert!(
            first
                .outcomes
                .iter()
                .all(|o| matches!(o.error(), Some(TransportError::Broker { .. }))),
            "the other batch's receipts fail with the refusal: {first:?}"
        );
        assert_eq!(second.receipted(), vec![false]);
        // The good messages were routed all the same: sending them again duplicates them.
        assert_eq!(broker.sent(), good.to_vec());
    }

    #[tokio::test]
    async fn unknown_exchanges_and_destinations_are_refused() {
        let broker = MemoryTransport::new();
        let report = broker.send(&[message("/exchange/nope/k", "x")]).await;
        assert!(detail(report.failure().unwrap()).starts_with("NOT_FOUND - no exchange 'nope'"));
        let report = broker.send(&[message("/bogus/x", "x")]).await;
        assert!(report.failure().unwrap().is_broker_refusal());
        let mut via_exchange = broker
            .subscribe(subscription(
                "/exchange/amq.topic/k",
                "s",
                &[("x-queue-name", "k_q")],
            ))
            .await
            .unwrap();
        send_ok(&broker, &[message("/topic/k", "x")]).await;
        assert_eq!(next(&mut via_exchange).await.destination, "/topic/k");
    }

    #[tokio::test]
    async fn a_broker_that_is_down_refuses_connections_and_ends_subscriptions() {
        let broker = MemoryTransport::new();
        let mut receiver = broker
            .subscribe(Subscription {
                headers: python_queue_headers("q", "1"),
                ..subscription("/topic/t", "s", &[])
            })
            .await
            .unwrap();
        send_ok(&broker, &[message("/topic/t", "in flight")]).await;
        let delivery = next(&mut receiver).await;
        broker.set_down(true);
        closes(&mut receiver).await;
        let refused = |e: &TransportError| matches!(e, TransportError::Connect { .. });
        assert!(refused(&broker.connect().await.unwrap_err()));
        let report = broker
            .send(&[message("/topic/t", "a"), message("/topic/t", "b")])
            .await;
        assert_eq!(report.receipted(), vec![false, false]);
        assert!(refused(report.failure().unwrap()));
        assert!(refused(
            &broker
                .subscribe(subscription("/topic/t", "s", &[]))
                .await
                .unwrap_err()
        ));
        assert!(matches!(
            broker.ack(&delivery).await,
            Err(TransportError::ConnectionLost(_))
        ));
        assert_eq!(broker.send_count(), 2);
        broker.set_down(false);
        broker.connect().await.unwrap();
        assert_eq!(
            broker.queue_len("q"),
            1,
            "queues survive; the unacked message came back"
        );
        assert_eq!(broker.queue_messages("q")[0].body, b"in flight");
    }

    #[tokio::test]
    async fn clones_share_a_connection_and_new_connections_are_independent() {
        let broker = MemoryTransport::new();
        let clone = broker.clone();
        let other = broker.new_connection();
        let mut mine = broker
            .subscribe(subscription("/queue/c", "s", &[]))
            .await
            .unwrap();
        let mut theirs = other
            .subscribe(subscription("/queue/c2", "s", &[]))
            .await
            .unwrap();
        send_ok(
            &clone,
            &[message("/queue/c", "1"), message("/queue/c2", "2")],
        )
        .await;
        let delivery = next(&mut mine).await;
        let their_delivery = next(&mut theirs).await;
        clone.ack(&delivery).await.unwrap();
        assert!(
            other.ack(&delivery).await.is_err(),
            "acks belong to their connection"
        );
        clone.disconnect().await.unwrap();
        closes(&mut mine).await;
        assert!(other.is_connected());
        other.ack(&their_delivery).await.unwrap();
        assert_eq!(other.sent().len(), 2, "one broker");
    }

    #[tokio::test]
    async fn a_dropped_receiver_holds_its_client_deliveries_until_disconnect() {
        let broker = MemoryTransport::new();
        let receiver = broker
            .subscribe(subscription("/queue/gone", "s", &[]))
            .await
            .unwrap();
        drop(receiver);
        send_ok(&broker, &[message("/queue/gone", "x")]).await;
        assert_eq!(broker.unacked_len("gone"), 1);
        broker.disconnect().await.unwrap();
        assert_eq!(broker.queue_len("gone"), 1);
    }
}
