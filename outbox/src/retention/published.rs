//! Retention of the outbox table: unsent rows past `expires_at` marked FAILED, and sent rows
//! older than `days_to_keep_data` deleted when it is this process's turn. The relay runs it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::sea_query::{Condition, Expr, ExprTrait, Query};
use sea_orm::{ActiveEnum, DatabaseConnection, DbBackend, DbErr};

use super::Step;
use crate::config::OutboxConfig;
use crate::db::batch;
use crate::db::bounds::DbBounds;
use crate::db::clock::{db_now, db_time};
use crate::tables::published::{Column, Entity, Status};

/// The housekeeping task that deletes old sent rows (a row of `outbox_housekeeping`).
const CLEANUP_TASK: &str = "published_cleanup";

/// How often the relay expires rows and asks whether the cleanup is its turn.
const EVERY: Duration = Duration::from_secs(60);

/// The relay's retention task: [`run_once`] every minute, until aborted.
pub(crate) async fn keep(db: DatabaseConnection, config: Arc<OutboxConfig>) {
    let pace = super::Pace::bounded(DbBounds::new(&config));
    super::run_every(EVERY, "outbox rows", || run_once(&db, &config, pace)).await
}

/// Expires unsent rows past their `expires_at`, then, when it is this process's turn, deletes
/// sent rows older than `days_to_keep_data`: both in bounded batches at `pace`.
pub(crate) async fn run_once(
    db: &DatabaseConnection,
    config: &OutboxConfig,
    pace: super::Pace,
) -> Result<(), sea_orm::DbErr> {
    let expired = super::in_batches(pace, |limit| expire_some(db, limit)).await?;
    if expired > 0 {
        crate::metrics::expired(expired);
        tracing::error!(
            expired,
            "outbox rows expired before they could be sent; marked FAILED (see last_error)"
        );
    }
    let turn = super::take_housekeeping_turn(db, CLEANUP_TASK, config.remove_data_cache_ttl);
    if pace.call(turn).await? {
        let keep = Duration::from_secs(u64::from(config.days_to_keep_data) * 86_400);
        let old = sent_before(db.get_database_backend(), keep);
        let started = Instant::now();
        let deleted = super::delete_paced(db, Entity, Column::Id, old, pace).await?;
        tracing::info!(
            deleted,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "old sent rows deleted"
        );
    }
    Ok(())
}

/// Marks at most `limit` unsent rows past `expires_at` FAILED, with the reason (by the
/// database's clock).
pub(crate) async fn expire_some(db: &DatabaseConnection, limit: u64) -> Result<Step, DbErr> {
    let backend = db.get_database_backend();
    let now = || db_now(backend);
    let expired = Condition::all()
        .add(Expr::col(Column::Status).eq(Status::Schedule.to_value()))
        .add(Expr::col(Column::ExpiresAt).lt(now()))
        .add(
            Condition::any()
                .add(Expr::col(Column::LockedUntil).is_null())
                .add(Expr::col(Column::LockedUntil).lt(now())),
        );
    // The condition again: a row claimed or sent since the select is left alone.
    batch::act_on_some(db, Entity, Column::Id, expired, limit, |ids, expired| {
        Query::update()
            .table(Entity)
            .value(Column::Status, Status::Failed.to_value())
            .value(
                Column::LastError,
                "expired: not sent before expires_at".to_owned(),
            )
            .and_where(Expr::col(Column::Id).is_in(ids))
            .cond_where(expired)
            .to_owned()
    })
    .await
}

/// The condition for old sent rows: SUCCEEDED and written more than `keep` ago.
pub(crate) fn sent_before(backend: DbBackend, keep: Duration) -> Condition {
    Condition::all()
        .add(Expr::col(Column::Status).eq(Status::Succeeded.to_value()))
        .add(Expr::col(Column::Added).lt(db_time(backend, keep, false)))
}
