//! The workspace's test kit: a database per test on every backend, settings with short timings,
//! RabbitMQ helpers, the fault proxy, certificates, the effects table, and the macros that run a
//! scenario on every backend or transport.
//!
//! - [`binaries`]: the `outbox` command, for suites that run it.
//! - [`db`]: a fresh database per test (`TestDb`), `eventually`, and [`on_every_backend!`](crate::on_every_backend).
//! - [`settings`]: `OutboxConfig`s for STOMP and AMQP with the tests' short timings.
//! - [`stomp_peer`]: a raw STOMP client for RabbitMQ, queue names and clean-up.
//! - [`rows`]: the outbox rows a scenario writes and reads back.
//! - [`recorder`]: the metrics recorder a test binary reads.
//! - [`limited_queue`]: a RabbitMQ queue full with `x-overflow: reject-publish`, declared over AMQP.
//! - [`proxy`]: a TCP proxy that cuts, stalls, slows or refuses a link.
//! - [`certs`]: certificate authorities and leaves made for one test.
//! - [`effects`]: the business table a consumer's callback writes to, and its counts.
//! - [`faults`]: the fault suite's known sets, wire counter and summary lines.
//! - [`logs`]: log lines a test reads.
//! - [`transports`]: the transports a scenario runs over, and [`on_every_transport!`](crate::on_every_transport).

pub mod binaries;
pub mod certs;
pub mod db;
pub mod effects;
pub mod faults;
pub mod limited_queue;
pub mod logs;
pub mod proxy;
pub mod recorder;
pub mod rows;
pub mod settings;
pub mod stomp_peer;
pub mod transports;

pub use db::{Backend, Migrator, TestDb, count_with_status, eventually};
pub use transports::TransportKind;
