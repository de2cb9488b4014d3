//! The outbox table, `published`: one row per message to relay.
//!
//! A row is written in the transaction of the change it announces and holds everything the relay
//! sends: the destination (with its version suffix), the JSON body and the headers, generated
//! once at insert (see [`crate::write`]). The relay's bookkeeping (`claim_token`, `locked_until`,
//! `next_attempt_at`, `last_error`) starts empty.

use sea_orm::entity::prelude::*;
use serde::Serialize;

/// The PostgreSQL channel the outbox table's trigger notifies at every commit that inserted rows
/// while a relay waits idle (the relay's wake-up, `outbox retry`'s nudge).
pub const NOTIFY_CHANNEL: &str = "outbox_published";

/// The longest destination, version suffix included, that the `destination` column holds.
pub const MAX_DESTINATION_LEN: usize = 255;
/// The longest ordering key that the `msg_key` column holds.
pub const MAX_KEY_LEN: usize = 255;
/// The longest version that the `version` column holds.
pub const MAX_VERSION_LEN: usize = 100;

/// Where a row is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, Serialize)]
#[sea_orm(rs_type = "i32", db_type = "Integer")]
pub enum Status {
    /// Given up: expired, or refused by the broker too many times. See `last_error`.
    #[sea_orm(num_value = -1)]
    Failed,
    /// Waiting to be sent.
    #[sea_orm(num_value = 1)]
    Schedule,
    /// Sent, and receipted by the broker.
    #[sea_orm(num_value = 2)]
    Succeeded,
}

/// A row of the outbox table.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "published")]
pub struct Model {
    /// The message id, sent as `dop-msg-id`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The version of `#[publish(version = ..)]`, already appended to `destination`.
    pub version: Option<String>,
    /// The STOMP destination, with its version suffix.
    pub destination: String,
    /// The message body.
    pub body: Json,
    /// Every header sent with the message, as a JSON object of strings.
    pub headers: Json,
    /// When the row was written.
    pub added: DateTimeUtc,
    /// After this time an unsent row is given up (FAILED), never sent.
    pub expires_at: DateTimeUtc,
    /// Failed sends so far.
    pub retry: i32,
    /// Where the row is in its life.
    pub status: Status,
    /// The relay that holds the row while sending it.
    pub claim_token: Option<Uuid>,
    /// Until when that relay holds it; after that another relay may take it.
    pub locked_until: Option<DateTimeUtc>,
    /// Not to be sent before this time (a retry's pause).
    pub next_attempt_at: Option<DateTimeUtc>,
    /// Why the last send failed, or why the row was given up.
    #[sea_orm(column_type = "Text", nullable)]
    pub last_error: Option<String>,
    /// The ordering key ([`Message::key`](crate::write::Message::key), `#[publish(key = ..)]`), sent as `x-outbox-key`: the
    /// rows of one key are sent one at a time, in `seq` order. `None`: no order is kept.
    pub msg_key: Option<String>,
    /// The insertion sequence, given by the database (`None` in the rows [`Message::enqueue`](crate::write::Message::enqueue)
    /// returns, and on SQLite, where `rowid` orders the rows instead; rows older than the column
    /// are `None` too, before all others).
    pub seq: Option<i64>,
}

/// The outbox table has no relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

impl Model {
    /// The row's `dop-correlation-id` header, for logs; `""` when it has none.
    pub(crate) fn correlation_id(&self) -> &str {
        self.headers
            .get(crate::headers::CORRELATION_ID)
            .and_then(serde_json::Value::as_str)
            .unwrap_or("")
    }
}
