//! The queues a consumer reads, declared exactly as django-outbox-pattern declares them, so that
//! Python consumers and ours can share them: RabbitMQ refuses (PRECONDITION_FAILED) to redeclare a
//! queue with other arguments.
//!
//! RabbitMQ's STOMP plugin declares a queue from the headers of a SUBSCRIBE. For destination
//! `/topic/orders.v1` and queue `orders.v1` that is two subscriptions: `DLQ.orders.v1` (the
//! dead-letter queue, bare name, dead-lettering itself to `DLQ.DLQ.DLQ.orders.v1` as the Python
//! library does) and the main queue, dead-lettering to `DLQ.orders.v1` through the default
//! exchange. Both carry `durable`, `auto-delete`, `prefetch-count` (settings), `exclusive`
//! (spelled `True`/`False`, as Python prints a bool), `x-queue-name` and the `x-dead-letter-*`
//! arguments.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::config::OutboxConfig;
use crate::error::Error;
use crate::transport::{AckMode, SINGLE_ACTIVE_CONSUMER, Subscription, Transport, TransportError};

/// The prefix of a queue's dead-letter queue.
const DEAD_LETTER_PREFIX: &str = "DLQ.";

/// AMQP's limit on a queue name, in bytes.
const MAX_QUEUE_NAME: usize = 255;

/// A consumer's destination, queue and dead-letter queue, and the SUBSCRIBE headers that declare
/// them.
///
/// ```
/// let topology = outbox::consumer::Topology::new(&outbox::OutboxConfig::default(), "/topic/orders.v1", None)?;
/// assert_eq!(topology.queue(), "orders.v1");
/// assert_eq!(topology.dead_letter_queue(), "DLQ.orders.v1");
/// # Ok::<(), outbox::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    destination: String,
    queue: String,
    /// Headers both declarations share: the settings' queue headers and `exclusive`.
    shared: BTreeMap<String, String>,
    /// Whether the main queue is declared with `x-single-active-consumer` (never its
    /// dead-letter queue).
    single_active_consumer: bool,
}

impl Topology {
    /// The topology of a consumer of `destination` with the settings' queue headers and
    /// exclusivity. `queue` defaults to the destination's last `/` segment.
    pub fn new(
        config: &OutboxConfig,
        destination: &str,
        queue: Option<&str>,
    ) -> Result<Topology, Error> {
        Topology::with_headers(
            destination,
            queue,
            config.stomp_queue_headers.clone(),
            config.exclusive_queue,
        )
    }

    /// As [`Topology::new`], with the queue headers given (`durable`, `auto-delete`,
    /// `prefetch-count`, and any other RabbitMQ queue argument).
    pub(crate) fn with_headers(
        destination: &str,
        queue: Option<&str>,
        mut shared: BTreeMap<String, String>,
        exclusive: bool,
    ) -> Result<Topology, Error> {
        let invalid = |variable: &str, value: &str, reason: &str| Error::Config {
            variable: variable.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        if destination.trim().is_empty() {
            return Err(invalid(
                "destination",
                destination,
                "a consumer needs a destination",
            ));
        }
        let queue = match queue {
            Some(queue) => queue.to_owned(),
            None => destination
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned(),
        };
        if queue.trim().is_empty() {
            return Err(invalid(
                "queue",
                &queue,
                "empty queue name (name it, or give a destination whose last `/` segment is not empty)",
            ));
        }
        if DEAD_LETTER_PREFIX.len() + queue.len() > MAX_QUEUE_NAME {
            return Err(invalid(
                "queue",
                &queue,
                "too long: RabbitMQ names hold 255 bytes, and the dead-letter queue adds `DLQ.`",
            ));
        }
        let single_active_consumer = match shared.remove(SINGLE_ACTIVE_CONSUMER) {
            None => false,
            Some(value) => match value.trim() {
                "true" | "True" => true,
                "false" | "False" => false,
                other => {
                    return Err(invalid(
                        SINGLE_ACTIVE_CONSUMER,
                        other,
                        "a queue argument that is `true` or `false`",
                    ));
                }
            },
        };
        // Python's str() of a bool: the value RabbitMQ saw when the Python library declared it.
        let exclusive = if exclusive { "True" } else { "False" };
        shared.insert("exclusive".to_owned(), exclusive.to_owned());
        shared.insert("x-dead-letter-exchange".to_owned(), String::new());
        Ok(Topology {
            destination: destination.to_owned(),
            queue,
            shared,
            single_active_consumer,
        })
    }

    /// Declares the main queue with RabbitMQ's single active consumer
    /// (`x-single-active-consumer`): of the consumers of the queue, the broker delivers to one
    /// at a time, and to the next when it goes away. The dead-letter queue is declared without.
    ///
    /// It needs the AMQP transport: [`Topology::declare`] refuses it over STOMP, whose RabbitMQ
    /// plugin drops the argument.
    #[must_use]
    pub fn with_single_active_consumer(mut self, on: bool) -> Topology {
        self.single_active_consumer = on;
        self
    }

    /// Whether the main queue is declared with RabbitMQ's single active consumer.
    pub fn single_active_consumer(&self) -> bool {
        self.single_active_consumer
    }

    /// Refuses a single active consumer over a transport that cannot declare it: RabbitMQ's
    /// STOMP plugin drops the argument from a SUBSCRIBE and declares the queue without it.
    pub(crate) fn check_transport(&self, transport: &dyn Transport) -> Result<(), Error> {
        if self.single_active_consumer && !transport.declares_single_active_consumer() {
            return Err(Error::Config {
                variable: SINGLE_ACTIVE_CONSUMER.to_owned(),
                value: "true".to_owned(),
                reason: "this transport cannot declare it: RabbitMQ's STOMP plugin drops the \
                         argument from a SUBSCRIBE, and a STOMP consumer cannot subscribe to a \
                         queue declared with it (406 inequivalent arg); use the AMQP transport \
                         (OUTBOX_BROKER_URL)"
                    .to_owned(),
            });
        }
        Ok(())
    }

    /// The destination consumed.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// The queue the consumer reads.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// `DLQ.<queue>`, where RabbitMQ moves the messages the consumer rejects.
    pub fn dead_letter_queue(&self) -> String {
        format!("{DEAD_LETTER_PREFIX}{}", self.queue)
    }

    /// Whether the queues are exclusive to the declaring connection (deleted when it closes).
    pub fn exclusive(&self) -> bool {
        self.shared.get("exclusive").map(String::as_str) == Some("True")
    }

    /// The subscription that declares the main queue and consumes it.
    pub fn subscription(&self, id: &str) -> Subscription {
        let mut subscription = self.declaring(
            &self.destination,
            id,
            &self.queue,
            &self.dead_letter_queue(),
        );
        if self.single_active_consumer {
            subscription
                .headers
                .push((SINGLE_ACTIVE_CONSUMER.to_owned(), "true".to_owned()));
        }
        subscription
    }

    /// The subscription that declares the dead-letter queue (subscribed, then unsubscribed).
    /// Its own dead-letter key is the Python library's: the prefix applied to an already
    /// prefixed name, twice.
    pub fn dead_letter_subscription(&self, id: &str) -> Subscription {
        let queue = self.dead_letter_queue();
        let its_dead_letters = format!("{DEAD_LETTER_PREFIX}{DEAD_LETTER_PREFIX}{queue}");
        self.declaring(&queue, id, &queue, &its_dead_letters)
    }

    fn declaring(
        &self,
        destination: &str,
        id: &str,
        queue: &str,
        dead_letter_key: &str,
    ) -> Subscription {
        let mut headers = self.shared.clone();
        headers.insert("x-queue-name".to_owned(), queue.to_owned());
        headers.insert(
            "x-dead-letter-routing-key".to_owned(),
            dead_letter_key.to_owned(),
        );
        Subscription {
            destination: destination.to_owned(),
            id: id.to_owned(),
            // Never `client`: RabbitMQ makes it cumulative, one ACK settling every earlier
            // delivery of the subscription.
            ack: AckMode::ClientIndividual,
            headers: headers.into_iter().collect(),
        }
    }

    /// Declares the dead-letter queue: SUBSCRIBE, then UNSUBSCRIBE (with its id only: queue
    /// headers on an UNSUBSCRIBE make RabbitMQ delete the queue).
    pub(crate) async fn declare_dead_letter_queue(
        &self,
        transport: &dyn Transport,
    ) -> Result<(), TransportError> {
        let id = Uuid::new_v4().to_string();
        transport
            .subscribe(self.dead_letter_subscription(&id))
            .await?;
        transport.unsubscribe(&id).await
    }

    /// Declares both queues without consuming, for deploy scripts: messages sent to a topic
    /// before its queue exists are dropped by the broker. Ends with a DISCONNECT: a message the
    /// broker hands a declaring subscription stays unacknowledged on its connection until the
    /// connection closes, which puts it back in its queue.
    pub async fn declare(&self, transport: &dyn Transport) -> Result<(), Error> {
        self.check_transport(transport)?;
        transport.connect().await?;
        self.declare_dead_letter_queue(transport).await?;
        let id = Uuid::new_v4().to_string();
        transport.subscribe(self.subscription(&id)).await?;
        transport.unsubscribe(&id).await?;
        transport.disconnect().await?;
        tracing::info!(
            destination = %self.destination,
            queue = %self.queue,
            dead_letter_queue = %self.dead_letter_queue(),
            "queues declared"
        );
        Ok(())
    }
}

/// Declares the queues a consumer of `destination` reads (`queue` defaults to the destination's
/// last `/` segment) and its dead-letter queue, exactly as the consumer and django-outbox-pattern
/// declare them, without consuming: run it from a deploy script before the first message is
/// sent, so that nothing published to a topic is dropped for want of a queue.
///
/// ```no_run
/// # async fn demo() -> Result<(), outbox::Error> {
/// let config = outbox::OutboxConfig::from_env()?;
/// let broker = outbox::transport::StompTransport::new(
///     outbox::transport::StompSettings::from(&config),
/// )?;
/// outbox::consumer::declare(&broker, &config, "/topic/orders.v1", None).await?;
/// # Ok(()) }
/// ```
pub async fn declare(
    transport: &dyn Transport,
    config: &OutboxConfig,
    destination: &str,
    queue: Option<&str>,
) -> Result<(), Error> {
    Topology::new(config, destination, queue)?
        .declare(transport)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(subscription: &Subscription) -> Vec<(&str, &str)> {
        subscription
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn headers_are_those_the_python_library_sends_byte_for_byte() {
        let topology = Topology::new(
            &OutboxConfig::default(),
            "/topic/peer_wire",
            Some("peer_wire_q"),
        )
        .unwrap();
        let dead_letters = topology.dead_letter_subscription("d");
        assert_eq!(dead_letters.destination, "DLQ.peer_wire_q");
        assert_eq!(dead_letters.ack, AckMode::ClientIndividual);
        assert_eq!(
            pairs(&dead_letters),
            [
                ("auto-delete", "false"),
                ("durable", "true"),
                ("exclusive", "False"),
                ("prefetch-count", "1"),
                ("x-dead-letter-exchange", ""),
                ("x-dead-letter-routing-key", "DLQ.DLQ.DLQ.peer_wire_q"),
                ("x-queue-name", "DLQ.peer_wire_q"),
            ]
        );
        let main = topology.subscription("m");
        assert_eq!(main.destination, "/topic/peer_wire");
        assert_eq!(main.id, "m");
        assert_eq!(
            pairs(&main),
            [
                ("auto-delete", "false"),
                ("durable", "true"),
                ("exclusive", "False"),
                ("prefetch-count", "1"),
                ("x-dead-letter-exchange", ""),
                ("x-dead-letter-routing-key", "DLQ.peer_wire_q"),
                ("x-queue-name", "peer_wire_q"),
            ]
        );
        assert!(!topology.exclusive());
    }

    #[test]
    fn the_queue_defaults_to_the_last_segment_and_bad_names_are_refused() {
        let config = OutboxConfig::default();
        let queue = |destination| Topology::new(&config, destination, None).map(|t| t.queue);
        assert_eq!(
            queue("/topic/orders.created.v1").unwrap(),
            "orders.created.v1"
        );
        assert_eq!(queue("/exchange/amq.direct/foo").unwrap(), "foo");
        assert_eq!(queue("plain").unwrap(), "plain");
        assert!(queue("/topic/").is_err());
        assert!(queue("").is_err());
        let long = "q".repeat(252);
        assert!(Topology::new(&config, "/topic/x", Some(&long)).is_err());
        assert!(Topology::new(&config, "/topic/x", Some(&long[1..])).is_ok());
        let mut exclusive = config.clone();
        exclusive.exclusive_queue = true;
        let topology = Topology::new(&exclusive, "/topic/x", None).unwrap();
        assert!(topology.exclusive());
        assert!(pairs(&topology.subscription("i")).contains(&("exclusive", "True")));
    }
}
