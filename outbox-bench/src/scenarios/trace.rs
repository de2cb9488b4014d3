//! The cost of the `opentelemetry` feature, per message, on each path it touches: the
//! publishing save (its span's `traceparent` and `tracestate` written into the row's headers),
//! the relay (its batch span linked to each row's trace) and the consumer (each message span
//! continuing the row's trace).
//!
//! Each path runs the same workload twice: without an OpenTelemetry layer (the feature is
//! compiled in but has nothing to record, as for a service that does not trace), and with one,
//! recording every span through the SDK's batch processor into an exporter that discards them (no
//! collector: what is measured is the library's and the SDK's work, not a network).

use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use outbox::transport::{Outgoing, StompSettings, StompTransport, Transport};
use sea_orm::ActiveValue::Set;
use sea_orm::EntityTrait;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;
use tracing_subscriber::layer::SubscriberExt;

use super::{
    Reader, Settings, WorkerArgs, bench_message, delete_queues, published_item, rate, run_worker,
};
use crate::scratch::{BoxError, Scratch};
use crate::{figure, progress};

/// An exporter that drops what it is given.
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
        Ok(())
    }
}

/// A subscriber recording every span through OpenTelemetry (batch processor, spans discarded),
/// and its provider (kept alive while it records).
fn recording() -> (tracing::Dispatch, SdkTracerProvider) {
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(Discard)
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-bench"));
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
    (dispatch, provider)
}

/// For a worker process run with `--traced`: records every span of the process.
pub fn record_globally() -> Result<SdkTracerProvider, BoxError> {
    let (dispatch, provider) = recording();
    tracing::dispatcher::set_global_default(dispatch)?;
    Ok(provider)
}

/// A valid `traceparent` naming a fresh trace and parent span.
fn traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace}-{span}-01")
}

/// The three paths, each without and with a recording OpenTelemetry layer.
pub async fn trace(settings: &Settings, n: usize) -> Result<(), BoxError> {
    write(settings, n).await?;
    relay(settings, n).await?;
    consume(settings, n).await
}

/// `n` publishing saves of each kind, interleaved: outside any recorded span, and each inside
/// a span the OpenTelemetry layer records (whose context the row then carries).
async fn write(settings: &Settings, n: usize) -> Result<(), BoxError> {
    let scratch = Scratch::create(&settings.database_url, 5).await?;
    let (dispatch, _provider) = recording();
    let (mut off, mut on) = (Duration::ZERO, Duration::ZERO);
    for i in 0..n {
        let item = || published_item::ActiveModel {
            name: Set(format!("item {i}")),
            amount: Set(i as i64),
            ..Default::default()
        };
        let started = Instant::now();
        outbox::insert(&scratch.db, item()).await?;
        off += started.elapsed();

        let started = Instant::now();
        // The span is made inside the recording dispatcher's scope, as the save.
        async {
            outbox::insert(&scratch.db, item())
                .instrument(tracing::info_span!("bench.save"))
                .await
        }
        .with_subscriber(dispatch.clone())
        .await?;
        on += started.elapsed();
    }
    let traced = outbox::Published::find()
        .all(&scratch.db)
        .await?
        .iter()
        .filter(|row| row.headers.get("traceparent").is_some())
        .count();
    if traced != n {
        return Err(format!("{traced} of {n} traced saves carry a traceparent").into());
    }
    figure("trace.write_off_rate", rate(n, off), "rows/s");
    figure("trace.write_on_rate", rate(n, on), "rows/s");
    figure(
        "trace.write_overhead",
        100.0 * (on.as_secs_f64() / off.as_secs_f64() - 1.0),
        "%",
    );
    figure(
        "trace.write_cost",
        (on.as_secs_f64() - off.as_secs_f64()) * 1e6 / n as f64,
        "us/msg",
    );
    scratch.drop().await;
    Ok(())
}

/// How many times each variant of the relay and of the consumer runs.
const ROUNDS: usize = 2;

/// Whether run `round` is traced: untraced, traced, traced, untraced, ... (so that neither
/// variant always runs first, on a database or broker still busy with the previous run).
fn traced_round(round: usize) -> bool {
    matches!(round % 4, 1 | 2)
}

/// The mean of the rates and the cost per message of `on` over `off`, printed as `name`.
fn compare(name: &str, off: &[f64], on: &[f64]) {
    let mean = |rates: &[f64]| rates.iter().sum::<f64>() / rates.len() as f64;
    let (off, on) = (mean(off), mean(on));
    figure(&format!("trace.{name}_off_rate"), off, "msgs/s");
    figure(&format!("trace.{name}_on_rate"), on, "msgs/s");
    figure(
        &format!("trace.{name}_cost"),
        (1.0 / on - 1.0 / off) * 1e6,
        "us/msg",
    );
}

/// The relay draining `n` rows in a process of its own: rows without trace headers and no
/// layer, then rows each carrying a `traceparent` with a recording layer (a link per row).
async fn relay(settings: &Settings, n: usize) -> Result<(), BoxError> {
    let scratch = Scratch::create(&settings.database_url, 5).await?;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..2 * ROUNDS {
        let traced = traced_round(round);
        let mut reader = Reader::deferred(&settings.config).await?;
        let txn = sea_orm::TransactionTrait::begin(&scratch.db).await?;
        let messages = (0..n).map(|i| {
            let message = outbox::Message::from_json(
                reader.destination.clone(),
                serde_json::json!({"id": i, "customer": "ada", "total": 4200, "currency": "EUR"}),
            );
            if traced {
                message.header("traceparent", traceparent())
            } else {
                message
            }
        });
        outbox::enqueue_all(&txn, messages).await?;
        txn.commit().await?;
        progress(&format!("trace: relay, {n} rows, traced: {traced}"));
        let figures = run_worker(
            settings,
            "relay-worker",
            n,
            &WorkerArgs {
                database_url: Some(scratch.url.clone()),
                traced,
                ..WorkerArgs::default()
            },
        )
        .await?;
        let arrived = reader.drain(n, Duration::from_secs(60)).await;
        reader.close().await;
        if arrived != n {
            return Err(format!("{arrived} of {n} relayed messages arrived").into());
        }
        let rate = *figures.get("rate").ok_or("the relay printed no rate")?;
        if traced { &mut on } else { &mut off }.push(rate);
    }
    compare("relay", &off, &on);
    scratch.drop().await;
    Ok(())
}

/// The consumer (prefetch 200, 8 in flight, the README callback) on `n` queued messages, in a
/// process of its own: messages without trace headers and no layer, then messages each carrying
/// a `traceparent` with a recording layer (each message span continues its trace).
async fn consume(settings: &Settings, n: usize) -> Result<(), BoxError> {
    let scratch = Scratch::create(&settings.database_url, 2).await?;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..2 * ROUNDS {
        let traced = traced_round(round);
        let key = format!("outbox_bench_{}", uuid::Uuid::new_v4().simple());
        let destination = format!("/topic/{key}");
        let transport = StompTransport::new(StompSettings::from(&settings.config))?;
        outbox::consumer::declare(&transport, &settings.config, &destination, Some(&key)).await?;
        let messages: Vec<Outgoing> = (0..n)
            .map(|i| {
                let mut message = bench_message(&destination, i);
                if traced {
                    message.headers.push(("traceparent".into(), traceparent()));
                }
                message
            })
            .collect();
        for chunk in messages.chunks(settings.config.published_chunk_size as usize) {
            if let Some(err) = transport.send(chunk).await.failure().cloned() {
                return Err(err.into());
            }
        }
        transport.disconnect().await?;
        progress(&format!("trace: consumer, {n} messages, traced: {traced}"));
        let figures = run_worker(
            settings,
            "consume-worker",
            n,
            &WorkerArgs {
                database_url: Some(scratch.url.clone()),
                destination: Some(destination),
                queue: Some(key.clone()),
                prefetch: Some(200),
                in_flight: Some(8),
                traced,
                ..WorkerArgs::default()
            },
        )
        .await;
        delete_queues(&key);
        let rate = *figures?.get("rate").ok_or("the consumer printed no rate")?;
        if traced { &mut on } else { &mut off }.push(rate);
    }
    compare("consume", &off, &on);
    scratch.drop().await;
    Ok(())
}
