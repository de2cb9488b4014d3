//! Retention of the inbox table: rows older than `days_to_keep_data` deleted when it is this
//! process's turn (at most once per `remove_data_cache_ttl` across every consumer of the
//! database), which bounds the deduplication window. The consumer runs it.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sea_orm::sea_query::{Condition, Expr, ExprTrait};
use sea_orm::{DatabaseConnection, DbErr};

use crate::config::OutboxConfig;
use crate::db::bounds::DbBounds;
use crate::tables::received::{Column, Entity};

/// The housekeeping task that deletes old inbox rows (a row of `outbox_housekeeping`).
const CLEANUP_TASK: &str = "received_cleanup";

/// How often a consumer asks whether the cleanup is its turn.
const EVERY: Duration = Duration::from_secs(60);

/// The consumer's retention task: [`run_once`] every minute, until aborted.
pub(crate) async fn keep(db: DatabaseConnection, config: Arc<OutboxConfig>) {
    let pace = super::Pace::bounded(DbBounds::new(&config));
    super::run_every(EVERY, "inbox rows", || run_once(&db, &config, pace)).await
}

/// Deletes inbox rows older than `days_to_keep_data`, when it is this process's turn, at `pace`.
pub(crate) async fn run_once(
    db: &DatabaseConnection,
    config: &OutboxConfig,
    pace: super::Pace,
) -> Result<(), DbErr> {
    let turn = super::take_housekeeping_turn(db, CLEANUP_TASK, config.remove_data_cache_ttl);
    if !pace.call(turn).await? {
        return Ok(());
    }
    let cutoff = Utc::now() - chrono::Duration::days(i64::from(config.days_to_keep_data));
    let old = Condition::all().add(Expr::col(Column::Added).lt(cutoff));
    let deleted = super::delete_paced(db, Entity, Column::Id, old, pace).await?;
    tracing::info!(
        deleted,
        days = config.days_to_keep_data,
        "old inbox rows deleted; their keys are no longer deduplicated"
    );
    Ok(())
}
