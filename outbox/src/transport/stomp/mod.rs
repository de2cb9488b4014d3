//! The STOMP transport's face: [`StompTransport`], what the relay and the consumer call, over one
//! connection at a time that it opens on first use and again after a failure.
//!
//! async-stomp's frame codec runs over a TCP or TLS stream that this module owns, so that it
//! controls what async-stomp's own connector does not: failover across the configured hosts, a
//! private CA and client certificates, heartbeats, receipts and typed errors. The parts, by job:
//! - [`connection`]: login with failover, and what callers do on an open connection (send with
//!   receipts, subscribe, request);
//! - [`driver`]: the task that owns the socket, routes the broker's frames, sends heartbeats and
//!   declares the connection dead;
//! - [`pacing`]: when the next connection may open, after the broker closed connections early;
//! - [`socket`]: the TCP or TLS stream and its non-blocking write side;
//! - [`framing`]: frames that do not decode, or exceed the maximum size, set apart from the rest;
//! - [`tls`]: the rustls client;
//! - [`settings`]: what [`StompTransport::new`] takes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_stomp::{Message, ToServer};

use super::{Deliveries, Delivery, Outgoing, SendReport, Subscription, Transport, TransportError};
use connection::Connection;
use pacing::Pacing;

mod connection;
mod driver;
mod framing;
mod pacing;
mod settings;
mod socket;
pub(crate) mod tls;

pub use settings::{StompSettings, TlsOptions};

/// How long a DISCONNECT waits for its receipt on a connection where one already timed out.
const UNANSWERED_DISCONNECT_WAIT: Duration = Duration::from_secs(1);

/// A STOMP 1.2 broker connection with failover, heartbeats and receipts.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use outbox::transport::{Outgoing, StompSettings, StompTransport, Transport};
///
/// // guest:guest@127.0.0.1:61613; `StompSettings::from(&config)` reads them from the settings.
/// let broker = StompTransport::new(StompSettings::default())?;
/// let report = broker
///     .send(&[Outgoing {
///         destination: "/topic/orders".into(),
///         headers: vec![],
///         body: br#"{"id": 1}"#.to_vec(),
///     }])
///     .await;
/// assert!(report.all_receipted());
/// # Ok(()) }
/// ```
pub struct StompTransport {
    settings: StompSettings,
    /// The TLS client of `settings.tls`, its files read.
    tls: Option<tls::ClientTls>,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// Numbers the connections this transport opens ([`Delivery::connection`]).
    connections_opened: AtomicU64,
    /// Whether the next connection must wait, after connections the broker closed early.
    pacing: Mutex<Pacing>,
}

impl StompTransport {
    /// A transport for the broker `settings` name; it connects on first use. TLS files are
    /// read now, so a wrong path fails here. A passcode that would cross the network in clear
    /// (no TLS, an address other than loopback) is warned of once per address.
    pub fn new(settings: StompSettings) -> Result<Self, TransportError> {
        let tls = settings.tls.as_ref().map(tls::ClientTls::new).transpose()?;
        settings.warn_of_a_plain_passcode();
        Ok(Self {
            settings,
            tls,
            connection: tokio::sync::Mutex::new(None),
            connections_opened: AtomicU64::new(0),
            pacing: Mutex::new(Pacing::default()),
        })
    }

    /// The open connection, or a new one; [`TransportError::ReconnectPaused`] while the
    /// transport waits after connections the broker closed early ([`pacing`]).
    async fn connection(&self) -> Result<Arc<Connection>, TransportError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            if connection.is_open() {
                return Ok(connection.clone());
            }
            if let Some(ending) = connection.ending() {
                lock(&self.pacing).ended(&ending);
            }
        }
        *slot = None;
        if let Some(wait) = lock(&self.pacing).wait(Instant::now()) {
            return Err(TransportError::ReconnectPaused(wait));
        }
        let generation = self.connections_opened.fetch_add(1, Ordering::Relaxed) + 1;
        let connection =
            Arc::new(Connection::open(&self.settings, self.tls.as_ref(), generation).await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// The open connection, if any, without connecting.
    async fn current(&self) -> Result<Arc<Connection>, TransportError> {
        match self.connection.lock().await.as_ref() {
            Some(connection) if connection.is_open() => Ok(connection.clone()),
            _ => Err(TransportError::ConnectionLost("not connected".into())),
        }
    }

    /// The open connection, if `delivery` came on it: an ack id is only meaningful there.
    async fn current_for(&self, delivery: &Delivery) -> Result<Arc<Connection>, TransportError> {
        let connection = self.current().await?;
        if connection.generation != delivery.connection {
            return Err(TransportError::stale_delivery());
        }
        Ok(connection)
    }
}

#[async_trait::async_trait]
impl Transport for StompTransport {
    async fn connect(&self) -> Result<(), TransportError> {
        self.connection().await.map(|_| ())
    }

    async fn send(&self, messages: &[Outgoing]) -> SendReport {
        let connection = match self.connection().await {
            Ok(connection) => connection,
            Err(err) => return SendReport::unsent(messages.len(), err),
        };
        connection
            .send(messages, self.settings.receipt_timeout)
            .await
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Deliveries, TransportError> {
        let connection = self.connection().await?;
        connection
            .subscribe(subscription, self.settings.receipt_timeout)
            .await
    }

    async fn unsubscribe(&self, id: &str) -> Result<(), TransportError> {
        let connection = self.current().await?;
        connection.subscriptions().remove(id);
        connection
            .request(
                ToServer::Unsubscribe { id: id.to_owned() }.into(),
                self.settings.receipt_timeout,
            )
            .await
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), TransportError> {
        let connection = self.current_for(delivery).await?;
        connection.write(
            ToServer::Ack {
                id: delivery.ack_id.clone(),
                transaction: None,
            }
            .into(),
        )
    }

    async fn nack(&self, delivery: &Delivery) -> Result<(), TransportError> {
        let connection = self.current_for(delivery).await?;
        let mut frame: Message<ToServer> = ToServer::Nack {
            id: delivery.ack_id.clone(),
            transaction: None,
        }
        .into();
        frame
            .extra_headers
            .push((b"requeue".to_vec(), b"false".to_vec()));
        connection.write(frame)
    }

    async fn disconnect(&self) -> Result<(), TransportError> {
        let Some(connection) = self.connection.lock().await.take() else {
            return Ok(());
        };
        if !connection.is_open() {
            return Ok(());
        }
        connection.shared.closing.store(true, Ordering::Relaxed);
        // A broker that let a receipt time out on this connection (blocked by an alarm, say)
        // would most likely let the DISCONNECT's time out too: a stopping process then waits
        // only briefly, long enough for frames queued before it (acknowledgements) to leave.
        let wait = if connection.shared.unanswered.load(Ordering::Relaxed) {
            self.settings
                .receipt_timeout
                .min(UNANSWERED_DISCONNECT_WAIT)
        } else {
            self.settings.receipt_timeout
        };
        let result = connection
            .request(ToServer::Disconnect { receipt: None }.into(), wait)
            .await;
        connection.close();
        result
    }
}

/// Locks a mutex shared with the connection's task.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the map inside is still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
