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

mod dispatch;
pub(crate) mod failure;
mod group;
mod inbox;
pub(crate) mod topology;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::DatabaseConnection;
use tokio::task::JoinSet;
use uuid::Uuid;

pub use topology::{Topology, declare};

use crate::payload::BoxError;
use crate::producer::Backoff;
use crate::shutdown::Stoppable;
use crate::transport::{Deliveries, Delivery, SubscriptionEvent, Transport, TransportError};
use crate::{Error, OutboxConfig, Payload};
use dispatch::{Callback, Dispatcher};
use group::Groups;

/// A subscription that lived this long was healthy: after it drops, reconnect at once.
const STABLE_SUBSCRIPTION: Duration = Duration::from_secs(30);

/// The largest `prefetch-count` a consumer subscribes with (also when none is configured, which
/// RabbitMQ reads as no limit): the transport buffers that many deliveries.
const MAX_PREFETCH: u32 = 10_000;

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

/// Configures a [`Consumer`].
#[must_use]
pub struct ConsumerBuilder {
    db: DatabaseConnection,
    destination: Option<String>,
    queue: Option<String>,
    prefetch: Option<u32>,
    in_flight: usize,
    group_size: Option<u32>,
    group_wait: Option<Duration>,
    shutdown_timeout: Option<Duration>,
    exclusive: Option<bool>,
    queue_headers: Vec<(String, String)>,
    ordered_by_key: bool,
    single_active_consumer: bool,
    config: Option<OutboxConfig>,
    transport: Option<Arc<dyn Transport>>,
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
    /// [`crate::Message::key`]) are processed one at a time, in the order they arrived, the next
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

    /// The consumer; checks the settings, makes them the process's ([`OutboxConfig::install`])
    /// and reads the TLS files they name.
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
        config.install()?;
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

    /// Runs until `shutdown` completes: then stops taking messages, waits up to the shutdown
    /// timeout for the callbacks in flight (their messages are acknowledged or rejected as
    /// usual), unsubscribes, disconnects and returns. Broker and database failures do not end
    /// it: it reconnects with backoff.
    pub async fn run_until<F, Fut, E>(
        &self,
        callback: F,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error>
    where
        F: Fn(Payload) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let callback: Callback = Arc::new(move |payload| {
            let future = callback(payload);
            Box::pin(async move { future.await.map_err(Into::into) })
        });
        let dispatcher = Arc::new(Dispatcher {
            db: self.db.clone(),
            transport: self.transport.clone(),
            callback,
            queue: self.topology.queue().to_owned(),
            keep_for: chrono::Duration::days(i64::from(self.config.days_to_keep_data)),
            max_retries: self.config.consumer_max_retry_attempts,
            retry_wait: self.config.consumer_retry_wait,
            callback_timeout: self.config.consumer_callback_timeout,
        });
        let mut groups = Groups::new(
            dispatcher.clone(),
            self.group_size,
            self.config.consumer_group_wait,
            self.in_flight,
        );
        let housekeeping = tokio::spawn(inbox::keep_tidy(self.db.clone(), self.config.clone()));
        tokio::pin!(shutdown);
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut lanes = Lanes::new(self.ordered_by_key);
        let mut backoff = Backoff::new(self.config.maximum_backoff);
        let mut subscribed: Option<String> = None;
        tracing::info!(
            destination = %self.topology.destination(),
            queue = %self.topology.queue(),
            in_flight = self.in_flight,
            ordered_by_key = self.ordered_by_key,
            group_size = self.group_size,
            "consumer started"
        );
        'connection: loop {
            let (id, mut deliveries) = match self.open_subscription().await {
                Ok(opened) => opened,
                Err(err) => {
                    let pause = backoff.next_pause();
                    if err.is_broker_refusal() {
                        // PRECONDITION_FAILED (the queue exists with other arguments), access
                        // refused, ...: an operator must act; keep trying meanwhile.
                        tracing::error!(error = %err, retry_in = ?pause, "the broker refused the subscription; retrying");
                    } else {
                        tracing::warn!(error = %err, retry_in = ?pause, "cannot subscribe; retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue 'connection,
                        _ = shutdown.as_mut() => break 'connection,
                    }
                }
            };
            tracing::info!(subscription = %id, queue = %self.topology.queue(), "subscribed; waiting for messages");
            subscribed = Some(id);
            let since = Instant::now();
            loop {
                while tasks.len() < self.in_flight {
                    let Some((key, delivery)) = lanes.next_ready() else {
                        break;
                    };
                    let task = tasks.spawn(dispatcher.clone().handle(delivery));
                    lanes.started(task.id(), key);
                }
                let accepting = if self.ordered_by_key {
                    lanes.accepts(tasks.len(), self.in_flight)
                } else {
                    groups.can_take(&tasks)
                };
                tokio::select! {
                    biased;
                    _ = shutdown.as_mut() => break 'connection,
                    Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                        lanes.finished(&joined);
                        report(joined.map(|_| ()));
                        groups.task_ended(&mut tasks);
                    }
                    event = deliveries.next_event(), if accepting => match event {
                        Some(SubscriptionEvent::Delivery(delivery)) if self.ordered_by_key => lanes.push(delivery),
                        Some(SubscriptionEvent::Delivery(delivery)) => groups.take(delivery, &mut tasks),
                        // Rejected by the transport already: only counted here.
                        Some(SubscriptionEvent::Undecodable(message)) => {
                            crate::metrics::consumed(&message.queue, crate::metrics::Outcome::Undecodable);
                        }
                        None => break,
                    },
                }
            }
            // Messages waiting behind their key, or queued in a group and not started, were
            // not processed: unacknowledged, the broker delivers them again to the new
            // subscription. Keys in flight stay busy until their tasks end, so a redelivery
            // never overtakes them.
            lanes.forget_waiting();
            groups.close();
            subscribed = None;
            // Messages in flight go on; their acknowledgements will be refused, and the broker
            // delivers those messages again to the new subscription.
            if since.elapsed() >= STABLE_SUBSCRIPTION {
                backoff.reset();
                tracing::warn!("the broker connection was lost; reconnecting");
            } else {
                let pause = backoff.next_pause();
                tracing::warn!(retry_in = ?pause, "the broker connection was lost soon after subscribing; reconnecting after a pause");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.as_mut() => break 'connection,
                }
            }
        }
        groups.close();
        self.stop(tasks, subscribed).await;
        housekeeping.abort();
        tracing::info!(queue = %self.topology.queue(), "consumer stopped");
        Ok(())
    }

    /// Connects, declares the dead-letter queue, and subscribes to the main queue with a fresh id.
    async fn open_subscription(&self) -> Result<(String, Deliveries), TransportError> {
        let transport = self.transport.as_ref();
        transport.connect().await?;
        self.topology.declare_dead_letter_queue(transport).await?;
        if !self.topology.exclusive() {
            // A dead letter the broker handed the declaring subscription stays unacknowledged
            // on this connection, hidden from anyone reading the dead-letter queue, until the
            // connection closes. (An exclusive queue would close with it: keep that connection.)
            // The connection is closed even when the broker does not confirm the DISCONNECT.
            if let Err(err) = transport.disconnect().await {
                tracing::debug!(error = %err, "disconnect after declaring failed");
            }
            transport.connect().await?;
        }
        let id = Uuid::new_v4().to_string();
        let deliveries = transport.subscribe(self.topology.subscription(&id)).await?;
        Ok((id, deliveries))
    }

    /// Waits for the callbacks in flight (they acknowledge their messages), then unsubscribes
    /// (RabbitMQ refuses acknowledgements after it) and disconnects.
    async fn stop(&self, mut tasks: JoinSet<()>, subscribed: Option<String>) {
        // (Messages waiting behind their key are left unacknowledged: delivered again later.)
        if !tasks.is_empty() {
            tracing::info!(
                in_flight = tasks.len(),
                timeout = ?self.shutdown_timeout,
                "stopping: waiting for the callbacks in flight"
            );
        }
        let finished = tokio::time::timeout(self.shutdown_timeout, async {
            while let Some(joined) = tasks.join_next().await {
                report(joined);
            }
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                abandoned = tasks.len(),
                timeout = ?self.shutdown_timeout,
                "callbacks still running at the shutdown timeout were abandoned and rolled back; their messages will be delivered again"
            );
            tasks.shutdown().await;
        }
        if let Some(id) = subscribed
            && let Err(err) = self.transport.unsubscribe(&id).await
        {
            tracing::debug!(error = %err, "unsubscribe failed");
        }
        if let Err(err) = self.transport.disconnect().await {
            tracing::debug!(error = %err, "disconnect failed");
        }
    }
}

/// The routing layer in front of the dispatcher: which delivery starts next.
///
/// Without keyed order, deliveries start as they arrive, while a callback slot is free. With it,
/// a delivery waits while an earlier one of its key (`x-outbox-key`) is being processed, and the
/// first waiting delivery whose key is free (or that has none) takes the next free slot: per key,
/// arrival order; across keys, parallel.
struct Lanes {
    ordered: bool,
    /// Received, not started, in arrival order.
    waiting: VecDeque<Delivery>,
    /// The key of each task in flight that has one.
    running: HashMap<tokio::task::Id, String>,
    /// The keys of the tasks in flight.
    busy: HashSet<String>,
}

impl Lanes {
    fn new(ordered: bool) -> Self {
        Lanes {
            ordered,
            waiting: VecDeque::new(),
            running: HashMap::new(),
            busy: HashSet::new(),
        }
    }

    /// Whether to read another delivery: without keyed order, only into a free slot; with it,
    /// always (the broker's prefetch bounds what waits here), so that other keys can proceed
    /// while the next delivery's key is busy.
    fn accepts(&self, running: usize, in_flight: usize) -> bool {
        if self.ordered {
            true
        } else {
            running < in_flight && self.waiting.is_empty()
        }
    }

    fn push(&mut self, delivery: Delivery) {
        self.waiting.push_back(delivery);
    }

    /// The first waiting delivery that may start now, with its key (in keyed mode).
    fn next_ready(&mut self) -> Option<(Option<String>, Delivery)> {
        if !self.ordered {
            return self.waiting.pop_front().map(|delivery| (None, delivery));
        }
        let index = self.waiting.iter().position(|delivery| {
            delivery
                .header(crate::headers::ORDERING_KEY)
                .is_none_or(|key| !self.busy.contains(key))
        })?;
        let delivery = self.waiting.remove(index)?;
        let key = delivery
            .header(crate::headers::ORDERING_KEY)
            .map(str::to_owned);
        Some((key, delivery))
    }

    fn started(&mut self, task: tokio::task::Id, key: Option<String>) {
        if let Some(key) = key {
            self.busy.insert(key.clone());
            self.running.insert(task, key);
        }
    }

    /// A task ended (normally or not): its key is free again.
    fn finished(&mut self, joined: &Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let task = match joined {
            Ok((task, ())) => *task,
            Err(err) => err.id(),
        };
        if let Some(key) = self.running.remove(&task) {
            self.busy.remove(&key);
        }
    }

    fn forget_waiting(&mut self) {
        self.waiting.clear();
    }
}

/// RabbitMQ's default `consumer_timeout`: a delivery unacknowledged for longer closes the channel.
const RABBITMQ_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Warns when every attempt of a message whose callback hangs (each ended by the callback
/// timeout, with the waits between them) would outlast RabbitMQ's default `consumer_timeout`:
/// the broker would then close the channel first, and deliver the message again.
fn warn_if_attempts_outlast_the_broker(config: &OutboxConfig) {
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

/// Logs a message task that did not end normally (panics in callbacks are caught before this).
fn report(joined: Result<(), tokio::task::JoinError>) {
    if let Err(err) = joined {
        tracing::error!(error = %err, "a message task ended abnormally; its message will be delivered again");
    }
}
