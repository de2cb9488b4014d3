//! Settings for tests: a broker's address and the short timings that keep a test quick.

use std::net::SocketAddr;
use std::time::Duration;

use outbox::OutboxConfig;
use outbox::config::Secret;

/// RabbitMQ's STOMP listener (guest/guest).
pub const RABBITMQ_STOMP: &str = "127.0.0.1:61613";

/// RabbitMQ's AMQP 0-9-1 listener (guest/guest, vhost `/`).
pub const RABBITMQ_AMQP: &str = "127.0.0.1:5672";

/// Settings for the STOMP broker at `broker` (`host:port`), with [`short_timings`].
pub fn stomp(broker: &str) -> OutboxConfig {
    let (host, port) = broker.rsplit_once(':').expect("host:port");
    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = vec![(host.to_owned(), port.parse().expect("port"))];
    short_timings(config)
}

/// Settings for the AMQP brokers at `urls` (comma-separated), with [`short_timings`].
pub fn amqp(urls: &str) -> OutboxConfig {
    let mut config = OutboxConfig::default();
    config.broker_url = urls.split(',').map(Secret::new).collect();
    short_timings(config)
}

/// The AMQP URL of RabbitMQ's guest user and vhost `/` at `addr`.
pub fn amqp_url(addr: SocketAddr) -> String {
    format!("amqp://guest:guest@{addr}/%2f")
}

/// `config` with the tests' short timings: quick retries, receipts and leases of seconds.
pub fn short_timings(mut config: OutboxConfig) -> OutboxConfig {
    config.receipt_timeout = Duration::from_secs(2);
    config.producer_lease = Duration::from_secs(4);
    config.maximum_backoff = Duration::from_millis(300);
    config.producer_waiting_time = Duration::from_millis(100);
    config.pause_for_retry = Duration::ZERO;
    config.wait_retry = Duration::ZERO;
    config.consumer_retry_wait = Duration::from_millis(100);
    config.consumer_shutdown_timeout = Duration::from_secs(5);
    config
}
