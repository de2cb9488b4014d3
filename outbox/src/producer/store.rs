//! The relay's statements on the outbox table: claim a batch, mark it sent, release it, retry or
//! fail a refused row. (Expiring and deleting old rows is retention's.) Every statement that ends a claim
//! touches only rows that still hold the claim's token, so a relay that lost its lease (it was
//! paused past it and another relay took the rows over) changes nothing.
//!
//! Times that other relays compare (`locked_until`, `next_attempt_at`, what is due) come from the
//! database's clock ([`crate::db::clock`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, LockBehavior, LockType, OnConflict, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait,
    FromQueryResult, IdenStatic, QueryFilter, QuerySelect, SqliteTransactionMode, Statement,
    TransactionOptions, TransactionTrait,
};
use uuid::Uuid;

use sea_orm::ActiveEnum;

use crate::db::batch;
use crate::db::clock::{db_now, db_time, micros};
use crate::db::unroutable::waiting;
use crate::tables::published::{Column, Entity, Model, Status};
use crate::tables::unroutable;

/// A claimed batch: the rows, oldest first, and the token they hold.
pub(crate) struct Claim {
    pub token: Uuid,
    pub rows: Vec<Model>,
}

/// Due rows: waiting, not held by a live lease, past their retry pause, not expired, by the
/// database's clock.
fn due(backend: DbBackend) -> sea_orm::sea_query::Condition {
    let now = || db_now(backend);
    sea_orm::sea_query::Condition::all()
        .add(Expr::col(Column::Status).eq(Status::Schedule.to_value()))
        .add(
            sea_orm::sea_query::Condition::any()
                .add(Expr::col(Column::LockedUntil).is_null())
                .add(Expr::col(Column::LockedUntil).lt(now())),
        )
        .add(
            sea_orm::sea_query::Condition::any()
                .add(Expr::col(Column::NextAttemptAt).is_null())
                .add(Expr::col(Column::NextAttemptAt).lte(now())),
        )
        .add(Expr::col(Column::ExpiresAt).gte(now()))
}

/// The condition that keeps each key's order: a row without a key is always free; a keyed row
/// only when no earlier row of its key (by `seq`; by `rowid` on SQLite) is unsent: waiting,
/// claimed by a relay, in a retry pause, or FAILED. So at most one row of a key is ever claimed,
/// and a refused row is retried before any later row of its key is sent. Read through the
/// partial index over unsent rows (`published_key_unsent_idx`): sent rows cost it nothing.
pub(crate) fn key_is_free(backend: DbBackend) -> String {
    let order = match backend {
        DbBackend::Sqlite => "earlier.rowid < published.rowid",
        _ => "earlier.seq < published.seq",
    };
    format!(
        "(published.msg_key IS NULL OR NOT EXISTS (SELECT 1 FROM published earlier \
         WHERE earlier.msg_key = published.msg_key AND earlier.status <> {sent} \
         AND earlier.msg_key IS NOT NULL AND {order}))",
        sent = SUCCEEDED,
    )
}

/// `Status::Succeeded`'s stored value, for SQL written by hand.
const SUCCEEDED: i32 = 2;

/// Claims up to `limit` due rows, oldest first, for `lease`. The claim is committed before this
/// returns: no transaction or lock is held while the rows are sent.
pub(crate) async fn claim_batch(
    db: &DatabaseConnection,
    limit: u32,
    lease: Duration,
) -> Result<Claim, DbErr> {
    let token = Uuid::new_v4();
    let backend = db.get_database_backend();
    let locked_until = db_time(backend, lease, true);

    let mut due_ids = Query::select();
    due_ids
        .column(Column::Id)
        .from(Entity)
        .cond_where(due(backend))
        .and_where(Expr::cust(key_is_free(backend)))
        .order_by(Column::Added, sea_orm::Order::Asc)
        .limit(u64::from(limit));

    let mut rows = match backend {
        DbBackend::Postgres => {
            // `= ANY(ARRAY(...))` rather than `IN (...)`: the planner then updates the claimed
            // rows by primary key instead of hashing the whole table on every claim.
            // `now()` is the statement's transaction start: one instant for the whole claim.
            // The key condition reads the rows of earlier claims as committed: a row another
            // relay holds is still unsent there, and blocks its key.
            let claim = Statement::from_sql_and_values(
                DbBackend::Postgres,
                format!(
                    "UPDATE published SET claim_token = $1, \
                         locked_until = now() + $2 * interval '1 microsecond' \
                     WHERE id = ANY(ARRAY( \
                         SELECT id FROM published \
                         WHERE status = $3 \
                           AND (locked_until IS NULL OR locked_until < now()) \
                           AND (next_attempt_at IS NULL OR next_attempt_at <= now()) \
                           AND expires_at >= now() \
                           AND {free} \
                         ORDER BY added LIMIT $4 \
                         FOR UPDATE SKIP LOCKED)) \
                     RETURNING *",
                    free = key_is_free(DbBackend::Postgres)
                ),
                [
                    token.into(),
                    micros(lease).into(),
                    Status::Schedule.to_value().into(),
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
            // lock the ids with SKIP LOCKED, update them by id, then read them back by id (the
            // primary key; no index covers the token).
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
                .and_where(Expr::col(Column::Id).is_in(ids.iter().copied()))
                .to_owned();
            txn.execute(&claim).await?;
            txn.commit().await?;
            Entity::find()
                .filter(Column::Id.is_in(ids))
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

/// Gives rows back to wait `pause` (by the database's clock) before their next attempt, with
/// `error` as their `last_error`, spending no retry: for a message the broker returned (no queue
/// bound) or nacked (back-pressure). `error` `None` keeps the rows' `last_error`.
pub(crate) async fn release_after(
    db: &DatabaseConnection,
    ids: &[Uuid],
    token: Uuid,
    pause: Duration,
    error: Option<&str>,
) -> Result<u64, DbErr> {
    if ids.is_empty() {
        return Ok(0);
    }
    let mut update = update_claimed(ids, token);
    update.value(
        Column::NextAttemptAt,
        db_time(db.get_database_backend(), pause, true),
    );
    if let Some(error) = error {
        update.value(Column::LastError, error.to_owned());
    }
    Ok(db.execute(&update).await?.rows_affected())
}

/// Records that messages to `destinations` (each once, with the broker's reply) came back
/// because no queue was bound to them: a row of `outbox_unroutable` each, in one statement,
/// whose `since` is kept while the destination stays unroutable.
pub(crate) async fn record_unroutable(
    db: &DatabaseConnection,
    destinations: &[(String, String)],
) -> Result<(), DbErr> {
    if destinations.is_empty() {
        return Ok(());
    }
    let backend = db.get_database_backend();
    let mut insert = Query::insert();
    insert.into_table(unroutable::Entity).columns([
        unroutable::Column::Destination,
        unroutable::Column::Reply,
        unroutable::Column::Since,
        unroutable::Column::LastReturnedAt,
    ]);
    for (destination, reply) in destinations {
        insert.values_panic([
            destination.as_str().into(),
            reply.as_str().into(),
            db_now(backend),
            db_now(backend),
        ]);
    }
    insert.on_conflict(
        OnConflict::column(unroutable::Column::Destination)
            .update_columns([
                unroutable::Column::Reply,
                unroutable::Column::LastReturnedAt,
            ])
            .to_owned(),
    );
    db.execute(&insert).await?;
    Ok(())
}

/// The oldest row of `destination` that waits on a pause ([`crate::db::unroutable::waiting`]):
/// its id and when it was written.
pub(crate) async fn oldest_waiting(
    db: &DatabaseConnection,
    destination: &str,
) -> Result<Option<(Uuid, DateTime<Utc>)>, DbErr> {
    let oldest = Query::select()
        .columns([Column::Id, Column::Added])
        .from(Entity)
        .cond_where(waiting(
            db.get_database_backend(),
            &[destination.to_owned()],
        ))
        // Rows written in one transaction share their `added`: the id breaks the tie, so that
        // every batch of the destination finds the same probe.
        .order_by(Column::Added, sea_orm::Order::Asc)
        .order_by(Column::Id, sea_orm::Order::Asc)
        .limit(1)
        .to_owned();
    match db.query_one(&oldest).await? {
        Some(row) => Ok(Some((
            row.try_get::<Uuid>("", Column::Id.as_str())?,
            row.try_get::<DateTime<Utc>>("", Column::Added.as_str())?,
        ))),
        None => Ok(None),
    }
}

/// Brings the waiting row `id` forward to `pause` from now, unless it is due sooner already.
pub(crate) async fn probe_after(
    db: &DatabaseConnection,
    id: Uuid,
    destination: &str,
    pause: Duration,
) -> Result<u64, DbErr> {
    let backend = db.get_database_backend();
    let probe = Query::update()
        .table(Entity)
        .value(Column::NextAttemptAt, db_time(backend, pause, true))
        .and_where(Expr::col(Column::Id).eq(id))
        .cond_where(waiting(backend, &[destination.to_owned()]))
        .and_where(Expr::col(Column::NextAttemptAt).gt(db_time(backend, pause, true)))
        .to_owned();
    Ok(db.execute(&probe).await?.rows_affected())
}

/// Parks the rows of `destination` that wait on a pause, `probe` aside, behind the probe: each
/// that would come due before `pause + parked / 2` from now waits until `pause + parked` from
/// now, a bounded batch per statement. The rows parked by an earlier probe are pushed again only
/// when they would otherwise come due before this one has had its chance.
pub(crate) async fn park_behind(
    db: &DatabaseConnection,
    destination: &str,
    probe: Uuid,
    pause: Duration,
    parked: Duration,
) -> Result<u64, DbErr> {
    let backend = db.get_database_backend();
    let condition = waiting(backend, &[destination.to_owned()])
        .add(Expr::col(Column::Id).ne(probe))
        .add(Expr::col(Column::NextAttemptAt).lt(db_time(backend, pause + parked / 2, true)));
    let mut park = Query::update();
    park.table(Entity).value(
        Column::NextAttemptAt,
        db_time(backend, pause + parked, true),
    );
    batch::update_all(db, Entity, Column::Id, condition, PARK_BATCH, park).await
}

/// Rows parked per statement.
const PARK_BATCH: u64 = 1000;

/// The destinations recorded in `outbox_unroutable`.
pub(crate) async fn unroutable_destinations(db: &DatabaseConnection) -> Result<Vec<String>, DbErr> {
    unroutable::Entity::find()
        .select_only()
        .column(unroutable::Column::Destination)
        .into_tuple()
        .all(db)
        .await
}

/// The pause before the next attempt of a row that no queue took,
/// `age` after it was written: half its age (so a row waiting for a queue is tried at
/// geometrically spaced times, a few dozen attempts over a month), at least a second, at most
/// `maximum_backoff`. No count is kept, so nothing of the row's retries is spent.
pub(crate) fn unroutable_pause(age: Duration, maximum_backoff: Duration) -> Duration {
    (age / 2).clamp(Duration::from_secs(1).min(maximum_backoff), maximum_backoff)
}

/// How much longer than its destination's probe a row parked behind it waits: long enough that
/// the probe's next return parks it again before it comes due (the relay takes `maximum_backoff`
/// at most between two probes), and short enough that the parked rows probe by themselves
/// should the probe be gone (expired, deleted) with nothing else of the destination to send.
pub(crate) fn parked_beyond_probe(maximum_backoff: Duration) -> Duration {
    maximum_backoff.max(Duration::from_secs(60))
}

/// Extends the lease of the claimed rows `ids` that still hold `token` to `lease` from now (by
/// the database's clock). Returns the ids that still hold it: the others were taken over by
/// another relay after this one's lease ran out, and must not be sent by this one.
pub(crate) async fn extend_lease(
    db: &DatabaseConnection,
    ids: &[Uuid],
    token: Uuid,
    lease: Duration,
) -> Result<Vec<Uuid>, DbErr> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let backend = db.get_database_backend();
    let extend = Query::update()
        .table(Entity)
        .value(Column::LockedUntil, db_time(backend, lease, true))
        .and_where(Expr::col(Column::Id).is_in(ids.iter().copied()))
        .and_where(Expr::col(Column::ClaimToken).eq(token))
        .to_owned();
    let extended = db.execute(&extend).await?.rows_affected();
    if extended == ids.len() as u64 {
        return Ok(ids.to_vec());
    }
    let held = Query::select()
        .column(Column::Id)
        .from(Entity)
        .and_where(Expr::col(Column::Id).is_in(ids.iter().copied()))
        .and_where(Expr::col(Column::ClaimToken).eq(token))
        .to_owned();
    db.query_all(&held)
        .await?
        .iter()
        .map(|row| row.try_get::<Uuid>("", Column::Id.as_str()))
        .collect()
}

/// What the retry policy decided for a refused row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Try again after this pause (from the database's clock at the time of recording).
    RetryAfter(Duration),
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
) -> Refusal {
    if failures >= max_attempts {
        return Refusal::Failed;
    }
    let pause = match failures {
        0..=2 => Duration::ZERO,
        3 => pause_for_retry,
        _ => wait_retry,
    };
    Refusal::RetryAfter(pause)
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
        Refusal::RetryAfter(pause) => update.value(
            Column::NextAttemptAt,
            db_time(db.get_database_backend(), *pause, true),
        ),
        Refusal::Failed => update.value(Column::Status, Status::Failed.to_value()),
    };
    Ok(db.execute(&update).await?.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unroutable_row_waits_half_its_age_within_the_bounds() {
        let max = Duration::from_secs(3600);
        assert_eq!(
            unroutable_pause(Duration::ZERO, max),
            Duration::from_secs(1)
        );
        assert_eq!(
            unroutable_pause(Duration::from_secs(60), max),
            Duration::from_secs(30)
        );
        assert_eq!(unroutable_pause(Duration::from_secs(86_400), max), max);
        let tiny = Duration::from_millis(100);
        assert_eq!(unroutable_pause(Duration::from_secs(60), tiny), tiny);
    }

    #[test]
    fn the_retry_schedule_is_the_seed_s() {
        let (pause, wait) = (Duration::from_secs(240), Duration::from_secs(60));
        let at = |n| after_failure(n, 50, pause, wait);
        assert_eq!(at(1), Refusal::RetryAfter(Duration::ZERO));
        assert_eq!(at(2), Refusal::RetryAfter(Duration::ZERO));
        assert_eq!(at(3), Refusal::RetryAfter(pause));
        assert_eq!(at(4), Refusal::RetryAfter(wait));
        assert_eq!(at(49), Refusal::RetryAfter(wait));
        assert_eq!(at(50), Refusal::Failed);
    }
}
