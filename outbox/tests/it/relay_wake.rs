//! The wake-up of idle relays on PostgreSQL: writers queue a NOTIFY only while a relay has
//! announced itself idle, so that busy periods take no commit lock for it, and an idle relay
//! is still woken within milliseconds.

use std::time::{Duration, Instant};

use outbox::{OutboxConfig, Producer};
use outbox_tests::stomp_peer::{RABBITMQ_STOMP, topic_reader, unique};
use outbox_tests::{Backend, TestDb, eventually};
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement, TransactionTrait};
use serde_json::json;

fn config() -> OutboxConfig {
    let (host, port) = RABBITMQ_STOMP.rsplit_once(':').expect("host:port");
    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = vec![(host.to_owned(), port.parse().expect("port"))];
    config.maximum_backoff = Duration::from_millis(300);
    // No poll during the test: only a notification wakes the relay in time.
    config.producer_waiting_time = Duration::from_secs(60);
    config
}

async fn idle_relays(db: &DatabaseConnection) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT count(*) FROM outbox_idle_relay WHERE until > now()",
        ))
        .await
        .expect("read outbox_idle_relay")
        .expect("a row");
    row.try_get_by_index::<i64>(0).unwrap()
}

async fn write_one(db: &DatabaseConnection, destination: &str) -> Instant {
    let txn = db.begin().await.unwrap();
    outbox::enqueue(&txn, destination, &json!({}))
        .await
        .unwrap();
    let committing = Instant::now();
    txn.commit().await.unwrap();
    committing
}

#[tokio::test]
async fn writers_notify_only_while_a_relay_is_idle_and_an_idle_relay_wakes_in_milliseconds() {
    let test = TestDb::new(Backend::Postgres).await;
    let key = unique("relay_idle_wake");
    let destination = format!("/topic/{key}");
    let (mut reader, _cleanup) = topic_reader(&key).await;
    let mut listener = PgListener::connect(&test.url).await.expect("listen");
    listener.listen("outbox_published").await.unwrap();

    // No relay idle: a commit queues no notification.
    assert_eq!(idle_relays(&test.db).await, 0);
    write_one(&test.db, &destination).await;
    let heard = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(heard.is_err(), "no relay is idle, yet a writer notified");

    // A relay drains that row, then announces itself idle.
    let relay = Producer::builder(test.connect().await)
        .config(config())
        .start()
        .unwrap();
    reader
        .next_message(Duration::from_secs(10))
        .await
        .expect("the first row relayed");
    let db = test.db.clone();
    eventually(Duration::from_secs(10), "the relay announced idle", || {
        let db = db.clone();
        async move { idle_relays(&db).await == 1 }
    })
    .await;
    // Past the relay's second look: from now on only a notification wakes it.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let committing = write_one(&test.db, &destination).await;
    tokio::time::timeout(Duration::from_secs(2), listener.recv())
        .await
        .expect("an idle relay is notified")
        .unwrap();
    reader
        .next_message(Duration::from_secs(5))
        .await
        .expect("delivered long before the 60 s poll");
    let latency = committing.elapsed();
    assert!(latency < Duration::from_secs(2), "took {latency:?}");

    relay.stop().await.unwrap();
    assert_eq!(
        idle_relays(&test.db).await,
        0,
        "a stopping relay withdraws its announcement"
    );
    drop(listener);
    test.drop_database().await;
}
