//! # outbox
//!
//! The transactional outbox pattern for [SeaORM](https://www.sea-ql.org/SeaORM/) services, relayed
//! to RabbitMQ over STOMP, wire-compatible with django-outbox-pattern.
//!
//! Annotate an entity's `Model` with [`publish`]; every save of it on a transaction writes one
//! outbox row per attribute, in that same transaction:
//!
//! ```
//! mod order {
//!     use sea_orm::entity::prelude::*;
//!
//!     #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
//!     #[sea_orm(table_name = "orders")]
//!     #[outbox::publish(destination = "/topic/orders", version = "v1", fields(customer, total))]
//!     pub struct Model {
//!         #[sea_orm(primary_key)]
//!         pub id: i32,
//!         pub customer: String,
//!         pub total: i64,
//!     }
//!
//!     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
//!     pub enum Relation {}
//!     // No `impl ActiveModelBehavior for ActiveModel {}`: `#[publish]` writes it.
//! }
//!
//! # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), outbox::Error> {
//! use sea_orm::ActiveValue::Set;
//! // The order and its outbox row commit together, or neither does.
//! let order = outbox::insert(db, order::ActiveModel {
//!     customer: Set("ada".into()),
//!     total: Set(4200),
//!     ..Default::default()
//! })
//! .await?;
//! # let _ = order; Ok(()) }
//! ```
//!
//! Rows are written into the `published` table (see the `migration` module), with the `dop-*`
//! headers that django-outbox-pattern services read.
//!
//! The [`guide`] explains the rest, chapter by chapter: the write path, relaying, consuming,
//! ordering, transports, the guarantees, operating and every setting.
//!
//! ## Where each behaviour lives
//!
//! | module | what it does |
//! | --- | --- |
//! | [`write`](mod@write) | the atomic write path: `#[publish]`'s hooks, [`save`]/[`insert`]/[`update`]/[`transaction`], [`Message`] and [`enqueue`], ordering keys' write locks, Django's JSON encodings, [`write::WriteSettings`] |
//! | [`tables`] | the tables as SeaORM entities: `published` (the outbox), `received` (the inbox), `outbox_unroutable` |
//! | [`producer`] | the relay: claim a batch, send it, settle each row (sent, given back, charged, kept as unroutable behind its destination's probe), isolate suspects, wake on commits |
//! | [`consumer`] | the consumer: queues and dead-letter queues, key lanes, dispatch, group commits, the inbox row, the failure policy, [`Payload`] |
//! | [`transport`] | the broker behind a trait: STOMP, AMQP 0-9-1 and in memory; `select` turns the settings into one |
//! | [`config`] | [`OutboxConfig`]: every `OUTBOX_*` setting, its range, secrets and their redaction |
//! | [`migration`] | the tables' migrations, one file each (feature `migration`) |
//! | [`ops`] | what the `outbox` command does: status, list, retry, purge, declare, dead-letter queues |
//! | [`headers`], [`metrics`], [`send`](mod@send), [`shutdown`], [`testing`] | the `dop-*` headers, the metrics, a direct send, signals, helpers for a service's tests |
//!
//! Inside the crate, `db` holds what the relay, the consumer, retention and ops share about the
//! database (its clock, error classes, the bounds on every call, bounded batches by id, the rows
//! waiting for a queue), and `retention` every cleanup (expiry, old sent rows, old inbox rows,
//! the purge's deletes). A test that reads the sources keeps the walls between them: the
//! transport reaches no table, relay, consumer, ops or metrics; the relay and the consumer never
//! reach each other; ops never reach the relay.
//!
//! ## Glossary
//!
//! - **publish**: write a message into the outbox, in the transaction of the change it announces
//!   (`#[publish]` on an entity, or [`enqueue`]). Nothing reaches the broker yet.
//! - **published**: the outbox table (the name django-outbox-pattern gave it); a row there is
//!   a message waiting to be relayed, or relayed.
//! - **relay**: move outbox rows to the broker, each marked sent only after the broker's receipt
//!   or confirm.
//! - **producer**: the relay's process-side type ([`Producer`], [`run_producer`]); the name
//!   django-outbox-pattern's `publish` command has for it.
//! - **received**: the inbox table; a row there is a message a consumer processed, its unique
//!   `(queue, msg_id)` the point where a redelivered copy is recognised.
//!
//! ## Features
//!
//! | feature | default | what it adds |
//! | --- | --- | --- |
//! | `postgres` | yes | PostgreSQL through sqlx: `FOR UPDATE SKIP LOCKED` claims, LISTEN/NOTIFY wake-up |
//! | `mysql` | no | MySQL and MariaDB 10.6+ through sqlx |
//! | `sqlite` | no | SQLite through sqlx (builds SQLite's C sources) |
//! | `migration` | no | `outbox::migration`: the tables' migrations, for a crate that runs sea-orm-migration |
//! | `metrics` | yes | `outbox::metrics`: counters, gauges and histograms through the `metrics` facade |
//! | `opentelemetry` | no | W3C trace context from the writer's span to the consumer's, through the row's headers |
//!
//! SeaORM's runtime is tokio (the relay and the consumer run on it); the database TLS stack
//! (`sea-orm/runtime-tokio-rustls` or `-native-tls`) stays the service's choice.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod backoff;
pub mod config;
pub mod consumer;
mod db;
mod error;
pub mod guide;
pub mod headers;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
#[cfg(not(feature = "metrics"))]
mod metrics;
#[cfg(feature = "migration")]
#[cfg_attr(docsrs, doc(cfg(feature = "migration")))]
pub mod migration;
pub mod ops;
pub mod producer;
mod retention;
pub mod send;
pub mod shutdown;
pub mod tables;
pub mod testing;
#[cfg(feature = "opentelemetry")]
mod trace_context;
pub mod transport;
mod wake;
#[cfg(test)]
mod walls;
pub mod write;

#[doc(hidden)]
pub mod __private {
    pub use crate::write::generated::*;
}

pub use config::OutboxConfig;
pub use consumer::Payload;
pub use consumer::{Consumer, subscribe};
pub use error::{Error, Result};
pub use headers::{correlation_id, with_correlation_id};
pub use outbox_macros::publish;
pub use producer::{Producer, run_producer};
pub use send::send;
pub use tables::published::Entity as Published;
pub use tables::received::Entity as Received;
pub use write::{Message, enqueue, enqueue_all, insert, save, transaction, update};

mod deprecated;
#[allow(deprecated)]
pub use deprecated::*;
