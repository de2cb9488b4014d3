//! How an idle relay asks to be woken (PostgreSQL): it announces itself in `outbox_idle_relay`,
//! and the `published` trigger sends its `NOTIFY outbox_published` only while some relay's
//! announcement is current. Every transaction that queued a NOTIFY takes one database-wide lock
//! at commit, so concurrent writers serialise there; in busy periods (no relay idle: they are
//! all claiming) writers queue none.
//!
//! A relay announces when a claim found nothing, claims once more at once and once more
//! shortly after (rows whose trigger ran before the announcement was visible, in transactions
//! that commit after it, are found by these two claims; a writer whose transaction runs longer
//! than that after its insert waits for the relay's next poll), then sleeps until a
//! notification or its poll. It withdraws when it is busy: when a claim finds rows again right
//! after one that found rows (rows committed while it was sending), not when it wakes for a
//! commit and finds that commit's rows alone. An announcement lasts
//! [`LEASE`] unless renewed, so that a relay that died leaves none behind for long. Without the
//! table (a database before `outbox_m20261201_000004_notify_idle_relays_only`) the relay does
//! nothing here, and the trigger notifies on every insert as before.

use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use uuid::Uuid;

use crate::db::bounds::DbBounds;
use crate::db::errors::redacted;

/// How long an announcement lasts; an idle relay renews it after half of that.
pub(crate) const LEASE: Duration = Duration::from_secs(30);

/// The second claim after an announcement comes this long after it.
pub(crate) const SECOND_LOOK: Duration = Duration::from_millis(25);

/// One relay's idle announcement.
pub(crate) struct Idle {
    relay: Uuid,
    bounds: DbBounds,
    /// When the current announcement was made, if there is one.
    announced: Option<Instant>,
    /// Whether the database has the table (false after a statement on it failed: older schema).
    enabled: bool,
    /// Whether the last claim found rows.
    found: bool,
}

impl Idle {
    pub(crate) fn new(db: &DatabaseConnection, bounds: DbBounds) -> Idle {
        Idle {
            relay: Uuid::new_v4(),
            bounds,
            announced: None,
            enabled: db.get_database_backend() == DbBackend::Postgres,
            found: false,
        }
    }

    /// A claim found nothing. Announces (or renews) the relay idle; true when the announcement
    /// is new, and the relay should claim again before it sleeps.
    pub(crate) async fn nothing_due(&mut self, db: &DatabaseConnection) -> bool {
        self.found = false;
        if !self.enabled {
            return false;
        }
        let fresh = self.announced.is_none();
        if self.announced.is_some_and(|at| at.elapsed() < LEASE / 2) {
            return false;
        }
        let statement = format!(
            "INSERT INTO outbox_idle_relay (relay, until) VALUES ('{}', now() + interval '{} seconds') \
             ON CONFLICT (relay) DO UPDATE SET until = EXCLUDED.until",
            self.relay,
            LEASE.as_secs()
        );
        match self.run(db, &statement).await {
            Ok(()) => {
                self.announced = Some(Instant::now());
                fresh
            }
            Err(()) => false,
        }
    }

    /// A claim found rows. The second in a row means the relay is busy: it withdraws its
    /// announcement, so that writers stop notifying.
    pub(crate) async fn found_rows(&mut self, db: &DatabaseConnection) {
        let busy = std::mem::replace(&mut self.found, true);
        if busy {
            self.withdraw(db).await;
        }
    }

    async fn withdraw(&mut self, db: &DatabaseConnection) {
        if !self.enabled || self.announced.take().is_none() {
            return;
        }
        let statement = format!(
            "DELETE FROM outbox_idle_relay WHERE relay = '{}'",
            self.relay
        );
        let _ = self.run(db, &statement).await;
    }

    /// Withdraws on stop.
    pub(crate) async fn stopped(&mut self, db: &DatabaseConnection) {
        self.withdraw(db).await;
    }

    /// Runs one statement in a transaction that does not wait for its disk flush (the table is
    /// unlogged: nothing of it survives a crash, and nothing needs to).
    async fn run(&mut self, db: &DatabaseConnection, statement: &str) -> Result<(), ()> {
        let result = self
            .bounds
            .call(async {
                let txn = db.begin().await?;
                txn.execute_unprepared("SET LOCAL synchronous_commit = off")
                    .await?;
                txn.execute_raw(Statement::from_string(DbBackend::Postgres, statement))
                    .await?;
                txn.commit().await
            })
            .await;
        match result {
            Ok(()) => Ok(()),
            Err(err) => {
                let missing = err.to_string().contains("outbox_idle_relay");
                if missing {
                    // A schema before the migration: the trigger notifies on every insert.
                    self.enabled = false;
                    tracing::debug!(error = %redacted(&err), "no outbox_idle_relay table: relying on the trigger's notifications as they are");
                } else {
                    tracing::debug!(error = %redacted(&err), "announcing the relay idle failed; it polls meanwhile");
                }
                Err(())
            }
        }
    }
}
