//! The inbox table, `received`: one row per message a consumer processed, keyed by the message's
//! idempotency key and the consumer's queue. Inserting the row is the deduplication point: a
//! second row with the same `(queue, msg_id)` violates the table's unique constraint.

use sea_orm::entity::prelude::*;
use serde::Serialize;

/// The longest idempotency key the inbox holds (`msg_id`, characters).
pub const MAX_MSG_ID_LEN: usize = 100;

/// A row of the inbox table.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "received")]
pub struct Model {
    /// The row's own id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The queue the message was consumed from: keys are unique per queue.
    pub queue: String,
    /// The idempotency key: the first non-empty of `cap-msg-id`, `dop-msg-id`, `message-id`.
    /// `None` never matches another row.
    pub msg_id: Option<String>,
    /// Every header of the message, unescaped.
    pub headers: Option<Json>,
    /// The body, as JSON (a JSON string when it was not JSON).
    pub body: Option<Json>,
    /// When the message was processed.
    pub added: DateTimeUtc,
    /// When the row may be deleted: the end of the deduplication window for its key.
    pub expires_at: DateTimeUtc,
    /// Kept at 0; present for compatibility with django-outbox-pattern's table.
    pub retry: i32,
    /// `2` (SUCCEEDED) once saved.
    pub status: crate::tables::published::Status,
}

/// The inbox table has no relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
