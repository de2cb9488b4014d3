//! `outbox purge`: sent or failed rows deleted in batches, rows never delivered only with
//! `--force`.

use std::time::Duration;

use clap::{Args, ValueEnum};
use outbox::OutboxConfig;
use outbox::ops::{Purge, PurgeStatus};

use crate::database::{OPERATION_POOL, connect};
use crate::duration::{format_age, parse_duration};
use crate::failure::Failure;

/// The rows `purge --status` deletes.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PurgeStatusArg {
    /// Sent rows (SUCCEEDED).
    Sent,
    /// Given-up rows (FAILED): their messages were never delivered. Needs --force.
    Failed,
    /// Sent and failed rows. Needs --force.
    AllSentAndFailed,
    /// Rows waiting to be sent (SCHEDULE): their messages are lost. Needs --force.
    Scheduled,
}

impl From<PurgeStatusArg> for PurgeStatus {
    fn from(arg: PurgeStatusArg) -> Self {
        match arg {
            PurgeStatusArg::Sent => PurgeStatus::Sent,
            PurgeStatusArg::Failed => PurgeStatus::Failed,
            PurgeStatusArg::AllSentAndFailed => PurgeStatus::SentAndFailed,
            PurgeStatusArg::Scheduled => PurgeStatus::Scheduled,
        }
    }
}

/// The arguments of `purge`.
#[derive(Args)]
pub(crate) struct PurgeArgs {
    /// Which rows to delete.
    #[arg(long, value_enum, default_value_t = PurgeStatusArg::Sent)]
    status: PurgeStatusArg,
    /// Only rows written longer ago than this (90s, 15m, 12h, 30d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    older_than: Option<Duration>,
    /// Count the rows that would be deleted; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Required by --status failed, all-sent-and-failed and scheduled (dry run or not):
    /// deleting rows never delivered loses their messages.
    #[arg(long)]
    force: bool,
}

/// Deletes the rows `args` names (or counts them, with `--dry-run`).
pub(crate) async fn run(
    args: PurgeArgs,
    config: &OutboxConfig,
    url: Option<String>,
) -> Result<(), Failure> {
    let status = PurgeStatus::from(args.status);
    if status.needs_force() && !args.force {
        return Err(Failure::Usage(format!(
            "--status {status} deletes rows whose messages were never delivered (`outbox retry` could still send them): add --force to mean it"
        )));
    }
    if args.force && !status.needs_force() {
        return Err(Failure::Usage(
            "--force only applies to --status failed, all-sent-and-failed and scheduled".into(),
        ));
    }
    let db = connect(url, Some(OPERATION_POOL), config).await?;
    let mut purge = Purge::new(status);
    if args.force {
        purge = purge.force();
    }
    if let Some(age) = args.older_than {
        purge = purge.older_than(age);
    }
    let age = args
        .older_than
        .map(|age| format!(", older than {}", format_age(age.as_secs())))
        .unwrap_or_default();
    if args.dry_run {
        let rows = purge.count(&db).await?;
        println!("dry run: {rows} rows would be deleted (status {status}{age})");
    } else {
        let rows = purge.run(&db).await?;
        println!("{rows} rows deleted (status {status}{age})");
    }
    Ok(())
}
