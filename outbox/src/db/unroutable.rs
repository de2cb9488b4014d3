//! The rows waiting for a queue at their destination (the broker returned their messages: no
//! queue was bound), as the relay parks them behind one probe per destination, and the one
//! statement that makes them due together again: when a message to the destination routes (the
//! relay), or when `outbox declare` bound a queue for it (the operations).
//!
//! A waiting row is a row of the destination still to be sent (SCHEDULE), held by no live
//! claim, whose `next_attempt_at` is in the future; rows of the destination in a retry pause
//! after a refusal are among them and are woken too. The destination's entry in
//! `outbox_unroutable` is forgotten apart ([`forget`]): a database that lacks that table still
//! gets its rows woken.

use sea_orm::sea_query::{Condition, Expr, ExprTrait, Query};
use sea_orm::{ActiveEnum, ConnectionTrait, DbBackend, DbErr};

use super::batch;
use super::clock::db_now;
use crate::tables::published::{Column, Entity, Status};
use crate::tables::unroutable;

/// Rows woken per statement: no statement holds locks on a large part of the table.
const WAKE_BATCH: u64 = 1000;

/// The rows of `destination` that wait on a pause: still to be sent, held by no live claim,
/// their next attempt in the future.
pub(crate) fn waiting(backend: DbBackend, destinations: &[String]) -> Condition {
    Condition::all()
        .add(Expr::col(Column::Destination).is_in(destinations.iter().cloned()))
        .add(Expr::col(Column::Status).eq(Status::Schedule.to_value()))
        .add(
            Condition::any()
                .add(Expr::col(Column::LockedUntil).is_null())
                .add(Expr::col(Column::LockedUntil).lt(db_now(backend))),
        )
        .add(Expr::col(Column::NextAttemptAt).gt(db_now(backend)))
}

/// Makes every waiting row of `destinations` due now, a bounded batch per statement; returns
/// how many rows it woke.
pub(crate) async fn wake<C: ConnectionTrait>(
    db: &C,
    destinations: &[String],
) -> Result<u64, DbErr> {
    if destinations.is_empty() {
        return Ok(0);
    }
    let mut wake = Query::update();
    wake.table(Entity).value(
        Column::NextAttemptAt,
        Option::<chrono::DateTime<chrono::Utc>>::None,
    );
    let waiting = waiting(db.get_database_backend(), destinations);
    batch::update_all(db, Entity, Column::Id, waiting, WAKE_BATCH, wake).await
}

/// Deletes the entries of `destinations` from `outbox_unroutable`: they route again.
pub(crate) async fn forget<C: ConnectionTrait>(
    db: &C,
    destinations: &[String],
) -> Result<u64, DbErr> {
    if destinations.is_empty() {
        return Ok(0);
    }
    let delete = Query::delete()
        .from_table(unroutable::Entity)
        .and_where(Expr::col(unroutable::Column::Destination).is_in(destinations.iter().cloned()))
        .to_owned();
    Ok(db.execute(&delete).await?.rows_affected())
}
