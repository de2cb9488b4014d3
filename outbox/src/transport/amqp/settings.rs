//! What [`AmqpTransport::new`](super::AmqpTransport::new) takes: the broker URLs, TLS for
//! `amqps://`, the heartbeat and the receipt timeout.
//!
//! `AmqpSettings::try_from(&config)` takes them from a configuration, after checking it (in
//! `transport/select.rs`, the one place that reads the configuration for a transport).

use std::fmt;
use std::time::Duration;

use crate::config::Secret;
use crate::config::redact_credentials;
use crate::transport::TlsOptions;

/// How an [`AmqpTransport`](super::AmqpTransport) reaches its broker. `Debug` shows the URLs
/// with their passwords replaced by `***`.
///
/// ```
/// use outbox::config::Secret;
/// use outbox::transport::{AmqpSettings, AmqpTransport};
///
/// let mut settings = AmqpSettings::default();
/// settings.urls = vec![Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f")];
/// let transport = AmqpTransport::new(settings).expect("a valid URL");
/// ```
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct AmqpSettings {
    /// The broker URLs, tried in order (`amqp://user:pass@host:5672/vhost`, `amqps://` for
    /// TLS), from `OUTBOX_BROKER_URL`. A URL's own `heartbeat` and `connection_timeout` win
    /// over the settings below.
    pub urls: Vec<Secret>,
    /// TLS for `amqps://` URLs (the `OUTBOX_STOMP_*` TLS settings).
    pub tls: TlsOptions,
    /// The heartbeat interval, in whole seconds on the wire (rounded up); zero turns heartbeats
    /// off. From a configuration: the longer of `OUTBOX_STOMP_HEARTBEATS`.
    pub heartbeat: Duration,
    /// How long a confirm, a connection attempt or another answer is awaited
    /// (`OUTBOX_RECEIPT_TIMEOUT`).
    pub receipt_timeout: Duration,
}

impl AmqpSettings {
    /// The URLs as they may be shown: comma-separated, every password replaced by `***`.
    pub fn urls_redacted(&self) -> String {
        self.urls
            .iter()
            .map(|url| redact_credentials(url.expose()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("urls", &self.urls_redacted())
            .field("tls", &self.tls)
            .field("heartbeat", &self.heartbeat)
            .field("receipt_timeout", &self.receipt_timeout)
            .finish()
    }
}
