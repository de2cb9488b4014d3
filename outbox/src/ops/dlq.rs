//! `outbox dlq`: a consumer's dead-letter queue, `DLQ.<queue>`, read without losing anything and
//! replayed into the queue its messages came from.
//!
//! Both read the dead-letter queue through `/amq/queue/DLQ.<queue>` (an existing queue, declared
//! by nobody here) with `client-individual` acknowledgements. Listing never acknowledges: the
//! messages go back to the queue when the connection closes. Replaying SENDs each message to
//! `/amq/queue/<queue>` (a SEND to `/queue/<queue>` would redeclare the queue without its
//! dead-letter arguments, which RabbitMQ refuses) and acknowledges it in the dead-letter queue
//! only after the broker receipted the copy: a crash in between leaves the message in both
//! queues, and the consumer's inbox recognises the second delivery. Each copy carries the
//! replay's run id (`x-outbox-replay-run`), so a replay stops at a copy of its own that came back
//! (dead-lettered again while it ran) instead of replaying it forever: a message without an id
//! cannot be recognised otherwise, since the broker's `message-id` changes on every delivery.

use std::time::Duration;

use uuid::Uuid;

use crate::error::Error;
use crate::headers;
use crate::transport::{
    AckMode, Deliveries, Delivery, Outcome, Outgoing, Subscription, Transport, TransportError,
};

/// How long to wait for the next dead letter before concluding that the queue has no more.
const IDLE: Duration = Duration::from_secs(2);

/// Dead letters replayed per pipelined batch of SENDs.
const REPLAY_BATCH: usize = 100;

/// The header a replay sets on the copies it sends: the run's id (a UUID), replacing that of an
/// earlier run.
pub(crate) const REPLAY_RUN_HEADER: &str = "x-outbox-replay-run";

/// RabbitMQ's largest prefetch count.
const MAX_PREFETCH: usize = 65_535;

/// A message read from a dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Every header, as the broker delivered it (its own included).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl DeadLetter {
    fn from_delivery(delivery: Delivery) -> DeadLetter {
        DeadLetter {
            headers: delivery.headers,
            body: delivery.body,
        }
    }

    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Why RabbitMQ dead-lettered it (`x-first-death-reason`: `rejected` for a consumer's
    /// NACK, `expired`, `maxlen`, ...).
    pub fn reason(&self) -> Option<&str> {
        self.header("x-first-death-reason")
    }

    /// The message's idempotency key, as the consumer reads it: `cap-msg-id`, else `dop-msg-id`.
    pub fn message_key(&self) -> Option<&str> {
        ["cap-msg-id", "dop-msg-id"]
            .into_iter()
            .find_map(|name| self.header(name).filter(|value| !value.is_empty()))
    }

    /// The message as it was first sent: its headers without a broker's delivery state
    /// ([`headers::is_delivery_state`]: `message-id`, `x-death`, `persistent`...). `receipt` is
    /// among them: RabbitMQ passes a SEND's receipt request on to consumers, and sent again it
    /// would ask for a receipt nobody waits for.
    pub fn original_headers(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter(|(name, _)| !headers::is_delivery_state(name))
            .cloned()
            .collect()
    }
}

/// What [`dlq_replay`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Messages sent back to the queue and removed from the dead-letter queue.
    pub replayed: usize,
    /// Whether it stopped at a copy it had sent itself (dead-lettered again while the replay
    /// ran, recognised by its `x-outbox-replay-run` header): that one, and those behind it, stay in the
    /// dead-letter queue.
    pub stopped_at_repeat: bool,
}

/// `DLQ.<queue>`, as [`crate::consumer::Topology::dead_letter_queue`] names it.
fn dead_letter_queue(queue: &str) -> Result<String, Error> {
    if queue.trim().is_empty() {
        return Err(Error::Config {
            variable: "queue".into(),
            value: queue.into(),
            reason: "empty queue name".into(),
        });
    }
    Ok(format!("DLQ.{queue}"))
}

fn check_limit(limit: usize) -> Result<(), Error> {
    if limit == 0 || limit > MAX_PREFETCH {
        return Err(Error::Config {
            variable: "limit".into(),
            value: limit.to_string(),
            reason: format!("between 1 and {MAX_PREFETCH} messages"),
        });
    }
    Ok(())
}

/// Opens a `client-individual` subscription to the existing queue `queue` (declaring nothing;
/// refused if it does not exist) with `prefetch` messages in flight.
async fn read_queue(
    transport: &dyn Transport,
    queue: &str,
    prefetch: usize,
) -> Result<(String, Deliveries), TransportError> {
    let id = Uuid::new_v4().to_string();
    let deliveries = transport
        .subscribe(Subscription {
            destination: format!("/amq/queue/{queue}"),
            id: id.clone(),
            ack: AckMode::ClientIndividual,
            headers: vec![("prefetch-count".into(), prefetch.to_string())],
        })
        .await?;
    Ok((id, deliveries))
}

/// The next delivery, or `None` when none came within [`IDLE`] or the connection ended.
async fn next(deliveries: &mut Deliveries) -> Option<Delivery> {
    tokio::time::timeout(IDLE, deliveries.recv())
        .await
        .ok()
        .flatten()
}

/// Reads up to `limit` messages of `DLQ.<queue>` and leaves them there: nothing is acknowledged,
/// and the broker puts them back when this disconnects (marked `redelivered`). Each comes with
/// its headers, the death reason headers among them.
///
/// ```no_run
/// # async fn demo() -> Result<(), outbox::Error> {
/// let config = outbox::OutboxConfig::from_env()?;
/// let broker = outbox::transport::StompTransport::new(
///     outbox::transport::StompSettings::from(&config),
/// )?;
/// for dead in outbox::ops::dlq_list(&broker, "orders.v1", 20).await? {
///     println!("{:?}: {:?}", dead.message_key(), dead.reason());
/// }
/// # Ok(()) }
/// ```
pub async fn dlq_list(
    transport: &dyn Transport,
    queue: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, Error> {
    let dead_letters = dead_letter_queue(queue)?;
    check_limit(limit)?;
    transport.connect().await?;
    // Every message shown stays unacknowledged until the end: the prefetch lets `limit` through.
    let read = read_queue(transport, &dead_letters, limit).await;
    let (_, mut deliveries) = match read {
        Ok(opened) => opened,
        Err(err) => {
            let _ = transport.disconnect().await;
            return Err(err.into());
        }
    };
    let mut found = Vec::new();
    while found.len() < limit {
        match next(&mut deliveries).await {
            Some(delivery) => found.push(DeadLetter::from_delivery(delivery)),
            None => break,
        }
    }
    // No UNSUBSCRIBE first: the DISCONNECT gives every unacknowledged message back.
    transport.disconnect().await?;
    Ok(found)
}

/// Moves up to `limit` messages (all, with `None`) of `DLQ.<queue>` back to `queue`: each is
/// sent to `/amq/queue/<queue>` with its original headers (the broker's removed, its identity
/// kept, persistent), and acknowledged in the dead-letter queue only once the broker receipted the copy.
/// Fails before moving anything if `queue` does not exist (a SEND to a missing queue is
/// receipted and dropped). Every copy carries this run's id in the `x-outbox-replay-run` header; the replay
/// stops at a copy of its own that came back (dead-lettered again meanwhile) rather than loop,
/// with a limit or without.
///
/// ```no_run
/// # async fn demo() -> Result<(), outbox::Error> {
/// let config = outbox::OutboxConfig::from_env()?;
/// let broker = outbox::transport::StompTransport::new(
///     outbox::transport::StompSettings::from(&config),
/// )?;
/// let report = outbox::ops::dlq_replay(&broker, "orders.v1", None).await?;
/// println!("{} messages back in orders.v1", report.replayed);
/// # Ok(()) }
/// ```
pub async fn dlq_replay(
    transport: &dyn Transport,
    queue: &str,
    limit: Option<usize>,
) -> Result<ReplayReport, Error> {
    let dead_letters = dead_letter_queue(queue)?;
    if let Some(limit) = limit {
        check_limit(limit)?;
    }
    ensure_queue_exists(transport, queue).await?;
    transport.connect().await?;
    let prefetch = limit.unwrap_or(REPLAY_BATCH).min(REPLAY_BATCH);
    let (_, mut deliveries) = match read_queue(transport, &dead_letters, prefetch).await {
        Ok(opened) => opened,
        Err(err) => {
            let _ = transport.disconnect().await;
            return Err(err.into());
        }
    };
    let result = replay(transport, queue, limit, &mut deliveries).await;
    // The DISCONNECT's receipt also tells that the acknowledgements before it were processed.
    let disconnected = transport.disconnect().await;
    let report = result?;
    disconnected?;
    Ok(report)
}

async fn replay(
    transport: &dyn Transport,
    queue: &str,
    limit: Option<usize>,
    deliveries: &mut Deliveries,
) -> Result<ReplayReport, Error> {
    let mut report = ReplayReport::default();
    let run = Uuid::new_v4().to_string();
    let remaining = |report: &ReplayReport| limit.map_or(usize::MAX, |l| l - report.replayed);
    'batches: while remaining(&report) > 0 {
        let Some(first) = next(deliveries).await else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < REPLAY_BATCH.min(remaining(&report)) {
            match deliveries.try_recv() {
                Ok(delivery) => batch.push(delivery),
                Err(_) => break,
            }
        }
        let mut outgoing = Vec::with_capacity(batch.len());
        let mut taken = Vec::with_capacity(batch.len());
        for delivery in batch {
            let dead = DeadLetter::from_delivery(delivery.clone());
            if dead.header(REPLAY_RUN_HEADER) == Some(run.as_str()) {
                // A copy this run sent, dead-lettered again: leave it (unacknowledged, so it
                // goes back to the dead-letter queue) and stop.
                report.stopped_at_repeat = true;
                break;
            }
            outgoing.push(replayed(&dead, queue, &run));
            taken.push(delivery);
        }
        if !outgoing.is_empty() {
            let sent = transport.send(&outgoing).await;
            for (delivery, receipted) in taken.iter().zip(&sent.receipted()) {
                if *receipted {
                    transport.ack(delivery).await?;
                    report.replayed += 1;
                }
            }
            // An unroutable or nacked copy has no error of its own: it stays in the dead-letter
            // queue all the same, and the replay stops there rather than report it moved.
            let failure = sent.failure().cloned().or_else(|| {
                sent.outcomes.iter().find_map(|outcome| match outcome {
                    Outcome::Unroutable(reply) => Some(TransportError::Broker {
                        message: format!(
                            "the broker returned the copy: no queue `{queue}` took it (was it deleted?)"
                        ),
                        detail: reply.clone(),
                    }),
                    Outcome::Nacked => Some(TransportError::Broker {
                        message: format!(
                            "the broker refused the copy for now (basic.nack): is `{queue}` full?"
                        ),
                        detail: "nacked".to_owned(),
                    }),
                    _ => None,
                })
            });
            if let Some(failure) = failure {
                tracing::warn!(
                    replayed = report.replayed,
                    error = %failure,
                    "replay stopped; the messages not receipted stay in the dead-letter queue"
                );
                return Err(failure.into());
            }
        }
        if report.stopped_at_repeat {
            break 'batches;
        }
    }
    tracing::info!(queue, replayed = report.replayed, "dead letters replayed");
    Ok(report)
}

/// The copy of a dead letter that goes back to `queue`, marked with the replay's `run`.
fn replayed(dead: &DeadLetter, queue: &str, run: &str) -> Outgoing {
    let mut headers = dead.original_headers();
    headers.retain(|(name, _)| name != REPLAY_RUN_HEADER);
    headers.push((REPLAY_RUN_HEADER.into(), run.into()));
    if !headers.iter().any(|(name, _)| name == "persistent") {
        headers.push(("persistent".into(), "true".into()));
    }
    Outgoing {
        destination: format!("/amq/queue/{queue}"),
        headers,
        body: dead.body.clone(),
    }
}

/// Fails unless `queue` exists. STOMP has no passive declare: subscribe to `/amq/queue/<queue>`
/// (refused with `not_found` if missing) on a connection of its own, then disconnect, which gives
/// back any message the broker handed over meanwhile (at most one: prefetch 1).
async fn ensure_queue_exists(transport: &dyn Transport, queue: &str) -> Result<(), Error> {
    transport.connect().await?;
    let checked = read_queue(transport, queue, 1).await;
    let disconnected = transport.disconnect().await;
    checked?;
    Ok(disconnected?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OutboxConfig;
    use crate::consumer::Topology;
    use crate::transport::MemoryTransport;

    fn header_pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_broker_s_headers_are_not_sent_again() {
        let dead = DeadLetter {
            headers: header_pairs(&[
                ("subscription", "s"),
                ("destination", "/queue/DLQ.q"),
                ("message-id", "T_1"),
                ("redelivered", "true"),
                ("ack", "T_1"),
                ("dop-msg-id", "m1"),
                ("receipt", "17"),
                ("x-custom", "a:b"),
                ("x-first-death-reason", "rejected"),
                ("x-first-death-queue", "q"),
                ("x-last-death-reason", "rejected"),
                ("persistent", "true"),
                ("content-length", "2"),
            ]),
            body: b"{}".to_vec(),
        };
        assert_eq!(dead.reason(), Some("rejected"));
        assert_eq!(dead.message_key(), Some("m1"));
        let out = replayed(&dead, "q", "run-1");
        assert_eq!(out.destination, "/amq/queue/q");
        assert_eq!(
            out.headers,
            header_pairs(&[
                ("dop-msg-id", "m1"),
                ("x-custom", "a:b"),
                (REPLAY_RUN_HEADER, "run-1"),
                ("persistent", "true"),
            ])
        );
        let mut again = dead.clone();
        again
            .headers
            .push((REPLAY_RUN_HEADER.into(), "run-0".into()));
        let out = replayed(&again, "q", "run-1");
        let runs: Vec<_> = out
            .headers
            .iter()
            .filter(|(name, _)| name == REPLAY_RUN_HEADER)
            .map(|(_, run)| run.as_str())
            .collect();
        assert_eq!(runs, ["run-1"], "an earlier run's mark is replaced");
    }

    /// A topology on the in-memory broker with one dead letter per body.
    async fn dead_lettered(broker: &MemoryTransport, queue: &str, bodies: &[&str]) {
        let topology =
            Topology::new(&OutboxConfig::default(), &format!("/topic/{queue}"), None).unwrap();
        let consumer = broker.new_connection();
        topology.declare(&consumer).await.unwrap();
        let mut deliveries = consumer
            .subscribe(topology.subscription("c"))
            .await
            .unwrap();
        for body in bodies {
            let report = broker
                .send(&[Outgoing {
                    destination: format!("/topic/{queue}"),
                    headers: header_pairs(&[("dop-msg-id", body)]),
                    body: body.as_bytes().to_vec(),
                }])
                .await;
            assert!(report.all_receipted());
            let delivery = deliveries.recv().await.unwrap();
            consumer.nack(&delivery).await.unwrap();
        }
        consumer.disconnect().await.unwrap();
    }

    /// The in-memory broker, with every publish returned as unroutable (over AMQP, the queue
    /// deleted between the replay's check and its publish).
    struct Returning(MemoryTransport);

    #[async_trait::async_trait]
    impl Transport for Returning {
        async fn connect(&self) -> Result<(), TransportError> {
            self.0.connect().await
        }
        async fn send(&self, messages: &[Outgoing]) -> crate::transport::SendReport {
            crate::transport::SendReport {
                outcomes: vec![Outcome::Unroutable("312 NO_ROUTE".into()); messages.len()],
            }
        }
        async fn subscribe(
            &self,
            subscription: Subscription,
        ) -> Result<Deliveries, TransportError> {
            self.0.subscribe(subscription).await
        }
        async fn unsubscribe(&self, id: &str) -> Result<(), TransportError> {
            self.0.unsubscribe(id).await
        }
        async fn ack(&self, delivery: &Delivery) -> Result<(), TransportError> {
            self.0.ack(delivery).await
        }
        async fn nack(&self, delivery: &Delivery) -> Result<(), TransportError> {
            self.0.nack(delivery).await
        }
        async fn disconnect(&self) -> Result<(), TransportError> {
            self.0.disconnect().await
        }
    }

    #[tokio::test]
    async fn a_returned_copy_stops_the_replay_and_stays_in_the_dead_letter_queue() {
        let broker = MemoryTransport::new();
        dead_lettered(&broker, "gone", &["a", "b"]).await;
        let err = dlq_replay(&Returning(broker.new_connection()), "gone", None)
            .await
            .expect_err("a returned copy is an error");
        assert!(err.to_string().contains("no queue `gone` took it"), "{err}");
        assert_eq!(
            dlq_list(&broker.new_connection(), "gone", 10)
                .await
                .unwrap()
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn listing_leaves_the_dead_letters_and_replay_moves_them_back() {
        let broker = MemoryTransport::new();
        dead_lettered(&broker, "orders", &["a", "b", "c"]).await;

        let reader = broker.new_connection();
        let shown = dlq_list(&reader, "orders", 2).await.unwrap();
        let keys: Vec<_> = shown.iter().filter_map(|d| d.message_key()).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(shown[0].reason(), Some("rejected"));
        assert_eq!(shown[0].header("x-first-death-queue"), Some("orders"));
        assert_eq!(dlq_list(&reader, "orders", 10).await.unwrap().len(), 3);

        let report = dlq_replay(&reader, "orders", Some(2)).await.unwrap();
        assert_eq!(report.replayed, 2);
        assert_eq!(dlq_list(&reader, "orders", 10).await.unwrap().len(), 1);
        let report = dlq_replay(&reader, "orders", None).await.unwrap();
        assert_eq!(report.replayed, 1);
        assert!(dlq_list(&reader, "orders", 10).await.unwrap().is_empty());

        let consumer = broker.new_connection();
        let mut deliveries = consumer
            .subscribe(Subscription {
                destination: "/amq/queue/orders".into(),
                id: "c".into(),
                ack: AckMode::Auto,
                headers: vec![],
            })
            .await
            .unwrap();
        let mut back = Vec::new();
        for _ in 0..3 {
            let delivery = deliveries.recv().await.unwrap();
            assert_eq!(delivery.header("x-first-death-reason"), None);
            back.push(String::from_utf8(delivery.body).unwrap());
        }
        assert_eq!(back, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn replay_into_a_missing_queue_moves_nothing() {
        let broker = MemoryTransport::new();
        dead_lettered(&broker, "orders", &["a"]).await;
        let reader = broker.new_connection();
        let err = dlq_replay(&reader, "nope", None).await.unwrap_err();
        assert!(err.to_string().contains("not_found"), "{err}");
        assert_eq!(dlq_list(&reader, "orders", 10).await.unwrap().len(), 1);
    }
}
