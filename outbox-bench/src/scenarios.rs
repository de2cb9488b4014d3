//! The scenarios. Each measures one thing the README promises, against the real database and
//! broker, and prints its figures.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::tables::published::Status;
use outbox::transport::{
    AckMode, Outgoing, StompSettings, StompTransport, Subscription, Transport,
};
use outbox::{OutboxConfig, Producer, Published};
use sea_orm::ActiveValue::Set;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    TransactionTrait,
};
use tokio::sync::mpsc;

use crate::scratch::{BoxError, Scratch};
use crate::{figure, progress};

mod cpu;
pub mod trace;

/// A plain entity: the baseline save.
pub mod item {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "bench_item")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub name: String,
        pub amount: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The same entity, published on every save.
pub mod published_item {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "bench_published_item")]
    #[outbox::publish(destination = "/topic/outbox_bench_write", fields(name, amount))]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub name: String,
        pub amount: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

/// The transport the relay and the limit use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportKind {
    /// STOMP (`OUTBOX_STOMP_*`).
    Stomp,
    /// AMQP 0-9-1 with publisher confirms (`OUTBOX_BROKER_URL`).
    Amqp,
}

impl TransportKind {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Stomp => "stomp",
            TransportKind::Amqp => "amqp",
        }
    }
}

/// The AMQP broker when `OUTBOX_BROKER_URL` is not set.
const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Where the benchmark runs.
pub struct Settings {
    database_url: String,
    /// The relay's and the limit's settings (AMQP with `--transport amqp`).
    config: OutboxConfig,
    /// The readers' settings: always STOMP.
    stomp: OutboxConfig,
    transport: TransportKind,
}

impl Settings {
    pub fn from_env(transport: TransportKind) -> Result<Settings, BoxError> {
        let database_url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let mut config = OutboxConfig::from_env()?;
        let mut stomp = config.clone();
        stomp.broker_url.clear();
        match transport {
            TransportKind::Stomp => config = stomp.clone(),
            TransportKind::Amqp if config.broker_url.is_empty() => {
                config.broker_url = vec![outbox::config::Secret::new(DEFAULT_AMQP_URL)];
                config.validate()?;
            }
            TransportKind::Amqp => {}
        }
        Ok(Settings {
            database_url,
            config,
            stomp,
            transport,
        })
    }
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

/// Peak resident memory of this process, in MB.
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// A fresh destination with a queue bound to it (deleted when the reader goes), and a task
/// reporting what arrives, by `dop-msg-id`, with its arrival time.
///
/// A live reader consumes as messages come. A deferred one lets them pile up in the queue (it
/// holds one unacknowledged message, so the broker delivers nothing more) until [`Reader::drain`]:
/// a throughput measurement then times the sender alone, not the sender racing a consumer for
/// this machine's two cores, and still checks that every message arrived.
struct Reader {
    destination: String,
    arrivals: mpsc::UnboundedReceiver<(String, Instant)>,
    transport: Arc<StompTransport>,
    start_draining: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Reader {
    async fn live(config: &OutboxConfig) -> Result<Reader, BoxError> {
        Reader::open(config, false).await
    }

    async fn deferred(config: &OutboxConfig) -> Result<Reader, BoxError> {
        Reader::open(config, true).await
    }

    async fn open(config: &OutboxConfig, deferred: bool) -> Result<Reader, BoxError> {
        let key = format!("outbox_bench_{}", uuid::Uuid::new_v4().simple());
        let transport = Arc::new(StompTransport::new(StompSettings::from(config))?);
        // Not durable: RabbitMQ deletes the queue when this subscription ends.
        let mut headers = vec![("x-queue-name".to_owned(), key.clone())];
        if deferred {
            headers.push(("prefetch-count".into(), "1".into()));
        }
        let mut deliveries = transport
            .subscribe(Subscription {
                destination: format!("/topic/{key}"),
                id: "bench-reader".into(),
                ack: if deferred {
                    AckMode::ClientIndividual
                } else {
                    AckMode::Auto
                },
                headers,
            })
            .await?;
        let (tx, arrivals) = mpsc::unbounded_channel();
        let (start_draining, drain) = tokio::sync::oneshot::channel::<()>();
        let acker = transport.clone();
        tokio::spawn(async move {
            if deferred && drain.await.is_err() {
                return;
            }
            while let Some(delivery) = deliveries.recv().await {
                if deferred && acker.ack(&delivery).await.is_err() {
                    break;
                }
                let id = delivery.header("dop-msg-id").unwrap_or_default().to_owned();
                if tx.send((id, Instant::now())).is_err() {
                    break;
                }
            }
        });
        Ok(Reader {
            destination: format!("/topic/{key}"),
            arrivals,
            transport,
            start_draining: deferred.then_some(start_draining),
        })
    }

    /// Consumes what piled up, until `count` distinct messages arrived; returns how many did.
    async fn drain(&mut self, count: usize, limit: Duration) -> usize {
        if let Some(start) = self.start_draining.take() {
            let _ = start.send(());
        }
        let mut seen = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + limit;
        while seen.len() < count {
            match tokio::time::timeout_at(deadline, self.arrivals.recv()).await {
                Ok(Some((id, _))) => {
                    seen.insert(id);
                }
                _ => break,
            }
        }
        seen.len()
    }

    /// Reads until `count` distinct messages arrived (within `limit`); the rate from the first
    /// arrival to the last, as the sender put them on the wire.
    async fn arrival_rate(&mut self, count: usize, limit: Duration) -> Result<f64, BoxError> {
        if let Some(start) = self.start_draining.take() {
            let _ = start.send(());
        }
        let mut seen = std::collections::HashSet::new();
        let mut span: Option<(Instant, Instant)> = None;
        let deadline = tokio::time::Instant::now() + limit;
        while seen.len() < count {
            match tokio::time::timeout_at(deadline, self.arrivals.recv()).await {
                Ok(Some((id, at))) => {
                    seen.insert(id);
                    span = Some((span.map_or(at, |(first, _)| first), at));
                }
                _ => return Err(format!("{} of {count} messages arrived", seen.len()).into()),
            }
        }
        let (first, last) = span.ok_or("no message arrived")?;
        Ok(rate(count.saturating_sub(1), last - first))
    }

    async fn close(self) {
        let _ = self.transport.unsubscribe("bench-reader").await;
        let _ = self.transport.disconnect().await;
    }
}

/// A message like the relay's: the same headers and body size.
fn bench_message(destination: &str, i: usize) -> Outgoing {
    Outgoing {
        destination: destination.to_owned(),
        headers: vec![
            ("dop-msg-id".into(), uuid::Uuid::new_v4().to_string()),
            ("dop-msg-destination".into(), destination.to_owned()),
            ("dop-msg-type".into(), "Published".into()),
            (
                "dop-msg-sent-time".into(),
                "2026-11-26T18:03:13.484Z".into(),
            ),
            (
                "dop-correlation-id".into(),
                uuid::Uuid::new_v4().to_string(),
            ),
            ("persistent".into(), "true".into()),
            ("content-type".into(), "application/json".into()),
        ],
        body: serde_json::json!({"id": i, "customer": "ada", "total": 4200, "currency": "EUR"})
            .to_string()
            .into_bytes(),
    }
}

async fn enqueue(scratch: &Scratch, destination: &str, n: usize) -> Result<(), BoxError> {
    let txn = scratch.db.begin().await?;
    let messages = (0..n).map(|i| {
        outbox::Message::from_json(
            destination,
            serde_json::json!({"id": i, "customer": "ada", "total": 4200, "currency": "EUR"}),
        )
    });
    outbox::enqueue_all(&txn, messages).await?;
    txn.commit().await?;
    Ok(())
}

/// `n` rows over `keys` ordering keys, dealt round robin (`None`: no keys).
async fn enqueue_keyed(
    scratch: &Scratch,
    destination: &str,
    n: usize,
    keys: Option<usize>,
) -> Result<(), BoxError> {
    let txn = scratch.db.begin().await?;
    let messages = (0..n).map(|i| {
        let message = outbox::Message::from_json(
            destination,
            serde_json::json!({"id": i, "customer": "ada", "total": 4200, "currency": "EUR"}),
        );
        match keys {
            Some(keys) => message.key(format!("key-{}", i % keys)),
            None => message,
        }
    });
    outbox::enqueue_all(&txn, messages).await?;
    txn.commit().await?;
    Ok(())
}

/// Relay throughput with ordering keys: `n` rows over 1,000 keys, one relay in this process with
/// the default settings, beside the same without keys, alternated over 3 runs each; prints the
/// medians.
pub async fn relay_keyed(settings: &Settings, n: usize) -> Result<(), BoxError> {
    const KEYS: usize = 1_000;
    let scratch = Scratch::create(&settings.database_url, 5).await?;
    let mut rates: HashMap<bool, Vec<f64>> = HashMap::new();
    for run in 0..6 {
        let keyed = run % 2 == 1;
        let mut reader = Reader::deferred(&settings.config).await?;
        enqueue_keyed(&scratch, &reader.destination, n, keyed.then_some(KEYS)).await?;
        progress(&format!(
            "relay-keyed: {n} rows pending, {}",
            if keyed { "1,000 keys" } else { "no keys" }
        ));
        let already = sent_count(&scratch).await?;
        let started = Instant::now();
        let relay = Producer::builder(scratch.connect(2).await?)
            .config(settings.config.clone())
            .start()?;
        while sent_count(&scratch).await? < already + n as u64 {
            if started.elapsed() > Duration::from_secs(300) {
                return Err("the relay did not finish within 300 s".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = started.elapsed();
        relay.stop().await?;
        let arrived = reader.drain(n, Duration::from_secs(120)).await;
        if arrived != n {
            return Err(format!("{arrived} of {n} relayed messages arrived").into());
        }
        reader.close().await;
        rates.entry(keyed).or_default().push(rate(n, elapsed));
    }
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let unkeyed = median(rates.remove(&false).unwrap_or_default());
    let keyed = median(rates.remove(&true).unwrap_or_default());
    figure("relay_keyed.unkeyed_rate", unkeyed, "msgs/s");
    figure("relay_keyed.keyed_rate", keyed, "msgs/s");
    figure("relay_keyed.keyed_of_unkeyed", keyed / unkeyed * 100.0, "%");

    // One hot key: a message per claim-send-mark round.
    let hot = n.min(2_000);
    let mut reader = Reader::deferred(&settings.config).await?;
    enqueue_keyed(&scratch, &reader.destination, hot, Some(1)).await?;
    progress(&format!("relay-keyed: {hot} rows pending, one key"));
    let already = sent_count(&scratch).await?;
    let started = Instant::now();
    let relay = Producer::builder(scratch.connect(2).await?)
        .config(settings.config.clone())
        .start()?;
    while sent_count(&scratch).await? < already + hot as u64 {
        if started.elapsed() > Duration::from_secs(300) {
            return Err("the relay did not finish one key within 300 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    relay.stop().await?;
    let arrived = reader.drain(hot, Duration::from_secs(120)).await;
    if arrived != hot {
        return Err(format!("{arrived} of {hot} messages of one key arrived").into());
    }
    reader.close().await;
    figure("relay_keyed.one_key_rate", rate(hot, elapsed), "msgs/s");
    scratch.drop().await;
    Ok(())
}

async fn sent_count(scratch: &Scratch) -> Result<u64, BoxError> {
    Ok(Published::find()
        .filter(outbox::tables::published::Column::Status.eq(Status::Succeeded))
        .count(&scratch.db)
        .await?)
}

/// Per-save cost of publishing: `n` saves of each entity, each in its own transaction,
/// interleaved; on PostgreSQL again with `synchronous_commit` off, where the CPU cost shows.
pub async fn write(settings: &Settings, n: usize) -> Result<(), BoxError> {
    let scratch = Scratch::create(&settings.database_url, 5).await?;
    let (plain, published) = interleaved_saves(&scratch.db, n).await?;
    figure("write.plain_rate", rate(n, plain), "rows/s");
    figure("write.outbox_rate", rate(n, published), "rows/s");
    figure(
        "write.ratio",
        published.as_secs_f64() / plain.as_secs_f64(),
        "x",
    );
    if scratch.db.get_database_backend() == sea_orm::DbBackend::Postgres {
        let separator = if scratch.url.contains('?') { '&' } else { '?' };
        let url = format!(
            "{}{separator}options=-c%20synchronous_commit%3Doff",
            scratch.url
        );
        let db = sea_orm::Database::connect(url).await?;
        let (plain, published) = interleaved_saves(&db, n).await?;
        figure("write.plain_rate_async", rate(n, plain), "rows/s");
        figure("write.outbox_rate_async", rate(n, published), "rows/s");
        figure(
            "write.ratio_async",
            published.as_secs_f64() / plain.as_secs_f64(),
            "x",
        );
        db.close().await?;
    }
    scratch.drop().await;
    Ok(())
}

/// `n` plain saves and `n` publishing saves, interleaved, each in its own transaction: the time
/// each kind took.
async fn interleaved_saves(
    db: &sea_orm::DatabaseConnection,
    n: usize,
) -> Result<(Duration, Duration), BoxError> {
    let (mut plain, mut published) = (Duration::ZERO, Duration::ZERO);
    for i in 0..n {
        let started = Instant::now();
        let txn = db.begin().await?;
        item::ActiveModel {
            name: Set(format!("item {i}")),
            amount: Set(i as i64),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
        txn.commit().await?;
        plain += started.elapsed();

        let started = Instant::now();
        outbox::insert(
            db,
            published_item::ActiveModel {
                name: Set(format!("item {i}")),
                amount: Set(i as i64),
                ..Default::default()
            },
        )
        .await?;
        published += started.elapsed();
    }
    Ok((plain, published))
}

/// Relay throughput: `n` pending rows to `n` receipted messages, with one relay, then two.
pub async fn relay(settings: &Settings, n: usize) -> Result<(), BoxError> {
    let scratch = Scratch::create(&settings.database_url, 5).await?;

    let mut reader = Reader::deferred(&settings.stomp).await?;
    enqueue(&scratch, &reader.destination, n).await?;
    progress(&format!(
        "relay: {n} rows pending, one relay in a process of its own"
    ));
    let figures = run_worker(
        settings,
        "relay-worker",
        n,
        &WorkerArgs {
            database_url: Some(scratch.url.clone()),
            ..WorkerArgs::default()
        },
    )
    .await?;
    let arrived = reader.drain(n, Duration::from_secs(60)).await;
    if arrived != n {
        return Err(format!("{arrived} of {n} relayed messages arrived").into());
    }
    print_as(&figures, "rate", "relay.rate", "msgs/s")?;
    print_as(&figures, "rss_mb", "relay.rss_mb", "MB")?;
    print_cpu_of_worker(&figures, "relay", n);
    figure(
        "relay.batch",
        f64::from(settings.config.published_chunk_size),
        "rows",
    );
    reader.close().await;

    let mut reader = Reader::deferred(&settings.stomp).await?;
    enqueue(&scratch, &reader.destination, n).await?;
    progress(&format!("relay: {n} rows pending, two relays"));
    let already = sent_count(&scratch).await?;
    let started = Instant::now();
    let relays = [
        Producer::builder(scratch.connect(2).await?)
            .config(settings.config.clone())
            .start()?,
        Producer::builder(scratch.connect(2).await?)
            .config(settings.config.clone())
            .start()?,
    ];
    while sent_count(&scratch).await? < already + n as u64 {
        if started.elapsed() > Duration::from_secs(120) {
            return Err("two relays did not finish within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    for relay in relays {
        relay.stop().await?;
    }
    let arrived = reader.drain(n, Duration::from_secs(120)).await;
    if arrived != n {
        return Err(format!("{arrived} of {n} arrived with two relays").into());
    }
    figure("relay.rate_2", rate(n, elapsed), "msgs/s");
    reader.close().await;
    scratch.drop().await;
    if let Some(rate) = relay_python(settings, n).await? {
        figure("relay.python_rate", rate, "msgs/s");
    }
    Ok(())
}

/// Latency from the commit of one entity to its arrival at a subscriber, with an idle relay in
/// another pool: on PostgreSQL the relay learns of the commit through NOTIFY, as a relay in
/// another process would.
pub async fn latency(settings: &Settings, samples: usize) -> Result<(), BoxError> {
    let scratch = Scratch::create(&settings.database_url, 5).await?;
    let mut reader = Reader::live(&settings.stomp).await?;
    let relay = Producer::builder(scratch.connect(2).await?)
        .config(settings.config.clone())
        .start()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    progress(&format!("latency: {samples} samples"));
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        // A random moment: the relay is idle, wherever its polling cycle is.
        let pause = (uuid::Uuid::new_v4().as_u128() % 20) as u64 + 1;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let txn = scratch.db.begin().await?;
        let row =
            outbox::enqueue(&txn, &reader.destination, &serde_json::json!({ "n": i })).await?;
        txn.commit().await?;
        let at = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, reader.arrivals.recv()).await {
                Ok(Some((id, arrived))) => {
                    if id == row.id.to_string() {
                        latencies.push(arrived.saturating_duration_since(at));
                        break;
                    }
                }
                _ => return Err(format!("sample {i} did not arrive within 30 s").into()),
            }
        }
    }
    relay.stop().await?;
    reader.close().await;
    latencies.sort();
    let percentile = |p: f64| {
        let index = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[index].as_secs_f64() * 1000.0
    };
    figure("latency.p50", percentile(0.50), "ms");
    figure("latency.p90", percentile(0.90), "ms");
    figure("latency.p99", percentile(0.99), "ms");
    scratch.drop().await;
    Ok(())
}

/// The broker's own limit: the bare transport sending `n` messages like the relay's, with
/// receipts, in batches of the relay's size, no database.
pub async fn limit(settings: &Settings, n: usize) -> Result<(), BoxError> {
    let mut reader = Reader::deferred(&settings.stomp).await?;
    let transport = outbox::transport::from_config(&settings.config)?;
    transport.connect().await?;
    let batch = settings.config.published_chunk_size as usize;
    let messages: Vec<Outgoing> =
        (0..n)
            .map(|i| {
                Outgoing {
            destination: reader.destination.clone(),
            headers: vec![
                ("dop-msg-id".into(), uuid::Uuid::new_v4().to_string()),
                ("dop-msg-destination".into(), reader.destination.clone()),
                ("dop-msg-type".into(), "Published".into()),
                ("dop-msg-sent-time".into(), "2026-11-26T18:03:13.484Z".into()),
                ("dop-correlation-id".into(), uuid::Uuid::new_v4().to_string()),
                ("persistent".into(), "true".into()),
                ("content-type".into(), "application/json".into()),
            ],
            body: serde_json::json!({"id": i, "customer": "ada", "total": 4200, "currency": "EUR"})
                .to_string()
                .into_bytes(),
        }
            })
            .collect();
    progress(&format!("limit: {n} messages, batches of {batch}"));
    let meter = CpuMeter::start();
    let started = Instant::now();
    for chunk in messages.chunks(batch) {
        let report = transport.send(chunk).await;
        if let Some(err) = report.failure().cloned() {
            return Err(err.into());
        }
    }
    let elapsed = started.elapsed();
    meter.print("limit", n, elapsed);
    let arrived = reader.drain(n, Duration::from_secs(60)).await;
    if arrived != n {
        return Err(format!("{arrived} of {n} arrived").into());
    }
    figure("limit.rate", rate(n, elapsed), "msgs/s");
    transport.disconnect().await?;
    reader.close().await;
    if settings.transport == TransportKind::Amqp {
        bare_amqp(settings, n).await?;
    }
    Ok(())
}

/// The bare AMQP publisher: lapin alone, the same messages as the relay's (the STOMP plugin's
/// properties and headers), `mandatory` and persistent, with publisher confirms pipelined
/// (up to [`outbox::transport::CONFIRM_WINDOW`] unconfirmed), no database and no outbox code.
async fn bare_amqp(settings: &Settings, n: usize) -> Result<(), BoxError> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};

    let mut reader = Reader::deferred(&settings.stomp).await?;
    let key = reader
        .destination
        .strip_prefix("/topic/")
        .ok_or("a topic reader")?
        .to_owned();
    let url = settings
        .config
        .broker_url
        .first()
        .ok_or("no OUTBOX_BROKER_URL")?;
    let connection =
        lapin::Connection::connect(url.expose(), lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let window = outbox::transport::CONFIRM_WINDOW;
    progress(&format!(
        "limit: {n} messages, bare lapin publisher, {window} confirms in flight"
    ));
    let meter = CpuMeter::start();
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::with_capacity(window);
    for i in 0..n {
        let message = bench_message(&reader.destination, i);
        let mut table = FieldTable::default();
        for (name, value) in &message.headers {
            if name != "persistent" && name != "content-type" {
                table.insert(
                    name.as_str().into(),
                    AMQPValue::LongString(LongString::from(value.as_bytes())),
                );
            }
        }
        let properties = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_headers(table);
        if pending.len() == window {
            let confirm: lapin::PublisherConfirm =
                pending.pop_front().ok_or("a pending confirm")?;
            if !confirm.await?.is_ack() {
                return Err("a bare publish was not confirmed".into());
            }
        }
        let confirm = channel
            .basic_publish(
                "amq.topic".into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &message.body,
                properties,
            )
            .await?;
        pending.push_back(confirm);
    }
    for confirm in pending {
        if !confirm.await?.is_ack() {
            return Err("a bare publish was not confirmed".into());
        }
    }
    let elapsed = started.elapsed();
    meter.print("limit.bare", n, elapsed);
    let arrived = reader.drain(n, Duration::from_secs(60)).await;
    if arrived != n {
        return Err(format!("{arrived} of {n} bare publishes arrived").into());
    }
    figure("limit.bare_rate", rate(n, elapsed), "msgs/s");
    connection.close(200, "done".into()).await?;
    reader.close().await;
    Ok(())
}

/// Arguments of the worker processes.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct WorkerArgs {
    /// The scratch database.
    #[arg(long, hide = true)]
    database_url: Option<String>,
    /// The destination to consume.
    #[arg(long, hide = true)]
    destination: Option<String>,
    /// The queue to consume.
    #[arg(long, hide = true)]
    queue: Option<String>,
    /// Unacknowledged messages the broker may push.
    #[arg(long, hide = true)]
    prefetch: Option<u32>,
    /// Callbacks at once.
    #[arg(long, hide = true)]
    in_flight: Option<usize>,
    /// Records every span through OpenTelemetry (the `trace` scenario).
    #[arg(long, hide = true)]
    traced: bool,
    /// Messages per consumer transaction.
    #[arg(long, hide = true)]
    group_size: Option<u32>,
}

/// Runs this program as a worker process and returns its figures (`name value` pairs).
async fn run_worker(
    settings: &Settings,
    scenario: &str,
    n: usize,
    args: &WorkerArgs,
) -> Result<HashMap<String, f64>, BoxError> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command.args([scenario, "--n", &n.to_string()]);
    command.args(["--transport", settings.transport.name()]);
    let options = [
        ("--database-url", args.database_url.clone()),
        ("--destination", args.destination.clone()),
        ("--queue", args.queue.clone()),
        ("--prefetch", args.prefetch.map(|p| p.to_string())),
        ("--in-flight", args.in_flight.map(|k| k.to_string())),
        ("--group-size", args.group_size.map(|g| g.to_string())),
    ];
    for (flag, value) in options {
        if let Some(value) = value {
            command.args([flag, value.as_str()]);
        }
    }
    if args.traced {
        command.arg("--traced");
    }
    let output = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    if !output.status.success() {
        return Err(format!("the {scenario} process failed ({})", output.status).into());
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            Some((parts.next()?.to_owned(), parts.next()?.parse().ok()?))
        })
        .collect())
}

fn print_as(
    figures: &HashMap<String, f64>,
    key: &str,
    name: &str,
    unit: &str,
) -> Result<(), BoxError> {
    let value = figures
        .get(key)
        .ok_or_else(|| format!("the worker printed no {key}"))?;
    figure(name, *value, unit);
    Ok(())
}

/// The relay alone: drains the scratch database, prints its rate and its peak memory.
pub async fn relay_worker(
    settings: &Settings,
    args: &WorkerArgs,
    n: usize,
) -> Result<(), BoxError> {
    let url = args
        .database_url
        .as_deref()
        .ok_or("--database-url is required")?;
    let _recording = args.traced.then(trace::record_globally).transpose()?;
    let db = sea_orm::Database::connect(url).await?;
    let producer = Producer::builder(db)
        .config(settings.config.clone())
        .build()?;
    let meter = CpuMeter::start();
    let started = Instant::now();
    let report = producer.drain().await?;
    let elapsed = started.elapsed();
    meter.report_to_parent(elapsed);
    if report.sent != n {
        return Err(format!("relayed {} of {n}", report.sent).into());
    }
    println!("rate {}", rate(n, elapsed));
    println!("rss_mb {}", peak_rss_mb());
    Ok(())
}

/// The CPU of the broker, the database server and this process from its start (see
/// [`cpu`]).
struct CpuMeter {
    servers: cpu::ServerCpu,
    own: f64,
}

impl CpuMeter {
    fn start() -> CpuMeter {
        CpuMeter {
            servers: cpu::ServerCpu::now(),
            own: cpu::own(),
        }
    }

    /// Prints the CPU per message and the cores busy, as `<prefix>.cpu_*` figures.
    fn print(&self, prefix: &str, messages: usize, elapsed: Duration) {
        let servers = cpu::ServerCpu::now().since(self.servers);
        cpu::print(prefix, servers, cpu::own() - self.own, messages, elapsed);
    }

    /// For a worker process: prints the seconds (`cpu_broker`, `cpu_database`, `cpu_own`,
    /// `elapsed`) for the parent to print with [`print_cpu_of_worker`].
    fn report_to_parent(&self, elapsed: Duration) {
        let servers = cpu::ServerCpu::now().since(self.servers);
        println!("cpu_broker {}", servers.broker);
        println!("cpu_database {}", servers.database);
        println!("cpu_own {}", cpu::own() - self.own);
        println!("elapsed {}", elapsed.as_secs_f64());
    }
}

/// Prints a worker's CPU figures (see [`CpuMeter::report_to_parent`]) under `prefix`.
fn print_cpu_of_worker(figures: &HashMap<String, f64>, prefix: &str, messages: usize) {
    let get = |key: &str| figures.get(key).copied().unwrap_or(0.0);
    cpu::print(
        prefix,
        cpu::ServerCpu {
            broker: get("cpu_broker"),
            database: get("cpu_database"),
        },
        get("cpu_own"),
        messages,
        Duration::from_secs_f64(get("elapsed").max(1e-9)),
    );
}

/// The consumer alone: consumes until `n` inbox rows exist, with the README's callback (a
/// business row and the inbox row in one transaction); prints its rate and its peak memory.
pub async fn consume_worker(
    settings: &Settings,
    args: &WorkerArgs,
    n: usize,
) -> Result<(), BoxError> {
    let url = args
        .database_url
        .as_deref()
        .ok_or("--database-url is required")?;
    let destination = args
        .destination
        .clone()
        .ok_or("--destination is required")?;
    let queue = args.queue.clone().ok_or("--queue is required")?;
    let _recording = args.traced.then(trace::record_globally).transpose()?;
    let in_flight = args.in_flight.unwrap_or(1);
    let groups = GroupSizes::install();
    let mut options = sea_orm::ConnectOptions::new(url.to_owned());
    options
        .max_connections(in_flight as u32 + 2)
        .sqlx_logging(false);
    let db = sea_orm::Database::connect(options).await?;
    let mut builder = outbox::Consumer::builder(db.clone())
        .destination(destination)
        .queue(queue)
        .in_flight(in_flight)
        .config(settings.config.clone());
    if let Some(prefetch) = args.prefetch {
        builder = builder.prefetch(prefetch);
    }
    if let Some(size) = args.group_size {
        builder = builder.group_size(size);
    }
    let baseline = outbox::Received::find().count(&db).await? as usize;
    let meter = CpuMeter::start();
    let started = Instant::now();
    let consumer = builder.start(|payload: outbox::Payload| async move {
        let n = payload.body()["id"].as_i64().unwrap_or(0);
        item::ActiveModel {
            name: Set(format!("order {n}")),
            amount: Set(n),
            ..Default::default()
        }
        .insert(payload.db())
        .await?;
        payload.save();
        Ok::<_, sea_orm::DbErr>(())
    })?;
    loop {
        let done = outbox::Received::find().count(&db).await? as usize - baseline;
        if done >= n {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(format!("only {done} of {n} consumed in 600 s").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    meter.report_to_parent(elapsed);
    consumer.stop().await?;
    println!("rate {}", rate(n, elapsed));
    println!("rss_mb {}", peak_rss_mb());
    println!("group_size {}", groups.mean());
    Ok(())
}

/// The bare ceiling of the consumer: the same messages consumed and acknowledged one by one
/// (`client-individual`, the consumer's mode) with the same prefetch, no database work.
async fn consume_bare(settings: &Settings, n: usize, prefetch: u32) -> Result<f64, BoxError> {
    let (destination, queue) = fill_queue(settings, n).await?;
    let transport = StompTransport::new(StompSettings::from(&settings.config))?;
    transport.connect().await?;
    let mut headers: Vec<(String, String)> = settings
        .config
        .stomp_queue_headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .filter(|(k, _)| k != "prefetch-count")
        .collect();
    headers.push(("prefetch-count".into(), prefetch.to_string()));
    headers.push(("x-queue-name".into(), queue.clone()));
    headers.push(("x-dead-letter-exchange".into(), String::new()));
    headers.push(("x-dead-letter-routing-key".into(), format!("DLQ.{queue}")));
    headers.push(("exclusive".into(), "False".into()));
    let started = Instant::now();
    let mut deliveries = transport
        .subscribe(Subscription {
            destination,
            id: "bare".into(),
            ack: AckMode::ClientIndividual,
            headers,
        })
        .await?;
    let mut done = 0;
    while done < n {
        match tokio::time::timeout(Duration::from_secs(60), deliveries.recv()).await {
            Ok(Some(delivery)) => {
                transport.ack(&delivery).await?;
                done += 1;
            }
            _ => break,
        }
    }
    let elapsed = started.elapsed();
    let _ = transport.unsubscribe("bare").await;
    transport.disconnect().await?;
    delete_queues(&queue);
    if done != n {
        return Err(format!("the bare consumer received {done} of {n}").into());
    }
    Ok(rate(n, elapsed))
}

/// A metrics recorder that keeps the mean of the consumer's group sizes.
#[derive(Default)]
struct GroupSizes {
    sum: std::sync::atomic::AtomicU64,
    count: std::sync::atomic::AtomicU64,
}

impl GroupSizes {
    fn install() -> Arc<GroupSizes> {
        let sizes = Arc::new(GroupSizes::default());
        let _ = metrics::set_global_recorder(Recording(sizes.clone()));
        sizes
    }

    /// The mean group size (1 when no group was recorded: a transaction per message).
    fn mean(&self) -> f64 {
        use std::sync::atomic::Ordering::Relaxed;
        match self.count.load(Relaxed) {
            0 => 1.0,
            count => self.sum.load(Relaxed) as f64 / count as f64,
        }
    }
}

struct Recording(Arc<GroupSizes>);

impl metrics::HistogramFn for GroupSizes {
    fn record(&self, value: f64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.sum.fetch_add(value as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }
}

impl metrics::Recorder for Recording {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        if key.name() == outbox::metrics::CONSUMER_GROUP_SIZE {
            metrics::Histogram::from_arc(self.0.clone())
        } else {
            metrics::Histogram::noop()
        }
    }
}

/// Queues `n` messages on a fresh destination whose consumer queues are declared first.
async fn fill_queue(settings: &Settings, n: usize) -> Result<(String, String), BoxError> {
    let key = format!("outbox_bench_{}", uuid::Uuid::new_v4().simple());
    let destination = format!("/topic/{key}");
    let transport = StompTransport::new(StompSettings::from(&settings.config))?;
    outbox::consumer::declare(&transport, &settings.config, &destination, Some(&key)).await?;
    let messages: Vec<Outgoing> = (0..n).map(|i| bench_message(&destination, i)).collect();
    for chunk in messages.chunks(settings.config.published_chunk_size as usize) {
        if let Some(err) = transport.send(chunk).await.failure().cloned() {
            return Err(err.into());
        }
    }
    transport.disconnect().await?;
    Ok((destination, key))
}

/// Deletes the benchmark's durable queues (RabbitMQ's STOMP cannot: this asks `rabbitmqctl`).
fn delete_queues(queue: &str) {
    for name in [queue.to_owned(), format!("DLQ.{queue}")] {
        let deleted = std::process::Command::new("rabbitmqctl")
            .args(["--quiet", "delete_queue", &name])
            .output()
            .map(|out| out.status.success())
            .unwrap_or(false);
        if !deleted {
            progress(&format!("could not delete queue {name}: delete it by hand"));
        }
    }
}

/// Consumer throughput: `n` queued messages consumed with the README callback until `n` inbox
/// rows exist: with prefetch 200 and 8 in flight (groups of up to 16, then
/// a transaction per message), then at the defaults; and the bare ceiling, the same messages
/// consumed and acknowledged with no database work.
pub async fn consume(settings: &Settings, n: usize) -> Result<(), BoxError> {
    const PREFETCH: u32 = 200;
    const IN_FLIGHT: usize = 8;
    let scratch = Scratch::create(&settings.database_url, 2).await?;
    // (figure suffix, prefetch, in flight, group size, messages)
    type Run = (&'static str, Option<u32>, Option<usize>, Option<u32>, usize);
    let runs: [Run; 3] = [
        ("", Some(PREFETCH), Some(IN_FLIGHT), Some(16), n),
        ("_group1", Some(PREFETCH), Some(IN_FLIGHT), Some(1), n),
        // At the defaults: fewer messages, it is slower by design.
        ("_default", None, None, None, n.clamp(1, 2000)),
    ];
    for (suffix, prefetch, in_flight, group_size, m) in runs {
        let (destination, queue) = fill_queue(settings, m).await?;
        progress(&format!(
            "consume{suffix}: {m} messages, prefetch {prefetch:?}, in flight {in_flight:?}, group size {group_size:?}"
        ));
        let figures = run_worker(
            settings,
            "consume-worker",
            m,
            &WorkerArgs {
                database_url: Some(scratch.url.clone()),
                destination: Some(destination),
                queue: Some(queue.clone()),
                prefetch,
                in_flight,
                group_size,
                ..WorkerArgs::default()
            },
        )
        .await;
        delete_queues(&queue);
        let figures = figures?;
        print_as(&figures, "rate", &format!("consume.rate{suffix}"), "msgs/s")?;
        if suffix.is_empty() {
            print_cpu_of_worker(&figures, "consume", m);
        }
        print_as(
            &figures,
            "group_size",
            &format!("consume.group_size{suffix}"),
            "messages",
        )?;
        if suffix.is_empty() {
            figure("consume.prefetch", f64::from(PREFETCH), "messages");
            figure("consume.in_flight", IN_FLIGHT as f64, "groups");
            print_as(&figures, "rss_mb", "consume.rss_mb", "MB")?;
        }
    }
    progress(&format!(
        "consume: the bare ceiling, {n} messages, prefetch {PREFETCH}"
    ));
    figure(
        "consume.bare_rate",
        consume_bare(settings, n, PREFETCH).await?,
        "msgs/s",
    );
    scratch.drop().await;
    if let Some(rate) = consume_python(settings, n.clamp(1, 3000)).await? {
        figure("consume.python_rate", rate, "msgs/s");
    }
    Ok(())
}

/// The Python of `OUTBOX_TEST_BENCH_PYTHON` (django-outbox-pattern 3.2.1 and the packages of
/// `interop/requirements.txt`) when set and the database is PostgreSQL, the only one the
/// interop project runs on; `None` (with a note on stderr) otherwise.
fn bench_python(settings: &Settings, what: &str) -> Option<String> {
    let python = std::env::var("OUTBOX_TEST_BENCH_PYTHON").ok()?;
    if !settings.database_url.starts_with("postgres") {
        progress(&format!(
            "{what}: the Python library runs on PostgreSQL only; skipped"
        ));
        return None;
    }
    Some(python)
}

/// A `manage.py` command of the interop project on the scratch database `database`, with
/// persistent database connections, its output discarded.
fn django(python: &str, database: &str, args: &[&str]) -> tokio::process::Command {
    let project = concat!(env!("CARGO_MANIFEST_DIR"), "/../interop");
    let mut command = tokio::process::Command::new(python);
    command
        .arg("manage.py")
        .args(args)
        .current_dir(project)
        .env("INTEROP_DB_NAME", database)
        .env("INTEROP_CONN_MAX_AGE", "600")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

/// A scratch database with the Django project's tables (`manage.py migrate`).
async fn django_scratch(settings: &Settings, python: &str) -> Result<Scratch, BoxError> {
    let scratch = Scratch::create_bare(&settings.database_url, 2).await?;
    let migrated = django(python, scratch.name(), &["migrate", "-v0"])
        .status()
        .await?;
    if !migrated.success() {
        scratch.drop().await;
        return Err(format!("manage.py migrate failed ({migrated})").into());
    }
    Ok(scratch)
}

/// Counts rows with `sql` (a `SELECT count(*)`) every 20 ms until it reaches `n`; the rate from
/// the first counted row to the `n`th (a Python process's start is not its rate), within 600 s.
/// For a process that commits as it goes (the Python consumer: a transaction per message).
async fn rate_of_count(scratch: &Scratch, sql: &str, n: usize) -> Result<f64, BoxError> {
    let started = Instant::now();
    let mut first: Option<(Instant, usize)> = None;
    loop {
        let row = scratch
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                sql,
            ))
            .await?
            .ok_or("no count")?;
        let done = row.try_get_by_index::<i64>(0)? as usize;
        if first.is_none() && done > 0 {
            first = Some((Instant::now(), done));
        }
        if let Some((since, already)) = first
            && done >= n
        {
            return Ok(rate(n - already, since.elapsed()));
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(format!("the Python process did {done} of {n} in 600 s").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Python relay (`manage.py publish`, django-outbox-pattern 3.2.1) on `n` rows written as
/// django-outbox-pattern writes them, to a topic a queue is bound to, read as they arrive; its
/// rate from the first arrival to the `n`th. It sends without receipts, and marks its rows sent
/// when its one transaction commits, after the last SEND: the rate is that of its SENDs.
async fn relay_python(settings: &Settings, n: usize) -> Result<Option<f64>, BoxError> {
    let Some(python) = bench_python(settings, "relay") else {
        return Ok(None);
    };
    let scratch = django_scratch(settings, &python).await?;
    let mut reader = Reader::live(&settings.stomp).await?;
    // The headers the Python library generates for a row (its `generate_headers`).
    let insert = format!(
        "INSERT INTO published (id, version, destination, body, added, expires_at, retry, status, headers) \
         SELECT id, 'v1', '{destination}', \
                jsonb_build_object('id', g, 'customer', 'ada', 'total', 4200, 'currency', 'EUR'), \
                now(), now() + interval '1 day', 0, 1, \
                jsonb_build_object('dop-msg-id', id::text, 'dop-msg-destination', '{destination}', \
                    'dop-msg-type', 'Published', 'dop-msg-sent-time', '2026-11-26T18:03:13.484Z', \
                    'dop-correlation-id', gen_random_uuid()::text) \
         FROM (SELECT g, gen_random_uuid() AS id FROM generate_series(1, {n}) AS g) AS rows",
        destination = reader.destination,
    );
    scratch.db.execute_unprepared(&insert).await?;
    progress(&format!("relay: the Python relay, {n} rows"));
    let mut relay = django(&python, scratch.name(), &["publish"]).spawn()?;
    let measured = reader.arrival_rate(n, Duration::from_secs(600)).await;
    let _ = relay.start_kill();
    let _ = relay.wait().await;
    reader.close().await;
    scratch.drop().await;
    Ok(Some(measured?))
}

/// The Python consumer on the same workload, when `OUTBOX_TEST_BENCH_PYTHON` names a Python with
/// django-outbox-pattern 3.2.1 and the packages of `interop/requirements.txt` (PostgreSQL only):
/// `manage.py subscribe` of the interop project with its README callback (`shop.callbacks.record`:
/// a business row and the inbox row in one transaction), persistent database connections, on a
/// queue of `n` messages; its rate from its first business row to the `n`th.
async fn consume_python(settings: &Settings, n: usize) -> Result<Option<f64>, BoxError> {
    let Some(python) = bench_python(settings, "consume") else {
        return Ok(None);
    };
    let scratch = django_scratch(settings, &python).await?;
    let (destination, queue) = fill_queue(settings, n).await?;
    progress(&format!("consume: the Python consumer, {n} messages"));
    let mut subscriber = django(
        &python,
        scratch.name(),
        &["subscribe", "shop.callbacks.record", &destination],
    )
    .spawn()?;
    let counted = rate_of_count(&scratch, "SELECT count(*) FROM shop_effect", n).await;
    let _ = subscriber.start_kill();
    let _ = subscriber.wait().await;
    delete_queues(&queue);
    scratch.drop().await;
    Ok(Some(counted?))
}

/// Write throughput of concurrent writers: `n` saves in all, by 1, 4 and 16 writers at once,
/// each save in its own transaction; plain saves and publishing saves (no relay idle: a busy
/// period), and on PostgreSQL the publishing saves again with a relay idle all along (every
/// commit notifies) and without the trigger (dropped for the run, then restored).
pub async fn write_concurrent(settings: &Settings, n: usize) -> Result<(), BoxError> {
    let scratch = Scratch::create(&settings.database_url, 17).await?;
    let postgres = scratch.db.get_database_backend() == sea_orm::DbBackend::Postgres;
    for writers in [1usize, 4, 16] {
        let plain = concurrent_saves(&scratch, writers, n, false).await?;
        figure(
            &format!("write_concurrent.plain_{writers}"),
            plain,
            "rows/s",
        );
        let published = concurrent_saves(&scratch, writers, n, true).await?;
        figure(
            &format!("write_concurrent.outbox_{writers}"),
            published,
            "rows/s",
        );
        if postgres {
            // A relay idle the whole time: every publishing commit queues a NOTIFY (what every
            // commit did before writers notified only idle relays).
            scratch
                .db
                .execute_unprepared(
                    "INSERT INTO outbox_idle_relay (relay, until) \
                     VALUES (gen_random_uuid(), now() + interval '1 hour')",
                )
                .await?;
            let notifying = concurrent_saves(&scratch, writers, n, true).await;
            scratch
                .db
                .execute_unprepared("DELETE FROM outbox_idle_relay")
                .await?;
            figure(
                &format!("write_concurrent.outbox_notify_{writers}"),
                notifying?,
                "rows/s",
            );
            let trigger = outbox_trigger(&scratch).await?;
            let dropped = format!("DROP TRIGGER {trigger} ON published");
            scratch.db.execute_unprepared(&dropped).await?;
            let without = concurrent_saves(&scratch, writers, n, true).await;
            restore_trigger(&scratch, &trigger).await?;
            let without = without?;
            figure(
                &format!("write_concurrent.outbox_no_trigger_{writers}"),
                without,
                "rows/s",
            );
            figure(
                &format!("write_concurrent.trigger_cost_{writers}"),
                100.0 * (1.0 - published / without),
                "%",
            );
        }
    }
    scratch.drop().await;
    Ok(())
}

/// The name of the notification trigger on `published` (PostgreSQL).
async fn outbox_trigger(scratch: &Scratch) -> Result<String, BoxError> {
    let row = scratch
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'published'::regclass AND NOT tgisinternal",
        ))
        .await?
        .ok_or("no trigger on published")?;
    Ok(row.try_get_by_index::<String>(0)?)
}

async fn restore_trigger(scratch: &Scratch, trigger: &str) -> Result<(), BoxError> {
    let definition = TRIGGER_DEFINITIONS
        .iter()
        .find(|(name, _)| *name == trigger)
        .map(|(_, definition)| *definition)
        .ok_or_else(|| format!("no known definition of trigger {trigger}"))?;
    scratch.db.execute_unprepared(definition).await?;
    Ok(())
}

/// The outbox's notification triggers, as the migrations create them.
const TRIGGER_DEFINITIONS: &[(&str, &str)] = &[(
    "outbox_published_notify",
    "CREATE TRIGGER outbox_published_notify AFTER INSERT ON published \
     FOR EACH STATEMENT EXECUTE FUNCTION outbox_published_notify()",
)];

/// `n` saves by `writers` tasks at once, each save in its own transaction; the rate of all.
async fn concurrent_saves(
    scratch: &Scratch,
    writers: usize,
    n: usize,
    publishing: bool,
) -> Result<f64, BoxError> {
    let per_writer = n.div_ceil(writers);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let db = scratch.db.clone();
        tasks.spawn(async move {
            for i in 0..per_writer {
                let amount = (w * per_writer + i) as i64;
                if publishing {
                    outbox::insert(
                        &db,
                        published_item::ActiveModel {
                            name: Set(format!("item {amount}")),
                            amount: Set(amount),
                            ..Default::default()
                        },
                    )
                    .await?;
                } else {
                    let txn = db.begin().await?;
                    item::ActiveModel {
                        name: Set(format!("item {amount}")),
                        amount: Set(amount),
                        ..Default::default()
                    }
                    .insert(&txn)
                    .await?;
                    txn.commit().await?;
                }
            }
            Ok::<_, BoxError>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(rate(per_writer * writers, started.elapsed()))
}
