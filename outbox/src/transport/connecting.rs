//! What a transport and its callers share about connecting: the callers' wish that it stop
//! connecting (a stopping relay or consumer), and what the transport tells them of its
//! connections ([`ConnectionEvent`]), which they count.
//!
//! A connection attempt can last a receipt timeout per address (a broker that accepts the TCP
//! connection and never answers the login), so a process told to stop must be able to cut it
//! short: [`Gate`] is raced against every attempt. Transport code names no metrics module, so
//! what an operator watches per broker address (receipt timeouts, reconnections) leaves it as an
//! event, handed to whatever observer the relay or the consumer set.

use std::sync::{Arc, RwLock};

use tokio::sync::watch;

/// What a transport tells about its connections, for its user to count: the relay and the
/// consumer turn these into the `outbox_broker_*` metrics. Addresses are `host:port`, never
/// credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionEvent {
    /// A connection to `address` opened (the login succeeded).
    Connected {
        /// The broker's address.
        address: String,
        /// Whether the transport had opened a connection before this one.
        reconnection: bool,
    },
    /// The receipts (or confirms) of `messages` messages did not come within the receipt
    /// timeout on the connection to `address`.
    ReceiptTimeout {
        /// The broker's address.
        address: String,
        /// How many messages timed out.
        messages: usize,
    },
    /// The connection to `address` was given up because it answered nothing for the receipt
    /// timeout while receipts were due (a broker that heartbeats but never confirms); the next
    /// connection starts at the next address.
    Abandoned {
        /// The broker's address.
        address: String,
    },
}

/// Receives a transport's [`ConnectionEvent`]s (see [`Transport::observe`](super::Transport::observe)).
/// Called on the transport's own tasks: it must return quickly.
pub type ConnectionObserver = Arc<dyn Fn(&ConnectionEvent) + Send + Sync>;

/// A transport's observer, if one was set.
#[derive(Default)]
pub(crate) struct Observed(RwLock<Option<ConnectionObserver>>);

impl Observed {
    /// Sets the observer, replacing any earlier one.
    pub(crate) fn set(&self, observer: ConnectionObserver) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(observer);
    }

    /// Logs and reports that the connection to `address` is given up: the broker answered
    /// nothing for `timeout` while receipts (or confirms) were due.
    pub(crate) fn abandoned(&self, address: &str, timeout: std::time::Duration) {
        tracing::warn!(
            broker = %address,
            ?timeout,
            "the broker answered nothing for the receipt timeout while receipts were due; giving this connection up (the next one starts at the next address)"
        );
        self.report(ConnectionEvent::Abandoned {
            address: address.to_owned(),
        });
    }

    /// Hands `event` to the observer, if there is one.
    pub(crate) fn report(&self, event: ConnectionEvent) {
        let observer = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(observer) = observer {
            observer(&event);
        }
    }
}

/// Whether a transport may connect: closed by [`Transport::stop_connecting`](super::Transport::stop_connecting),
/// which ends every attempt in progress at once, opened again by
/// [`Transport::resume_connecting`](super::Transport::resume_connecting).
pub(crate) struct Gate(watch::Sender<bool>);

impl Default for Gate {
    fn default() -> Self {
        Gate(watch::Sender::new(false))
    }
}

impl Gate {
    /// Ends the attempts in progress and refuses new ones.
    pub(crate) fn stop(&self) {
        self.0.send_replace(true);
    }

    /// Lets connections open again.
    pub(crate) fn resume(&self) {
        self.0.send_replace(false);
    }

    /// Whether connecting is stopped.
    pub(crate) fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once connecting is stopped (at once if it is).
    pub(crate) async fn stopped(&self) {
        let mut watching = self.0.subscribe();
        // The sender lives as long as `self`: `wait_for` cannot fail while this is awaited.
        let _ = watching.wait_for(|stopped| *stopped).await;
    }

    /// `attempt`, unless connecting is stopped first: then [`TransportError::Closed`](super::TransportError::Closed).
    pub(crate) async fn attempt<T>(
        &self,
        attempt: impl std::future::Future<Output = Result<T, super::TransportError>>,
    ) -> Result<T, super::TransportError> {
        if self.is_stopped() {
            return Err(super::TransportError::Closed);
        }
        tokio::select! {
            result = attempt => result,
            () = self.stopped() => Err(super::TransportError::Closed),
        }
    }
}
