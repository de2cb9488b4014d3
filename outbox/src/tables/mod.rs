//! The library's tables as SeaORM entities: the outbox ([`published`]), the inbox
//! ([`received`]), the destinations waiting for a queue ([`unroutable`]), and the small tables
//! the relay and retention keep their state in.

pub(crate) mod housekeeping;
pub mod published;
pub mod received;
pub mod unroutable;
