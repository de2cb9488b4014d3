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

/// Inserts the message's inbox row; its id. A [`is_duplicate`] error means the key was processed
/// (or is being processed, in a transaction that has since committed) on this queue. Another
/// transaction's uncommitted row of the same key makes it wait, for at most the lock timeout
/// (`bounds`): that transaction may belong to a consumer that stopped answering.
pub(crate) async fn insert(
    txn: &DatabaseTransaction,
    message: &Incoming,
    keep_for: chrono::Duration,
    bounds: &DbBounds,
) -> Result<Uuid, DbErr> {
    let id = Uuid::new_v4();
    // Microseconds: what every supported database stores.
    let added = Utc::now().trunc_subsecs(6);
    let row = ActiveModel {
        id: Set(id),
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
    Ok(id)
}

/// Whether the transaction still holds the inbox row `id` that it inserted: read back by its
/// primary key, in the transaction, just before the commit (and after each member of a group).
///
/// This is how a dead transaction is told from a live one. When the callback ignored a failed
/// statement, PostgreSQL has aborted the transaction: this read fails with `25P02` (an error,
/// see [`crate::db::errors::db_err_is_aborted_transaction`]), where the COMMIT would have
/// "succeeded" as a ROLLBACK. When the database rolled the transaction back by itself (a
/// MariaDB deadlock victim, whose later statements then autocommit), or the callback ended it
/// with its own `COMMIT` or `ROLLBACK`, the row is gone: `Ok(false)`. Either way, acknowledging
/// the message would lose it.
pub(crate) async fn still_holds(txn: &DatabaseTransaction, id: Uuid) -> Result<bool, DbErr> {
    use sea_orm::QuerySelect;
    let found: Option<Uuid> = Entity::find_by_id(id)
        .select_only()
        .column(crate::tables::received::Column::Id)
        .into_tuple()
        .one(txn)
        .await?;
    Ok(found.is_some())
}

/// Whether an inbox insert failed on the unique `(queue, msg_id)`: a duplicate.
pub(crate) fn is_duplicate(err: &DbErr) -> bool {
    matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}
