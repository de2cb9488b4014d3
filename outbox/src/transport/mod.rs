//! The broker, behind a small trait: send with receipts, subscribe, ack, nack, unsubscribe.
//!
//! Three implementations: [`StompTransport`] (RabbitMQ's STOMP plugin, or any STOMP 1.2 broker),
//! `AmqpTransport` (AMQP 0-9-1 with publisher confirms, the `amqp` feature: unroutable messages
//! are kept rather than dropped) and [`MemoryTransport`] (in-process, for tests and for running
//! without a broker). The relay and the consumer use only this trait, so a service's own tests
//! can run them against memory. [`from_config`] builds the one the settings select.
//!
//! Where each part lives:
//! - this file: the trait and the types every transport shares;
//! - `select.rs`: the one place that reads the configuration for a transport;
//! - `stomp/`: the facade, the connection, the task that drives it, its socket, framing, TLS and
//!   [`StompSettings`];
//! - `amqp/`: the facade, the link (connection and channels), routing and `AmqpSettings`;
//! - `memory/`: the handle, the broker, its queues, the faults a test injects, and its tests.
//!
//! Transport code names no table, producer, consumer, ops or metrics module (a test reads the
//! sources to hold it): what a consumer must record, such as a message that does not decode,
//! reaches it as a [`SubscriptionEvent`].
#[cfg(feature = "amqp")]
mod amqp;
mod memory;
mod select;
mod stomp;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

#[cfg(feature = "amqp")]
pub use amqp::{AmqpSettings, AmqpTransport, CONFIRM_WINDOW};
pub use memory::MemoryTransport;
pub use select::from_config;
pub use stomp::{StompSettings, StompTransport, TlsOptions};

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The STOMP destination (`/topic/orders.v1`, `/queue/x`, `/amq/queue/x`, `/exchange/x/key`).
    pub destination: String,
    /// Headers besides `destination`, `content-length` and `receipt`, in order.
    pub headers: Vec<(String, String)>,
    /// The body, UTF-8 JSON for outbox messages.
    pub body: Vec<u8>,
}

impl Outgoing {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The body decoded from JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// What became of one message handed to [`Transport::send`].
///
/// Three answers, because a broker gives three: it took the message, it refused this very
/// message, or the sender cannot tell. The relay marks a row sent only on [`Outcome::Receipted`],
/// charges a retry only when the row itself is known to be at fault, and gives every other row
/// back unchanged.
///
/// How the transports map onto it:
///
/// | what happened | STOMP ([`StompTransport`]) | AMQP 0-9-1 (publisher confirms) |
/// |---|---|---|
/// | the broker holds the message | RECEIPT | `basic.ack` |
/// | no queue took it | (never said: RECEIPT, and the broker drops it) | [`Outcome::Unroutable`]: `basic.return` (the publish is `mandatory`), then `basic.ack` |
/// | the broker could not take it now (a queue full with `x-overflow: reject-publish`) | RabbitMQ 3.10 closes the connection with no ERROR: `Unknown`, reason [`TransportError::ConnectionLost`], for every message pending on it (and the next connection waits if this goes on: [`TransportError::ReconnectPaused`]) | [`Outcome::Nacked`]: `basic.nack`, that message alone |
/// | the broker refused it, and the refusal names it | (never: an ERROR names no receipt) | a check made before publishing (a passive `exchange.declare` that fails, a destination the STOMP plugin refuses) |
/// | a refusal closed the connection while it was pending | `Unknown`, reason [`TransportError::Broker`], for every message pending on the connection | `channel.close` 404: the same, for every unconfirmed publish |
/// | no answer in time, the connection lost | `Unknown`, reason `ReceiptTimeout` / `ConnectionLost` | the same |
/// | the broker stopped reading (a memory or disk alarm) | `Unknown`, reason [`TransportError::Blocked`] once a write made no progress for the receipt timeout | the same, from `connection.blocked` |
///
/// The relay marks a row sent on `Receipted`, charges a retry on `Refused` (and on a refusal it
/// can pin on one row), keeps an `Unroutable` row waiting on a backoff of its own that spends no
/// retry (`OUTBOX_UNROUTABLE`), keeps a `Nacked` row (and, over STOMP, a row alone on a
/// connection the broker closed without an ERROR) waiting for its destination's next probe,
/// spending no retry, and gives the other `Unknown` rows back with no charge. The enum is `#[non_exhaustive]`: a transport with more to say adds a variant rather
/// than bending one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The broker acknowledged the message: it is stored (a STOMP RECEIPT; with RabbitMQ, only
    /// after its publisher confirm).
    Receipted,
    /// The broker refused this very message, and said why. The transport reports it only when
    /// the refusal can be pinned on this message.
    Refused(TransportError),
    /// Whether the broker took the message is not known: it may have been routed (and will be
    /// duplicated if sent again) or not.
    Unknown(Unknown),
    /// The broker took the message but no queue did: nothing is bound to its exchange and
    /// routing key (an AMQP `basic.return` of a `mandatory` publish). Not delivered to anyone;
    /// sending it again once a queue is bound delivers it. The text is the broker's reply
    /// (`312 NO_ROUTE`).
    Unroutable(String),
    /// The broker could not take the message now (an AMQP `basic.nack`: an internal error, or
    /// a queue full with `x-overflow: reject-publish`). Back-pressure, nobody's fault: not
    /// stored, safe to send again later.
    Nacked,
}

/// The detail of an [`Outcome::Unknown`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unknown {
    /// Why no acknowledgement came. [`TransportError::Broker`]: the broker refused a frame and
    /// closed the connection while this message was pending, so this message or another one
    /// pending on the same connection is at fault. [`TransportError::ReceiptTimeout`],
    /// [`TransportError::Blocked`] or
    /// [`TransportError::ConnectionLost`]: the link or the broker, or a message the broker
    /// silently discards. [`TransportError::Connect`]: the message was never written.
    pub reason: TransportError,
    /// Whether a message written after this one on the same connection was acknowledged while
    /// this one was not. RabbitMQ handles a connection's frames in order, so then the broker
    /// was alive and reading, and passed this message over: it, not the broker, is at fault.
    /// `false` when the connection was slow, blocked or gone for everything after it.
    pub overtaken: bool,
}

impl Outcome {
    /// An unknown outcome for `reason`, not overtaken.
    pub fn unknown(reason: TransportError) -> Outcome {
        Outcome::Unknown(Unknown {
            reason,
            overtaken: false,
        })
    }

    /// Whether the broker acknowledged the message.
    pub fn is_receipted(&self) -> bool {
        matches!(self, Outcome::Receipted)
    }

    /// Why the message was not acknowledged, if it was not.
    pub fn error(&self) -> Option<&TransportError> {
        match self {
            Outcome::Receipted => None,
            Outcome::Refused(reason) => Some(reason),
            Outcome::Unknown(unknown) => Some(&unknown.reason),
            Outcome::Unroutable(_) | Outcome::Nacked => None,
        }
    }
}

/// What became of a batch handed to [`Transport::send`]: one [`Outcome`] per message, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReport {
    /// One outcome per message, in the order they were given.
    pub outcomes: Vec<Outcome>,
}

impl SendReport {
    /// A report where every one of `count` messages failed for the same `reason` before it was
    /// written (no connection).
    pub fn unsent(count: usize, reason: TransportError) -> SendReport {
        SendReport {
            outcomes: vec![Outcome::unknown(reason); count],
        }
    }

    /// Whether every message was receipted.
    pub fn all_receipted(&self) -> bool {
        self.outcomes.iter().all(Outcome::is_receipted)
    }

    /// One flag per message, in order: whether the broker receipted it. Only a receipted
    /// message is known to be stored by the broker.
    pub fn receipted(&self) -> Vec<bool> {
        self.outcomes.iter().map(Outcome::is_receipted).collect()
    }

    /// The first reason a message was not receipted, if one was not (an unroutable or nacked
    /// message has no [`TransportError`]: see [`Outcome`]).
    pub fn failure(&self) -> Option<&TransportError> {
        self.outcomes.iter().find_map(Outcome::error)
    }
}

/// How a subscription acknowledges messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// The broker considers a message delivered once sent.
    Auto,
    /// Each message is acknowledged on its own (`client-individual`).
    ClientIndividual,
}

/// A subscription to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The destination to consume from.
    pub destination: String,
    /// The subscription id, unique on the connection.
    pub id: String,
    /// The acknowledgement mode.
    pub ack: AckMode,
    /// Further SUBSCRIBE headers: RabbitMQ declares queues from them (`durable`, `x-queue-name`,
    /// `x-dead-letter-routing-key`, `prefetch-count`, ...).
    pub headers: Vec<(String, String)>,
}

/// A message received on a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The id of the subscription it came through.
    pub subscription: String,
    /// The destination it was sent to.
    pub destination: String,
    /// The broker's id of this delivery (changes on redelivery).
    pub message_id: String,
    /// The value an ACK or NACK of it carries.
    pub ack_id: String,
    /// Every header, unescaped, as the broker sent them.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// The transport connection it arrived on (a number the transport gives each connection it
    /// opens). RabbitMQ reads only the subscription and the delivery tag of an ACK's id, so an
    /// id from an earlier connection may name another message on the current one: [`Transport::ack`]
    /// and [`Transport::nack`] refuse a delivery of an earlier connection.
    pub connection: u64,
}

impl Delivery {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// What a subscription hands its reader, in the order the broker sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscriptionEvent {
    /// A message.
    Delivery(Delivery),
    /// A message the transport could not decode, already rejected: a consumer records it, there
    /// is nothing to acknowledge.
    Undecodable(UndecodableMessage),
}

impl SubscriptionEvent {
    /// The id of the subscription it came through.
    pub fn subscription(&self) -> &str {
        match self {
            SubscriptionEvent::Delivery(delivery) => &delivery.subscription,
            SubscriptionEvent::Undecodable(message) => &message.subscription,
        }
    }
}

/// A message that came to a consumer's subscription (one that declares a dead-letter route) but
/// did not decode, or exceeded the maximum frame size. The transport has rejected it to the
/// dead-letter queue (a NACK with `requeue:false`), or dropped it under automatic
/// acknowledgement, without handing it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndecodableMessage {
    /// The id of the subscription it came through.
    pub subscription: String,
    /// The queue the subscription reads (`x-queue-name`, else the destination's last `/`
    /// segment).
    pub queue: String,
    /// The broker's id of the delivery, when it could be read.
    pub message_id: Option<String>,
    /// Why it did not decode.
    pub reason: String,
}

/// The receiving end of a subscription: its deliveries, and the transport's reports of
/// messages it could not decode. Ends when the connection is lost (subscribe again after
/// reconnecting).
#[derive(Debug)]
pub struct Deliveries {
    events: mpsc::Receiver<SubscriptionEvent>,
}

impl Deliveries {
    /// The receiving end of `events`, for an implementation of [`Transport::subscribe`].
    pub fn new(events: mpsc::Receiver<SubscriptionEvent>) -> Deliveries {
        Deliveries { events }
    }

    /// The next delivery, passing over reports of undecodable messages; `None` once the
    /// subscription ended. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Delivery> {
        loop {
            match self.events.recv().await? {
                SubscriptionEvent::Delivery(delivery) => return Some(delivery),
                SubscriptionEvent::Undecodable(_) => {}
            }
        }
    }

    /// The next delivery waiting now, passing over reports of undecodable messages; an error
    /// when none waits ([`TryRecvError::Empty`]) or the subscription ended
    /// ([`TryRecvError::Disconnected`]).
    pub fn try_recv(&mut self) -> Result<Delivery, TryRecvError> {
        loop {
            match self.events.try_recv()? {
                SubscriptionEvent::Delivery(delivery) => return Ok(delivery),
                SubscriptionEvent::Undecodable(_) => {}
            }
        }
    }

    /// The next event, deliveries and reports alike; `None` once the subscription ended.
    /// Cancel-safe.
    pub async fn next_event(&mut self) -> Option<SubscriptionEvent> {
        self.events.recv().await
    }
}

/// Errors of a transport. They never contain a passcode or a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// No configured broker address could be reached.
    #[error("cannot connect to the broker at {addresses}: {reason}")]
    Connect {
        /// The addresses tried.
        addresses: String,
        /// Why the last one failed.
        reason: String,
    },
    /// The broker refused the CONNECT (wrong login or passcode, unknown vhost).
    #[error("the broker at {address} refused the connection: {message}")]
    Refused {
        /// The broker's address.
        address: String,
        /// The broker's ERROR message.
        message: String,
    },
    /// The TLS configuration could not be used.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The broker answered a frame with an ERROR (and, for RabbitMQ, closed the connection).
    #[error("the broker sent an ERROR: {message}: {detail}")]
    Broker {
        /// The ERROR frame's `message` header.
        message: String,
        /// Its body.
        detail: String,
    },
    /// The connection dropped, or stalled past the heartbeat allowance.
    #[error("the connection to the broker was lost: {0}")]
    ConnectionLost(String),
    /// Receipts did not come back in time.
    #[error("no receipt from the broker within {0:?}")]
    ReceiptTimeout(Duration),
    /// The broker stopped reading the connection for this long, and the transport gave up on
    /// it. RabbitMQ blocks publishing connections during a memory or disk alarm: nobody's
    /// fault, and it passes when the alarm clears.
    #[error(
        "the broker read nothing from this connection for {0:?} (RabbitMQ blocks publishing connections during a memory or disk alarm)"
    )]
    Blocked(Duration),
    /// The transport waits before opening another connection: the broker closed the last ones
    /// soon after login, with receipts outstanding and no ERROR (RabbitMQ's STOMP plugin does so
    /// when a queue with `x-overflow: reject-publish` is full). Nothing was written; try again
    /// after this pause.
    #[error(
        "the broker closed the last connection soon after login with receipts outstanding; the next connection opens in {0:?}"
    )]
    ReconnectPaused(Duration),
    /// The transport was closed.
    #[error("the transport is closed")]
    Closed,
    /// The broker returned a message that no queue took, and it cannot be pinned on one
    /// message of its batch: several messages sent together were identical (the same route,
    /// message id and body) and only some came back, or the return matches none of them.
    /// Whether each of them was routed is not known.
    #[error(
        "the broker returned a message ({route}) that cannot be pinned on one message of its batch"
    )]
    ReturnNotPinned {
        /// The exchange and routing key of the returned message.
        route: String,
    },
}

impl TransportError {
    /// The error for an ack or nack of a delivery that came on an earlier connection.
    pub(crate) fn stale_delivery() -> TransportError {
        TransportError::ConnectionLost("delivery from an earlier connection".to_owned())
    }

    /// Whether the broker itself refused a frame (as opposed to the connection failing):
    /// a sign that a message, not the network, is at fault.
    pub fn is_broker_refusal(&self) -> bool {
        matches!(self, TransportError::Broker { .. })
    }

    /// How long the transport asks to be left alone before the next attempt
    /// ([`TransportError::ReconnectPaused`]), if it does.
    pub fn retry_in(&self) -> Option<Duration> {
        match self {
            TransportError::ReconnectPaused(wait) => Some(*wait),
            _ => None,
        }
    }

    /// Whether the broker was reachable but did not keep up (a receipt timeout, or a connection
    /// it stopped reading): worth trying again soon, on a short pause rather than the
    /// reconnection backoff, since nothing is wrong with the link.
    pub fn is_slow_broker(&self) -> bool {
        matches!(
            self,
            TransportError::ReceiptTimeout(_) | TransportError::Blocked(_)
        )
    }
}

/// AMQP topic matching of a routing key against a binding key: `*` is one dot-separated word,
/// `#` zero or more (the memory broker routes with it; `outbox declare` finds the destinations a
/// binding serves with it).
pub(crate) fn topic_matches(binding: &str, routing_key: &str) -> bool {
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

/// The queue argument of RabbitMQ's single active consumer, as a SUBSCRIBE header
/// ([`Transport::declares_single_active_consumer`]).
pub(crate) const SINGLE_ACTIVE_CONSUMER: &str = "x-single-active-consumer";

/// A broker connection: what the relay and the consumer need from a broker.
///
/// Implementations reconnect lazily: after a failure the next call opens a new connection
/// (failing over across their addresses); retry pacing (backoff) is the caller's.
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    /// Opens a connection unless one is open.
    async fn connect(&self) -> Result<(), TransportError>;

    /// Sends the messages pipelined, each with a receipt request, and waits for the receipts
    /// (bounded by the transport's receipt timeout). Connects first if needed. Several calls
    /// may be in flight at once on one connection; a refusal that closes the connection fails
    /// the messages of every call pending on it ([`Outcome::Unknown`]).
    async fn send(&self, messages: &[Outgoing]) -> SendReport;

    /// Opens a subscription; its deliveries arrive on the receiver, which ends when the
    /// connection is lost (subscribe again after reconnecting). A subscription that declares a
    /// dead-letter route also receives [`SubscriptionEvent::Undecodable`] for each message the
    /// transport could not decode and rejected.
    async fn subscribe(&self, subscription: Subscription) -> Result<Deliveries, TransportError>;

    /// Closes a subscription (UNSUBSCRIBE carries only the id: with RabbitMQ, queue headers
    /// there would delete a durable queue).
    async fn unsubscribe(&self, id: &str) -> Result<(), TransportError>;

    /// Acknowledges a delivery. A delivery of an earlier connection is refused with
    /// [`TransportError::ConnectionLost`]: the broker has already put it back in its queue.
    async fn ack(&self, delivery: &Delivery) -> Result<(), TransportError>;

    /// Rejects a delivery without requeueing it: the broker dead-letters it where the queue has
    /// a dead-letter route. A delivery of an earlier connection is refused as by [`Transport::ack`].
    async fn nack(&self, delivery: &Delivery) -> Result<(), TransportError>;

    /// Closes the connection politely (DISCONNECT with a receipt).
    async fn disconnect(&self) -> Result<(), TransportError>;

    /// Whether a subscription's `x-single-active-consumer: true` header declares its queue with
    /// RabbitMQ's single active consumer. False by default, as over STOMP: RabbitMQ's STOMP
    /// plugin drops that header, so a consumer that asks for it is refused at build.
    fn declares_single_active_consumer(&self) -> bool {
        false
    }
}
