//! The library's tables as SeaORM entities: the outbox ([`published`]), the inbox
//! ([`received`]) and the small tables the relay and retention keep their state in.

pub(crate) mod housekeeping;
pub mod published;
pub mod received;
