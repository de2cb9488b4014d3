//! The `outbox` crate's integration tests, one binary: each module is a former test file.
//! Tests that own process-wide state (the header hook, a global tracing subscriber, the metrics
//! recorder, the write settings) and trybuild keep binaries of their own beside this one.

mod amqp;
mod browse;
mod conformance;
mod consumer;
mod consumer_groups;
mod django_bodies;
mod entity_formats;
mod macro_expansion;
mod migrations;
mod ordering;
mod relay;
mod relay_isolation;
mod relay_rejected;
mod relay_wake;
mod stomp_framing;
mod test_support;
mod tls;
mod write_path;
