//! Settling a claimed batch: send it on the shared connection, then mark the receipted rows
//! sent, give back the rows a connection problem left unsettled (no retry spent), keep the rows
//! no queue took (unroutable) or the broker rejected (back-pressure, see `pressure`), and charge
//! a retry to the row the broker refused or passed over. Every write-back checks the claim's
//! token.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use uuid::Uuid;

use super::frame::outgoing;
use super::store;
use super::{Lease, Producer, RoundReport};

use crate::db::errors::again_on_conflict;
use crate::error::Error;
use crate::tables::published::Model as Row;
use crate::transport::{Outcome, Outgoing, TransportError, Unknown};

impl Producer {
    /// Sends the claimed rows and records what became of each.
    ///
    /// Rows to a destination the broker rejects messages to wait for its next probe, unsent;
    /// rows refused before, and rows to a destination in doubt or rejecting by closing the
    /// connection, go to the isolation lane; rows suspected of dropping their connection are
    /// sent alone, alongside the batch; the others in one pipelined batch. The rows of a batch
    /// that a refusal failed (RabbitMQ's ERROR names no receipt) are suspects: each is then
    /// sent alone on the isolation lane, where a refusal is its own.
    pub(super) async fn settle(&self, rows: Vec<Row>, lease: Lease) -> Result<RoundReport, Error> {
        let mut lease = lease;
        let mut report = RoundReport {
            claimed: rows.len(),
            ..RoundReport::default()
        };
        let (waiting, rows): (Vec<Row>, Vec<Row>) = rows
            .into_iter()
            .partition(|row| self.rejecting(&row.destination).is_some());
        report.deferred += self.wait_for_probe(waiting, lease.token).await?;
        let (lone, shared): (Vec<Row>, Vec<Row>) = rows
            .into_iter()
            .partition(|row| refused_before(row) || self.goes_alone(&row.destination));
        let (solo, batch): (Vec<Row>, Vec<Row>) =
            shared.into_iter().partition(|row| self.is_suspect(row));

        let mut isolate = lone;
        let mut proven = HashSet::new();
        if !batch.is_empty() || !solo.is_empty() {
            let _sending = self.sending.read().await;
            let (batch, solo) = {
                let mut held = self
                    .hold(&mut lease, batch.into_iter().chain(solo).collect())
                    .await?;
                let solo: Vec<Row> = held.extract_if(.., |row| self.is_suspect(row)).collect();
                (held, solo)
            };
            let together = self.send_shared(batch, lease.token);
            let alone = futures::future::join_all(
                solo.into_iter()
                    .map(|row| self.send_shared(vec![row], lease.token)),
            );
            // The suspects first: the batch's frames then follow theirs on the connection, and
            // their receipts show whether the broker passed a suspect over.
            let (alone, together) = tokio::join!(alone, together);
            for settled in std::iter::once(together).chain(alone) {
                let settled = settled?;
                report += settled.report;
                isolate.extend(settled.suspects);
                proven.extend(settled.proven);
            }
        }
        if !isolate.is_empty() {
            isolate.sort_by_key(|row| row.added);
            report += self.isolate(isolate, &mut lease, &mut proven).await?;
        }
        self.routed(&proven).await;
        Ok(report)
    }

    /// Sends `rows` pipelined on the shared connection and settles what it can: receipted rows
    /// marked sent, rows at fault charged, the rest given back; returns the rows a refusal made
    /// suspects.
    pub(super) async fn send_shared(&self, rows: Vec<Row>, token: Uuid) -> Result<Settled, Error> {
        let mut settled = Settled::default();
        if rows.is_empty() {
            return Ok(settled);
        }
        let frames: Vec<Outgoing> = rows.iter().map(outgoing).collect();
        let result = self.transport.send(&frames).await;
        let alone = rows.len() == 1;
        let mut sent = Vec::new();
        let mut released = Vec::new();
        let mut release_reason = None;
        let mut doubtful = HashSet::new();
        let mut unroutable = Vec::new();
        let mut nacked = Vec::new();
        for (row, outcome) in rows.into_iter().zip(result.outcomes) {
            match outcome {
                Outcome::Receipted => sent.push(row),
                Outcome::Unroutable(reply) => unroutable.push((row, reply)),
                Outcome::Nacked => nacked.push(row),
                Outcome::Refused(why) => {
                    self.refuse(&row, token, &why.to_string()).await?;
                    settled.report.refused += 1;
                }
                Outcome::Unknown(unknown) if unknown.reason.is_broker_refusal() => {
                    settled.suspects.push(row);
                }
                Outcome::Unknown(Unknown {
                    reason,
                    overtaken: true,
                }) => {
                    self.refuse(&row, token, &passed_over(&reason)).await?;
                    settled.report.refused += 1;
                }
                Outcome::Unknown(Unknown { reason, .. }) => {
                    // The first row of a batch left unreceipted may be what broke the
                    // connection: it goes alone next time. A row already alone stays suspect.
                    let lost = matches!(reason, TransportError::ConnectionLost(_));
                    if released.is_empty() && (alone || lost) {
                        self.suspect(&row);
                    }
                    // Closed with no ERROR: over STOMP, RabbitMQ does so for a rejected
                    // publish, so any of these destinations may be rejecting.
                    if lost {
                        doubtful.insert(row.destination.clone());
                    }
                    release_reason.get_or_insert(reason);
                    released.push(row);
                }
            }
        }
        for row in &sent {
            self.clear_suspect(row);
            settled.proven.insert(row.destination.clone());
        }
        self.taken(&taken_but(&settled.proven, &nacked));
        settled.report.sent += self.mark_sent(&sent, token).await?;
        self.doubt(doubtful.iter().map(String::as_str));
        if let Some(why) = release_reason {
            settled.report.released += self.release(&released, token, &why).await?;
        }
        settled.report += self.unroutable(unroutable, token).await?;
        settled.report.deferred += self.nacked(nacked, token).await?;
        Ok(settled)
    }

    pub(super) async fn mark_sent(&self, rows: &[Row], token: Uuid) -> Result<usize, Error> {
        if rows.is_empty() {
            return Ok(0);
        }
        for row in rows {
            tracing::debug!(message_id = %row.id, destination = %row.destination, correlation_id = row.correlation_id(), outcome = "sent", "message receipted");
        }
        crate::metrics::sent(rows);
        let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
        let marked = again_on_conflict(&self.bounds, || store::mark_sent(&self.db, &ids, token))
            .await? as usize;
        if marked < rows.len() {
            tracing::warn!(
                receipted = rows.len(),
                marked,
                "some receipted rows had been taken over by another relay after this relay's lease ran out; they may be sent twice"
            );
        }
        Ok(rows.len())
    }

    pub(super) async fn release(
        &self,
        rows: &[Row],
        token: Uuid,
        why: &TransportError,
    ) -> Result<usize, Error> {
        if rows.is_empty() {
            return Ok(0);
        }
        if let Some(wait) = why.retry_in() {
            // The transport waits before reconnecting: the rows wait as long, unclaimed.
            tracing::debug!(rows = rows.len(), retry_in = ?wait, "rows given back while the transport waits to reconnect");
            crate::metrics::released(rows.len());
            self.defer(rows, token, wait).await?;
            return Ok(rows.len());
        }
        if why.is_slow_broker() {
            tracing::warn!(rows = rows.len(), error = %why, "the broker did not keep up; rows given back without spending a retry");
        } else if matches!(why, TransportError::ReturnNotPinned { .. }) {
            // The link is fine: only which of the rows the broker returned is not known.
            tracing::warn!(rows = rows.len(), error = %why, "rows given back without spending a retry, to be sent again");
        } else {
            self.link_failed.store(true, Ordering::Relaxed);
            tracing::warn!(rows = rows.len(), error = %why, "broker connection failed; rows given back without spending a retry");
        }
        crate::metrics::released(rows.len());
        let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
        again_on_conflict(&self.bounds, || store::release(&self.db, &ids, token)).await?;
        Ok(rows.len())
    }

    /// Gives back the rows the broker nacked (back-pressure: a queue full with
    /// `reject-publish`, most likely), to wait for their destination's next probe, charging
    /// nothing.
    pub(super) async fn nacked(&self, rows: Vec<Row>, token: Uuid) -> Result<usize, Error> {
        if rows.is_empty() {
            return Ok(0);
        }
        crate::metrics::nacked(rows.len());
        let mut deferred = 0;
        for (destination, rows) in by_destination(rows) {
            let pause = self.rejected(&destination, rows.len(), false);
            deferred += self.defer(&rows, token, pause).await?;
        }
        Ok(deferred)
    }

    /// Gives back, unsent, the rows to destinations the broker rejects messages to, to wait
    /// for their destination's next probe.
    pub(super) async fn wait_for_probe(&self, rows: Vec<Row>, token: Uuid) -> Result<usize, Error> {
        let mut deferred = 0;
        for (destination, rows) in by_destination(rows) {
            if let Some(pause) = self.rejecting(&destination) {
                deferred += self.defer(&rows, token, pause).await?;
            } else {
                // Its pause ended meanwhile: due again at once.
                deferred += self.defer(&rows, token, Duration::ZERO).await?;
            }
        }
        Ok(deferred)
    }

    /// Gives rows back to wait `pause` (by the database's clock) before their next attempt,
    /// spending no retry and keeping their `last_error`.
    pub(super) async fn defer(
        &self,
        rows: &[Row],
        token: Uuid,
        pause: Duration,
    ) -> Result<usize, Error> {
        if rows.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
        again_on_conflict(&self.bounds, || {
            store::release_after(&self.db, &ids, token, pause, None)
        })
        .await?;
        Ok(rows.len())
    }

    pub(super) async fn refuse(&self, row: &Row, token: Uuid, reason: &str) -> Result<(), Error> {
        self.clear_suspect(row);
        let failures = u32::try_from(row.retry).unwrap_or(0).saturating_add(1);
        let decision = store::after_failure(
            failures,
            self.config.maximum_retry_attempts,
            self.config.pause_for_retry,
            self.config.wait_retry,
        );
        match &decision {
            store::Refusal::Failed => tracing::error!(
                message_id = %row.id,
                destination = %row.destination,
                correlation_id = row.correlation_id(),
                outcome = "failed",
                attempts = failures,
                error = %reason,
                "the broker refused the message on every attempt; marked FAILED"
            ),
            store::Refusal::RetryAfter(pause) => tracing::warn!(
                message_id = %row.id,
                destination = %row.destination,
                correlation_id = row.correlation_id(),
                outcome = "retried",
                attempt = failures,
                retry_in = ?pause,
                error = %reason,
                "the broker refused the message; it will be retried, alone"
            ),
        }
        again_on_conflict(&self.bounds, || {
            store::record_refusal(&self.db, row, token, &decision, reason)
        })
        .await?;
        crate::metrics::refused(&row.destination, decision == store::Refusal::Failed);
        Ok(())
    }
}

/// What a send on the shared connection settled, and the suspects it left for isolation.
#[derive(Default)]
pub(super) struct Settled {
    pub(super) report: RoundReport,
    pub(super) suspects: Vec<Row>,
    /// Destinations of the rows receipted.
    pub(super) proven: HashSet<String>,
}

/// The destinations of `proven` to which none of `rejected` went: a queue at its limit takes
/// some messages of a batch and rejects others, and its episode goes on.
pub(super) fn taken_but(proven: &HashSet<String>, rejected: &[Row]) -> HashSet<String> {
    proven
        .iter()
        .filter(|destination| !rejected.iter().any(|row| row.destination == **destination))
        .cloned()
        .collect()
}

/// Rows grouped by destination.
fn by_destination(rows: Vec<Row>) -> BTreeMap<String, Vec<Row>> {
    let mut groups: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    for row in rows {
        groups.entry(row.destination.clone()).or_default().push(row);
    }
    groups
}

/// The start of `last_error` for a row charged for being passed over (see [`passed_over`]).
pub(super) const PASSED_OVER: &str = "not receipted while later messages on the connection were: ";

pub(super) fn passed_over(reason: &TransportError) -> String {
    format!("{PASSED_OVER}{reason}")
}

/// Whether the row was refused by the broker before: its later attempts go alone on the
/// isolation lane.
pub(super) fn refused_before(row: &Row) -> bool {
    row.retry > 0 && !silently_failed_before(row)
}

/// Whether the row was charged for being passed over: it goes alone, alongside the batches, so
/// that later frames can show again whether the broker takes it.
pub(super) fn silently_failed_before(row: &Row) -> bool {
    row.retry > 0
        && row
            .last_error
            .as_deref()
            .is_some_and(|error| error.starts_with(PASSED_OVER))
}
