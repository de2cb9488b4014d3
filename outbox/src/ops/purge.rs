//! `outbox purge`: deletes old rows by status, in bounded batches. Rows whose messages were
//! never delivered (waiting to be sent, or given up) are deleted only when the caller insists.

use std::fmt;
use std::time::Duration;

use sea_orm::sea_query::{Condition, Expr, ExprTrait};
use sea_orm::{ActiveEnum, DatabaseConnection};

use super::{count_rows, written_before};
use crate::error::Error;
use crate::tables::published::Status;
use crate::tables::published::{Column, Entity};

/// Which rows [`Purge`] deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeStatus {
    /// Sent rows (SUCCEEDED).
    Sent,
    /// Given-up rows (FAILED): their messages were never sent. Needs [`Purge::force`].
    Failed,
    /// Both. Needs [`Purge::force`].
    SentAndFailed,
    /// Rows waiting to be sent (SCHEDULE): their messages are lost. Needs [`Purge::force`].
    Scheduled,
}

impl PurgeStatus {
    /// Whether the rows it deletes include messages never delivered (FAILED or waiting to be
    /// sent): those are deleted only by a forced purge, since `outbox retry` could still send
    /// them.
    pub fn needs_force(self) -> bool {
        !matches!(self, PurgeStatus::Sent)
    }

    fn statuses(self) -> &'static [Status] {
        match self {
            PurgeStatus::Sent => &[Status::Succeeded],
            PurgeStatus::Failed => &[Status::Failed],
            PurgeStatus::SentAndFailed => &[Status::Succeeded, Status::Failed],
            PurgeStatus::Scheduled => &[Status::Schedule],
        }
    }
}

impl fmt::Display for PurgeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PurgeStatus::Sent => "sent",
            PurgeStatus::Failed => "failed",
            PurgeStatus::SentAndFailed => "all-sent-and-failed",
            PurgeStatus::Scheduled => "scheduled",
        })
    }
}

/// Deletes outbox rows of one status (or sent and failed together), optionally only those
/// written longer ago than an age, a bounded batch per statement. Rows whose messages were never
/// delivered (FAILED, or waiting to be sent) are deleted only by a forced purge
/// ([`PurgeStatus::needs_force`]).
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), outbox::Error> {
/// use outbox::ops::{Purge, PurgeStatus};
///
/// let purge = Purge::new(PurgeStatus::Sent).older_than(std::time::Duration::from_secs(7 * 86400));
/// println!("{} rows would be deleted", purge.count(db).await?);
/// let deleted = purge.run(db).await?;
/// # let _ = deleted; Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Purge {
    status: PurgeStatus,
    older_than: Option<Duration>,
    force: bool,
}

impl Purge {
    /// Rows of `status`, of any age.
    pub fn new(status: PurgeStatus) -> Self {
        Purge {
            status,
            older_than: None,
            force: false,
        }
    }

    /// Only rows written longer ago than `age`.
    pub fn older_than(mut self, age: Duration) -> Self {
        self.older_than = Some(age);
        self
    }

    /// Allows deleting rows whose messages were never delivered ([`PurgeStatus::needs_force`]).
    pub fn force(mut self) -> Self {
        self.force = true;
        self
    }

    fn condition(&self) -> Condition {
        let statuses = self.status.statuses().iter().map(|s| s.to_value());
        let condition = Condition::all().add(Expr::col(Column::Status).is_in(statuses));
        written_before(condition, self.older_than)
    }

    /// How many rows [`Purge::run`] would delete now (a dry run).
    pub async fn count(&self, db: &DatabaseConnection) -> Result<u64, Error> {
        Ok(count_rows(db, self.condition()).await?)
    }

    /// Deletes the rows; returns how many. Refuses, unless forced, the statuses whose messages
    /// were never delivered ([`PurgeStatus::needs_force`]).
    pub async fn run(&self, db: &DatabaseConnection) -> Result<u64, Error> {
        if self.status.needs_force() && !self.force {
            return Err(Error::Config {
                variable: "status".into(),
                value: self.status.to_string(),
                reason: "rows whose messages were never delivered (FAILED, or waiting to be \
                         sent) are deleted only when forced: they could still be retried"
                    .into(),
            });
        }
        Ok(crate::retention::delete_in_batches(db, Entity, Column::Id, self.condition()).await?)
    }
}
