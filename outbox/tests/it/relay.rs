//! The relay against real databases and the real RabbitMQ: what it sends, when it marks a row
//! sent, and how it survives a broker that is down, stalls, or refuses a message.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use outbox::tables::published::Column;
use outbox::tables::published::Status;
use outbox::transport::MemoryTransport;
use outbox::{OutboxConfig, Producer, Published};
use outbox_tests::proxy::FaultProxy;
use outbox_tests::rows::{enqueue_many, poison_among_goods, rows};
use outbox_tests::stomp_peer::{RABBITMQ_STOMP, topic_reader, unique};
use outbox_tests::{Backend, TestDb, count_with_status, eventually, on_every_backend};
use sea_orm::{
    ActiveEnum, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, TransactionTrait,
};
use serde_json::json;

/// Settings for tests: the given broker, short timings.
fn config(broker: &str) -> OutboxConfig {
    let (host, port) = broker.rsplit_once(':').expect("host:port");
    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = vec![(host.to_owned(), port.parse().expect("port"))];
    config.receipt_timeout = Duration::from_secs(2);
    config.producer_lease = Duration::from_secs(3);
    config.maximum_backoff = Duration::from_millis(300);
    config.producer_waiting_time = Duration::from_millis(100);
    config.pause_for_retry = Duration::ZERO;
    config.wait_retry = Duration::ZERO;
    config
}

on_every_backend!(
    relay_sends_stored_rows_with_their_exact_headers,
    poison_row_fails_after_its_attempts_while_the_rows_around_it_flow,
    expired_rows_become_failed_with_a_reason,
    retention_deletes_old_sent_rows_only_once_per_period,
);

async fn relay_sends_stored_rows_with_their_exact_headers(backend: Backend) {
    let test = TestDb::new(backend).await;
    let key = unique("relay_headers");
    let (mut reader, _cleanup) = topic_reader(&key).await;
    let destination = format!("/topic/{key}");
    let row = outbox::Message::new(
        &destination,
        &json!({"id": 1, "text": "wörld: colon\\backslash\nnewline"}),
    )
    .unwrap()
    .header("x-custom", "a:b")
    .header("dop-correlation-id", "my-correlation-id")
    .enqueue(&test.db)
    .await
    .unwrap();

    let producer = Producer::builder(test.db.clone())
        .config(config(RABBITMQ_STOMP))
        .build()
        .unwrap();
    let report = producer.drain().await.unwrap();
    assert_eq!((report.claimed, report.sent), (1, 1));

    let frame = reader
        .next_message(Duration::from_secs(5))
        .await
        .expect("the message arrives");
    assert_eq!(frame.header("destination"), Some(destination.as_str()));
    assert_eq!(
        frame.header("dop-msg-id"),
        Some(row.id.to_string().as_str())
    );
    assert_eq!(
        frame.header("dop-msg-destination"),
        Some(destination.as_str())
    );
    assert_eq!(frame.header("dop-msg-type"), Some("Published"));
    assert_eq!(
        frame.header("dop-msg-sent-time"),
        row.headers["dop-msg-sent-time"].as_str()
    );
    assert_eq!(
        frame.header("dop-correlation-id"),
        Some("my-correlation-id")
    );
    assert_eq!(frame.header("x-custom"), Some("a:b"));
    assert_eq!(frame.header("persistent"), Some("true"));
    assert_eq!(frame.header("content-type"), Some("application/json"));
    assert_eq!(
        frame.header("content-length"),
        Some(frame.body.len().to_string().as_str())
    );
    let body: serde_json::Value = serde_json::from_slice(&frame.body).expect("a JSON body");
    assert_eq!(
        body,
        json!({"id": 1, "text": "wörld: colon\\backslash\nnewline"})
    );

    let stored = rows(&test.db).await;
    assert_eq!(stored[0].status, Status::Succeeded);
    assert_eq!(stored[0].claim_token, None);
    assert_eq!(stored[0].retry, 0);
    test.drop_database().await;
}

async fn poison_row_fails_after_its_attempts_while_the_rows_around_it_flow(backend: Backend) {
    let test = TestDb::new(backend).await;
    let mut poisoned = poison_among_goods(&test.db, "relay_poison").await;

    let mut settings = config(RABBITMQ_STOMP);
    settings.maximum_retry_attempts = 3;
    let producer = Producer::builder(test.db.clone())
        .config(settings)
        .build()
        .unwrap();
    let handle_db = test.db.clone();
    let running = tokio::spawn(async move {
        producer
            .run_until(async move {
                eventually(Duration::from_secs(30), "the poison row is FAILED", || {
                    let db = handle_db.clone();
                    async move { count_with_status(&db, Status::Failed).await == 1 }
                })
                .await
            })
            .await
    });
    running.await.unwrap().unwrap();

    let mut received = HashSet::new();
    while let Some(frame) = poisoned.reader.next_message(Duration::from_secs(2)).await {
        received.insert(frame.header("dop-msg-id").unwrap().to_owned());
        if received.len() == 6 {
            break;
        }
    }
    assert_eq!(received.len(), 6, "every good row arrived");
    for row in rows(&test.db).await {
        if row.id == poisoned.bad.id {
            assert_eq!(row.status, Status::Failed);
            assert_eq!(row.retry, 3, "the poison row spent its attempts");
            let reason = row.last_error.unwrap_or_default();
            assert!(
                reason.contains("ERROR"),
                "the broker's reason is kept: {reason}"
            );
        } else {
            assert_eq!(row.status, Status::Succeeded);
            assert_eq!(row.retry, 0, "good rows spent no retry");
        }
    }
    test.drop_database().await;
}

async fn expired_rows_become_failed_with_a_reason(backend: Backend) {
    let test = TestDb::new(backend).await;
    let row = outbox::enqueue(&test.db, "/topic/expired", &json!({}))
        .await
        .unwrap();
    let past = chrono::Utc::now() - chrono::Duration::hours(1);
    Published::update_many()
        .col_expr(Column::ExpiresAt, sea_orm::sea_query::Expr::val(past))
        .filter(Column::Id.eq(row.id))
        .exec(&test.db)
        .await
        .unwrap();
    let memory = MemoryTransport::new();
    let producer = Producer::builder(test.db.clone())
        .config(config(RABBITMQ_STOMP))
        .transport(memory.clone())
        .build()
        .unwrap();
    producer
        .run_until(tokio::time::sleep(Duration::from_millis(500)))
        .await
        .unwrap();
    let stored = rows(&test.db).await;
    assert_eq!(stored[0].status, Status::Failed);
    assert!(
        stored[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("expired")
    );
    assert!(memory.sent().is_empty(), "an expired row is never sent");
    test.drop_database().await;
}

async fn retention_deletes_old_sent_rows_only_once_per_period(backend: Backend) {
    let test = TestDb::new(backend).await;
    enqueue_many(&test.db, "/topic/retention", 4).await;
    let all = rows(&test.db).await;
    let old = chrono::Utc::now() - chrono::Duration::days(40);
    // Two old sent rows, one old unsent row, one recent sent row.
    for (row, status) in all
        .iter()
        .zip([Status::Succeeded, Status::Succeeded, Status::Schedule])
    {
        Published::update_many()
            .col_expr(Column::Added, sea_orm::sea_query::Expr::val(old))
            .col_expr(
                Column::Status,
                sea_orm::sea_query::Expr::val(status.to_value()),
            )
            .filter(Column::Id.eq(row.id))
            .exec(&test.db)
            .await
            .unwrap();
    }
    let mut settings = config(RABBITMQ_STOMP);
    settings.remove_data_cache_ttl = Duration::from_secs(3600);
    let run = |db: DatabaseConnection, settings: OutboxConfig| async move {
        // Cleanup is database work: it runs while the broker is down.
        let memory = MemoryTransport::new();
        memory.set_down(true);
        Producer::builder(db)
            .config(settings)
            .transport(memory)
            .build()
            .unwrap()
            .run_until(tokio::time::sleep(Duration::from_millis(300)))
            .await
            .unwrap();
    };
    run(test.db.clone(), settings.clone()).await;
    let left: HashSet<_> = rows(&test.db).await.into_iter().map(|r| r.id).collect();
    assert!(
        !left.contains(&all[0].id) && !left.contains(&all[1].id),
        "old sent rows deleted"
    );
    assert!(left.contains(&all[2].id), "an unsent row is never deleted");
    assert!(left.contains(&all[3].id), "a recent row is kept");

    // Another relay within the period does not clean again.
    Published::update_many()
        .col_expr(Column::Added, sea_orm::sea_query::Expr::val(old))
        .col_expr(
            Column::Status,
            sea_orm::sea_query::Expr::val(Status::Succeeded.to_value()),
        )
        .filter(Column::Id.eq(all[3].id))
        .exec(&test.db)
        .await
        .unwrap();
    run(test.connect().await, settings).await;
    assert!(
        rows(&test.db).await.iter().any(|r| r.id == all[3].id),
        "at most one cleanup per period, across relays"
    );
    test.drop_database().await;
}

#[tokio::test]
async fn two_relays_on_postgres_send_10000_rows_without_duplicates() {
    two_relays_send_without_duplicates(Backend::Postgres, 10_000).await;
}

#[tokio::test]
async fn two_relays_on_mariadb_send_10000_rows_without_duplicates() {
    two_relays_send_without_duplicates(Backend::MariaDb, 10_000).await;
}

async fn two_relays_send_without_duplicates(backend: Backend, count: usize) {
    let test = TestDb::new(backend).await;
    let key = unique("relay_pair");
    let (mut reader, _cleanup) = topic_reader(&key).await;
    enqueue_many(&test.db, &format!("/topic/{key}"), count).await;

    let first = Producer::builder(test.connect().await)
        .config(config(RABBITMQ_STOMP))
        .start()
        .unwrap();
    let second = Producer::builder(test.connect().await)
        .config(config(RABBITMQ_STOMP))
        .start()
        .unwrap();

    let mut seen = HashSet::new();
    let mut duplicates = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < count && Instant::now() < deadline {
        let Some(frame) = reader.next_message(Duration::from_secs(10)).await else {
            break;
        };
        if !seen.insert(frame.header("dop-msg-id").unwrap().to_owned()) {
            duplicates += 1;
        }
    }
    // Anything still in flight would show up now.
    while let Some(frame) = reader.next_message(Duration::from_millis(500)).await {
        if !seen.insert(frame.header("dop-msg-id").unwrap().to_owned()) {
            duplicates += 1;
        }
    }
    first.stop().await.unwrap();
    second.stop().await.unwrap();
    assert_eq!(seen.len(), count, "every row arrived");
    assert_eq!(duplicates, 0, "no row was sent twice");
    assert_eq!(
        count_with_status(&test.db, Status::Succeeded).await,
        count as u64
    );
    test.drop_database().await;
}

#[tokio::test]
async fn a_row_is_marked_sent_only_after_its_receipt() {
    let test = TestDb::new(Backend::Postgres).await;
    let proxy = FaultProxy::start(stomp_addr()).await;
    let key = unique("relay_receipt");
    let (mut reader, _cleanup) = topic_reader(&key).await;
    outbox::enqueue(&test.db, &format!("/topic/{key}"), &json!({}))
        .await
        .unwrap();

    let producer = Producer::builder(test.db.clone())
        .config(config(&proxy.addr().to_string()))
        .build()
        .unwrap();
    // Connect first, then black-hole the link: the SEND may leave, no receipt comes back.
    producer.drain().await.unwrap();
    outbox::enqueue(&test.db, &format!("/topic/{key}"), &json!({"second": true}))
        .await
        .unwrap();
    proxy.stall(true);
    let report = producer.drain().await.unwrap();
    assert_eq!((report.sent, report.released), (0, 1), "{report:?}");
    let pending: Vec<_> = rows(&test.db)
        .await
        .into_iter()
        .filter(|r| r.status == Status::Schedule)
        .collect();
    assert_eq!(pending.len(), 1, "no receipt, so not sent");
    assert_eq!(pending[0].retry, 0, "a connection problem spends no retry");
    assert_eq!(pending[0].claim_token, None, "and the claim is given back");

    proxy.stall(false);
    eventually(
        Duration::from_secs(20),
        "the row is sent after the link heals",
        || {
            let producer = &producer;
            let db = test.db.clone();
            async move {
                let _ = producer.drain().await;
                count_with_status(&db, Status::Succeeded).await == 2
            }
        },
    )
    .await;
    let mut ids = HashSet::new();
    while let Some(frame) = reader.next_message(Duration::from_secs(1)).await {
        ids.insert(frame.header("dop-msg-id").unwrap().to_owned());
    }
    assert_eq!(
        ids.len(),
        2,
        "both messages arrived (the stalled one at least once)"
    );
    test.drop_database().await;
}

#[tokio::test]
async fn broker_down_then_back_loses_nothing_and_spends_no_retry() {
    let test = TestDb::new(Backend::Postgres).await;
    let proxy = FaultProxy::start(stomp_addr()).await;
    proxy.refuse(true);
    let key = unique("relay_down");
    let (mut reader, _cleanup) = topic_reader(&key).await;
    enqueue_many(&test.db, &format!("/topic/{key}"), 20).await;

    let relay = Producer::builder(test.db.clone())
        .config(config(&proxy.addr().to_string()))
        .start()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count_with_status(&test.db, Status::Schedule).await, 20);
    assert!(
        rows(&test.db)
            .await
            .iter()
            .all(|r| r.retry == 0 && r.claim_token.is_none())
    );

    proxy.refuse(false);
    let mut ids = HashSet::new();
    while ids.len() < 20 {
        let frame = reader
            .next_message(Duration::from_secs(15))
            .await
            .expect("messages flow once the broker is back");
        ids.insert(frame.header("dop-msg-id").unwrap().to_owned());
    }
    let db = test.db.clone();
    eventually(Duration::from_secs(10), "all rows marked sent", || {
        let db = db.clone();
        async move { count_with_status(&db, Status::Succeeded).await == 20 }
    })
    .await;
    relay.stop().await.unwrap();
    assert!(rows(&test.db).await.iter().all(|r| r.retry == 0));
    test.drop_database().await;
}

#[tokio::test]
async fn a_stalled_connection_is_detected_by_heartbeats_and_rows_are_resent() {
    let test = TestDb::new(Backend::Postgres).await;
    let proxy = FaultProxy::start(stomp_addr()).await;
    let key = unique("relay_stall");
    let (mut reader, _cleanup) = topic_reader(&key).await;
    let mut settings = config(&proxy.addr().to_string());
    settings.stomp_heartbeats = (Duration::from_millis(300), Duration::from_millis(300));
    settings.receipt_timeout = Duration::from_secs(5);
    settings.producer_lease = Duration::from_secs(8);
    let relay = Producer::builder(test.db.clone())
        .config(settings)
        .start()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(proxy.accepted(), 1, "connected once");

    // A black hole: the socket stays open, nothing flows. Only heartbeats can tell (RabbitMQ
    // beats at least every second, so silence is noticed after two).
    proxy.stall(true);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    proxy.stall(false);
    enqueue_many(&test.db, &format!("/topic/{key}"), 5).await;
    let mut ids = HashSet::new();
    while ids.len() < 5 {
        let frame = reader
            .next_message(Duration::from_secs(15))
            .await
            .expect("rows flow on a new connection");
        ids.insert(frame.header("dop-msg-id").unwrap().to_owned());
    }
    relay.stop().await.unwrap();
    assert!(proxy.accepted() >= 2, "the stalled connection was replaced");
    assert!(
        rows(&test.db)
            .await
            .iter()
            .all(|r| r.status == Status::Succeeded && r.retry == 0)
    );
    test.drop_database().await;
}

#[tokio::test]
async fn a_dead_relay_s_lease_is_reclaimed_and_its_rows_resent() {
    let test = TestDb::new(Backend::Postgres).await;
    let key = unique("relay_lease");
    let (mut reader, _cleanup) = topic_reader(&key).await;
    let row = outbox::enqueue(&test.db, &format!("/topic/{key}"), &json!({}))
        .await
        .unwrap();
    // As a relay killed between send and mark leaves it: claimed, lease running.
    let locked_until = chrono::Utc::now() + chrono::Duration::seconds(2);
    Published::update_many()
        .col_expr(
            Column::ClaimToken,
            sea_orm::sea_query::Expr::val(uuid::Uuid::new_v4()),
        )
        .col_expr(
            Column::LockedUntil,
            sea_orm::sea_query::Expr::val(locked_until),
        )
        .filter(Column::Id.eq(row.id))
        .exec(&test.db)
        .await
        .unwrap();
    let relay = Producer::builder(test.db.clone())
        .config(config(RABBITMQ_STOMP))
        .start()
        .unwrap();
    assert!(
        reader
            .next_message(Duration::from_millis(1000))
            .await
            .is_none(),
        "a row under another relay's lease is left alone"
    );
    let frame = reader
        .next_message(Duration::from_secs(10))
        .await
        .expect("sent once the lease ran out");
    assert_eq!(
        frame.header("dop-msg-id"),
        Some(row.id.to_string().as_str())
    );
    relay.stop().await.unwrap();
    test.drop_database().await;
}

#[tokio::test]
async fn on_postgres_a_commit_wakes_the_relay_in_milliseconds() {
    let test = TestDb::new(Backend::Postgres).await;
    let key = unique("relay_wake");
    let (mut reader, _cleanup) = topic_reader(&key).await;
    let mut settings = config(RABBITMQ_STOMP);
    settings.producer_waiting_time = Duration::from_secs(60);
    // Another pool: this process's own wake-up signal plays no part, only NOTIFY does.
    let relay = Producer::builder(test.connect().await)
        .config(settings)
        .start()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;

    let txn = test.db.begin().await.unwrap();
    outbox::enqueue(&txn, &format!("/topic/{key}"), &json!({}))
        .await
        .unwrap();
    let committed = Instant::now();
    txn.commit().await.unwrap();
    reader
        .next_message(Duration::from_secs(5))
        .await
        .expect("delivered long before the 60 s poll");
    let latency = committed.elapsed();
    relay.stop().await.unwrap();
    assert!(latency < Duration::from_secs(2), "took {latency:?}");
    test.drop_database().await;
}

#[tokio::test]
async fn memory_transport_isolates_a_poison_row_in_one_batch() {
    let test = TestDb::new(Backend::Sqlite).await;
    let txn = test.db.begin().await.unwrap();
    for n in 0..10 {
        let destination = if n == 4 {
            "/exchange/missing/x"
        } else {
            "/topic/fine"
        };
        outbox::enqueue(&txn, destination, &json!({ "n": n }))
            .await
            .unwrap();
    }
    txn.commit().await.unwrap();
    let memory = MemoryTransport::new();
    memory.refuse("/exchange/missing");
    let producer = Producer::builder(test.db.clone())
        .config(config(RABBITMQ_STOMP))
        .transport(memory.clone())
        .build()
        .unwrap();
    let report = producer.round().await.unwrap();
    assert_eq!(
        (report.claimed, report.sent, report.refused, report.released),
        (10, 9, 1, 0)
    );
    assert_eq!(memory.sent().len(), 9);
    let poison: Vec<_> = rows(&test.db)
        .await
        .into_iter()
        .filter(|r| r.retry > 0)
        .collect();
    assert_eq!(poison.len(), 1);
    assert_eq!(poison[0].destination, "/exchange/missing/x");
    assert_eq!(
        poison[0].status,
        Status::Schedule,
        "one attempt of fifty spent"
    );
    test.drop_database().await;
}

fn stomp_addr() -> SocketAddr {
    RABBITMQ_STOMP.parse().expect("an address")
}
