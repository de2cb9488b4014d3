//! The relay against a queue full with `x-overflow: reject-publish`, in the in-memory broker:
//! answered with a nack (as over AMQP) or with the connection closed under every pending
//! receipt (as RabbitMQ 3.10's STOMP plugin does). Its rows are never marked sent nor charged,
//! the rows to other destinations flow, and once the queue has room its rows go out. (Against
//! the real RabbitMQ: the fault scenarios `reject_publish` and `reject_publish_amqp`.)

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox::tables::published::Status;
use outbox::transport::{MemoryTransport, Outgoing, Transport};
use outbox::{OutboxConfig, Producer};
use outbox_tests::rows::{enqueue_many, rows};
use outbox_tests::{Backend, TestDb, eventually, on_every_backend};
use serde_json::json;

/// The full queue, and the destination that reaches it without declaring anything.
const FULL_QUEUE: &str = "rejecting_q";
const FULL: &str = "/amq/queue/rejecting_q";
/// A destination that works.
const FINE: &str = "/queue/fine_q";

fn config() -> OutboxConfig {
    let mut config = OutboxConfig::default();
    config.receipt_timeout = Duration::from_secs(2);
    config.producer_lease = Duration::from_secs(4);
    config.maximum_backoff = Duration::from_millis(300);
    config.producer_waiting_time = Duration::from_millis(100);
    config.published_chunk_size = 50;
    config.maximum_retry_attempts = 3;
    config.pause_for_retry = Duration::ZERO;
    config.wait_retry = Duration::ZERO;
    config
}

on_every_backend!(
    a_publish_nacked_by_a_full_queue_waits_uncharged_and_goes_out_once_it_has_room,
    a_connection_closed_by_a_full_queue_charges_nobody_and_the_other_rows_flow,
);

async fn a_publish_nacked_by_a_full_queue_waits_uncharged_and_goes_out_once_it_has_room(
    backend: Backend,
) {
    rejected_publishes(backend, true).await;
}

async fn a_connection_closed_by_a_full_queue_charges_nobody_and_the_other_rows_flow(
    backend: Backend,
) {
    rejected_publishes(backend, false).await;
}

/// `mandatory`: the broker answers as it answers AMQP (a nack), else as STOMP (a close).
async fn rejected_publishes(backend: Backend, mandatory: bool) {
    let test = TestDb::new(backend).await;
    let memory = MemoryTransport::new();
    memory.set_mandatory(mandatory);
    memory.limit_queue(FULL_QUEUE, Some(3));
    let filler: Vec<Outgoing> = (0..3)
        .map(|n| Outgoing {
            destination: FULL.to_owned(),
            headers: Vec::new(),
            body: format!("{{\"filler\": {n}}}").into_bytes(),
        })
        .collect();
    assert!(memory.send(&filler).await.all_receipted());
    // Rows to the full queue among rows to a destination that works, in every batch.
    for _ in 0..10 {
        enqueue_many(&test.db, FINE, 20).await;
        outbox::enqueue(&test.db, FULL, &json!({"to": "full"}))
            .await
            .unwrap();
    }
    let producer = Producer::builder(test.db.clone())
        .config(config())
        .transport(memory.clone())
        .isolation_transport(memory.new_connection())
        .build()
        .unwrap();
    let started = Instant::now();
    let mut deferred = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let report = producer.drain().await.unwrap();
        assert_eq!(report.refused, 0, "{report:?}");
        deferred += report.deferred;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all = rows(&test.db).await;
    let (full, fine): (Vec<_>, Vec<_>) = all.iter().partition(|row| row.destination == FULL);
    assert!(
        fine.iter().all(|row| row.status == Status::Succeeded),
        "the rows to the working destination flowed"
    );
    assert!(
        full.iter()
            .all(|row| row.status == Status::Schedule && row.retry == 0),
        "rejected rows are neither sent nor charged: {full:?}"
    );
    assert_eq!(
        memory.queue_len(FULL_QUEUE),
        3,
        "the full queue took nothing"
    );
    assert!(deferred >= 10, "the rejected rows waited: {deferred}");
    // Probes 2 s, then 4 s apart: a handful of connections, not a reconnection per round.
    assert!(
        memory.connect_count() <= 8,
        "{} connections in 3 s",
        memory.connect_count()
    );

    // Room, and the relay running: the rows go out, each once.
    memory.limit_queue(FULL_QUEUE, None);
    let relay = Producer::builder(test.db.clone())
        .config(config())
        .transport(memory.clone())
        .isolation_transport(memory.new_connection())
        .start()
        .unwrap();
    let db = test.db.clone();
    eventually(Duration::from_secs(20), "the rejected rows sent", || {
        let db = db.clone();
        async move {
            rows(&db)
                .await
                .iter()
                .all(|row| row.status == Status::Succeeded)
        }
    })
    .await;
    relay.stop().await.unwrap();
    let ids: Vec<String> = memory
        .queue_messages(FULL_QUEUE)
        .iter()
        .filter_map(|message| message.header("dop-msg-id").map(str::to_owned))
        .collect();
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        (ids.len(), distinct.len()),
        (10, 10),
        "each rejected row once"
    );
    assert!(rows(&test.db).await.iter().all(|row| row.retry == 0));
    test.drop_database().await;
}
