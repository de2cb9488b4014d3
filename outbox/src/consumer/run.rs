//! The consumer's run loop: subscribe, take deliveries into key lanes, dispatch each (or each
//! group) on a task of its own, resubscribe after a lost connection, and on shutdown stop
//! taking, finish or abandon what runs within the shutdown timeout, and unsubscribe.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use uuid::Uuid;

use super::Consumer;
use super::dispatch::{Callback, Dispatcher};
use super::group::Groups;
use super::lanes::Lanes;
use super::payload::{BoxError, Payload};
use crate::backoff::Backoff;
use crate::db::bounds::DbBounds;
use crate::error::Error;
use crate::transport::{Deliveries, SubscriptionEvent, TransportError};

/// A subscription that lived this long was healthy: after it drops, reconnect at once.
const STABLE_SUBSCRIPTION: Duration = Duration::from_secs(30);

impl Consumer {
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
            bounds: DbBounds::new(&self.config),
        });
        let mut groups = Groups::new(
            dispatcher.clone(),
            self.group_size,
            self.config.consumer_group_wait,
            self.in_flight,
        );
        let housekeeping = tokio::spawn(crate::retention::inbox::keep(
            self.db.clone(),
            self.config.clone(),
        ));
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

/// Logs a message task that did not end normally (panics in callbacks are caught before this).
fn report(joined: Result<(), tokio::task::JoinError>) {
    if let Err(err) = joined {
        tracing::error!(error = %err, "a message task ended abnormally; its message will be delivered again");
    }
}
