//! `outbox status`: what the outbox holds, as tables or JSON, or a health check against
//! thresholds (`--check`).

use std::time::Duration;

use chrono::SecondsFormat;
use clap::Args;
use outbox::OutboxConfig;
use outbox::ops::{self, StatusReport};

use crate::database::{OPERATION_POOL, connect};
use crate::duration::{format_age, parse_duration};
use crate::failure::Failure;

/// The arguments of `status`.
#[derive(Args)]
pub(crate) struct StatusArgs {
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// How many of the latest FAILED rows to show.
    #[arg(long, default_value_t = 10, value_name = "N")]
    failed: u64,
    /// Check thresholds instead of reporting: print one line and exit 0 when healthy, 3 with the
    /// first threshold crossed otherwise (for cron jobs and container health checks).
    #[arg(long)]
    check: bool,
    /// With --check: unhealthy when an unsent row has waited longer than this (60s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "check")]
    max_pending_age: Option<Duration>,
    /// With --check: unhealthy when more than this many rows are FAILED.
    #[arg(long, value_name = "N", requires = "check")]
    max_failed: Option<u64>,
    /// With --check and --max-failed: count only the FAILED rows written within this (1h, 1d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "max_failed")]
    failed_since: Option<Duration>,
}

/// Reports the outbox's state, or checks it against the thresholds with `--check`.
pub(crate) async fn run(
    args: StatusArgs,
    config: &OutboxConfig,
    url: Option<String>,
) -> Result<(), Failure> {
    if args.check {
        check(args, config, url).await
    } else {
        report(args, config, url).await
    }
}

/// `status --check`: one line, and the exit code of the first threshold crossed.
async fn check(
    args: StatusArgs,
    config: &OutboxConfig,
    url: Option<String>,
) -> Result<(), Failure> {
    let db = connect(url, Some(OPERATION_POOL), config).await?;
    if args.max_pending_age.is_none() && args.max_failed.is_none() {
        return Err(Failure::Usage(
            "--check needs a threshold: --max-pending-age and/or --max-failed".into(),
        ));
    }
    let mut check = ops::HealthCheck::new();
    if let Some(age) = args.max_pending_age {
        check = check.max_pending_age(age);
    }
    if let Some(count) = args.max_failed {
        check = check.max_failed(count);
    }
    if let Some(window) = args.failed_since {
        check = check.failed_since(window);
    }
    let health = check.run(&db).await?;
    match health.crossed {
        Some(reason) => Err(Failure::Unhealthy(reason)),
        None => {
            let waiting = match health.oldest_pending_age_seconds {
                Some(age) => format!("the oldest unsent row has waited {age} s"),
                None => "no row waiting".to_owned(),
            };
            println!("healthy: {waiting}; {} FAILED rows counted", health.failed);
            Ok(())
        }
    }
}

/// `status`: the report, as tables or JSON.
async fn report(
    args: StatusArgs,
    config: &OutboxConfig,
    url: Option<String>,
) -> Result<(), Failure> {
    let db = connect(url, Some(OPERATION_POOL), config).await?;
    let report = ops::status(&db, args.failed).await?;
    if args.json {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| Failure::Operation(format!("cannot encode the report: {e}")))?;
        println!("{json}");
    } else {
        print_status(&report);
    }
    Ok(())
}

/// An age in seconds as [`format_age`] shows it; `-` for none.
fn age(seconds: Option<i64>) -> String {
    seconds
        .map(|s| format_age(u64::try_from(s).unwrap_or(0)))
        .unwrap_or_else(|| "-".into())
}

/// The report as tables: rows per destination and status, the latest FAILED rows, the
/// unroutable rows, the blocked ordering keys and the inbox.
fn print_status(report: &StatusReport) {
    println!(
        "outbox status at {}",
        report.at.to_rfc3339_opts(SecondsFormat::Secs, true)
    );
    println!();
    let width = report
        .destinations
        .iter()
        .map(|d| d.destination.chars().count())
        .max()
        .unwrap_or(0)
        .max("destination".len());
    println!(
        "{:<width$}  {:>10}  {:>10}  {:>8}  oldest pending",
        "destination", "scheduled", "succeeded", "failed"
    );
    for d in &report.destinations {
        println!(
            "{:<width$}  {:>10}  {:>10}  {:>8}  {}",
            d.destination,
            d.counts.scheduled,
            d.counts.succeeded,
            d.counts.failed,
            age(d.oldest_pending_age_seconds)
        );
    }
    println!(
        "{:<width$}  {:>10}  {:>10}  {:>8}  {}",
        "total",
        report.totals.scheduled,
        report.totals.succeeded,
        report.totals.failed,
        age(report.oldest_pending_age_seconds)
    );
    println!();
    if report.latest_failed.is_empty() {
        println!("no FAILED rows");
    } else {
        println!(
            "latest FAILED rows ({} of {}):",
            report.latest_failed.len(),
            report.totals.failed
        );
        for row in &report.latest_failed {
            println!(
                "  {}  {}  added {}  attempts {}",
                row.id,
                row.destination,
                row.added.to_rfc3339_opts(SecondsFormat::Secs, true),
                row.retry
            );
            println!(
                "      {}",
                row.last_error.as_deref().unwrap_or("(no reason recorded)")
            );
        }
    }
    if !report.unroutable.is_empty() {
        println!();
        println!("unroutable rows (no queue is bound to their destination; they wait for one):");
        for (destination, rows) in &report.unroutable {
            println!("  {destination}  {rows}");
        }
    }
    if report.blocked_key_count > 0 {
        println!();
        println!(
            "ordering keys blocked by a FAILED row ({} of {}; `outbox retry` or `outbox purge --status failed --force` frees them):",
            report.blocked_keys.len(),
            report.blocked_key_count
        );
        for key in &report.blocked_keys {
            println!(
                "  {}  failed {}  waiting behind {}",
                key.key, key.failed, key.waiting
            );
        }
    }
    println!();
    println!("inbox (received): {} rows", report.received.total);
    for queue in &report.received.queues {
        println!("  {}  {}", queue.queue, queue.rows);
    }
}
