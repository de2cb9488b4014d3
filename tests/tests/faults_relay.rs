//! A test binary of its own: CI runs its broker_restart and database_restart scenarios alone.
//!
//! The relay under what a real RabbitMQ does: a destination the broker refuses while batches are
//! in flight, a message the broker never receipts, a retention backlog, a relay that overruns
//! its lease, batches over AMQP that mix a topic with a queue and one without (the returns
//! pinned on their own rows, the unbound one probed, then bound by `outbox declare`), a database
//! that stops answering (PostgreSQL and MariaDB, through a proxy), and (run alone, see
//! `.ci/run`) the broker and the database restarted during a run. This binary's metrics
//! recorder is the AMQP scenario's.
//! Each scenario prints its summary line (`fault.<name> sent=N effects=N lost=0
//! duplicate_effects=0 ...`) and appends it to the suite's summary file.
//!
//! Counts are small by default (CI); `OUTBOX_TEST_FAULT_FULL=1` runs the full ones (1,000,000
//! rows past retention, a destination broken for 5 minutes of relaying, 20,000 rows through a
//! broker restart).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use metrics_util::debugging::{DebugValue, Snapshotter};
use outbox::consumer::ConsumerHandle;
use outbox::producer::ProducerHandle;
use outbox::tables::published::Status;
use outbox::tables::published::{Column, Model as Row};
use outbox::transport::{
    Deliveries, Delivery, Outgoing, SendReport, StompSettings, StompTransport, Subscription,
    Transport, TransportError,
};
use outbox::{Consumer, OutboxConfig, Producer, Published};
use outbox_tests::faults::*;
use outbox_tests::proxy::FaultProxy;
use outbox_tests::recorder::install_recorder;
use outbox_tests::rows::set_back;
use outbox_tests::stomp_peer::{RABBITMQ_STOMP, unique};
use outbox_tests::{Backend, TestDb, eventually};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, Statement,
    TransactionTrait,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn rows(db: &DatabaseConnection) -> Vec<Row> {
    Published::find().all(db).await.expect("read the outbox")
}

/// The default settings, only the broker's address changed: what a deployment runs with.
fn default_settings() -> OutboxConfig {
    let mut settings = OutboxConfig::default();
    settings.stomp_host_and_ports = vec![(stomp_addr().ip().to_string(), stomp_addr().port())];
    settings
}

/// Enqueues `count` good rows, numbered from `from`, in one call per 500 (their `added` order is
/// the order of the calls).
async fn good_rows(db: &DatabaseConnection, destination: &str, count: usize, from: usize) {
    enqueue_many(db, destination, count, from).await;
}

async fn poison_row(db: &DatabaseConnection, destination: &str) -> uuid::Uuid {
    outbox::enqueue(db, destination, &json!({"do": "ok", "tag": "poison"}))
        .await
        .expect("enqueue the poison row")
        .id
}

/// Waits until `n` rows are SUCCEEDED; returns how long it took.
async fn time_until_sent(db: &DatabaseConnection, n: usize, limit: Duration) -> Duration {
    let started = Instant::now();
    wait_until_all_sent(db, n, limit).await;
    started.elapsed()
}

// ---------------------------------------------------------------------------------------------
// poison_destination: a SEND RabbitMQ refuses, with batches in flight

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_destination_on_postgres() {
    poison_destination(Backend::Postgres, "poison_destination").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_destination_on_mariadb() {
    poison_destination(Backend::MariaDb, "poison_destination_mariadb").await;
}

/// Three runs of 3,000 good rows on one consumer: without a culprit (the reference rate); with
/// one row to a missing exchange in the middle, on the default settings (only the culprit is
/// charged, copies on the wire bounded by the batches in flight); with two culprits in different batches
/// retried without pauses (the good rows' rate, printed beside the reference).
async fn poison_destination(backend: Backend, name: &str) {
    let started = Instant::now();
    let per_run = 3000;
    let test = TestDb::new(backend).await;
    // The consuming service has a PostgreSQL database of its own, whatever the relay's is.
    let sink = TestDb::new(Backend::Postgres).await;
    create_effects_table(&sink.db).await;
    let (destination, queue, wire_queue, _cleanup) = fresh_destination("fault_poison_dest");
    declare_consumer_queues(&destination).await;
    let mut wire = WireCounter::start(&destination, &wire_queue).await;
    let consumer = Consumer::builder(pool(&sink.url, 4).await)
        .config(config(RABBITMQ_STOMP))
        .destination(&destination)
        .in_flight(8)
        .start(record_effect)
        .unwrap();
    let missing = || format!("/exchange/{}/x", unique("missing"));
    let mut no_pauses = default_settings();
    no_pauses.pause_for_retry = Duration::ZERO;
    no_pauses.wait_retry = Duration::ZERO;

    // 1. The reference: no culprit.
    good_rows(&test.db, &destination, per_run, 0).await;
    let relay = Producer::builder(pool(&test.url, 4).await)
        .config(no_pauses.clone())
        .start()
        .unwrap();
    let clean = time_until_sent(&test.db, per_run, Duration::from_secs(120)).await;
    relay.stop().await.unwrap();

    // 2. One culprit in the middle, default settings.
    good_rows(&test.db, &destination, per_run / 2, per_run).await;
    let culprit = poison_row(&test.db, &missing()).await;
    good_rows(&test.db, &destination, per_run / 2, per_run + per_run / 2).await;
    let relay = Producer::builder(pool(&test.url, 4).await)
        .config(default_settings())
        .start()
        .unwrap();
    wait_until_all_sent(&test.db, 2 * per_run, Duration::from_secs(120)).await;
    relay.stop().await.unwrap();
    for row in rows(&test.db).await {
        if row.id == culprit {
            assert!(row.retry >= 1, "the culprit is charged: {row:?}");
            assert_ne!(row.status, Status::Succeeded);
            let reason = row.last_error.clone().unwrap_or_default();
            assert!(
                reason.contains("not_found"),
                "the broker's reason: {reason}"
            );
        } else {
            assert_eq!(row.status, Status::Succeeded);
            assert_eq!(row.retry, 0, "a good row was charged: {row:?}");
            assert_eq!(row.last_error, None, "a good row has an error: {row:?}");
        }
    }
    let first_two: HashSet<String> = rows(&test.db)
        .await
        .into_iter()
        .filter(|row| row.id != culprit)
        .map(|row| row.id.to_string())
        .collect();
    let copies_beyond = wire.duplicates(&first_two).await;
    let chunk = default_settings().published_chunk_size as usize;
    let in_flight = default_settings().relay_batches_in_flight as usize;
    assert!(
        copies_beyond <= in_flight * chunk,
        "{copies_beyond} copies beyond one per row; at most {in_flight} x {chunk}"
    );
    let culprit_retry = rows(&test.db)
        .await
        .iter()
        .find(|row| row.id == culprit)
        .map_or(0, |row| row.retry);

    // 3. Two culprits in different batches, retried at once: the good rows keep flowing.
    good_rows(&test.db, &destination, 700, 2 * per_run).await;
    let first = poison_row(&test.db, &missing()).await;
    good_rows(&test.db, &destination, 1600, 2 * per_run + 700).await;
    let second = poison_row(&test.db, &missing()).await;
    good_rows(&test.db, &destination, 700, 2 * per_run + 2300).await;
    let relay = Producer::builder(pool(&test.url, 4).await)
        .config(no_pauses.clone())
        .start()
        .unwrap();
    let poisoned = time_until_sent(&test.db, 3 * per_run, Duration::from_secs(180)).await;
    relay.stop().await.unwrap();
    let culprits = [culprit, first, second];
    for row in rows(&test.db).await {
        if !culprits.contains(&row.id) {
            assert_eq!((row.status, row.retry), (Status::Succeeded, 0), "{row:?}");
        }
    }

    // Full mode: a destination broken for 5 minutes of relaying, rows to it written all along.
    let mut broken_extra = String::new();
    if full() {
        let broken = missing();
        let relay = Producer::builder(pool(&test.url, 4).await)
            .config(no_pauses.clone())
            .start()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(300);
        let mut written = 3 * per_run;
        let mut bad = 0;
        while Instant::now() < until {
            good_rows(&test.db, &destination, 100, written).await;
            poison_row(&test.db, &broken).await;
            written += 100;
            bad += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        wait_until_all_sent(&test.db, written, Duration::from_secs(120)).await;
        relay.stop().await.unwrap();
        let good_failed = rows(&test.db)
            .await
            .iter()
            .filter(|row| row.status == Status::Failed && row.destination == destination)
            .count();
        assert_eq!(
            good_failed, 0,
            "good rows FAILED next to a broken destination"
        );
        broken_extra = format!(" broken_for_s=300 broken_rows={bad} good_failed={good_failed}");
    }

    let expected: HashSet<String> = rows(&test.db)
        .await
        .into_iter()
        .filter(|row| row.destination == destination)
        .map(|row| row.id.to_string())
        .collect();
    wait_until_consumed(&sink.db, &queue, expected.len(), Duration::from_secs(120)).await;
    consumer.stop().await.unwrap();
    let counted = count(&expected, &effect_counts(&sink.db).await);
    let wire_duplicates = wire.duplicates(&expected).await;
    let clean_rate = per_run as f64 / clean.as_secs_f64();
    let poisoned_rate = per_run as f64 / poisoned.as_secs_f64();
    summary(
        name,
        &counted,
        wire_duplicates,
        &format!(
            "culprit_retry={culprit_retry} copies_beyond_one={copies_beyond} bound={} \
             clean_rate={clean_rate:.0}/s two_culprits_rate={poisoned_rate:.0}/s ratio={:.2}{broken_extra} secs={:.1}",
            in_flight * chunk,
            poisoned_rate / clean_rate,
            started.elapsed().as_secs_f64()
        ),
    );
    assert_eq!(counted.lost, 0, "messages lost");
    assert_eq!(counted.duplicate_effects, 0, "effects done twice");
    test.drop_database().await;
    sink.drop_database().await;
}

// ---------------------------------------------------------------------------------------------
// silent_poison: a frame that never reaches the broker, on a connection that stays up

/// A TCP proxy to RabbitMQ's STOMP port that drops, from the client's side of every connection,
/// each frame containing `marker` (and forwards everything else as it came): a message the
/// broker never sees, never receipts, and never complains about.
struct Swallower {
    addr: SocketAddr,
    swallowed: Arc<AtomicUsize>,
}

impl Swallower {
    async fn start(marker: &'static [u8]) -> Swallower {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let swallowed = Arc::new(AtomicUsize::new(0));
        let count = swallowed.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(broker) = TcpStream::connect(stomp_addr()).await else {
                    continue;
                };
                let count = count.clone();
                tokio::spawn(async move {
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut broker_read, mut broker_write) = broker.into_split();
                    let down = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut broker_read, &mut client_write).await;
                    });
                    let mut pending: Vec<u8> = Vec::new();
                    let mut buffer = vec![0u8; 64 * 1024];
                    while let Ok(read) = client_read.read(&mut buffer).await {
                        if read == 0 {
                            break;
                        }
                        pending.extend_from_slice(&buffer[..read]);
                        // Frames end with NUL; the bodies here are JSON, without NUL.
                        let mut out = Vec::new();
                        while let Some(end) = pending.iter().position(|b| *b == 0) {
                            let frame: Vec<u8> = pending.drain(..=end).collect();
                            if frame.windows(marker.len()).any(|w| w == marker) {
                                count.fetch_add(1, Ordering::Relaxed);
                            } else {
                                out.extend_from_slice(&frame);
                            }
                        }
                        if broker_write.write_all(&out).await.is_err() {
                            break;
                        }
                    }
                    down.abort();
                });
            }
        });
        Swallower { addr, swallowed }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_poison() {
    let started = Instant::now();
    let waves = counts(8, 30);
    let per_wave = 200;
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let (destination, queue, wire_queue, _cleanup) = fresh_destination("fault_silent");
    declare_consumer_queues(&destination).await;
    let mut wire = WireCounter::start(&destination, &wire_queue).await;
    let proxy = Swallower::start(b"SWALLOW-ME").await;
    let mut settings = config(&proxy.addr.to_string());
    settings.maximum_retry_attempts = 3;
    let consumer = Consumer::builder(pool(&test.url, 4).await)
        .config(config(RABBITMQ_STOMP))
        .destination(&destination)
        .in_flight(8)
        .start(record_effect)
        .unwrap();
    good_rows(&test.db, &destination, per_wave / 2, 0).await;
    let silent = outbox::enqueue(
        &test.db,
        &destination,
        &json!({"do": "ok", "tag": "SWALLOW-ME"}),
    )
    .await
    .unwrap()
    .id;
    let relay = Producer::builder(pool(&test.url, 4).await)
        .config(settings)
        .start()
        .unwrap();
    // Traffic behind it all along: later frames on the connection are receipted.
    let mut written = per_wave / 2;
    for _ in 0..waves {
        good_rows(&test.db, &destination, per_wave, written).await;
        written += per_wave;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_until_all_sent(&test.db, written, Duration::from_secs(120)).await;
    let db = test.db.clone();
    eventually(
        Duration::from_secs(60),
        "the silent row spent its attempts",
        || {
            let db = db.clone();
            async move {
                // Keep later frames coming while the silent row is retried alone.
                let _ = outbox::enqueue(&db, "/queue/fault_silent_tick", &json!({})).await;
                Published::find_by_id(silent)
                    .one(&db)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|row| row.status == Status::Failed)
            }
        },
    )
    .await;
    relay.stop().await.unwrap();
    outbox_tests::stomp_peer::delete_queue("fault_silent_tick");
    let mut charged_good = 0;
    for row in rows(&test.db).await {
        if row.id == silent {
            assert_eq!(row.retry, 3, "{row:?}");
            let reason = row.last_error.unwrap_or_default();
            assert!(reason.starts_with("not receipted while later"), "{reason}");
        } else if row.retry > 0 || row.last_error.is_some() {
            charged_good += 1;
        }
    }
    assert_eq!(charged_good, 0, "good rows were charged");
    let expected: HashSet<String> = rows(&test.db)
        .await
        .into_iter()
        .filter(|row| row.destination == destination && row.id != silent)
        .map(|row| row.id.to_string())
        .collect();
    wait_until_consumed(&test.db, &queue, expected.len(), Duration::from_secs(60)).await;
    consumer.stop().await.unwrap();
    let (counted, wire_duplicates) = count_expected(&test.db, &mut wire, &expected).await;
    summary(
        "silent_poison",
        &counted,
        wire_duplicates,
        &format!(
            "swallowed={} charged_good={charged_good} secs={:.1}",
            proxy.swallowed.load(Ordering::Relaxed),
            started.elapsed().as_secs_f64()
        ),
    );
    assert_eq!(counted.lost, 0);
    assert_eq!(counted.duplicate_effects, 0);
    test.drop_database().await;
}

// ---------------------------------------------------------------------------------------------
// retention_backlog: many sent rows past retention, a row committed during the cleanup

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_backlog() {
    let started = Instant::now();
    let old = counts(100_000, 1_000_000);
    let test = TestDb::new(Backend::Postgres).await;
    let key = unique("fault_retention");
    let (mut reader, _cleanup) = outbox_tests::stomp_peer::topic_reader(&key).await;
    let destination = format!("/topic/{key}");
    test.db
        .execute_raw(Statement::from_string(
            test.db.get_database_backend(),
            format!(
                "INSERT INTO published (id, destination, body, headers, added, expires_at, retry, status) \
                 SELECT gen_random_uuid(), '{destination}', '{{}}'::jsonb, '{{}}'::jsonb, \
                        now() - interval '40 days', now() - interval '39 days', 0, 2 \
                 FROM generate_series(1, {old})"
            ),
        ))
        .await
        .expect("insert the backlog");
    let mut settings = config(RABBITMQ_STOMP);
    settings.days_to_keep_data = 30;
    let relay = Producer::builder(pool(&test.url, 4).await)
        .config(settings)
        .start()
        .unwrap();
    let count_sent = || async {
        test.db
            .query_one_raw(Statement::from_string(
                test.db.get_database_backend(),
                "SELECT count(*) AS n FROM published WHERE status = 2".to_owned(),
            ))
            .await
            .ok()
            .flatten()
            .and_then(|row| row.try_get::<i64>("", "n").ok())
            .unwrap_or(-1)
    };
    eventually(Duration::from_secs(60), "the cleanup started", || async {
        let n = count_sent().await;
        n >= 0 && (n as usize) < old
    })
    .await;
    let committed = Instant::now();
    let row = outbox::enqueue(&test.db, &destination, &json!({"during": "cleanup"}))
        .await
        .unwrap();
    let frame = reader
        .next_message(Duration::from_secs(30))
        .await
        .expect("the new row is sent during the cleanup");
    let delay = committed.elapsed();
    assert_eq!(
        frame.header("dop-msg-id"),
        Some(row.id.to_string().as_str())
    );
    let left_when_sent = count_sent().await;
    eventually(
        Duration::from_secs(600),
        "every old row deleted",
        || async { count_sent().await <= 1 },
    )
    .await;
    let cleanup_secs = started.elapsed().as_secs_f64();
    relay.stop().await.unwrap();
    let left = Published::find()
        .filter(Column::Status.eq(Status::Succeeded))
        .all(&test.db)
        .await
        .unwrap();
    assert_eq!(left.len(), 1, "only the new row is left");
    assert_eq!(left[0].id, row.id);
    let counted = Counted {
        sent: 1,
        effects: 1,
        lost: 0,
        duplicate_effects: 0,
    };
    summary(
        "retention_backlog",
        &counted,
        0,
        &format!(
            "old_rows={old} sent_during_cleanup_ms={} old_rows_left_when_sent={left_when_sent} secs={cleanup_secs:.1}",
            delay.as_millis()
        ),
    );
    test.drop_database().await;
}

// ---------------------------------------------------------------------------------------------
// lease_overrun: a relay paused past its lease while another takes over

/// A transport that, once armed, holds the first send it finishes (its receipts already in)
/// until released, as a relay paused (a stop signal, a long GC, a swapped-out host) between
/// hearing from the broker and carrying on; and counts what it sends after that.
struct Pausing {
    inner: StompTransport,
    armed: AtomicBool,
    resume: tokio::sync::Notify,
    paused: tokio::sync::Notify,
    resumed: AtomicBool,
    sent_after_resume: Arc<std::sync::Mutex<Vec<String>>>,
}

#[async_trait::async_trait]
impl Transport for Pausing {
    async fn connect(&self) -> Result<(), TransportError> {
        self.inner.connect().await
    }

    async fn send(&self, messages: &[Outgoing]) -> SendReport {
        if self.resumed.load(Ordering::SeqCst) {
            let mut sent = self.sent_after_resume.lock().unwrap();
            sent.extend(
                messages
                    .iter()
                    .filter_map(|m| m.header("dop-msg-id").map(str::to_owned)),
            );
        }
        let report = self.inner.send(messages).await;
        if self.armed.swap(false, Ordering::SeqCst) {
            self.paused.notify_one();
            self.resume.notified().await;
            self.resumed.store(true, Ordering::SeqCst);
        }
        report
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Deliveries, TransportError> {
        self.inner.subscribe(subscription).await
    }

    async fn unsubscribe(&self, id: &str) -> Result<(), TransportError> {
        self.inner.unsubscribe(id).await
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), TransportError> {
        self.inner.ack(delivery).await
    }

    async fn nack(&self, delivery: &Delivery) -> Result<(), TransportError> {
        self.inner.nack(delivery).await
    }

    async fn disconnect(&self) -> Result<(), TransportError> {
        self.inner.disconnect().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_overrun() {
    let started = Instant::now();
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let (destination, queue, wire_queue, _cleanup) = fresh_destination("fault_lease");
    declare_consumer_queues(&destination).await;
    let mut wire = WireCounter::start(&destination, &wire_queue).await;
    let settings = config(RABBITMQ_STOMP);
    let consumer = Consumer::builder(pool(&test.url, 2).await)
        .config(config(RABBITMQ_STOMP))
        .destination(&destination)
        .in_flight(8)
        .start(record_effect)
        .unwrap();
    // A batch whose settling needs more sends after the pause: suspects of a refusal.
    good_rows(&test.db, &destination, 100, 0).await;
    let culprit = poison_row(&test.db, &format!("/exchange/{}/x", unique("missing"))).await;
    good_rows(&test.db, &destination, 99, 100).await;
    let paused = Arc::new(Pausing {
        inner: StompTransport::new(StompSettings::from(&settings)).unwrap(),
        armed: AtomicBool::new(true),
        resume: tokio::sync::Notify::new(),
        paused: tokio::sync::Notify::new(),
        resumed: AtomicBool::new(false),
        sent_after_resume: Arc::default(),
    });
    let first = Producer::builder(pool(&test.url, 3).await)
        .config(settings.clone())
        .shared_transport(paused.clone())
        .start()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), paused.paused.notified())
        .await
        .expect("the first relay sent its batch");
    // Past its lease: a second relay takes the rows over and settles them.
    tokio::time::sleep(settings.producer_lease + Duration::from_secs(1)).await;
    let second = Producer::builder(pool(&test.url, 3).await)
        .config(settings.clone())
        .start()
        .unwrap();
    wait_until_all_sent(&test.db, 199, Duration::from_secs(60)).await;
    paused.resume.notify_one();
    tokio::time::sleep(Duration::from_secs(3)).await;
    first.stop().await.unwrap();
    second.stop().await.unwrap();
    let sent_by_both: Vec<String> = paused.sent_after_resume.lock().unwrap().clone();
    let expected: HashSet<String> = rows(&test.db)
        .await
        .into_iter()
        .filter(|row| row.id != culprit)
        .map(|row| row.id.to_string())
        .collect();
    let after_takeover = sent_by_both
        .iter()
        .filter(|id| expected.contains(*id))
        .count();
    wait_until_consumed(&test.db, &queue, expected.len(), Duration::from_secs(60)).await;
    consumer.stop().await.unwrap();
    let (counted, wire_duplicates) = count_expected(&test.db, &mut wire, &expected).await;
    summary(
        "lease_overrun",
        &counted,
        wire_duplicates,
        &format!(
            "sent_by_both_after_takeover={after_takeover} secs={:.1}",
            started.elapsed().as_secs_f64()
        ),
    );
    assert_eq!(
        after_takeover, 0,
        "rows sent by both relays after the takeover"
    );
    assert_eq!(counted.lost, 0);
    assert_eq!(counted.duplicate_effects, 0);
    test.drop_database().await;
}

// ---------------------------------------------------------------------------------------------
// amqp_mixed_unroutable: returns pinned on their own publishes, a destination probed, not its rows

/// `n` rows to `bound` and `n` to `unbound`, alternating, in transactions of 500: every batch
/// the relay claims mixes the two.
async fn interleaved_rows(db: &DatabaseConnection, bound: &str, unbound: &str, n: usize) {
    let mut written = 0;
    while written < 2 * n {
        let size = (2 * n - written).min(500);
        let txn = db.begin().await.expect("begin");
        let messages = (written..written + size).map(|k| {
            let destination = if k % 2 == 0 { bound } else { unbound };
            outbox::Message::from_json(destination, json!({"do": "ok", "tag": "ok", "n": k}))
        });
        outbox::enqueue_all(&txn, messages).await.expect("enqueue");
        txn.commit().await.expect("commit");
        written += size;
    }
}

/// The ids of the rows to `destination`, and those of them that are SUCCEEDED.
async fn ids_and_sent(
    db: &DatabaseConnection,
    destination: &str,
) -> (HashSet<String>, HashSet<String>) {
    let rows: Vec<Row> = rows(db)
        .await
        .into_iter()
        .filter(|row| row.destination == destination)
        .collect();
    let ids = |sent_only: bool| {
        rows.iter()
            .filter(|row| !sent_only || row.status == Status::Succeeded)
            .map(|row| row.id.to_string())
            .collect()
    };
    (ids(false), ids(true))
}

/// What `snapshotter` holds of the counter `name` for `destination`.
fn counted_for(snapshotter: &Snapshotter, name: &str, destination: &str) -> u64 {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| {
            key.key().name() == name
                && key
                    .key()
                    .labels()
                    .any(|label| label.key() == "destination" && label.value() == destination)
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

/// The relay over AMQP with RabbitMQ's returns: 1,000 rows to a topic with a queue bound and
/// 1,000 to a topic with none, interleaved in the same batches (several in flight), rows an hour
/// old. Every bound row is sent and none kept, no unbound row is marked sent (that would be a
/// lost message), and the unbound destination waits behind one probe. Then `outbox declare`
/// binds a queue for the second topic: its 1,000 rows are delivered within 30 s, not at their
/// probe's next attempt (half an hour later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_mixed_unroutable() {
    let started = Instant::now();
    // The relay counts each message returned, by destination: a bound one would be a return
    // pinned on the wrong publish.
    let snapshotter = install_recorder();
    let n = 1000;
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let kind = TransportKind::Amqp;
    let (bound, bound_queue, bound_wire, _bound_cleanup) = fresh_destination("fault_mixed_bound");
    let (unbound, unbound_queue, unbound_wire, _unbound_cleanup) =
        fresh_destination("fault_mixed_unbound");
    declare_consumer_queues_over(kind, &bound).await;
    let mut wire = WireCounter::start(&bound, &bound_wire).await;
    let consume = async |destination: &str| {
        Consumer::builder(pool(&test.url, 3).await)
            .config(kind.config())
            .destination(destination)
            .in_flight(8)
            .start(record_effect)
            .unwrap()
    };
    let consumer = consume(&bound).await;
    interleaved_rows(&test.db, &bound, &unbound, n).await;
    set_back(&test.db, &bound, Duration::from_secs(3600)).await;
    set_back(&test.db, &unbound, Duration::from_secs(3600)).await;
    // The default backoff, as deployed: an hour-old row waits half an hour.
    let mut settings = kind.config();
    settings.maximum_backoff = OutboxConfig::default().maximum_backoff;
    let relay = Producer::builder(pool(&test.url, 4).await)
        .config(settings.clone())
        .start()
        .unwrap();

    // Every row was sent once: receipted and marked sent, or returned and kept.
    let db = test.db.clone();
    eventually(Duration::from_secs(60), "every row tried once", || {
        let db = db.clone();
        async move {
            rows(&db).await.iter().all(|row| {
                row.status == Status::Succeeded
                    || (row.last_error.is_some() && row.claim_token.is_none())
            })
        }
    })
    .await;
    let (bound_ids, bound_sent) = ids_and_sent(&test.db, &bound).await;
    let (bound_sent, kept_bound) = (bound_sent.len(), n - bound_sent.len());
    // Marked sent while no queue was bound: the broker dropped them, lost.
    let (unbound_ids, dropped) = ids_and_sent(&test.db, &unbound).await;
    let bound_returned = counted_for(&snapshotter, outbox::metrics::MESSAGES_UNROUTABLE, &bound);
    // The probe waits half an hour; the rows parked behind it an hour and a half.
    let horizon = chrono::Utc::now() + chrono::Duration::minutes(45);
    let probes = rows(&test.db)
        .await
        .iter()
        .filter(|row| row.destination == unbound && row.status == Status::Schedule)
        .filter(|row| row.next_attempt_at.is_none_or(|at| at < horizon))
        .count();
    wait_until_consumed(&test.db, &bound_queue, bound_sent, Duration::from_secs(60)).await;

    // `outbox declare` binds the second topic's queue (the wire counter's queue first, so that
    // it sees every copy): its rows go at once.
    let mut unbound_wire_counter = WireCounter::start(&unbound, &unbound_wire).await;
    let declaring = Instant::now();
    let broker = outbox::transport::from_config(&settings).expect("a transport");
    let topology = outbox::consumer::Topology::new(&settings, &unbound, None).unwrap();
    let declared = outbox::ops::declare(&test.db, broker.as_ref(), &topology)
        .await
        .expect("declare");
    let late_consumer = consume(&unbound).await;
    let mut delivered_after = None;
    while declaring.elapsed() < Duration::from_secs(30) {
        if distinct_effects(&test.db).await >= 2 * n {
            delivered_after = Some(declaring.elapsed());
            wait_until_consumed(&test.db, &unbound_queue, 2 * n, Duration::from_secs(30)).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await.unwrap();
    consumer.stop().await.unwrap();
    late_consumer.stop().await.unwrap();

    let all: HashSet<String> = bound_ids.union(&unbound_ids).cloned().collect();
    let effects = effect_counts(&test.db).await;
    let mut counted = count(&all, &effects);
    // Lost: no effect, or marked sent before a queue was bound (each counted once).
    counted.lost = all
        .iter()
        .filter(|id| !effects.contains_key(*id) || dropped.contains(*id))
        .count();
    let unbound_marked_sent = dropped.len();
    let delivered: HashSet<String> = effects.keys().cloned().collect();
    let wire_duplicates = wire
        .duplicates(&bound_ids.intersection(&delivered).cloned().collect())
        .await
        + unbound_wire_counter
            .duplicates(&unbound_ids.intersection(&delivered).cloned().collect())
            .await;
    summary(
        "amqp_mixed_unroutable",
        &counted,
        wire_duplicates,
        &format!(
            "bound={n} unbound={n} unbound_marked_sent={unbound_marked_sent} \
             bound_returned={bound_returned} kept_bound={kept_bound} \
             probes={probes} woken={} delivered_after_declare_secs={} secs={:.1}",
            declared.woken,
            delivered_after.map_or("over_30".to_owned(), |after| format!(
                "{:.1}",
                after.as_secs_f64()
            )),
            started.elapsed().as_secs_f64()
        ),
    );
    assert_eq!(unbound_marked_sent, 0, "unbound rows marked sent: lost");
    assert_eq!(bound_returned, 0, "bound rows taken for unroutable");
    assert_eq!(kept_bound, 0, "bound rows kept as unroutable");
    assert_eq!(probes, 1, "one row probes the unbound destination");
    assert_eq!(declared.woken, n as u64);
    assert_exactly_once(&counted, 2 * n);
    assert!(
        delivered_after.is_some(),
        "not delivered within 30 s of the declare"
    );
    test.drop_database().await;
}

// ---------------------------------------------------------------------------------------------
// Run alone (`.ci/run`, under `flock -x -o /tmp/outbox-broker.lock`, so that a restarted server does not inherit the lock): the broker and the database
// restarted under a relay and a consumer. Each puts the service back on every exit path.

/// Runs a shell command, saying what failed.
fn shell(command: &str) -> bool {
    match std::process::Command::new("sh")
        .args(["-c", command])
        .status()
    {
        Ok(status) if status.success() => true,
        Ok(status) => {
            eprintln!("`{command}` exited with {status}");
            false
        }
        Err(err) => {
            eprintln!("`{command}` could not run: {err}");
            false
        }
    }
}

/// Runs `restore` when dropped, also when the test panics: the shared service comes back.
struct Restore(&'static str);

impl Drop for Restore {
    fn drop(&mut self) {
        shell(self.0);
    }
}

const RABBITMQ_START: &str = "rabbitmqctl start_app";
const POSTGRES_START: &str = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start 2>/dev/null; \
     pg_isready -q -h 127.0.0.1 -p 5432 -t 60";

/// Rows written by SQL, without the generated `dop-*` headers (`dop-msg-id` is filled in by the
/// relay from the row's id, the consumer's only stable key across a broker restart).
async fn bare_rows(db: &DatabaseConnection, destination: &str, count: usize, from: usize) {
    db.execute_raw(Statement::from_string(
        db.get_database_backend(),
        format!(
            "INSERT INTO published (id, destination, body, headers, added, expires_at, retry, status) \
             SELECT gen_random_uuid(), '{destination}', \
                    jsonb_build_object('do', 'ok', 'tag', 'ok', 'n', g), '{{}}'::jsonb, \
                    clock_timestamp(), now() + interval '1 day', 0, 1 \
             FROM generate_series({from}, {}) AS g",
            from + count - 1
        ),
    ))
    .await
    .expect("insert rows by SQL");
}

/// A relay and a consumer that records effects, over RabbitMQ's STOMP, each on a pool of four
/// connections to the database at `url`.
async fn relay_and_consumer(url: &str, destination: &str) -> (ProducerHandle, ConsumerHandle) {
    let relay = Producer::builder(pool(url, 4).await)
        .config(config(RABBITMQ_STOMP))
        .start()
        .unwrap();
    let consumer = Consumer::builder(pool(url, 4).await)
        .config(config(RABBITMQ_STOMP))
        .destination(destination)
        .in_flight(8)
        .start(record_effect)
        .unwrap();
    (relay, consumer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the shared RabbitMQ: run alone by .ci/run under flock -x -o"]
async fn broker_restart() {
    let started = Instant::now();
    let n = counts(2_000, 20_000);
    let (test, (destination, queue, _wire_queue, _cleanup)) =
        fault_start("fault_broker_restart", TransportKind::Stomp).await;
    let (relay, consumer) = relay_and_consumer(&test.url, &destination).await;
    bare_rows(&test.db, &destination, n / 2, 0).await;
    {
        let _restore = Restore(RABBITMQ_START);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(shell("rabbitmqctl stop_app"), "rabbitmqctl stop_app");
        bare_rows(&test.db, &destination, n / 2, n / 2).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(shell(RABBITMQ_START), "rabbitmqctl start_app");
    }
    wait_until_all_sent(&test.db, n, Duration::from_secs(180)).await;
    wait_until_consumed(&test.db, &queue, n, Duration::from_secs(180)).await;
    relay.stop().await.unwrap();
    consumer.stop().await.unwrap();
    let charged = rows(&test.db)
        .await
        .iter()
        .filter(|row| row.retry > 0)
        .count();
    let expected = outbox_ids(&test.db).await;
    let counted = count(&expected, &effect_counts(&test.db).await);
    summary(
        "broker_restart",
        &counted,
        0,
        &format!(
            "wire=not_counted rows_without_headers={n} charged={charged} secs={:.1}",
            started.elapsed().as_secs_f64()
        ),
    );
    assert_eq!(counted.lost, 0, "messages lost");
    assert_eq!(counted.duplicate_effects, 0, "effects done twice");
    assert_eq!(charged, 0, "rows charged for a broker restart");
    test.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared PostgreSQL: run alone by .ci/run under flock -x -o"]
async fn database_restart() {
    let started = Instant::now();
    let waves = counts(6, 20);
    let per_wave = 200;
    let n = waves * per_wave;
    let (test, (destination, queue, _wire_queue, _cleanup)) =
        fault_start("fault_db_restart", TransportKind::Stomp).await;
    let (relay, consumer) = relay_and_consumer(&test.url, &destination).await;
    {
        let _restore = Restore(POSTGRES_START);
        for wave in 0..waves {
            enqueue_many(&test.db, &destination, per_wave, wave * per_wave).await;
            if wave == waves / 2 {
                assert!(
                    shell(
                        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main restart"
                    ),
                    "restarting PostgreSQL"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    wait_until_all_sent(&test.db, n, Duration::from_secs(180)).await;
    wait_until_consumed(&test.db, &queue, n, Duration::from_secs(180)).await;
    relay.stop().await.unwrap();
    consumer.stop().await.unwrap();
    let expected = outbox_ids(&test.db).await;
    let counted = count(&expected, &effect_counts(&test.db).await);
    summary(
        "database_restart",
        &counted,
        0,
        &format!(
            "wire=not_counted secs={:.1}",
            started.elapsed().as_secs_f64()
        ),
    );
    assert_exactly_once(&counted, n);
    test.drop_database().await;
}

// ---------------------------------------------------------------------------------------------
// database_stall: the database stops answering (its connections stay open, nothing comes back)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_stall() {
    database_stalled(Backend::Postgres, "database_stall").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_stall_mariadb() {
    database_stalled(Backend::MariaDb, "database_stall_mariadb").await;
}

/// The statement timeout of the stall scenarios: every database call of the relay and the
/// consumer is given up this long (and 1 s) after it got no answer.
const STALL_STATEMENT_TIMEOUT: Duration = Duration::from_secs(2);

/// The consumer's shutdown timeout in the stall scenarios.
const STALL_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// `url` with its server's address (`127.0.0.1:<port>`) replaced by `proxy`.
fn through(url: &str, server: SocketAddr, proxy: SocketAddr) -> String {
    let proxied = url.replacen(&server.to_string(), &proxy.to_string(), 1);
    assert_ne!(proxied, url, "{url} names {server}");
    proxied
}

/// The database's address for `backend`.
fn database_addr(backend: Backend) -> SocketAddr {
    match backend {
        Backend::Postgres => "127.0.0.1:5432",
        _ => "127.0.0.1:3306",
    }
    .parse()
    .expect("an address")
}

/// `outbox publish` on the database at `url`, with the stall scenarios' statement timeout.
fn stall_relay(url: &str) -> tokio::process::Child {
    publish_command(url, 50)
        .env("OUTBOX_STOMP_HOST_AND_PORTS", RABBITMQ_STOMP)
        .env(
            "OUTBOX_DB_STATEMENT_TIMEOUT",
            STALL_STATEMENT_TIMEOUT.as_secs().to_string(),
        )
        .env("OUTBOX_DB_LOCK_TIMEOUT", "1")
        .spawn()
        .expect("start outbox publish")
}

/// A consumer recording effects, on its own pool to the database at `url`.
async fn stall_consumer(url: &str, destination: &str) -> ConsumerHandle {
    let mut settings = config(RABBITMQ_STOMP);
    settings.db_statement_timeout = STALL_STATEMENT_TIMEOUT;
    settings.db_lock_timeout = Duration::from_secs(1);
    settings.consumer_shutdown_timeout = STALL_SHUTDOWN_TIMEOUT;
    // A message whose attempts meet the stall is tried again later, not dead-lettered.
    settings.consumer_max_retry_attempts = 20;
    Consumer::builder(pool(url, 4).await)
        .config(settings)
        .destination(destination)
        .in_flight(4)
        .start(record_effect)
        .unwrap()
}

/// SIGTERM to `child`; how long it took to exit (it must exit 0).
async fn terminate(child: &mut tokio::process::Child, limit: Duration) -> Duration {
    let pid = child.id().expect("running").to_string();
    let started = Instant::now();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -TERM {pid}");
    let status = tokio::time::timeout(limit, child.wait())
        .await
        .unwrap_or_else(|_| panic!("the relay did not exit within {limit:?} of SIGTERM"))
        .expect("wait for the relay");
    assert!(status.success(), "the relay exited with {status}");
    started.elapsed()
}

/// A relay (`outbox publish`) and a consumer, both reaching the database through a proxy, are
/// at work when the proxy stops forwarding without closing anything (a half-open link, a
/// database host that froze). SIGTERM stops the relay within the statement timeout + 5 s, and
/// the consumer stops within its shutdown timeout (+ 2 s to leave the broker), though their
/// database calls never return. The database answers again; a new relay and consumer through
/// the proxy deliver everything: nothing lost, no effect twice.
async fn database_stalled(backend: Backend, name: &str) {
    let started = Instant::now();
    let n = counts(600, 4000);
    let test = TestDb::new(backend).await;
    create_effects_table(&test.db).await;
    let (destination, queue, wire_queue, _cleanup) = fresh_destination("fault_db_stall");
    declare_consumer_queues(&destination).await;
    let mut wire = WireCounter::start(&destination, &wire_queue).await;
    let proxy = FaultProxy::start(database_addr(backend)).await;
    let proxied = through(&test.url, database_addr(backend), proxy.addr());
    enqueue_many(&test.db, &destination, n / 2, 0).await;

    let mut relay = stall_relay(&proxied);
    let consumer = stall_consumer(&proxied, &destination).await;
    eventually(Duration::from_secs(30), "a quarter of the effects", || {
        let db = test.db.clone();
        async move { distinct_effects(&db).await >= n / 4 }
    })
    .await;
    // More work on the way while the database stops answering.
    enqueue_many(&test.db, &destination, n - n / 2, n / 2).await;
    proxy.stall(true);
    let stalled_at = Instant::now();
    // Let calls start and hang: claims, marks, inbox inserts, commits.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let relay_limit = STALL_STATEMENT_TIMEOUT + Duration::from_secs(5);
    let consumer_limit = STALL_SHUTDOWN_TIMEOUT + Duration::from_secs(2);
    let (relay_stop, consumer_stop) = tokio::join!(terminate(&mut relay, relay_limit * 3), async {
        let stopping = Instant::now();
        tokio::time::timeout(consumer_limit * 3, consumer.stop())
            .await
            .expect("the consumer stops")
            .expect("the consumer stops cleanly");
        stopping.elapsed()
    });
    let stall = stalled_at.elapsed();
    println!(
        "{name}: relay stopped in {relay_stop:?} (limit {relay_limit:?}), consumer in \
         {consumer_stop:?} (limit {consumer_limit:?})"
    );

    // The database answers again; a new relay and consumer finish the work.
    proxy.stall(false);
    let mut relay = stall_relay(&proxied);
    let consumer = stall_consumer(&proxied, &destination).await;
    wait_until_all_sent(&test.db, n, Duration::from_secs(60)).await;
    wait_until_consumed(&test.db, &queue, n, Duration::from_secs(60)).await;
    terminate(&mut relay, relay_limit).await;
    consumer.stop().await.unwrap();
    let charged = rows(&test.db)
        .await
        .iter()
        .filter(|row| row.retry > 0)
        .count();

    let (counted, wire_duplicates) = count_effects(&test.db, &mut wire).await;
    summary(
        name,
        &counted,
        wire_duplicates,
        &format!(
            "relay_stop_secs={:.1} consumer_stop_secs={:.1} statement_timeout_secs={} \
             shutdown_timeout_secs={} stall_secs={:.1} charged={charged} secs={:.1}",
            relay_stop.as_secs_f64(),
            consumer_stop.as_secs_f64(),
            STALL_STATEMENT_TIMEOUT.as_secs(),
            STALL_SHUTDOWN_TIMEOUT.as_secs(),
            stall.as_secs_f64(),
            started.elapsed().as_secs_f64()
        ),
    );
    assert_exactly_once(&counted, n);
    assert!(
        relay_stop <= relay_limit,
        "the relay took {relay_stop:?} to stop, more than the statement timeout + 5 s"
    );
    assert!(
        consumer_stop <= consumer_limit,
        "the consumer took {consumer_stop:?} to stop, more than its shutdown timeout + 2 s"
    );
    assert_eq!(
        charged, 0,
        "rows charged for a database that did not answer"
    );
    drop(proxy);
    test.drop_database().await;
}
