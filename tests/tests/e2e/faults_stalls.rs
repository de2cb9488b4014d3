//! Stalls: what held the relay up for good, or kept it on a broker that does not confirm.
//!
//! - `large_message_slow_link` (and `_amqp`): a 4 MB row ahead of 200 small rows, through a
//!   proxy passing 512 kB/s, receipt timeout 5 s. The receipt clock starts when a message's last
//!   byte is written, so the large one (8 s to write) is not given up on while it is written,
//!   nor is anything queued behind it: all 201 are sent within 2 minutes, the large one copied
//!   at most 3 times onto the wire (counted by a second queue), each effect exactly once.
//! - `broker_never_confirms`: a fake STOMP broker that logs in, heartbeats and never sends a
//!   RECEIPT. With two such addresses, `outbox publish`'s resident memory grows by at most 5 MB
//!   over 20 receipt timeouts (timed-out waiters are forgotten, unanswered connections
//!   abandoned); with the fake broker first and RabbitMQ second, the relay moves to RabbitMQ
//!   within the receipt timeout + 5 s, and every row is delivered once.
//! - `sigterm_while_reconnecting` (and `_amqp`): brokers that accept connections and never
//!   answer the login; `outbox publish` with rows waiting honours SIGTERM within the receipt
//!   timeout + 5 s, charging nothing; the rows are delivered later, each once.

use std::time::{Duration, Instant};

use outbox::tables::published::{Column, Status};
use outbox::{Consumer, Producer, Published};
use outbox_tests::count_with_status;
use outbox_tests::fake_broker::{Behaviour, FakeBroker};
use outbox_tests::faults::*;
use outbox_tests::proxy::FaultProxy;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::json;

/// The large message's body, about 4 MB.
const LARGE_BYTES: usize = 4 * 1024 * 1024;
/// The small rows queued behind it.
const SMALL_ROWS: usize = 200;
/// What the proxy passes, each way.
const LINK_RATE: u64 = 512 * 1024;
/// Every row is sent within this.
const ALL_SENT_WITHIN: Duration = Duration::from_secs(120);
/// The most copies of the large message on the wire.
const MAX_LARGE_COPIES: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_message_slow_link() {
    large_message_slow_link_over(TransportKind::Stomp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_message_slow_link_amqp() {
    large_message_slow_link_over(TransportKind::Amqp).await;
}

async fn large_message_slow_link_over(kind: TransportKind) {
    let started = Instant::now();
    let name = kind.summary_name("large_message_slow_link");
    let (test, (destination, queue, wire_queue, _cleanup)) = fault_start("fault_large", kind).await;
    let mut wire = WireCounter::start(&destination, &wire_queue).await;
    let pad = "x".repeat(LARGE_BYTES);
    let large_id = outbox::enqueue(
        &test.db,
        &destination,
        &json!({"do": "ok", "tag": "large", "n": 0, "pad": pad}),
    )
    .await
    .expect("enqueue the large row")
    .id
    .to_string();
    enqueue_many(&test.db, &destination, SMALL_ROWS, 1).await;
    let total = SMALL_ROWS + 1;

    let proxy = FaultProxy::start(kind.broker_addr()).await;
    proxy.rate(Some(LINK_RATE));
    let mut config = kind.config_at(proxy.addr());
    config.receipt_timeout = Duration::from_secs(5);
    config.producer_lease = Duration::from_secs(10);
    let relay = Producer::builder(pool(&test.url, 4).await)
        .config(config)
        .start()
        .unwrap();
    let consumer = Consumer::builder(pool(&test.url, 4).await)
        .config(kind.config())
        .destination(&destination)
        .in_flight(8)
        .start(record_effect)
        .unwrap();
    let relaying = Instant::now();
    wait_until_all_sent(&test.db, total, ALL_SENT_WITHIN).await;
    let sent_secs = relaying.elapsed().as_secs_f64();
    relay.stop().await.unwrap();
    wait_until_consumed(&test.db, &queue, total, Duration::from_secs(60)).await;
    consumer.stop().await.unwrap();

    let (counted, wire_duplicates) = count_effects(&test.db, &mut wire).await;
    let large_copies = wire.copies_of(&large_id);
    let charged = Published::find()
        .filter(Column::Retry.gt(0))
        .count(&test.db)
        .await
        .expect("read the outbox");
    summary(
        &name,
        &counted,
        wire_duplicates,
        &format!(
            "large_bytes={LARGE_BYTES} link_bytes_per_sec={LINK_RATE} large_copies={large_copies} \
             charged={charged} sent_secs={sent_secs:.1} secs={:.1}",
            started.elapsed().as_secs_f64()
        ),
    );
    assert_exactly_once(&counted, total);
    assert!(
        (1..=MAX_LARGE_COPIES).contains(&large_copies),
        "{large_copies} copies of the large message on the wire"
    );
    assert_eq!(charged, 0, "rows were charged for a slow link");
    test.drop_database().await;
}

/// The receipt timeout `outbox publish` runs with in [`publish_command`].
const PUBLISH_RECEIPT_TIMEOUT: Duration = Duration::from_secs(1);
/// Rows waiting for the relay that meets a broker that never confirms.
const NEVER_CONFIRMED_ROWS: usize = 200;
/// Receipt timeouts over which the relay's memory is watched.
const WATCHED_TIMEOUTS: u32 = 20;
/// The most the relay's resident memory may grow over them.
const MAX_GROWTH_KIB: u64 = 5 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_never_confirms() {
    let started = Instant::now();
    let (test, (destination, queue, wire_queue, _cleanup)) =
        fault_start("fault_never_confirms", TransportKind::Stomp).await;
    let mut wire = WireCounter::start(&destination, &wire_queue).await;
    enqueue_many(&test.db, &destination, NEVER_CONFIRMED_ROWS, 0).await;
    let sick = FakeBroker::start(Behaviour::NeverReceipts).await;
    let also_sick = FakeBroker::start(Behaviour::NeverReceipts).await;

    // Nowhere to go: the relay keeps meeting brokers that never confirm.
    let mut relay = publish_command(&test.url, 100)
        .env_remove("OUTBOX_BROKER_URL")
        .env(
            "OUTBOX_STOMP_HOST_AND_PORTS",
            format!("{},{}", sick.addr(), also_sick.addr()),
        )
        .spawn()
        .expect("start outbox publish");
    // Settled in: connected, sent, timed out at least twice.
    tokio::time::sleep(PUBLISH_RECEIPT_TIMEOUT * 3).await;
    let before_kib = resident_kib(&relay);
    let frames_before = sick.frames() + also_sick.frames();
    tokio::time::sleep(PUBLISH_RECEIPT_TIMEOUT * WATCHED_TIMEOUTS).await;
    let after_kib = resident_kib(&relay);
    let sent_to_sick = sick.frames() + also_sick.frames() - frames_before;
    let sick_connections = sick.accepted() + also_sick.accepted();
    kill(&mut relay).await;
    assert_eq!(
        count_with_status(&test.db, Status::Succeeded).await,
        0,
        "a row was marked sent without a receipt"
    );
    // A batch every receipt timeout or so, on a new connection each time.
    assert!(
        sent_to_sick >= NEVER_CONFIRMED_ROWS * 5,
        "the relay sent only {sent_to_sick} frames to the brokers that never confirm"
    );
    assert!(
        sick_connections >= 4,
        "the relay did not give up unanswered connections: {sick_connections} connections"
    );
    let growth_kib = after_kib.saturating_sub(before_kib);

    // The fake broker first, RabbitMQ second: the relay moves on.
    let consumer = Consumer::builder(pool(&test.url, 4).await)
        .config(outbox_tests::settings::stomp(&stomp_addr().to_string()))
        .destination(&destination)
        .in_flight(8)
        .start(record_effect)
        .unwrap();
    let moving = Instant::now();
    let mut relay = publish_command(&test.url, 100)
        .env_remove("OUTBOX_BROKER_URL")
        .env(
            "OUTBOX_STOMP_HOST_AND_PORTS",
            format!("{},{}", sick.addr(), stomp_addr()),
        )
        .spawn()
        .expect("start outbox publish");
    let moved = first_sent(&test.db, PUBLISH_RECEIPT_TIMEOUT + Duration::from_secs(15)).await;
    wait_until_all_sent(&test.db, NEVER_CONFIRMED_ROWS, Duration::from_secs(60)).await;
    sigterm(&relay);
    let _ = tokio::time::timeout(Duration::from_secs(15), relay.wait()).await;
    kill(&mut relay).await;
    wait_until_consumed(
        &test.db,
        &queue,
        NEVER_CONFIRMED_ROWS,
        Duration::from_secs(60),
    )
    .await;
    consumer.stop().await.unwrap();

    let (counted, wire_duplicates) = count_effects(&test.db, &mut wire).await;
    let moved_secs = moved.map(|at| at.duration_since(moving).as_secs_f64());
    summary(
        "broker_never_confirms",
        &counted,
        wire_duplicates,
        &format!(
            "rss_before_kib={before_kib} rss_after_kib={after_kib} growth_kib={growth_kib} \
             timeouts_watched={WATCHED_TIMEOUTS} frames_to_sick={sent_to_sick} \
             sick_connections={sick_connections} moved_secs={} secs={:.1}",
            moved_secs.map_or("never".to_owned(), |secs| format!("{secs:.1}")),
            started.elapsed().as_secs_f64()
        ),
    );
    assert_exactly_once(&counted, NEVER_CONFIRMED_ROWS);
    assert!(
        growth_kib <= MAX_GROWTH_KIB,
        "resident memory grew by {growth_kib} KiB over {WATCHED_TIMEOUTS} receipt timeouts"
    );
    let moved_secs = moved_secs.expect("the relay never moved to the second address");
    assert!(
        moved_secs <= (PUBLISH_RECEIPT_TIMEOUT + Duration::from_secs(5)).as_secs_f64(),
        "the relay took {moved_secs:.1} s to move to the second address"
    );
    test.drop_database().await;
}

/// When the first row was marked sent, if within `limit`.
async fn first_sent(db: &DatabaseConnection, limit: Duration) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if count_with_status(db, Status::Succeeded).await > 0 {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// The receipt timeout of the relay stopped while reconnecting: long, so that waiting out the
/// login of three silent brokers (the old behaviour) shows.
const RECONNECTING_RECEIPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows waiting while the brokers are unreachable.
const WAITING_ROWS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_reconnecting() {
    sigterm_while_reconnecting_over(TransportKind::Stomp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_reconnecting_amqp() {
    sigterm_while_reconnecting_over(TransportKind::Amqp).await;
}

async fn sigterm_while_reconnecting_over(kind: TransportKind) {
    let started = Instant::now();
    let name = kind.summary_name("sigterm_while_reconnecting");
    let (test, (destination, queue, wire_queue, _cleanup)) =
        fault_start("fault_sigterm_reconnecting", kind).await;
    let mut wire = WireCounter::start(&destination, &wire_queue).await;
    enqueue_many(&test.db, &destination, WAITING_ROWS, 0).await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(FakeBroker::start(Behaviour::Silent).await);
    }
    let mut command = publish_command(&test.url, 100);
    command
        .env(
            "OUTBOX_RECEIPT_TIMEOUT",
            RECONNECTING_RECEIPT_TIMEOUT.as_secs().to_string(),
        )
        .env("OUTBOX_PRODUCER_LEASE", "10");
    match kind {
        TransportKind::Stomp => command.env_remove("OUTBOX_BROKER_URL").env(
            "OUTBOX_STOMP_HOST_AND_PORTS",
            silent
                .iter()
                .map(|broker| broker.addr().to_string())
                .collect::<Vec<_>>()
                .join(","),
        ),
        TransportKind::Amqp => command.env_remove("OUTBOX_STOMP_HOST_AND_PORTS").env(
            "OUTBOX_BROKER_URL",
            silent
                .iter()
                .map(|broker| amqp_url(broker.addr()))
                .collect::<Vec<_>>()
                .join(","),
        ),
    };
    let mut relay = command.spawn().expect("start outbox publish");
    // Well into a login that never ends.
    outbox_tests::eventually(Duration::from_secs(30), "the relay connects", || async {
        silent[0].accepted() > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopping = Instant::now();
    sigterm(&relay);
    let exit = tokio::time::timeout(
        RECONNECTING_RECEIPT_TIMEOUT * 4 + Duration::from_secs(10),
        relay.wait(),
    )
    .await
    .expect("the relay never stopped")
    .expect("wait for the relay");
    let stop_secs = stopping.elapsed().as_secs_f64();
    let attempts: usize = silent.iter().map(FakeBroker::accepted).sum();
    let charged = Published::find()
        .filter(Column::Retry.gt(0))
        .count(&test.db)
        .await
        .expect("read the outbox");

    // The rows wait for a broker that answers.
    let consumer = Consumer::builder(pool(&test.url, 4).await)
        .config(kind.config())
        .destination(&destination)
        .in_flight(8)
        .start(record_effect)
        .unwrap();
    relay_everything(&test.db, kind.config(), WAITING_ROWS).await;
    wait_until_consumed(&test.db, &queue, WAITING_ROWS, Duration::from_secs(60)).await;
    consumer.stop().await.unwrap();
    let (counted, wire_duplicates) = count_effects(&test.db, &mut wire).await;
    summary(
        &name,
        &counted,
        wire_duplicates,
        &format!(
            "receipt_timeout_secs={} stop_secs={stop_secs:.1} attempts={attempts} \
             charged={charged} secs={:.1}",
            RECONNECTING_RECEIPT_TIMEOUT.as_secs(),
            started.elapsed().as_secs_f64()
        ),
    );
    assert!(exit.success(), "the relay exited with {exit}");
    assert!(
        stopping.elapsed() <= RECONNECTING_RECEIPT_TIMEOUT + Duration::from_secs(5),
        "SIGTERM took {stop_secs:.1} s while reconnecting"
    );
    assert_eq!(
        charged, 0,
        "a row was charged while the brokers were unreachable"
    );
    assert_exactly_once(&counted, WAITING_ROWS);
    test.drop_database().await;
}
