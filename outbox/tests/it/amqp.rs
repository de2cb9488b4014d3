//! The AMQP 0-9-1 transport against the real RabbitMQ (AMQP on 5672, STOMP on 61613): unroutable
//! messages kept and delivered once a queue is bound, the same message on the wire as over STOMP,
//! a poison publish charged to its row alone, failover, TLS with a private CA and a client
//! certificate, and STOMP and AMQP consumers sharing queues in either declaration order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use outbox::config::Secret;
use outbox::tables::published::Model as Row;
use outbox::tables::published::Status;
use outbox::transport::{
    AckMode, AmqpSettings, AmqpTransport, Deliveries, MemoryTransport, Outcome, Outgoing,
    StompSettings, StompTransport, Subscription, Transport,
};
use outbox::{OutboxConfig, Producer, Published};
use outbox_tests::certs::{Ca, Files};
use outbox_tests::rows::{enqueue_many, poison_among_goods, set_back};
use outbox_tests::stomp_peer::{
    QueueCleanup, RABBITMQ_STOMP, StompPeer, queue_message_count, topic_reader, unique,
};
use outbox_tests::{Backend, TestDb, eventually};
use sea_orm::{DatabaseConnection, EntityTrait};
use serde_json::json;

/// RabbitMQ's AMQP listener, guest/guest, vhost `/`.
const RABBITMQ_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Settings for AMQP with short timings.
fn amqp_config(urls: &str) -> OutboxConfig {
    let mut config = OutboxConfig::default();
    config.broker_url = urls.split(',').map(Secret::new).collect();
    config.receipt_timeout = Duration::from_secs(3);
    config.producer_lease = Duration::from_secs(5);
    config.maximum_backoff = Duration::from_secs(1);
    config.producer_waiting_time = Duration::from_millis(100);
    config.pause_for_retry = Duration::ZERO;
    config.wait_retry = Duration::ZERO;
    config
}

fn amqp() -> AmqpTransport {
    AmqpSettings::try_from(&amqp_config(RABBITMQ_AMQP))
        .and_then(AmqpTransport::new)
        .expect("an AMQP transport")
}

async fn rows(db: &DatabaseConnection) -> Vec<Row> {
    let mut rows = Published::find().all(db).await.expect("read the outbox");
    rows.sort_by_key(|row| row.added);
    rows
}

#[tokio::test]
async fn an_unroutable_row_waits_without_spending_a_retry_and_goes_once_a_queue_is_bound() {
    let test = TestDb::new(Backend::Postgres).await;
    let key = unique("amqp_unroutable");
    let destination = format!("/topic/{key}");
    outbox::enqueue(&test.db, &destination, &json!({"kept": true}))
        .await
        .unwrap();
    let config = amqp_config(RABBITMQ_AMQP);
    let producer = Producer::builder(test.db.clone())
        .config(config.clone())
        .build()
        .unwrap();

    let report = producer.drain().await.unwrap();
    assert_eq!((report.sent, report.unroutable), (0, 1), "{report:?}");
    let row = rows(&test.db).await.remove(0);
    assert_eq!(row.status, Status::Schedule);
    assert_eq!(row.retry, 0, "an unroutable attempt spends no retry");
    let error = row.last_error.clone().expect("a last_error");
    assert!(error.contains(&destination), "{error}");
    assert!(error.contains("no queue is bound to it"), "{error}");
    assert!(row.next_attempt_at.is_some(), "it waits on a backoff");
    // `outbox status` lists it.
    let status = outbox::ops::status(&test.db, 10).await.unwrap();
    assert_eq!(
        status.unroutable,
        vec![(destination.clone(), 1)],
        "{status:?}"
    );

    // A second attempt before a queue is bound: still kept, still no retry spent.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let report = producer.drain().await.unwrap();
    assert_eq!(report.unroutable, 1, "{report:?}");
    assert_eq!(rows(&test.db).await[0].retry, 0);

    // `outbox declare` over AMQP binds the queue; the next attempt delivers the message.
    let queue = format!("{key}_q");
    let _cleanup = QueueCleanup(vec![queue.clone(), format!("DLQ.{queue}")]);
    let topology = outbox::consumer::Topology::new(&config, &destination, Some(&queue)).unwrap();
    topology.declare(&amqp()).await.expect("declare over AMQP");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let report = producer.drain().await.unwrap();
    assert_eq!(report.sent, 1, "{report:?}");
    let row = rows(&test.db).await.remove(0);
    assert_eq!(row.status, Status::Succeeded);
    assert_eq!(row.retry, 0);
    eventually(
        Duration::from_secs(10),
        "the message is in the queue",
        || {
            let queue = queue.clone();
            async move { queue_message_count(&queue) == Some(1) }
        },
    )
    .await;
    test.drop_database().await;
}

/// Against the memory broker on every backend: the row is kept, its destination recorded in
/// `outbox_unroutable` (what `outbox status` lists) until a message to it routes, then cleared.
async fn the_relay_keeps_unroutable_rows_against_the_memory_broker_too(backend: Backend) {
    let test = TestDb::new(backend).await;
    let broker = outbox::transport::MemoryTransport::new();
    broker.set_mandatory(true);
    let destination = "/topic/memory_unroutable";
    outbox::enqueue(&test.db, destination, &json!({"n": 1}))
        .await
        .unwrap();
    let mut config = OutboxConfig::default();
    // Long enough that a slow drain does not see the row due again; the wait below is as long.
    config.maximum_backoff = Duration::from_secs(2);
    let producer = Producer::builder(test.db.clone())
        .config(config)
        .transport(broker.clone())
        .isolation_transport(broker.new_connection())
        .build()
        .unwrap();
    let report = producer.drain().await.unwrap();
    assert_eq!((report.sent, report.unroutable, report.refused), (0, 1, 0));
    let row = rows(&test.db).await.remove(0);
    assert_eq!((row.status, row.retry), (Status::Schedule, 0));
    let status = outbox::ops::status(&test.db, 10).await.unwrap();
    assert_eq!(
        status.unroutable,
        vec![(destination.to_owned(), 1)],
        "{status:?}"
    );
    let mut deliveries = broker
        .subscribe(outbox::transport::Subscription {
            destination: destination.into(),
            id: "late".into(),
            ack: outbox::transport::AckMode::Auto,
            headers: vec![("x-queue-name".into(), "memory_unroutable_q".into())],
        })
        .await
        .unwrap();
    // The pause is capped by the maximum backoff.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let report = producer.drain().await.unwrap();
    assert_eq!(report.sent, 1, "{report:?}");
    let delivery = deliveries
        .recv()
        .await
        .expect("delivered once a queue is bound");
    assert_eq!(delivery.destination, destination);
    let status = outbox::ops::status(&test.db, 10).await.unwrap();
    assert_eq!(status.unroutable, Vec::new(), "routed again: {status:?}");
    test.drop_database().await;
}

/// `count` rows to `destination`, an hour old, on a fresh database, the memory broker in its
/// AMQP mode, and a relay to it with the default maximum backoff (an hour).
async fn hour_old_rows(
    backend: Backend,
    destination: &str,
    count: usize,
) -> (TestDb, MemoryTransport, Producer) {
    let test = TestDb::new(backend).await;
    let broker = MemoryTransport::new();
    broker.set_mandatory(true);
    enqueue_many(&test.db, destination, count).await;
    set_back(&test.db, destination, Duration::from_secs(3600)).await;
    let producer = Producer::builder(test.db.clone())
        .config(OutboxConfig::default())
        .transport(broker.clone())
        .isolation_transport(broker.new_connection())
        .build()
        .unwrap();
    (test, broker, producer)
}

/// The rows of `destination` due within `within` from now (by this process's clock).
async fn due_within(db: &DatabaseConnection, destination: &str, within: Duration) -> Vec<Row> {
    let horizon = chrono::Utc::now() + chrono::Duration::from_std(within).unwrap();
    rows(db)
        .await
        .into_iter()
        .filter(|row| row.destination == destination)
        .filter(|row| row.next_attempt_at.is_none_or(|at| at < horizon))
        .collect()
}

/// A durable queue `queue` bound to `destination` on the memory broker, and its deliveries.
async fn bind(broker: &MemoryTransport, destination: &str, queue: &str) -> Deliveries {
    broker
        .subscribe(Subscription {
            destination: destination.into(),
            id: queue.into(),
            ack: AckMode::Auto,
            headers: vec![
                ("x-queue-name".into(), queue.into()),
                ("durable".into(), "true".into()),
                ("auto-delete".into(), "false".into()),
            ],
        })
        .await
        .unwrap()
}

/// Against the memory broker on every backend: the rows of an unroutable destination wait
/// behind one probe (the oldest, tried again after half its age: 30 minutes for rows an hour
/// old), a new row to it is parked behind the same probe, and once a message to it routes every
/// waiting row of it goes at once.
async fn an_unroutable_destination_is_probed_by_one_row_and_its_rows_go_together_once_it_routes(
    backend: Backend,
) {
    let destination = "/topic/probed.v1";
    let (test, broker, producer) = hour_old_rows(backend, destination, 10).await;

    let report = producer.drain().await.unwrap();
    assert_eq!((report.sent, report.unroutable), (0, 10), "{report:?}");
    let oldest = rows(&test.db).await.remove(0).added;
    let soon = due_within(&test.db, destination, Duration::from_secs(45 * 60)).await;
    assert_eq!(soon.len(), 1, "one probe: {soon:?}");
    // Rows written in one transaction share their `added`: any of the oldest may probe.
    let probe = soon[0].clone();
    assert_eq!(probe.added, oldest, "an oldest row probes");
    let probed_at = soon[0].next_attempt_at.expect("a pause");
    let in_half_an_hour = chrono::Utc::now() + chrono::Duration::minutes(30);
    assert!(
        (probed_at - in_half_an_hour).num_seconds().abs() < 60,
        "half its age: {probed_at}"
    );
    assert!(rows(&test.db).await.iter().all(|row| row.retry == 0));
    let status = outbox::ops::status(&test.db, 10).await.unwrap();
    assert_eq!(status.unroutable, vec![(destination.to_owned(), 10)]);

    // A new row is sent once, returned, and parked behind the same probe.
    outbox::enqueue(&test.db, destination, &json!({"n": "new"}))
        .await
        .unwrap();
    let report = producer.drain().await.unwrap();
    assert_eq!(report.unroutable, 1, "{report:?}");
    let soon = due_within(&test.db, destination, Duration::from_secs(45 * 60)).await;
    assert_eq!(
        soon.iter().map(|row| row.id).collect::<Vec<_>>(),
        [probe.id]
    );

    // A consumer binds a queue: the next new row routes, and the eleven waiting rows go with it.
    let mut deliveries = bind(&broker, destination, "probed_q").await;
    outbox::enqueue(&test.db, destination, &json!({"n": "routed"}))
        .await
        .unwrap();
    let report = producer.drain().await.unwrap();
    assert_eq!((report.sent, report.unroutable), (12, 0), "{report:?}");
    assert!(
        rows(&test.db)
            .await
            .iter()
            .all(|row| row.status == Status::Succeeded)
    );
    for _ in 0..12 {
        tokio::time::timeout(Duration::from_secs(5), deliveries.recv())
            .await
            .expect("delivered")
            .expect("a delivery");
    }
    let status = outbox::ops::status(&test.db, 10).await.unwrap();
    assert_eq!(status.unroutable, Vec::new(), "routed again: {status:?}");
    test.drop_database().await;
}

/// Against the memory broker on every backend: `outbox declare` with a binding key that matches
/// an unroutable destination makes its waiting rows due at once and clears its record.
async fn declaring_a_queue_makes_the_waiting_rows_of_the_destinations_it_serves_due_at_once(
    backend: Backend,
) {
    let destination = "/topic/declared.v1";
    let (test, broker, producer) = hour_old_rows(backend, destination, 5).await;
    let report = producer.drain().await.unwrap();
    assert_eq!(report.unroutable, 5, "{report:?}");
    assert!(
        due_within(&test.db, destination, Duration::from_secs(60))
            .await
            .is_empty()
    );

    let topology = outbox::consumer::Topology::new(
        &OutboxConfig::default(),
        "/topic/declared.*",
        Some("declared_q"),
    )
    .unwrap();
    let declared = outbox::ops::declare(&test.db, &broker.new_connection(), &topology)
        .await
        .unwrap();
    assert_eq!(declared.woken, 5, "{declared:?}");
    assert!(declared.destinations.contains(&destination.to_owned()));
    assert_eq!(
        due_within(&test.db, destination, Duration::ZERO)
            .await
            .len(),
        5
    );
    let status = outbox::ops::status(&test.db, 10).await.unwrap();
    assert_eq!(status.unroutable, Vec::new(), "{status:?}");
    let report = producer.drain().await.unwrap();
    assert_eq!((report.sent, report.unroutable), (5, 0), "{report:?}");
    assert_eq!(broker.queue_len("declared_q"), 5);
    test.drop_database().await;
}

outbox_tests::on_every_backend!(
    the_relay_keeps_unroutable_rows_against_the_memory_broker_too,
    an_unroutable_destination_is_probed_by_one_row_and_its_rows_go_together_once_it_routes,
    declaring_a_queue_makes_the_waiting_rows_of_the_destinations_it_serves_due_at_once,
);

#[tokio::test]
async fn unroutable_fail_and_drop_policies() {
    let test = TestDb::new(Backend::Postgres).await;
    let destination = format!("/topic/{}", unique("amqp_policy"));
    outbox::enqueue(&test.db, &destination, &json!({"n": 1}))
        .await
        .unwrap();
    let mut config = amqp_config(RABBITMQ_AMQP);
    config.unroutable = outbox::config::Unroutable::Fail;
    let producer = Producer::builder(test.db.clone())
        .config(config.clone())
        .build()
        .unwrap();
    producer.drain().await.unwrap();
    let row = rows(&test.db).await.remove(0);
    assert_eq!(row.status, Status::Failed);
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .contains("no queue is bound to it")
    );

    let destination = format!("/topic/{}", unique("amqp_policy"));
    let dropped = outbox::enqueue(&test.db, &destination, &json!({"n": 2}))
        .await
        .unwrap();
    config.unroutable = outbox::config::Unroutable::Drop;
    let producer = Producer::builder(test.db.clone())
        .config(config)
        .build()
        .unwrap();
    producer.drain().await.unwrap();
    let row = Published::find_by_id(dropped.id)
        .one(&test.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, Status::Succeeded, "dropped, as over STOMP");
    test.drop_database().await;
}

/// A message as the relay sends it, with headers of every kind the STOMP plugin maps: the
/// ones it turns into AMQP properties and the ones it keeps in the headers table.
fn relay_like_message(destination: &str) -> Outgoing {
    let headers = [
        ("dop-msg-id", "6d3a2f4e-0000-4000-8000-000000000001"),
        ("dop-msg-destination", destination),
        ("dop-msg-type", "Published"),
        ("dop-msg-sent-time", "2026-12-01T10:00:00.123Z"),
        ("dop-correlation-id", "corr-1"),
        ("x-custom", "a:b wörld"),
        ("persistent", "true"),
        ("content-type", "application/json"),
        ("content-encoding", "utf-8"),
        ("correlation-id", "c-42"),
        ("reply-to", "/queue/replies"),
        ("priority", "4"),
        ("expiration", "600000"),
        ("amqp-message-id", "amqp-id-1"),
        ("timestamp", "1764583200"),
        ("type", "order.created"),
        ("app-id", "billing"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
    ];
    Outgoing {
        destination: destination.to_owned(),
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        body: r#"{"id": 1, "text": "wörld: colon\\backslash\nnewline"}"#
            .as_bytes()
            .to_vec(),
    }
}

/// A delivery's headers without the per-delivery ones.
fn comparable(headers: &[(String, String)]) -> BTreeMap<String, String> {
    const PER_DELIVERY: [&str; 6] = [
        "message-id",
        "subscription",
        "ack",
        "content-length",
        "redelivered",
        "receipt",
    ];
    let mut out = BTreeMap::new();
    for (name, value) in headers {
        if !PER_DELIVERY.contains(&name.as_str()) {
            out.entry(name.clone()).or_insert_with(|| value.clone());
        }
    }
    out
}

#[tokio::test]
async fn a_stomp_subscriber_sees_the_same_message_from_either_transport() {
    let key = unique("amqp_wire");
    let (mut reader, _cleanup) = topic_reader(&key).await;
    let message = relay_like_message(&format!("/topic/{key}"));
    let stomp = StompTransport::new(StompSettings::from(&OutboxConfig::default()))
        .expect("a STOMP transport");
    assert!(
        stomp
            .send(std::slice::from_ref(&message))
            .await
            .all_receipted()
    );
    let broker = amqp();
    assert!(
        broker
            .send(std::slice::from_ref(&message))
            .await
            .all_receipted()
    );

    let over_stomp = reader
        .next_message(Duration::from_secs(5))
        .await
        .expect("the STOMP-sent message");
    let over_amqp = reader
        .next_message(Duration::from_secs(5))
        .await
        .expect("the AMQP-sent message");
    assert_eq!(over_stomp.body, message.body);
    assert_eq!(over_amqp.body, message.body);
    let (stomp_seen, amqp_seen) = (
        comparable(&over_stomp.headers),
        comparable(&over_amqp.headers),
    );
    for name in stomp_seen.keys().chain(amqp_seen.keys()) {
        assert_eq!(
            stomp_seen.get(name),
            amqp_seen.get(name),
            "header `{name}` differs: STOMP {stomp_seen:?}, AMQP {amqp_seen:?}"
        );
    }
    assert_eq!(
        amqp_seen.get("persistent").map(String::as_str),
        Some("true")
    );
    assert_eq!(amqp_seen.get("priority").map(String::as_str), Some("4"));
}

#[tokio::test]
async fn destinations_route_as_over_stomp() {
    let broker = amqp();
    // A SEND to a queue destination declares the queue, as the STOMP plugin does.
    let queue = unique("amqp_queue_dest");
    let _cleanup = QueueCleanup(vec![queue.clone(), format!("bare_{queue}")]);
    for destination in [format!("/queue/{queue}"), format!("bare_{queue}")] {
        let report = broker
            .send(&[Outgoing {
                destination: destination.clone(),
                headers: vec![],
                body: b"{}".to_vec(),
            }])
            .await;
        assert_eq!(report.outcomes, vec![Outcome::Receipted], "{destination}");
    }
    eventually(
        Duration::from_secs(10),
        "both queues hold their message",
        || {
            let queue = queue.clone();
            async move {
                queue_message_count(&queue) == Some(1)
                    && queue_message_count(&format!("bare_{queue}")) == Some(1)
            }
        },
    )
    .await;
    // What the plugin refuses, and a missing exchange: refused, the others unaffected.
    let missing = format!("/exchange/{}/k", unique("missing"));
    let report = broker
        .send(&[
            Outgoing {
                destination: "/topic/a/b".into(),
                headers: vec![],
                body: b"{}".to_vec(),
            },
            Outgoing {
                destination: missing,
                headers: vec![],
                body: b"{}".to_vec(),
            },
            Outgoing {
                destination: format!("/queue/{queue}"),
                headers: vec![],
                body: b"{}".to_vec(),
            },
        ])
        .await;
    assert!(
        matches!(report.outcomes[0], Outcome::Refused(_)),
        "{report:?}"
    );
    assert!(
        matches!(report.outcomes[1], Outcome::Refused(_)),
        "{report:?}"
    );
    assert_eq!(report.outcomes[2], Outcome::Receipted);
}

#[tokio::test]
async fn a_poison_publish_charges_only_its_row() {
    let test = TestDb::new(Backend::Postgres).await;
    let mut poisoned = poison_among_goods(&test.db, "amqp_poison").await;
    let mut config = amqp_config(RABBITMQ_AMQP);
    config.maximum_retry_attempts = 3;
    let producer = Producer::builder(test.db.clone())
        .config(config)
        .build()
        .unwrap();
    let report = producer.drain().await.unwrap();
    // Each attempt of the poison row is refused before anything is published (the passive
    // check of its exchange), and charged to it alone.
    assert_eq!((report.sent, report.refused), (6, 3), "{report:?}");
    for row in rows(&test.db).await {
        if row.id == poisoned.bad.id {
            assert_eq!(row.retry, 3);
            assert_eq!(row.status, Status::Failed);
            let error = row.last_error.unwrap();
            assert!(
                error.contains("404") || error.contains("NOT_FOUND"),
                "{error}"
            );
        } else {
            assert_eq!((row.status, row.retry), (Status::Succeeded, 0));
        }
    }
    for _ in 0..6 {
        poisoned
            .reader
            .next_message(Duration::from_secs(5))
            .await
            .expect("each good message arrives");
    }
    test.drop_database().await;
}

#[tokio::test]
async fn fails_over_past_a_refused_address() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let urls = format!("amqp://guest:guest@127.0.0.1:{port}/%2f,{RABBITMQ_AMQP}");
    let broker = AmqpSettings::try_from(&amqp_config(&urls))
        .and_then(AmqpTransport::new)
        .unwrap();
    let queue = unique("amqp_failover");
    let _cleanup = QueueCleanup(vec![queue.clone()]);
    let report = broker
        .send(&[Outgoing {
            destination: format!("/queue/{queue}"),
            headers: vec![],
            body: b"{}".to_vec(),
        }])
        .await;
    assert_eq!(report.outcomes, vec![Outcome::Receipted]);

    // Only refused addresses: a connection error naming them, without the password.
    let secret_urls = format!("amqp://guest:Zebra-s3cr3t@127.0.0.1:{port}/%2f");
    let broker = AmqpSettings::try_from(&amqp_config(&secret_urls))
        .and_then(AmqpTransport::new)
        .unwrap();
    let err = broker.connect().await.expect_err("nothing listens there");
    let text = err.to_string();
    assert!(text.contains(&port.to_string()), "{text}");
    assert!(!text.contains("Zebra-s3cr3t"), "{text}");
}

#[tokio::test]
async fn stomp_and_amqp_consumers_share_queues_in_either_declaration_order() {
    for stomp_first in [true, false] {
        let key = unique("amqp_mixed");
        let destination = format!("/topic/{key}");
        let queue = format!("{key}_q");
        let _cleanup = QueueCleanup(vec![queue.clone(), format!("DLQ.{queue}")]);
        let config = OutboxConfig::default();
        let topology =
            outbox::consumer::Topology::new(&config, &destination, Some(&queue)).unwrap();
        let stomp = StompTransport::new(StompSettings::from(&config)).unwrap();
        let broker = amqp();
        let order: [&dyn Transport; 2] = if stomp_first {
            [&stomp, &broker]
        } else {
            [&broker, &stomp]
        };
        for transport in order {
            topology
                .declare(transport)
                .await
                .unwrap_or_else(|e| panic!("declare (STOMP first: {stomp_first}): {e}"));
        }
        // One message, consumed by whichever subscriber the broker picks; a rejected one goes
        // to the dead-letter queue declared by either.
        let mut peer = StompPeer::connect(RABBITMQ_STOMP).await.unwrap();
        let subscription = topology.subscription("stomp-sub");
        let headers: Vec<(&str, &str)> = subscription
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        peer.subscribe(&destination, &headers).await.unwrap();
        let mut deliveries = broker
            .subscribe(topology.subscription("amqp-sub"))
            .await
            .expect("the AMQP consumer subscribes to the shared queue");
        broker
            .send(&[relay_like_message(&destination)])
            .await
            .all_receipted()
            .then_some(())
            .expect("sent");
        tokio::select! {
            frame = peer.next_message(Duration::from_secs(5)) => {
                let frame = frame.expect("a delivery");
                peer.nack(&frame).await.unwrap();
            }
            delivery = deliveries.recv() => {
                let delivery = delivery.expect("a delivery");
                assert_eq!(delivery.header("dop-msg-type"), Some("Published"));
                assert_eq!(delivery.destination, destination);
                broker.nack(&delivery).await.unwrap();
            }
        }
        let dead_letters = format!("DLQ.{queue}");
        eventually(
            Duration::from_secs(10),
            "the rejected message is dead-lettered",
            || {
                let dead_letters = dead_letters.clone();
                async move { queue_message_count(&dead_letters) == Some(1) }
            },
        )
        .await;
        let _ = peer.disconnect().await;
        broker.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed_over_amqp() {
    let key = unique("amqp_dlq");
    let destination = format!("/topic/{key}");
    let queue = format!("{key}_q");
    let dead_letters = format!("DLQ.{queue}");
    let _cleanup = QueueCleanup(vec![queue.clone(), dead_letters.clone()]);
    let config = OutboxConfig::default();
    let topology = outbox::consumer::Topology::new(&config, &destination, Some(&queue)).unwrap();
    let broker = amqp();
    topology.declare(&broker).await.unwrap();
    let mut deliveries = broker.subscribe(topology.subscription("s")).await.unwrap();
    let sent = broker
        .send(&[
            relay_like_message(&destination),
            relay_like_message(&destination),
        ])
        .await;
    assert!(sent.all_receipted(), "{sent:?}");
    for _ in 0..2 {
        let delivery = tokio::time::timeout(Duration::from_secs(5), deliveries.recv())
            .await
            .expect("in time")
            .expect("a delivery");
        broker.nack(&delivery).await.unwrap();
    }
    broker.unsubscribe("s").await.unwrap();
    eventually(Duration::from_secs(10), "two dead letters", || {
        let dead_letters = dead_letters.clone();
        async move { queue_message_count(&dead_letters) == Some(2) }
    })
    .await;

    let listed = outbox::ops::dlq_list(&amqp(), &queue, 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].header("dop-msg-type"), Some("Published"));
    assert_eq!(
        listed[0].header("x-first-death-queue"),
        Some(queue.as_str())
    );
    let replay = outbox::ops::dlq_replay(&amqp(), &queue, None)
        .await
        .unwrap();
    assert_eq!(replay.replayed, 2);
    eventually(Duration::from_secs(10), "both back in the queue", || {
        let (queue, dead_letters) = (queue.clone(), dead_letters.clone());
        async move {
            queue_message_count(&queue) == Some(2) && queue_message_count(&dead_letters) == Some(0)
        }
    })
    .await;
}

#[tokio::test]
async fn the_consumer_resubscribes_after_the_broker_cancels_it() {
    let key = unique("amqp_cancel");
    let destination = format!("/topic/{key}");
    let queue = format!("{key}_q");
    let _cleanup = QueueCleanup(vec![queue.clone(), format!("DLQ.{queue}")]);
    let config = OutboxConfig::default();
    let topology = outbox::consumer::Topology::new(&config, &destination, Some(&queue)).unwrap();
    let broker = amqp();
    let mut deliveries = broker.subscribe(topology.subscription("s1")).await.unwrap();
    outbox_tests::stomp_peer::delete_queue(&queue);
    // The broker cancels the consumer: the deliveries end, and subscribing again declares the
    // queue again on the same connection.
    let ended = tokio::time::timeout(Duration::from_secs(10), deliveries.recv()).await;
    assert!(matches!(ended, Ok(None)), "the deliveries end");
    let mut deliveries = broker.subscribe(topology.subscription("s2")).await.unwrap();
    assert!(
        broker
            .send(&[relay_like_message(&destination)])
            .await
            .all_receipted()
    );
    let delivery = tokio::time::timeout(Duration::from_secs(5), deliveries.recv())
        .await
        .expect("in time")
        .expect("a delivery");
    broker.ack(&delivery).await.unwrap();
}

/// Two consumers of one queue declared with RabbitMQ's single active consumer: every message
/// goes to the first, and once it stops, to the second. Without the argument the broker would
/// spread them over both.
#[tokio::test]
async fn a_single_active_consumer_takes_every_message_until_it_stops() {
    let test = TestDb::new(Backend::Postgres).await;
    let key = unique("amqp_sac");
    let destination = format!("/topic/{key}");
    let queue = format!("{key}_q");
    let _cleanup = QueueCleanup(vec![queue.clone(), format!("DLQ.{queue}")]);
    let seen: Arc<std::sync::Mutex<Vec<(&'static str, i64)>>> = Arc::default();
    let start = |name: &'static str| {
        let seen = seen.clone();
        outbox::Consumer::builder(test.db.clone())
            .destination(&destination)
            .queue(&queue)
            .config(amqp_config(RABBITMQ_AMQP))
            .transport(amqp())
            .in_flight(4)
            .prefetch(40)
            .single_active_consumer()
            .start(move |payload: outbox::Payload| {
                let seen = seen.clone();
                async move {
                    let n = payload.body()["n"].as_i64().unwrap_or(-1);
                    seen.lock().unwrap().push((name, n));
                    payload.save();
                    Ok::<_, outbox::Error>(())
                }
            })
            .expect("a consumer")
    };
    let first = start("first");
    let seen_count = |wanted: usize| {
        let seen = seen.clone();
        move || {
            let seen = seen.clone();
            async move { seen.lock().unwrap().len() >= wanted }
        }
    };
    // The first consumer declares the queue before the second subscribes.
    eventually(Duration::from_secs(10), "the queue is declared", || {
        let queue = queue.clone();
        async move { queue_message_count(&queue).is_some() }
    })
    .await;
    let second = start("second");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let broker = amqp();
    let batch = |from: i64| -> Vec<Outgoing> {
        (from..from + 20)
            .map(|n| {
                let mut message = relay_like_message(&destination);
                message.body = json!({ "n": n }).to_string().into_bytes();
                // A message id of its own: the inbox skips repeated ids.
                for (name, value) in &mut message.headers {
                    if name == "dop-msg-id" {
                        *value = format!("6d3a2f4e-0000-4000-8000-{n:012}");
                    }
                }
                message
            })
            .collect()
    };
    assert!(broker.send(&batch(0)).await.all_receipted());
    eventually(
        Duration::from_secs(15),
        "20 messages processed",
        seen_count(20),
    )
    .await;
    first.stop().await.unwrap();
    assert!(broker.send(&batch(20)).await.all_receipted());
    eventually(
        Duration::from_secs(15),
        "40 messages processed",
        seen_count(40),
    )
    .await;
    second.stop().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let by = |name: &str| -> Vec<i64> {
        let mut ns: Vec<i64> = seen
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, n)| *n)
            .collect();
        ns.sort_unstable();
        ns
    };
    assert_eq!(by("first"), (0..20).collect::<Vec<_>>(), "{seen:?}");
    assert_eq!(by("second"), (20..40).collect::<Vec<_>>(), "{seen:?}");
    broker.disconnect().await.unwrap();
}

/// Over STOMP a single active consumer is refused at build and by `declare`: RabbitMQ's STOMP
/// plugin would declare the queue without the argument.
#[tokio::test]
async fn a_single_active_consumer_is_refused_over_stomp() {
    let test = TestDb::new(Backend::Sqlite).await;
    let config = OutboxConfig::default();
    let refused = outbox::Consumer::builder(test.db.clone())
        .destination("/topic/sac_over_stomp")
        .config(config.clone())
        .transport(StompTransport::new(StompSettings::from(&config)).unwrap())
        .single_active_consumer()
        .build()
        .err()
        .expect("refused over STOMP");
    assert!(
        matches!(&refused, outbox::Error::Config { variable, .. } if variable == "x-single-active-consumer"),
        "{refused}"
    );
    let topology = outbox::consumer::Topology::new(&config, "/topic/sac_over_stomp", None)
        .unwrap()
        .with_single_active_consumer(true);
    let refused = topology
        .declare(&StompTransport::new(StompSettings::from(&config)).unwrap())
        .await
        .expect_err("declare refuses it over STOMP");
    assert!(refused.to_string().contains("AMQP"), "{refused}");
}

// ---------------------------------------------------------------------------------------------
// TLS: a tokio-rustls acceptor in front of RabbitMQ's AMQP port, asking for a client certificate
// ---------------------------------------------------------------------------------------------

/// A TLS front for 127.0.0.1:5672 that requires a client certificate of `client_ca`; returns
/// its port and how many handshakes succeeded.
async fn tls_front(ca: &Ca) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let server = ca.server(&["broker.test"]);
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server.der.clone()], server.key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Ok(mut broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
            });
        }
    });
    (port, handshakes)
}

#[tokio::test]
async fn amqps_with_a_private_ca_and_a_client_certificate() {
    let ca = Ca::new("outbox amqp test CA");
    let (port, handshakes) = tls_front(&ca).await;
    let files = Files::new();
    let client = ca.client("outbox test");
    let mut config = amqp_config(&format!("amqps://guest:guest@127.0.0.1:{port}/%2f"));
    config.stomp_ca_certs = Some(files.write("ca.pem", &ca.pem));
    config.stomp_cert_file = Some(files.write("client.pem", &client.cert_pem));
    config.stomp_key_file = Some(files.write("client.key", &client.key_pem));
    config.stomp_tls_server_name = Some("broker.test".into());
    let broker = AmqpSettings::try_from(&config)
        .and_then(AmqpTransport::new)
        .expect("TLS settings read");
    let queue = unique("amqp_tls");
    let _cleanup = QueueCleanup(vec![queue.clone()]);
    let report = broker
        .send(&[Outgoing {
            destination: format!("/queue/{queue}"),
            headers: vec![],
            body: b"{}".to_vec(),
        }])
        .await;
    assert_eq!(report.outcomes, vec![Outcome::Receipted]);
    assert_eq!(handshakes.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Without the client certificate the front refuses the handshake.
    let mut anonymous = config.clone();
    anonymous.stomp_cert_file = None;
    anonymous.stomp_key_file = None;
    let err = AmqpSettings::try_from(&anonymous)
        .and_then(AmqpTransport::new)
        .unwrap()
        .connect()
        .await
        .expect_err("no client certificate");
    assert!(
        matches!(err, outbox::transport::TransportError::Connect { .. }),
        "{err}"
    );
    // A server name the certificate does not carry is refused too.
    let mut wrong_name = config.clone();
    wrong_name.stomp_tls_server_name = Some("other.test".into());
    AmqpSettings::try_from(&wrong_name)
        .and_then(AmqpTransport::new)
        .unwrap()
        .connect()
        .await
        .expect_err("the certificate names broker.test");
    assert_eq!(handshakes.load(std::sync::atomic::Ordering::SeqCst), 1);
}
