//! `outbox status --check`: thresholds a monitor (a cron job, a container health check) sets on
//! what [`status`](super::status) reports, and the first one crossed, in one line.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter};
use serde::Serialize;

use crate::error::Error;
use crate::tables::published::Status;
use crate::tables::published::{Column, Entity};

/// Thresholds on the outbox's health; none is checked unless set.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), outbox::Error> {
/// use std::time::Duration;
/// let verdict = outbox::ops::HealthCheck::new()
///     .max_pending_age(Duration::from_secs(60))
///     .max_failed(0)
///     .run(db)
///     .await?;
/// if let Some(reason) = verdict.crossed {
///     eprintln!("unhealthy: {reason}");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthCheck {
    max_pending_age: Option<Duration>,
    max_failed: Option<u64>,
    failed_since: Option<Duration>,
}

/// What a [`HealthCheck`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// When the check ran.
    pub at: DateTime<Utc>,
    /// How long the oldest unsent row has waited, in seconds (none waiting: `None`).
    pub oldest_pending_age_seconds: Option<u64>,
    /// FAILED rows counted (written within `failed_since`, when set).
    pub failed: u64,
    /// The first threshold crossed, as one line; `None` when healthy.
    pub crossed: Option<String>,
}

impl HealthCheck {
    /// No threshold yet.
    pub fn new() -> HealthCheck {
        HealthCheck::default()
    }

    /// Unhealthy when an unsent row has waited longer than `age`: the relay is behind or down.
    pub fn max_pending_age(mut self, age: Duration) -> HealthCheck {
        self.max_pending_age = Some(age);
        self
    }

    /// Unhealthy when more than `count` rows are FAILED.
    pub fn max_failed(mut self, count: u64) -> HealthCheck {
        self.max_failed = Some(count);
        self
    }

    /// Count only the FAILED rows written within `window` (for example the last hour), so that
    /// an old failure already looked at does not keep the check red.
    pub fn failed_since(mut self, window: Duration) -> HealthCheck {
        self.failed_since = Some(window);
        self
    }

    /// Runs the check: two indexed queries.
    pub async fn run(&self, db: &DatabaseConnection) -> Result<Health, Error> {
        let at = Utc::now();
        let (_, oldest) = super::pending(db).await?;
        let oldest_pending_age_seconds =
            oldest.map(|added| u64::try_from((at - added).num_seconds()).unwrap_or(0));

        let mut failed = Entity::find().filter(Column::Status.eq(Status::Failed));
        if let Some(window) = self.failed_since {
            let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
            let cutoff = at
                .checked_sub_signed(window)
                .unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
            failed = failed.filter(Column::Added.gte(cutoff));
        }
        let failed = failed.count(db).await?;

        let mut crossed = None;
        if let (Some(limit), Some(age)) = (self.max_pending_age, oldest_pending_age_seconds)
            && age > limit.as_secs()
        {
            crossed = Some(format!(
                "the oldest unsent row has waited {age} s, more than {} s",
                limit.as_secs()
            ));
        }
        if crossed.is_none()
            && let Some(limit) = self.max_failed
            && failed > limit
        {
            let window = match self.failed_since {
                Some(window) => format!(" written in the last {} s", window.as_secs()),
                None => String::new(),
            };
            crossed = Some(format!("{failed} FAILED rows{window}, more than {limit}"));
        }
        Ok(Health {
            at,
            oldest_pending_age_seconds,
            failed,
            crossed,
        })
    }
}
