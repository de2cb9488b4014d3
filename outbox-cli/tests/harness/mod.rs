//! The fault suite's harness: a known set of messages, an effects table that counts each
//! message's effect, a second queue that counts copies on the wire, and the summary line every
//! scenario prints. Each fault test binary includes it with `mod harness;`.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::stomp_peer::{
    Frame, QueueCleanup, RABBITMQ_STOMP, StompPeer, queue_message_count, unique,
};
use crate::common::{count_with_status, eventually};
use outbox::config::Secret;
use outbox::tables::published::Column;
use outbox::tables::published::Status;
use outbox::{OutboxConfig, Payload, Published};
use sea_orm::{
    ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, EntityTrait,
    PaginatorTrait, QueryFilter, Statement, TransactionTrait,
};
use serde_json::json;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

// ---------------------------------------------------------------------------------------------
// Harness

/// Full counts (`OUTBOX_TEST_FAULT_FULL=1`) or the CI's smaller ones.
pub fn full() -> bool {
    std::env::var("OUTBOX_TEST_FAULT_FULL").is_ok_and(|v| v == "1" || v == "true")
}

pub fn counts(ci: usize, full_count: usize) -> usize {
    if full() { full_count } else { ci }
}

/// A random number in `0..bound` (no RNG crate needed: a v4 UUID is 122 random bits).
pub fn random(bound: u64) -> u64 {
    (uuid::Uuid::new_v4().as_u128() % u128::from(bound.max(1))) as u64
}

pub fn stomp_addr() -> SocketAddr {
    RABBITMQ_STOMP.parse().expect("an address")
}

/// RabbitMQ's AMQP 0-9-1 listener (guest/guest, vhost `/`).
pub const RABBITMQ_AMQP: &str = "127.0.0.1:5672";

/// The protocol a scenario's relay and consumer speak to RabbitMQ. Both reach the same queues:
/// a queue declared over one is consumed over the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// STOMP 1.2 through RabbitMQ's STOMP plugin (`OUTBOX_STOMP_HOST_AND_PORTS`).
    Stomp,
    /// AMQP 0-9-1 (`OUTBOX_BROKER_URL`).
    Amqp,
}

impl TransportKind {
    /// Its name, as a child process is told it ([`TransportKind::from_name`]).
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Stomp => "stomp",
            TransportKind::Amqp => "amqp",
        }
    }

    /// The kind named `name` by [`TransportKind::name`].
    pub fn from_name(name: &str) -> Option<TransportKind> {
        [TransportKind::Stomp, TransportKind::Amqp]
            .into_iter()
            .find(|kind| kind.name() == name)
    }

    /// A scenario's summary name: `scenario` over STOMP, `scenario_amqp` over AMQP.
    pub fn summary_name(self, scenario: &str) -> String {
        match self {
            TransportKind::Stomp => scenario.to_owned(),
            TransportKind::Amqp => format!("{scenario}_amqp"),
        }
    }

    /// RabbitMQ's listener for this protocol.
    pub fn broker_addr(self) -> SocketAddr {
        match self {
            TransportKind::Stomp => stomp_addr(),
            TransportKind::Amqp => RABBITMQ_AMQP.parse().expect("an address"),
        }
    }

    /// Settings for tests ([`config`]'s short timings) for the broker at `addr`: RabbitMQ
    /// itself, or a proxy in front of it.
    pub fn config_at(self, addr: SocketAddr) -> OutboxConfig {
        match self {
            TransportKind::Stomp => config(&addr.to_string()),
            TransportKind::Amqp => {
                let mut config = short_timings(OutboxConfig::default());
                config.broker_url = vec![Secret::new(amqp_url(addr))];
                config
            }
        }
    }

    /// Settings for tests for RabbitMQ itself.
    pub fn config(self) -> OutboxConfig {
        self.config_at(self.broker_addr())
    }

    /// Points an `outbox` command at the broker at `addr` over this protocol, removing the
    /// other protocol's variable (inherited, it would contradict this one).
    pub fn point_command(
        self,
        command: &mut tokio::process::Command,
        addr: SocketAddr,
    ) -> &mut tokio::process::Command {
        match self {
            TransportKind::Stomp => command
                .env_remove("OUTBOX_BROKER_URL")
                .env("OUTBOX_STOMP_HOST_AND_PORTS", addr.to_string()),
            TransportKind::Amqp => command
                .env_remove("OUTBOX_STOMP_HOST_AND_PORTS")
                .env("OUTBOX_BROKER_URL", amqp_url(addr)),
        }
    }
}

/// The AMQP URL of RabbitMQ's guest user and vhost `/` at `addr`.
fn amqp_url(addr: SocketAddr) -> String {
    format!("amqp://guest:guest@{addr}/%2f")
}

/// Settings for tests: the given broker, short timings.
pub fn config(broker: &str) -> OutboxConfig {
    let (host, port) = broker.rsplit_once(':').expect("host:port");
    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = vec![(host.to_owned(), port.parse().expect("port"))];
    short_timings(config)
}

/// `config` with the tests' short timings.
fn short_timings(mut config: OutboxConfig) -> OutboxConfig {
    config.receipt_timeout = Duration::from_secs(2);
    config.producer_lease = Duration::from_secs(4);
    config.maximum_backoff = Duration::from_millis(300);
    config.producer_waiting_time = Duration::from_millis(100);
    config.pause_for_retry = Duration::ZERO;
    config.wait_retry = Duration::ZERO;
    config.consumer_retry_wait = Duration::from_millis(100);
    config.consumer_shutdown_timeout = Duration::from_secs(5);
    config
}

/// Prints a scenario's summary line and appends it to the suite's summary file.
pub fn summary(name: &str, counted: &Counted, wire_duplicates: usize, extra: &str) -> String {
    let line = format!(
        "fault.{name} sent={} effects={} lost={} duplicate_effects={} wire_duplicates={wire_duplicates}{}{extra}",
        counted.sent,
        counted.effects,
        counted.lost,
        counted.duplicate_effects,
        if extra.is_empty() { "" } else { " " },
    );
    println!("{line}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault-summary.txt");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(file, "{line}");
    }
    line
}

/// A pool of `size` connections on `url`; connecting is retried (a loaded CI machine can be slow
/// to accept), with generous timeouts.
pub async fn pool(url: &str, size: u32) -> DatabaseConnection {
    let mut last = None;
    for _ in 0..3 {
        let mut options = ConnectOptions::new(url.to_owned());
        options
            .max_connections(size)
            .connect_timeout(Duration::from_secs(30))
            .acquire_timeout(Duration::from_secs(30))
            .sqlx_logging(false);
        match Database::connect(options).await {
            Ok(db) => return db,
            Err(err) => last = Some(err),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("connecting to {url} failed: {last:?}")
}

/// Waits until every outbox row is SUCCEEDED; on timeout, says where the rows are.
pub async fn wait_until_all_sent(db: &DatabaseConnection, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let sent = count_with_status(db, Status::Succeeded).await;
        if sent == n as u64 {
            return;
        }
        if Instant::now() >= deadline {
            let claimed = Published::find()
                .filter(Column::ClaimToken.is_not_null())
                .count(db)
                .await;
            let failed = count_with_status(db, Status::Failed).await;
            panic!(
                "after {limit:?}: {sent} of {n} rows sent, {failed} failed, claimed: {claimed:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The business table the callbacks write to, in the message's transaction. No unique key: a
/// message processed twice shows as two rows.
pub async fn create_effects_table(db: &DatabaseConnection) {
    db.execute_unprepared(
        "CREATE TABLE effects (msg_id VARCHAR(100) NOT NULL, note VARCHAR(100) NOT NULL)",
    )
    .await
    .expect("create the effects table");
}

pub async fn insert_effect(
    db: &impl ConnectionTrait,
    msg_id: &str,
    note: &str,
) -> Result<(), sea_orm::DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "INSERT INTO effects (msg_id, note) VALUES ($1, $2)",
        [msg_id.into(), note.into()],
    ))
    .await
    .map(|_| ())
}

/// Effect rows per message id.
pub async fn effect_counts(db: &DatabaseConnection) -> HashMap<String, usize> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT msg_id, COUNT(*) FROM effects GROUP BY msg_id",
        ))
        .await
        .expect("read effects");
    rows.iter()
        .map(|row| {
            (
                row.try_get_by_index::<String>(0).unwrap(),
                row.try_get_by_index::<i64>(1).unwrap() as usize,
            )
        })
        .collect()
}

pub async fn effect_notes(db: &DatabaseConnection, note: &str) -> usize {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "SELECT COUNT(*) FROM effects WHERE note = $1",
            [note.into()],
        ))
        .await
        .expect("count effects")
        .expect("a row");
    row.try_get_by_index::<i64>(0).unwrap() as usize
}

pub async fn distinct_effects(db: &DatabaseConnection) -> usize {
    effect_counts(db).await.len()
}

/// What the business table says about the messages in `expected`.
pub struct Counted {
    pub sent: usize,
    pub effects: usize,
    pub lost: usize,
    pub duplicate_effects: usize,
}

pub fn count(expected: &HashSet<String>, effects: &HashMap<String, usize>) -> Counted {
    Counted {
        sent: expected.len(),
        effects: expected
            .iter()
            .map(|id| effects.get(id).copied().unwrap_or(0))
            .sum(),
        lost: expected
            .iter()
            .filter(|id| !effects.contains_key(*id))
            .count(),
        duplicate_effects: effects.values().map(|n| n.saturating_sub(1)).sum(),
    }
}

/// Every outbox row id.
pub async fn outbox_ids(db: &DatabaseConnection) -> HashSet<String> {
    Published::find()
        .all(db)
        .await
        .expect("read the outbox")
        .into_iter()
        .map(|row| row.id.to_string())
        .collect()
}

/// Enqueues `count` messages in transactions of up to 500; retried when the database drops the
/// connection (a rolled-back transaction wrote nothing).
pub async fn enqueue_many(db: &DatabaseConnection, destination: &str, count: usize, from: usize) {
    let mut start = 0;
    while start < count {
        let size = (count - start).min(500);
        let result = async {
            let txn = db.begin().await?;
            let messages = (start..start + size).map(|n| {
                outbox::Message::from_json(
                    destination,
                    json!({"do": "ok", "tag": "ok", "n": from + n}),
                )
            });
            outbox::enqueue_all(&txn, messages)
                .await
                .map_err(|e| sea_orm::DbErr::Custom(e.to_string()))?;
            txn.commit().await
        }
        .await;
        match result {
            Ok(()) => start += size,
            Err(err) => {
                eprintln!("enqueue failed ({err}); again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Declares the consumer's queues (bound to the topic, and its dead-letter queue) on RabbitMQ,
/// over STOMP.
pub async fn declare_consumer_queues(destination: &str) {
    declare_consumer_queues_over(TransportKind::Stomp, destination).await;
}

/// Declares the consumer's queues over `kind`, as a consumer over `kind` declares them.
pub async fn declare_consumer_queues_over(kind: TransportKind, destination: &str) {
    let settings = kind.config();
    let broker = outbox::transport::from_config(&settings).expect("transport");
    outbox::consumer::declare(broker.as_ref(), &settings, destination, None)
        .await
        .expect("declare the queues");
}

/// Reads every copy the broker routes to a second queue bound to the topic, to count the
/// messages that went over the wire more than once. It reads all along, on a task of its own:
/// RabbitMQ closes a connection whose socket it cannot write to for 15 s (`send_timeout`), so a
/// subscriber that reads only at the end of a long run would lose its connection.
pub struct WireCounter {
    frames: tokio::sync::mpsc::UnboundedReceiver<Option<Frame>>,
    reader: tokio::task::JoinHandle<()>,
    seen: HashMap<String, usize>,
}

impl WireCounter {
    pub async fn start(topic: &str, queue: &str) -> WireCounter {
        let mut peer = StompPeer::connect(RABBITMQ_STOMP)
            .await
            .expect("connect to RabbitMQ");
        peer.subscribe(
            topic,
            &[
                ("ack", "auto"),
                ("durable", "true"),
                ("auto-delete", "false"),
                ("x-queue-name", queue),
            ],
        )
        .await
        .expect("subscribe the wire counter");
        let (tx, frames) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                // `None`: the connection ended (no test runs for a day).
                let frame = peer.next_message(Duration::from_secs(86_400)).await;
                let ended = frame.is_none();
                if tx.send(frame).is_err() || ended {
                    return;
                }
            }
        });
        WireCounter {
            frames,
            reader,
            seen: HashMap::new(),
        }
    }

    /// Reads until every id of `expected` was seen and nothing more came for a second; returns
    /// the duplicate copies.
    pub async fn duplicates(&mut self, expected: &HashSet<String>) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let complete = expected.iter().all(|id| self.seen.contains_key(id));
            let wait = if complete {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(10)
            };
            match tokio::time::timeout(wait, self.frames.recv()).await {
                Ok(Some(Some(frame))) if frame.command == "MESSAGE" => {
                    let id = frame.header("dop-msg-id").unwrap_or_default().to_owned();
                    *self.seen.entry(id).or_default() += 1;
                }
                Ok(Some(Some(other))) => {
                    panic!("the wire counter got {}: {}", other.command, other.text())
                }
                Ok(_) => panic!("the wire counter's connection ended"),
                Err(_) if complete => break,
                Err(_) => panic!(
                    "the wire counter saw {} of {} messages",
                    expected
                        .iter()
                        .filter(|id| self.seen.contains_key(*id))
                        .count(),
                    expected.len()
                ),
            }
            assert!(Instant::now() < deadline, "the wire counter never settled");
        }
        self.seen.values().map(|n| n.saturating_sub(1)).sum()
    }
}

impl Drop for WireCounter {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A topic destination, its consumer queue and the wire counter's queue, all deleted at the end.
pub fn fresh_destination(prefix: &str) -> (String, String, String, QueueCleanup) {
    let queue = unique(prefix);
    let wire = format!("{queue}_wire");
    let cleanup = QueueCleanup(vec![queue.clone(), format!("DLQ.{queue}"), wire.clone()]);
    (format!("/topic/{queue}"), queue, wire, cleanup)
}

/// The callback of the counting scenarios: one effect row in the message's transaction.
pub async fn record_effect(payload: Payload) -> Result<(), BoxError> {
    let key = payload.message_id().unwrap_or_default().to_owned();
    insert_effect(payload.db(), &key, "ok").await?;
    payload.save();
    Ok(())
}

pub async fn kill(child: &mut tokio::process::Child) {
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
}

/// Waits until every message has its effect and the consumer's queue is empty (duplicates
/// included, so that they had their chance to do harm).
pub async fn wait_until_consumed(db: &DatabaseConnection, queue: &str, n: usize, limit: Duration) {
    let db = db.clone();
    eventually(limit, "every message consumed", || {
        let db = db.clone();
        async move { distinct_effects(&db).await >= n }
    })
    .await;
    eventually(Duration::from_secs(30), "the queue drained", || async {
        queue_message_count(queue) == Some(0)
    })
    .await;
}
