//! Retention: deleting old rows (sent outbox rows, inbox rows past their deduplication window)
//! and expiring unsent ones, off the hot path. Each job runs on a task of its own, in bounded
//! batches with a pause between them, so that a day of backlog never holds a lock on much of a
//! table nor keeps the relay's or the consumer's statements waiting for long, and the task can be
//! stopped between any two statements (it is aborted: no statement holds more than one batch).
//!
//! Among all the processes sharing a database, one takes a job's turn per period
//! ([`take_housekeeping_turn`], a row per job in `outbox_housekeeping`).
//!
//! The jobs: [`published`] (expiry of unsent rows, deletion of old sent ones; the relay runs it),
//! [`inbox`] (deletion of inbox rows past the deduplication window; the consumer runs it), and
//! the purge that `outbox purge` runs by hand ([`delete_in_batches`]). Each runs on
//! [`run_every`], the one ticker loop.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Condition, Expr, ExprTrait, OnConflict, Query};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, EntityTrait};

use crate::db::batch;
pub(crate) use crate::db::batch::Step;
use crate::db::bounds::DbBounds;
use crate::db::clock::{db_now, db_time};
use crate::db::errors::redacted;
use crate::tables::housekeeping;

pub(crate) mod inbox;
pub(crate) mod published;

/// Rows a retention statement touches at most.
pub(crate) const BATCH: u64 = 1000;

/// The pause between two retention statements: the database serves the relay and the consumers
/// in between.
pub(crate) const PAUSE: Duration = Duration::from_millis(20);

/// How a retention job paces itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    /// Rows per statement.
    pub batch: u64,
    /// The pause between statements.
    pub pause: Duration,
    /// The bounds of each statement, for the jobs that run on their own (a connection that
    /// stopped answering would otherwise end their ticks for good).
    pub bounds: Option<DbBounds>,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            batch: BATCH,
            pause: PAUSE,
            bounds: None,
        }
    }
}

impl Pace {
    /// The default pace, each statement within `bounds`.
    pub(crate) fn bounded(bounds: DbBounds) -> Pace {
        Pace {
            bounds: Some(bounds),
            ..Pace::default()
        }
    }

    /// Runs one statement within the bounds, if any.
    pub(crate) async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, DbErr>>,
    ) -> Result<T, DbErr> {
        match &self.bounds {
            Some(bounds) => bounds.call(call).await,
            None => call.await,
        }
    }
}

/// Runs `step` (which handles at most `pace.batch` rows) until a step finds less than a batch,
/// pausing between steps. Returns the total done.
pub(crate) async fn in_batches<F, Fut>(pace: Pace, mut step: F) -> Result<u64, DbErr>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<Step, DbErr>>,
{
    let mut total = 0;
    loop {
        let step = pace.call(step(pace.batch)).await?;
        total += step.done;
        if !step.more {
            return Ok(total);
        }
        if !pace.pause.is_zero() {
            tokio::time::sleep(pace.pause).await;
        }
    }
}

/// Takes the turn of housekeeping `task` if nobody took it within `every` (by the database's
/// clock): one process among all those sharing the database wins it per period.
pub(crate) async fn take_housekeeping_turn(
    db: &DatabaseConnection,
    task: &str,
    every: Duration,
) -> Result<bool, DbErr> {
    let backend = db.get_database_backend();
    let never = DateTime::<Utc>::UNIX_EPOCH;
    let insert = Query::insert()
        .into_table(housekeeping::Table)
        .columns([housekeeping::Task, housekeeping::LastRunAt])
        .values_panic([task.into(), never.into()])
        .on_conflict(
            OnConflict::column(housekeeping::Task)
                .do_nothing_on([housekeeping::Task])
                .to_owned(),
        )
        .to_owned();
    db.execute(&insert).await?;
    let take = Query::update()
        .table(housekeeping::Table)
        .value(housekeeping::LastRunAt, db_now(backend))
        .and_where(Expr::col(housekeeping::Task).eq(task))
        .and_where(Expr::col(housekeeping::LastRunAt).lt(db_time(backend, every, false)))
        .to_owned();
    Ok(db.execute(&take).await?.rows_affected() == 1)
}

/// Deletes at most `limit` rows of `entity` (keyed by the UUID column `id`) that match
/// `condition`.
pub(crate) async fn delete_some<E: EntityTrait>(
    db: &DatabaseConnection,
    entity: E,
    id: E::Column,
    condition: Condition,
    limit: u64,
) -> Result<Step, DbErr> {
    batch::act_on_some(db, entity, id, condition, limit, |ids, condition| {
        Query::delete()
            .from_table(entity)
            .and_where(Expr::col(id).is_in(ids))
            .cond_where(condition)
            .to_owned()
    })
    .await
}

/// Deletes every row of `entity` matching `condition`, [`delete_some`] after [`delete_some`] at
/// the given pace. Returns how many rows it deleted.
pub(crate) async fn delete_paced<E: EntityTrait + Copy>(
    db: &DatabaseConnection,
    entity: E,
    id: E::Column,
    condition: Condition,
    pace: Pace,
) -> Result<u64, DbErr>
where
    E::Column: Copy,
{
    in_batches(pace, |limit| {
        delete_some(db, entity, id, condition.clone(), limit)
    })
    .await
}

/// Deletes the rows of `entity` (keyed by the UUID column `id`) that match `condition`, a
/// bounded batch per statement, without pauses (for commands run by hand, such as a purge).
pub(crate) async fn delete_in_batches<E: EntityTrait + Copy>(
    db: &DatabaseConnection,
    entity: E,
    id: E::Column,
    condition: Condition,
) -> Result<u64, DbErr>
where
    E::Column: Copy,
{
    let pace = Pace {
        pause: Duration::ZERO,
        ..Pace::default()
    };
    delete_paced(db, entity, id, condition, pace).await
}

/// Runs `job` every `every` (the first time after one period) until the task is aborted. A
/// failure is logged under `job_name` and tried again at the next tick, never fatal.
pub(crate) async fn run_every<F, Fut>(every: Duration, job_name: &str, mut job: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), DbErr>>,
{
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(err) = job().await {
            tracing::warn!(error = %redacted(&err), job = job_name, "retention failed; trying again later");
        }
    }
}
