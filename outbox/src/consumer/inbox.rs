//! The inbox table as the consumer uses it: the row inserted first in every message's transaction
//! (its unique `(queue, msg_id)` is the deduplication point: no check-then-insert race), and the
//! retention cleanup that bounds the deduplication window.

use std::sync::Arc;
use std::time::Duration;

use chrono::{SubsecRound, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::{Condition, Expr, ExprTrait};
use sea_orm::{DatabaseConnection, DatabaseTransaction, DbErr, EntityTrait, SqlErr};
use uuid::Uuid;

use crate::payload::Incoming;
use crate::received::{ActiveModel, Column, Entity};
use crate::retention;
use crate::{OutboxConfig, Status};

/// The housekeeping task that deletes old inbox rows (a row of `outbox_housekeeping`).
const CLEANUP_TASK: &str = "received_cleanup";

/// How often a consumer asks whether the cleanup is its turn.
const CLEANUP_CHECK_EVERY: Duration = Duration::from_secs(60);

/// Inserts the message's inbox row. A [`is_duplicate`] error means the key was processed (or is
/// being processed, in a transaction that has since committed) on this queue.
pub(crate) async fn insert(
    txn: &DatabaseTransaction,
    message: &Incoming,
    keep_for: chrono::Duration,
) -> Result<(), DbErr> {
    // Microseconds: what every supported database stores.
    let added = Utc::now().trunc_subsecs(6);
    let row = ActiveModel {
        id: Set(Uuid::new_v4()),
        queue: Set(message.queue.clone()),
        msg_id: Set(message.key.clone()),
        headers: Set(Some(message.headers_json())),
        body: Set(Some(message.body.clone())),
        added: Set(added),
        expires_at: Set(added + keep_for),
        retry: Set(0),
        status: Set(Status::Succeeded),
    };
    Entity::insert(row).exec_without_returning(txn).await?;
    Ok(())
}

/// Whether an inbox insert failed on the unique `(queue, msg_id)`: a duplicate.
pub(crate) fn is_duplicate(err: &DbErr) -> bool {
    matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// Deletes inbox rows older than `days_to_keep_data`, when it is this process's turn (at most
/// once per `remove_data_cache_ttl` across every consumer of the database). Runs until aborted;
/// failures are logged, never fatal.
pub(crate) async fn keep_tidy(db: DatabaseConnection, config: Arc<OutboxConfig>) {
    let mut ticker = tokio::time::interval(CLEANUP_CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match retention::take_housekeeping_turn(&db, CLEANUP_TASK, config.remove_data_cache_ttl)
            .await
        {
            Ok(true) => {
                let cutoff =
                    Utc::now() - chrono::Duration::days(i64::from(config.days_to_keep_data));
                let old = Condition::all().add(Expr::col(Column::Added).lt(cutoff));
                match retention::delete_paced(
                    &db,
                    Entity,
                    Column::Id,
                    old,
                    retention::Pace::default(),
                )
                .await
                {
                    Ok(deleted) => tracing::info!(
                        deleted,
                        days = config.days_to_keep_data,
                        "old inbox rows deleted; their keys are no longer deduplicated"
                    ),
                    Err(err) => tracing::warn!(error = %err, "deleting old inbox rows failed"),
                }
            }
            Ok(false) => {}
            Err(err) => tracing::warn!(error = %err, "inbox cleanup coordination failed"),
        }
    }
}
