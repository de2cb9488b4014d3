//! The fault suite's harness: a known set of messages, an effects table that counts each
//! message's effect, a second queue that counts copies on the wire, and the summary line every
//! scenario prints. Each fault test binary includes it with `mod harness;`.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::db::{Backend, TestDb, count_with_status, eventually};
pub use crate::effects::{
    create_effects_table, distinct_effects, effect_counts, effect_notes, insert_effect,
};
use crate::settings::{self};
pub use crate::settings::{RABBITMQ_AMQP, amqp_url, short_timings};
use crate::stomp_peer::{
    Frame, QueueCleanup, RABBITMQ_STOMP, StompPeer, queue_message_count, unique,
};
pub use crate::transports::TransportKind;
use outbox::tables::published::Column;
use outbox::tables::published::Status;
use outbox::{Consumer, OutboxConfig, Payload, Producer, Published};
use sea_orm::{
    ColumnTrait, ConnectOptions, Database, DatabaseConnection, EntityTrait, PaginatorTrait,
    QueryFilter, TransactionTrait,
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

/// Settings for tests: the STOMP broker at `broker`, short timings.
pub fn config(broker: &str) -> OutboxConfig {
    settings::stomp(broker)
}

/// `$CARGO_TARGET_DIR/tmp/fault-summary.txt`: the test binary runs from
/// `$CARGO_TARGET_DIR/<profile>/deps/`.
pub fn summary_file() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("this test binary");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("a test binary in <target>/<profile>/deps");
    let dir = target.join("tmp");
    let _ = std::fs::create_dir_all(&dir);
    dir.join("fault-summary.txt")
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
    let path = summary_file();
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

/// The count at the effects table of every message in the outbox, and how many of them the
/// wire counter saw more than once.
pub async fn count_effects(db: &DatabaseConnection, wire: &mut WireCounter) -> (Counted, usize) {
    count_expected(db, wire, &outbox_ids(db).await).await
}

/// The count at the effects table of the `expected` messages, and how many of them the wire
/// counter saw more than once.
pub async fn count_expected(
    db: &DatabaseConnection,
    wire: &mut WireCounter,
    expected: &HashSet<String>,
) -> (Counted, usize) {
    let counted = count(expected, &effect_counts(db).await);
    (counted, wire.duplicates(expected).await)
}

/// Each of the `n` messages sent had its effect exactly once.
#[track_caller]
pub fn assert_exactly_once(counted: &Counted, n: usize) {
    assert_eq!(counted.sent, n);
    assert_eq!(counted.lost, 0, "messages lost");
    assert_eq!(counted.duplicate_effects, 0, "effects done twice");
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

/// The start of a fault scenario: a PostgreSQL database with the effects table, and a fresh
/// destination (see [`fresh_destination`]) with its consumer queues declared over `kind`.
pub async fn fault_start(
    prefix: &str,
    kind: TransportKind,
) -> (TestDb, (String, String, String, QueueCleanup)) {
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let destination = fresh_destination(prefix);
    declare_consumer_queues_over(kind, &destination.0).await;
    (test, destination)
}

/// Relays every pending row with `config` in one drain, which must send `n`.
pub async fn relay_everything(db: &DatabaseConnection, config: OutboxConfig, n: usize) {
    let report = Producer::builder(db.clone())
        .config(config)
        .build()
        .unwrap()
        .drain()
        .await
        .unwrap();
    assert_eq!(report.sent, n);
}

/// `outbox publish` on the database at `url` with the fault suite's short timings and chunks of
/// `chunk_size`, its output dropped, killed when dropped; the caller points it at a broker.
pub fn publish_command(url: &str, chunk_size: usize) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(crate::binaries::outbox_command());
    command
        .arg("publish")
        .env("DATABASE_URL", url)
        .env("OUTBOX_PRODUCER_WAITING_TIME", "0.1")
        .env("OUTBOX_PUBLISHED_CHUNK_SIZE", chunk_size.to_string())
        .env("OUTBOX_PRODUCER_LEASE", "2")
        .env("OUTBOX_RECEIPT_TIMEOUT", "1")
        .env("OUTBOX_MAXIMUM_BACKOFF", "0.3")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    command
}

/// This test binary run again with the ignored test `test` alone and the variables `vars`: a
/// child process a scenario kills. Its output is dropped.
pub fn spawn_child_test(test: &str, vars: &[(&str, &str)]) -> tokio::process::Child {
    tokio::process::Command::new(std::env::current_exe().expect("this test binary"))
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(vars.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the consumer child")
}

/// Starts a consumer child `kills` times and kills each once the effects have reached its share
/// of `n`, plus a random pause under `pause_ms`. Returns how many kills landed before all `n`
/// effects were done.
pub async fn kill_consumer_children(
    db: &DatabaseConnection,
    n: usize,
    kills: usize,
    pause_ms: u64,
    mut spawn: impl FnMut() -> tokio::process::Child,
) -> usize {
    let step = n / (kills + 1);
    let mut mid_run_kills = 0;
    for k in 1..=kills {
        let mut child = spawn();
        let deadline = Instant::now() + Duration::from_secs(30);
        while distinct_effects(db).await < step * k && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(random(pause_ms))).await;
        kill(&mut child).await;
        if distinct_effects(db).await < n {
            mid_run_kills += 1;
        }
    }
    mid_run_kills
}

/// Runs `consumer` until the child process is killed: each message records its effect, waits
/// `pause` between the effect and the commit (where a kill hurts most), and is saved.
pub async fn consume_until_killed(consumer: Consumer, pause: Duration) {
    consumer
        .run(move |payload: Payload| async move {
            let key = payload.message_id().unwrap_or_default().to_owned();
            insert_effect(payload.db(), &key, "ok").await?;
            tokio::time::sleep(pause).await;
            payload.save();
            Ok::<_, BoxError>(())
        })
        .await
        .expect("child: consumer ran");
}
