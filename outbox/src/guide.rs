//! The guide: how to use the outbox, chapter by chapter.
//!
//! Each chapter is a module with no items, only its text; the examples in it compile as
//! doctests. Read them in this order:
//!
//! 1. [`write_path`]: `#[publish]`, saving in a transaction, explicit messages, Django's encodings.
//! 2. [`tables`]: the tables, and running their migrations.
//! 3. [`django`]: adopting a django-outbox-pattern database.
//! 4. [`relaying`]: the relay, its rounds, wake-up, poison rows and retention.
//! 5. [`consuming`]: the consumer, its outcomes, retries, group commits and queues.
//! 6. [`ordering`]: per-key order, what it costs, what blocks a key.
//! 7. [`transports`]: STOMP or AMQP, the in-memory broker, wire compatibility.
//! 8. [`guarantees`]: what is promised, every case of a duplicate, the fault suite.
//! 9. [`operating`]: the `outbox` command, metrics and tracing.
//! 10. [`settings`]: every `OUTBOX_*` variable, its default and range.
//! 11. [`testing`]: testing a service that publishes or consumes.

pub mod write_path {
    #![doc = include_str!("../docs/guide/write-path.md")]
}

pub mod tables {
    #![doc = include_str!("../docs/guide/tables.md")]
}

pub mod django {
    #![doc = include_str!("../docs/guide/django.md")]
}

pub mod relaying {
    #![doc = include_str!("../docs/guide/relaying.md")]
}

pub mod consuming {
    #![doc = include_str!("../docs/guide/consuming.md")]
}

pub mod ordering {
    #![doc = include_str!("../docs/guide/ordering.md")]
}

pub mod transports {
    #![doc = include_str!("../docs/guide/transports.md")]
}

pub mod guarantees {
    #![doc = include_str!("../docs/guide/guarantees.md")]
}

pub mod operating {
    #![doc = include_str!("../docs/guide/operating.md")]
}

pub mod settings {
    #![doc = include_str!("../docs/guide/settings.md")]
}

pub mod testing {
    #![doc = include_str!("../docs/guide/testing.md")]
}
