//! The one place that turns [`OutboxConfig`] into a transport: AMQP 0-9-1 when a broker URL is
//! set, else STOMP; and where each transport's settings are read from it.
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use outbox::transport::{StompSettings, StompTransport};
//!
//! let config = outbox::OutboxConfig::from_env()?;
//! // The configured transport, whichever it is:
//! let transport = outbox::transport::from_config(&config)?;
//! // Or STOMP itself, with the `OUTBOX_STOMP_*` settings:
//! let stomp = StompTransport::new(StompSettings::from(&config))?;
//! # Ok(()) }
//! ```

use std::sync::Arc;

#[cfg(feature = "amqp")]
use super::{AmqpSettings, AmqpTransport, TransportError};
use super::{StompSettings, StompTransport, TlsOptions, Transport};
use crate::config::OutboxConfig;

/// The transport the settings select: AMQP 0-9-1 when `OUTBOX_BROKER_URL` is set (which needs
/// the `amqp` feature), else STOMP from the `OUTBOX_STOMP_*` settings. It connects on first use;
/// the TLS files are read now, so a wrong path fails here. The relay, its isolation lane, the
/// consumer, `outbox::send` and the command line all build their transports with it.
pub fn from_config(config: &OutboxConfig) -> Result<Arc<dyn Transport>, crate::error::Error> {
    config.validate()?;
    if config.uses_amqp() {
        #[cfg(feature = "amqp")]
        {
            return Ok(Arc::new(AmqpTransport::new(amqp_settings(config))?));
        }
        #[cfg(not(feature = "amqp"))]
        {
            return Err(crate::error::Error::Config {
                variable: "OUTBOX_BROKER_URL".into(),
                value: config.broker_urls_redacted(),
                reason: "this build has no AMQP transport: enable the `amqp` feature of the outbox crate".into(),
            });
        }
    }
    Ok(Arc::new(StompTransport::new(StompSettings::from(config))?))
}

/// The TLS settings (`OUTBOX_STOMP_CA_CERTS`, `_CERT_FILE`, `_KEY_FILE`, `_TLS_SERVER_NAME`,
/// `_TLS_VERIFY_HOSTNAME`), which both transports use.
fn tls_options(config: &OutboxConfig) -> TlsOptions {
    TlsOptions {
        ca_certs: config.stomp_ca_certs.clone(),
        cert_file: config.stomp_cert_file.clone(),
        key_file: config.stomp_key_file.clone(),
        server_name: config.stomp_tls_server_name.clone(),
        verify_hostname: config.stomp_tls_verify_hostname,
    }
}

impl From<&OutboxConfig> for StompSettings {
    /// The `OUTBOX_STOMP_*` settings and the receipt timeout; TLS when `stomp_use_ssl` is set.
    /// The configuration is not checked here: [`OutboxConfig::validate`] does.
    fn from(config: &OutboxConfig) -> Self {
        StompSettings {
            addresses: config.stomp_host_and_ports.clone(),
            vhost: config.stomp_vhost.clone(),
            login: config.stomp_username.clone(),
            passcode: config.stomp_passcode.clone(),
            tls: config.stomp_use_ssl.then(|| tls_options(config)),
            heartbeats: config.stomp_heartbeats,
            receipt_timeout: config.receipt_timeout,
            max_frame_size: config.stomp_max_frame_size,
        }
    }
}

impl Default for StompSettings {
    /// The defaults of [`OutboxConfig`]: `guest:guest` at `127.0.0.1:61613`, vhost `/`, no TLS.
    fn default() -> Self {
        StompSettings::from(&OutboxConfig::default())
    }
}

/// The AMQP settings of a configuration that has been checked.
#[cfg(feature = "amqp")]
fn amqp_settings(config: &OutboxConfig) -> AmqpSettings {
    let (outgoing, incoming) = config.stomp_heartbeats;
    AmqpSettings {
        urls: config.broker_url.clone(),
        tls: tls_options(config),
        heartbeat: outgoing.max(incoming),
        receipt_timeout: config.receipt_timeout,
    }
}

#[cfg(feature = "amqp")]
impl TryFrom<&OutboxConfig> for AmqpSettings {
    type Error = TransportError;

    /// `OUTBOX_BROKER_URL`, the TLS settings, the longer of the heartbeats and the receipt
    /// timeout, once [`OutboxConfig::validate`] accepts the configuration (a refusal is a
    /// [`TransportError::Connect`] naming the URLs without their passwords).
    fn try_from(config: &OutboxConfig) -> Result<Self, TransportError> {
        config.validate().map_err(|err| TransportError::Connect {
            addresses: config.broker_urls_redacted(),
            reason: err.to_string(),
        })?;
        Ok(amqp_settings(config))
    }
}

#[cfg(feature = "amqp")]
impl Default for AmqpSettings {
    /// No URL (set at least one), and otherwise the defaults of [`OutboxConfig`]: 10 s
    /// heartbeats and receipt timeout, the public web roots for `amqps://`.
    fn default() -> Self {
        amqp_settings(&OutboxConfig::default())
    }
}
