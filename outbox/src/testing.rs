//! Support for a service's own tests: run the relay into an in-memory broker, then look at what
//! a use case published.
//!
//! ```no_run
//! # async fn demo(db: sea_orm::DatabaseConnection) -> Result<(), outbox::Error> {
//! use outbox::transport::MemoryTransport;
//!
//! let broker = MemoryTransport::new();
//! // ... call the use case, which saves `#[publish]` entities ...
//! outbox::testing::drain(&db, &broker).await?;
//! let sent = broker.sent();
//! assert_eq!(sent[0].destination, "/topic/orders.v1");
//! assert_eq!(sent[0].json::<serde_json::Value>().unwrap()["customer"], "ada");
//! # Ok(()) }
//! ```

use sea_orm::DatabaseConnection;

use crate::config::OutboxConfig;
use crate::error::Error;
use crate::producer::Producer;
use crate::producer::RoundReport;
use crate::transport::MemoryTransport;

/// Sends every due outbox row of `db` to `broker`, with the default settings (not the
/// environment's), and returns what the relay did.
pub async fn drain(
    db: &DatabaseConnection,
    broker: &MemoryTransport,
) -> Result<RoundReport, Error> {
    Producer::builder(db.clone())
        .config(OutboxConfig::default())
        .transport(broker.clone())
        .build()?
        .drain()
        .await
}
