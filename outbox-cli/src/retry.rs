//! `outbox retry`: FAILED rows put back to be sent.

use std::time::Duration;

use clap::Args;
use outbox::OutboxConfig;
use outbox::ops::Retry;
use uuid::Uuid;

use crate::database::{OPERATION_POOL, connect};
use crate::duration::parse_duration;
use crate::failure::Failure;

/// The arguments of `retry`.
#[derive(Args)]
pub(crate) struct RetryArgs {
    /// Only rows of this destination (with its version suffix, as `status` shows it).
    #[arg(long, value_name = "DESTINATION")]
    destination: Option<String>,
    /// Only this row (message id); repeat for several.
    #[arg(long = "id", value_name = "UUID")]
    ids: Vec<Uuid>,
    /// Only rows written longer ago than this (90s, 15m, 12h, 30d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    older_than: Option<Duration>,
    /// Count the rows that would be rescheduled; change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Reschedules the FAILED rows `args` names (or counts them, with `--dry-run`).
pub(crate) async fn run(
    args: RetryArgs,
    config: &OutboxConfig,
    url: Option<String>,
) -> Result<(), Failure> {
    let db = connect(url, Some(OPERATION_POOL), config).await?;
    let mut retry = Retry::new().config(config).ids(args.ids);
    if let Some(destination) = args.destination {
        retry = retry.destination(destination);
    }
    if let Some(age) = args.older_than {
        retry = retry.older_than(age);
    }
    if args.dry_run {
        let rows = retry.count(&db).await?;
        println!("dry run: {rows} FAILED rows would be rescheduled");
    } else {
        let rows = retry.run(&db).await?;
        println!("{rows} FAILED rows rescheduled");
    }
    Ok(())
}
