//! Operating the outbox: what the `outbox` command line does, as functions that a service, a
//! script or a test can call too.
//!
//! - [`status`]: rows per status and destination, the age of the oldest unsent row, the latest
//!   FAILED rows with their reasons, inbox rows per queue.
//! - [`Retry`]: puts FAILED rows back to be sent.
//! - [`declare`]: a consumer's queues declared ahead of it, and the rows waiting for a queue at
//!   its destination made due at once.
//! - [`Purge`]: deletes sent or failed rows (unsent rows only when forced), in bounded batches.
//! - [`dlq_list`] and [`dlq_replay`]: look into a consumer's dead-letter queue without losing
//!   anything, and move its messages back to the queue they came from.
//! - [`FindRows`], [`show`] and [`FindReceived`]: find messages in the outbox and the inbox by
//!   status, destination, correlation id, message id or time.
//! - [`HealthCheck`]: thresholds on the oldest unsent row and the FAILED rows, for monitors.
//!
//! Row filters take an age (`older_than`): a row qualifies when it was written (`added`) longer
//! ago than that.

mod browse;
mod declare;
mod dlq;
mod health;
mod purge;
mod retry;
mod status;

pub use browse::{DEFAULT_LIMIT, FindReceived, FindRows, show};
pub use declare::{Declared, declare};
pub use dlq::{DeadLetter, ReplayReport, dlq_list, dlq_replay};
pub use health::{Health, HealthCheck};
pub use purge::{Purge, PurgeStatus};
pub use retry::Retry;
pub use status::{
    BlockedKey, DestinationStatus, FailedRow, QueueRows, ReceivedSummary, StatusCounts,
    StatusReport, status,
};

pub(crate) use status::{blocked_keys, pending};

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::sea_query::{Condition, Expr, ExprTrait, Query};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr};

use crate::tables::published::{Column, Entity, NOTIFY_CHANNEL};

/// Rows changed per statement by [`Retry`] (and deleted per statement by [`Purge`]): no
/// statement holds locks on a large part of the table.
const BATCH: u64 = 1000;

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// The condition "written longer ago than `age`", if an age is given.
fn written_before(condition: Condition, older_than: Option<Duration>) -> Condition {
    match older_than {
        Some(age) => {
            let age = chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
            // No row is older than 1970: a huge age means every row, not a date the
            // database cannot hold.
            let cutoff = now()
                .checked_sub_signed(age)
                .unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
            let cutoff = Ord::max(cutoff, DateTime::<Utc>::UNIX_EPOCH);
            condition.add(Expr::col(Column::Added).lt(cutoff))
        }
        None => condition,
    }
}

/// How many outbox rows match `condition`.
async fn count_rows(db: &DatabaseConnection, condition: Condition) -> Result<u64, DbErr> {
    let select = Query::select()
        .expr(Expr::col(Column::Id).count())
        .from(Entity)
        .cond_where(condition)
        .to_owned();
    let count = match db.query_one(&select).await? {
        Some(row) => row.try_get_by_index::<i64>(0)?,
        None => 0,
    };
    Ok(u64::try_from(count).unwrap_or(0))
}

/// On PostgreSQL, the notification a committed insert sends, so idle relays look now rather
/// than at their next poll. Elsewhere they find the rows at their next poll.
async fn wake_relays(db: &DatabaseConnection) {
    if db.get_database_backend() != DbBackend::Postgres {
        return;
    }
    let notify = format!("SELECT pg_notify('{NOTIFY_CHANNEL}', '')");
    if let Err(err) = db.execute_unprepared(&notify).await {
        tracing::debug!(error = %err, "waking the relays failed; they find the rows at their next poll");
    }
}
