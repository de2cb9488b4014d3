//! `outbox-bench`: the figures behind the performance claims, on this machine's real database and
//! broker.
//!
//! ```sh
//! cargo run --release -p outbox-bench -- all [--n 10000]
//! ```
//!
//! Reads `DATABASE_URL` (a server URL: each run creates and drops a scratch database on it; PostgreSQL
//! by default, MariaDB and SQLite accepted) and `OUTBOX_STOMP_HOST_AND_PORTS`. With
//! `--transport amqp` the relay and the limit go over AMQP 0-9-1 (`OUTBOX_BROKER_URL`, by default
//! guest on 127.0.0.1:5672), and `limit` also measures a bare lapin publisher with confirms; the
//! readers stay STOMP subscribers. Prints one line per
//! figure on stdout, `name value unit`, and its progress on stderr. With `all`, every scenario runs
//! in a child process of its own, so that each memory figure is that scenario's alone.

mod scenarios;
mod scratch;

use std::process::ExitCode;

use clap::{Parser, ValueEnum};

#[derive(Parser)]
#[command(name = "outbox-bench", about = "Benchmarks of the outbox")]
struct Cli {
    /// What to measure.
    scenario: Scenario,
    /// Messages (or saves) per measurement.
    #[arg(long, default_value_t = 10_000)]
    n: usize,
    /// The transport of the relay and of the limit.
    #[arg(long, value_enum, default_value_t = scenarios::TransportKind::Stomp, global = true)]
    transport: scenarios::TransportKind,
    /// For the worker processes: the scratch database, destination and queue, concurrency.
    #[command(flatten)]
    worker: scenarios::WorkerArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Per-save cost of publishing: saves with and without `#[publish]`, interleaved.
    Write,
    /// Write throughput of 1, 4 and 16 concurrent writers, plain and publishing, with and
    /// without the NOTIFY trigger, with a relay idle or not (PostgreSQL).
    WriteConcurrent,
    /// Relay throughput, one relay and two, and the relay's peak memory.
    Relay,
    /// Relay throughput with 1,000 ordering keys beside the same without keys.
    RelayKeyed,
    /// Commit-to-subscriber latency with an idle relay.
    Latency,
    /// Consumer throughput with the README callback, and the consumer's peak memory.
    Consume,
    /// The broker's own limit: the bare transport sending the same messages with receipts.
    Limit,
    /// The cost of the `opentelemetry` feature: saves, relay and consumer, untraced and traced.
    Trace,
    /// Every scenario, each in a child process.
    All,
    /// (internal) The relay alone, in its own process, for its memory figure.
    #[value(hide = true)]
    RelayWorker,
    /// (internal) The consumer alone, in its own process, for its memory figure.
    #[value(hide = true)]
    ConsumeWorker,
}

/// Prints one figure.
pub fn figure(name: &str, value: f64, unit: &str) {
    println!("{name} {value:.1} {unit}");
}

/// Progress, on stderr.
pub fn progress(message: &str) {
    eprintln!("outbox-bench: {message}");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.scenario == Scenario::All {
        return run_all(cli.n, cli.transport);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("outbox-bench: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let settings = scenarios::Settings::from_env(cli.transport)?;
        match cli.scenario {
            Scenario::Write => scenarios::write(&settings, cli.n).await,
            Scenario::WriteConcurrent => scenarios::write_concurrent(&settings, cli.n).await,
            Scenario::Relay => scenarios::relay(&settings, cli.n).await,
            Scenario::RelayKeyed => scenarios::relay_keyed(&settings, cli.n).await,
            Scenario::Latency => scenarios::latency(&settings, cli.n.clamp(200, 2000)).await,
            Scenario::Consume => scenarios::consume(&settings, cli.n).await,
            Scenario::Limit => scenarios::limit(&settings, cli.n).await,
            Scenario::Trace => scenarios::trace::trace(&settings, cli.n).await,
            Scenario::RelayWorker => scenarios::relay_worker(&settings, &cli.worker, cli.n).await,
            Scenario::ConsumeWorker => {
                scenarios::consume_worker(&settings, &cli.worker, cli.n).await
            }
            Scenario::All => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("outbox-bench: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs each scenario as a child process; the relay's share of the limit comes out of the two.
fn run_all(n: usize, transport: scenarios::TransportKind) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => {
            eprintln!("outbox-bench: cannot find this program: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut relay_rate = None;
    let mut limit_rate = None;
    let mut bare_rate = None;
    let mut figures: Vec<(String, f64)> = Vec::new();
    for scenario in [
        "write",
        "write-concurrent",
        "relay",
        "relay-keyed",
        "latency",
        "consume",
        "limit",
    ] {
        progress(&format!("scenario {scenario}"));
        let output = std::process::Command::new(&exe)
            .args([scenario, "--n", &n.to_string()])
            .args(["--transport", transport.name()])
            .stderr(std::process::Stdio::inherit())
            .output();
        let output = match output {
            Ok(output) if output.status.success() => output,
            Ok(output) => {
                eprintln!(
                    "outbox-bench: scenario {scenario} failed ({})",
                    output.status
                );
                return ExitCode::FAILURE;
            }
            Err(err) => {
                eprintln!("outbox-bench: cannot run scenario {scenario}: {err}");
                return ExitCode::FAILURE;
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        // Every figure of the scenario first: a target may compare with a later one.
        for line in stdout.lines() {
            let mut parts = line.split_whitespace();
            if let (Some(name), Some(v)) = (
                parts.next(),
                parts.next().and_then(|v| v.parse::<f64>().ok()),
            ) {
                figures.push((name.to_owned(), v));
            }
        }
        for line in stdout.lines() {
            let mut parts = line.split_whitespace();
            let name = parts.next();
            let value = parts.next().and_then(|v| v.parse::<f64>().ok());
            match (name, value) {
                (Some(name), Some(v)) => {
                    match target(name, &figures) {
                        Some(target) => println!("{line}  [target: {target}]"),
                        None => println!("{line}"),
                    }
                    match name {
                        "relay.rate" => relay_rate = Some(v),
                        "limit.rate" => limit_rate = Some(v),
                        "limit.bare_rate" => bare_rate = Some(v),
                        _ => {}
                    }
                }
                _ => println!("{line}"),
            }
        }
    }
    if let (Some(relay), Some(limit)) = (relay_rate, limit_rate) {
        let share = 100.0 * relay / limit;
        println!("relay.of_limit {share:.1} %  [target: >= 85%]");
    }
    if let (Some(relay), Some(bare)) = (relay_rate, bare_rate) {
        let share = 100.0 * relay / bare;
        println!("relay.of_bare {share:.1} %  [target: >= 85% of the bare lapin publisher]");
    }
    ExitCode::SUCCESS
}

/// The Python consumer's rate (django-outbox-pattern 3.2.1, persistent connections, the same
/// workload) measured on the reference machine on 2026-12-01: the reference when this run did
/// not measure it (`OUTBOX_TEST_BENCH_PYTHON` unset).
const PYTHON_CONSUMER_RATE: f64 = 563.0;

/// The target of a figure, with how the figure compares when the target is relative to another
/// figure of the same run.
fn target(name: &str, figures: &[(String, f64)]) -> Option<String> {
    let find = |wanted: &str| {
        figures
            .iter()
            .rev()
            .find(|(name, _)| name == wanted)
            .map(|(_, v)| *v)
    };
    let value = find(name)?;
    let target = match name {
        "write.ratio" => "1.3x at most (synchronous_commit on)".to_owned(),
        "write.ratio_async" => "1.3x at most (synchronous_commit off)".to_owned(),
        "consume.rate" => {
            let (python, when) = match find("consume.python_rate") {
                Some(python) => (python, "this run"),
                None => (PYTHON_CONSUMER_RATE, "2026-12-01"),
            };
            format!(
                ">= 12x the Python consumer ({python:.0} msgs/s, {when}): {:.0} msgs/s; here {:.1}x",
                12.0 * python,
                value / python
            )
        }
        "relay.rate" => match find("relay.python_rate") {
            Some(python) => format!(
                ">= 10x the Python relay ({python:.0} msgs/s, this run, without receipts): {:.0} msgs/s; here {:.1}x",
                10.0 * python,
                value / python
            ),
            None => {
                ">= 10x the Python relay (set OUTBOX_TEST_BENCH_PYTHON to measure it)".to_owned()
            }
        },
        "consume.bare_rate" => match find("consume.rate") {
            Some(rate) => format!(
                "the ceiling (the consumer reached {:.0}% of it)",
                100.0 * rate / value
            ),
            None => "the ceiling".to_owned(),
        },
        "latency.p99" => "< 20 ms".to_owned(),
        "relay.rss_mb" | "consume.rss_mb" => "< 30 MB".to_owned(),
        other if other.starts_with("write_concurrent.trigger_cost_") => {
            "<= 10% (else the wake-up design changes)".to_owned()
        }
        _ => return None,
    };
    Some(target)
}
