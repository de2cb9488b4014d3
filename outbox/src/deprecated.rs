//! The crate root's paths of the previous release, kept for one release: each names where the
//! item lives now. (A re-export cannot carry a deprecation; these are aliases and wrappers that
//! can. Traits and modules cannot be aliased: `Publish`, `hooks`, `published` and `received` are
//! re-exported hidden instead, and go in the next release.)

use std::future::Future;

use serde::Serialize;

use crate::transport::Transport;
use crate::{Error, config, consumer, producer, write};

/// Moved to [`crate::producer::ProducerBuilder`].
#[deprecated(since = "0.2.0", note = "use outbox::producer::ProducerBuilder")]
pub type ProducerBuilder = producer::ProducerBuilder;
/// Moved to [`crate::producer::ProducerHandle`].
#[deprecated(since = "0.2.0", note = "use outbox::producer::ProducerHandle")]
pub type ProducerHandle = producer::ProducerHandle;
/// Moved to [`crate::producer::RoundReport`].
#[deprecated(since = "0.2.0", note = "use outbox::producer::RoundReport")]
pub type RoundReport = producer::RoundReport;
/// Moved to [`crate::producer::NOTIFY_CHANNEL`].
#[deprecated(since = "0.2.0", note = "use outbox::producer::NOTIFY_CHANNEL")]
pub const NOTIFY_CHANNEL: &str = producer::NOTIFY_CHANNEL;

/// Moved to [`crate::consumer::ConsumerBuilder`].
#[deprecated(since = "0.2.0", note = "use outbox::consumer::ConsumerBuilder")]
pub type ConsumerBuilder = consumer::ConsumerBuilder;
/// Moved to [`crate::consumer::ConsumerHandle`].
#[deprecated(since = "0.2.0", note = "use outbox::consumer::ConsumerHandle")]
pub type ConsumerHandle = consumer::ConsumerHandle;
/// Moved to [`crate::consumer::Topology`].
#[deprecated(since = "0.2.0", note = "use outbox::consumer::Topology")]
pub type Topology = consumer::Topology;
/// Moved to [`crate::consumer::Transient`].
#[deprecated(since = "0.2.0", note = "use outbox::consumer::Transient")]
pub type Transient = consumer::Transient;

/// Moved to [`crate::consumer::declare`].
#[deprecated(since = "0.2.0", note = "use outbox::consumer::declare")]
pub async fn declare(
    transport: &dyn Transport,
    config: &config::OutboxConfig,
    destination: &str,
    queue: Option<&str>,
) -> Result<(), Error> {
    consumer::declare(transport, config, destination, queue).await
}

/// Moved to [`crate::send::send_with`].
#[deprecated(since = "0.2.0", note = "use outbox::send::send_with")]
pub async fn send_with<B: Serialize + ?Sized>(
    transport: &dyn Transport,
    destination: &str,
    body: &B,
    headers: &[(&str, &str)],
) -> Result<(), Error> {
    crate::send::send_with(transport, destination, body, headers).await
}

/// Moved to [`crate::shutdown::signal`].
#[deprecated(since = "0.2.0", note = "use outbox::shutdown::signal")]
pub async fn shutdown_signal() {
    crate::shutdown::signal().await
}

/// Moved to [`crate::write::without_publishing`].
#[deprecated(since = "0.2.0", note = "use outbox::write::without_publishing")]
pub async fn without_publishing<F: Future>(future: F) -> F::Output {
    write::without_publishing(future).await
}

/// Moved to [`crate::write::TransactionFuture`].
#[deprecated(since = "0.2.0", note = "use outbox::write::TransactionFuture")]
pub type TransactionFuture<'c, T, E> = write::TransactionFuture<'c, T, E>;
/// Moved to [`crate::write::Event`].
#[deprecated(since = "0.2.0", note = "use outbox::write::Event")]
pub type Event = write::Event;
/// Moved to [`crate::write::Events`].
#[deprecated(since = "0.2.0", note = "use outbox::write::Events")]
pub type Events = write::Events;
/// Moved to [`crate::write::Route`].
#[deprecated(since = "0.2.0", note = "use outbox::write::Route")]
pub type Route = write::Route;
/// Moved to [`crate::write::ActiveModelOf`].
#[deprecated(since = "0.2.0", note = "use outbox::write::ActiveModelOf")]
pub type ActiveModelOf<M> = write::ActiveModelOf<M>;
/// Moved to [`crate::tables::published::Status`].
#[deprecated(since = "0.2.0", note = "use outbox::tables::published::Status")]
pub type Status = crate::tables::published::Status;

/// Moved to [`crate::config::Secret`].
#[deprecated(since = "0.2.0", note = "use outbox::config::Secret")]
pub type Secret = config::Secret;
/// Moved to [`crate::config::Unroutable`].
#[deprecated(since = "0.2.0", note = "use outbox::config::Unroutable")]
pub type Unroutable = config::Unroutable;
/// Moved to [`crate::config::MAX_PUBLISHED_CHUNK_SIZE`].
#[deprecated(since = "0.2.0", note = "use outbox::config::MAX_PUBLISHED_CHUNK_SIZE")]
pub const MAX_PUBLISHED_CHUNK_SIZE: u32 = config::MAX_PUBLISHED_CHUNK_SIZE;
/// Moved to [`crate::config::MAX_RELAY_BATCHES_IN_FLIGHT`].
#[deprecated(
    since = "0.2.0",
    note = "use outbox::config::MAX_RELAY_BATCHES_IN_FLIGHT"
)]
pub const MAX_RELAY_BATCHES_IN_FLIGHT: u32 = config::MAX_RELAY_BATCHES_IN_FLIGHT;

/// Moved to [`crate::config::redact_credentials`].
#[deprecated(since = "0.2.0", note = "use outbox::config::redact_credentials")]
pub fn redact_credentials(text: &str) -> String {
    config::redact_credentials(text)
}

#[doc(hidden)]
pub use crate::write::Publish;
#[doc(hidden)]
pub use crate::write::hooks;

/// The outbox table's entity, with [`Message`](crate::Message) and [`enqueue`](crate::enqueue)
/// as the previous release had them here. Moved to [`crate::tables::published`] (the entity)
/// and [`crate::write`] (the rest).
#[doc(hidden)]
pub mod published {
    pub use crate::tables::published::*;
    pub use crate::write::{Message, enqueue, enqueue_all};
}

/// Moved to [`crate::tables::received`].
#[doc(hidden)]
pub mod received {
    pub use crate::tables::received::*;
}

impl config::OutboxConfig {
    /// Makes `days_to_keep_data` the lifetime of the rows this process writes.
    #[deprecated(
        since = "0.2.0",
        note = "use outbox::write::WriteSettings::from_config(&config).install()"
    )]
    pub fn install(&self) -> Result<(), Error> {
        write::WriteSettings::from_config(self).install()
    }
}
