//! The AMQP 0-9-1 transport's face: [`AmqpTransport`], RabbitMQ's own protocol through lapin
//! (tokio, rustls with ring), over one connection at a time ([`link`]).
//!
//! It sends what the STOMP transport sends, as RabbitMQ's STOMP plugin would have published it
//! ([`routing`]): the same exchange and routing key for a destination, the same properties and
//! headers table, the same queue declared for a `/queue/` or bare destination, so that a STOMP
//! subscriber sees the same message whichever transport the relay uses. What it adds is what
//! STOMP cannot say: every publish is `mandatory` and confirmed, so a message that no queue
//! takes comes back ([`Outcome::Unroutable`](super::Outcome::Unroutable)) instead of being dropped after its receipt, and a
//! broker that cannot take a message says so ([`Outcome::Nacked`](super::Outcome::Nacked)).
//!
//! One connection at a time, opened on first use, failing over across the configured URLs in
//! order; after it fails, the next call opens a new one. Each batch in flight publishes on a
//! confirm-mode channel of its own, taken from a small pool of the connection's and given back
//! once all its confirms came ([`publish`]): batches go pipelined side by side, up to
//! [`CONFIRM_WINDOW`] publishes awaiting their confirms at once, and each caller waits only for
//! its own. A message the broker returns is pinned on its own publish by identity (route,
//! message id and body, [`returns`]), never on whichever confirm lapin hands it with; a channel
//! whose confirms did not all come is closed, never reused. Before the first publish to an
//! exchange on a connection, a passive `exchange.declare` (on a channel of its own, which a 404
//! closes) checks that it exists: a missing exchange is then [`Outcome::Refused`](super::Outcome::Refused) for exactly
//! its messages, instead of a channel closed under every unconfirmed publish. While the broker
//! blocks the connection (a memory or disk alarm), nothing is published: the messages are given
//! back, unknown and not overtaken, which charges them nothing.
//!
//! Each subscription consumes on a channel of its own, with `basic.qos` from its
//! `prefetch-count` header; its queue is declared and bound from its headers as the STOMP plugin
//! declares and binds it, so that STOMP and AMQP consumers share a queue in either order.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicRejectOptions};
use lapin::tcp::RustlsConnector;
use lapin::uri::{AMQPScheme, AMQPUri};

use super::stomp::tls::ClientTls;
use super::{Deliveries, Delivery, Outgoing, SendReport, Subscription, Transport, TransportError};
use crate::config::redact_credentials;
use link::Link;

mod link;
mod publish;
mod returns;
mod routing;
mod settings;

pub use settings::AmqpSettings;

/// The most publishes awaiting their confirms at once on a connection, across its publisher
/// channels: RabbitMQ's own figures gain most between 20 and 200 in flight, and the relay keeps
/// `OUTBOX_RELAY_BATCHES_IN_FLIGHT` batches (3 by default) of up to 200 rows going.
pub const CONFIRM_WINDOW: usize = 1024;
/// How long a disconnect waits for the broker's answer on a blocked connection.
const UNANSWERED_CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How often a blocked connection is looked at while a send waits for it to be unblocked.
const BLOCKED_POLL: Duration = Duration::from_millis(50);

/// An AMQP 0-9-1 broker connection with failover, heartbeats and publisher confirms.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use outbox::config::Secret;
/// use outbox::transport::{AmqpSettings, AmqpTransport, Outgoing, Transport};
///
/// let mut settings = AmqpSettings::default();
/// settings.urls = vec![Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f")];
/// let broker = AmqpTransport::new(settings)?;
/// let report = broker
///     .send(&[Outgoing {
///         destination: "/topic/orders".into(),
///         headers: vec![],
///         body: br#"{"id": 1}"#.to_vec(),
///     }])
///     .await;
/// // Receipted once a queue is bound to `orders` on amq.topic; Unroutable before.
/// println!("{:?}", report.outcomes);
/// # Ok(()) }
/// ```
pub struct AmqpTransport {
    settings: Arc<Settings>,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    /// Numbers the connections this transport opens ([`Delivery::connection`]).
    connections_opened: AtomicU64,
}

/// What a connection is opened with: the [`AmqpSettings`], their URLs parsed and TLS files read.
struct Settings {
    urls: Vec<AMQPUri>,
    tls: Option<TlsClient>,
    receipt_timeout: Duration,
}

/// The rustls client of `amqps://` URLs: the CA, client certificate and server name settings.
struct TlsClient {
    connector: RustlsConnector,
    server_name: Option<String>,
}

impl AmqpTransport {
    /// A transport for the broker URLs of `settings`; it connects on first use. The URLs are
    /// parsed and the TLS files read now, so a mistake fails here.
    pub fn new(settings: AmqpSettings) -> Result<Self, TransportError> {
        if settings.urls.is_empty() {
            return Err(TransportError::Connect {
                addresses: String::new(),
                reason: "no OUTBOX_BROKER_URL configured".into(),
            });
        }
        // AMQP heartbeats are whole seconds; 0 turns them off, as in STOMP.
        let heartbeat =
            u16::try_from(settings.heartbeat.as_millis().div_ceil(1000)).unwrap_or(u16::MAX);
        let timeout_ms = u64::try_from(settings.receipt_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut urls = Vec::with_capacity(settings.urls.len());
        let mut tls_wanted = false;
        for url in &settings.urls {
            let mut uri: AMQPUri =
                url.expose()
                    .parse()
                    .map_err(|reason: String| TransportError::Connect {
                        addresses: redact_credentials(url.expose()),
                        reason: format!("not an AMQP URL: {}", redact_credentials(&reason)),
                    })?;
            uri.query.heartbeat.get_or_insert(heartbeat);
            uri.query.connection_timeout.get_or_insert(timeout_ms);
            tls_wanted |= uri.scheme == AMQPScheme::AMQPS;
            urls.push(uri);
        }
        let tls = if tls_wanted {
            let client = ClientTls::new(&settings.tls)?;
            Some(TlsClient {
                connector: RustlsConnector::from(client.client_config()),
                server_name: settings.tls.server_name.clone(),
            })
        } else {
            None
        };
        Ok(Self {
            settings: Arc::new(Settings {
                urls,
                tls,
                receipt_timeout: settings.receipt_timeout,
            }),
            link: tokio::sync::Mutex::new(None),
            connections_opened: AtomicU64::new(0),
        })
    }

    /// The open connection, or a new one.
    async fn link(&self) -> Result<Arc<Link>, TransportError> {
        let mut slot = self.link.lock().await;
        if let Some(link) = slot.as_ref()
            && link.is_open()
        {
            return Ok(link.clone());
        }
        if let Some(old) = slot.take() {
            let _ = tokio::time::timeout(self.settings.receipt_timeout, old.close_quietly()).await;
        }
        let generation = self.connections_opened.fetch_add(1, Ordering::Relaxed) + 1;
        let link = Arc::new(Link::open(&self.settings, generation).await?);
        *slot = Some(link.clone());
        Ok(link)
    }

    /// The open connection, if any (for acks: never a new one).
    async fn current(&self) -> Option<Arc<Link>> {
        self.link.lock().await.clone()
    }
}

#[async_trait::async_trait]
impl Transport for AmqpTransport {
    async fn connect(&self) -> Result<(), TransportError> {
        self.bounded(async { self.link().await.map(|_| ()) }).await
    }

    async fn send(&self, messages: &[Outgoing]) -> SendReport {
        if messages.is_empty() {
            return SendReport {
                outcomes: Vec::new(),
            };
        }
        let timeout = self.settings.receipt_timeout;
        let link = match self.bounded(self.link()).await {
            Ok(link) => link,
            Err(err) => return SendReport::unsent(messages.len(), err),
        };
        // Link::send bounds its own waits by the timeout; this bounds the broker's answers to
        // the checks and declarations before them, which a blocked broker never reads.
        match tokio::time::timeout(timeout + BLOCKED_POLL, link.send(messages, timeout)).await {
            Ok(report) => report,
            Err(_) => SendReport::unsent(messages.len(), TransportError::ReceiptTimeout(timeout)),
        }
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Deliveries, TransportError> {
        self.bounded(async {
            let link = self.link().await?;
            link.subscribe(subscription).await
        })
        .await
    }

    async fn unsubscribe(&self, id: &str) -> Result<(), TransportError> {
        self.bounded(self.unsubscribe_now(id)).await
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), TransportError> {
        self.bounded(async {
            let (channel, tag) = self.delivered_on(delivery).await?;
            channel
                .basic_ack(tag, BasicAckOptions::default())
                .await
                .map_err(|err| TransportError::ConnectionLost(err.to_string()))
        })
        .await
    }

    async fn nack(&self, delivery: &Delivery) -> Result<(), TransportError> {
        self.bounded(async {
            let (channel, tag) = self.delivered_on(delivery).await?;
            channel
                .basic_reject(tag, BasicRejectOptions { requeue: false })
                .await
                .map_err(|err| TransportError::ConnectionLost(err.to_string()))
        })
        .await
    }

    async fn disconnect(&self) -> Result<(), TransportError> {
        let link = self.link.lock().await.take();
        if let Some(link) = link {
            // A blocked broker never answers the close: give it a moment only.
            let allowance = if link.connection.status().blocked() {
                UNANSWERED_CLOSE_WAIT
            } else {
                self.settings.receipt_timeout.min(2 * UNANSWERED_CLOSE_WAIT)
            };
            Self::within(allowance, async {
                link.connection
                    .close(200, "disconnect".into())
                    .await
                    .map_err(|err| TransportError::ConnectionLost(err.to_string()))
            })
            .await?;
        }
        Ok(())
    }

    fn declares_single_active_consumer(&self) -> bool {
        true
    }
}

impl AmqpTransport {
    /// `work`, bounded by the receipt timeout: a broker that blocks the connection (a resource
    /// alarm) reads nothing, so no answer may be awaited without a deadline.
    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, TransportError>>,
    ) -> Result<T, TransportError> {
        // Opening a connection may try every URL, each within the timeout.
        let urls = u32::try_from(self.settings.urls.len()).unwrap_or(u32::MAX);
        let allowance = self
            .settings
            .receipt_timeout
            .saturating_mul(urls.saturating_add(1));
        Self::within(allowance, work).await
    }

    async fn within<T>(
        allowance: Duration,
        work: impl std::future::Future<Output = Result<T, TransportError>>,
    ) -> Result<T, TransportError> {
        tokio::time::timeout(allowance, work)
            .await
            .unwrap_or(Err(TransportError::ReceiptTimeout(allowance)))
    }

    async fn unsubscribe_now(&self, id: &str) -> Result<(), TransportError> {
        let Some(link) = self.current().await else {
            return Ok(());
        };
        let route = lock(&link.subscriptions).remove(id);
        if let Some(route) = route {
            let cancel = route
                .channel
                .basic_cancel(
                    route.consumer_tag.as_str().into(),
                    BasicCancelOptions::default(),
                )
                .await;
            // The channel goes too: its unacknowledged deliveries go back to their queue.
            let _ = route.channel.close(200, "unsubscribed".into()).await;
            cancel.map_err(|err| link.error(err))?;
        }
        Ok(())
    }
}

impl AmqpTransport {
    /// The channel and delivery tag of `delivery`, refused when it came on an earlier
    /// connection or a subscription since closed (the broker has put it back in its queue).
    async fn delivered_on(&self, delivery: &Delivery) -> Result<(Channel, u64), TransportError> {
        let link = self
            .current()
            .await
            .filter(|link| link.generation == delivery.connection && link.is_open())
            .ok_or_else(TransportError::stale_delivery)?;
        let channel = lock(&link.subscriptions)
            .get(&delivery.subscription)
            .map(|route| route.channel.clone())
            .ok_or_else(TransportError::stale_delivery)?;
        let tag = delivery
            .ack_id
            .parse()
            .map_err(|_| TransportError::stale_delivery())?;
        Ok((channel, tag))
    }
}

/// Locks a mutex of the connection's state; a poisoned lock only means a panic elsewhere.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
