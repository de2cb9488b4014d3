//! The protocols a scenario speaks to RabbitMQ, [`on_every_transport!`](crate::on_every_transport), which runs a
//! scenario over each, and the waits a test of a `Transport` makes on its subscriptions.

use std::net::SocketAddr;
use std::time::Duration;

use outbox::OutboxConfig;
use outbox::transport::{
    Deliveries, Delivery, Outgoing, StompSettings, StompTransport, SubscriptionEvent,
};

use crate::settings::{self, RABBITMQ_AMQP, RABBITMQ_STOMP, amqp_url};
use crate::stomp_peer::{QueueCleanup, unique};

/// The protocol a scenario's relay and consumer speak to RabbitMQ. Both reach the same queues:
/// a queue declared over one is consumed over the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// STOMP 1.2 through RabbitMQ's STOMP plugin (`OUTBOX_STOMP_HOST_AND_PORTS`).
    Stomp,
    /// AMQP 0-9-1 (`OUTBOX_BROKER_URL`).
    Amqp,
}

impl TransportKind {
    /// Its name, as a child process is told it ([`TransportKind::from_name`]).
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Stomp => "stomp",
            TransportKind::Amqp => "amqp",
        }
    }

    /// The kind named `name` by [`TransportKind::name`].
    pub fn from_name(name: &str) -> Option<TransportKind> {
        [TransportKind::Stomp, TransportKind::Amqp]
            .into_iter()
            .find(|kind| kind.name() == name)
    }

    /// A scenario's summary name: `scenario` over STOMP, `scenario_amqp` over AMQP.
    pub fn summary_name(self, scenario: &str) -> String {
        match self {
            TransportKind::Stomp => scenario.to_owned(),
            TransportKind::Amqp => format!("{scenario}_amqp"),
        }
    }

    /// RabbitMQ's listener for this protocol.
    pub fn broker_addr(self) -> SocketAddr {
        match self {
            TransportKind::Stomp => RABBITMQ_STOMP.parse().expect("an address"),
            TransportKind::Amqp => RABBITMQ_AMQP.parse().expect("an address"),
        }
    }

    /// Settings for tests ([`settings::short_timings`]) for the broker at `addr`: RabbitMQ
    /// itself, or a proxy in front of it.
    pub fn config_at(self, addr: SocketAddr) -> OutboxConfig {
        match self {
            TransportKind::Stomp => settings::stomp(&addr.to_string()),
            TransportKind::Amqp => settings::amqp(&amqp_url(addr)),
        }
    }

    /// Settings for tests for RabbitMQ itself.
    pub fn config(self) -> OutboxConfig {
        self.config_at(self.broker_addr())
    }

    /// Points an `outbox` command at the broker at `addr` over this protocol, removing the
    /// other protocol's variable (inherited, it would contradict this one).
    pub fn point_command(
        self,
        command: &mut tokio::process::Command,
        addr: SocketAddr,
    ) -> &mut tokio::process::Command {
        match self {
            TransportKind::Stomp => command
                .env_remove("OUTBOX_BROKER_URL")
                .env("OUTBOX_STOMP_HOST_AND_PORTS", addr.to_string()),
            TransportKind::Amqp => command
                .env_remove("OUTBOX_STOMP_HOST_AND_PORTS")
                .env("OUTBOX_BROKER_URL", amqp_url(addr)),
        }
    }
}

/// Runs each scenario, an `async fn(TransportKind)` of the test file, over STOMP and AMQP 0-9-1,
/// as the tests `stomp::<scenario>` and `amqp::<scenario>`.
#[macro_export]
macro_rules! on_every_transport {
    ($($scenario:ident),* $(,)?) => {
        mod stomp { $( #[tokio::test] async fn $scenario() { super::$scenario($crate::transports::TransportKind::Stomp).await } )* }
        mod amqp { $( #[tokio::test] async fn $scenario() { super::$scenario($crate::transports::TransportKind::Amqp).await } )* }
    };
}

/// How long a test waits for a delivery it expects.
pub const DELIVERY_WAIT: Duration = Duration::from_secs(10);

/// A message to `destination` with `body` and no further headers.
pub fn outgoing(destination: &str, body: &str) -> Outgoing {
    Outgoing {
        destination: destination.to_owned(),
        headers: Vec::new(),
        body: body.as_bytes().to_vec(),
    }
}

/// The next event of a subscription; panics if none comes within [`DELIVERY_WAIT`] or the
/// subscription ended.
pub async fn next_event(deliveries: &mut Deliveries) -> SubscriptionEvent {
    tokio::time::timeout(DELIVERY_WAIT, deliveries.next_event())
        .await
        .expect("an event within the wait")
        .expect("the subscription is open")
}

/// The next delivery of a subscription, passing over undecodable reports; panics if none comes
/// within [`DELIVERY_WAIT`] or the subscription ended.
pub async fn next_delivery(deliveries: &mut Deliveries) -> Delivery {
    tokio::time::timeout(DELIVERY_WAIT, deliveries.recv())
        .await
        .expect("a delivery within the wait")
        .expect("the subscription is open")
}

/// Panics if a delivery arrives within `quiet` (the subscription ending is not a delivery).
pub async fn no_delivery(deliveries: &mut Deliveries, quiet: Duration) {
    if let Ok(Some(delivery)) = tokio::time::timeout(quiet, deliveries.recv()).await {
        panic!("unexpected delivery {delivery:?}");
    }
}

/// A topic of one test: a unique queue, its destination `/topic/<queue>`, and the clean-up that
/// deletes the queue and its dead-letter queue.
pub struct DeclaredTopic {
    pub queue: String,
    pub destination: String,
    pub cleanup: QueueCleanup,
}

/// A fresh topic named after `prefix`, its queues declared over STOMP as a consumer with
/// `settings` declares them.
pub async fn declared_topic(prefix: &str, settings: &OutboxConfig) -> DeclaredTopic {
    let queue = unique(prefix);
    let cleanup = QueueCleanup(vec![queue.clone(), format!("DLQ.{queue}")]);
    let destination = format!("/topic/{queue}");
    let broker = StompTransport::new(StompSettings::from(settings)).expect("transport");
    outbox::consumer::declare(&broker, settings, &destination, None)
        .await
        .expect("declare the queues");
    DeclaredTopic {
        queue,
        destination,
        cleanup,
    }
}
