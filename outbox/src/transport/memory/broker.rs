//! The in-memory broker's state and its publishing side: queues, `amq.topic` bindings and
//! client connections with their subscriptions, unacknowledged deliveries and pending receipts;
//! opening and closing connections, reading SENDs (or leaving them unread while publishers are
//! blocked), routing them as RabbitMQ's STOMP plugin does, and receipting them. The queues'
//! consumer side is in [`super::queues`].

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::transport::{AckMode, Delivery, Outgoing, SubscriptionEvent, TransportError};

/// What [`TransportError::Connect`] names as the address.
pub(super) const ADDRESS: &str = "memory";

/// Headers the broker sets on a MESSAGE itself; a SEND's own values for them are not passed on.
pub(super) const BROKER_HEADERS: &[&str] = &[
    "destination",
    "content-length",
    "receipt",
    "subscription",
    "message-id",
    "redelivered",
    "ack",
];
#[derive(Default)]
pub(super) struct Broker {
    pub(super) queues: BTreeMap<String, Queue>,
    /// `amq.topic` bindings: (binding key, queue).
    pub(super) bindings: Vec<(String, String)>,
    /// Open client connections.
    pub(super) connections: HashMap<u64, Connection>,
    /// Handed out by `new_connection` (0 belongs to the first handle).
    pub(super) last_connection: u64,
    /// Numbers deliveries (and temporary queues) across the broker.
    pub(super) last_tag: u64,
    pub(super) down: bool,
    pub(super) refused: Vec<String>,
    /// Destination prefixes whose SENDs are dropped without a receipt or an error.
    pub(super) discarded: Vec<String>,
    /// Destination prefixes whose messages reach consumers as ones that do not decode.
    pub(super) undecodable: Vec<String>,
    /// Publishers are blocked: frames wait on their connection, unread.
    pub(super) blocked: bool,
    /// Publishes are `mandatory` (AMQP): a message no queue takes is returned, not receipted.
    pub(super) mandatory: bool,
    /// How long after routing a message its receipt comes.
    pub(super) receipt_delay: Duration,
    /// How long `send` waits for receipts; `None`: [`RECEIPT_TIMEOUT`](super::RECEIPT_TIMEOUT).
    pub(super) receipt_timeout: Option<Duration>,
    pub(super) sent: Vec<Outgoing>,
    pub(super) send_calls: usize,
    pub(super) connects: usize,
}

#[derive(Default)]
pub(super) struct Connection {
    /// Which connection of the broker this is, counting every open ([`Delivery::connection`]):
    /// a handle that reconnects gets a new one.
    pub(super) generation: u64,
    pub(super) subscriptions: HashMap<String, Consumer>,
    /// Client-acknowledged deliveries not yet acked or nacked, oldest first, including those of
    /// subscriptions closed since.
    pub(super) unacked: Vec<Unacked>,
    /// Numbers the SENDs of this connection, in the order they were written.
    pub(super) last_frame: u64,
    /// SENDs awaiting their receipt, by number.
    pub(super) pending: BTreeMap<u64, Waiter>,
    /// SENDs written while the broker blocked publishers, not yet read.
    pub(super) unread: VecDeque<(u64, Outgoing)>,
    /// The highest number receipted.
    pub(super) last_receipted: u64,
}

/// Answers a SEND: what the broker confirms, or why it is not receipted.
pub(super) type Waiter = oneshot::Sender<Result<Answer, TransportError>>;

/// What the broker confirms of a SEND it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// Receipted (routed to a queue, or dropped where nothing is bound and publishes are not
    /// mandatory).
    Receipted,
    /// Returned: no queue took it (mandatory publishes).
    Returned,
    /// Nacked: a queue full with `reject-publish` refused it (mandatory publishes, as AMQP).
    Nacked,
}

/// Where a published message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Routing {
    /// At least one queue took it, and none refused it.
    Routed,
    /// No queue is bound to its destination.
    Unroutable,
    /// A queue full with `x-overflow: reject-publish` refused it (others may have taken it).
    Rejected,
}

pub(super) struct Consumer {
    pub(super) queue: String,
    pub(super) ack: AckMode,
    pub(super) prefetch: Option<usize>,
    /// Unacked deliveries of this subscription.
    pub(super) in_flight: usize,
    /// It declares a dead-letter route (`x-dead-letter-*`), as a consumer's subscription does:
    /// only then is a message that does not decode rejected and reported.
    pub(super) dead_letters: bool,
    pub(super) inbox: mpsc::UnboundedSender<SubscriptionEvent>,
    /// Dropped with the consumer: stops its forwarding task at once.
    pub(super) _closed: oneshot::Sender<()>,
}

impl Consumer {
    pub(super) fn has_room(&self) -> bool {
        match (self.ack, self.prefetch) {
            (AckMode::ClientIndividual, Some(prefetch)) => self.in_flight < prefetch,
            _ => true,
        }
    }
}

pub(super) struct Unacked {
    pub(super) ack_id: String,
    pub(super) subscription: String,
    pub(super) queue: String,
    pub(super) message: Message,
}

pub(super) struct Queue {
    pub(super) durable: bool,
    pub(super) auto_delete: bool,
    /// The `x-*` arguments of its first declaration, sorted by name.
    pub(super) arguments: Vec<(String, String)>,
    pub(super) ready: VecDeque<Message>,
    /// (connection, subscription id), in subscription order: deliveries go round-robin.
    pub(super) consumers: Vec<(u64, String)>,
    pub(super) next_consumer: usize,
    /// The most ready messages it holds; a publish beyond is refused (`x-max-length` with
    /// `x-overflow: reject-publish`, [`MemoryTransport::limit_queue`](super::MemoryTransport::limit_queue)).
    pub(super) max_length: Option<usize>,
}

/// A message as stored in a queue: where it was published (which gives the `destination` a
/// consumer sees) and what it carries.
#[derive(Clone)]
pub(super) struct Message {
    pub(super) exchange: String,
    pub(super) routing_key: String,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
    pub(super) redelivered: bool,
    /// It reaches consumers as a message that does not decode
    /// ([`MemoryTransport::undecodable`](super::MemoryTransport::undecodable)).
    pub(super) undecodable: bool,
}

impl Message {
    /// The destination RabbitMQ shows on delivery, rebuilt from exchange and routing key.
    pub(super) fn destination(&self) -> String {
        match self.exchange.as_str() {
            "" => format!("/queue/{}", self.routing_key),
            "amq.topic" => format!("/topic/{}", self.routing_key),
            exchange => format!("/exchange/{exchange}/{}", self.routing_key),
        }
    }
}

/// Where a destination leads.
pub(super) enum Target {
    /// `amq.topic` with this routing key.
    Topic(String),
    /// A queue; `declare`: the destination declares it (`/queue/`, bare) rather than needing it
    /// to exist (`/amq/queue/`).
    Queue { name: String, declare: bool },
}

/// How a queue is (re)declared.
pub(super) struct Declaration {
    pub(super) durable: bool,
    pub(super) auto_delete: bool,
    pub(super) arguments: Vec<(String, String)>,
}

impl Broker {
    /// Opens the connection unless open.
    pub(super) fn open_connection(&mut self, connection: u64) -> Result<(), TransportError> {
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
    pub(super) fn usable(&mut self, connection: u64) -> Result<(), TransportError> {
        if self.down {
            return Err(TransportError::ConnectionLost(
                "the in-memory broker is down".to_owned(),
            ));
        }
        self.open_connection(connection)
    }

    /// For ack and nack: [`Broker::usable`], and `delivery` came on this very connection.
    pub(super) fn usable_for(
        &mut self,
        connection: u64,
        delivery: &Delivery,
    ) -> Result<(), TransportError> {
        self.usable(connection)?;
        match self.connections.get(&connection) {
            Some(open) if open.generation == delivery.connection => Ok(()),
            _ => Err(TransportError::stale_delivery()),
        }
    }

    /// Reads SEND `number` of `connection`: routes it and receipts it (at once, or after the
    /// receipt delay), drops it silently, or refuses it and closes the connection, failing
    /// every receipt pending on it.
    pub(super) fn read(
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
            Ok(Routing::Routed) => Answer::Receipted,
            Ok(Routing::Unroutable) if self.mandatory => Answer::Returned,
            Ok(Routing::Unroutable) => Answer::Receipted,
            Ok(Routing::Rejected) if self.mandatory => Answer::Nacked,
            Ok(Routing::Rejected) => {
                // RabbitMQ 3.10's STOMP plugin has no handler for the publisher nack: the
                // connection ends, with no ERROR and no receipt for what was pending.
                tracing::debug!(destination = %message.destination, "memory broker rejected a SEND (reject-publish); connection closed");
                let error = lost();
                self.close_connection_for(connection, error.clone());
                return Some(error);
            }
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
    pub(super) fn receipt(&mut self, connection: u64, number: u64, routed: Answer) {
        if let Some(open) = self.connections.get_mut(&connection)
            && let Some(waiter) = open.pending.remove(&number)
        {
            open.last_receipted = open.last_receipted.max(number);
            let _ = waiter.send(Ok(routed));
        }
    }

    /// Reads the frames that waited while publishers were blocked.
    pub(super) fn read_unread(&mut self, handle: &Arc<Mutex<Broker>>, connection: u64) {
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
    pub(super) fn close_connection_for(&mut self, connection: u64, why: TransportError) {
        if let Some(open) = self.connections.get_mut(&connection) {
            for (_, waiter) in std::mem::take(&mut open.pending) {
                let _ = waiter.send(Err(why.clone()));
            }
        }
        self.close_connection(connection);
    }

    /// Closes a connection: its subscriptions end, its unacked deliveries go back to the
    /// front of their queues, marked redelivered, and its pending receipts fail.
    pub(super) fn close_connection(&mut self, connection: u64) {
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

    /// Routes one SEND: where it went; an error is one RabbitMQ would close the connection
    /// with.
    pub(super) fn publish(&mut self, outgoing: &Outgoing) -> Result<Routing, TransportError> {
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
        let undecodable = self
            .undecodable
            .iter()
            .any(|prefix| outgoing.destination.starts_with(prefix.as_str()));
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
                    undecodable,
                };
                let routing = self.route_topic(message);
                if routing != Routing::Rejected {
                    self.sent.push(outgoing.clone());
                }
                Ok(routing)
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
                    undecodable,
                };
                let routing = self.enqueue(&name, message);
                if routing != Routing::Rejected {
                    self.sent.push(outgoing.clone());
                }
                Ok(routing)
            }
        }
    }

    /// Copies a message into every queue bound to a matching key (none: it is dropped); a
    /// full queue with `reject-publish` refuses its copy, and the message is then rejected, as
    /// RabbitMQ nacks a publish one of its queues refused.
    pub(super) fn route_topic(&mut self, message: Message) -> Routing {
        let mut queues: Vec<String> = self
            .bindings
            .iter()
            .filter(|(key, _)| topic_matches(key, &message.routing_key))
            .map(|(_, queue)| queue.clone())
            .collect();
        queues.sort();
        queues.dedup();
        let mut routing = if queues.is_empty() {
            Routing::Unroutable
        } else {
            Routing::Routed
        };
        for queue in queues {
            if self.enqueue(&queue, message.clone()) == Routing::Rejected {
                routing = Routing::Rejected;
            }
        }
        routing
    }

    /// Appends to a queue if it exists (the default exchange drops what has no queue) and has
    /// room: a queue at its length limit refuses it (`x-overflow: reject-publish`).
    pub(super) fn enqueue(&mut self, queue: &str, message: Message) -> Routing {
        let Some(q) = self.queues.get_mut(queue) else {
            return Routing::Unroutable;
        };
        if q.max_length.is_some_and(|max| q.ready.len() >= max) {
            return Routing::Rejected;
        }
        q.ready.push_back(message);
        self.dispatch(queue);
        Routing::Routed
    }
}

/// Parses a destination as RabbitMQ's STOMP plugin does (the exchanges it knows: `amq.topic`).
pub(super) fn target(destination: &str) -> Result<Target, TransportError> {
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
pub(super) fn exchange_name(destination: &str) -> &str {
    if let Some(rest) = destination.strip_prefix("/exchange/") {
        return rest.split('/').next().unwrap_or(rest);
    }
    destination
}

/// AMQP topic matching: `*` is one dot-separated word, `#` zero or more.
pub(super) fn topic_matches(binding: &str, routing_key: &str) -> bool {
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

pub(super) fn lookup<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

pub(super) fn lost() -> TransportError {
    TransportError::ConnectionLost("the in-memory broker closed the connection".to_owned())
}

pub(super) fn down() -> TransportError {
    TransportError::Connect {
        addresses: ADDRESS.to_owned(),
        reason: "the in-memory broker is down".to_owned(),
    }
}

pub(super) fn not_found(what: String) -> TransportError {
    TransportError::Broker {
        message: "not_found".to_owned(),
        detail: format!("NOT_FOUND - {what}"),
    }
}

pub(super) fn precondition_failed(what: String) -> TransportError {
    TransportError::Broker {
        message: "precondition_failed".to_owned(),
        detail: format!("PRECONDITION_FAILED - {what}"),
    }
}

pub(super) fn unknown_destination(destination: &str) -> TransportError {
    TransportError::Broker {
        message: "Unknown destination".to_owned(),
        detail: format!("'{destination}' is not a valid destination."),
    }
}
