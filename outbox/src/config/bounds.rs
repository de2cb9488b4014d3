//! The range of every duration and count, and the `MAX_*` limits: no setting can reach an
//! arithmetic overflow of dates or clocks, nor a statement with more bind parameters than a
//! database accepts.

use std::time::Duration;

use super::OutboxConfig;
use crate::error::Error;

impl OutboxConfig {
    /// Checks each duration and count against its range, then the heartbeats against
    /// [`MAX_HEARTBEAT`]. The error names the variable and the range.
    pub(super) fn check_ranges(&self) -> Result<(), Error> {
        for (variable, value, range) in self.duration_settings() {
            range.check(variable, value)?;
        }
        for (variable, value, range) in self.count_settings() {
            range.check(variable, value)?;
        }
        let (outgoing, incoming) = self.stomp_heartbeats;
        for beat in [outgoing, incoming] {
            if beat > MAX_HEARTBEAT {
                return Err(Error::Config {
                    variable: "OUTBOX_STOMP_HEARTBEATS".into(),
                    value: format!("{},{}", outgoing.as_millis(), incoming.as_millis()),
                    reason: format!(
                        "each must be between 0 and {} milliseconds",
                        MAX_HEARTBEAT.as_millis()
                    ),
                });
            }
        }
        Ok(())
    }

    /// The durations, with their variables and ranges.
    fn duration_settings(&self) -> [(&'static str, Duration, Range<Duration>); 13] {
        const DAY: Duration = Duration::from_secs(86_400);
        const HOUR: Duration = Duration::from_secs(3600);
        const CENTISECOND: Duration = Duration::from_millis(10);
        // The servers count these in milliseconds (PostgreSQL) and microseconds (MariaDB); a
        // bound much shorter than a round trip would only fail every statement.
        const DECISECOND: Duration = Duration::from_millis(100);
        let within = |min, max| Range { min, max };
        [
            (
                "OUTBOX_MAXIMUM_BACKOFF",
                self.maximum_backoff,
                within(CENTISECOND, DAY),
            ),
            (
                "OUTBOX_RECEIPT_TIMEOUT",
                self.receipt_timeout,
                within(CENTISECOND, HOUR),
            ),
            (
                "OUTBOX_PAUSE_FOR_RETRY",
                self.pause_for_retry,
                within(Duration::ZERO, 30 * DAY),
            ),
            (
                "OUTBOX_WAIT_RETRY",
                self.wait_retry,
                within(Duration::ZERO, 30 * DAY),
            ),
            (
                "OUTBOX_PRODUCER_WAITING_TIME",
                self.producer_waiting_time,
                within(CENTISECOND, HOUR),
            ),
            (
                "OUTBOX_PRODUCER_LEASE",
                self.producer_lease,
                within(Duration::from_secs(1), DAY),
            ),
            (
                "OUTBOX_REMOVE_DATA_CACHE_TTL",
                self.remove_data_cache_ttl,
                within(Duration::ZERO, 30 * DAY),
            ),
            (
                "OUTBOX_CONSUMER_SHUTDOWN_TIMEOUT",
                self.consumer_shutdown_timeout,
                within(Duration::ZERO, DAY),
            ),
            (
                "OUTBOX_CONSUMER_RETRY_WAIT",
                self.consumer_retry_wait,
                within(Duration::ZERO, HOUR),
            ),
            (
                "OUTBOX_CONSUMER_CALLBACK_TIMEOUT",
                self.consumer_callback_timeout,
                within(CENTISECOND, DAY),
            ),
            (
                "OUTBOX_CONSUMER_GROUP_WAIT",
                self.consumer_group_wait,
                within(Duration::ZERO, Duration::from_secs(1)),
            ),
            (
                "OUTBOX_DB_STATEMENT_TIMEOUT",
                self.db_statement_timeout,
                within(DECISECOND, HOUR),
            ),
            (
                "OUTBOX_DB_LOCK_TIMEOUT",
                self.db_lock_timeout,
                within(DECISECOND, HOUR),
            ),
        ]
    }

    /// The counts, with their variables and ranges.
    fn count_settings(&self) -> [(&'static str, u64, Range<u64>); 7] {
        let within = |min, max| Range { min, max };
        [
            (
                "OUTBOX_STOMP_MAX_FRAME_SIZE",
                self.stomp_max_frame_size as u64,
                within(4096, 1 << 30),
            ),
            (
                "OUTBOX_MAXIMUM_RETRY_ATTEMPTS",
                u64::from(self.maximum_retry_attempts),
                within(1, 1_000_000),
            ),
            (
                "OUTBOX_PUBLISHED_CHUNK_SIZE",
                u64::from(self.published_chunk_size),
                within(1, u64::from(MAX_PUBLISHED_CHUNK_SIZE)),
            ),
            (
                "OUTBOX_RELAY_BATCHES_IN_FLIGHT",
                u64::from(self.relay_batches_in_flight),
                within(1, u64::from(MAX_RELAY_BATCHES_IN_FLIGHT)),
            ),
            (
                "OUTBOX_DAYS_TO_KEEP_DATA",
                u64::from(self.days_to_keep_data),
                within(1, u64::from(MAX_DAYS_TO_KEEP_DATA)),
            ),
            (
                "OUTBOX_CONSUMER_MAX_RETRY_ATTEMPTS",
                u64::from(self.consumer_max_retry_attempts),
                within(0, 100),
            ),
            (
                "OUTBOX_CONSUMER_GROUP_SIZE",
                u64::from(self.consumer_group_size),
                within(1, u64::from(MAX_CONSUMER_GROUP_SIZE)),
            ),
        ]
    }
}

/// The most batches a relay keeps in flight (`relay_batches_in_flight`).
pub const MAX_RELAY_BATCHES_IN_FLIGHT: u32 = 64;

/// The largest `published_chunk_size`. A batch is marked sent (and released) in one UPDATE with
/// one bind parameter per row and five more (the claim token, the status and the three cleared
/// columns); SQLite accepts at most 32,766 parameters per statement (PostgreSQL and MariaDB
/// 65,535), so the tightest backend sets the bound for all.
pub const MAX_PUBLISHED_CHUNK_SIZE: u32 = 32_766 - 5;

/// The largest `days_to_keep_data`: a century, far from chrono's limits whatever the date.
const MAX_DAYS_TO_KEEP_DATA: u32 = 36_500;

/// The largest consumer group: PostgreSQL keeps the subtransactions of 64 savepoints in a
/// session's shared cache; more overflow it, which slows every other session's snapshots.
pub const MAX_CONSUMER_GROUP_SIZE: u32 = 64;

/// The longest heartbeat: an hour (STOMP carries heartbeats as milliseconds, sent as `u32`).
const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);

/// The inclusive range of a setting.
struct Range<T> {
    min: T,
    max: T,
}

impl Range<Duration> {
    fn check(&self, variable: &str, value: Duration) -> Result<(), Error> {
        if value < self.min || value > self.max {
            return Err(Error::Config {
                variable: variable.to_owned(),
                value: seconds_text(value),
                reason: format!(
                    "must be between {} and {} seconds",
                    seconds_text(self.min),
                    seconds_text(self.max)
                ),
            });
        }
        Ok(())
    }
}

impl Range<u64> {
    fn check(&self, variable: &str, value: u64) -> Result<(), Error> {
        if value < self.min || value > self.max {
            return Err(Error::Config {
                variable: variable.to_owned(),
                value: value.to_string(),
                reason: format!("must be between {} and {}", self.min, self.max),
            });
        }
        Ok(())
    }
}

/// A duration as the variables give it: seconds, with a fraction only when there is one.
pub(super) fn seconds_text(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        duration.as_secs().to_string()
    } else {
        format!("{}", duration.as_secs_f64())
    }
}
