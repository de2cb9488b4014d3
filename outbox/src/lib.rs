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

mod config;
mod consumer;
mod django_json;
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
mod payload;
mod private;
mod producer;
mod publish;
pub mod published;
pub mod received;
mod retention;
mod send;
mod shutdown;
pub mod testing;
#[cfg(feature = "opentelemetry")]
mod trace_context;
pub mod transport;
mod wake;
mod write;

#[doc(hidden)]
pub mod __private {
    pub use crate::private::*;
}

pub use config::{
    MAX_PUBLISHED_CHUNK_SIZE, MAX_RELAY_BATCHES_IN_FLIGHT, OutboxConfig, Secret, Unroutable,
    redact_credentials,
};
pub use consumer::{Consumer, ConsumerBuilder, ConsumerHandle, Topology, declare, subscribe};
pub use error::{Error, Result};
pub use headers::{correlation_id, with_correlation_id};
pub use outbox_macros::publish;
pub use payload::{Payload, Transient};
pub use producer::{
    NOTIFY_CHANNEL, Producer, ProducerBuilder, ProducerHandle, RoundReport, run_producer,
};
pub use publish::{ActiveModelOf, Event, Events, Publish, Route};
pub use published::{Entity as Published, Message, Status, enqueue, enqueue_all};
pub use received::Entity as Received;
pub use send::{send, send_with};
pub use shutdown::signal as shutdown_signal;
pub use write::{TransactionFuture, hooks, insert, save, transaction, update, without_publishing};
