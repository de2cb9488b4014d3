//! Rows whose receipts are slow to come: the lease kept while a long send lasts, and the rows
//! that time out again and again.
//!
//! A transport starts a message's receipt timeout when its last byte is written, so a send can
//! last much longer than the receipt timeout (a large message on a slow link, or one queued
//! behind it): the rows' lease is extended while the send goes on, so that no other worker or
//! relay takes them over and sends them a second time.
//!
//! A row whose receipt times out, unovertaken, is given back free: the broker may just be slow.
//! But a row that times out first in its batch (ahead of everything else left unanswered)
//! [`ALONE_AFTER`] times in a row would be sent again and again, each copy perhaps stored, and
//! every batch behind it slowed: it goes alone, on the isolation lane, and a timeout there is
//! charged as a refusal when the broker receipted other messages of this relay meanwhile (it is
//! alive: the row is what it does not confirm in time). With no such evidence (a broker that
//! confirms nothing) nobody is charged.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::isolation::lock;
use super::store;
use super::{Lease, Producer};
use crate::db::errors::again_on_conflict;
use crate::tables::published::Model as Row;
use crate::transport::{Outgoing, SendReport, Transport, TransportError};

/// How soon a lease extension that failed is tried again while the send goes on.
const RENEW_AGAIN: Duration = Duration::from_secs(1);
/// Receipt timeouts in a row after which a row goes alone.
pub(super) const ALONE_AFTER: u32 = 2;
/// Rows remembered with their timeouts; beyond it the memory starts over (a row forgotten only
/// goes back into the batches).
const REMEMBERED: usize = 10_000;

/// What the relay remembers of receipt timeouts.
#[derive(Debug, Default)]
pub(super) struct Timeouts {
    /// Receipt timeouts in a row, by row.
    rows: HashMap<Uuid, u32>,
    /// When the broker last receipted a message of this relay.
    last_receipt: Option<Instant>,
}

impl Producer {
    /// `transport.send(frames)` for `rows`, extending their lease whenever it would otherwise
    /// leave less than a receipt timeout (and its margin) in hand; returns the report and the
    /// lease of `rows` as extended (other rows of the claim keep the lease they had).
    pub(super) async fn send_holding(
        &self,
        transport: &dyn Transport,
        frames: &[Outgoing],
        rows: &[Row],
        mut lease: Lease,
    ) -> (SendReport, Lease) {
        let send = transport.send(frames);
        tokio::pin!(send);
        let mut renew_at = lease.renew_at(&self.config);
        loop {
            tokio::select! {
                report = &mut send => return (report, lease),
                () = tokio::time::sleep_until(renew_at.into()) => {
                    renew_at = if self.renew(rows, &mut lease).await {
                        lease.renew_at(&self.config)
                    } else {
                        Instant::now() + RENEW_AGAIN
                    };
                }
            }
        }
    }

    /// Extends the lease of `rows` (those still holding its token); false if the database
    /// failed.
    async fn renew(&self, rows: &[Row], lease: &mut Lease) -> bool {
        let started = Instant::now();
        let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
        let extended = again_on_conflict(&self.bounds, || {
            store::extend_lease(&self.db, &ids, lease.token, self.config.producer_lease)
        })
        .await;
        match extended {
            Ok(held) => {
                lease.until = started + self.config.producer_lease;
                tracing::debug!(
                    rows = ids.len(),
                    held = held.len(),
                    "lease extended while the send goes on"
                );
                true
            }
            Err(err) => {
                // Tried again shortly; the rows' token keeps a late write-back harmless.
                tracing::warn!(error = %err, "extending the lease of rows being sent failed");
                false
            }
        }
    }

    /// Takes note that `row`'s receipt timed out first in its send (unovertaken).
    pub(super) fn timed_out(&self, row: &Row) {
        let mut timeouts = lock(&self.timeouts);
        if timeouts.rows.len() >= REMEMBERED && !timeouts.rows.contains_key(&row.id) {
            timeouts.rows.clear();
        }
        let count = timeouts.rows.entry(row.id).or_default();
        *count = count.saturating_add(1);
        if *count == ALONE_AFTER {
            tracing::warn!(
                message_id = %row.id,
                destination = %row.destination,
                timeouts = *count,
                "the broker's receipt of this message timed out again; it goes alone from now on"
            );
        }
    }

    /// Whether `row` timed out [`ALONE_AFTER`] times in a row: it goes alone.
    pub(super) fn times_out(&self, row: &Row) -> bool {
        lock(&self.timeouts)
            .rows
            .get(&row.id)
            .is_some_and(|count| *count >= ALONE_AFTER)
    }

    /// Forgets `row`'s timeouts: the broker answered it (or it was charged).
    pub(super) fn forget_timeouts(&self, row: &Row) {
        lock(&self.timeouts).rows.remove(&row.id);
    }

    /// Takes note that the broker receipted messages of this relay just now.
    pub(super) fn broker_receipted(&self) {
        lock(&self.timeouts).last_receipt = Some(Instant::now());
    }

    /// The charge for `row`, which timed out alone after repeated timeouts, if the broker
    /// receipted other messages of this relay since `since`: the broker confirms, just not this
    /// message in time. `None`: no evidence, nobody charged.
    pub(super) fn timeout_charge(
        &self,
        row: &Row,
        since: Instant,
        reason: &TransportError,
    ) -> Option<String> {
        let timeouts = lock(&self.timeouts);
        let count = timeouts.rows.get(&row.id).copied().unwrap_or(0);
        let others_receipted = timeouts.last_receipt.is_some_and(|at| at > since);
        (count >= ALONE_AFTER && others_receipted).then(|| {
            format!(
                "{TIMED_OUT_ALONE}{reason} (after {count} timeouts in a row), while the broker receipted other messages"
            )
        })
    }
}

/// The start of `last_error` for a row charged for timing out alone.
pub(super) const TIMED_OUT_ALONE: &str = "no receipt even alone on its connection: ";
