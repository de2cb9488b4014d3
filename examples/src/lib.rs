//! Examples of the outbox crate, as a library that the example binaries and their tests share.
//!
//! [`orders`] is a small service to read from start to end: two entities that publish, a use case,
//! a consumer, and (in `src/bin/orders.rs`) the process that runs them with the relay.

pub mod orders;
