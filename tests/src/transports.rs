//! The protocols a scenario speaks to RabbitMQ, and [`on_every_transport!`], which runs a
//! scenario over each.

use std::net::SocketAddr;

use outbox::OutboxConfig;

use crate::settings::{self, RABBITMQ_AMQP, RABBITMQ_STOMP, amqp_url};

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
