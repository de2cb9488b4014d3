//! `outbox declare`: a consumer's queues declared ahead of it, then the rows that wait for a
//! queue at the destinations its binding serves made due at once (over AMQP the broker returned
//! their messages, and the relay parked them behind one probe per destination).

use sea_orm::DatabaseConnection;

use super::status::unroutable_destinations;
use super::wake_relays;
use crate::consumer::Topology;
use crate::db::unroutable::{forget, wake};
use crate::error::Error;
use crate::transport::{Transport, topic_matches};

/// What [`declare`] did besides declaring the queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    /// The destinations the new binding serves whose waiting rows were made due: the declared
    /// destination, and the destinations recorded as unroutable that its binding key matches.
    pub destinations: Vec<String>,
    /// The rows made due at once.
    pub woken: u64,
}

/// Declares `topology`'s queue (bound to its destination) and dead-letter queue on `transport`
/// ([`Topology::declare`]), then makes the rows waiting for a queue at the destinations the
/// binding serves due at once, and forgets those destinations in `outbox_unroutable`. Without
/// it, they would wait for their destination's next probe (up to `OUTBOX_MAXIMUM_BACKOFF`). On
/// PostgreSQL idle relays are notified.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), outbox::Error> {
/// let config = outbox::OutboxConfig::from_env()?;
/// let broker = outbox::transport::from_config(&config)?;
/// let topology = outbox::consumer::Topology::new(&config, "/topic/orders.v1", None)?;
/// let declared = outbox::ops::declare(db, broker.as_ref(), &topology).await?;
/// println!("{} waiting rows due now", declared.woken);
/// # Ok(()) }
/// ```
pub async fn declare(
    db: &DatabaseConnection,
    transport: &dyn Transport,
    topology: &Topology,
) -> Result<Declared, Error> {
    topology.declare(transport).await?;
    let recorded = unroutable_destinations(db).await?;
    let declared = topology.destination();
    let mut destinations = vec![declared.to_owned()];
    destinations.extend(
        recorded
            .into_iter()
            .filter(|destination| destination != declared && serves(declared, destination)),
    );
    if let Err(err) = forget(db, &destinations).await {
        tracing::warn!(error = %err, "forgetting the unroutable destinations failed");
    }
    let woken = wake(db, &destinations).await?;
    if woken > 0 {
        wake_relays(db).await;
    }
    tracing::info!(destinations = ?destinations, woken, "rows waiting for a queue are due now");
    Ok(Declared {
        destinations,
        woken,
    })
}

/// Whether a queue bound as a consumer of `declared` receives what is sent to `destination`:
/// the same exchange, and a routing key its binding key matches (`*` and `#` included).
fn serves(declared: &str, destination: &str) -> bool {
    let split = |destination: &str| -> Option<(String, String)> {
        if let Some(key) = destination.strip_prefix("/topic/") {
            return Some(("amq.topic".to_owned(), key.to_owned()));
        }
        let rest = destination.strip_prefix("/exchange/")?;
        let (exchange, key) = rest.split_once('/').unwrap_or((rest, ""));
        Some((exchange.to_owned(), key.to_owned()))
    };
    match (split(declared), split(destination)) {
        (Some((exchange, binding)), Some((their_exchange, key))) => {
            exchange == their_exchange && topic_matches(&binding, &key)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::serves;

    #[test]
    fn a_binding_serves_the_destinations_its_key_matches() {
        assert!(serves("/topic/orders.*", "/topic/orders.v1"));
        assert!(serves("/topic/orders.#", "/topic/orders.created.v1"));
        assert!(!serves("/topic/orders.*", "/topic/orders.created.v1"));
        assert!(!serves("/topic/orders.v1", "/topic/orders.v2"));
        assert!(serves(
            "/exchange/events/orders.*",
            "/exchange/events/orders.v1"
        ));
        assert!(!serves("/exchange/events/orders.*", "/topic/orders.v1"));
        assert!(!serves("/queue/orders", "/queue/orders"));
    }
}
