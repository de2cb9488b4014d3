//! The orders service: selling places orders, the relay sends their messages to the broker,
//! shipping consumes them, all in one process, with a Prometheus endpoint and logs.
//!
//! ```sh
//! cargo run -p outbox-examples --bin orders -- --once   # no setup: SQLite + in-memory broker
//! cargo run -p outbox-examples --bin orders             # an order every 5 s, until Ctrl-C
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/orders \
//!   OUTBOX_STOMP_HOST_AND_PORTS=127.0.0.1:61613 \
//!   cargo run -p outbox-examples --bin orders           # PostgreSQL + RabbitMQ
//! ```
//!
//! The environment: `DATABASE_URL` (default `sqlite://orders.db?mode=rwc`, a file in the current
//! directory); `OUTBOX_STOMP_HOST_AND_PORTS` (when set, RabbitMQ over STOMP, with the other
//! `OUTBOX_*` settings; otherwise a broker inside this process); `METRICS_PORT` (default 9898);
//! `RUST_LOG` (default `info`). See `examples/README.md`.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use outbox::tables::published;
use outbox::tables::published::Status;
use outbox::transport::MemoryTransport;
use outbox::{OutboxConfig, Producer, Published};
use outbox_examples::orders::{self, order, shipment, shipping};
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use tracing_subscriber::EnvFilter;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The database when `DATABASE_URL` is not set: a SQLite file, created on first use.
const EMBEDDED_DATABASE_URL: &str = "sqlite://orders.db?mode=rwc";

/// Bucket bounds of every `*_seconds` histogram, from a fast batch to an hour's lag: buckets
/// (rather than the exporter's default summaries) let Prometheus aggregate over instances, as
/// the dashboard and alerts in `examples/monitoring/` do.
const SECONDS_BUCKETS: [f64; 18] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

/// The Prometheus endpoint's port when `METRICS_PORT` is not set.
const DEFAULT_METRICS_PORT: u16 = 9898;

/// How long `--once` waits for shipping to ship what it placed.
const SHIPPING_DEADLINE: Duration = Duration::from_secs(30);

/// Who the demo's orders are for, in turn.
const CUSTOMERS: [&str; 4] = ["ada", "grace", "linus", "barbara"];

#[derive(Parser)]
#[command(
    name = "orders",
    about = "An orders service on the transactional outbox: places orders, relays their messages, ships them"
)]
struct Args {
    /// Place `--orders` orders, wait until shipping has shipped them, print a summary and exit.
    #[arg(long)]
    once: bool,

    /// How many orders `--once` places.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    orders: u32,

    /// Seconds between two orders when running until Ctrl-C.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    every: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("orders: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    let config = OutboxConfig::from_env()?;
    let metrics = serve_metrics()?;
    let database_url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| EMBEDDED_DATABASE_URL.to_owned());
    let db = orders::database::open(&database_url).await?;
    // RabbitMQ when its address is given, else a broker inside this process.
    let memory = std::env::var_os("OUTBOX_STOMP_HOST_AND_PORTS")
        .is_none()
        .then(MemoryTransport::new);
    tracing::info!(
        database = ?db.get_database_backend(),
        broker = if memory.is_some() { "in-memory" } else { "STOMP" },
        "orders service starting"
    );

    let mut consumer = shipping::consumer(db.clone()).config(config.clone());
    let mut relay = Producer::builder(db.clone()).config(config);
    if let Some(memory) = &memory {
        // A connection of the consumer's own: it disconnects while it starts and stops.
        consumer = consumer.transport(memory.new_connection());
        relay = relay.transport(memory.clone());
    }
    let consumer = consumer.build()?;
    // Before the first order is relayed: the broker drops a message sent to a topic that no
    // queue is bound to yet.
    consumer.declare().await?;
    let relay = relay.start()?;
    let (stop_consumer, consumer_stopped) = tokio::sync::oneshot::channel::<()>();
    let consuming = tokio::spawn(async move {
        consumer
            .run_until(shipping::ship, async {
                let _ = consumer_stopped.await;
            })
            .await
    });

    let outcome = if args.once {
        demo(&db, args.orders).await.map(Some)
    } else {
        serve(&db, Duration::from_secs(args.every))
            .await
            .map(|()| None)
    };

    // The consumer first: the messages it is processing finish and are acknowledged.
    let _ = stop_consumer.send(());
    let consumed = consuming.await;
    let relayed = relay.stop().await;
    let demo = outcome?;
    consumed??;
    relayed?;
    if let Some(demo) = demo {
        let embedded = database_url == EMBEDDED_DATABASE_URL;
        print_summary(&db, &demo, memory.as_ref(), &metrics, embedded).await?;
    }
    Ok(())
}

/// Installs the Prometheus recorder (the outbox records its `outbox_*` metrics through the
/// `metrics` facade) and serves it at `/metrics` on `METRICS_PORT`, on every interface.
fn serve_metrics() -> Result<PrometheusHandle, BoxError> {
    let port = match std::env::var("METRICS_PORT") {
        Ok(value) => value
            .parse::<u16>()
            .map_err(|err| format!("METRICS_PORT={value}: {err}"))?,
        Err(_) => DEFAULT_METRICS_PORT,
    };
    let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(address)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .map_err(|err| format!("histogram buckets: {err}"))?
        .build()
        .map_err(|err| format!("serving metrics on {address} (METRICS_PORT): {err}"))?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|err| err.to_string())?;
    tokio::spawn(async move {
        if let Err(err) = exporter.await {
            tracing::error!(error = ?err, "the metrics endpoint stopped");
        }
    });
    tracing::info!(%address, "serving Prometheus metrics at /metrics");
    Ok(handle)
}

/// What `--once` did.
struct Demo {
    placed: Vec<i32>,
    took: Duration,
}

/// `--once`: places `count` orders and waits until shipping has shipped every one.
async fn demo(db: &DatabaseConnection, count: u32) -> Result<Demo, BoxError> {
    let started = Instant::now();
    let mut placed = Vec::new();
    for n in 0..u64::from(count) {
        placed.push(place_next_order(db, n).await?.id);
    }
    wait_until_shipped(db, &placed).await?;
    Ok(Demo {
        placed,
        took: started.elapsed(),
    })
}

/// Until SIGINT (Ctrl-C) or SIGTERM: an order every `every`.
async fn serve(db: &DatabaseConnection, every: Duration) -> Result<(), BoxError> {
    let shutdown = outbox::shutdown::signal();
    tokio::pin!(shutdown);
    let mut ticks = tokio::time::interval(every);
    for n in 0.. {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = &mut shutdown => break,
        }
        if let Err(err) = place_next_order(db, n).await {
            // A service goes on when one request fails; the next tick tries again.
            tracing::error!(error = %err, "placing an order failed");
        }
    }
    Ok(())
}

/// The demo's `n`-th order.
async fn place_next_order(db: &DatabaseConnection, n: u64) -> Result<order::Model, outbox::Error> {
    let customer = CUSTOMERS[(n % CUSTOMERS.len() as u64) as usize];
    let total_cents = 1_000 + (n % 8) as i64 * 250;
    orders::place_order(db, customer, total_cents).await
}

async fn wait_until_shipped(db: &DatabaseConnection, orders: &[i32]) -> Result<(), BoxError> {
    let deadline = Instant::now() + SHIPPING_DEADLINE;
    loop {
        let shipped = shipment::Entity::find()
            .filter(shipment::Column::OrderId.is_in(orders.iter().copied()))
            .count(db)
            .await?;
        if shipped == orders.len() as u64 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "shipping shipped {shipped} of the {} orders placed within {SHIPPING_DEADLINE:?}; \
                 see the relay's and the consumer's logs above",
                orders.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn print_summary(
    db: &DatabaseConnection,
    demo: &Demo,
    memory: Option<&MemoryTransport>,
    metrics: &PrometheusHandle,
    embedded_database: bool,
) -> Result<(), BoxError> {
    println!(
        "Placed {} orders (ids {:?}); shipping had shipped them all {:.2} s later.",
        demo.placed.len(),
        demo.placed,
        demo.took.as_secs_f64()
    );

    println!();
    println!("The outbox (table `published`, every run so far), rows by status and destination:");
    let rows: Vec<(Status, String, i64)> = Published::find()
        .select_only()
        .column(published::Column::Status)
        .column(published::Column::Destination)
        .column_as(published::Column::Id.count(), "rows")
        .group_by(published::Column::Status)
        .group_by(published::Column::Destination)
        .order_by_asc(published::Column::Destination)
        .into_tuple()
        .all(db)
        .await?;
    for (status, destination, count) in rows {
        println!("  {:<10} {destination:<20} {count}", format!("{status:?}"));
    }

    if let Some(memory) = memory {
        println!();
        println!("The in-memory broker received:");
        for message in memory.sent() {
            println!(
                "  SEND {:<20} {}",
                message.destination,
                String::from_utf8_lossy(&message.body)
            );
        }
    }

    println!();
    println!(
        "The outbox's metrics, as served at /metrics (quantiles left out; the pending gauges are"
    );
    println!("sampled every 10 s):");
    let rendered = metrics.render();
    let outbox_lines: Vec<&str> = rendered
        .lines()
        .filter(|line| line.starts_with("outbox_") && !line.contains("quantile="))
        .collect();
    if outbox_lines.is_empty() {
        println!("  (none recorded)");
    }
    for line in outbox_lines {
        println!("  {line}");
    }

    println!();
    println!("See the outbox's rows with the outbox command:");
    if embedded_database {
        println!(
            "  DATABASE_URL='{EMBEDDED_DATABASE_URL}' cargo run -p outbox --bin outbox -- status"
        );
    } else {
        println!("  cargo run -p outbox --bin outbox -- status   # with the same DATABASE_URL");
    }
    Ok(())
}
