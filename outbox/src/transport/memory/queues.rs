//! The in-memory broker's queues and their consumers: declaring a queue as RabbitMQ's STOMP
//! plugin does (arguments compared on redeclaration), subscribing, handing messages round-robin
//! within each consumer's prefetch, settling acks and nacks, and dead-lettering.

use std::collections::VecDeque;

use tokio::sync::{mpsc, oneshot};

use super::broker::{
    Broker, Consumer, Declaration, Message, Queue, Target, Unacked, lookup, not_found,
    precondition_failed, target,
};
use crate::transport::{
    AckMode, Delivery, Subscription, SubscriptionEvent, TransportError, UndecodableMessage,
};

/// Why a message marked undecodable did not decode, as the report says.
const UNDECODABLE: &str = "the message does not decode (MemoryTransport::undecodable)";

/// The SUBSCRIBE headers RabbitMQ's STOMP plugin turns into queue arguments (and the broker
/// compares on redeclaration); it drops any other `x-*` header (`x-overflow`, `x-queue-mode`,
/// `x-single-active-consumer`, ...). Those of RabbitMQ 3.10, and the stream arguments of later
/// versions.
pub(super) const QUEUE_ARGUMENTS: &[&str] = &[
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

impl Broker {
    /// Declares a queue, or checks an existing one is declared alike.
    pub(super) fn declare(
        &mut self,
        name: &str,
        declaration: &Declaration,
    ) -> Result<(), TransportError> {
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
                    max_length: None,
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
    pub(super) fn add_consumer(
        &mut self,
        connection: u64,
        subscription: &Subscription,
        inbox: mpsc::UnboundedSender<SubscriptionEvent>,
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
            dead_letters: subscription
                .headers
                .iter()
                .any(|(name, _)| name.starts_with("x-dead-letter-")),
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
    pub(super) fn remove_consumer(&mut self, connection: u64, id: &str, queue: &str) {
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
    pub(super) fn settle(
        &mut self,
        connection: u64,
        ack_id: &str,
    ) -> Result<Unacked, TransportError> {
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
    pub(super) fn dead_letter(&mut self, from_queue: &str, mut message: Message) {
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
    pub(super) fn dispatch(&mut self, queue_name: &str) {
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
            let client = consumer.ack == AckMode::ClientIndividual;
            // What the consumer is handed, and whether the message then awaits its ack. One that
            // does not decode is reported instead, where the subscription dead-letters, and
            // rejected at once (client) or dropped (auto); elsewhere it is never handed over,
            // and waits unacknowledged (client) or is dropped (auto).
            let (event, awaits_ack) = match (message.undecodable, consumer.dead_letters) {
                (false, _) => {
                    let mut delivery = delivery(&id, &message_id, consumer.ack, &message);
                    delivery.connection = generation;
                    (Some(SubscriptionEvent::Delivery(delivery)), client)
                }
                (true, true) => {
                    let report = UndecodableMessage {
                        subscription: id.clone(),
                        queue: queue_name.to_owned(),
                        message_id: Some(message_id.clone()),
                        reason: UNDECODABLE.to_owned(),
                    };
                    (Some(SubscriptionEvent::Undecodable(report)), false)
                }
                (true, false) => (None, client),
            };
            let rejected = message.undecodable && consumer.dead_letters && client;
            let settled = if awaits_ack {
                consumer.in_flight += 1;
                open.unacked.push(Unacked {
                    ack_id: message_id,
                    subscription: id,
                    queue: queue_name.to_owned(),
                    message,
                });
                None
            } else {
                Some(message)
            };
            // A receiver the client dropped loses the delivery (auto) or holds it unacked
            // (client), as a client that stopped reading its socket would.
            if let Some(event) = event {
                let _ = consumer.inbox.send(event);
            }
            if rejected && let Some(message) = settled {
                self.dead_letter(queue_name, message);
            }
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
