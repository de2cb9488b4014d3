//! The inbox table as the consumer uses it: the row inserted first in every message's transaction
//! (its unique `(queue, msg_id)` is the deduplication point: no check-then-insert race).

use chrono::{SubsecRound, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr, EntityTrait, QueryTrait, SqlErr};
use uuid::Uuid;

use crate::consumer::payload::Incoming;
use crate::db::bounds::DbBounds;
use crate::tables::published::Status;
use crate::tables::received::{ActiveModel, Entity};

/// Inserts the message's inbox row. A [`is_duplicate`] error means the key was processed (or is
/// being processed, in a transaction that has since committed) on this queue. Another
/// transaction's uncommitted row of the same key makes it wait, for at most the lock timeout
/// (`bounds`): that transaction may belong to a consumer that stopped answering.
pub(crate) async fn insert(
    txn: &DatabaseTransaction,
    message: &Incoming,
    keep_for: chrono::Duration,
    bounds: &DbBounds,
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
    let insert = Entity::insert(row).build(txn.get_database_backend());
    txn.execute_raw(bounds.bound_inbox_insert(insert)).await?;
    Ok(())
}

/// Whether an inbox insert failed on the unique `(queue, msg_id)`: a duplicate.
pub(crate) fn is_duplicate(err: &DbErr) -> bool {
    matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}
