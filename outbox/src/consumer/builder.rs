//! The consumer's builder: its settings, and the checks that refuse a consumer RabbitMQ would
//! refuse, or that could lose or duplicate work, before anything connects.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;

use super::payload::{BoxError, Payload};
use super::topology::Topology;
use super::{Consumer, ConsumerHandle};
use crate::config::OutboxConfig;
use crate::error::Error;
use crate::shutdown::Stoppable;
use crate::transport::Transport;

/// The largest `prefetch-count` a consumer subscribes with (also when none is configured, which
/// RabbitMQ reads as no limit): the transport buffers that many deliveries.
const MAX_PREFETCH: u32 = 10_000;

/// Configures a [`Consumer`].
#[must_use]
pub struct ConsumerBuilder {
    pub(super) db: DatabaseConnection,
    pub(super) destination: Option<String>,
    pub(super) queue: Option<String>,
    pub(super) prefetch: Option<u32>,
    pub(super) in_flight: usize,
    pub(super) group_size: Option<u32>,
    pub(super) group_wait: Option<Duration>,
    pub(super) shutdown_timeout: Option<Duration>,
    pub(super) exclusive: Option<bool>,
    pub(super) queue_headers: Vec<(String, String)>,
    pub(super) ordered_by_key: bool,
    pub(super) single_active_consumer: bool,
    pub(super) config: Option<OutboxConfig>,
    pub(super) transport: Option<Arc<dyn Transport>>,
}

impl ConsumerBuilder {
    /// The destination to consume (`/topic/orders.v1`, `/queue/x`, ...). Required.
    pub fn destination(mut self, destination: impl Into<String>) -> Self {
        self.destination = Some(destination.into());
        self
    }

    /// The queue to read (default: the destination's last `/` segment). Inbox keys are unique
    /// per queue: two queues of one service that receive the same event each process it.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// How many unacknowledged messages the broker may hand over at once (`prefetch-count`).
    /// Default: the `prefetch-count` of the settings' queue headers (1), raised to
    /// [`ConsumerBuilder::in_flight`] times [`ConsumerBuilder::group_size`], so that every
    /// group can fill.
    pub fn prefetch(mut self, prefetch: u32) -> Self {
        self.prefetch = Some(prefetch);
        self
    }

    /// How many callbacks may run at once. Default 1: messages are processed in order.
    /// With group commits, how many groups run at once (the callbacks of one group run one
    /// after another).
    pub fn in_flight(mut self, in_flight: usize) -> Self {
        self.in_flight = in_flight;
        self
    }

    /// How many messages one database transaction may process, each in a savepoint of its
    /// own, acknowledged after the commit (default: the settings', 1, a transaction per
    /// message; up to 64). A group also holds at most `prefetch / in_flight` messages.
    pub fn group_size(mut self, size: u32) -> Self {
        self.group_size = Some(size);
        self
    }

    /// How long a group stays open for more messages after its first (default: the
    /// settings', 2 ms; at most 1 s).
    pub fn group_wait(mut self, wait: Duration) -> Self {
        self.group_wait = Some(wait);
        self
    }

    /// How long a stopping consumer waits for callbacks in flight (default: the settings',
    /// 90 s). Those still running then are abandoned, rolled back, and delivered again later.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = Some(timeout);
        self
    }

    /// Declares the queues exclusive to the consumer's connection (default: the settings',
    /// false). RabbitMQ deletes an exclusive queue, with its messages, when the connection
    /// closes; the consumer then declares it again when it reconnects.
    pub fn exclusive(mut self, exclusive: bool) -> Self {
        self.exclusive = Some(exclusive);
        self
    }

    /// Adds a queue-declaring SUBSCRIBE header (`x-max-length`, ...) to those of the settings;
    /// `x-queue-name` and the dead-letter arguments are the consumer's own.
    pub fn queue_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.queue_headers.push((name.into(), value.into()));
        self
    }

    /// Keeps each key's order: messages with the same `x-outbox-key` header (see
    /// [`crate::write::Message::key`]) are processed one at a time, in the order they arrived, the next
    /// starting only after the previous one is committed and acknowledged (or dead-lettered: a
    /// dead-lettered message does not hold its key up); messages of different keys, and messages
    /// without a key, run in parallel, at most [`ConsumerBuilder::in_flight`] at once. Messages
    /// waiting behind their key stay unacknowledged in the consumer, so the default prefetch is
    /// four times `in_flight` (other keys can then proceed while one key is busy). Each message
    /// is its own transaction: a group size above 1 is refused at build.
    ///
    /// Order holds within one consumer of a queue: with several consumers on one queue, the
    /// broker spreads one key's messages over them (see README's section on ordering).
    pub fn ordered_by_key(mut self) -> Self {
        self.ordered_by_key = true;
        self
    }

    /// Declares the queue with RabbitMQ's single active consumer (queue argument
    /// `x-single-active-consumer`): of all the consumers of the queue, the broker delivers to
    /// one at a time, and moves to the next when it goes away, so that replicas of a service
    /// keep one key's order (with [`ConsumerBuilder::ordered_by_key`]) and stand by for each
    /// other. The dead-letter queue is declared without it.
    ///
    /// It changes the queue's arguments: RabbitMQ refuses (406) to declare the queue again
    /// without it, so every consumer of the queue must ask for it, and an existing queue must
    /// be deleted first. It needs the AMQP transport: RabbitMQ's STOMP plugin drops the argument
    /// from a SUBSCRIBE, and a STOMP consumer (ours or a Python one) cannot subscribe to a queue
    /// declared with it; the build is refused over STOMP.
    pub fn single_active_consumer(mut self) -> Self {
        self.single_active_consumer = true;
        self
    }

    /// Uses these settings instead of the environment's.
    pub fn config(mut self, config: OutboxConfig) -> Self {
        self.config = Some(config);
        self
    }

    /// Consumes through this transport instead of a STOMP connection made from the settings
    /// (a [`crate::transport::MemoryTransport`] in tests: give the consumer a connection of its
    /// own with `new_connection()`, since it disconnects while it starts and stops).
    pub fn transport(mut self, transport: impl Transport + 'static) -> Self {
        self.transport = Some(Arc::new(transport));
        self
    }

    /// Consumes through a shared transport (one connection per consumer is best: it disconnects
    /// while it starts and stops).
    pub fn shared_transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// The consumer; checks the settings and reads the TLS files they name. The write path's
    /// settings are not changed (see [`crate::write::WriteSettings`]).
    pub fn build(self) -> Result<Consumer, Error> {
        let mut config = match self.config {
            Some(config) => config,
            None => OutboxConfig::from_env()?,
        };
        if let Some(size) = self.group_size {
            config.consumer_group_size = size;
        }
        if let Some(wait) = self.group_wait {
            config.consumer_group_wait = wait;
        }
        config.validate()?;
        if self.in_flight == 0 {
            return Err(Error::Config {
                variable: "in_flight".into(),
                value: "0".into(),
                reason: "at least one callback must be able to run".into(),
            });
        }
        let mut headers: BTreeMap<String, String> = config.stomp_queue_headers.clone();
        headers.extend(self.queue_headers);
        let prefetch = match self.prefetch {
            Some(0) => {
                return Err(Error::Config {
                    variable: "prefetch".into(),
                    value: "0".into(),
                    reason: "RabbitMQ reads 0 as no limit; give a number of messages".into(),
                });
            }
            Some(prefetch) => Some(prefetch),
            // Enough for every callback slot to be busy (in keyed mode, with messages waiting
            // behind a busy key besides; with groups, a group's worth for each slot).
            None => {
                let slots = if self.ordered_by_key {
                    u32::try_from(self.in_flight.saturating_mul(4)).unwrap_or(u32::MAX)
                } else {
                    u32::try_from(self.in_flight)
                        .unwrap_or(u32::MAX)
                        .saturating_mul(config.consumer_group_size)
                };
                headers
                    .get("prefetch-count")
                    .and_then(|p| p.trim().parse::<u32>().ok())
                    .map(|p| p.max(slots))
            }
        };
        // No prefetch-count is no limit to RabbitMQ: the broker would push the whole queue.
        let prefetch = match prefetch {
            Some(prefetch) if (1..=MAX_PREFETCH).contains(&prefetch) => prefetch,
            other => {
                tracing::warn!(prefetch = ?other, cap = MAX_PREFETCH, "prefetch-count missing or above the cap; using the cap");
                MAX_PREFETCH
            }
        };
        headers.insert("prefetch-count".into(), prefetch.to_string());
        // More than prefetch / in_flight messages could not all be delivered before some are
        // acknowledged: the group would wait out its wait for them.
        let per_group = usize::try_from(prefetch).unwrap_or(usize::MAX) / self.in_flight;
        let group_size = usize::try_from(config.consumer_group_size)
            .unwrap_or(usize::MAX)
            .min(per_group)
            .max(1);
        if self.ordered_by_key && config.consumer_group_size > 1 {
            return Err(Error::Config {
                variable: "OUTBOX_CONSUMER_GROUP_SIZE".into(),
                value: config.consumer_group_size.to_string(),
                reason: "a consumer ordered by key processes each message in a transaction of its \
                         own; set the group size to 1 for it"
                    .into(),
            });
        }
        warn_if_attempts_outlast_the_broker(&config);
        let destination = self.destination.unwrap_or_default();
        let topology = Topology::with_headers(
            &destination,
            self.queue.as_deref(),
            headers,
            self.exclusive.unwrap_or(config.exclusive_queue),
        )?;
        let topology = if self.single_active_consumer {
            topology.with_single_active_consumer(true)
        } else {
            topology
        };
        let transport = match self.transport {
            Some(transport) => transport,
            None => crate::transport::from_config(&config)?,
        };
        topology.check_transport(transport.as_ref())?;
        Ok(Consumer {
            db: self.db,
            transport,
            topology,
            in_flight: self.in_flight,
            ordered_by_key: self.ordered_by_key,
            group_size,
            shutdown_timeout: self
                .shutdown_timeout
                .unwrap_or(config.consumer_shutdown_timeout),
            config: Arc::new(config),
        })
    }

    /// Builds the consumer and runs it on a task of its own. Dropping the handle stops it, as
    /// [`ConsumerHandle::stop`] does.
    pub fn start<F, Fut, E>(self, callback: F) -> Result<ConsumerHandle, Error>
    where
        F: Fn(Payload) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let consumer = self.build()?;
        Ok(ConsumerHandle(Stoppable::spawn(move |stop| async move {
            consumer.run_until(callback, stop).await
        })))
    }
}

/// RabbitMQ's default `consumer_timeout`: a delivery unacknowledged for longer closes the channel.
const RABBITMQ_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Warns when every attempt of a message whose callback hangs (each ended by the callback
/// timeout, with the waits between them) would outlast RabbitMQ's default `consumer_timeout`:
/// the broker would then close the channel first, and deliver the message again.
pub(super) fn warn_if_attempts_outlast_the_broker(config: &OutboxConfig) {
    let attempts = config.consumer_max_retry_attempts + 1;
    let waits: u32 = (1..=config.consumer_max_retry_attempts).sum();
    // Bounded settings: at most 101 attempts of a day, 5,050 waits of an hour; no overflow.
    let worst = config.consumer_callback_timeout * attempts + config.consumer_retry_wait * waits;
    if worst >= RABBITMQ_CONSUMER_TIMEOUT {
        tracing::warn!(
            worst_case = ?worst,
            callback_timeout = ?config.consumer_callback_timeout,
            attempts,
            "a message whose callback hangs would be held longer than RabbitMQ's default \
             consumer_timeout (30 min), which closes the channel; lower \
             OUTBOX_CONSUMER_CALLBACK_TIMEOUT or OUTBOX_CONSUMER_MAX_RETRY_ATTEMPTS, or raise the \
             broker's consumer_timeout"
        );
    }
}
