//! A small orders service on the transactional outbox.
//!
//! Selling places orders: [`place_order`] saves an [`order`] and its [`payment`] in one
//! transaction, and `#[outbox::publish]` on both entities writes their messages
//! (`/topic/orders.v1`, `/topic/payments`) into the outbox in that same transaction. The relay
//! (`outbox::Producer`) sends them to the broker.
//!
//! Shipping consumes `/topic/orders.v1` from its own queue: [`shipping::ship`] records a
//! [`shipment`] per order in the transaction that also records the message in the inbox, so a
//! message delivered twice ships once.
//!
//! The two sides share a process and a database here to keep the example small; in production
//! they would usually be two services, each with its own database and the outbox's tables in it.
//! `src/bin/orders.rs` runs it all; `tests/orders.rs` shows how to test such a service without a
//! broker.

pub mod database;
pub mod order;
pub mod payment;
pub mod selling;
pub mod shipment;
pub mod shipping;

pub use selling::place_order;
