//! The one place that turns [`OutboxConfig`] into a transport: AMQP 0-9-1 when a broker URL is
//! set, else STOMP.

use std::sync::Arc;

#[cfg(feature = "amqp")]
use super::AmqpTransport;
use super::{StompTransport, Transport};
use crate::OutboxConfig;

/// The transport the settings select: AMQP 0-9-1 when `OUTBOX_BROKER_URL` is set (which needs
/// the `amqp` feature), else STOMP from the `OUTBOX_STOMP_*` settings. It connects on first use;
/// the TLS files are read now, so a wrong path fails here. The relay, its isolation lane, the
/// consumer, `outbox::send` and the command line all build their transports with it.
pub fn from_config(config: &OutboxConfig) -> Result<Arc<dyn Transport>, crate::Error> {
    config.validate()?;
    if config.uses_amqp() {
        #[cfg(feature = "amqp")]
        {
            return Ok(Arc::new(AmqpTransport::new(config)?));
        }
        #[cfg(not(feature = "amqp"))]
        {
            return Err(crate::Error::Config {
                variable: "OUTBOX_BROKER_URL".into(),
                value: config.broker_urls_redacted(),
                reason: "this build has no AMQP transport: enable the `amqp` feature of the outbox crate".into(),
            });
        }
    }
    Ok(Arc::new(StompTransport::new(config)?))
}
