//! A test binary of its own: it installs the process-wide metrics recorder.
//!
//! The metrics a relay and a consumer record, read through a debugging recorder after a run
//! whose every outcome is known in advance.
//!
//! A recorder is global to the process: this file is its own test binary, with one test, so
//! nothing else records into it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use metrics_util::debugging::DebugValue;
use metrics_util::{CompositeKey, MetricKind};
use outbox::metrics as m;
use outbox::tables::published::Column;
use outbox::tables::published::Status;
use outbox::transport::{MemoryTransport, Outgoing, Transport};
use outbox::{Consumer, OutboxConfig, Payload, Producer, Published, Received};
use outbox_tests::recorder::install_recorder;
use outbox_tests::{Backend, TestDb, count_with_status, eventually};
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, Set};
use serde_json::json;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the recorder holds, drained once.
struct Recorded(Vec<(CompositeKey, Option<String>, DebugValue)>);

impl Recorded {
    fn find(&self, kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> Option<&DebugValue> {
        self.0
            .iter()
            .find(|(key, _, _)| {
                let mut found: Vec<(&str, &str)> = key
                    .key()
                    .labels()
                    .map(|label| (label.key(), label.value()))
                    .collect();
                found.sort();
                let mut wanted = labels.to_vec();
                wanted.sort();
                key.kind() == kind && key.key().name() == name && found == wanted
            })
            .map(|(_, _, value)| value)
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.find(MetricKind::Counter, name, labels) {
            Some(DebugValue::Counter(n)) => *n,
            None => 0,
            other => panic!("{name} is not a counter: {other:?}"),
        }
    }

    fn gauge(&self, name: &str) -> f64 {
        match self.find(MetricKind::Gauge, name, &[]) {
            Some(DebugValue::Gauge(value)) => value.into_inner(),
            other => panic!("no gauge {name}: {other:?}"),
        }
    }

    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        match self.find(MetricKind::Histogram, name, labels) {
            Some(DebugValue::Histogram(values)) => values.iter().map(|v| v.into_inner()).collect(),
            other => panic!("no histogram {name} {labels:?}: {other:?}"),
        }
    }

    fn description(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _, _)| key.key().name() == name)
            .and_then(|(_, description, _)| description.as_deref())
    }

    /// Every label name used, for the cardinality check.
    fn label_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .0
            .iter()
            .flat_map(|(key, _, _)| key.key().labels().map(|l| l.key().to_owned()))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

fn config() -> OutboxConfig {
    let mut config = OutboxConfig::default();
    config.maximum_retry_attempts = 2;
    config.pause_for_retry = Duration::ZERO;
    config.wait_retry = Duration::ZERO;
    config.producer_waiting_time = Duration::from_millis(50);
    config.maximum_backoff = Duration::from_millis(100);
    config.consumer_retry_wait = Duration::from_millis(20);
    config
}

#[tokio::test]
async fn a_known_relay_and_consumer_run_is_counted_exactly() {
    let snapshotter = install_recorder();

    let test = TestDb::new(Backend::Sqlite).await;
    let db = &test.db;
    let broker = MemoryTransport::new();

    // The relay: 3 rows for a, 2 for b, one the broker refuses on both its attempts, one
    // expired before it could be sent.
    for (destination, n) in [("/topic/metrics.a", 3), ("/topic/metrics.b", 2)] {
        for i in 0..n {
            outbox::enqueue(db, destination, &json!({ "i": i }))
                .await
                .unwrap();
        }
    }
    outbox::enqueue(db, "/topic/poison", &json!({}))
        .await
        .unwrap();
    broker.refuse("/topic/poison");
    let expired = outbox::enqueue(db, "/topic/metrics.a", &json!({"late": true}))
        .await
        .unwrap();
    Published::update_many()
        .col_expr(
            Column::ExpiresAt,
            Expr::value(chrono::Utc::now() - chrono::Duration::hours(1)),
        )
        .filter(Column::Id.eq(expired.id))
        .exec(db)
        .await
        .unwrap();
    // Backdated an hour: the oldest pending row.
    Published::update_many()
        .col_expr(
            Column::Added,
            Expr::value(chrono::Utc::now() - chrono::Duration::hours(1)),
        )
        .filter(Column::Destination.eq("/topic/metrics.b"))
        .exec(db)
        .await
        .unwrap();

    // A round while the broker is down: every due row claimed, then released.
    let producer = Producer::builder(db.clone())
        .config(config())
        .transport(broker.clone())
        .build()
        .unwrap();
    broker.set_down(true);
    let report = producer.round().await.unwrap();
    assert_eq!((report.claimed, report.released), (6, 6));
    broker.set_down(false);
    // Expiry runs on the relay's retention task, beside its rounds; run it first here so that
    // the relay's first sample of the pending gauges comes after it.
    producer.tidy().await.unwrap();

    // A destination recorded as waiting for a queue (by an AMQP relay).
    let now = chrono::Utc::now();
    outbox::tables::unroutable::ActiveModel {
        destination: Set("/topic/nobody.v1".into()),
        reply: Set("312 NO_ROUTE".into()),
        since: Set(now),
        last_returned_at: Set(now),
    }
    .insert(db)
    .await
    .unwrap();

    let relay = Producer::builder(db.clone())
        .config(config())
        .transport(broker.clone())
        .start()
        .unwrap();
    eventually(Duration::from_secs(20), "every row settled", || async {
        count_with_status(db, Status::Schedule).await == 0
    })
    .await;
    relay.stop().await.unwrap();
    assert_eq!(count_with_status(db, Status::Succeeded).await, 5);
    assert_eq!(count_with_status(db, Status::Failed).await, 2);

    // The consumer: one message of each outcome.
    let consumer_config = config();
    let destination = "/topic/metrics.c";
    outbox::consumer::declare(&broker, &consumer_config, destination, None)
        .await
        .unwrap();
    let sender = broker.new_connection();
    // A message that does not decode: rejected by the transport, counted by the consumer.
    broker.undecodable("/amq/queue/metrics.c");
    let report = sender
        .send(&[Outgoing {
            destination: "/amq/queue/metrics.c".into(),
            headers: vec![],
            body: b"{}".to_vec(),
        }])
        .await;
    assert!(report.all_receipted());
    for (id, action) in [
        ("m-ok", "ok"),
        ("m-ok", "ok"),
        ("m-nack", "nack"),
        ("m-fail", "fail"),
        ("m-flaky", "flaky"),
    ] {
        let report = sender
            .send(&[Outgoing {
                destination: destination.into(),
                headers: vec![("dop-msg-id".into(), id.into())],
                body: json!({ "do": action }).to_string().into_bytes(),
            }])
            .await;
        assert!(report.all_receipted());
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let consumer = Consumer::builder(db.clone())
        .config(consumer_config)
        .destination(destination)
        .transport(broker.new_connection())
        .start({
            let calls = calls.clone();
            move |payload: Payload| {
                let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    match payload.body()["do"].as_str() {
                        Some("nack") => payload.nack(),
                        Some("fail") => return Err::<(), BoxError>("refused".into()),
                        // The fourth call is the flaky message's first attempt.
                        Some("flaky") if call == 4 => {
                            return Err(
                                outbox::consumer::Transient::new("briefly unavailable").into()
                            );
                        }
                        _ => payload.save(),
                    }
                    Ok(())
                }
            }
        })
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "every message processed",
        || async {
            calls.load(Ordering::SeqCst) == 5 && Received::find().count(db).await.unwrap() == 2
        },
    )
    .await;
    consumer.stop().await.unwrap();
    assert_eq!(broker.queue_len("DLQ.metrics.c"), 3);

    let recorded = Recorded(
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, description, value)| (key, description.map(|d| d.to_string()), value))
            .collect(),
    );

    // Relay counters.
    let a = [("destination", "/topic/metrics.a")];
    let b = [("destination", "/topic/metrics.b")];
    let poison = [("destination", "/topic/poison")];
    assert_eq!(recorded.counter(m::MESSAGES_SENT, &a), 3);
    assert_eq!(recorded.counter(m::MESSAGES_SENT, &b), 2);
    assert_eq!(recorded.counter(m::MESSAGES_SENT, &poison), 0);
    assert_eq!(recorded.counter(m::MESSAGES_REFUSED, &poison), 2);
    assert_eq!(recorded.counter(m::MESSAGES_RETRIED, &poison), 1);
    assert_eq!(recorded.counter(m::MESSAGES_FAILED, &poison), 1);
    assert_eq!(recorded.counter(m::MESSAGES_REFUSED, &a), 0);
    assert_eq!(recorded.counter(m::MESSAGES_EXPIRED, &[]), 1);
    assert_eq!(recorded.counter(m::MESSAGES_RELEASED, &[]), 6);

    // Every claimed row is in a batch: 6 released, the same 6 sent or refused, the poison row
    // again (the expired row is never claimed).
    let sizes = recorded.histogram(m::RELAY_BATCH_SIZE, &[]);
    assert_eq!(sizes.iter().sum::<f64>(), 13.0, "{sizes:?}");
    assert!(sizes.iter().all(|size| *size >= 1.0));
    let durations = recorded.histogram(m::RELAY_BATCH_DURATION, &[]);
    assert_eq!(durations.len(), sizes.len());
    assert!(durations.iter().all(|d| (0.0..10.0).contains(d)));

    // Sampled when the relay started, after the expired row was failed.
    assert_eq!(recorded.gauge(m::PENDING_MESSAGES), 6.0);
    let age = recorded.gauge(m::OLDEST_PENDING_AGE);
    assert!((3590.0..3700.0).contains(&age), "{age}");
    assert_eq!(recorded.gauge(m::UNROUTABLE_DESTINATIONS), 1.0);

    // Consumer outcomes.
    let outcome = |outcome| [("queue", "metrics.c"), ("outcome", outcome)];
    assert_eq!(recorded.counter(m::CONSUMER_MESSAGES, &outcome("acked")), 2);
    assert_eq!(
        recorded.counter(m::CONSUMER_MESSAGES, &outcome("duplicate")),
        1
    );
    assert_eq!(
        recorded.counter(m::CONSUMER_MESSAGES, &outcome("nacked")),
        1
    );
    assert_eq!(
        recorded.counter(m::CONSUMER_MESSAGES, &outcome("dead_lettered")),
        1
    );
    assert_eq!(
        recorded.counter(m::CONSUMER_MESSAGES, &outcome("retried")),
        1
    );
    assert_eq!(
        recorded.counter(m::CONSUMER_MESSAGES, &outcome("undecodable")),
        1
    );
    let callbacks = recorded.histogram(m::CONSUMER_CALLBACK_DURATION, &[("queue", "metrics.c")]);
    assert_eq!(callbacks.len(), 5, "the duplicate runs no callback");

    // Bounded labels only, and every metric described.
    assert_eq!(recorded.label_names(), ["destination", "outcome", "queue"]);
    for name in [
        m::MESSAGES_SENT,
        m::MESSAGES_REFUSED,
        m::RELAY_BATCH_SIZE,
        m::PENDING_MESSAGES,
        m::UNROUTABLE_DESTINATIONS,
        m::CONSUMER_MESSAGES,
        m::CONSUMER_CALLBACK_DURATION,
    ] {
        assert!(recorded.description(name).is_some(), "{name} undescribed");
    }
    test.drop_database().await;
}
