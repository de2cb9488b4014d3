//! The relay against the in-memory broker where it shares one connection between batches as
//! RabbitMQ's does: a refusal failing every batch in flight, a message passed over silently, a
//! broker that blocks publishers, a settle outlasting its lease; and rows written without the
//! generated headers, on every backend and through the real RabbitMQ. (The same faults against
//! the real RabbitMQ: `outbox-cli/tests/faults_relay.rs`.)

use std::collections::HashMap;
use std::time::Duration;

use outbox::tables::published::Status;
use outbox::transport::MemoryTransport;
use outbox::{OutboxConfig, Producer, Published};
use outbox_tests::rows::{enqueue_many, rows};
use outbox_tests::stomp_peer::{RABBITMQ_STOMP, topic_reader, unique};
use outbox_tests::{Backend, TestDb, on_every_backend};
use sea_orm::{ConnectionTrait, EntityTrait, Statement};
use serde_json::json;

fn config() -> OutboxConfig {
    let (host, port) = RABBITMQ_STOMP.rsplit_once(':').expect("host:port");
    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = vec![(host.to_owned(), port.parse().expect("port"))];
    config.receipt_timeout = Duration::from_secs(2);
    config.producer_lease = Duration::from_secs(3);
    config.maximum_backoff = Duration::from_millis(300);
    config.pause_for_retry = Duration::ZERO;
    config.wait_retry = Duration::ZERO;
    config
}

/// Copies per message id in what the broker routed.
fn copies(memory: &MemoryTransport) -> HashMap<String, usize> {
    let mut copies = HashMap::new();
    for message in memory.sent() {
        let id = message.header("dop-msg-id").unwrap_or_default().to_owned();
        *copies.entry(id).or_default() += 1;
    }
    copies
}

on_every_backend!(
    a_refusal_failing_every_batch_in_flight_charges_only_the_culprit,
    a_row_passed_over_silently_is_charged_and_the_rows_behind_it_flow,
    a_blocked_broker_charges_nobody,
    rows_written_without_generated_headers_go_out_with_them,
);

async fn a_refusal_failing_every_batch_in_flight_charges_only_the_culprit(backend: Backend) {
    let test = TestDb::new(backend).await;
    enqueue_many(&test.db, "/topic/fine", 500).await;
    let culprit = outbox::enqueue(&test.db, "/exchange/missing/x", &json!({}))
        .await
        .unwrap()
        .id;
    enqueue_many(&test.db, "/topic/fine", 500).await;
    let memory = MemoryTransport::new();
    memory.refuse("/exchange/missing");
    // Receipts come late, so that the three batches are in flight together when the refusal
    // closes the connection under them.
    memory.set_receipt_delay(Duration::from_millis(30));
    let mut settings = config();
    settings.published_chunk_size = 100;
    settings.maximum_retry_attempts = 3;
    let producer = Producer::builder(test.db.clone())
        .config(settings)
        .transport(memory.clone())
        .isolation_transport(memory.new_connection())
        .build()
        .unwrap();
    for _ in 0..10 {
        producer.drain().await.unwrap();
    }
    for row in rows(&test.db).await {
        if row.id == culprit {
            assert_eq!((row.status, row.retry), (Status::Failed, 3), "{row:?}");
            assert!(row.last_error.unwrap().contains("NOT_FOUND"));
        } else {
            assert_eq!(
                (row.status, row.retry, row.last_error.as_deref()),
                (Status::Succeeded, 0, None),
                "{row:?}"
            );
        }
    }
    let copies = copies(&memory);
    let total: usize = copies.values().sum();
    assert_eq!(copies.len(), 1000, "every good row routed");
    // How many batches were in flight when the refusal closed the connection depends on timing:
    // the copies it caused are bounded, not counted.
    println!("{total} copies for 1000 rows");
    assert!(total <= 1000 + 3 * 100, "{total} copies for 1000 rows");
    test.drop_database().await;
}

async fn a_row_passed_over_silently_is_charged_and_the_rows_behind_it_flow(backend: Backend) {
    let test = TestDb::new(backend).await;
    let silent = outbox::enqueue(&test.db, "/topic/silent", &json!({}))
        .await
        .unwrap()
        .id;
    enqueue_many(&test.db, "/topic/fine", 50).await;
    let memory = MemoryTransport::new();
    memory.discard("/topic/silent");
    memory.set_receipt_timeout(Duration::from_millis(300));
    let producer = Producer::builder(test.db.clone())
        .config(config())
        .transport(memory.clone())
        .build()
        .unwrap();
    let report = producer.round().await.unwrap();
    assert_eq!((report.claimed, report.sent, report.refused), (51, 50, 1));
    let row = Published::find_by_id(silent)
        .one(&test.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((row.status, row.retry), (Status::Schedule, 1));
    assert!(
        row.last_error
            .unwrap()
            .starts_with("not receipted while later messages")
    );
    // Alone now, alongside the later rows, it is charged again while they flow.
    enqueue_many(&test.db, "/topic/fine", 50).await;
    let report = producer.round().await.unwrap();
    assert_eq!((report.sent, report.refused), (50, 1));
    // With nothing sent after it, a timeout proves nothing: it is given back uncharged.
    let report = producer.round().await.unwrap();
    assert_eq!((report.claimed, report.released, report.refused), (1, 1, 0));
    let row = Published::find_by_id(silent)
        .one(&test.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.retry, 2);
    test.drop_database().await;
}

async fn a_blocked_broker_charges_nobody(backend: Backend) {
    let test = TestDb::new(backend).await;
    enqueue_many(&test.db, "/topic/fine", 30).await;
    let memory = MemoryTransport::new();
    memory.set_receipt_timeout(Duration::from_millis(300));
    let producer = Producer::builder(test.db.clone())
        .config(config())
        .transport(memory.clone())
        .build()
        .unwrap();
    memory.set_blocked(true);
    let report = producer.round().await.unwrap();
    assert_eq!(
        (report.claimed, report.released, report.refused),
        (30, 30, 0)
    );
    assert!(memory.sent().is_empty(), "nothing read while blocked");
    memory.set_blocked(false);
    // What waited unread is read now: the resend duplicates it, and nobody was charged.
    let report = producer.drain().await.unwrap();
    assert_eq!(report.sent, 30);
    assert!(rows(&test.db).await.iter().all(|row| row.retry == 0));
    test.drop_database().await;
}

async fn rows_written_without_generated_headers_go_out_with_them(backend: Backend) {
    let test = TestDb::new(backend).await;
    let key = unique("relay_bare_row");
    let (mut reader, _cleanup) = topic_reader(&key).await;
    let destination = format!("/topic/{key}");
    let id = uuid::Uuid::new_v4();
    // As SQL, a trigger or another tool writes it: no dop-* headers.
    let (body, headers, added, expires) = match backend {
        Backend::Postgres => (
            "'{\"a\": 1}'::jsonb",
            "'{\"x-custom\": \"kept\"}'::jsonb",
            "now()",
            "now() + interval '1 day'",
        ),
        Backend::MariaDb => (
            "'{\"a\": 1}'",
            "'{\"x-custom\": \"kept\"}'",
            "UTC_TIMESTAMP(6)",
            "UTC_TIMESTAMP(6) + INTERVAL 1 DAY",
        ),
        Backend::Sqlite => (
            "'{\"a\": 1}'",
            "'{\"x-custom\": \"kept\"}'",
            "strftime('%Y-%m-%d %H:%M:%f+00:00', 'now')",
            "strftime('%Y-%m-%d %H:%M:%f+00:00', 'now', '+1 day')",
        ),
    };
    let id_literal = match backend {
        Backend::Postgres => format!("'{id}'"),
        Backend::MariaDb => format!("UNHEX('{}')", id.simple()),
        Backend::Sqlite => format!("X'{}'", id.simple()),
    };
    test.db
        .execute_raw(Statement::from_string(
            test.db.get_database_backend(),
            format!(
                "INSERT INTO published (id, destination, body, headers, added, expires_at, retry, status) \
                 VALUES ({id_literal}, '{destination}', {body}, {headers}, {added}, {expires}, 0, 1)"
            ),
        ))
        .await
        .expect("insert a bare row");
    let producer = Producer::builder(test.db.clone())
        .config(config())
        .build()
        .unwrap();
    let report = producer.drain().await.unwrap();
    assert_eq!(report.sent, 1);
    let frame = reader
        .next_message(Duration::from_secs(5))
        .await
        .expect("the row arrives");
    let id = id.to_string();
    assert_eq!(frame.header("dop-msg-id"), Some(id.as_str()));
    assert_eq!(
        frame.header("dop-msg-destination"),
        Some(destination.as_str())
    );
    assert_eq!(frame.header("dop-msg-type"), Some("Published"));
    assert_eq!(frame.header("dop-correlation-id"), Some(id.as_str()));
    assert!(
        frame
            .header("dop-msg-sent-time")
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert_eq!(frame.header("x-custom"), Some("kept"));
    test.drop_database().await;
}

#[tokio::test]
async fn a_settle_outlasting_its_lease_extends_it_and_no_other_relay_takes_the_rows() {
    let test = TestDb::new(Backend::Postgres).await;
    // A culprit and rows to eight destinations never seen: isolation sends each alone, with
    // late receipts: about 8 x 0.5 s, longer than the 3 s lease.
    outbox::enqueue(&test.db, "/exchange/missing/x", &json!({}))
        .await
        .unwrap();
    for n in 0..8 {
        enqueue_many(&test.db, &format!("/topic/lease.{n}"), 1).await;
    }
    let memory = MemoryTransport::new();
    memory.refuse("/exchange/missing");
    memory.set_receipt_delay(Duration::from_millis(500));
    let first = Producer::builder(test.db.clone())
        .config(config())
        .transport(memory.clone())
        .isolation_transport(memory.new_connection())
        .build()
        .unwrap();
    let other_broker = MemoryTransport::new();
    other_broker.refuse("/exchange/missing");
    let second = Producer::builder(test.db.clone())
        .config(config())
        .transport(other_broker.clone())
        .build()
        .unwrap();
    let settling = tokio::spawn(async move { first.round().await });
    let watching = async {
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            second.round().await.unwrap();
        }
    };
    watching.await;
    let report = settling.await.unwrap().unwrap();
    assert_eq!((report.claimed, report.sent, report.refused), (9, 8, 1));
    let taken: Vec<_> = other_broker
        .sent()
        .into_iter()
        .filter(|m| m.destination.starts_with("/topic/lease."))
        .collect();
    assert!(
        taken.is_empty(),
        "the other relay took rows under a live lease: {taken:?}"
    );
    test.drop_database().await;
}
