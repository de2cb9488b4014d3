//! A test binary of its own: CI runs its broker_blocked scenarios alone.
//!
//! The STOMP connection under hostile input and a blocked broker, against the real RabbitMQ:
//!
//! - `fault.undecodable`: a message the codec cannot decode (a header value that is not UTF-8,
//!   put there by an AMQP publisher) and one over `OUTBOX_STOMP_MAX_FRAME_SIZE`, each at the head
//!   of a queue, end in the dead-letter queue while the messages behind them are processed;
//! - `fault.prefetch_flood`: a queue of thousands of messages and no prefetch limit, a slow
//!   callback, short heartbeats: the connection stays up, nothing is lost or processed twice;
//! - `fault.broker_blocked` (ignored in the main run: a memory alarm blocks every publisher on
//!   the broker; `.ci/run` runs it alone afterwards): the relay under a memory alarm stops on
//!   SIGTERM within the receipt timeout + 5 s, charges no row, and resumes within 10 s of the
//!   alarm clearing.

use outbox_tests::faults::*;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use outbox::tables::published::Column;
use outbox::tables::published::Status;
use outbox::{Consumer, Payload, Published};
use outbox_tests::stomp_peer::{RABBITMQ_STOMP, StompPeer, queue_message_count};
use outbox_tests::{Backend, TestDb, count_with_status, eventually};
use sea_orm::{ColumnTrait, Condition, EntityTrait, PaginatorTrait, QueryFilter, TransactionTrait};
use serde_json::json;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Publishes one message to `amq.topic` with routing key `key` over AMQP 0-9-1, as another
/// service's publisher would, and waits for the broker's confirm.
async fn publish_amqp(key: &str, headers: FieldTable, body: &[u8]) {
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("AMQP connection to RabbitMQ");
    let channel = connection.create_channel().await.expect("AMQP channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("publisher confirms");
    let confirm = channel
        .basic_publish(
            "amq.topic".into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .expect("basic.publish")
        .await
        .expect("the broker's confirm");
    assert!(confirm.is_ack(), "the broker refused the AMQP publish");
    let _ = connection.close(200, "done".into()).await;
}

/// Sends `count` good messages over STOMP, each with its own `dop-msg-id`; returns the ids.
async fn send_good(destination: &str, count: usize, prefix: &str) -> HashSet<String> {
    let mut peer = StompPeer::connect(RABBITMQ_STOMP).await.expect("connect");
    let mut ids = HashSet::new();
    for n in 0..count {
        let id = format!("{prefix}-{n}");
        peer.send(
            destination,
            &[
                ("dop-msg-id", id.as_str()),
                ("content-type", "application/json"),
                ("persistent", "true"),
            ],
            json!({"do": "ok", "n": n}).to_string().as_bytes(),
        )
        .await
        .expect("send a good message");
        ids.insert(id);
    }
    peer.disconnect().await.expect("disconnect");
    ids
}

/// One bad message at the head of a fresh queue, 20 good ones behind it: the good ones are
/// processed within 30 s and the bad one is in `DLQ.<queue>`. Returns the seconds it took.
async fn bad_message_at_the_head(
    test: &TestDb,
    case: &str,
    headers: FieldTable,
    body: &[u8],
    max_frame_size: usize,
) -> (Counted, f64) {
    let (destination, queue, _wire, _cleanup) =
        fresh_destination(&format!("fault_undecodable_{case}"));
    declare_consumer_queues(&destination).await;
    let dlq = format!("DLQ.{queue}");
    publish_amqp(&queue, headers, body).await;
    let good = send_good(&destination, 20, &queue).await;
    eventually(
        Duration::from_secs(10),
        "the 21 messages queued",
        || async { queue_message_count(&queue) == Some(21) },
    )
    .await;

    let mut settings = config(RABBITMQ_STOMP);
    settings.stomp_max_frame_size = max_frame_size;
    let started = Instant::now();
    let consumer = Consumer::builder(pool(&test.url, 3).await)
        .config(settings.clone())
        .destination(&destination)
        .start(record_effect)
        .unwrap();
    let db = test.db.clone();
    let good_ids = good.clone();
    eventually(
        Duration::from_secs(30),
        &format!("{case}: the 20 good messages behind the bad one processed"),
        || {
            let db = db.clone();
            let good_ids = good_ids.clone();
            async move {
                let effects = effect_counts(&db).await;
                good_ids.iter().all(|id| effects.contains_key(id))
            }
        },
    )
    .await;
    let took = started.elapsed().as_secs_f64();
    eventually(
        Duration::from_secs(10),
        &format!("{case}: the bad message in {dlq}"),
        || async { queue_message_count(&dlq) == Some(1) },
    )
    .await;
    eventually(Duration::from_secs(10), "the queue drained", || async {
        queue_message_count(&queue) == Some(0)
    })
    .await;
    consumer.stop().await.unwrap();
    // A consumer starting again declares the dead-letter queue with a subscription of its own,
    // to which the broker may hand the dead letter: it must stay where it is.
    let consumer = Consumer::builder(pool(&test.url, 3).await)
        .config(settings)
        .destination(&destination)
        .start(record_effect)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    consumer.stop().await.unwrap();
    assert_eq!(
        queue_message_count(&dlq),
        Some(1),
        "{case}: the dead letter stayed in {dlq} when a consumer started again"
    );
    let effects = effect_counts(&test.db).await;
    let counted = count(&good, &effects);
    assert_eq!(
        effects.len(),
        good.len(),
        "{case}: only the good messages had effects"
    );
    (counted, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_are_dead_lettered_and_the_queue_flows() {
    let started = Instant::now();
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;

    // RabbitMQ hands a `longstr` header to STOMP subscribers as raw bytes: not UTF-8 here.
    let mut bad_header = FieldTable::default();
    bad_header.insert(
        "x-bad".into(),
        AMQPValue::LongString(LongString::from(vec![0xff_u8, 0xfe])),
    );
    bad_header.insert(
        "dop-msg-id".into(),
        AMQPValue::LongString(LongString::from("bad-header")),
    );
    let (header_counted, header_secs) = bad_message_at_the_head(
        &test,
        "header",
        bad_header,
        br#"{"do": "ok"}"#,
        64 * 1024 * 1024,
    )
    .await;
    db_clear_effects(&test).await;

    let mut oversized = FieldTable::default();
    oversized.insert(
        "dop-msg-id".into(),
        AMQPValue::LongString(LongString::from("oversized")),
    );
    let body = format!(r#"{{"do": "ok", "pad": "{}"}}"#, "x".repeat(2_000_000));
    let (size_counted, size_secs) =
        bad_message_at_the_head(&test, "size", oversized, body.as_bytes(), 1_048_576).await;

    let counted = Counted {
        sent: header_counted.sent + size_counted.sent,
        effects: header_counted.effects + size_counted.effects,
        lost: header_counted.lost + size_counted.lost,
        duplicate_effects: header_counted.duplicate_effects + size_counted.duplicate_effects,
    };
    summary(
        "undecodable",
        &counted,
        0,
        &format!(
            "dead_lettered=2 bad_header_secs={header_secs:.1} oversized_secs={size_secs:.1} secs={:.1}",
            started.elapsed().as_secs_f64()
        ),
    );
    assert_eq!(counted.lost, 0);
    assert_eq!(counted.duplicate_effects, 0);
    test.drop_database().await;
}

async fn db_clear_effects(test: &TestDb) {
    use sea_orm::ConnectionTrait;
    test.db
        .execute_unprepared("DELETE FROM effects")
        .await
        .expect("clear the effects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_flood_keeps_heartbeats_and_acknowledgements_flowing() {
    let started = Instant::now();
    let n = counts(5000, 20_000);
    let (test, (destination, queue, wire_queue, _cleanup)) =
        fault_start("fault_prefetch_flood", TransportKind::Stomp).await;
    let mut wire = WireCounter::start(&destination, &wire_queue).await;
    enqueue_many(&test.db, &destination, n, 0).await;
    relay_everything(&test.db, config(RABBITMQ_STOMP), n).await;
    eventually(Duration::from_secs(20), "the messages queued", || async {
        queue_message_count(&queue) == Some(n)
    })
    .await;

    // As copied from a Python service: no prefetch-count at all, which RabbitMQ reads as no
    // limit; and short heartbeats, so a connection task that stops writing them is soon dead.
    let mut settings = config(RABBITMQ_STOMP);
    settings.stomp_queue_headers.remove("prefetch-count");
    settings.stomp_heartbeats = (Duration::from_secs(1), Duration::from_secs(1));
    // What the consumer subscribes with: the cap stands in for no limit and for a huge one.
    let prefetch_of = |prefetch: Option<u32>| {
        let mut builder = Consumer::builder(test.db.clone())
            .config(settings.clone())
            .destination(&destination);
        if let Some(prefetch) = prefetch {
            builder = builder.prefetch(prefetch);
        }
        let subscription = builder.build().unwrap().topology().subscription("probe");
        subscription
            .headers
            .iter()
            .find(|(name, _)| name == "prefetch-count")
            .map(|(_, value)| value.clone())
    };
    assert_eq!(prefetch_of(None).as_deref(), Some("10000"));
    assert_eq!(prefetch_of(Some(50_000)).as_deref(), Some("10000"));
    assert_eq!(prefetch_of(Some(5_000)).as_deref(), Some("5000"));
    let redelivered = Arc::new(AtomicUsize::new(0));
    let consumer = {
        let redelivered = redelivered.clone();
        Consumer::builder(pool(&test.url, 5).await)
            .config(settings)
            .destination(&destination)
            .start(move |payload: Payload| {
                let redelivered = redelivered.clone();
                async move {
                    if payload.header("redelivered") == Some("true") {
                        redelivered.fetch_add(1, Ordering::Relaxed);
                    }
                    // Now and then a callback slower than several heartbeats, while the
                    // broker's deliveries pile up far beyond 1,024: the connection's task must
                    // go on writing heartbeats (and reading) meanwhile.
                    if payload.body()["n"].as_u64().is_some_and(|n| n % 2500 == 1) {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    record_effect(payload).await
                }
            })
            .unwrap()
    };
    wait_until_consumed(&test.db, &queue, n, Duration::from_secs(240)).await;
    consumer.stop().await.unwrap();

    let expected = outbox_ids(&test.db).await;
    let counted = count(&expected, &effect_counts(&test.db).await);
    let redelivered = redelivered.load(Ordering::Relaxed);
    let wire_duplicates = wire.duplicates(&expected).await;
    summary(
        "prefetch_flood",
        &counted,
        wire_duplicates,
        &format!(
            "prefetch=unset redelivered={redelivered} secs={:.1}",
            started.elapsed().as_secs_f64()
        ),
    );
    assert_eq!(counted.lost, 0, "messages lost");
    assert_eq!(counted.duplicate_effects, 0, "effects done twice");
    // A connection lost on the way would have redelivered the messages it held.
    assert_eq!(
        redelivered, 0,
        "the connection dropped: messages were redelivered"
    );
    test.drop_database().await;
}

// ---------------------------------------------------------------------------------------------
// The broker blocked by a memory alarm

/// The broker's memory high watermark, raised for a test and restored on every exit path
/// (also when the test panics).
struct MemoryAlarm {
    previous: Vec<String>,
}

impl MemoryAlarm {
    /// Reads the watermark, then sets it to 10 MB (far below what RabbitMQ uses: the alarm
    /// goes off) and waits for the alarm.
    fn raise() -> MemoryAlarm {
        let previous = current_watermark();
        let alarm = MemoryAlarm { previous };
        rabbitmqctl(&["set_vm_memory_high_watermark", "absolute", "10MB"]);
        wait_for_alarm(true);
        alarm
    }

    fn restore(&self) {
        let mut args = vec!["set_vm_memory_high_watermark"];
        args.extend(self.previous.iter().map(String::as_str));
        rabbitmqctl(&args);
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        self.restore();
    }
}

/// The arguments of `set_vm_memory_high_watermark` that give back the current value.
fn current_watermark() -> Vec<String> {
    let out = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
    let value = out.trim();
    // `0.4` (a fraction of the memory), or `{absolute,10485760}`.
    if let Some(bytes) = value
        .strip_prefix("{absolute,")
        .and_then(|rest| rest.strip_suffix('}'))
    {
        vec!["absolute".to_owned(), bytes.trim().to_owned()]
    } else {
        assert!(
            value.parse::<f64>().is_ok(),
            "unexpected watermark from rabbitmqctl: {value}"
        );
        vec![value.to_owned()]
    }
}

fn memory_alarm_on() -> bool {
    rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."]).contains("memory")
}

fn wait_for_alarm(on: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while memory_alarm_on() != on {
        assert!(
            Instant::now() < deadline,
            "the memory alarm did not turn {}",
            if on { "on" } else { "off" }
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Rows that spent an attempt or failed.
async fn charged_rows(db: &sea_orm::DatabaseConnection) -> u64 {
    Published::find()
        .filter(
            Condition::any()
                .add(Column::Retry.gt(0))
                .add(Column::Status.eq(Status::Failed)),
        )
        .count(db)
        .await
        .expect("count charged rows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "raises a RabbitMQ memory alarm, which blocks every publisher on the broker: .ci/run runs it alone, after the main tests"]
async fn broker_blocked_by_a_memory_alarm_charges_nothing_stops_and_resumes() {
    broker_blocked(false).await;
}

/// The same over AMQP 0-9-1: the broker's `connection.blocked` stops the relay's publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "raises a RabbitMQ memory alarm, which blocks every publisher on the broker: .ci/run runs it alone, after the main tests"]
async fn broker_blocked_over_amqp_charges_nothing_stops_and_resumes() {
    broker_blocked(true).await;
}

/// The relay (over AMQP when `amqp`) under a memory alarm.
async fn broker_blocked(amqp: bool) {
    let started = Instant::now();
    let n = 600;
    let receipt_timeout = Duration::from_secs(5);
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    let (destination, queue, wire_queue, _cleanup) = fresh_destination("fault_broker_blocked");
    declare_consumer_queues(&destination).await;
    let mut wire = WireCounter::start(&destination, &wire_queue).await;
    // 20 kB bodies: three batches in flight are more than the socket buffers hold, so writes
    // block, not only receipts.
    let pad = "x".repeat(20_000);
    let txn = test.db.begin().await.unwrap();
    outbox::enqueue_all(
        &txn,
        (0..n).map(|k| {
            outbox::Message::from_json(&destination, json!({"do": "ok", "n": k, "pad": pad}))
        }),
    )
    .await
    .unwrap();
    txn.commit().await.unwrap();

    let relay = || {
        tokio::process::Command::new(outbox_tests::binaries::outbox_command())
            .arg("publish")
            .env("DATABASE_URL", &test.url)
            .env("OUTBOX_STOMP_HOST_AND_PORTS", RABBITMQ_STOMP)
            .envs(amqp.then_some(("OUTBOX_BROKER_URL", AMQP_URL)))
            .env(
                "OUTBOX_RECEIPT_TIMEOUT",
                receipt_timeout.as_secs().to_string(),
            )
            .env("OUTBOX_PRODUCER_LEASE", "30")
            // The default backoff (up to an hour): blocked attempts must not grow the pause.
            .env("OUTBOX_PRODUCER_WAITING_TIME", "0.1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start outbox publish")
    };
    let sigterm = |child: &tokio::process::Child| {
        let pid = child.id().expect("a running relay").to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    };

    let alarm = MemoryAlarm::raise();
    let mut child = relay();
    // Long enough for batches to block on writes and receipts, and for the relay to retry.
    tokio::time::sleep(receipt_timeout * 2 + Duration::from_secs(1)).await;
    let sent_while_blocked = count_with_status(&test.db, Status::Succeeded).await;
    let stopping = Instant::now();
    sigterm(&child);
    let exit = tokio::time::timeout(receipt_timeout + Duration::from_secs(15), child.wait())
        .await
        .expect("the blocked relay never stopped")
        .expect("wait for the relay");
    let sigterm_secs = stopping.elapsed().as_secs_f64();
    assert!(exit.success(), "the relay exited with {exit}");
    assert!(
        stopping.elapsed() <= receipt_timeout + Duration::from_secs(5),
        "SIGTERM took {sigterm_secs:.1} s while blocked"
    );
    assert_eq!(
        charged_rows(&test.db).await,
        0,
        "a row was charged while blocked"
    );

    // Blocked again, long enough for several attempts to be given back (their pauses would
    // have doubled to 8 s and more), then the alarm clears: sending resumes within 10 s.
    let mut child = relay();
    tokio::time::sleep(receipt_timeout * 4 + Duration::from_secs(1)).await;
    let before = count_with_status(&test.db, Status::Succeeded).await;
    alarm.restore();
    let cleared = Instant::now();
    wait_for_alarm(false);
    let db = test.db.clone();
    eventually(
        Duration::from_secs(10),
        "sending resumed within 10 s of the alarm clearing",
        || {
            let db = db.clone();
            async move { count_with_status(&db, Status::Succeeded).await > before }
        },
    )
    .await;
    let resume_secs = cleared.elapsed().as_secs_f64();
    drop(alarm);
    wait_until_all_sent(&test.db, n, Duration::from_secs(120)).await;
    sigterm(&child);
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    assert_eq!(charged_rows(&test.db).await, 0, "a row was charged");

    let consumer = Consumer::builder(pool(&test.url, 3).await)
        .config(config(RABBITMQ_STOMP))
        .destination(&destination)
        .in_flight(4)
        .start(record_effect)
        .unwrap();
    wait_until_consumed(&test.db, &queue, n, Duration::from_secs(120)).await;
    consumer.stop().await.unwrap();
    let (counted, wire_duplicates) = count_effects(&test.db, &mut wire).await;
    summary(
        if amqp {
            "broker_blocked_amqp"
        } else {
            "broker_blocked"
        },
        &counted,
        wire_duplicates,
        &format!(
            "charged=0 sent_while_blocked={sent_while_blocked} sigterm_secs={sigterm_secs:.1} resume_secs={resume_secs:.1} secs={:.1}",
            started.elapsed().as_secs_f64()
        ),
    );
    assert_eq!(counted.lost, 0, "messages lost");
    assert_eq!(counted.duplicate_effects, 0, "effects done twice");
    test.drop_database().await;
}
