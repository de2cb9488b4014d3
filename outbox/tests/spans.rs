//! A test binary of its own: it sets the global tracing subscriber.
//!
//! The spans and events an operator reads, captured by a tracing layer during a run on
//! PostgreSQL and RabbitMQ: the relay's batch span with its size and claim token, its
//! per-message events with their correlation id and outcome, and the consumer's message span
//! with the attempt number and the outcome.
//!
//! A global subscriber is needed (the relay and the consumer run in tasks of their own), and
//! there is one per process: this file is its own test binary, with one test.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::tables::published::Status;
use outbox::{Consumer, OutboxConfig, Payload, Producer, Received};
use outbox_tests::stomp_peer::{RABBITMQ_STOMP, StompPeer, unique};
use outbox_tests::transports::{DeclaredTopic, declared_topic};
use outbox_tests::{Backend, TestDb, eventually};
use sea_orm::{EntityTrait, PaginatorTrait};
use serde_json::json;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Fields = BTreeMap<String, String>;

/// A closed span: its name and its fields as they were when it closed.
#[derive(Debug, Clone)]
struct ClosedSpan {
    name: String,
    fields: Fields,
}

/// An event, with the name and fields of the span it happened in.
#[derive(Debug, Clone)]
struct SeenEvent {
    fields: Fields,
    span: Option<ClosedSpan>,
}

#[derive(Default)]
struct Captured {
    open: BTreeMap<u64, ClosedSpan>,
    closed: Vec<ClosedSpan>,
    events: Vec<SeenEvent>,
}

/// Records every span's fields (also those recorded after its creation) and every event.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Captured>>);

struct Collect<'a>(&'a mut Fields);

impl Visit for Collect<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = Fields::new();
        attrs.record(&mut Collect(&mut fields));
        let span = ClosedSpan {
            name: attrs.metadata().name().to_owned(),
            fields,
        };
        self.0.lock().unwrap().open.insert(id.into_u64(), span);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(span) = self.0.lock().unwrap().open.get_mut(&id.into_u64()) {
            values.record(&mut Collect(&mut span.fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        event.record(&mut Collect(&mut fields));
        let mut captured = self.0.lock().unwrap();
        let span = ctx
            .event_span(event)
            .and_then(|span| captured.open.get(&span.id().into_u64()).cloned());
        captured.events.push(SeenEvent { fields, span });
    }

    fn on_close(&self, id: Id, _: Context<'_, S>) {
        let mut captured = self.0.lock().unwrap();
        if let Some(span) = captured.open.remove(&id.into_u64()) {
            captured.closed.push(span);
        }
    }
}

impl Capture {
    fn spans(&self, name: &str) -> Vec<ClosedSpan> {
        let captured = self.0.lock().unwrap();
        captured
            .closed
            .iter()
            .filter(|span| span.name == name)
            .cloned()
            .collect()
    }

    fn events(&self, message: &str) -> Vec<SeenEvent> {
        let captured = self.0.lock().unwrap();
        captured
            .events
            .iter()
            .filter(|event| event.fields.get("message").map(String::as_str) == Some(message))
            .cloned()
            .collect()
    }
}

fn config() -> OutboxConfig {
    let (host, port) = RABBITMQ_STOMP.rsplit_once(':').expect("host:port");
    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = vec![(host.to_owned(), port.parse().expect("port"))];
    config.receipt_timeout = Duration::from_secs(3);
    config.maximum_backoff = Duration::from_millis(300);
    config.maximum_retry_attempts = 2;
    config.pause_for_retry = Duration::ZERO;
    config.wait_retry = Duration::ZERO;
    config.consumer_retry_wait = Duration::from_millis(20);
    config
}

#[tokio::test]
async fn batch_and_message_spans_carry_what_an_operator_needs() {
    let capture = Capture::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(capture.clone()))
        .expect("the only subscriber of this test binary");

    let test = TestDb::new(Backend::Postgres).await;
    let db = &test.db;
    let settings = config();
    let DeclaredTopic {
        queue,
        destination,
        cleanup: _cleanup,
    } = declared_topic("spans", &settings).await;

    // The relay: two rows of one request in one batch, then a row RabbitMQ refuses (a missing
    // exchange) on both its attempts. Apart, so that the refusal, which closes the connection,
    // makes no good row go out twice.
    let producer = Producer::builder(db.clone())
        .config(config())
        .build()
        .unwrap();
    outbox::with_correlation_id("req-spans", async {
        for n in 0..2 {
            outbox::enqueue(db, &destination, &json!({ "n": n }))
                .await
                .unwrap();
        }
    })
    .await;
    assert_eq!(producer.drain().await.unwrap().sent, 2);
    let poison = format!("/exchange/{}/x", unique("missing"));
    let poison_row = outbox::with_correlation_id("req-spans", async {
        outbox::enqueue(db, &poison, &json!({})).await.unwrap()
    })
    .await;
    assert_eq!(producer.drain().await.unwrap().refused, 2);
    assert_eq!(outbox_tests::count_with_status(db, Status::Failed).await, 1);

    let batches = capture.spans("outbox.batch");
    assert_eq!(
        batches
            .iter()
            .map(|b| b.fields["size"].as_str())
            .collect::<Vec<_>>(),
        ["2", "1", "1"],
        "{batches:?}"
    );
    for batch in &batches {
        uuid::Uuid::parse_str(&batch.fields["token"]).expect("the claim token, a UUID");
    }
    assert_ne!(batches[1].fields["token"], batches[2].fields["token"]);

    let receipted = capture.events("message receipted");
    assert_eq!(receipted.len(), 2, "{receipted:?}");
    for event in &receipted {
        assert_eq!(event.fields["correlation_id"], "req-spans");
        assert_eq!(event.fields["outcome"], "sent");
        let span = event.span.as_ref().expect("inside the batch span");
        assert_eq!(span.name, "outbox.batch");
        assert_eq!(span.fields["token"], batches[0].fields["token"]);
    }
    let refused: Vec<(String, String)> = [
        "the broker refused the message; it will be retried, alone",
        "the broker refused the message on every attempt; marked FAILED",
    ]
    .iter()
    .flat_map(|message| capture.events(message))
    .map(|event| {
        assert_eq!(event.fields["message_id"], poison_row.id.to_string());
        assert_eq!(event.fields["correlation_id"], "req-spans");
        assert_eq!(
            event.span.as_ref().map(|s| s.name.as_str()),
            Some("outbox.batch")
        );
        (
            event.fields["outcome"].clone(),
            event.span.unwrap().fields["token"].clone(),
        )
    })
    .collect();
    assert_eq!(
        refused,
        [
            ("retried".to_owned(), batches[1].fields["token"].clone()),
            ("failed".to_owned(), batches[2].fields["token"].clone()),
        ]
    );

    // The consumer: the two relayed messages (one flaky: a transient failure, then saved),
    // one the callback nacks, and a copy of the first (a duplicate).
    let mut sender = StompPeer::connect(RABBITMQ_STOMP).await.expect("connect");
    for (id, action) in [("m-nack", "nack"), ("m-twice", "ok"), ("m-twice", "ok")] {
        sender
            .send(
                &destination,
                &[("dop-msg-id", id), ("dop-correlation-id", "req-other")],
                json!({ "do": action }).to_string().as_bytes(),
            )
            .await
            .expect("send");
    }
    sender.disconnect().await.expect("disconnect");
    let calls = Arc::new(AtomicUsize::new(0));
    let consumer = Consumer::builder(db.clone())
        .config(config())
        .destination(&destination)
        .start({
            let calls = calls.clone();
            move |payload: Payload| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    if payload.body()["do"] == "nack" {
                        payload.nack();
                        return Ok(());
                    }
                    // The relayed row n = 1 fails once, transiently.
                    static FAILED_ONCE: AtomicUsize = AtomicUsize::new(0);
                    if payload.body()["n"] == 1 && FAILED_ONCE.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err(outbox::consumer::Transient::new("briefly unavailable").into());
                    }
                    payload.save();
                    Ok::<(), BoxError>(())
                }
            }
        })
        .unwrap();
    eventually(Duration::from_secs(20), "every message handled", || async {
        Received::find().count(db).await.unwrap() == 3 && capture.spans("outbox.message").len() == 5
    })
    .await;
    consumer.stop().await.unwrap();

    let mut messages: Vec<(String, String, String, String)> = capture
        .spans("outbox.message")
        .into_iter()
        .map(|span| {
            assert_eq!(span.fields["queue"], queue);
            (
                span.fields["correlation_id"].clone(),
                span.fields["message_id"].clone(),
                span.fields["attempt"].clone(),
                span.fields["outcome"].clone(),
            )
        })
        .collect();
    messages.sort();
    let relayed: Vec<String> = receipted
        .iter()
        .map(|event| event.fields["message_id"].clone())
        .collect();
    let expected = |id: &str, attempt: &str, outcome: &str, correlation: &str| {
        (
            correlation.to_owned(),
            id.to_owned(),
            attempt.to_owned(),
            outcome.to_owned(),
        )
    };
    let mut wanted = vec![
        expected("m-nack", "1", "nacked", "req-other"),
        expected("m-twice", "1", "acked", "req-other"),
        expected("m-twice", "1", "duplicate", "req-other"),
    ];
    // Which relayed message is n = 1 is not known here: one of them took two attempts.
    let attempts: Vec<&str> = messages
        .iter()
        .filter(|(_, id, _, _)| relayed.contains(id))
        .map(|(_, _, attempt, outcome)| {
            assert_eq!(outcome, "acked");
            attempt.as_str()
        })
        .collect();
    let mut sorted_attempts = attempts.clone();
    sorted_attempts.sort();
    assert_eq!(sorted_attempts, ["1", "2"], "{messages:?}");
    messages.retain(|(_, id, _, _)| !relayed.contains(id));
    wanted.sort();
    assert_eq!(messages, wanted);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        5,
        "4 messages, one retried; the duplicate not called"
    );
    test.drop_database().await;
}
