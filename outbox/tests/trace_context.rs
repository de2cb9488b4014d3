//! A test binary of its own: it sets the global tracing subscriber.
//!
//! Trace context across the broker (the `opentelemetry` feature), on PostgreSQL and RabbitMQ,
//! with OpenTelemetry's in-memory exporter: a row saved in a span carries its `traceparent`, and
//! the consumer's message span, with the callback's own span under it, continues that trace,
//! and the relay's batch span links to it (one link per traced row, no span per message). A
//! row saved outside any span carries no trace header, and no link.
//!
//! The tracing subscriber is global (the consumer runs in tasks of its own), one per process:
//! this file is its own test binary, with one test.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use outbox::{Consumer, OutboxConfig, Payload, Producer, Received};
use outbox_tests::stomp_peer::RABBITMQ_STOMP;
use outbox_tests::transports::{DeclaredTopic, declared_topic};
use outbox_tests::{Backend, TestDb, eventually};
use sea_orm::{EntityTrait, PaginatorTrait};
use serde_json::json;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn config() -> OutboxConfig {
    let (host, port) = RABBITMQ_STOMP.rsplit_once(':').expect("host:port");
    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = vec![(host.to_owned(), port.parse().expect("port"))];
    config.receipt_timeout = Duration::from_secs(3);
    config.maximum_backoff = Duration::from_millis(300);
    config
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|span| span.name == name).collect()
}

#[tokio::test]
async fn the_consumer_continues_the_trace_of_the_save_that_wrote_the_message() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-tests"));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
        .expect("the only subscriber of this test binary");

    let test = TestDb::new(Backend::Postgres).await;
    let db = &test.db;
    let settings = config();
    let DeclaredTopic {
        queue: _,
        destination,
        cleanup: _cleanup,
    } = declared_topic("trace", &settings).await;

    let traced = outbox::enqueue(db, &destination, &json!({ "traced": true }))
        .instrument(tracing::info_span!("checkout"))
        .await
        .unwrap();
    let untraced = outbox::enqueue(db, &destination, &json!({ "traced": false }))
        .await
        .unwrap();
    assert!(untraced.headers.get("traceparent").is_none());
    assert!(untraced.headers.get("tracestate").is_none());
    let traceparent = traced.headers["traceparent"]
        .as_str()
        .expect("a traceparent header")
        .to_owned();

    let report = Producer::builder(db.clone())
        .config(config())
        .build()
        .unwrap()
        .drain()
        .await
        .unwrap();
    assert_eq!(report.sent, 2);
    let consumer = Consumer::builder(db.clone())
        .config(config())
        .destination(&destination)
        .start(|payload: Payload| {
            async move {
                payload.save();
                Ok::<(), BoxError>(())
            }
            .instrument(tracing::info_span!("ship"))
        })
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "both messages processed",
        || async {
            Received::find().count(db).await.unwrap() == 2
                && named(&exporter.get_finished_spans().unwrap(), "outbox.message").len() == 2
        },
    )
    .await;
    consumer.stop().await.unwrap();
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let checkout = named(&spans, "checkout");
    assert_eq!(checkout.len(), 1);
    let checkout = checkout[0].span_context.clone();
    assert_eq!(
        traceparent,
        format!("00-{}-{}-01", checkout.trace_id(), checkout.span_id()),
        "the row names the writer's span, sampled"
    );

    let batches = named(&spans, "outbox.batch");
    assert!(!batches.is_empty(), "the relay's batch spans are recorded");
    let links: Vec<_> = batches
        .iter()
        .flat_map(|batch| batch.links.links.iter())
        .collect();
    assert_eq!(
        links.len(),
        1,
        "one link, for the one traced row: {links:?}"
    );
    assert_eq!(links[0].span_context.trace_id(), checkout.trace_id());
    assert_eq!(
        links[0].span_context.span_id(),
        checkout.span_id(),
        "the batch links to the writer's span"
    );
    assert!(links[0].span_context.is_remote());
    assert!(links[0].span_context.is_sampled());
    for batch in &batches {
        assert_ne!(
            batch.span_context.trace_id(),
            checkout.trace_id(),
            "the batch is a trace of its own, linked, not a child"
        );
    }

    let messages = named(&spans, "outbox.message");
    let continued: Vec<&&SpanData> = messages
        .iter()
        .filter(|span| span.span_context.trace_id() == checkout.trace_id())
        .collect();
    assert_eq!(continued.len(), 1, "{messages:?}");
    let message = continued[0];
    assert_eq!(message.parent_span_id, checkout.span_id());
    assert!(message.parent_span_is_remote);
    let other = messages
        .iter()
        .find(|span| span.span_context.trace_id() != checkout.trace_id())
        .expect("the untraced message's span");
    assert!(!other.parent_span_is_remote, "a trace of its own");

    let ship = named(&spans, "ship");
    let under_message: Vec<&&SpanData> = ship
        .iter()
        .filter(|span| span.parent_span_id == message.span_context.span_id())
        .collect();
    assert_eq!(
        under_message.len(),
        1,
        "the callback's span is the message span's child"
    );
    assert_eq!(
        under_message[0].span_context.trace_id(),
        checkout.trace_id(),
        "one trace from the save to the callback"
    );
    test.drop_database().await;
}
