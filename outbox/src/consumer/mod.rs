//! The consumer: reads a destination's queue and runs a callback once per message, in effect.
//!
//! It declares the queue and its dead-letter queue as django-outbox-pattern does ([`Topology`]),
//! subscribes with `client-individual` acknowledgements, and hands each message to the
//! callback inside a transaction that begins with the message's inbox row (see
//! [`Payload`]): a message whose key is already in the inbox is acknowledged without running the
//! callback, a failing one is rolled back and dead-lettered, a transient failure is retried.
//! Up to `in_flight` messages are processed at once (default 1: in order). Several messages
//! may share one transaction, each in a savepoint, acknowledged after its commit (group commits:
//! see `group`). With [`ConsumerBuilder::ordered_by_key`], the messages of one ordering key
//! (`x-outbox-key`) are processed one at a time, in arrival order, and different keys in
//! parallel, each in a transaction of its own.
//!
//! When the broker connection drops, messages being processed finish (their acknowledgements
//! are lost with the connection: the broker delivers them again and the inbox recognises them),
//! and the consumer reconnects with backoff and subscribes again. On shutdown it stops taking
//! messages, waits for those in flight up to the shutdown timeout, acknowledges them, and only
//! then unsubscribes and disconnects.

mod builder;
mod dispatch;
pub(crate) mod failure;
mod group;
mod inbox;
mod lanes;
pub(crate) mod payload;
mod run;
pub(crate) mod topology;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;

pub use builder::ConsumerBuilder;
pub use payload::{Payload, Transient};
pub use topology::{Topology, declare};

use crate::config::OutboxConfig;
use crate::consumer::payload::BoxError;
use crate::error::Error;
use crate::shutdown::Stoppable;
use crate::transport::Transport;

/// Consumes `destination` with settings from the environment ([`OutboxConfig::from_env`]) and
/// the STOMP broker they name, until SIGTERM, SIGINT or SIGQUIT; then it stops taking messages, waits for
/// those in flight (up to `OUTBOX_CONSUMER_SHUTDOWN_TIMEOUT`), acknowledges them, unsubscribes
/// and returns `Ok`. A second signal during that wait ends the process at once (exit code 1);
/// its unacknowledged messages are delivered again later.
///
/// The queue is the destination's last `/` segment; [`Consumer::builder`] names another, and
/// sets concurrency and the rest. See [`Payload`] for what the callback gets and what each
/// outcome does.
///
/// ```no_run
/// # async fn demo() -> Result<(), outbox::Error> {
/// let db = sea_orm::Database::connect(std::env::var("DATABASE_URL").unwrap()).await?;
/// outbox::subscribe(db, "/topic/orders.v1", |payload: outbox::Payload| async move {
///     tracing::info!(body = %payload.body(), "order received");
///     payload.save();
///     Ok::<_, outbox::Error>(())
/// })
/// .await
/// # }
/// ```
pub async fn subscribe<F, Fut, E>(
    db: DatabaseConnection,
    destination: &str,
    callback: F,
) -> Result<(), Error>
where
    F: Fn(Payload) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    let consumer = Consumer::builder(db)
        .destination(destination)
        .config(OutboxConfig::from_env()?)
        .build()?;
    consumer.run(callback).await
}

/// A consumer started with [`ConsumerBuilder::start`]; dropping it stops the consumer too.
pub struct ConsumerHandle(Stoppable);

impl ConsumerHandle {
    /// Stops the consumer as SIGTERM would (messages in flight finish and are acknowledged, up to
    /// the shutdown timeout) and waits for it.
    pub async fn stop(self) -> Result<(), Error> {
        self.0.stop().await
    }

    /// Waits for the consumer to end (it ends only when stopped).
    pub async fn join(self) -> Result<(), Error> {
        self.0.join().await
    }
}

/// A consumer: reads a destination's queue and runs a callback once per message, in effect
/// ([`Payload`] says how). Made by [`Consumer::builder`]; [`subscribe`] is the short way.
///
/// It declares the queue and its dead-letter queue as django-outbox-pattern does ([`Topology`]),
/// processes up to `in_flight` messages at once (default 1: in order), reconnects with backoff
/// when the broker connection drops (messages in flight then are delivered again and recognised
/// by the inbox), and on shutdown waits for the callbacks in flight and acknowledges their
/// messages before it unsubscribes.
pub struct Consumer {
    db: DatabaseConnection,
    transport: Arc<dyn Transport>,
    config: Arc<OutboxConfig>,
    topology: Topology,
    in_flight: usize,
    ordered_by_key: bool,
    /// Messages per group (1: a transaction per message).
    group_size: usize,
    shutdown_timeout: Duration,
}

impl Consumer {
    /// A consumer on `db`; see [`ConsumerBuilder`].
    pub fn builder(db: DatabaseConnection) -> ConsumerBuilder {
        ConsumerBuilder {
            db,
            destination: None,
            queue: None,
            prefetch: None,
            in_flight: 1,
            group_size: None,
            group_wait: None,
            shutdown_timeout: None,
            exclusive: None,
            queue_headers: Vec::new(),
            ordered_by_key: false,
            single_active_consumer: false,
            config: None,
            transport: None,
        }
    }

    /// Its destination, queues and their declaring headers.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Declares its queues without consuming (see [`declare`]).
    pub async fn declare(&self) -> Result<(), Error> {
        self.topology.declare(self.transport.as_ref()).await
    }

    /// Runs until SIGTERM, SIGINT or SIGQUIT (see [`Consumer::run_until`]). A second signal
    /// during the graceful stop ends the process at once (exit code 1); its unacknowledged
    /// messages are delivered again later.
    pub async fn run<F, Fut, E>(&self, callback: F) -> Result<(), Error>
    where
        F: Fn(Payload) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        self.run_until(callback, crate::shutdown::signal_then_exit_on_second())
            .await
    }
}
