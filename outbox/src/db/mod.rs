//! The shared database floor: the database's clock, the classification of database errors, the
//! bounds on every database call, the bounded "select ids, then act by id" batch, and the rows
//! waiting for a queue at their destination (woken by the relay and by `outbox declare`). The
//! relay, the consumer, retention and the operations commands all stand on it; it stands on
//! nothing of theirs.

pub(crate) mod batch;
pub(crate) mod bounds;
pub(crate) mod clock;
pub(crate) mod errors;
pub(crate) mod unroutable;
