//! The `outbox_unroutable` table: one row per destination whose last message came back from the
//! broker because no queue was bound to it (AMQP's `basic.return`, `312 NO_ROUTE`). The relay
//! writes it when a message is returned and deletes it when a message to the destination is
//! routed again; `outbox status` reads it. It is state shared between the relay and the
//! operations commands as data, never as the text of a row's `last_error`.
//!
//! A relay older than this table neither writes nor reads it; one newer than the database's
//! migrations logs once that the table is missing and relays as before.

use sea_orm::entity::prelude::*;
use serde::Serialize;

/// A destination waiting for a queue.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "outbox_unroutable")]
pub struct Model {
    /// The destination, with its version suffix, as the rows hold it.
    #[sea_orm(primary_key, auto_increment = false)]
    pub destination: String,
    /// The broker's reply to the last returned message (`312 NO_ROUTE`, ...).
    pub reply: String,
    /// When a message to it was first returned, since it last routed.
    pub since: DateTimeUtc,
    /// When a message to it was last returned.
    pub last_returned_at: DateTimeUtc,
}

/// The table has no relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
