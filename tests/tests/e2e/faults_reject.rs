//! A queue full with `x-overflow: reject-publish` (declared over AMQP with `x-max-length`, bound
//! to `amq.topic` so that the relay's `/topic/<name>` reaches it without declaring anything),
//! and rows to it among rows to a destination that works. Over AMQP the broker nacks each
//! rejected publish; over STOMP RabbitMQ 3.10's plugin closes the connection with no ERROR and
//! no receipt for anything pending. Either way: no row the broker dropped is marked sent (the
//! queue holds exactly the rows to it marked sent), nobody is charged, the rows to the working
//! destination flow, the relay reconnects at most 10 times a minute (counted at a TCP proxy
//! between the relay and RabbitMQ), and once a consumer drains the queue every row is delivered
//! within 30 s, each effect exactly once. Summary lines `fault.reject_publish` (STOMP) and
//! `fault.reject_publish_amqp`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox::tables::published::{Column, Status};
use outbox::{Consumer, Producer, Published};
use outbox_tests::TestDb;
use outbox_tests::db::Backend;
use outbox_tests::faults::*;
use outbox_tests::limited_queue::LimitedQueue;
use outbox_tests::proxy::FaultProxy;
use outbox_tests::stomp_peer::{QueueCleanup, RABBITMQ_STOMP, queue_message_count};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};

/// What the limited queue holds: it is filled to this before the scenario starts.
const MAX_LENGTH: usize = 20;
/// Rows to the full queue written once it is full (no more than it holds once drained).
const REJECTED_ROWS: usize = 20;
/// Rows to the working destination, interleaved with them.
const FINE_ROWS: usize = 300;
/// How long the queue stays full while the relay runs.
const FULL_FOR: Duration = Duration::from_secs(30);
/// The most reconnections allowed in a minute (so in `FULL_FOR`, too).
const MAX_RECONNECTIONS: usize = 10;
/// Delivery resumes within this once the queue has room.
const RESUMES_WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_publish() {
    reject_publish_over(TransportKind::Stomp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_publish_amqp() {
    reject_publish_over(TransportKind::Amqp).await;
}

/// The rows to `destination`, and how many of them are marked sent.
async fn sent_to(db: &DatabaseConnection, destination: &str) -> (usize, usize) {
    let rows = Published::find()
        .filter(Column::Destination.eq(destination))
        .all(db)
        .await
        .expect("read the outbox");
    let sent = rows
        .iter()
        .filter(|row| row.status == Status::Succeeded)
        .count();
    (rows.len(), sent)
}

async fn reject_publish_over(kind: TransportKind) {
    let started = Instant::now();
    let name = kind.summary_name("reject_publish");
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let full = LimitedQueue::declare("fault_reject_full", MAX_LENGTH as u32).await;
    let _dead_letters = QueueCleanup(vec![format!("DLQ.{}", full.name)]);
    let full_destination = full.topic();
    let (fine, fine_queue, wire_queue, _cleanup) = fresh_destination("fault_reject_fine");
    declare_consumer_queues_over(kind, &fine).await;
    let mut wire = WireCounter::start(&fine, &wire_queue).await;
    let fine_consumer = Consumer::builder(pool(&test.url, 4).await)
        .config(kind.config())
        .destination(&fine)
        .in_flight(8)
        .start(record_effect)
        .unwrap();

    // The queue filled by the relay itself: rows that count like the others.
    enqueue_many(&test.db, &full_destination, MAX_LENGTH, 0).await;
    relay_everything(&test.db, kind.config(), MAX_LENGTH).await;
    assert_eq!(queue_message_count(&full.name), Some(MAX_LENGTH));

    // Rows to the full queue among rows to the working destination, in every batch.
    let per_rejected = FINE_ROWS / REJECTED_ROWS;
    for n in 0..REJECTED_ROWS {
        enqueue_many(&test.db, &fine, per_rejected, n * per_rejected).await;
        enqueue_many(&test.db, &full_destination, 1, MAX_LENGTH + n).await;
    }
    let proxy = FaultProxy::start(kind.broker_addr()).await;
    let relay = Producer::builder(pool(&test.url, 4).await)
        .config(kind.config_at(proxy.addr()))
        .start()
        .unwrap();
    let full_since = Instant::now();

    // The working destination flows while the queue stays full.
    let mut fine_flowed = None;
    while full_since.elapsed() < FULL_FOR {
        if fine_flowed.is_none() && sent_to(&test.db, &fine).await == (FINE_ROWS, FINE_ROWS) {
            fine_flowed = Some(full_since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let Some(fine_flowed) = fine_flowed else {
        let sent = sent_to(&test.db, &fine).await;
        panic!("the working destination did not flow: (rows, sent) = {sent:?}");
    };
    // The connections the relay opened while the queue was full: the first of its two
    // transports (the shared one and the isolation lane's), then reconnections.
    let connections = proxy.accepted();
    let reconnections = connections.saturating_sub(2);
    let (rejected_total, rejected_sent) = sent_to(&test.db, &full_destination).await;
    assert_eq!(rejected_total, MAX_LENGTH + REJECTED_ROWS);
    assert_eq!(
        queue_message_count(&full.name),
        Some(rejected_sent),
        "the full queue holds exactly the rows to it marked sent"
    );
    assert_eq!(rejected_sent, MAX_LENGTH, "a rejected row was marked sent");
    let charged = Published::find()
        .filter(Column::Retry.gt(0))
        .all(&test.db)
        .await
        .expect("read the outbox")
        .len();
    assert_eq!(charged, 0, "rows were charged for a full queue");
    assert!(
        reconnections <= MAX_RECONNECTIONS,
        "{reconnections} reconnections in {FULL_FOR:?} (at most {MAX_RECONNECTIONS} a minute)"
    );

    // Room: a consumer drains the queue, and the rejected rows go out.
    let room_at = Instant::now();
    let full_consumer = Consumer::builder(pool(&test.url, 4).await)
        .config(outbox_tests::settings::stomp(RABBITMQ_STOMP))
        .destination(full.queue_destination())
        .queue(&full.name)
        .in_flight(8)
        .start(record_effect)
        .unwrap();
    let total = MAX_LENGTH + REJECTED_ROWS + FINE_ROWS;
    wait_until_all_sent(&test.db, total, RESUMES_WITHIN).await;
    let resumed = room_at.elapsed();
    relay.stop().await.unwrap();

    wait_until_consumed(
        &test.db,
        &full.name,
        MAX_LENGTH + REJECTED_ROWS,
        Duration::from_secs(60),
    )
    .await;
    wait_until_consumed(&test.db, &fine_queue, FINE_ROWS, Duration::from_secs(60)).await;
    full_consumer.stop().await.unwrap();
    fine_consumer.stop().await.unwrap();
    let expected = outbox_ids(&test.db).await;
    let counted = count(&expected, &effect_counts(&test.db).await);
    let fine_ids: HashSet<String> = Published::find()
        .filter(Column::Destination.eq(fine.as_str()))
        .all(&test.db)
        .await
        .expect("read the outbox")
        .into_iter()
        .map(|row| row.id.to_string())
        .collect();
    let wire_duplicates = wire.duplicates(&fine_ids).await;
    summary(
        &name,
        &counted,
        wire_duplicates,
        &format!(
            "rejected_rows={REJECTED_ROWS} connections={connections} reconnections={reconnections} \
             full_secs={} fine_flowed_secs={:.1} resumed_secs={:.1} secs={:.1}",
            FULL_FOR.as_secs(),
            fine_flowed.as_secs_f64(),
            resumed.as_secs_f64(),
            started.elapsed().as_secs_f64()
        ),
    );
    assert_exactly_once(&counted, total);
    test.drop_database().await;
}
