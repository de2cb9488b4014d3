//! The consumer against the real PostgreSQL and RabbitMQ (and, for the inbox deduplication, which
//! differs by database, MariaDB and SQLite through the in-memory broker): each message processed
//! once in effect, failures dead-lettered, transient failures retried, queues compatible with
//! django-outbox-pattern's, broker drops survived, shutdown without loss.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use outbox::consumer::ConsumerBuilder;
use outbox::tables::published::Status;
use outbox::tables::received::Column as ReceivedColumn;
use outbox::transport::{MemoryTransport, StompSettings, StompTransport};
use outbox::{Consumer, OutboxConfig, Payload, Producer, Received};
use outbox_tests::binaries::child_vars;
use outbox_tests::proxy::FaultProxy;
use outbox_tests::stomp_peer::{
    QueueCleanup, RABBITMQ_STOMP, StompPeer, queue_message_count, unique,
};
use outbox_tests::{Backend, TestDb, eventually, on_every_backend};
use sea_orm::ActiveValue::Set;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, Statement,
    TransactionTrait,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Settings for tests: the given broker, short timings.
fn config(broker: &str) -> OutboxConfig {
    let (host, port) = broker.rsplit_once(':').expect("host:port");
    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = vec![(host.to_owned(), port.parse().expect("port"))];
    config.receipt_timeout = Duration::from_secs(3);
    config.maximum_backoff = Duration::from_millis(300);
    config.consumer_retry_wait = Duration::from_millis(50);
    config.consumer_shutdown_timeout = Duration::from_secs(10);
    config
}

fn stomp_addr() -> SocketAddr {
    RABBITMQ_STOMP.parse().expect("an address")
}

/// A fresh topic destination, its queue (the last segment) and the cleanup of both queues.
fn fresh_destination(prefix: &str) -> (String, String, QueueCleanup) {
    let queue = unique(prefix);
    let cleanup = QueueCleanup(vec![queue.clone(), format!("DLQ.{queue}")]);
    (format!("/topic/{queue}"), queue, cleanup)
}

/// The SUBSCRIBE headers django-outbox-pattern 3.2.1 sends (WIRE.md §3), for the queue or for
/// its dead-letter queue.
fn python_subscribe_headers(queue: &str, dead_letter_queue: bool) -> Vec<(String, String)> {
    let (name, dead_letter_key) = if dead_letter_queue {
        (format!("DLQ.{queue}"), format!("DLQ.DLQ.DLQ.{queue}"))
    } else {
        (queue.to_owned(), format!("DLQ.{queue}"))
    };
    [
        ("ack", "client"),
        ("auto-delete", "false"),
        ("durable", "true"),
        ("exclusive", "False"),
        ("prefetch-count", "1"),
        ("x-dead-letter-exchange", ""),
        ("x-dead-letter-routing-key", dead_letter_key.as_str()),
        ("x-queue-name", name.as_str()),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

fn as_refs(headers: &[(String, String)]) -> Vec<(&str, &str)> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// The business table the test callbacks write to, in the callback's transaction.
async fn create_effects_table(db: &DatabaseConnection) {
    db.execute_unprepared(
        "CREATE TABLE effects (msg_id VARCHAR(100) NOT NULL, note VARCHAR(100) NOT NULL)",
    )
    .await
    .expect("create the effects table");
}

/// Every effect row: (msg_id, note).
async fn effects(db: &DatabaseConnection) -> Vec<(String, String)> {
    let statement = Statement::from_string(
        db.get_database_backend(),
        "SELECT msg_id, note FROM effects",
    );
    db.query_all_raw(statement)
        .await
        .expect("read effects")
        .iter()
        .map(|row| {
            (
                row.try_get_by_index::<String>(0).unwrap(),
                row.try_get_by_index::<String>(1).unwrap(),
            )
        })
        .collect()
}

async fn effect_count(db: &DatabaseConnection, msg_id: &str) -> usize {
    effects(db)
        .await
        .iter()
        .filter(|(id, _)| id == msg_id)
        .count()
}

async fn inbox(db: &DatabaseConnection) -> Vec<outbox::tables::received::Model> {
    Received::find().all(db).await.expect("read the inbox")
}

/// What the test callback saw: the calls per message id, the correlation ids it found ambient,
/// and a gate that "gate" messages wait at.
#[derive(Clone)]
struct Probe {
    calls: Arc<Mutex<Vec<String>>>,
    ambient: Arc<Mutex<HashMap<String, Option<String>>>>,
    headers: Arc<Mutex<HashMap<String, BTreeMap<String, String>>>>,
    gate: Arc<Semaphore>,
}

impl Probe {
    fn new() -> Probe {
        Probe {
            calls: Arc::default(),
            ambient: Arc::default(),
            headers: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }

    fn calls(&self, msg_id: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|id| *id == msg_id)
            .count()
    }

    fn total_calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    /// The callback: records the call, writes an effect row in the message's transaction, then
    /// does what the body's `do` says.
    fn callback(
        &self,
    ) -> impl Fn(Payload) -> futures::future::BoxFuture<'static, Result<(), BoxError>>
    + Send
    + Sync
    + 'static {
        let probe = self.clone();
        move |payload| Box::pin(probe.clone().behave(payload))
    }

    async fn behave(self, payload: Payload) -> Result<(), BoxError> {
        let key = payload.message_id().unwrap_or_default().to_owned();
        let action = payload.body()["do"].as_str().unwrap_or("ok").to_owned();
        let attempt = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(key.clone());
            calls.iter().filter(|id| **id == key).count()
        };
        self.ambient
            .lock()
            .unwrap()
            .insert(key.clone(), outbox::correlation_id());
        self.headers
            .lock()
            .unwrap()
            .insert(key.clone(), payload.headers().clone());
        payload
            .db()
            .execute_unprepared(&format!(
                "INSERT INTO effects (msg_id, note) VALUES ('{key}', '{action}')"
            ))
            .await?;
        match action.as_str() {
            "ok" => payload.save(),
            "unsaved" => {}
            "nack" => payload.nack(),
            "fail" => return Err("the callback refused the message".into()),
            "panic" => panic!("the callback panicked on purpose"),
            "slow" => {
                let ms = payload.body()["ms"].as_u64().unwrap_or(1000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                payload.save();
            }
            "gate" => {
                self.gate.acquire().await?.forget();
                payload.save();
            }
            // A remote call that never answers, after the effect was written.
            "hang" => std::future::pending::<()>().await,
            "sleep-in-database" => {
                let seconds = payload.body()["seconds"].as_u64().unwrap_or(5);
                payload
                    .db()
                    .execute_unprepared(&format!("SELECT pg_sleep({seconds})"))
                    .await?;
                payload.save();
            }
            "hang-once" => {
                if attempt == 1 {
                    std::future::pending::<()>().await;
                }
                payload.save();
            }
            "flaky" => {
                let failures = payload.body()["failures"].as_u64().unwrap_or(1) as usize;
                if attempt <= failures {
                    return Err(outbox::consumer::Transient::new(
                        "a service is briefly unavailable",
                    )
                    .into());
                }
                payload.save();
            }
            "lose-connection" => {
                if attempt == 1 {
                    // The server ends this very connection: a real "connection lost".
                    payload
                        .db()
                        .execute_unprepared("SELECT pg_terminate_backend(pg_backend_pid())")
                        .await?;
                }
                payload.save();
            }
            "enqueue" => {
                for n in 0..2 {
                    outbox::enqueue(payload.db(), "/topic/onward", &json!({"from": key, "n": n}))
                        .await?;
                }
                payload.save();
            }
            other => panic!("unknown action {other}"),
        }
        Ok(())
    }
}

fn consumer(db: &DatabaseConnection, settings: OutboxConfig, destination: &str) -> ConsumerBuilder {
    Consumer::builder(db.clone())
        .config(settings)
        .destination(destination)
}

/// Sends a message to RabbitMQ with a raw client, as any other service would.
async fn send_raw(destination: &str, msg_id: &str, body: Value, extra: &[(&str, &str)]) {
    let mut peer = StompPeer::connect(RABBITMQ_STOMP).await.expect("connect");
    let mut headers = vec![("dop-msg-id", msg_id)];
    headers.extend_from_slice(extra);
    peer.send(destination, &headers, body.to_string().as_bytes())
        .await
        .expect("send");
    peer.disconnect().await.expect("disconnect");
}

/// A consumer of `destination` over the in-memory broker `memory`, its queues declared.
async fn memory_consumer(
    db: &DatabaseConnection,
    memory: &MemoryTransport,
    destination: &str,
) -> Consumer {
    let built = consumer(db, config(RABBITMQ_STOMP), destination)
        .transport(memory.new_connection())
        .build()
        .unwrap();
    built.declare().await.unwrap();
    built
}

async fn declare_on_rabbitmq(destination: &str) {
    let settings = config(RABBITMQ_STOMP);
    let broker = StompTransport::new(StompSettings::from(&settings)).expect("transport");
    outbox::consumer::declare(&broker, &settings, destination, None)
        .await
        .expect("declare the queues");
}

// ---------------------------------------------------------------------------------------------
// End to end on PostgreSQL and RabbitMQ

#[tokio::test]
async fn relay_to_consumer_processes_each_message_once_and_records_its_inbox_row() {
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let (destination, queue, _cleanup) = fresh_destination("c_e2e");
    declare_on_rabbitmq(&destination).await;

    let txn = test.db.begin().await.unwrap();
    let mut ids = Vec::new();
    for n in 0..3 {
        let row = outbox::enqueue(&txn, &destination, &json!({"n": n, "do": "ok"}))
            .await
            .unwrap();
        ids.push(row.id.to_string());
    }
    txn.commit().await.unwrap();
    let report = Producer::builder(test.db.clone())
        .config(config(RABBITMQ_STOMP))
        .build()
        .unwrap()
        .drain()
        .await
        .unwrap();
    assert_eq!(report.sent, 3);

    let probe = Probe::new();
    let handle = consumer(&test.db, config(RABBITMQ_STOMP), &destination)
        .start(probe.callback())
        .unwrap();
    let db = test.db.clone();
    eventually(Duration::from_secs(15), "three effects", || {
        let db = db.clone();
        async move { effects(&db).await.len() == 3 }
    })
    .await;
    handle.stop().await.unwrap();

    assert_eq!(queue_message_count(&queue), Some(0), "every message acked");
    let rows = inbox(&test.db).await;
    assert_eq!(rows.len(), 3);
    for row in rows {
        let key = row.msg_id.clone().expect("a key");
        assert!(ids.contains(&key), "keyed by the outbox row id");
        assert_eq!(probe.calls(&key), 1);
        assert_eq!(row.queue, queue);
        assert_eq!(row.status, Status::Succeeded);
        assert_eq!(row.retry, 0);
        assert_eq!(row.expires_at - row.added, chrono::Duration::days(30));
        let headers = row.headers.expect("headers");
        assert_eq!(headers["dop-msg-id"], key.as_str());
        assert_eq!(headers["destination"], destination.as_str());
        assert_eq!(headers["dop-msg-type"], "Published");
        assert!(headers["message-id"].is_string() && headers["subscription"].is_string());
        assert_eq!(row.body.expect("body")["do"], "ok");
    }
    test.drop_database().await;
}

#[tokio::test]
async fn a_message_sent_twice_directly_runs_the_callback_once() {
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let (destination, queue, _cleanup) = fresh_destination("c_twice");
    declare_on_rabbitmq(&destination).await;
    // `outbox::send`: no outbox row, the caller's headers only.
    for _ in 0..2 {
        outbox::send(
            &destination,
            &json!({"do": "ok"}),
            &[("dop-msg-id", "direct-dup-1"), ("x-extra", "1")],
        )
        .await
        .unwrap();
    }
    outbox::send(
        &destination,
        &json!({"do": "ok"}),
        &[("dop-msg-id", "sentinel")],
    )
    .await
    .unwrap();

    let probe = Probe::new();
    let handle = consumer(&test.db, config(RABBITMQ_STOMP), &destination)
        .start(probe.callback())
        .unwrap();
    let db = test.db.clone();
    // One message in flight at a time: once the sentinel is done, both duplicates were handled.
    eventually(Duration::from_secs(15), "the sentinel", || {
        let db = db.clone();
        async move { effect_count(&db, "sentinel").await == 1 }
    })
    .await;
    handle.stop().await.unwrap();

    assert_eq!(
        probe.calls("direct-dup-1"),
        1,
        "the duplicate skipped the callback"
    );
    assert_eq!(effect_count(&test.db, "direct-dup-1").await, 1);
    assert_eq!(
        queue_message_count(&queue),
        Some(0),
        "the duplicate was acked"
    );
    assert_eq!(queue_message_count(&format!("DLQ.{queue}")), Some(0));
    let headers = probe.headers.lock().unwrap()["direct-dup-1"].clone();
    assert_eq!(headers.get("x-extra").map(String::as_str), Some("1"));
    assert_eq!(headers.get("persistent").map(String::as_str), Some("true"));
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert!(
        !headers.contains_key("dop-msg-type") && !headers.contains_key("dop-correlation-id"),
        "a direct send adds no dop-* header: {headers:?}"
    );
    test.drop_database().await;
}

#[tokio::test]
async fn concurrent_duplicates_have_one_effect_and_neither_is_dead_lettered() {
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let (destination, queue, _cleanup) = fresh_destination("c_race");
    declare_on_rabbitmq(&destination).await;
    for _ in 0..2 {
        send_raw(&destination, "racer", json!({"do": "slow", "ms": 500}), &[]).await;
    }
    let probe = Probe::new();
    let handle = consumer(&test.db, config(RABBITMQ_STOMP), &destination)
        .in_flight(2)
        .prefetch(2)
        .start(probe.callback())
        .unwrap();
    let db = test.db.clone();
    eventually(Duration::from_secs(15), "the effect", || {
        let db = db.clone();
        async move { effect_count(&db, "racer").await == 1 }
    })
    .await;
    // The second copy waits on the first one's uncommitted inbox row, then sees the duplicate.
    tokio::time::sleep(Duration::from_millis(800)).await;
    handle.stop().await.unwrap();
    assert_eq!(effect_count(&test.db, "racer").await, 1);
    assert_eq!(inbox(&test.db).await.len(), 1);
    assert_eq!(queue_message_count(&queue), Some(0), "both copies acked");
    assert_eq!(
        queue_message_count(&format!("DLQ.{queue}")),
        Some(0),
        "a duplicate is not a failure"
    );
    test.drop_database().await;
}

#[tokio::test]
async fn failures_are_rolled_back_and_dead_lettered_with_their_headers_and_later_messages_flow() {
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let (destination, queue, _cleanup) = fresh_destination("c_dlq");
    declare_on_rabbitmq(&destination).await;
    for (id, action) in [
        ("m-fail", "fail"),
        ("m-panic", "panic"),
        ("m-nack", "nack"),
        ("m-unsaved", "unsaved"),
        ("m-ok", "ok"),
    ] {
        send_raw(
            &destination,
            id,
            json!({ "do": action }),
            &[("x-custom", "a:b")],
        )
        .await;
    }
    let probe = Probe::new();
    let handle = consumer(&test.db, config(RABBITMQ_STOMP), &destination)
        .start(probe.callback())
        .unwrap();
    let db = test.db.clone();
    eventually(Duration::from_secs(15), "the last message", || {
        let db = db.clone();
        async move { effect_count(&db, "m-ok").await == 1 }
    })
    .await;
    handle.stop().await.unwrap();

    let kept: Vec<String> = effects(&test.db)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        kept,
        ["m-unsaved", "m-ok"],
        "the failed messages' writes were rolled back; Ok without save() counts as saved"
    );
    let keys: Vec<_> = inbox(&test.db)
        .await
        .into_iter()
        .filter_map(|r| r.msg_id)
        .collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(queue_message_count(&queue), Some(0));

    // Read the dead-letter queue as a Python consumer would (its exact declaring headers).
    let mut reader = StompPeer::connect(RABBITMQ_STOMP).await.unwrap();
    let headers = python_subscribe_headers(&queue, true);
    reader
        .subscribe(&format!("DLQ.{queue}"), &as_refs(&headers))
        .await
        .expect("the dead-letter queue accepts the Python library's headers");
    let mut dead = Vec::new();
    while let Some(frame) = reader.next_message(Duration::from_secs(2)).await {
        assert_eq!(
            frame.header("x-custom"),
            Some("a:b"),
            "original headers kept"
        );
        assert_eq!(frame.header("x-first-death-queue"), Some(queue.as_str()));
        dead.push(frame.header("dop-msg-id").unwrap().to_owned());
        reader.ack(&frame).await.unwrap();
    }
    assert_eq!(dead, ["m-fail", "m-panic", "m-nack"]);
    assert_eq!(probe.calls("m-fail"), 1, "an ordinary error is not retried");
    test.drop_database().await;
}

#[tokio::test]
async fn the_correlation_id_of_a_message_is_inherited_by_the_rows_its_callback_enqueues() {
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let memory = MemoryTransport::new();
    let destination = "/topic/correlated";
    let probe = Probe::new();
    let built = memory_consumer(&test.db, &memory, destination).await;
    outbox::send::send_with(
        &memory,
        destination,
        &json!({"do": "enqueue"}),
        &[("dop-msg-id", "with"), ("dop-correlation-id", "corr-42")],
    )
    .await
    .unwrap();
    outbox::send::send_with(
        &memory,
        destination,
        &json!({"do": "enqueue"}),
        &[("dop-msg-id", "without")],
    )
    .await
    .unwrap();
    let callback = probe.callback();
    let db = test.db.clone();
    built
        .run_until(callback, async move {
            eventually(Duration::from_secs(10), "both processed", || {
                let db = db.clone();
                async move { effects(&db).await.len() == 2 }
            })
            .await
        })
        .await
        .unwrap();

    assert_eq!(
        probe.ambient.lock().unwrap()["with"].as_deref(),
        Some("corr-42")
    );
    let rows = outbox::Published::find().all(&test.db).await.unwrap();
    let correlation = |from: &str| -> Vec<String> {
        rows.iter()
            .filter(|r| r.body["from"] == from)
            .map(|r| r.headers["dop-correlation-id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(correlation("with"), ["corr-42", "corr-42"]);
    let fresh = correlation("without");
    assert_eq!(fresh.len(), 2);
    assert_eq!(fresh[0], fresh[1], "one fresh id for the whole callback");
    assert!(uuid::Uuid::parse_str(&fresh[0]).is_ok());
    assert_eq!(
        probe.ambient.lock().unwrap()["without"].as_deref(),
        Some(fresh[0].as_str())
    );
    test.drop_database().await;
}

#[tokio::test]
async fn writes_with_one_idempotency_key_are_processed_once_and_every_other_message_once() {
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let memory = MemoryTransport::new();
    let destination = "/topic/keyed";
    let probe = Probe::new();
    let built = memory_consumer(&test.db, &memory, destination).await;
    // A request its client retried writes its message twice: one key says they are one. The
    // other messages, with a constant `cap-msg-id` header a naive writer set, stay distinct.
    let message = |key: Option<&str>| {
        let message = outbox::Message::from_json(destination, json!({"do": "ok"}))
            .header("cap-msg-id", "constant");
        match key {
            Some(key) => message.idempotency_key(key),
            None => message,
        }
    };
    let txn = test.db.begin().await.unwrap();
    let rows = outbox::enqueue_all(
        &txn,
        [
            message(Some("payment-1")),
            message(Some("payment-1")),
            message(Some("payment-2")),
            message(None),
            message(None),
        ],
    )
    .await
    .unwrap();
    txn.commit().await.unwrap();
    let report = Producer::builder(test.db.clone())
        .config(config(RABBITMQ_STOMP))
        .transport(memory.clone())
        .build()
        .unwrap()
        .drain()
        .await
        .unwrap();
    assert_eq!(report.sent, 5);
    let unkeyed: Vec<String> = rows[3..].iter().map(|row| row.id.to_string()).collect();
    let db = test.db.clone();
    let callback = probe.callback();
    built
        .run_until(callback, async {
            eventually(Duration::from_secs(10), "every message settled", || {
                let db = db.clone();
                let memory = memory.clone();
                async move {
                    effects(&db).await.len() == 4
                        && memory.queue_len("keyed") + memory.unacked_len("keyed") == 0
                }
            })
            .await
        })
        .await
        .unwrap();

    for key in ["payment-1", "payment-2", &unkeyed[0], &unkeyed[1]] {
        assert_eq!(effect_count(&test.db, key).await, 1, "{key}");
    }
    assert_eq!(
        probe.calls("payment-1"),
        1,
        "the second write is a duplicate"
    );
    assert_eq!(memory.queue_len("DLQ.keyed"), 0, "nothing dead-lettered");
    test.drop_database().await;
}

#[tokio::test]
async fn transient_failures_are_retried_in_a_new_transaction_then_dead_lettered() {
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let memory = MemoryTransport::new();
    let destination = "/topic/transient";
    let mut settings = config(RABBITMQ_STOMP);
    settings.consumer_max_retry_attempts = 3;
    let probe = Probe::new();
    let built = consumer(&test.db, settings, destination)
        .transport(memory.new_connection())
        .build()
        .unwrap();
    built.declare().await.unwrap();
    for (id, body) in [
        ("lost", json!({"do": "lose-connection"})),
        ("flaky", json!({"do": "flaky", "failures": 2})),
        ("hopeless", json!({"do": "flaky", "failures": 99})),
        ("after", json!({"do": "ok"})),
    ] {
        outbox::send::send_with(&memory, destination, &body, &[("dop-msg-id", id)])
            .await
            .unwrap();
    }
    let db = test.db.clone();
    built
        .run_until(probe.callback(), async move {
            eventually(Duration::from_secs(20), "the last message", || {
                let db = db.clone();
                async move { effect_count(&db, "after").await == 1 }
            })
            .await
        })
        .await
        .unwrap();

    assert_eq!(probe.calls("lost"), 2, "a lost connection is retried");
    assert_eq!(probe.calls("flaky"), 3, "Transient errors are retried");
    assert_eq!(probe.calls("hopeless"), 4, "one call and three retries");
    for id in ["lost", "flaky"] {
        assert_eq!(
            effect_count(&test.db, id).await,
            1,
            "{id}: only the last attempt's work"
        );
    }
    assert_eq!(effect_count(&test.db, "hopeless").await, 0);
    let dead: Vec<_> = memory
        .queue_messages("DLQ.transient")
        .into_iter()
        .map(|m| {
            m.headers
                .iter()
                .find(|(k, _)| k == "dop-msg-id")
                .unwrap()
                .1
                .clone()
        })
        .collect();
    assert_eq!(dead, ["hopeless"]);
    assert_eq!(
        memory.queue_len("transient") + memory.unacked_len("transient"),
        0
    );
    test.drop_database().await;
}

// ---------------------------------------------------------------------------------------------
// Inbox deduplication on every database (the in-memory broker, the real database)

on_every_backend!(
    the_inbox_recognises_a_redelivery_and_a_concurrent_duplicate,
    inbox_retention_deletes_old_rows_once_per_period,
);

async fn the_inbox_recognises_a_redelivery_and_a_concurrent_duplicate(backend: Backend) {
    let test = TestDb::new(backend).await;
    create_effects_table(&test.db).await;
    let memory = MemoryTransport::new();
    let destination = "/topic/dedup";
    let probe = Probe::new();
    let built = consumer(&test.db, config(RABBITMQ_STOMP), destination)
        .transport(memory.new_connection())
        .in_flight(2)
        .build()
        .unwrap();
    built.declare().await.unwrap();
    let send = |id: &'static str, body: Value| {
        let memory = memory.clone();
        async move {
            outbox::send::send_with(&memory, destination, &body, &[("dop-msg-id", id)])
                .await
                .unwrap()
        }
    };
    // Two copies at once: both in flight together.
    send("racer", json!({"do": "slow", "ms": 300})).await;
    send("racer", json!({"do": "slow", "ms": 300})).await;
    // A copy of a message processed long ago (as after a lost ack).
    send("again", json!({"do": "ok"})).await;
    let db = test.db.clone();
    built
        .run_until(probe.callback(), async move {
            eventually(Duration::from_secs(20), "the first messages", || {
                let db = db.clone();
                async move {
                    effect_count(&db, "racer").await == 1 && effect_count(&db, "again").await == 1
                }
            })
            .await;
            send("again", json!({"do": "ok"})).await;
            send("after", json!({"do": "ok"})).await;
            eventually(Duration::from_secs(20), "the last message", || {
                let db = db.clone();
                async move { effect_count(&db, "after").await == 1 }
            })
            .await;
        })
        .await
        .unwrap();

    assert_eq!(
        effect_count(&test.db, "racer").await,
        1,
        "one effect for two concurrent copies"
    );
    assert_eq!(effect_count(&test.db, "again").await, 1);
    assert_eq!(probe.calls("again"), 1, "a known key skips the callback");
    assert_eq!(
        memory.queue_len("DLQ.dedup"),
        0,
        "no duplicate is dead-lettered"
    );
    assert_eq!(
        memory.queue_len("dedup") + memory.unacked_len("dedup"),
        0,
        "all acked"
    );
    let keys: Vec<_> = inbox(&test.db)
        .await
        .into_iter()
        .filter_map(|r| r.msg_id)
        .collect();
    assert_eq!(keys.len(), 3);
    test.drop_database().await;
}

// ---------------------------------------------------------------------------------------------
// A redelivered copy behind another transaction's uncommitted inbox row

#[tokio::test(flavor = "current_thread")]
async fn a_redelivered_copy_waits_at_most_the_lock_timeout_behind_an_uncommitted_inbox_row_on_postgres()
 {
    redelivered_copy_behind_an_uncommitted_inbox_row(Backend::Postgres).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_redelivered_copy_waits_at_most_the_lock_timeout_behind_an_uncommitted_inbox_row_on_mariadb()
 {
    redelivered_copy_behind_an_uncommitted_inbox_row(Backend::MariaDb).await;
}

/// The lock timeouts and the retries counted since the last snapshot (a snapshot reads every
/// counter and resets it).
fn lock_timeouts_and_retries(snapshotter: &Snapshotter) -> (u64, u64) {
    let mut counted = (0, 0);
    for (key, .., value) in snapshotter.snapshot().into_vec() {
        let DebugValue::Counter(n) = value else {
            continue;
        };
        let labelled = |name: &str, label: &str, wanted: &str| {
            key.key().name() == name
                && key
                    .key()
                    .labels()
                    .any(|l| l.key() == label && l.value() == wanted)
        };
        if labelled(outbox::metrics::DATABASE_TIMEOUTS, "kind", "lock") {
            counted.0 += n;
        }
        if labelled(outbox::metrics::CONSUMER_MESSAGES, "outcome", "retried") {
            counted.1 += n;
        }
    }
    counted
}

/// A consumer that stopped answering in the middle of a message holds its uncommitted inbox
/// row (and the lock on its key); the broker delivers the message again, here to another
/// consumer. The copy's inbox insert waits for that row at most `OUTBOX_DB_LOCK_TIMEOUT`,
/// fails transiently, is counted and tried again, and once the row is gone (the stalled
/// transaction rolled back) is processed, once. (The runtime is one thread: the consumer's
/// tasks record into this test's recorder.)
async fn redelivered_copy_behind_an_uncommitted_inbox_row(backend: Backend) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let test = TestDb::new(backend).await;
    create_effects_table(&test.db).await;
    let memory = MemoryTransport::new();
    let destination = "/topic/inbox_locked";
    let mut settings = config(RABBITMQ_STOMP);
    settings.db_statement_timeout = Duration::from_secs(3);
    // MariaDB counts its lock wait in whole seconds: 1 s there.
    settings.db_lock_timeout = Duration::from_millis(500);
    settings.consumer_retry_wait = Duration::from_millis(100);
    settings.consumer_max_retry_attempts = 100;
    let built = consumer(&test.db, settings, destination)
        .transport(memory.new_connection())
        .build()
        .unwrap();
    built.declare().await.unwrap();

    // The stalled consumer's transaction: its inbox row inserted, never committed.
    let stalled = test.db.begin().await.unwrap();
    let now = chrono::Utc::now();
    Received::insert(outbox::tables::received::ActiveModel {
        id: Set(uuid::Uuid::new_v4()),
        queue: Set("inbox_locked".into()),
        msg_id: Set(Some("locked-1".into())),
        headers: Set(None),
        body: Set(None),
        added: Set(now),
        expires_at: Set(now + chrono::Duration::days(1)),
        retry: Set(0),
        status: Set(Status::Succeeded),
    })
    .exec_without_returning(&stalled)
    .await
    .unwrap();
    outbox::send::send_with(
        &memory,
        destination,
        &json!({"do": "ok"}),
        &[("dop-msg-id", "locked-1")],
    )
    .await
    .unwrap();

    let probe = Probe::new();
    let db = test.db.clone();
    let started = Instant::now();
    let observed = std::rc::Rc::new(std::cell::Cell::new((0u64, 0u64, None::<Duration>)));
    let seen = observed.clone();
    built
        .run_until(probe.callback(), async move {
            let (mut lock_timeouts, mut retries) = (0, 0);
            while lock_timeouts < 2 {
                let (timeouts, retried) = lock_timeouts_and_retries(&snapshotter);
                lock_timeouts += timeouts;
                retries += retried;
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "the copy waited behind the uncommitted inbox row for {:?} without a lock \
                     timeout",
                    started.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(effect_count(&db, "locked-1").await, 0, "not processed yet");
            stalled.rollback().await.unwrap();
            let released_at = started.elapsed();
            eventually(Duration::from_secs(20), "the copy processed", || {
                let db = db.clone();
                async move { effect_count(&db, "locked-1").await == 1 }
            })
            .await;
            retries += lock_timeouts_and_retries(&snapshotter).1;
            seen.set((lock_timeouts, retries, Some(released_at)));
        })
        .await
        .unwrap();
    let (lock_timeouts, retries, released_at) = observed.get();
    println!(
        "{backend:?}: {lock_timeouts} lock timeouts and {retries} retries before the stalled \
         transaction ended at {released_at:?}"
    );
    assert!(
        lock_timeouts >= 2 && retries >= 2,
        "{lock_timeouts} {retries}"
    );
    assert_eq!(probe.calls("locked-1"), 1, "the callback ran once");
    assert_eq!(effect_count(&test.db, "locked-1").await, 1);
    assert_eq!(
        memory.queue_len("DLQ.inbox_locked"),
        0,
        "nothing dead-lettered"
    );
    assert_eq!(
        memory.queue_len("inbox_locked") + memory.unacked_len("inbox_locked"),
        0,
        "acknowledged"
    );
    test.drop_database().await;
}

async fn inbox_retention_deletes_old_rows_once_per_period(backend: Backend) {
    let test = TestDb::new(backend).await;
    create_effects_table(&test.db).await;
    let memory = MemoryTransport::new();
    let destination = "/topic/retention";
    let mut settings = config(RABBITMQ_STOMP);
    settings.remove_data_cache_ttl = Duration::from_secs(3600);
    let built = consumer(&test.db, settings.clone(), destination)
        .transport(memory.new_connection())
        .build()
        .unwrap();
    built.declare().await.unwrap();
    for id in ["old-1", "old-2", "recent"] {
        outbox::send::send_with(
            &memory,
            destination,
            &json!({"do": "ok"}),
            &[("dop-msg-id", id)],
        )
        .await
        .unwrap();
    }
    let probe = Probe::new();
    let db = test.db.clone();
    built
        .run_until(probe.callback(), async move {
            eventually(Duration::from_secs(10), "three messages", || {
                let db = db.clone();
                async move { inbox(&db).await.len() == 3 }
            })
            .await
        })
        .await
        .unwrap();
    let age = |ids: &'static [&'static str]| {
        let db = test.db.clone();
        async move {
            Received::update_many()
                .col_expr(
                    ReceivedColumn::Added,
                    sea_orm::sea_query::Expr::val(chrono::Utc::now() - chrono::Duration::days(40)),
                )
                .filter(ReceivedColumn::MsgId.is_in(ids.iter().copied()))
                .exec(&db)
                .await
                .unwrap();
        }
    };
    age(&["old-1", "old-2"]).await;
    // The run above took the cleanup turn (with nothing old yet): as if it were long ago.
    test.db
        .execute_unprepared("DELETE FROM outbox_housekeeping WHERE task = 'received_cleanup'")
        .await
        .unwrap();
    let run_briefly = |db: DatabaseConnection| {
        let settings = settings.clone();
        let memory = memory.new_connection();
        let probe = probe.clone();
        async move {
            consumer(&db, settings, destination)
                .transport(memory)
                .build()
                .unwrap()
                .run_until(
                    probe.callback(),
                    tokio::time::sleep(Duration::from_millis(500)),
                )
                .await
                .unwrap();
        }
    };
    run_briefly(test.db.clone()).await;
    let left: Vec<_> = inbox(&test.db)
        .await
        .into_iter()
        .filter_map(|r| r.msg_id)
        .collect();
    assert_eq!(left, ["recent"], "rows past days_to_keep_data are deleted");

    // Another consumer within the period does not clean again.
    age(&["recent"]).await;
    run_briefly(test.connect().await).await;
    assert_eq!(
        inbox(&test.db).await.len(),
        1,
        "at most one cleanup per period"
    );
    test.drop_database().await;
}

// ---------------------------------------------------------------------------------------------
// Concurrency and shutdown

#[tokio::test]
async fn with_several_in_flight_a_slow_message_stays_unacked_while_the_others_are_acked() {
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let (destination, queue, _cleanup) = fresh_destination("c_individual");
    declare_on_rabbitmq(&destination).await;
    send_raw(&destination, "slow", json!({"do": "gate"}), &[]).await;
    for id in ["fast-1", "fast-2"] {
        send_raw(&destination, id, json!({"do": "ok"}), &[]).await;
    }
    let probe = Probe::new();
    let handle = consumer(&test.db, config(RABBITMQ_STOMP), &destination)
        .in_flight(3)
        .start(probe.callback())
        .unwrap();
    let db = test.db.clone();
    eventually(Duration::from_secs(15), "the fast messages", || {
        let db = db.clone();
        async move { effect_count(&db, "fast-1").await + effect_count(&db, "fast-2").await == 2 }
    })
    .await;
    // Taken with the others, it may reach its callback a moment after they committed.
    eventually(
        Duration::from_secs(5),
        "the slow one is in its callback",
        || async { probe.calls("slow") == 1 },
    )
    .await;
    // With `ack:client` RabbitMQ would have settled the slow message with the later ACKs.
    let mut unsettled = None;
    for _ in 0..20 {
        unsettled = queue_message_count(&queue);
        if unsettled == Some(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(unsettled, Some(1), "only the slow message is still unacked");
    probe.gate.add_permits(1);
    eventually(Duration::from_secs(10), "the slow message", || {
        let db = db.clone();
        async move { effect_count(&db, "slow").await == 1 }
    })
    .await;
    handle.stop().await.unwrap();
    assert_eq!(queue_message_count(&queue), Some(0));
    test.drop_database().await;
}

#[tokio::test]
async fn stop_waits_for_the_callback_in_flight_and_acks_its_message() {
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let (destination, queue, _cleanup) = fresh_destination("c_stop");
    declare_on_rabbitmq(&destination).await;
    send_raw(&destination, "slow", json!({"do": "slow", "ms": 1500}), &[]).await;
    send_raw(&destination, "next", json!({"do": "ok"}), &[]).await;
    let probe = Probe::new();
    let handle = consumer(&test.db, config(RABBITMQ_STOMP), &destination)
        .start(probe.callback())
        .unwrap();
    let watching = probe.clone();
    eventually(Duration::from_secs(10), "the callback started", || {
        let started = watching.calls("slow") == 1;
        async move { started }
    })
    .await;
    let asked = Instant::now();
    handle.stop().await.unwrap();
    assert!(
        asked.elapsed() >= Duration::from_millis(900),
        "stop waited for the callback"
    );
    assert_eq!(
        effect_count(&test.db, "slow").await,
        1,
        "its work was committed"
    );
    assert_eq!(
        probe.calls("next"),
        0,
        "no message was taken after the stop"
    );
    // Acked before the UNSUBSCRIBE: only the untouched message is left in the queue.
    assert_eq!(queue_message_count(&queue), Some(1));
    test.drop_database().await;
}

#[tokio::test]
async fn a_callback_past_the_shutdown_timeout_is_abandoned_and_its_message_redelivered() {
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let memory = MemoryTransport::new();
    let destination = "/topic/abandoned";
    let probe = Probe::new();
    let built = consumer(&test.db, config(RABBITMQ_STOMP), destination)
        .transport(memory.new_connection())
        .shutdown_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    built.declare().await.unwrap();
    outbox::send::send_with(
        &memory,
        destination,
        &json!({"do": "gate"}),
        &[("dop-msg-id", "stuck")],
    )
    .await
    .unwrap();
    let watching = probe.clone();
    let started = Instant::now();
    built
        .run_until(probe.callback(), async move {
            eventually(Duration::from_secs(10), "the callback started", || {
                let started = watching.calls("stuck") == 1;
                async move { started }
            })
            .await
        })
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(effect_count(&test.db, "stuck").await, 0, "rolled back");
    assert!(inbox(&test.db).await.is_empty());
    assert_eq!(
        memory.queue_len("abandoned"),
        1,
        "back in the queue for the next consumer"
    );
    assert_eq!(memory.queue_len("DLQ.abandoned"), 0);
    test.drop_database().await;
}

// ---------------------------------------------------------------------------------------------
// The broker connection

#[tokio::test]
async fn a_cut_broker_connection_is_survived_with_nothing_lost_or_doubled() {
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let proxy = FaultProxy::start(stomp_addr()).await;
    let (destination, queue, _cleanup) = fresh_destination("c_cut");
    declare_on_rabbitmq(&destination).await;
    for n in 0..10 {
        send_raw(
            &destination,
            &format!("m-{n}"),
            json!({"do": "slow", "ms": 100}),
            &[],
        )
        .await;
    }
    let probe = Probe::new();
    let handle = consumer(&test.db, config(&proxy.addr().to_string()), &destination)
        .start(probe.callback())
        .unwrap();
    let watching = probe.clone();
    eventually(Duration::from_secs(15), "a few messages", || {
        let some = watching.total_calls() >= 3;
        async move { some }
    })
    .await;
    let before = proxy.accepted();
    proxy.cut();
    let db = test.db.clone();
    eventually(Duration::from_secs(30), "every message", || {
        let db = db.clone();
        async move { inbox(&db).await.len() == 10 }
    })
    .await;
    handle.stop().await.unwrap();
    assert!(proxy.accepted() > before, "the consumer reconnected");
    let done = effects(&test.db).await;
    assert_eq!(done.len(), 10, "nothing doubled: {done:?}");
    assert_eq!(queue_message_count(&queue), Some(0), "nothing left");
    test.drop_database().await;
}

/// A STOMP server that accepts everything, answers CONNECT and receipts, and reports each frame
/// it receives (command and unescaped headers): what the consumer puts on the wire.
async fn recording_broker() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<(String, BTreeMap<String, String>)>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (frames, recorded) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(serve_recording(socket, frames.clone()));
        }
    });
    (addr, recorded)
}

async fn serve_recording(
    mut socket: TcpStream,
    frames: mpsc::UnboundedSender<(String, BTreeMap<String, String>)>,
) {
    let mut buffer: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buffer.iter().position(|b| *b == 0) {
            let raw: Vec<u8> = buffer.drain(..=end).collect();
            let text = String::from_utf8_lossy(&raw[..raw.len() - 1]).into_owned();
            let text = text.trim_start_matches(['\n', '\r']);
            if text.is_empty() {
                continue;
            }
            let head = text.split_once("\n\n").map_or(text, |(head, _)| head);
            let mut lines = head.lines();
            let command = lines.next().unwrap_or_default().to_owned();
            let mut headers = BTreeMap::new();
            for line in lines {
                let (key, value) = line.split_once(':').unwrap_or((line, ""));
                let value = if command == "CONNECT" || command == "STOMP" {
                    value.to_owned()
                } else {
                    outbox_tests::stomp_peer::unescape(value).unwrap()
                };
                headers.entry(key.to_owned()).or_insert(value);
            }
            let mut reply = String::new();
            if command == "CONNECT" || command == "STOMP" {
                reply.push_str("CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\0");
            }
            if let Some(receipt) = headers.get("receipt") {
                reply.push_str(&format!("RECEIPT\nreceipt-id:{receipt}\n\n\0"));
            }
            let disconnect = command == "DISCONNECT";
            let _ = frames.send((command, headers));
            if socket.write_all(reply.as_bytes()).await.is_err() || disconnect {
                return;
            }
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    }
}

#[tokio::test]
async fn the_consumer_s_frames_are_the_python_library_s_and_reconnects_take_fresh_ids() {
    let test = TestDb::new(Backend::Sqlite).await;
    let (broker, mut recorded) = recording_broker().await;
    let proxy = FaultProxy::start(broker).await;
    let queue = "peer_wire_q";
    let handle = consumer(
        &test.db,
        config(&proxy.addr().to_string()),
        "/topic/peer_wire",
    )
    .queue(queue)
    .start(Probe::new().callback())
    .unwrap();
    let mut next_frame = async || {
        let (command, mut headers) = tokio::time::timeout(Duration::from_secs(10), recorded.recv())
            .await
            .expect("a frame")
            .expect("the broker runs");
        // Receipts are ours (we wait for the broker's answer); the rest must match exactly.
        headers.remove("receipt");
        (command, headers)
    };
    let expected = |destination: &str, dead_letter_key: &str, name: &str, id: &str| {
        [
            ("ack", "client-individual"),
            ("auto-delete", "false"),
            ("destination", destination),
            ("durable", "true"),
            ("exclusive", "False"),
            ("id", id),
            ("prefetch-count", "1"),
            ("x-dead-letter-exchange", ""),
            ("x-dead-letter-routing-key", dead_letter_key),
            ("x-queue-name", name),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect::<BTreeMap<_, _>>()
    };
    let unsubscribe = |id: &str| {
        (
            "UNSUBSCRIBE".to_owned(),
            BTreeMap::from([("id".to_owned(), id.to_owned())]),
        )
    };

    let mut main_ids = Vec::new();
    for round in 0..2 {
        assert_eq!(next_frame().await.0, "CONNECT");
        let (command, headers) = next_frame().await;
        assert_eq!(command, "SUBSCRIBE");
        let dlq_id = headers["id"].clone();
        assert_eq!(
            headers,
            expected(
                "DLQ.peer_wire_q",
                "DLQ.DLQ.DLQ.peer_wire_q",
                "DLQ.peer_wire_q",
                &dlq_id
            )
        );
        assert_eq!(
            next_frame().await,
            unsubscribe(&dlq_id),
            "UNSUBSCRIBE carries only the id"
        );
        // Reconnect, so that a dead letter handed to the declaring subscription goes back.
        assert_eq!(next_frame().await.0, "DISCONNECT");
        assert_eq!(next_frame().await.0, "CONNECT");
        let (command, headers) = next_frame().await;
        assert_eq!(command, "SUBSCRIBE");
        let id = headers["id"].clone();
        assert_eq!(
            headers,
            expected("/topic/peer_wire", "DLQ.peer_wire_q", queue, &id)
        );
        assert!(uuid::Uuid::parse_str(&id).is_ok() && id != dlq_id);
        main_ids.push(id);
        if round == 0 {
            proxy.cut();
        }
    }
    assert_ne!(
        main_ids[0], main_ids[1],
        "a fresh subscription id after reconnecting"
    );
    let stopping = tokio::spawn(handle.stop());
    assert_eq!(next_frame().await, unsubscribe(&main_ids[1]));
    assert_eq!(next_frame().await.0, "DISCONNECT");
    stopping.await.unwrap().unwrap();
}

#[tokio::test]
async fn queues_are_shared_with_python_consumers_either_way_without_precondition_failed() {
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;

    // Ours first, then a Python consumer redeclares them with its exact headers.
    let (destination, queue, _cleanup) = fresh_destination("c_ours_first");
    declare_on_rabbitmq(&destination).await;
    let mut python = StompPeer::connect(RABBITMQ_STOMP).await.unwrap();
    for (target, dead_letter_queue) in
        [(format!("DLQ.{queue}"), true), (destination.clone(), false)]
    {
        let headers = python_subscribe_headers(&queue, dead_letter_queue);
        let id = python
            .subscribe(&target, &as_refs(&headers))
            .await
            .unwrap_or_else(|e| panic!("redeclaring {target} as Python does failed: {e}"));
        python.unsubscribe(&id).await.unwrap();
    }
    python.disconnect().await.unwrap();

    // A Python consumer first (as its `start()` does: the DLQ, then the queue), then ours.
    let (destination, queue, _cleanup2) = fresh_destination("c_python_first");
    let mut python = StompPeer::connect(RABBITMQ_STOMP).await.unwrap();
    let headers = python_subscribe_headers(&queue, true);
    let id = python
        .subscribe(&format!("DLQ.{queue}"), &as_refs(&headers))
        .await
        .unwrap();
    python.unsubscribe(&id).await.unwrap();
    let headers = python_subscribe_headers(&queue, false);
    let id = python
        .subscribe(&destination, &as_refs(&headers))
        .await
        .unwrap();
    python.unsubscribe(&id).await.unwrap();
    python.disconnect().await.unwrap();
    send_raw(&destination, "from-python-queue", json!({"do": "ok"}), &[]).await;
    let probe = Probe::new();
    let handle = consumer(&test.db, config(RABBITMQ_STOMP), &destination)
        .start(probe.callback())
        .unwrap();
    let db = test.db.clone();
    eventually(Duration::from_secs(15), "the message", || {
        let db = db.clone();
        async move { effect_count(&db, "from-python-queue").await == 1 }
    })
    .await;
    handle.stop().await.unwrap();

    // The control: other arguments are refused, so the checks above would have seen a mismatch.
    let mut other = StompPeer::connect(RABBITMQ_STOMP).await.unwrap();
    let mut headers = python_subscribe_headers(&queue, false);
    for (key, value) in &mut headers {
        if key == "x-dead-letter-routing-key" {
            *value = "elsewhere".into();
        }
    }
    let refused = other.subscribe(&destination, &as_refs(&headers)).await;
    assert!(
        refused.is_err_and(|e| e.to_string().contains("PRECONDITION_FAILED")
            || e.to_string().contains("inequivalent")),
        "RabbitMQ compares the arguments"
    );
    test.drop_database().await;
}

// ---------------------------------------------------------------------------------------------
// Callbacks that hang, and panics outside the callback

#[tokio::test]
async fn a_hung_callback_is_abandoned_at_its_deadline_retried_then_dead_lettered_and_the_queue_moves_on()
 {
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let (destination, queue, _cleanup) = fresh_destination("c_hung");
    declare_on_rabbitmq(&destination).await;
    send_raw(&destination, "hang", json!({"do": "hang"}), &[]).await;
    send_raw(&destination, "hang-once", json!({"do": "hang-once"}), &[]).await;
    for id in ["ok-1", "ok-2", "ok-3"] {
        send_raw(&destination, id, json!({"do": "ok"}), &[]).await;
    }
    let mut settings = config(RABBITMQ_STOMP);
    settings.consumer_callback_timeout = Duration::from_millis(400);
    settings.consumer_max_retry_attempts = 2;
    let probe = Probe::new();
    let started = Instant::now();
    let handle = consumer(&test.db, settings, &destination)
        .start(probe.callback())
        .unwrap();
    let db = test.db.clone();
    eventually(
        Duration::from_secs(20),
        "the messages behind the hung ones",
        || {
            let db = db.clone();
            async move { effect_count(&db, "ok-3").await == 1 }
        },
    )
    .await;
    // One message at a time: the hung one held the queue for its three attempts only.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let dead_letters = format!("DLQ.{queue}");
    eventually(
        Duration::from_secs(10),
        "the hung message dead-lettered",
        || {
            let count = queue_message_count(&dead_letters);
            async move { count == Some(1) }
        },
    )
    .await;
    handle.stop().await.unwrap();
    assert_eq!(probe.calls("hang"), 3, "one call and two retries");
    assert_eq!(
        effect_count(&test.db, "hang").await,
        0,
        "every attempt rolled back"
    );
    assert_eq!(probe.calls("hang-once"), 2);
    assert_eq!(
        effect_count(&test.db, "hang-once").await,
        1,
        "the retry's work only"
    );
    let keys: Vec<_> = inbox(&test.db)
        .await
        .into_iter()
        .filter_map(|row| row.msg_id)
        .collect();
    assert!(!keys.contains(&"hang".to_owned()), "{keys:?}");
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert_eq!(queue_message_count(&queue), Some(0));
    test.drop_database().await;
}

#[tokio::test]
async fn a_callback_stuck_in_a_database_statement_is_abandoned_too_and_the_queue_moves_on() {
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let (destination, queue, _cleanup) = fresh_destination("c_hung_sql");
    declare_on_rabbitmq(&destination).await;
    send_raw(
        &destination,
        "stuck",
        json!({"do": "sleep-in-database", "seconds": 20}),
        &[],
    )
    .await;
    send_raw(&destination, "next", json!({"do": "ok"}), &[]).await;
    let mut settings = config(RABBITMQ_STOMP);
    settings.consumer_callback_timeout = Duration::from_millis(300);
    settings.consumer_max_retry_attempts = 0;
    let probe = Probe::new();
    let started = Instant::now();
    let handle = consumer(&test.db, settings, &destination)
        .start(probe.callback())
        .unwrap();
    let db = test.db.clone();
    eventually(Duration::from_secs(20), "the next message", || {
        let db = db.clone();
        async move { effect_count(&db, "next").await == 1 }
    })
    .await;
    let waited = started.elapsed();
    let dead_letters = format!("DLQ.{queue}");
    eventually(
        Duration::from_secs(10),
        "the stuck message dead-lettered",
        || {
            let count = queue_message_count(&dead_letters);
            async move { count == Some(1) }
        },
    )
    .await;
    handle.stop().await.unwrap();
    // The rollback waits behind the statement, for 10 s at most: then the connection is left to
    // the pool, and the message settled.
    assert!(
        waited < Duration::from_secs(17),
        "the message behind a callback stuck in SQL waited {waited:?}"
    );
    assert_eq!(probe.calls("stuck"), 1);
    assert_eq!(effect_count(&test.db, "stuck").await, 0, "rolled back");
    test.drop_database().await;
}

/// A metrics recorder (installed for this thread only) that panics at chosen points of the
/// consumer's own per-message code: when the callback's duration is recorded (after the
/// callback, before the commit) and when an acknowledged message is counted (after the commit).
/// A recorder is code the consumer calls outside the callback, as its logging is: a panic there
/// is a panic in the library's handling of the message.
#[derive(Default)]
struct PanickingRecorder {
    /// Panics left at the callback-duration histogram.
    before_commit: AtomicUsize,
    /// Panics left at the counter of acknowledged messages.
    after_commit: AtomicUsize,
}

impl PanickingRecorder {
    fn take(left: &AtomicUsize) -> bool {
        left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

impl metrics::Recorder for PanickingRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let acked = key.name() == outbox::metrics::CONSUMER_MESSAGES
            && key
                .labels()
                .any(|l| l.key() == "outcome" && l.value() == "acked");
        if acked && Self::take(&self.after_commit) {
            panic!("the recorder panicked after the commit");
        }
        metrics::Counter::noop()
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        if key.name() == outbox::metrics::CONSUMER_CALLBACK_DURATION
            && Self::take(&self.before_commit)
        {
            panic!("the recorder panicked before the commit");
        }
        metrics::Histogram::noop()
    }
}

/// The runtime of this test is one thread: the consumer's tasks run where the recorder is set.
#[tokio::test(flavor = "current_thread")]
async fn a_panic_in_the_consumer_s_own_code_still_settles_the_message() {
    let recorder = PanickingRecorder {
        before_commit: AtomicUsize::new(1),
        after_commit: AtomicUsize::new(1),
    };
    let _local = metrics::set_default_local_recorder(&recorder);
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let (destination, queue, _cleanup) = fresh_destination("c_lib_panic");
    declare_on_rabbitmq(&destination).await;
    // In order, one at a time: the first panics before its commit, the second after it.
    for id in ["before-commit", "after-commit", "after-panics"] {
        send_raw(&destination, id, json!({"do": "ok"}), &[]).await;
    }
    let probe = Probe::new();
    let handle = consumer(&test.db, config(RABBITMQ_STOMP), &destination)
        .start(probe.callback())
        .unwrap();
    let db = test.db.clone();
    eventually(
        Duration::from_secs(20),
        "the message after the panics",
        || {
            let db = db.clone();
            async move { effect_count(&db, "after-panics").await == 1 }
        },
    )
    .await;
    let dead_letters = format!("DLQ.{queue}");
    eventually(
        Duration::from_secs(10),
        "the rolled-back message dead-lettered",
        || {
            let count = queue_message_count(&dead_letters);
            async move { count == Some(1) }
        },
    )
    .await;
    // Nothing held: every message settled while the consumer still runs.
    eventually(Duration::from_secs(10), "the queue empty", || {
        let count = queue_message_count(&queue);
        async move { count == Some(0) }
    })
    .await;
    handle.stop().await.unwrap();
    assert_eq!(
        recorder.before_commit.load(Ordering::SeqCst),
        0,
        "the first panic happened"
    );
    assert_eq!(
        recorder.after_commit.load(Ordering::SeqCst),
        0,
        "the second panic happened"
    );
    assert_eq!(
        effect_count(&test.db, "before-commit").await,
        0,
        "rolled back"
    );
    assert_eq!(
        effect_count(&test.db, "after-commit").await,
        1,
        "committed, and acknowledged"
    );
    assert_eq!(probe.calls("after-commit"), 1, "not delivered again");
    let keys: Vec<_> = inbox(&test.db)
        .await
        .into_iter()
        .filter_map(|row| row.msg_id)
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(!keys.contains(&"before-commit".to_owned()), "{keys:?}");
    test.drop_database().await;
}

// ---------------------------------------------------------------------------------------------
// Signals: Consumer::run in a process of its own

const SIGNAL_CHILD_DB: &str = "OUTBOX_TEST_SIGNAL_CHILD_DATABASE_URL";
const SIGNAL_CHILD_DESTINATION: &str = "OUTBOX_TEST_SIGNAL_CHILD_DESTINATION";

/// The child process of the signal tests: this test binary run again with this test alone. It
/// runs `Consumer::run` (stopped by signals only) and says on stdout what it is doing; without
/// its variables it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the consumer child process of the signal tests; runs only as a child"]
async fn signal_child_consumer() {
    let Some((url, destination)) = child_vars(SIGNAL_CHILD_DB, SIGNAL_CHILD_DESTINATION) else {
        return;
    };
    let db = sea_orm::Database::connect(url)
        .await
        .expect("child: database");
    let mut settings = config(RABBITMQ_STOMP);
    settings.consumer_shutdown_timeout = Duration::from_secs(60);
    let built = consumer(&db, settings, &destination)
        .build()
        .expect("child: consumer");
    built
        .run(|payload: Payload| async move {
            let key = payload.message_id().unwrap_or_default().to_owned();
            if payload.body()["do"] == "hang" {
                println!("child: callback started {key}");
                std::future::pending::<()>().await;
            }
            payload.save();
            println!("child: processed {key}");
            Ok::<_, BoxError>(())
        })
        .await
        .expect("child: consumer ran");
    println!("child: stopped");
}

/// Starts the signal child on `destination`; returns it and its stdout lines.
fn spawn_signal_child(
    test: &TestDb,
    destination: &str,
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(std::env::current_exe().expect("this binary"))
        .args([
            "consumer::signal_child_consumer",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SIGNAL_CHILD_DB, &test.url)
        .env(SIGNAL_CHILD_DESTINATION, destination)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the consumer child");
    let lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    (child, lines)
}

/// Reads the child's stdout up to a line with `expected`.
async fn wait_for_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    expected: &str,
) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.expect("read the child") {
            // libtest may print its own words before ours on the line.
            if line.contains(expected) {
                return;
            }
        }
        panic!("the child ended before `{expected}`");
    })
    .await
    .unwrap_or_else(|_| panic!("no `{expected}` from the child within 20 s"));
}

fn send_signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("run kill");
    assert!(sent.success());
}

#[tokio::test]
async fn a_second_signal_during_the_graceful_stop_of_consumer_run_exits_at_once() {
    let test = TestDb::new(Backend::Postgres).await;
    let (destination, queue, _cleanup) = fresh_destination("c_second_signal");
    declare_on_rabbitmq(&destination).await;
    send_raw(&destination, "stuck", json!({"do": "hang"}), &[]).await;
    let (mut child, mut lines) = spawn_signal_child(&test, &destination);
    wait_for_line(&mut lines, "child: callback started stuck").await;
    send_signal(&child, "-TERM");
    // The first signal starts the graceful stop, which waits (up to 60 s) for the callback.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "still waiting for its callback"
    );
    let asked = Instant::now();
    send_signal(&child, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the second signal ends the process")
        .unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    // Unacknowledged, the message is the broker's again.
    eventually(
        Duration::from_secs(10),
        "the message back in its queue",
        || {
            let count = queue_message_count(&queue);
            async move { count == Some(1) }
        },
    )
    .await;
    assert!(inbox(&test.db).await.is_empty());
    test.drop_database().await;
}

#[tokio::test]
async fn consumer_run_stops_gracefully_on_sigquit_as_on_sigterm() {
    let test = TestDb::new(Backend::Postgres).await;
    let (destination, queue, _cleanup) = fresh_destination("c_sigquit");
    declare_on_rabbitmq(&destination).await;
    send_raw(&destination, "first", json!({"do": "ok"}), &[]).await;
    let (mut child, mut lines) = spawn_signal_child(&test, &destination);
    wait_for_line(&mut lines, "child: processed first").await;
    send_signal(&child, "-QUIT");
    wait_for_line(&mut lines, "child: stopped").await;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("SIGQUIT stops the consumer")
        .unwrap();
    assert_eq!(status.code(), Some(0), "a graceful stop, not a core dump");
    assert_eq!(inbox(&test.db).await.len(), 1);
    assert_eq!(queue_message_count(&queue), Some(0));
    test.drop_database().await;
}
