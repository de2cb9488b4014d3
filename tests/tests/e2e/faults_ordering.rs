//! Per-key ordering under faults: 50 keys x 200 messages (x 100 on MariaDB and SQLite unless
//! `OUTBOX_TEST_FAULT_FULL=1`) written by 4 concurrent writers, relayed
//! by 2 relays of which one (`outbox publish`, a child process) is killed and restarted 10 times,
//! with a poison row (a missing exchange) at the head of one key; a consumer with `in_flight(8)`
//! in keyed mode records, per key, the insertion order (`seq`, or SQLite's `rowid`) of each
//! message its callback runs for. Every key's order is strictly increasing at the callback, nothing
//! is lost or done twice, and the poison key stays blocked (the others flow) until its row is
//! fixed and retried. The summary line:
//!
//! `fault.ordered_relay_killed_<backend> sent=N effects=N lost=0 duplicate_effects=0 wire_duplicates=K inversions=0 ...`
//!
//! The outbox is on PostgreSQL, MariaDB or SQLite; the consumer's inbox and effects on PostgreSQL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::tables::published::Status;
use outbox::{Consumer, Message, Payload, Producer};
use outbox_tests::faults::*;
use outbox_tests::stomp_peer::{RABBITMQ_STOMP, unique};
use outbox_tests::{Backend, TestDb, count_with_status};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement, TransactionTrait};
use serde_json::json;

const KEYS: usize = 50;
const WRITERS: usize = 4;
const KILLS: usize = 10;
const PER_KEY: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_relay_killed_on_postgres() {
    ordered_relay_killed(Backend::Postgres, "ordered_relay_killed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_relay_killed_on_mariadb() {
    ordered_relay_killed(Backend::MariaDb, "ordered_relay_killed_mariadb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_relay_killed_on_sqlite() {
    ordered_relay_killed(Backend::Sqlite, "ordered_relay_killed_sqlite").await;
}

/// What the callback saw: per key, the last insertion position; inversions counted.
#[derive(Default)]
struct Order {
    last: HashMap<String, i64>,
    inversions: usize,
    seen: usize,
}

async fn ordered_relay_killed(backend: Backend, name: &str) {
    let started = Instant::now();
    // The three scenarios run side by side in CI: there MariaDB's and SQLite's take half the
    // messages (`OUTBOX_TEST_FAULT_FULL=1`: all).
    let per_key = match backend {
        Backend::Postgres => PER_KEY,
        _ => counts(PER_KEY / 2, PER_KEY),
    };
    let n = KEYS * per_key;
    let test = TestDb::new(backend).await;
    let sink = TestDb::new(Backend::Postgres).await;
    create_effects_table(&sink.db).await;
    let (destination, queue, wire_queue, _cleanup) = fresh_destination("fault_ordered");
    declare_consumer_queues(&destination).await;
    // The wire counter reads all along, on a task of its own, until the run is over.
    let mut wire = WireCounter::start(&destination, &wire_queue).await;
    let mut settings = config(RABBITMQ_STOMP);
    settings.maximum_retry_attempts = 2;
    settings.published_chunk_size = 100;

    // The poison row first: the head of key-0, so the whole key waits behind it.
    let poison = {
        let txn = test.db.begin().await.unwrap();
        let row = Message::from_json(
            format!("/exchange/{}/x", unique("missing")),
            json!({"do": "ok", "tag": "poison"}),
        )
        .key("key-0")
        .enqueue(&txn)
        .await
        .unwrap();
        txn.commit().await.unwrap();
        row.id
    };

    // The consumer: keyed, 8 in flight; its callback looks up each message's insertion position
    // in the outbox database.
    let order = Arc::new(Mutex::new(Order::default()));
    let outbox_db = test.connect().await;
    let position = match backend {
        Backend::Sqlite => "rowid",
        _ => "seq",
    };
    let recorder = order.clone();
    let consumer = Consumer::builder(pool(&sink.url, 9).await)
        .config(config(RABBITMQ_STOMP))
        .destination(&destination)
        .in_flight(8)
        .ordered_by_key()
        .start(move |payload: Payload| {
            let order = recorder.clone();
            let outbox_db = outbox_db.clone();
            async move {
                let id: uuid::Uuid = payload.message_id().unwrap_or_default().parse()?;
                let key = payload
                    .header("x-outbox-key")
                    .unwrap_or_default()
                    .to_owned();
                let row = outbox_db
                    .query_one_raw(Statement::from_sql_and_values(
                        outbox_db.get_database_backend(),
                        match outbox_db.get_database_backend() {
                            sea_orm::DbBackend::Postgres => {
                                format!(
                                    "SELECT {position} AS position FROM published WHERE id = $1"
                                )
                            }
                            _ => {
                                format!("SELECT {position} AS position FROM published WHERE id = ?")
                            }
                        },
                        [id.into()],
                    ))
                    .await?
                    .ok_or("the message's row is gone")?;
                let at: i64 = row.try_get("", "position")?;
                {
                    let mut order = order.lock().unwrap();
                    order.seen += 1;
                    if let Some(last) = order.last.get(&key)
                        && *last >= at
                    {
                        order.inversions += 1;
                    }
                    order.last.insert(key, at);
                }
                record_effect(payload).await
            }
        })
        .unwrap();

    // Relay B, in this process, the whole run.
    let steady = Producer::builder(test.connect().await)
        .config(settings.clone())
        .start()
        .unwrap();

    // 4 writers: the 50 x per_key messages dealt round robin, 10 per transaction, keys mixed,
    // so that writers contend for keys.
    let mut plan: Vec<Vec<(usize, usize)>> = vec![Vec::new(); WRITERS];
    for i in 0..per_key {
        for k in 0..KEYS {
            plan[(i * KEYS + k) % WRITERS].push((k, i));
        }
    }
    let mut writers = Vec::new();
    for share in plan {
        let db = match backend {
            Backend::Sqlite => test.db.clone(),
            _ => test.connect().await,
        };
        let destination = destination.clone();
        writers.push(tokio::spawn(async move {
            for chunk in share.chunks(10) {
                loop {
                    let messages: Vec<Message> = chunk
                        .iter()
                        .map(|(k, i)| {
                            Message::from_json(
                                &destination,
                                json!({"do": "ok", "tag": "ok", "n": i}),
                            )
                            .key(format!("key-{k}"))
                        })
                        .collect();
                    let written = async {
                        let txn = db.begin().await?;
                        outbox::enqueue_all(&txn, messages)
                            .await
                            .map_err(|e| sea_orm::DbErr::Custom(e.to_string()))?;
                        txn.commit().await
                    }
                    .await;
                    match written {
                        Ok(()) => break,
                        Err(err) => {
                            eprintln!("a write failed ({err}); again");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        }));
    }

    // Relay A: `outbox publish`, killed and restarted while the writers write.
    let relay = || {
        publish_command(&test.url, 100)
            .env("OUTBOX_STOMP_HOST_AND_PORTS", RABBITMQ_STOMP)
            .env("OUTBOX_MAXIMUM_RETRY_ATTEMPTS", "2")
            .env("OUTBOX_PAUSE_FOR_RETRY", "0")
            .env("OUTBOX_WAIT_RETRY", "0")
            .spawn()
            .expect("start outbox publish")
    };
    let mut mid_run_kills = 0;
    for _ in 0..KILLS {
        let mut child = relay();
        tokio::time::sleep(Duration::from_millis(200 + random(400))).await;
        kill(&mut child).await;
        if (count_with_status(&test.db, Status::Succeeded).await as usize) < n {
            mid_run_kills += 1;
        }
    }
    let mut last = relay();
    for writer in writers {
        writer.await.unwrap();
    }

    // Every key but the poison's flows; the poison's stays blocked behind its FAILED row.
    let others = n - per_key;
    wait_until_sent_count(&test.db, others, Duration::from_secs(180)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        count_with_status(&test.db, Status::Succeeded).await as usize,
        others,
        "a row of the poison's key was sent past it"
    );
    assert_eq!(count_with_status(&test.db, Status::Failed).await, 1);
    let status = outbox::ops::status(&test.db, 10).await.unwrap();
    assert_eq!(status.blocked_key_count, 1);
    assert_eq!(status.blocked_keys[0].key, "key-0");
    assert_eq!(status.blocked_keys[0].waiting as usize, per_key);
    let blocked_until_retry = status.blocked_key_count;

    // The operator fixes the row's destination and retries it: the key flows, in order.
    test.db
        .execute_raw(Statement::from_sql_and_values(
            test.db.get_database_backend(),
            match backend {
                Backend::Postgres => "UPDATE published SET destination = $1 WHERE id = $2",
                _ => "UPDATE published SET destination = ? WHERE id = ?",
            },
            [destination.clone().into(), poison.into()],
        ))
        .await
        .unwrap();
    assert_eq!(
        outbox::ops::Retry::new()
            .ids([poison])
            .run(&test.db)
            .await
            .unwrap(),
        1
    );
    wait_until_all_sent(&test.db, n + 1, Duration::from_secs(120)).await;
    kill(&mut last).await;
    steady.stop().await.unwrap();
    wait_until_consumed(&sink.db, &queue, n + 1, Duration::from_secs(120)).await;
    consumer.stop().await.unwrap();

    let expected = outbox_ids(&test.db).await;
    let counted = count(&expected, &effect_counts(&sink.db).await);
    let wire_duplicates = wire.duplicates(&expected).await;
    let (inversions, keys_seen) = {
        let order = order.lock().unwrap();
        (order.inversions, order.last.len())
    };
    summary(
        name,
        &counted,
        wire_duplicates,
        &format!(
            "inversions={inversions} keys={keys_seen} writers={WRITERS} relays=2 kills={KILLS} \
             mid_run_kills={mid_run_kills} blocked_until_retry={blocked_until_retry} secs={:.1}",
            started.elapsed().as_secs_f64()
        ),
    );
    assert_eq!(counted.sent, n + 1);
    assert_eq!(counted.lost, 0, "messages lost");
    assert_eq!(counted.duplicate_effects, 0, "effects done twice");
    assert_eq!(
        inversions, 0,
        "a key's messages were processed out of order"
    );
    assert_eq!(keys_seen, KEYS);
    assert!(mid_run_kills > 0, "no kill landed during the run");
    test.drop_database().await;
    sink.drop_database().await;
}

/// Waits until exactly `n` rows are SUCCEEDED (no more may follow: checked by the caller).
async fn wait_until_sent_count(db: &DatabaseConnection, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let sent = count_with_status(db, Status::Succeeded).await as usize;
        if sent >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {limit:?}: {sent} of {n} rows of the unblocked keys sent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
