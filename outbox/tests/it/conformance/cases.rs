//! The conformance cases, one function per case, each taking the subject under test. Queue and
//! destination names are unique per run.

use std::time::Duration;

use outbox::consumer::Topology;
use outbox::transport::{
    AckMode, Deliveries, Outcome, Outgoing, Subscription, SubscriptionEvent, Transport,
    TransportError, Unknown,
};
use outbox_tests::eventually;
use outbox_tests::stomp_peer::{QueueCleanup, unique};
use outbox_tests::transports::{next_delivery, next_event, no_delivery, outgoing};

use super::subject::{Refusal, Rejection, Subject, Unroutable};

/// A subscription with client acknowledgements and no queue arguments.
fn reader(destination: &str, id: &str, headers: &[(&str, &str)]) -> Subscription {
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

/// A consumer of `destination` reading `<key>_q`: its queues declared as the consumer declares
/// them, and its subscription on a connection of its own.
struct Consumer {
    topology: Topology,
    connection: Box<dyn Transport>,
    deliveries: Deliveries,
    _cleanup: QueueCleanup,
}

impl Consumer {
    async fn start(subject: &Subject, destination: &str, key: &str) -> Consumer {
        let topology = Topology::new(subject.config(), destination, Some(&format!("{key}_q")))
            .expect("a topology");
        let _cleanup = subject.cleanup(&[topology.queue(), &topology.dead_letter_queue()]);
        topology
            .declare(subject.transport())
            .await
            .expect("declare");
        let connection = subject.connection();
        let deliveries = connection
            .subscribe(topology.subscription("consumer"))
            .await
            .expect("subscribe");
        Consumer {
            topology,
            connection,
            deliveries,
            _cleanup,
        }
    }
}

/// Every message of a batch is receipted (confirmed), and reaches its queue in order.
pub(super) async fn a_batch_is_receipted_in_order(subject: Subject) {
    let queue = unique("conformance_batch");
    let _cleanup = subject.cleanup(&[&queue]);
    let destination = format!("/queue/{queue}");
    let batch: Vec<Outgoing> = (0..20)
        .map(|n| outgoing(&destination, &n.to_string()))
        .collect();
    let report = subject.transport().send(&batch).await;
    assert_eq!(report.outcomes, vec![Outcome::Receipted; batch.len()]);
    let connection = subject.connection();
    let mut deliveries = connection
        .subscribe(reader(&destination, "reader", &[]))
        .await
        .expect("subscribe");
    for sent in &batch {
        let delivery = next_delivery(&mut deliveries).await;
        assert_eq!(delivery.body, sent.body);
        connection.ack(&delivery).await.expect("ack");
    }
    no_delivery(&mut deliveries, subject.quiet()).await;
}

/// A SEND the broker refuses (to an exchange that does not exist) is never reported receipted,
/// nor is any message whose receipt the refusal failed, in its batch or in another batch
/// pending on the same connection; and every message reported receipted is in its queue.
pub(super) async fn a_refusal_fails_the_pending_receipts_of_its_connection(subject: Subject) {
    if !subject.runs("a_refusal_fails_the_pending_receipts_of_its_connection") {
        return;
    }
    let refusal = subject.refusal().expect("a refusal behaviour");
    let queue = unique("conformance_refusal");
    let _cleanup = subject.cleanup(&[&queue]);
    let good = format!("/queue/{queue}");
    let missing = format!("/exchange/{}/k", unique("missing"));
    let batch = [
        outgoing(&good, "0"),
        outgoing(&missing, "poison"),
        outgoing(&good, "2"),
        outgoing(&good, "3"),
    ];
    let report = subject.transport().send(&batch).await;
    match refusal {
        Refusal::ClosesTheConnection => {
            // The message before the refused one is receipted, or still pending when the
            // refusal came (RabbitMQ receipts after routing) and failed with it.
            assert!(
                report.outcomes[0].is_receipted()
                    || refused_with_the_connection(&report.outcomes[0]),
                "{report:?}"
            );
            assert!(
                report.outcomes[1..].iter().all(refused_with_the_connection),
                "failed with the refusal: {report:?}"
            );
        }
        Refusal::RefusesTheMessage => {
            assert_eq!(report.receipted(), vec![true, false, true, true]);
            assert!(
                matches!(&report.outcomes[1], Outcome::Refused(_)),
                "{report:?}"
            );
        }
    }
    let mut sent = vec![(batch[0].body.clone(), report.outcomes[0].clone())];
    if refusal == Refusal::RefusesTheMessage {
        sent.extend([2, 3].map(|n| (batch[n].body.clone(), report.outcomes[n].clone())));
    }

    // Two batches in flight on the one connection, the second refused.
    let first = [outgoing(&good, "a"), outgoing(&good, "b")];
    let second = [outgoing(&missing, "poison"), outgoing(&good, "c")];
    let (first_report, second_report) = tokio::join!(
        subject.transport().send(&first),
        subject.transport().send(&second)
    );
    assert!(
        !second_report.outcomes[0].is_receipted(),
        "{second_report:?}"
    );
    if refusal == Refusal::ClosesTheConnection {
        assert!(
            refused_with_the_connection(&second_report.outcomes[1]),
            "{second_report:?}"
        );
    }
    for (message, outcome) in first.iter().chain(&second[1..]).zip(
        first_report
            .outcomes
            .iter()
            .chain(&second_report.outcomes[1..]),
    ) {
        sent.push((message.body.clone(), outcome.clone()));
    }

    // Every message reported receipted is in the queue; besides them, only messages whose
    // outcome is unknown may be, never one after the refusal in its batch.
    let connection = subject.connection();
    let mut deliveries = connection
        .subscribe(reader(&good, "reader", &[]))
        .await
        .expect("subscribe");
    let mut delivered = Vec::new();
    while let Ok(Some(delivery)) = tokio::time::timeout(subject.quiet(), deliveries.recv()).await {
        connection.ack(&delivery).await.expect("ack");
        delivered.push(delivery.body);
    }
    for (body, outcome) in &sent {
        let text = String::from_utf8_lossy(body);
        match outcome {
            Outcome::Receipted => assert!(delivered.contains(body), "{text} receipted, not stored"),
            Outcome::Unknown(_) => {}
            other => assert!(!delivered.contains(body), "{text} {other:?}, yet stored"),
        }
    }
    for body in &delivered {
        assert!(
            sent.iter().any(|(sent, _)| sent == body),
            "{} stored, sent after the refusal in its batch",
            String::from_utf8_lossy(body)
        );
    }
}

/// Whether the outcome is a message left unknown by a refusal that closed its connection.
fn refused_with_the_connection(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Unknown(unknown) if unknown.reason.is_broker_refusal())
}

/// A message no queue takes is receipted and dropped (STOMP), or returned unroutable (AMQP's
/// `mandatory` publish); a queue bound afterwards receives only what is sent after it.
pub(super) async fn an_unroutable_message_is_dropped_or_returned(subject: Subject) {
    let key = unique("conformance_unroutable");
    let queue = format!("{key}_q");
    let _cleanup = subject.cleanup(&[&queue]);
    let destination = format!("/topic/{key}");
    let missing_queue = format!("/amq/queue/{}", unique("missing"));
    let report = subject
        .transport()
        .send(&[
            outgoing(&destination, "before"),
            outgoing(&missing_queue, "before"),
        ])
        .await;
    match subject.unroutable() {
        Unroutable::Dropped => assert_eq!(report.outcomes, vec![Outcome::Receipted; 2]),
        Unroutable::Returned => assert!(
            matches!(
                &report.outcomes[..],
                [Outcome::Unroutable(_), Outcome::Unroutable(_)]
            ),
            "{report:?}"
        ),
    }
    let connection = subject.connection();
    let mut deliveries = connection
        .subscribe(reader(
            &destination,
            "late",
            &[
                ("durable", "true"),
                ("auto-delete", "false"),
                ("x-queue-name", &queue),
            ],
        ))
        .await
        .expect("subscribe");
    let report = subject
        .transport()
        .send(&[outgoing(&destination, "after")])
        .await;
    assert_eq!(report.outcomes, vec![Outcome::Receipted]);
    let delivery = next_delivery(&mut deliveries).await;
    assert_eq!(delivery.body, b"after");
    connection.ack(&delivery).await.expect("ack");
    no_delivery(&mut deliveries, subject.quiet()).await;
}

/// In batches sent side by side on one connection, each interleaving messages to a topic a
/// queue is bound to and to one no queue is bound to, exactly the unbound messages come back
/// unroutable and the bound ones are receipted (AMQP's returns pinned on their own publishes);
/// the bound queue holds each bound message once.
pub(super) async fn in_mixed_batches_exactly_the_unbound_messages_are_returned(subject: Subject) {
    if !subject.runs("in_mixed_batches_exactly_the_unbound_messages_are_returned") {
        return;
    }
    let key = unique("conformance_mixed");
    let queue = format!("{key}_q");
    let _cleanup = subject.cleanup(&[&queue]);
    let bound = format!("/topic/{key}");
    let unbound = format!("/topic/{}", unique("conformance_unbound"));
    // A durable queue bound to `bound`, its subscription left unread (what it holds unacked
    // still counts as in the queue).
    let connection = subject.connection();
    let _unread = connection
        .subscribe(reader(
            &bound,
            "binder",
            &[
                ("durable", "true"),
                ("auto-delete", "false"),
                ("x-queue-name", &queue),
            ],
        ))
        .await
        .expect("subscribe");
    // RabbitMQ coalesces confirms, and lapin hands returns out in a HashMap's order: a few
    // thousand messages make a return given with the wrong confirm all but certain.
    const ROUNDS: usize = 3;
    const BATCHES: usize = 8;
    const PER_BATCH: usize = 200;
    for round in 0..ROUNDS {
        let batches: Vec<Vec<Outgoing>> = (0..BATCHES)
            .map(|batch| {
                (0..PER_BATCH)
                    .map(|n| {
                        let id = format!("{key}-{round}-{batch}-{n}");
                        let destination = if n % 2 == 0 { &bound } else { &unbound };
                        Outgoing {
                            headers: vec![("dop-msg-id".to_owned(), id.clone())],
                            ..outgoing(destination, &format!("{{\"id\":\"{id}\"}}"))
                        }
                    })
                    .collect()
            })
            .collect();
        let reports =
            futures::future::join_all(batches.iter().map(|batch| subject.transport().send(batch)))
                .await;
        for (batch, report) in batches.iter().zip(&reports) {
            for (message, outcome) in batch.iter().zip(&report.outcomes) {
                let id = message.header("dop-msg-id").unwrap_or_default();
                if message.destination == bound {
                    assert_eq!(outcome, &Outcome::Receipted, "{id}");
                } else {
                    assert!(
                        matches!(outcome, Outcome::Unroutable(_)),
                        "{id}: {outcome:?}"
                    );
                }
            }
        }
    }
    let expected = ROUNDS * BATCHES * PER_BATCH / 2;
    eventually(
        Duration::from_secs(10),
        "the bound messages queued",
        || async { subject.queue_message_count(&queue) == Some(expected) },
    )
    .await;
    tokio::time::sleep(subject.quiet()).await;
    assert_eq!(subject.queue_message_count(&queue), Some(expected));
}

/// A nacked message goes to the dead-letter queue the consumer's topology declares, marked as
/// rejected from its queue; an acked one is gone, and neither comes back.
pub(super) async fn a_nacked_message_is_dead_lettered_and_an_acked_one_is_gone(subject: Subject) {
    let key = unique("conformance_dead_letter");
    let destination = format!("/topic/{key}");
    let mut consumer = Consumer::start(&subject, &destination, &key).await;
    let dead_letter_queue = consumer.topology.dead_letter_queue();
    let report = subject
        .transport()
        .send(&[
            outgoing(&destination, "kept"),
            outgoing(&destination, "rejected"),
        ])
        .await;
    assert!(report.all_receipted(), "{report:?}");
    let kept = next_delivery(&mut consumer.deliveries).await;
    assert_eq!(kept.body, b"kept");
    consumer.connection.ack(&kept).await.expect("ack");
    let rejected = next_delivery(&mut consumer.deliveries).await;
    assert_eq!(rejected.body, b"rejected");
    consumer.connection.nack(&rejected).await.expect("nack");

    let dead_reader = subject.connection();
    let mut dead = dead_reader
        .subscribe(consumer.topology.dead_letter_subscription("dead"))
        .await
        .expect("subscribe to the dead-letter queue");
    let dead_letter = next_delivery(&mut dead).await;
    assert_eq!(dead_letter.body, b"rejected");
    assert_eq!(
        dead_letter.destination,
        format!("/queue/{dead_letter_queue}")
    );
    assert_eq!(
        dead_letter.header("x-first-death-queue"),
        Some(consumer.topology.queue())
    );
    assert_eq!(dead_letter.header("x-first-death-reason"), Some("rejected"));
    dead_reader.ack(&dead_letter).await.expect("ack");
    no_delivery(&mut dead, subject.quiet()).await;

    consumer.connection.disconnect().await.expect("disconnect");
    let again = subject.connection();
    let mut deliveries = again
        .subscribe(consumer.topology.subscription("again"))
        .await
        .expect("subscribe again");
    no_delivery(&mut deliveries, subject.quiet()).await;
}

/// A delivery left unacknowledged comes again, marked redelivered, once its subscriber's
/// connection closes; the earlier delivery can no longer be settled.
pub(super) async fn an_unacked_delivery_comes_again_after_its_connection_closes(subject: Subject) {
    let queue = unique("conformance_redelivery");
    let _cleanup = subject.cleanup(&[&queue]);
    let destination = format!("/queue/{queue}");
    let connection = subject.connection();
    let mut deliveries = connection
        .subscribe(reader(&destination, "reader", &[]))
        .await
        .expect("subscribe");
    let report = subject
        .transport()
        .send(&[outgoing(&destination, "a"), outgoing(&destination, "b")])
        .await;
    assert!(report.all_receipted(), "{report:?}");
    let first = next_delivery(&mut deliveries).await;
    let second = next_delivery(&mut deliveries).await;
    assert_eq!((&first.body[..], &second.body[..]), (&b"a"[..], &b"b"[..]));
    assert_eq!(second.header("redelivered"), Some("false"));
    connection.ack(&first).await.expect("ack");
    connection.disconnect().await.expect("disconnect");

    let mut again = connection
        .subscribe(reader(&destination, "reader", &[]))
        .await
        .expect("subscribe after reconnecting");
    let redelivered = next_delivery(&mut again).await;
    assert_eq!(redelivered.body, b"b");
    assert_eq!(redelivered.header("redelivered"), Some("true"));
    assert_ne!(redelivered.connection, second.connection);
    assert!(
        connection.ack(&second).await.is_err(),
        "a delivery of the closed connection"
    );
    connection.ack(&redelivered).await.expect("ack");
    no_delivery(&mut again, subject.quiet()).await;
}

/// Declaring an existing queue with other arguments is refused (`PRECONDITION_FAILED`) and
/// delivers nothing; the queue and its consumer are untouched.
pub(super) async fn redeclaring_a_queue_with_other_arguments_is_a_precondition_failure(
    subject: Subject,
) {
    let key = unique("conformance_conflict");
    let destination = format!("/topic/{key}");
    let mut consumer = Consumer::start(&subject, &destination, &key).await;
    let other = subject.connection();
    let conflicting = reader(
        &destination,
        "conflicting",
        &[
            ("durable", "true"),
            ("auto-delete", "false"),
            ("x-queue-name", consumer.topology.queue()),
            ("x-dead-letter-exchange", ""),
        ],
    );
    let error = other
        .subscribe(conflicting)
        .await
        .expect_err("a conflicting declaration is refused");
    let text = error.to_string();
    let expected = format!(
        "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-routing-key' for queue '{}' in \
         vhost '/': received none but current is the value '{}'",
        consumer.topology.queue(),
        consumer.topology.dead_letter_queue()
    );
    assert!(text.contains(&expected), "{text}");
    // A SEND to `/queue/<q>` declares the queue with no arguments: refused the same way;
    // `/amq/queue/<q>` reaches it without declaring.
    let report = other
        .send(&[outgoing(
            &format!("/queue/{}", consumer.topology.queue()),
            "declaring",
        )])
        .await;
    assert!(!report.outcomes[0].is_receipted(), "{report:?}");
    let failure = report
        .failure()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(failure.contains("PRECONDITION_FAILED"), "{report:?}");
    let report = other
        .send(&[outgoing(
            &format!("/amq/queue/{}", consumer.topology.queue()),
            "direct",
        )])
        .await;
    assert!(report.all_receipted(), "{report:?}");
    let delivery = next_delivery(&mut consumer.deliveries).await;
    assert_eq!(delivery.body, b"direct");
    consumer.connection.ack(&delivery).await.expect("ack");

    let report = subject
        .transport()
        .send(&[outgoing(&destination, "after")])
        .await;
    assert!(report.all_receipted(), "{report:?}");
    let delivery = next_delivery(&mut consumer.deliveries).await;
    assert_eq!(delivery.body, b"after");
    consumer.connection.ack(&delivery).await.expect("ack");
    no_delivery(&mut consumer.deliveries, subject.quiet()).await;
}

/// A message a consumer's subscription cannot decode is reported to it
/// ([`SubscriptionEvent::Undecodable`]) and dead-lettered, and the next one is delivered.
pub(super) async fn an_undecodable_message_is_reported_and_dead_lettered(subject: Subject) {
    if !subject.runs("an_undecodable_message_is_reported_and_dead_lettered") {
        return;
    }
    let key = unique("conformance_undecodable");
    let destination = format!("/topic/{key}.*");
    let mut consumer = Consumer::start(&subject, &destination, &key).await;
    let dead_letter_queue = consumer.topology.dead_letter_queue();
    let bad = subject
        .undecodable_message(&format!("/topic/{key}.bad"))
        .expect("an undecodable message");
    let report = subject
        .transport()
        .send(&[bad, outgoing(&format!("/topic/{key}.good"), "fine")])
        .await;
    assert!(report.all_receipted(), "{report:?}");
    let event = next_event(&mut consumer.deliveries).await;
    let SubscriptionEvent::Undecodable(undecodable) = event else {
        panic!("expected the report of the undecodable message first, got {event:?}");
    };
    assert_eq!(undecodable.subscription, "consumer");
    assert_eq!(undecodable.queue, consumer.topology.queue());
    let fine = next_delivery(&mut consumer.deliveries).await;
    assert_eq!(fine.body, b"fine");
    consumer.connection.ack(&fine).await.expect("ack");
    eventually(
        Duration::from_secs(10),
        "the undecodable message is in the dead-letter queue",
        || async { subject.queue_message_count(&dead_letter_queue) == Some(1) },
    )
    .await;
}

/// While the broker blocks publishers (a memory alarm) nothing is receipted, and the sender
/// learns it from a slow broker, not a refusal; once unblocked, the waiting frames are read in
/// order and the next send is receipted.
pub(super) async fn a_blocked_connection_holds_its_messages_until_unblocked(subject: Subject) {
    if !subject.runs("a_blocked_connection_holds_its_messages_until_unblocked") {
        return;
    }
    let alarm = subject.alarm().expect("an alarm to raise");
    let destination = format!("/queue/{}", unique("conformance_blocked"));
    let connection = subject.connection();
    let mut deliveries = connection
        .subscribe(reader(&destination, "reader", &[]))
        .await
        .expect("subscribe");
    alarm.set_receipt_timeout(Duration::from_millis(300));
    alarm.set_blocked(true);
    let report = subject
        .transport()
        .send(&[outgoing(&destination, "a"), outgoing(&destination, "b")])
        .await;
    assert_eq!(report.receipted(), vec![false, false]);
    assert!(
        report
            .outcomes
            .iter()
            .all(|outcome| outcome.error().is_some_and(|e| e.is_slow_broker())),
        "{report:?}"
    );
    no_delivery(&mut deliveries, subject.quiet()).await;
    alarm.set_blocked(false);
    let report = subject
        .transport()
        .send(&[outgoing(&destination, "c")])
        .await;
    assert!(report.all_receipted(), "{report:?}");
    for body in ["a", "b", "c"] {
        let delivery = next_delivery(&mut deliveries).await;
        assert_eq!(delivery.body, body.as_bytes());
        connection.ack(&delivery).await.expect("ack");
    }
}

/// A publish to a queue full with `x-overflow: reject-publish` is never reported receipted: over
/// AMQP that message alone is nacked; over STOMP, RabbitMQ 3.10's plugin closes the connection
/// with no ERROR, so the rejected message and every one pending with it are unknown, lost with
/// the connection (and the STOMP transport waits before its next connection). The queue holds
/// what it took; once a reader makes room, a message is receipted again.
pub(super) async fn a_rejected_publish_is_nacked_or_closes_the_connection(subject: Subject) {
    let limited = subject.limited_queue("conformance_reject", 2).await;
    let destination = format!("/amq/queue/{}", limited.name);
    let batch: Vec<Outgoing> = (0..5)
        .map(|n| outgoing(&destination, &n.to_string()))
        .collect();
    let report = subject.transport().send(&batch).await;
    let closed = |outcome: &Outcome| {
        matches!(
            outcome,
            Outcome::Unknown(Unknown {
                reason: TransportError::ConnectionLost(_),
                overtaken: false,
            })
        )
    };
    match subject.rejection() {
        Rejection::Nacks => assert_eq!(
            report.outcomes,
            [
                Outcome::Receipted,
                Outcome::Receipted,
                Outcome::Nacked,
                Outcome::Nacked,
                Outcome::Nacked
            ]
        ),
        Rejection::ClosesTheConnection => {
            // The two the queue took are receipted, or were still pending when the connection
            // closed (RabbitMQ receipts after its confirm) and are lost with it.
            assert!(
                report.outcomes[..2]
                    .iter()
                    .all(|outcome| outcome.is_receipted() || closed(outcome)),
                "{report:?}"
            );
            assert!(report.outcomes[2..].iter().all(closed), "{report:?}");
        }
    }
    assert_eq!(subject.queue_message_count(&limited.name), Some(2));

    // A reader makes room.
    let connection = subject.connection();
    let mut deliveries = connection
        .subscribe(reader(&destination, "reader", &[]))
        .await
        .expect("subscribe");
    for sent in &batch[..2] {
        let delivery = next_delivery(&mut deliveries).await;
        assert_eq!(delivery.body, sent.body);
        connection.ack(&delivery).await.expect("ack");
    }
    let again = [outgoing(&destination, "again")];
    let mut attempts = 0;
    loop {
        attempts += 1;
        let report = subject.transport().send(&again).await;
        match &report.outcomes[0] {
            Outcome::Receipted => break,
            Outcome::Unknown(unknown) if unknown.reason.retry_in().is_some() => {
                assert!(subject.paces_reconnections(), "{report:?}");
                assert!(attempts < 10, "still waiting to reconnect: {report:?}");
                let wait = unknown.reason.retry_in().unwrap_or_default();
                tokio::time::sleep(wait + Duration::from_millis(50)).await;
            }
            other => panic!("sending again after room was made: {other:?}"),
        }
    }
    if subject.paces_reconnections() {
        assert!(
            attempts > 1,
            "the STOMP transport reconnected at once after an early close"
        );
    }
    let delivery = next_delivery(&mut deliveries).await;
    assert_eq!(delivery.body, b"again");
    connection.ack(&delivery).await.expect("ack");
    no_delivery(&mut deliveries, subject.quiet()).await;
}
