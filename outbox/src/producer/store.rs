//! The relay's statements on the outbox table: claim a batch, mark it sent, release it, retry or
//! fail a refused row, expire old rows, delete sent ones. Every statement that ends a claim
//! touches only rows that still hold the claim's token, so a relay that lost its lease (it was
//! paused past it and another relay took the rows over) changes nothing.
//!
//! The retention helpers ([`take_housekeeping_turn`], [`delete_in_batches`]) serve the consumer's
//! inbox cleanup as well.

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::sea_query::{Condition, Expr, ExprTrait, LockBehavior, LockType, OnConflict, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait,
    FromQueryResult, IdenStatic, QueryFilter, SqliteTransactionMode, Statement, TransactionOptions,
    TransactionTrait,
};
use uuid::Uuid;

use sea_orm::ActiveEnum;

use crate::published::{Column, Entity, Model, Status};

/// Rows deleted per statement by the retention cleanup.
const DELETE_BATCH: u64 = 1000;

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn to_chrono(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

/// A claimed batch: the rows, oldest first, and the token they hold.
pub(crate) struct Claim {
    pub token: Uuid,
    pub rows: Vec<Model>,
}

/// Due rows: waiting, not held by a live lease, past their retry pause, not expired.
fn due(now: DateTime<Utc>) -> sea_orm::sea_query::Condition {
    sea_orm::sea_query::Condition::all()
        .add(Expr::col(Column::Status).eq(Status::Schedule.to_value()))
        .add(
            sea_orm::sea_query::Condition::any()
                .add(Expr::col(Column::LockedUntil).is_null())
                .add(Expr::col(Column::LockedUntil).lt(now)),
        )
        .add(
            sea_orm::sea_query::Condition::any()
                .add(Expr::col(Column::NextAttemptAt).is_null())
                .add(Expr::col(Column::NextAttemptAt).lte(now)),
        )
        .add(Expr::col(Column::ExpiresAt).gte(now))
}

/// Claims up to `limit` due rows, oldest first, for `lease`. The claim is committed before this
/// returns: no transaction or lock is held while the rows are sent.
pub(crate) async fn claim_batch(
    db: &DatabaseConnection,
    limit: u32,
    lease: Duration,
) -> Result<Claim, DbErr> {
    let token = Uuid::new_v4();
    let now = now();
    let locked_until = now + to_chrono(lease);
    let backend = db.get_database_backend();

    let mut due_ids = Query::select();
    due_ids
        .column(Column::Id)
        .from(Entity)
        .cond_where(due(now))
        .order_by(Column::Added, sea_orm::Order::Asc)
        .limit(u64::from(limit));

    let mut rows = match backend {
        DbBackend::Postgres => {
            // `= ANY(ARRAY(...))` rather than `IN (...)`: the planner then updates the claimed
            // rows by primary key instead of hashing the whole table on every claim.
            let claim = Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE published SET claim_token = $1, locked_until = $2 \
                 WHERE id = ANY(ARRAY( \
                     SELECT id FROM published \
                     WHERE status = $3 \
                       AND (locked_until IS NULL OR locked_until < $4) \
                       AND (next_attempt_at IS NULL OR next_attempt_at <= $4) \
                       AND expires_at >= $4 \
                     ORDER BY added LIMIT $5 \
                     FOR UPDATE SKIP LOCKED)) \
                 RETURNING *",
                [
                    token.into(),
                    locked_until.into(),
                    Status::Schedule.to_value().into(),
                    now.into(),
                    i64::from(limit).into(),
                ],
            );
            let result = db.query_all_raw(claim).await?;
            result
                .iter()
                .map(|row| Model::from_query_result(row, ""))
                .collect::<Result<Vec<_>, _>>()?
        }
        DbBackend::Sqlite => {
            // SQLite has no row locks: BEGIN IMMEDIATE takes the write lock up front, so two
            // relays on one file never read the same due rows.
            let txn = db
                .begin_with_options(TransactionOptions {
                    sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                    ..Default::default()
                })
                .await?;
            let claim = Query::update()
                .table(Entity)
                .value(Column::ClaimToken, token)
                .value(Column::LockedUntil, locked_until)
                .and_where(Expr::col(Column::Id).in_subquery(due_ids))
                .returning_all()
                .to_owned();
            let result = txn.query_all(&claim).await?;
            txn.commit().await?;
            result
                .iter()
                .map(|row| Model::from_query_result(row, ""))
                .collect::<Result<Vec<_>, _>>()?
        }
        _ => {
            // MariaDB refuses LIMIT inside IN (SELECT ...) and has no UPDATE ... RETURNING:
            // lock the ids with SKIP LOCKED, update them by id, then read them by token.
            due_ids.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
            let txn = db.begin().await?;
            let ids: Vec<Uuid> = txn
                .query_all(&due_ids)
                .await?
                .iter()
                .map(|row| row.try_get::<Uuid>("", Column::Id.as_str()))
                .collect::<Result<_, _>>()?;
            if ids.is_empty() {
                txn.commit().await?;
                return Ok(Claim {
                    token,
                    rows: Vec::new(),
                });
            }
            let claim = Query::update()
                .table(Entity)
                .value(Column::ClaimToken, token)
                .value(Column::LockedUntil, locked_until)
                .and_where(Expr::col(Column::Id).is_in(ids))
                .to_owned();
            txn.execute(&claim).await?;
            txn.commit().await?;
            Entity::find()
                .filter(Column::ClaimToken.eq(token))
                .all(db)
                .await?
        }
    };
    rows.sort_by_key(|row| row.added);
    Ok(Claim { token, rows })
}

/// An UPDATE of the claimed rows `ids` that still hold `token`.
fn update_claimed(ids: &[Uuid], token: Uuid) -> sea_orm::sea_query::UpdateStatement {
    Query::update()
        .table(Entity)
        .value(Column::ClaimToken, Option::<Uuid>::None)
        .value(Column::LockedUntil, Option::<DateTime<Utc>>::None)
        .and_where(Expr::col(Column::Id).is_in(ids.iter().copied()))
        .and_where(Expr::col(Column::ClaimToken).eq(token))
        .to_owned()
}

/// Marks receipted rows SUCCEEDED, in one statement. Returns how many rows it changed.
pub(crate) async fn mark_sent(
    db: &DatabaseConnection,
    ids: &[Uuid],
    token: Uuid,
) -> Result<u64, DbErr> {
    if ids.is_empty() {
        return Ok(0);
    }
    let mut update = update_claimed(ids, token);
    update
        .value(Column::Status, Status::Succeeded.to_value())
        .value(Column::LastError, Option::<String>::None);
    Ok(db.execute(&update).await?.rows_affected())
}

/// Gives rows back unchanged (a connection problem is not the rows' fault: no retry is spent).
pub(crate) async fn release(
    db: &DatabaseConnection,
    ids: &[Uuid],
    token: Uuid,
) -> Result<u64, DbErr> {
    if ids.is_empty() {
        return Ok(0);
    }
    Ok(db
        .execute(&update_claimed(ids, token))
        .await?
        .rows_affected())
}

/// What the retry policy decided for a refused row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Try again at this time.
    RetryAt(DateTime<Utc>),
    /// Attempts exhausted: the row is FAILED.
    Failed,
}

/// The retry policy: attempts 1 and 2 again at once, a long pause after the third failure, a
/// shorter one after each later failure, FAILED after `max_attempts`.
pub(crate) fn after_failure(
    failures: u32,
    max_attempts: u32,
    pause_for_retry: Duration,
    wait_retry: Duration,
    now: DateTime<Utc>,
) -> Refusal {
    if failures >= max_attempts {
        return Refusal::Failed;
    }
    let pause = match failures {
        0..=2 => Duration::ZERO,
        3 => pause_for_retry,
        _ => wait_retry,
    };
    Refusal::RetryAt(now + to_chrono(pause))
}

/// Records a broker refusal of one row: a retry spent, and either a pause or FAILED.
pub(crate) async fn record_refusal(
    db: &DatabaseConnection,
    row: &Model,
    token: Uuid,
    decision: &Refusal,
    error: &str,
) -> Result<u64, DbErr> {
    let mut update = update_claimed(&[row.id], token);
    update
        .value(Column::Retry, row.retry.saturating_add(1))
        .value(Column::LastError, error.to_owned());
    match decision {
        Refusal::RetryAt(at) => update.value(Column::NextAttemptAt, *at),
        Refusal::Failed => update.value(Column::Status, Status::Failed.to_value()),
    };
    Ok(db.execute(&update).await?.rows_affected())
}

/// Marks unsent rows past `expires_at` FAILED, with the reason. Returns how many.
pub(crate) async fn expire(db: &DatabaseConnection) -> Result<u64, DbErr> {
    let now = now();
    let update = Query::update()
        .table(Entity)
        .value(Column::Status, Status::Failed.to_value())
        .value(
            Column::LastError,
            "expired: not sent before expires_at".to_owned(),
        )
        .and_where(Expr::col(Column::Status).eq(Status::Schedule.to_value()))
        .and_where(Expr::col(Column::ExpiresAt).lt(now))
        .cond_where(
            sea_orm::sea_query::Condition::any()
                .add(Expr::col(Column::LockedUntil).is_null())
                .add(Expr::col(Column::LockedUntil).lt(now)),
        )
        .to_owned();
    Ok(db.execute(&update).await?.rows_affected())
}

/// The housekeeping task that deletes old sent rows.
const CLEANUP_TASK: &str = "published_cleanup";

/// Takes the relay's cleanup turn: [`take_housekeeping_turn`] for old sent rows.
pub(crate) async fn take_cleanup_turn(
    db: &DatabaseConnection,
    every: Duration,
) -> Result<bool, DbErr> {
    take_housekeeping_turn(db, CLEANUP_TASK, every).await
}

/// Takes the turn of housekeeping `task` if nobody took it within `every`: one process among all
/// those sharing the database wins it per period.
pub(crate) async fn take_housekeeping_turn(
    db: &DatabaseConnection,
    task: &str,
    every: Duration,
) -> Result<bool, DbErr> {
    let now = now();
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
        .value(housekeeping::LastRunAt, now)
        .and_where(Expr::col(housekeeping::Task).eq(task))
        .and_where(Expr::col(housekeeping::LastRunAt).lt(now - to_chrono(every)))
        .to_owned();
    Ok(db.execute(&take).await?.rows_affected() == 1)
}

/// Deletes SUCCEEDED rows written before `cutoff`, a bounded batch per statement. Never touches
/// unsent rows. Returns how many rows it deleted.
pub(crate) async fn delete_sent_before(
    db: &DatabaseConnection,
    cutoff: DateTime<Utc>,
) -> Result<u64, DbErr> {
    let old_and_sent = Condition::all()
        .add(Expr::col(Column::Status).eq(Status::Succeeded.to_value()))
        .add(Expr::col(Column::Added).lt(cutoff));
    delete_in_batches(db, Entity, Column::Id, old_and_sent).await
}

/// Deletes the rows of `entity` (keyed by the UUID column `id`) that match `condition`, a bounded
/// batch per statement, so that no statement holds locks on a large part of the table. Returns
/// how many rows it deleted.
pub(crate) async fn delete_in_batches<E: EntityTrait>(
    db: &DatabaseConnection,
    entity: E,
    id: E::Column,
    condition: Condition,
) -> Result<u64, DbErr> {
    let mut deleted = 0;
    loop {
        let select = Query::select()
            .column(id)
            .from(entity)
            .cond_where(condition.clone())
            .limit(DELETE_BATCH)
            .to_owned();
        let ids: Vec<Uuid> = db
            .query_all(&select)
            .await?
            .iter()
            .map(|row| row.try_get::<Uuid>("", id.as_str()))
            .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Ok(deleted);
        }
        // The condition again: a row changed since the select (a retried send) is kept.
        let delete = Query::delete()
            .from_table(entity)
            .and_where(Expr::col(id).is_in(ids.iter().copied()))
            .cond_where(condition.clone())
            .to_owned();
        deleted += db.execute(&delete).await?.rows_affected();
        if (ids.len() as u64) < DELETE_BATCH {
            return Ok(deleted);
        }
    }
}

/// The `outbox_housekeeping` table.
mod housekeeping {
    #[derive(sea_orm::DeriveIden, Clone, Copy)]
    pub enum OutboxHousekeeping {
        Table,
        Task,
        LastRunAt,
    }

    pub use OutboxHousekeeping::{LastRunAt, Table, Task};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_schedule_is_the_seed_s() {
        let now = Utc::now();
        let (pause, wait) = (Duration::from_secs(240), Duration::from_secs(60));
        let at = |n| after_failure(n, 50, pause, wait, now);
        assert_eq!(at(1), Refusal::RetryAt(now));
        assert_eq!(at(2), Refusal::RetryAt(now));
        assert_eq!(
            at(3),
            Refusal::RetryAt(now + chrono::Duration::seconds(240))
        );
        assert_eq!(at(4), Refusal::RetryAt(now + chrono::Duration::seconds(60)));
        assert_eq!(
            at(49),
            Refusal::RetryAt(now + chrono::Duration::seconds(60))
        );
        assert_eq!(at(50), Refusal::Failed);
    }
}
