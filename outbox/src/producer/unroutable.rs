//! Messages no queue took (AMQP's `basic.return`): each row kept waiting, failed or dropped as
//! `OUTBOX_UNROUTABLE` says, and its destination recorded in `outbox_unroutable` until a message
//! to it routes again, so that operators see which destinations wait for a queue.
//!
//! A destination is probed, not every row of it: the oldest of its waiting rows is tried again
//! after half its age (at most `OUTBOX_MAXIMUM_BACKOFF`), and the others are parked behind it,
//! out of the claim by their `next_attempt_at`. Once a message to the destination routes (the
//! probe, or a new row, after a consumer subscribed), its waiting rows are made due together;
//! `outbox declare` does the same for the destinations it binds a queue to. Parked rows that
//! lost their probe (expired, deleted) come due by themselves a while later.
//!
//! The relay remembers the destinations recorded (its own, and the table's, read again at most
//! once a minute), so that a batch whose destinations are all routable costs no statement.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{Producer, RoundReport, store};
use crate::config::Unroutable;
use crate::db::errors::again_on_conflict;
use crate::db::unroutable::{forget, wake};
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
        let mut waiting: BTreeMap<String, Vec<(Row, String)>> = BTreeMap::new();
        for (row, reply) in rows {
            crate::metrics::unroutable(&row.destination);
            match self.config.unroutable {
                Unroutable::Retry => waiting
                    .entry(row.destination.clone())
                    .or_default()
                    .push((row, reply)),
                Unroutable::Fail => {
                    let reason = unroutable_error(&row.destination, &reply);
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
                    let reason = unroutable_error(&row.destination, &reply);
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
        let mut recorded = Vec::with_capacity(waiting.len());
        for (destination, rows) in waiting {
            let reply = rows
                .first()
                .map(|(_, reply)| reply.clone())
                .unwrap_or_default();
            self.park(&destination, &reply, rows, token).await?;
            recorded.push((destination, reply));
        }
        self.record_unroutable(recorded).await;
        Ok(report)
    }

    /// Gives back the returned rows of `destination` to wait for a queue behind one probe: the
    /// oldest waiting row of the destination (one of them, or an earlier one) is tried again
    /// after half its age, every other waiting row of it is parked beyond the probe.
    async fn park(
        &self,
        destination: &str,
        reply: &str,
        rows: Vec<(Row, String)>,
        token: Uuid,
    ) -> Result<(), Error> {
        let reason = unroutable_error(destination, reply);
        // The oldest by `added`, then id (rows written together share their `added`), as
        // `store::oldest_waiting` orders them: every batch of the destination agrees on its
        // probe, and none parks the probe an earlier batch chose.
        let Some((oldest, _)) = rows.iter().min_by_key(|(row, _)| (row.added, row.id)) else {
            return Ok(());
        };
        let earlier = again_on_conflict(&self.bounds, || {
            store::oldest_waiting(&self.db, destination)
        })
        .await?;
        let (probe, added) = match earlier {
            Some((id, added)) if (added, id) <= (oldest.added, oldest.id) => (id, added),
            _ => (oldest.id, oldest.added),
        };
        let age = (chrono::Utc::now() - added).to_std().unwrap_or_default();
        let pause = store::unroutable_pause(age, self.config.maximum_backoff);
        let parked = store::parked_beyond_probe(self.config.maximum_backoff);
        for (row, _) in &rows {
            tracing::debug!(
                message_id = %row.id,
                destination = %row.destination,
                correlation_id = row.correlation_id(),
                outcome = "unroutable",
                probe = row.id == probe,
                "{reason}"
            );
        }
        tracing::warn!(
            destination,
            rows = rows.len(),
            probe = %probe,
            retry_in = ?pause,
            "{reason}; the destination is probed again by its oldest waiting row, the others wait for it"
        );
        let (first, rest): (Vec<Uuid>, Vec<Uuid>) = rows
            .iter()
            .map(|(row, _)| row.id)
            .partition(|id| *id == probe);
        again_on_conflict(&self.bounds, || {
            store::release_after(&self.db, &first, token, pause, Some(&reason))
        })
        .await?;
        again_on_conflict(&self.bounds, || {
            store::release_after(&self.db, &rest, token, pause + parked, Some(&reason))
        })
        .await?;
        if first.is_empty() {
            again_on_conflict(&self.bounds, || {
                store::probe_after(&self.db, probe, destination, pause)
            })
            .await?;
        }
        again_on_conflict(&self.bounds, || {
            store::park_behind(&self.db, destination, probe, pause, parked)
        })
        .await?;
        Ok(())
    }

    /// Records the destinations (deduplicated, with their replies) as waiting for a queue, in one
    /// statement.
    async fn record_unroutable(&self, destinations: Vec<(String, String)>) {
        if destinations.is_empty() {
            return;
        }
        if let Err(err) = again_on_conflict(&self.bounds, || {
            store::record_unroutable(&self.db, &destinations)
        })
        .await
        {
            self.table_failed(&err);
        }
        // Remembered even when the table is missing: their parked rows are woken all the same.
        super::isolation::lock(&self.unroutable)
            .destinations
            .extend(destinations.into_iter().map(|(destination, _)| destination));
    }

    /// Forgets the destinations of `proven` (rows just routed) that were recorded as waiting, and
    /// makes their waiting rows due now.
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
        if let Err(err) = again_on_conflict(&self.bounds, || forget(&self.db, &again)).await {
            self.table_failed(&err);
        }
        match again_on_conflict(&self.bounds, || wake(&self.db, &again)).await {
            Ok(woken) => {
                let mut recorded = super::isolation::lock(&self.unroutable);
                for destination in &again {
                    recorded.destinations.remove(destination);
                }
                tracing::info!(destinations = ?again, woken, "destinations routable again: their waiting rows are due now");
            }
            Err(err) => {
                tracing::warn!(error = %err, destinations = ?again, "waking the rows waiting for these destinations failed; their probe finds the queue later")
            }
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
