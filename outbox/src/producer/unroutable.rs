//! Messages no queue took (AMQP's `basic.return`): each row kept waiting, failed or dropped as
//! `OUTBOX_UNROUTABLE` says, and its destination recorded in `outbox_unroutable` until a message
//! to it routes again, so that operators see which destinations wait for a queue.
//!
//! The relay remembers the destinations recorded (its own, and the table's, read again at most
//! once a minute), so that a batch whose destinations are all routable costs no statement.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{Producer, RoundReport, store};
use crate::config::Unroutable;
use crate::db::errors::again_on_conflict;
use crate::error::Error;
use crate::tables::published::Model as Row;

/// How long the relay trusts its memory of the recorded destinations.
const REFRESH_EVERY: Duration = Duration::from_secs(60);

/// What the relay knows of `outbox_unroutable`.
#[derive(Debug, Default)]
pub(super) struct Recorded {
    /// Destinations recorded as waiting for a queue.
    destinations: HashSet<String>,
    /// When `destinations` was read from the table.
    read_at: Option<Instant>,
    /// Set once the table was found missing (a database the latest migrations did not reach).
    missing: bool,
}

impl Producer {
    /// Settles the rows whose message no queue took, as `OUTBOX_UNROUTABLE` says: kept waiting
    /// (a pause of their own, no retry spent, `last_error` saying why), marked FAILED, or marked
    /// sent (dropped, as over STOMP).
    pub(super) async fn unroutable(
        &self,
        rows: Vec<(Row, String)>,
        token: Uuid,
    ) -> Result<RoundReport, Error> {
        let mut report = RoundReport::default();
        if rows.is_empty() {
            return Ok(report);
        }
        report.unroutable = rows.len();
        let mut dropped = Vec::new();
        let mut waiting: Vec<(String, String)> = Vec::new();
        for (row, reply) in rows {
            crate::metrics::unroutable(&row.destination);
            let reason = unroutable_error(&row.destination, &reply);
            match self.config.unroutable {
                Unroutable::Retry => {
                    if !waiting.iter().any(|(known, _)| *known == row.destination) {
                        waiting.push((row.destination.clone(), reply.clone()));
                    }
                    let age = (chrono::Utc::now() - row.added)
                        .to_std()
                        .unwrap_or_default();
                    let pause = store::unroutable_pause(age, self.config.maximum_backoff);
                    tracing::warn!(
                        message_id = %row.id,
                        destination = %row.destination,
                        correlation_id = row.correlation_id(),
                        outcome = "unroutable",
                        retry_in = ?pause,
                        "{reason}"
                    );
                    let ids = [row.id];
                    again_on_conflict(&self.bounds, || {
                        store::release_after(&self.db, &ids, token, pause, Some(&reason))
                    })
                    .await?;
                }
                Unroutable::Fail => {
                    tracing::error!(
                        message_id = %row.id,
                        destination = %row.destination,
                        correlation_id = row.correlation_id(),
                        outcome = "failed",
                        "{reason}; marked FAILED (OUTBOX_UNROUTABLE=fail)"
                    );
                    again_on_conflict(&self.bounds, || {
                        store::record_refusal(
                            &self.db,
                            &row,
                            token,
                            &store::Refusal::Failed,
                            &reason,
                        )
                    })
                    .await?;
                }
                Unroutable::Drop => {
                    tracing::warn!(
                        message_id = %row.id,
                        destination = %row.destination,
                        correlation_id = row.correlation_id(),
                        outcome = "dropped",
                        "{reason}; dropped (OUTBOX_UNROUTABLE=drop)"
                    );
                    dropped.push(row.id);
                }
            }
        }
        again_on_conflict(&self.bounds, || store::mark_sent(&self.db, &dropped, token)).await?;
        self.record_unroutable(waiting).await;
        Ok(report)
    }

    /// Records the destinations (deduplicated, with their replies) as waiting for a queue, in one
    /// statement.
    async fn record_unroutable(&self, destinations: Vec<(String, String)>) {
        if destinations.is_empty() {
            return;
        }
        match again_on_conflict(&self.bounds, || {
            store::record_unroutable(&self.db, &destinations)
        })
        .await
        {
            Ok(()) => super::isolation::lock(&self.unroutable)
                .destinations
                .extend(destinations.into_iter().map(|(destination, _)| destination)),
            Err(err) => self.table_failed(&err),
        }
    }

    /// Forgets the destinations of `proven` (rows just routed) that were recorded as waiting.
    pub(super) async fn routed(&self, proven: &HashSet<String>) {
        if proven.is_empty() {
            return;
        }
        self.refresh_recorded().await;
        let again: Vec<String> = {
            let recorded = super::isolation::lock(&self.unroutable);
            proven
                .iter()
                .filter(|destination| recorded.destinations.contains(*destination))
                .cloned()
                .collect()
        };
        if again.is_empty() {
            return;
        }
        match again_on_conflict(&self.bounds, || store::clear_unroutable(&self.db, &again)).await {
            Ok(_) => {
                let mut recorded = super::isolation::lock(&self.unroutable);
                for destination in &again {
                    recorded.destinations.remove(destination);
                }
                tracing::info!(destinations = ?again, "destinations routable again");
            }
            Err(err) => self.table_failed(&err),
        }
    }

    /// Reads the recorded destinations again when the memory of them is older than a minute.
    async fn refresh_recorded(&self) {
        let due = {
            let recorded = super::isolation::lock(&self.unroutable);
            !recorded.missing
                && recorded
                    .read_at
                    .is_none_or(|at| at.elapsed() >= REFRESH_EVERY)
        };
        if !due {
            return;
        }
        match self
            .bounds
            .call(store::unroutable_destinations(&self.db))
            .await
        {
            Ok(destinations) => {
                let mut recorded = super::isolation::lock(&self.unroutable);
                recorded.destinations = destinations.into_iter().collect();
                recorded.read_at = Some(Instant::now());
            }
            Err(err) => self.table_failed(&err),
        }
    }

    /// Logs a failed statement on `outbox_unroutable`: once, as a missing migration, when the
    /// table does not exist; else as a warning. Relaying goes on either way.
    fn table_failed(&self, err: &sea_orm::DbErr) {
        let text = crate::db::errors::redacted(err);
        let missing = text.contains("outbox_unroutable")
            && (text.contains("does not exist")
                || text.contains("doesn't exist")
                || text.contains("no such table"));
        if missing {
            let mut recorded = super::isolation::lock(&self.unroutable);
            if !recorded.missing {
                recorded.missing = true;
                tracing::warn!(
                    error = %text,
                    "the table outbox_unroutable is missing: run the outbox's migrations \
                     (outbox_m20261206_000006_add_unroutable_destinations); \
                     unroutable destinations are not recorded until then"
                );
            }
        } else {
            tracing::warn!(error = %text, "recording unroutable destinations failed");
        }
    }
}

/// The `last_error` of a row whose message no queue took: names the destination and the reply.
fn unroutable_error(destination: &str, reply: &str) -> String {
    format!(
        "unroutable: the broker returned the message sent to `{destination}` ({reply}): no queue is bound to it; it waits for one without spending a retry"
    )
}
