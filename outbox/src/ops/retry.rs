//! `outbox retry`: FAILED rows back to SCHEDULE, so that the relay sends them again.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Condition, Expr, ExprTrait, Query};
use sea_orm::{ActiveEnum, DatabaseConnection};
use uuid::Uuid;

use super::{BATCH, count_rows, now, wake_relays, written_before};
use crate::config::OutboxConfig;
use crate::db::batch;
use crate::error::Error;
use crate::tables::published::Status;
use crate::tables::published::{Column, Entity};

/// Reschedules FAILED rows: each becomes a fresh row to the relay (status SCHEDULE, no attempt
/// spent, due at once, a new lifetime of `days_to_keep_data` from now so that an expired row is
/// not expired again at once). Its `last_error` is kept, as the record of why it had failed,
/// until the relay sends it (which clears it) or refuses it again (which replaces it).
///
/// Filters narrow it down; with none, every FAILED row is rescheduled.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), outbox::Error> {
/// use std::time::Duration;
///
/// let retry = outbox::ops::Retry::new()
///     .destination("/topic/orders.v1")
///     .older_than(Duration::from_secs(3600));
/// println!("{} rows would be rescheduled", retry.count(db).await?);
/// let rescheduled = retry.run(db).await?;
/// # let _ = rescheduled; Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Retry {
    destination: Option<String>,
    ids: Vec<Uuid>,
    older_than: Option<Duration>,
    lifetime: chrono::Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self::new()
    }
}

impl Retry {
    /// Every FAILED row, with the default lifetime (30 days).
    pub fn new() -> Self {
        Retry {
            destination: None,
            ids: Vec::new(),
            older_than: None,
            lifetime: chrono::Duration::days(i64::from(OutboxConfig::default().days_to_keep_data)),
        }
    }

    /// Only rows of this destination (with its version suffix, as stored).
    pub fn destination(mut self, destination: impl Into<String>) -> Self {
        self.destination = Some(destination.into());
        self
    }

    /// Only these rows (message ids); may be called again to add more.
    pub fn ids(mut self, ids: impl IntoIterator<Item = Uuid>) -> Self {
        self.ids.extend(ids);
        self
    }

    /// Only rows written longer ago than `age`.
    pub fn older_than(mut self, age: Duration) -> Self {
        self.older_than = Some(age);
        self
    }

    /// The lifetime of the settings (`days_to_keep_data`) for the rescheduled rows.
    pub fn config(mut self, config: &OutboxConfig) -> Self {
        self.lifetime = chrono::Duration::days(i64::from(config.days_to_keep_data));
        self
    }

    fn condition(&self) -> Condition {
        let mut condition =
            Condition::all().add(Expr::col(Column::Status).eq(Status::Failed.to_value()));
        if let Some(destination) = &self.destination {
            condition = condition.add(Expr::col(Column::Destination).eq(destination.clone()));
        }
        if !self.ids.is_empty() {
            condition = condition.add(Expr::col(Column::Id).is_in(self.ids.iter().copied()));
        }
        written_before(condition, self.older_than)
    }

    /// How many rows [`Retry::run`] would reschedule now (a dry run).
    pub async fn count(&self, db: &DatabaseConnection) -> Result<u64, Error> {
        Ok(count_rows(db, self.condition()).await?)
    }

    /// Reschedules the rows, a bounded batch per statement; returns how many. On PostgreSQL it
    /// then wakes the idle relays.
    pub async fn run(&self, db: &DatabaseConnection) -> Result<u64, Error> {
        let mut reschedule = Query::update();
        reschedule
            .table(Entity)
            .value(Column::Status, Status::Schedule.to_value())
            .value(Column::Retry, 0)
            .value(Column::NextAttemptAt, Option::<DateTime<Utc>>::None)
            .value(Column::ClaimToken, Option::<Uuid>::None)
            .value(Column::LockedUntil, Option::<DateTime<Utc>>::None)
            .value(Column::ExpiresAt, now() + self.lifetime);
        // The condition again in each statement: a row changed since the select is left alone.
        let rescheduled =
            batch::update_all(db, Entity, Column::Id, self.condition(), BATCH, reschedule).await?;
        if rescheduled > 0 {
            wake_relays(db).await;
        }
        Ok(rescheduled)
    }
}
