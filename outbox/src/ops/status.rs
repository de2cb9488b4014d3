//! `outbox status`: what is in the outbox and the inbox, in a few aggregate queries.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveEnum, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
};
use serde::Serialize;
use uuid::Uuid;

use crate::error::Error;
use crate::tables::published::Status;
use crate::tables::published::{Column, Entity};
use crate::tables::{received, unroutable};

/// Row counts by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatusCounts {
    /// Waiting to be sent (SCHEDULE).
    pub scheduled: u64,
    /// Sent and receipted (SUCCEEDED).
    pub succeeded: u64,
    /// Given up (FAILED): see `last_error`.
    pub failed: u64,
}

impl StatusCounts {
    fn add(&mut self, status: Status, rows: u64) {
        match status {
            Status::Schedule => self.scheduled += rows,
            Status::Succeeded => self.succeeded += rows,
            Status::Failed => self.failed += rows,
        }
    }

    /// Every row, whatever its status.
    pub fn total(&self) -> u64 {
        self.scheduled + self.succeeded + self.failed
    }
}

/// One destination's rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DestinationStatus {
    /// The destination, with its version suffix.
    pub destination: String,
    /// Its rows by status.
    #[serde(flatten)]
    pub counts: StatusCounts,
    /// When its oldest unsent row was written.
    pub oldest_pending: Option<DateTime<Utc>>,
    /// How long ago that was, in seconds.
    pub oldest_pending_age_seconds: Option<i64>,
}

/// A FAILED row and why it failed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailedRow {
    /// The message id (`dop-msg-id`).
    pub id: Uuid,
    /// Its destination.
    pub destination: String,
    /// When it was written.
    pub added: DateTime<Utc>,
    /// Attempts spent.
    pub retry: i32,
    /// Why the last attempt failed, or why the row was given up.
    pub last_error: Option<String>,
}

/// An ordering key held up by a FAILED row: none of its later rows is sent until the FAILED rows
/// are retried (`outbox retry`) or purged (`outbox purge --status failed --force`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockedKey {
    /// The key (`msg_key`).
    pub key: String,
    /// Its FAILED rows.
    pub failed: u64,
    /// Its rows waiting behind them.
    pub waiting: u64,
}

/// One consumer queue's inbox rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueRows {
    /// The queue.
    pub queue: String,
    /// Its inbox rows (messages processed within the retention window).
    pub rows: u64,
}

/// The inbox table, `received`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReceivedSummary {
    /// Every inbox row.
    pub total: u64,
    /// Per queue, by name.
    pub queues: Vec<QueueRows>,
}

/// What [`status`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusReport {
    /// When the report was made.
    pub at: DateTime<Utc>,
    /// Every outbox row by status.
    pub totals: StatusCounts,
    /// When the oldest unsent row was written.
    pub oldest_pending: Option<DateTime<Utc>>,
    /// How long ago that was, in seconds: how far behind the relay is.
    pub oldest_pending_age_seconds: Option<i64>,
    /// Per destination, by name.
    pub destinations: Vec<DestinationStatus>,
    /// The latest FAILED rows, newest first.
    pub latest_failed: Vec<FailedRow>,
    /// Destinations recorded as having no queue bound to them when the relay last sent there
    /// (AMQP; the table `outbox_unroutable`), with their waiting rows: `(destination, rows)`.
    /// The rows wait for a queue without spending retries.
    pub unroutable: Vec<(String, u64)>,
    /// Ordering keys that a FAILED row blocks, by key (at most `failed_limit` of them).
    pub blocked_keys: Vec<BlockedKey>,
    /// How many keys a FAILED row blocks in all.
    pub blocked_key_count: u64,
    /// The inbox.
    pub received: ReceivedSummary,
}

/// Reports the outbox and the inbox: rows per status and destination, the oldest unsent row,
/// the `failed_limit` latest FAILED rows with their reasons, and inbox rows per queue.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), outbox::Error> {
/// let report = outbox::ops::status(db, 10).await?;
/// if let Some(age) = report.oldest_pending_age_seconds {
///     println!("{} rows waiting, the oldest for {age} s", report.totals.scheduled);
/// }
/// # Ok(()) }
/// ```
pub async fn status(db: &DatabaseConnection, failed_limit: u64) -> Result<StatusReport, Error> {
    let at = Utc::now();
    let age = |oldest: Option<DateTime<Utc>>| oldest.map(|t| Ord::max((at - t).num_seconds(), 0));

    let groups: Vec<(i32, String, i64, Option<DateTime<Utc>>)> = Entity::find()
        .select_only()
        .column(Column::Status)
        .column(Column::Destination)
        .column_as(Expr::col(Column::Id).count(), "rows")
        .column_as(Expr::col(Column::Added).min(), "oldest")
        .group_by(Column::Status)
        .group_by(Column::Destination)
        .into_tuple()
        .all(db)
        .await?;
    let mut totals = StatusCounts::default();
    let mut oldest_pending: Option<DateTime<Utc>> = None;
    let mut by_destination: BTreeMap<String, (StatusCounts, Option<DateTime<Utc>>)> =
        BTreeMap::new();
    for (status, destination, rows, oldest) in groups {
        let status = Status::try_from_value(&status)?;
        let rows = u64::try_from(rows).unwrap_or(0);
        totals.add(status, rows);
        let (counts, pending) = by_destination.entry(destination).or_default();
        counts.add(status, rows);
        if status == Status::Schedule {
            *pending = oldest;
            oldest_pending = match (oldest_pending, oldest) {
                (Some(a), Some(b)) => Some(Ord::min(a, b)),
                (a, b) => a.or(b),
            };
        }
    }
    let destinations = by_destination
        .into_iter()
        .map(|(destination, (counts, oldest))| DestinationStatus {
            destination,
            counts,
            oldest_pending: oldest,
            oldest_pending_age_seconds: age(oldest),
        })
        .collect();

    let latest_failed = Entity::find()
        .filter(Column::Status.eq(Status::Failed))
        .order_by_desc(Column::Added)
        .limit(failed_limit)
        .all(db)
        .await?
        .into_iter()
        .map(|row| FailedRow {
            id: row.id,
            destination: row.destination,
            added: row.added,
            retry: row.retry,
            last_error: row.last_error,
        })
        .collect();

    let unroutable = unroutable_waiting(db).await?;

    let blocked = blocked_keys(db).await?;
    let blocked_key_count = blocked.len() as u64;
    let blocked_keys = blocked
        .into_iter()
        .take(usize::try_from(failed_limit).unwrap_or(usize::MAX))
        .collect();

    let queues: Vec<(String, i64)> = received::Entity::find()
        .select_only()
        .column(received::Column::Queue)
        .column_as(Expr::col(received::Column::Id).count(), "rows")
        .group_by(received::Column::Queue)
        .order_by_asc(received::Column::Queue)
        .into_tuple()
        .all(db)
        .await?;
    let queues: Vec<QueueRows> = queues
        .into_iter()
        .map(|(queue, rows)| QueueRows {
            queue,
            rows: u64::try_from(rows).unwrap_or(0),
        })
        .collect();
    let received = ReceivedSummary {
        total: queues.iter().map(|q| q.rows).sum(),
        queues,
    };

    Ok(StatusReport {
        at,
        totals,
        oldest_pending,
        oldest_pending_age_seconds: age(oldest_pending),
        destinations,
        latest_failed,
        unroutable,
        blocked_keys,
        blocked_key_count,
        received,
    })
}

/// Every key with a FAILED row, by key, with its FAILED and waiting rows: one grouped read of
/// the unsent keyed rows (the partial index `published_key_unsent_idx`).
pub(crate) async fn blocked_keys(db: &DatabaseConnection) -> Result<Vec<BlockedKey>, DbErr> {
    let failed = Status::Failed.to_value();
    let waiting = Status::Schedule.to_value();
    let sent = Status::Succeeded.to_value();
    let statement = sea_orm::Statement::from_string(
        db.get_database_backend(),
        format!(
            "SELECT msg_key, \
                 COUNT(CASE WHEN status = {failed} THEN 1 END) AS failed, \
                 COUNT(CASE WHEN status = {waiting} THEN 1 END) AS waiting \
             FROM published WHERE msg_key IS NOT NULL AND status <> {sent} \
             GROUP BY msg_key \
             HAVING COUNT(CASE WHEN status = {failed} THEN 1 END) > 0 \
             ORDER BY msg_key"
        ),
    );
    let rows = db.query_all_raw(statement).await?;
    let count = |row: &sea_orm::QueryResult, column: &str| -> Result<u64, DbErr> {
        let value: i64 = row.try_get("", column)?;
        Ok(u64::try_from(value).unwrap_or(0))
    };
    rows.iter()
        .map(|row| {
            Ok(BlockedKey {
                key: row.try_get("", "msg_key")?,
                failed: count(row, "failed")?,
                waiting: count(row, "waiting")?,
            })
        })
        .collect()
}

/// Rows waiting to be sent, and when the oldest was written: one query on the `(status, added)`
/// index, cheap enough for the relay to run every few seconds (the pending gauges).
pub(crate) async fn pending(
    db: &DatabaseConnection,
) -> Result<(u64, Option<DateTime<Utc>>), DbErr> {
    let found: Option<(i64, Option<DateTime<Utc>>)> = Entity::find()
        .select_only()
        .column_as(Expr::col(Column::Id).count(), "rows")
        .column_as(Expr::col(Column::Added).min(), "oldest")
        .filter(Column::Status.eq(Status::Schedule))
        .into_tuple()
        .one(db)
        .await?;
    Ok(found
        .map(|(rows, oldest)| (u64::try_from(rows).unwrap_or(0), oldest))
        .unwrap_or((0, None)))
}

/// The destinations recorded in `outbox_unroutable` (no queue was bound to them when the relay
/// last sent there), with how many rows wait for each. A database the migration that adds the
/// table did not reach has none recorded.
async fn unroutable_waiting(db: &DatabaseConnection) -> Result<Vec<(String, u64)>, Error> {
    let destinations = unroutable_destinations(db).await?;
    if destinations.is_empty() {
        return Ok(Vec::new());
    }
    let waiting: Vec<(String, i64)> = Entity::find()
        .select_only()
        .column(Column::Destination)
        .column_as(Expr::col(Column::Id).count(), "rows")
        .filter(Column::Status.eq(Status::Schedule))
        .filter(Column::Destination.is_in(destinations))
        .group_by(Column::Destination)
        .order_by_asc(Column::Destination)
        .into_tuple()
        .all(db)
        .await?;
    Ok(waiting
        .into_iter()
        .map(|(destination, rows)| (destination, u64::try_from(rows).unwrap_or(0)))
        .collect())
}

/// The destinations recorded in `outbox_unroutable`; none, with a warning, on a database the
/// migration that adds the table did not reach.
pub(super) async fn unroutable_destinations(db: &DatabaseConnection) -> Result<Vec<String>, Error> {
    match unroutable::Entity::find()
        .select_only()
        .column(unroutable::Column::Destination)
        .into_tuple()
        .all(db)
        .await
    {
        Ok(destinations) => Ok(destinations),
        Err(err) if err.to_string().contains("outbox_unroutable") => {
            tracing::warn!(error = %err, "no outbox_unroutable table: run the outbox's migrations");
            Ok(Vec::new())
        }
        Err(err) => Err(err.into()),
    }
}
