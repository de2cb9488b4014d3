//! Group commits of the consumer against RabbitMQ and each real database: in one group, a
//! message that fails, one that nacks, a duplicate and one that fails transiently, with the
//! others committed together and each message settled exactly once; duplicates spread over
//! concurrent groups (unique-index waits, deadlocks) with one effect each and none dead-lettered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::transport::{StompSettings, StompTransport};
use outbox::{Consumer, OutboxConfig, Payload};
use outbox_tests::stomp_peer::{
    QueueCleanup, RABBITMQ_STOMP, StompPeer, queue_message_count, unique,
};
use outbox_tests::{Backend, TestDb, eventually, on_every_backend};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde_json::{Value, json};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn config() -> OutboxConfig {
    let (host, port) = RABBITMQ_STOMP.rsplit_once(':').expect("host:port");
    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = vec![(host.to_owned(), port.parse().expect("port"))];
    config.maximum_backoff = Duration::from_millis(300);
    config.consumer_retry_wait = Duration::from_millis(50);
    config.consumer_shutdown_timeout = Duration::from_secs(10);
    config
}

fn fresh_destination(prefix: &str) -> (String, String, QueueCleanup) {
    let queue = unique(prefix);
    let cleanup = QueueCleanup(vec![queue.clone(), format!("DLQ.{queue}")]);
    (format!("/topic/{queue}"), queue, cleanup)
}

async fn declare(destination: &str) {
    let settings = config();
    let broker = StompTransport::new(StompSettings::from(&settings)).expect("transport");
    outbox::consumer::declare(&broker, &settings, destination, None)
        .await
        .expect("declare the queues");
}

async fn send(destination: &str, msg_id: &str, body: Value) {
    let mut peer = StompPeer::connect(RABBITMQ_STOMP).await.expect("connect");
    peer.send(
        destination,
        &[("dop-msg-id", msg_id)],
        body.to_string().as_bytes(),
    )
    .await
    .expect("send");
    peer.disconnect().await.expect("disconnect");
}

async fn create_effects_table(db: &DatabaseConnection) {
    db.execute_unprepared(
        "CREATE TABLE effects (msg_id VARCHAR(100) NOT NULL, note VARCHAR(100) NOT NULL)",
    )
    .await
    .expect("create the effects table");
}

/// The effects per message id, as `db` sees them.
async fn effects<C: ConnectionTrait>(db: &C) -> HashMap<String, usize> {
    let statement = Statement::from_string(db.get_database_backend(), "SELECT msg_id FROM effects");
    let mut counts = HashMap::new();
    for row in db.query_all_raw(statement).await.expect("read effects") {
        *counts
            .entry(row.try_get_by_index::<String>(0).unwrap())
            .or_default() += 1;
    }
    counts
}

/// What the member that looks around saw from inside its group.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Seen {
    /// Effects visible in the group's transaction.
    inside: usize,
    /// Effects committed, as another connection sees them.
    outside: usize,
    /// Messages in the queue, ready or unacknowledged.
    queued: Option<usize>,
}

#[derive(Clone, Default)]
struct Probe {
    calls: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Option<Seen>>>,
}

impl Probe {
    fn calls(&self, msg_id: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|id| *id == msg_id)
            .count()
    }

    async fn behave(
        self,
        payload: Payload,
        outside: DatabaseConnection,
        queue: String,
    ) -> Result<(), BoxError> {
        let key = payload.message_id().unwrap_or_default().to_owned();
        let action = payload.body()["do"].as_str().unwrap_or("ok").to_owned();
        let attempt = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(key.clone());
            calls.iter().filter(|id| **id == key).count()
        };
        payload
            .db()
            .execute_unprepared(&format!(
                "INSERT INTO effects (msg_id, note) VALUES ('{key}', '{action}')"
            ))
            .await?;
        match action.as_str() {
            "ok" => payload.save(),
            "slow" => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                payload.save();
            }
            "fail" => return Err("the callback refused the message".into()),
            "nack" => payload.nack(),
            "flaky" => {
                if attempt == 1 {
                    return Err(outbox::consumer::Transient::new(
                        "a service is briefly unavailable",
                    )
                    .into());
                }
                payload.save();
            }
            "look" => {
                let inside = effects(payload.db()).await.values().sum();
                let outside = effects(&outside).await.values().sum();
                let queued = tokio::task::spawn_blocking(move || queue_message_count(&queue))
                    .await
                    .unwrap();
                *self.seen.lock().unwrap() = Some(Seen {
                    inside,
                    outside,
                    queued,
                });
                payload.save();
            }
            other => panic!("unknown action {other}"),
        }
        Ok(())
    }
}

on_every_backend!(
    one_group_commits_its_good_members_and_settles_each_message_once,
    duplicates_across_concurrent_groups_have_one_effect_and_none_is_dead_lettered,
);

async fn one_group_commits_its_good_members_and_settles_each_message_once(backend: Backend) {
    let test = TestDb::new(backend).await;
    create_effects_table(&test.db).await;
    let (destination, queue, _cleanup) = fresh_destination("g_members");
    declare(&destination).await;
    // In this order, all in the queue before the consumer starts: one group takes them.
    let messages = [
        ("first", "ok"),
        ("refused", "fail"),
        ("nacked", "nack"),
        ("first", "ok"),
        ("looks", "look"),
        ("flaky", "flaky"),
        ("after", "ok"),
    ];
    for (id, action) in messages {
        send(&destination, id, json!({ "do": action })).await;
    }
    let probe = Probe::default();
    let outside = test.connect().await;
    let handle = Consumer::builder(test.db.clone())
        .config(config())
        .destination(&destination)
        .group_size(16)
        .group_wait(Duration::from_millis(500))
        .start({
            let probe = probe.clone();
            let queue = queue.clone();
            move |payload| {
                probe
                    .clone()
                    .behave(payload, outside.clone(), queue.clone())
            }
        })
        .unwrap();
    let db = test.db.clone();
    eventually(Duration::from_secs(30), "every message settled", || {
        let db = db.clone();
        let queue = queue.clone();
        async move {
            effects(&db).await.get("after") == Some(&1)
                && tokio::task::spawn_blocking(move || queue_message_count(&queue))
                    .await
                    .unwrap()
                    == Some(0)
        }
    })
    .await;
    handle.stop().await.unwrap();

    let seen = probe.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        Some(Seen {
            // "first" and its own: the failed and nacked members rolled back to their savepoints.
            inside: 2,
            // Nothing committed yet: the group's transaction is one.
            outside: 0,
            // Nothing settled before the commit.
            queued: Some(messages.len()),
        }),
        "what a member saw from inside the group"
    );
    let effects = effects(&test.db).await;
    let expected: HashMap<String, usize> = [("first", 1), ("looks", 1), ("flaky", 1), ("after", 1)]
        .into_iter()
        .map(|(id, n)| (id.to_owned(), n))
        .collect();
    assert_eq!(effects, expected, "each saved effect once, the others none");
    assert_eq!(
        probe.calls("first"),
        1,
        "the duplicate skipped the callback"
    );
    assert_eq!(probe.calls("refused"), 1, "dead-lettered, not retried");
    assert_eq!(probe.calls("nacked"), 1);
    assert_eq!(probe.calls("flaky"), 2, "retried once, alone");
    assert_eq!(
        probe.calls("looks"),
        1,
        "acknowledged once, not delivered again"
    );
    assert_eq!(probe.calls("after"), 1);
    assert_eq!(
        queue_message_count(&format!("DLQ.{queue}")),
        Some(2),
        "the refused and the nacked message dead-lettered"
    );
    test.drop_database().await;
}

async fn duplicates_across_concurrent_groups_have_one_effect_and_none_is_dead_lettered(
    backend: Backend,
) {
    let test = TestDb::new(backend).await;
    create_effects_table(&test.db).await;
    let (destination, queue, _cleanup) = fresh_destination("g_dups");
    declare(&destination).await;
    // Each key twice, the copies in the reverse order: concurrent groups insert the same keys in
    // opposite orders (unique-index waits, and deadlocks the database breaks).
    let keys: Vec<String> = (0..12).map(|n| format!("k{n}")).collect();
    for key in keys.iter().chain(keys.iter().rev()) {
        send(&destination, key, json!({ "do": "slow" })).await;
    }
    let probe = Probe::default();
    let outside = test.connect().await;
    let mut settings = config();
    settings.consumer_max_retry_attempts = 10;
    let handle = Consumer::builder(test.db.clone())
        .config(settings)
        .destination(&destination)
        .in_flight(4)
        .prefetch(24)
        .group_size(6)
        .group_wait(Duration::from_millis(200))
        .start({
            let probe = probe.clone();
            let queue = queue.clone();
            move |payload| {
                probe
                    .clone()
                    .behave(payload, outside.clone(), queue.clone())
            }
        })
        .unwrap();
    let db = test.db.clone();
    eventually(Duration::from_secs(60), "every key's effect", || {
        let db = db.clone();
        let queue = queue.clone();
        async move {
            effects(&db).await.len() == 12
                && tokio::task::spawn_blocking(move || queue_message_count(&queue))
                    .await
                    .unwrap()
                    == Some(0)
        }
    })
    .await;
    handle.stop().await.unwrap();
    let effects = effects(&test.db).await;
    for key in &keys {
        assert_eq!(
            effects.get(key),
            Some(&1),
            "{key}: one effect ({effects:?})"
        );
    }
    assert_eq!(
        queue_message_count(&format!("DLQ.{queue}")),
        Some(0),
        "a duplicate is not a failure"
    );
    assert_eq!(
        queue_message_count(&queue),
        Some(0),
        "every copy acknowledged"
    );
    test.drop_database().await;
}
