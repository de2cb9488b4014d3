//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade: the relay and the consumer
//! record them, and they go wherever the service's recorder sends them (Prometheus,
//! StatsD, ...). Without a recorder installed they cost next to nothing and go nowhere: the
//! library installs none itself.
//!
//! Labels are few and bounded: the destination of a relayed message (its version suffix
//! included), the queue of a consumer, and the outcome of a consumed message. Never an id.
//!
//! | name | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `outbox_messages_sent_total` | counter | `destination` | messages the broker receipted (the relay then marks their rows SUCCEEDED) |
//! | `outbox_messages_refused_total` | counter | `destination` | sends the broker refused; each spends one of the row's attempts (= retried + failed) |
//! | `outbox_messages_retried_total` | counter | `destination` | refused messages scheduled for another attempt |
//! | `outbox_messages_failed_total` | counter | `destination` | refused messages whose last attempt this was: their rows are now FAILED |
//! | `outbox_messages_expired_total` | counter | | rows marked FAILED because they were not sent before their `expires_at` |
//! | `outbox_messages_released_total` | counter | | claimed rows given back unsent because the broker connection failed (no attempt spent) |
//! | `outbox_messages_unroutable_total` | counter | `destination` | messages the broker returned because no queue is bound to their destination (AMQP, `mandatory`); with `OUTBOX_UNROUTABLE=retry` their rows wait and no attempt is spent |
//! | `outbox_messages_nacked_total` | counter | | messages the broker could not take (AMQP `basic.nack`): given back with a pause, no attempt spent |
//! | `outbox_messages_rejected_total` | counter | `destination` | publishes the broker rejected, most likely a queue full with `x-overflow: reject-publish`: an AMQP `basic.nack`, or over STOMP a connection the broker closed with that message alone pending; their rows wait a short pause, no attempt spent |
//! | `outbox_relay_batch_size` | histogram | | rows claimed per relay batch |
//! | `outbox_relay_batch_duration_seconds` | histogram | | time to claim, send and settle one batch |
//! | `outbox_pending_messages` | gauge | | rows waiting to be sent (status SCHEDULE), sampled by each relay every 10 s |
//! | `outbox_oldest_pending_age_seconds` | gauge | | age of the oldest row waiting to be sent (0 when none), sampled with the above |
//! | `outbox_blocked_keys` | gauge | | ordering keys that a FAILED row blocks (none of their later rows is sent until it is retried or purged), sampled with the above |
//! | `outbox_unroutable_destinations` | gauge | | destinations waiting for a queue (AMQP: the broker returned their last message; the table `outbox_unroutable`), sampled with the above |
//! | `outbox_consumer_messages_total` | counter | `queue`, `outcome` | consumed messages by outcome: `acked`, `duplicate` (already in the inbox: acked without running the callback), `nacked` (the callback called `nack()`), `dead_lettered` (the callback failed or panicked, or its transient failures outlasted the retries), `undecodable` (the frame did not decode, or exceeded `OUTBOX_STOMP_MAX_FRAME_SIZE`: rejected to the dead-letter queue without running the callback), and `retried` (not a final outcome: one per further attempt after a transient failure) |
//! | `outbox_consumer_callback_duration_seconds` | histogram | `queue` | time the callback took, per attempt |
//! | `outbox_consumer_group_size` | histogram | `queue` | messages per committed group (group commits: `OUTBOX_CONSUMER_GROUP_SIZE` above 1) |
//! | `outbox_relay_lag_seconds` | histogram | | per receipted message: from its row's `added` (set when the row was saved, on the writer's clock) to the broker's receipt (on the relay's clock) |
//! | `outbox_database_timeouts_total` | counter | `kind` | database calls of the relay, the consumer or retention that timed out, each a transient failure (retried, never charged to a row): `no_answer` (no answer within `OUTBOX_DB_STATEMENT_TIMEOUT` + 1 s: a stalled connection, abandoned by the client), `statement` (the server ended the statement at its statement timeout), `lock` (a lock wait past `OUTBOX_DB_LOCK_TIMEOUT`) |
//! | `outbox_consumer_lag_seconds` | histogram | `queue` | per committed message, end to end: from its `dop-msg-sent-time` header (the save time, on the writer's clock) to the commit of the callback's transaction (on the consumer's clock); messages without a parsable header are not recorded |
//!
//! The pending gauges describe the whole table, not one relay: with several relays, aggregate
//! them with `max`, not `sum`.
//!
//! The lag histograms compare two hosts' clocks, so clock skew between the writer and the relay
//! or consumer enters them; a negative difference (a clock behind the writer's) is recorded as 0.
//!
//! Install a recorder at the start of the service (with metrics-exporter-prometheus:
//! `PrometheusBuilder::new().install()?`), then let [`describe`] give it each metric's help text
//! and unit:
//!
//! ```no_run
//! // After installing the recorder:
//! outbox::metrics::describe();
//! ```
//!
//! This module needs the `metrics` feature (on by default); without it nothing is recorded.

// Without the feature the recording functions still take their arguments, and ignore them.
#![cfg_attr(not(feature = "metrics"), allow(unused_variables, dead_code))]

use std::collections::BTreeMap;
use std::time::Duration;

#[cfg(feature = "metrics")]
use ::metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
#[cfg(not(feature = "metrics"))]
use noop::{counter, gauge, histogram};

use crate::tables::published::Model as Row;

/// Ordering keys that a FAILED row blocks.
pub const BLOCKED_KEYS: &str = "outbox_blocked_keys";
/// Gauge: destinations waiting for a queue (`outbox_unroutable`).
pub const UNROUTABLE_DESTINATIONS: &str = "outbox_unroutable_destinations";
/// Messages the broker receipted.
pub const MESSAGES_SENT: &str = "outbox_messages_sent_total";
/// Sends the broker refused.
pub const MESSAGES_REFUSED: &str = "outbox_messages_refused_total";
/// Refused messages scheduled for another attempt.
pub const MESSAGES_RETRIED: &str = "outbox_messages_retried_total";
/// Refused messages marked FAILED after their last attempt.
pub const MESSAGES_FAILED: &str = "outbox_messages_failed_total";
/// Rows marked FAILED because they expired unsent.
pub const MESSAGES_EXPIRED: &str = "outbox_messages_expired_total";
/// Claimed rows given back after a broker connection failure.
pub const MESSAGES_RELEASED: &str = "outbox_messages_released_total";
/// Counter: messages returned because no queue is bound to their destination, by destination.
pub const MESSAGES_UNROUTABLE: &str = "outbox_messages_unroutable_total";
/// Counter: messages the broker nacked (back-pressure), given back without an attempt spent.
pub const MESSAGES_NACKED: &str = "outbox_messages_nacked_total";
/// Counter: publishes the broker rejected (a queue full with `reject-publish`), by destination.
pub const MESSAGES_REJECTED: &str = "outbox_messages_rejected_total";
/// Counter: database calls that timed out, by kind (`no_answer`, `statement`, `lock`).
pub const DATABASE_TIMEOUTS: &str = "outbox_database_timeouts_total";
/// Rows per relay batch.
pub const RELAY_BATCH_SIZE: &str = "outbox_relay_batch_size";
/// Seconds per relay batch.
pub const RELAY_BATCH_DURATION: &str = "outbox_relay_batch_duration_seconds";
/// Rows waiting to be sent.
pub const PENDING_MESSAGES: &str = "outbox_pending_messages";
/// Age of the oldest row waiting to be sent, in seconds.
pub const OLDEST_PENDING_AGE: &str = "outbox_oldest_pending_age_seconds";
/// Consumed messages by outcome.
pub const CONSUMER_MESSAGES: &str = "outbox_consumer_messages_total";
/// Seconds per callback attempt.
pub const CONSUMER_CALLBACK_DURATION: &str = "outbox_consumer_callback_duration_seconds";
/// Messages per committed consumer group.
pub const CONSUMER_GROUP_SIZE: &str = "outbox_consumer_group_size";
/// Seconds from a row's save to the broker's receipt of its message.
pub const RELAY_LAG: &str = "outbox_relay_lag_seconds";
/// Seconds from a message's save (`dop-msg-sent-time`) to the commit of its callback.
pub const CONSUMER_LAG: &str = "outbox_consumer_lag_seconds";
/// Counter: messages whose callback returned `Ok` in a transaction that could no longer commit
/// (a statement failed and its error was ignored, or the database rolled the transaction back),
/// by queue. Each was rolled back and retried instead of acknowledged with nothing committed.
pub const CONSUMER_DEAD_TRANSACTIONS: &str = "outbox_consumer_dead_transactions_total";

/// Recording that compiles to nothing, for a build without the `metrics` feature.
#[cfg(not(feature = "metrics"))]
mod noop {
    /// Takes the place of a counter, gauge or histogram handle.
    pub(super) struct Noop;

    impl Noop {
        pub(super) fn increment(&self, _: u64) {}
        pub(super) fn record(&self, _: f64) {}
        pub(super) fn set(&self, _: f64) {}
    }

    macro_rules! counter {
        ($($any:tt)*) => {
            $crate::metrics::noop::Noop
        };
    }
    pub(super) use counter;
    pub(super) use counter as gauge;
    pub(super) use counter as histogram;
}

/// Gives the installed recorder the help text and unit of every outbox metric. Call it once,
/// after installing the recorder; recording works without it.
#[cfg(feature = "metrics")]
pub fn describe() {
    describe_counter!(
        MESSAGES_SENT,
        Unit::Count,
        "Messages the broker receipted, by destination"
    );
    describe_counter!(
        MESSAGES_REFUSED,
        Unit::Count,
        "Sends the broker refused (each spends an attempt), by destination"
    );
    describe_counter!(
        MESSAGES_RETRIED,
        Unit::Count,
        "Refused messages scheduled for another attempt, by destination"
    );
    describe_counter!(
        MESSAGES_FAILED,
        Unit::Count,
        "Refused messages marked FAILED after their last attempt, by destination"
    );
    describe_counter!(
        MESSAGES_EXPIRED,
        Unit::Count,
        "Rows marked FAILED because they were not sent before expires_at"
    );
    describe_counter!(
        MESSAGES_RELEASED,
        Unit::Count,
        "Claimed rows given back unsent because the broker connection failed"
    );
    describe_counter!(
        MESSAGES_UNROUTABLE,
        Unit::Count,
        "Messages the broker returned because no queue is bound to their destination, by destination"
    );
    describe_counter!(
        MESSAGES_NACKED,
        Unit::Count,
        "Messages the broker nacked (back-pressure), given back without spending an attempt"
    );
    describe_counter!(
        MESSAGES_REJECTED,
        Unit::Count,
        "Publishes the broker rejected (a queue full with x-overflow reject-publish), by destination; their rows wait without spending an attempt"
    );
    describe_histogram!(
        RELAY_BATCH_SIZE,
        Unit::Count,
        "Rows claimed per relay batch"
    );
    describe_histogram!(
        RELAY_BATCH_DURATION,
        Unit::Seconds,
        "Time to claim, send and settle one relay batch"
    );
    describe_gauge!(
        PENDING_MESSAGES,
        Unit::Count,
        "Rows waiting to be sent, sampled every 10 s"
    );
    describe_gauge!(
        OLDEST_PENDING_AGE,
        Unit::Seconds,
        "Age of the oldest row waiting to be sent, sampled every 10 s"
    );
    describe_gauge!(
        BLOCKED_KEYS,
        Unit::Count,
        "Ordering keys that a FAILED row blocks, sampled every 10 s"
    );
    describe_gauge!(
        UNROUTABLE_DESTINATIONS,
        Unit::Count,
        "Destinations waiting for a queue (the broker returned their last message; outbox_unroutable), sampled every 10 s"
    );
    describe_counter!(
        CONSUMER_MESSAGES,
        Unit::Count,
        "Consumed messages by queue and outcome (acked, duplicate, nacked, dead_lettered, undecodable, retried)"
    );
    describe_counter!(
        CONSUMER_DEAD_TRANSACTIONS,
        Unit::Count,
        "Messages whose callback returned Ok in a transaction that could no longer commit (an ignored statement error, a rollback by the database), by queue; each was rolled back and retried"
    );
    describe_histogram!(
        CONSUMER_CALLBACK_DURATION,
        Unit::Seconds,
        "Time the consumer callback took, per attempt"
    );
    describe_histogram!(
        CONSUMER_GROUP_SIZE,
        Unit::Count,
        "Messages per committed consumer group (one transaction), by queue"
    );
    describe_counter!(
        DATABASE_TIMEOUTS,
        Unit::Count,
        "Database calls that timed out (transient, retried), by kind: no_answer, statement, lock"
    );
    describe_histogram!(
        RELAY_LAG,
        Unit::Seconds,
        "Time from a row's save (its added column, writer's clock) to the broker's receipt of its message (relay's clock)"
    );
    describe_histogram!(
        CONSUMER_LAG,
        Unit::Seconds,
        "Time from a message's save (its dop-msg-sent-time header, writer's clock) to the commit of the callback's transaction (consumer's clock), by queue"
    );
}

/// Counts receipted rows, one increment per destination, and records each row's relay lag
/// (its receipt is now).
pub(crate) fn sent(rows: &[Row]) {
    let now = chrono::Utc::now();
    let lag = histogram!(RELAY_LAG);
    let mut per_destination: BTreeMap<&str, u64> = BTreeMap::new();
    for row in rows {
        *per_destination.entry(row.destination.as_str()).or_default() += 1;
        lag.record(seconds_between(row.added, now));
    }
    for (destination, count) in per_destination {
        counter!(MESSAGES_SENT, "destination" => destination.to_owned()).increment(count);
    }
}

/// Counts a refusal, and whether it was the row's last attempt.
pub(crate) fn refused(destination: &str, given_up: bool) {
    let label = destination.to_owned();
    counter!(MESSAGES_REFUSED, "destination" => label.clone()).increment(1);
    let outcome = if given_up {
        MESSAGES_FAILED
    } else {
        MESSAGES_RETRIED
    };
    counter!(outcome, "destination" => label).increment(1);
}

/// Counts rows given back after a connection failure.
pub(crate) fn released(rows: usize) {
    counter!(MESSAGES_RELEASED).increment(rows as u64);
}

/// Counts a message returned because no queue is bound to its destination.
pub(crate) fn unroutable(destination: &str) {
    counter!(MESSAGES_UNROUTABLE, "destination" => destination.to_owned()).increment(1);
}

/// Counts messages the broker nacked.
pub(crate) fn nacked(rows: usize) {
    counter!(MESSAGES_NACKED).increment(rows as u64);
}

/// Counts publishes to `destination` the broker rejected.
pub(crate) fn rejected(destination: &str, messages: usize) {
    counter!(MESSAGES_REJECTED, "destination" => destination.to_owned()).increment(messages as u64);
}

/// Counts rows that expired unsent.
pub(crate) fn expired(rows: u64) {
    counter!(MESSAGES_EXPIRED).increment(rows);
}

/// Records a relay batch: its size and how long it took.
pub(crate) fn batch_relayed(claimed: usize, elapsed: Duration) {
    histogram!(RELAY_BATCH_SIZE).record(claimed as f64);
    histogram!(RELAY_BATCH_DURATION).record(elapsed.as_secs_f64());
}

/// Sets the pending gauges: the rows waiting, the age of the oldest in seconds, the blocked keys.
pub(crate) fn pending(rows: u64, oldest_age_seconds: f64, blocked_keys: Option<usize>) {
    gauge!(PENDING_MESSAGES).set(rows as f64);
    gauge!(OLDEST_PENDING_AGE).set(oldest_age_seconds);
    if let Some(keys) = blocked_keys {
        gauge!(BLOCKED_KEYS).set(keys as f64);
    }
}

/// Sets the gauge of the destinations waiting for a queue.
pub(crate) fn unroutable_destinations(destinations: usize) {
    gauge!(UNROUTABLE_DESTINATIONS).set(destinations as f64);
}

/// What became of a consumed message (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Processed and committed: acknowledged.
    Acked,
    /// Already in the inbox: acknowledged without running the callback.
    Duplicate,
    /// The callback called `nack()`: dead-lettered.
    Nacked,
    /// The callback failed (or its retries ran out): dead-lettered.
    DeadLettered,
    /// A transient failure: the callback runs again.
    Retried,
    /// The frame did not decode or was too large: dead-lettered without running the callback.
    Undecodable,
}

impl Outcome {
    /// The label value, also the `outcome` field of the consumer's message span.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Acked => "acked",
            Outcome::Duplicate => "duplicate",
            Outcome::Nacked => "nacked",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Retried => "retried",
            Outcome::Undecodable => "undecodable",
        }
    }
}

/// Counts a consumed message's outcome on `queue`.
pub(crate) fn consumed(queue: &str, outcome: Outcome) {
    counter!(CONSUMER_MESSAGES, "queue" => queue.to_owned(), "outcome" => outcome.label())
        .increment(1);
}

/// Records the end-to-end lag of a message whose callback committed just now on `queue`, from
/// its `dop-msg-sent-time` header; a missing or unparsable header records nothing.
pub(crate) fn consumer_committed(queue: &str, sent_time: Option<&str>) {
    if cfg!(not(feature = "metrics")) {
        return;
    }
    let Some(saved) = sent_time.and_then(crate::headers::parse_sent_time) else {
        return;
    };
    histogram!(CONSUMER_LAG, "queue" => queue.to_owned())
        .record(seconds_between(saved, chrono::Utc::now()));
}

/// Seconds from `from` to `to`, 0 when `to` is earlier (another host's clock ahead).
fn seconds_between(from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>) -> f64 {
    (to - from)
        .to_std()
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

/// Records the number of messages of a committed group on `queue`.
pub(crate) fn consumer_group(queue: &str, members: usize) {
    histogram!(CONSUMER_GROUP_SIZE, "queue" => queue.to_owned()).record(members as f64);
}

/// Counts a callback that returned `Ok` in a dead transaction on `queue`.
pub(crate) fn dead_transaction(queue: &str) {
    counter!(CONSUMER_DEAD_TRANSACTIONS, "queue" => queue.to_owned()).increment(1);
}

/// Records how long one callback attempt took on `queue`.
pub(crate) fn callback_finished(queue: &str, elapsed: Duration) {
    histogram!(CONSUMER_CALLBACK_DURATION, "queue" => queue.to_owned())
        .record(elapsed.as_secs_f64());
}

/// Counts a database call that timed out (`kind`: `no_answer`, `statement`, `lock`).
pub(crate) fn database_timeout(kind: &'static str) {
    counter!(DATABASE_TIMEOUTS, "kind" => kind).increment(1);
}
