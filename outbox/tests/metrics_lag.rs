//! A test binary of its own: it installs the process-wide metrics recorder.
//!
//! The lag histograms, read through a debugging recorder after a run on PostgreSQL and RabbitMQ
//! whose lags are known in advance: rows saved just now, a row saved an hour ago, and messages
//! from another sender whose `dop-msg-sent-time` is missing or unreadable.
//!
//! A recorder is global to the process: this file is its own test binary, with one test, so
//! nothing else records into it.

use std::time::Duration;

use metrics_util::debugging::{DebugValue, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};
use outbox::metrics as m;
use outbox::{Consumer, OutboxConfig, Payload, Producer, Published, Received};
use outbox_tests::recorder::install_recorder;
use outbox_tests::stomp_peer::{RABBITMQ_STOMP, StompPeer};
use outbox_tests::transports::{DeclaredTopic, declared_topic};
use outbox_tests::{Backend, TestDb, eventually};
use sea_orm::{ActiveModelTrait, EntityTrait, IntoActiveModel, PaginatorTrait, Set};
use serde_json::{Value, json};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn config() -> OutboxConfig {
    let (host, port) = RABBITMQ_STOMP.rsplit_once(':').expect("host:port");
    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = vec![(host.to_owned(), port.parse().expect("port"))];
    config.receipt_timeout = Duration::from_secs(3);
    config.maximum_backoff = Duration::from_millis(300);
    config.consumer_retry_wait = Duration::from_millis(50);
    config
}

/// The values of the histogram `name` with exactly `labels`, and whether it was described.
fn histogram(snapshotter: &Snapshotter, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    let snapshot: Vec<(CompositeKey, _, _, DebugValue)> = snapshotter.snapshot().into_vec();
    let mut wanted: Vec<(&str, &str)> = labels.to_vec();
    wanted.sort();
    snapshot
        .iter()
        .find(|(key, _, _, _)| {
            let mut found: Vec<(&str, &str)> =
                key.key().labels().map(|l| (l.key(), l.value())).collect();
            found.sort();
            key.kind() == MetricKind::Histogram && key.key().name() == name && found == wanted
        })
        .map(|(_, _, _, value)| match value {
            DebugValue::Histogram(values) => values.iter().map(|v| v.into_inner()).collect(),
            other => panic!("{name} is not a histogram: {other:?}"),
        })
        .unwrap_or_default()
}

fn described(snapshotter: &Snapshotter, name: &str) -> bool {
    snapshotter
        .snapshot()
        .into_vec()
        .iter()
        .any(|(key, _, description, _)| key.key().name() == name && description.is_some())
}

#[tokio::test]
async fn lags_run_from_the_save_to_the_receipt_and_to_the_callback_commit() {
    let snapshotter = install_recorder();

    let test = TestDb::new(Backend::Postgres).await;
    let db = &test.db;
    let settings = config();
    let DeclaredTopic {
        queue,
        destination,
        cleanup: _cleanup,
    } = declared_topic("lag", &settings).await;

    // Two rows saved now, and one saved an hour ago: its `added` and its `dop-msg-sent-time`
    // both say so, as if it had waited for a relay all that time.
    for n in 0..2 {
        outbox::enqueue(db, &destination, &json!({ "n": n }))
            .await
            .unwrap();
    }
    let old = outbox::enqueue(db, &destination, &json!({ "n": "old" }))
        .await
        .unwrap();
    let an_hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    let mut headers = old.headers.clone();
    headers[outbox::headers::MSG_SENT_TIME] =
        Value::String(outbox::headers::format_sent_time(an_hour_ago));
    let mut row = old.into_active_model();
    row.added = Set(an_hour_ago);
    row.headers = Set(headers);
    row.update(db).await.unwrap();

    let report = Producer::builder(db.clone())
        .config(config())
        .build()
        .unwrap()
        .drain()
        .await
        .unwrap();
    assert_eq!(report.sent, 3);

    let relay_lag = histogram(&snapshotter, m::RELAY_LAG, &[]);
    let mut sorted = relay_lag.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(sorted.len(), 3, "one value per receipted row: {sorted:?}");
    assert!(
        sorted[..2].iter().all(|lag| (0.0..30.0).contains(lag)),
        "{sorted:?}"
    );
    assert!((3600.0..3700.0).contains(&sorted[2]), "{sorted:?}");

    // Another service's messages: one without `dop-msg-sent-time`, one whose value is not a
    // time. Both are processed; neither records a lag.
    let mut sender = StompPeer::connect(RABBITMQ_STOMP).await.expect("connect");
    sender
        .send(&destination, &[("dop-msg-id", "no-time")], b"{}")
        .await
        .expect("send");
    sender
        .send(
            &destination,
            &[
                ("dop-msg-id", "bad-time"),
                ("dop-msg-sent-time", "yesterday"),
            ],
            b"{}",
        )
        .await
        .expect("send");
    sender.disconnect().await.expect("disconnect");

    let consumer = Consumer::builder(db.clone())
        .config(config())
        .destination(&destination)
        .start(|payload: Payload| async move {
            payload.save();
            Ok::<(), BoxError>(())
        })
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "five messages processed",
        || async { Received::find().count(db).await.unwrap() == 5 },
    )
    .await;
    consumer.stop().await.unwrap();

    let consumer_lag = histogram(&snapshotter, m::CONSUMER_LAG, &[("queue", queue.as_str())]);
    let mut sorted = consumer_lag.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(
        sorted.len(),
        3,
        "one value per committed message with a readable sent time: {sorted:?}"
    );
    assert!(
        sorted[..2].iter().all(|lag| (0.0..60.0).contains(lag)),
        "{sorted:?}"
    );
    assert!((3600.0..3700.0).contains(&sorted[2]), "{sorted:?}");
    // End to end: a message's consumer lag includes its relay lag. The header keeps
    // milliseconds only, hence the margin.
    let relay_max = relay_lag.iter().copied().fold(0.0, f64::max);
    assert!(
        sorted[2] >= relay_max - 0.001,
        "{sorted:?} vs {relay_lag:?}"
    );

    assert!(described(&snapshotter, m::RELAY_LAG));
    assert!(described(&snapshotter, m::CONSUMER_LAG));
    assert_eq!(Published::find().count(db).await.unwrap(), 3);
    test.drop_database().await;
}
