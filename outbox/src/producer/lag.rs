//! The relay's lag, sampled for the metrics: the rows waiting, the age of the oldest, the keys a
//! FAILED row blocks, the destinations waiting for a queue. Read with the same queries as
//! `outbox status`, at most every 10 s.

use std::time::{Duration, Instant};

use sea_orm::DatabaseConnection;

use crate::db::bounds::DbBounds;
use crate::db::errors::redacted;

/// How often the pending gauges are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// Samples the pending gauges at most every 10 s; a relay keeps one and calls it every loop.
#[derive(Debug, Default)]
pub(super) struct PendingSampler {
    last: Option<Instant>,
}

impl PendingSampler {
    /// Runs the sampling queries if the last sample is 10 s old. A failure is logged: the gauges
    /// keep their last values.
    pub(super) async fn sample_if_due(&mut self, db: &DatabaseConnection, bounds: &DbBounds) {
        if cfg!(not(feature = "metrics")) {
            return;
        }
        if self.last.is_some_and(|at| at.elapsed() < SAMPLE_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let (rows, oldest) = match bounds.call(crate::ops::pending(db)).await {
            Ok(pending) => pending,
            Err(err) => {
                tracing::debug!(error = %redacted(&err), "sampling the pending rows failed");
                return;
            }
        };
        let age = oldest
            .map(|added| (chrono::Utc::now() - added).num_milliseconds().max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        let blocked = match bounds.call(crate::ops::blocked_keys(db)).await {
            Ok(keys) => Some(keys.len()),
            Err(err) => {
                tracing::debug!(error = %redacted(&err), "counting the blocked keys failed");
                None
            }
        };
        crate::metrics::pending(rows, age, blocked);
        // A database the migration adding the table did not reach has no such gauge.
        match super::store::unroutable_destinations(db).await {
            Ok(destinations) => crate::metrics::unroutable_destinations(destinations.len()),
            Err(err) => {
                tracing::debug!(error = %err, "counting the unroutable destinations failed")
            }
        }
    }
}
