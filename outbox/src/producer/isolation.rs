//! The isolation lane: a row suspected of taking its connection down (it was unreceipted when a
//! refusal closed the connection, or it was refused before) is sent alone, on a connection of its
//! own when the relay made its transport from the settings, so that a refusal can only be its
//! own; and the memory of suspects.

use std::collections::HashSet;
use std::sync::Mutex;

use std::time::Instant;

use uuid::Uuid;

use super::frame::outgoing;
use super::settle::{passed_over, refused_before, silently_failed_before, taken_but};
use super::store;
use super::{Lease, Producer, RoundReport};
use crate::db::errors::again_on_conflict;
use crate::error::Error;
use crate::tables::published::Model as Row;
use crate::transport::{Outcome, Outgoing, TransportError, Unknown};

impl Producer {
    /// Sends the rows on the isolation lane, oldest first, where nothing else is in flight: a
    /// refusal there is the row's own (or, for a group, one of the group's). A row to a
    /// destination not yet known to take messages goes alone; once one is receipted, the rows
    /// to its destination (a refusal of RabbitMQ's is the destination's: missing exchange,
    /// access refused) go together, pipelined, and alone again if that group is refused. A row
    /// refused before always goes alone. A row alone whose connection the broker closes without
    /// an ERROR is taken as rejected (RabbitMQ's STOMP plugin answers a rejected publish so):
    /// its destination's rows wait for the next probe, no retry spent. Stops at the first other
    /// failure that is not a refusal (the broker is unreachable or slow, or the transport waits
    /// before reconnecting), giving back the rest without a charge.
    pub(super) async fn isolate(
        &self,
        rows: Vec<Row>,
        lease: &mut Lease,
        proven: &mut HashSet<String>,
    ) -> Result<RoundReport, Error> {
        let mut report = RoundReport::default();
        let _lane = self.lane.lock().await;
        // Without a connection of its own, the lane stops every other send.
        let _exclusive = match self.isolation {
            Some(_) => None,
            None => Some(self.sending.write().await),
        };
        let transport = self.isolation.as_ref().unwrap_or(&self.transport);
        let mut alone_only: HashSet<Uuid> = rows
            .iter()
            .filter(|row| refused_before(row))
            .map(|row| row.id)
            .collect();
        let mut sent = Vec::new();
        let mut rest: Vec<Row> = self.hold(lease, rows).await?;
        while !rest.is_empty() {
            if lease.expiring(&self.config) {
                // Keep what was sent on record before extending, so that a lost lease costs
                // nothing already receipted.
                report.sent += self
                    .mark_sent(&std::mem::take(&mut sent), lease.token)
                    .await?;
                rest = self.hold(lease, rest).await?;
                if rest.is_empty() {
                    break;
                }
            }
            let head = &rest[0];
            if let Some(pause) = self.rejecting(&head.destination) {
                // Rejected meanwhile (a probe of another batch, or of this lane): its rows
                // wait for the next probe.
                let destination = head.destination.clone();
                let waiting: Vec<Row> = rest
                    .extract_if(.., |row| row.destination == destination)
                    .collect();
                report.deferred += self.defer(&waiting, lease.token, pause).await?;
                continue;
            }
            let group: Vec<Row> =
                if proven.contains(&head.destination) && !alone_only.contains(&head.id) {
                    let destination = head.destination.clone();
                    rest.extract_if(.., |row| {
                        row.destination == destination && !alone_only.contains(&row.id)
                    })
                    .collect()
                } else {
                    vec![rest.remove(0)]
                };
            let together = group.len() > 1;
            let frames: Vec<Outgoing> = group.iter().map(outgoing).collect();
            let outcomes = transport.send(&frames).await.outcomes;
            let mut back = Vec::new();
            let mut back_reason = None;
            let mut unroutable = Vec::new();
            let mut nacked = Vec::new();
            let mut closed_on = None;
            let mut paced = None;
            let mut doubtful = HashSet::new();
            for (row, outcome) in group.into_iter().zip(outcomes) {
                match outcome {
                    Outcome::Receipted => {
                        self.clear_suspect(&row);
                        proven.insert(row.destination.clone());
                        sent.push(row);
                    }
                    Outcome::Unroutable(reply) => {
                        // Taken by the broker, so not at fault: no longer a suspect.
                        self.clear_suspect(&row);
                        unroutable.push((row, reply));
                    }
                    Outcome::Nacked => {
                        self.clear_suspect(&row);
                        nacked.push(row);
                    }
                    Outcome::Unknown(unknown) if together && unknown.reason.is_broker_refusal() => {
                        // One of the group is at fault: each goes alone now.
                        alone_only.insert(row.id);
                        back.push(row);
                    }
                    Outcome::Refused(why) => {
                        self.refuse(&row, lease.token, &why.to_string()).await?;
                        report.refused += 1;
                    }
                    Outcome::Unknown(unknown) if unknown.reason.is_broker_refusal() => {
                        // Alone on its connection: the refusal was for this row.
                        self.refuse(&row, lease.token, &unknown.reason.to_string())
                            .await?;
                        report.refused += 1;
                    }
                    Outcome::Unknown(Unknown {
                        reason,
                        overtaken: true,
                    }) => {
                        self.refuse(&row, lease.token, &passed_over(&reason))
                            .await?;
                        report.refused += 1;
                    }
                    Outcome::Unknown(Unknown {
                        reason: TransportError::ConnectionLost(_),
                        ..
                    }) if !together => {
                        // Alone on its connection, closed with no ERROR: a rejected publish
                        // over STOMP (or a link that failed just then). Nobody's fault.
                        self.clear_suspect(&row);
                        closed_on = Some(row);
                    }
                    Outcome::Unknown(Unknown { reason, .. }) if reason.retry_in().is_some() => {
                        paced = reason.retry_in();
                        back.push(row);
                    }
                    Outcome::Unknown(Unknown { reason, .. }) => {
                        if matches!(reason, TransportError::ConnectionLost(_)) {
                            doubtful.insert(row.destination.clone());
                        }
                        back_reason.get_or_insert(reason);
                        back.push(row);
                    }
                }
            }
            self.taken(&taken_but(proven, &nacked));
            report += self.unroutable(unroutable, lease.token).await?;
            report.deferred += self.nacked(nacked, lease.token).await?;
            self.doubt(doubtful.iter().map(String::as_str));
            if let Some(row) = closed_on {
                let pause = self.rejected(&row.destination, 1, true);
                report.deferred += self
                    .defer(std::slice::from_ref(&row), lease.token, pause)
                    .await?;
            }
            if let Some(wait) = paced {
                // The lane's transport waits before reconnecting: so does the rest of the lane.
                back.append(&mut rest);
                report.deferred += self.defer(&back, lease.token, wait).await?;
                break;
            }
            if let Some(reason) = back_reason {
                back.append(&mut rest);
                report.released += self.release(&back, lease.token, &reason).await?;
                break;
            }
            back.append(&mut rest);
            back.sort_by_key(|row| row.added);
            rest = back;
        }
        report.sent += self.mark_sent(&sent, lease.token).await?;
        Ok(report)
    }

    /// The rows of `rows` this relay still holds, its lease extended first if it could run out
    /// before a send's receipts are due. Rows another relay took over are dropped (not sent).
    pub(super) async fn hold(&self, lease: &mut Lease, rows: Vec<Row>) -> Result<Vec<Row>, Error> {
        if rows.is_empty() || !lease.expiring(&self.config) {
            return Ok(rows);
        }
        let started = Instant::now();
        let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
        let held: HashSet<Uuid> = again_on_conflict(&self.bounds, || {
            store::extend_lease(&self.db, &ids, lease.token, self.config.producer_lease)
        })
        .await?
        .into_iter()
        .collect();
        lease.until = started + self.config.producer_lease;
        if held.len() < rows.len() {
            tracing::warn!(
                lost = rows.len() - held.len(),
                "the lease ran out and another relay took over some rows; this relay leaves them"
            );
        } else {
            tracing::debug!(rows = rows.len(), "lease extended");
        }
        Ok(rows
            .into_iter()
            .filter(|row| held.contains(&row.id))
            .collect())
    }

    pub(super) fn is_suspect(&self, row: &Row) -> bool {
        silently_failed_before(row) || lock(&self.suspects).contains(&row.id)
    }

    pub(super) fn suspect(&self, row: &Row) {
        let mut suspects = lock(&self.suspects);
        if suspects.len() >= SUSPECTS_REMEMBERED {
            suspects.clear();
        }
        suspects.insert(row.id);
    }

    pub(super) fn clear_suspect(&self, row: &Row) {
        lock(&self.suspects).remove(&row.id);
    }
}

/// Rows remembered as suspects of dropping their connection; beyond it the memory starts over
/// (a suspect forgotten is only sent in a batch again).
const SUSPECTS_REMEMBERED: usize = 10_000;

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; a set of ids is still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
