//! What happens to one message: a transaction that inserts the inbox row first, then runs the
//! callback (for at most the callback timeout), then commits; then the ACK (or, on failure, the
//! rollback and the NACK that dead-letters the message). Nothing is acknowledged before its
//! effects are committed, and every message ends acknowledged or rejected: the whole handling
//! runs under `catch_unwind`, so a panic anywhere in it (in the callback or in the outbox's own
//! code, or in a metrics recorder or log layer it calls) still settles the message.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction};
use tracing::Instrument;

use super::failure::{Failure, panic_message};
use super::inbox;
use crate::consumer::Payload;
use crate::consumer::payload::{BoxError, Decision, Incoming};
use crate::db::bounds::DbBounds;
use crate::db::errors::redacted;
use crate::metrics::Outcome;
use crate::transport::{Delivery, Transport};
use crate::wake;

/// A callback with its types erased.
pub(crate) type Callback =
    Arc<dyn Fn(Payload) -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

/// Processes messages for one consumer; shared by its message tasks.
pub(crate) struct Dispatcher {
    pub(crate) db: DatabaseConnection,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) callback: Callback,
    pub(crate) queue: String,
    /// How long an inbox row is kept (`days_to_keep_data`).
    pub(crate) keep_for: chrono::Duration,
    /// Further attempts after a transient failure.
    pub(crate) max_retries: u32,
    /// The wait before retry n is n times this.
    pub(crate) retry_wait: Duration,
    /// How long one attempt of the callback may run.
    pub(crate) callback_timeout: Duration,
    /// The bounds of the consumer's own database calls and of its transactions.
    pub(crate) bounds: DbBounds,
}

/// How long a rollback may take before the transaction is abandoned to the connection pool (a
/// callback stopped in the middle of a statement leaves the connection busy until the database
/// ends that statement).
const ROLLBACK_WAIT: Duration = Duration::from_secs(10);

/// Where an attempt runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    /// In a transaction of its own.
    Message,
    /// In a savepoint of a group's transaction.
    Member,
}

/// A group member's savepoint. One name for all: a savepoint of the same name hides the
/// earlier ones (PostgreSQL and SQLite roll back to the latest, MariaDB replaces it), and a
/// member's savepoint is never released (its release would be one more statement per message;
/// the commit ends them all).
const SAVEPOINT: &str = "SAVEPOINT outbox_member";
const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT outbox_member";

/// How the inbox row and the callback of an attempt ended.
pub(super) enum Once {
    /// The callback saved the message: commit this transaction (in a group: go on with it).
    Saved(DatabaseTransaction),
    /// Rolled back: the whole transaction, or in a group, to the member's savepoint, and then the
    /// transaction to go on with (`None` when the rollback did not complete or the callback kept
    /// its payload: the connection is in an unknown state).
    Ended {
        /// How the attempt ended.
        attempt: Attempt,
        /// In a group, the transaction rolled back to the member's savepoint.
        txn: Option<DatabaseTransaction>,
    },
}

/// Ends a failed attempt: rolls back the transaction, or in a group to the member's savepoint
/// (handing the transaction back when that completed).
async fn end(txn: DatabaseTransaction, scope: Scope) -> Option<DatabaseTransaction> {
    match scope {
        Scope::Message => {
            rollback(txn).await;
            None
        }
        Scope::Member => {
            match tokio::time::timeout(ROLLBACK_WAIT, txn.execute_unprepared(ROLLBACK_TO_SAVEPOINT))
                .await
            {
                Ok(Ok(_)) => Some(txn),
                Ok(Err(err)) => {
                    tracing::debug!(error = %redacted(&err), "rollback to the member's savepoint failed");
                    None
                }
                Err(_) => {
                    tracing::warn!(
                        wait = ?ROLLBACK_WAIT,
                        "the rollback to a member's savepoint did not complete (a statement of \
                         the callback still runs?); the group's transaction is left to the \
                         connection pool, which rolls it back or closes it"
                    );
                    None
                }
            }
        }
    }
}

/// How the first attempt of a message processed in a group ended, with the message and its span.
pub(super) struct FirstAttempt {
    pub(super) message: Arc<Incoming>,
    pub(super) span: tracing::Span,
    pub(super) attempt: Attempt,
}

/// What the broker is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ack,
    Nack,
}

/// How one attempt ended.
pub(super) enum Attempt {
    /// Committed (in a group: saved in its savepoint, and the group committed): acknowledge.
    Committed,
    /// The key is already in the inbox: acknowledge without calling the callback.
    Duplicate,
    /// The callback called `nack()`: rolled back, dead-letter.
    Nacked,
    /// Rolled back.
    Failed(Failure),
}

impl Dispatcher {
    /// Processes a delivery and settles it with the broker. A panic while processing ends with
    /// the message acknowledged if its transaction had committed, else rejected (dead-lettered);
    /// a panic while settling, with a plain NACK as the last resort.
    pub(crate) async fn handle(self: Arc<Self>, delivery: Delivery) {
        self.conclude(&delivery, None).await;
    }

    /// Processes a delivery (or, given how its first attempt ended in a group, goes on from
    /// there: retries, dead-lettering, logs and counts) and settles it with the broker, as
    /// [`Dispatcher::handle`] says.
    pub(super) async fn conclude(&self, delivery: &Delivery, first: Option<FirstAttempt>) {
        let committed = AtomicBool::new(matches!(
            first,
            Some(FirstAttempt {
                attempt: Attempt::Committed,
                ..
            })
        ));
        let processed = AssertUnwindSafe(self.process_delivery(delivery, &committed, first))
            .catch_unwind()
            .await;
        let verdict = match processed {
            Ok(verdict) => verdict,
            Err(panic) => {
                let committed = committed.load(Ordering::SeqCst);
                let verdict = if committed {
                    Verdict::Ack
                } else {
                    Verdict::Nack
                };
                tracing::error!(
                    queue = %self.queue,
                    panic = %panic_message(panic),
                    committed,
                    ?verdict,
                    "handling a message panicked outside the callback; its effects are {}",
                    if committed { "committed: acknowledging it" } else { "rolled back: dead-lettering it" }
                );
                verdict
            }
        };
        let settled = AssertUnwindSafe(self.settle(delivery, verdict))
            .catch_unwind()
            .await;
        if let Err(panic) = settled {
            tracing::error!(
                queue = %self.queue,
                panic = %panic_message(panic),
                "settling a message panicked; rejecting it"
            );
            if let Ok(Err(err)) = AssertUnwindSafe(self.transport.nack(delivery))
                .catch_unwind()
                .await
            {
                tracing::warn!(error = %err, "could not reject the message; the broker will deliver it again");
            }
        }
    }

    /// Reads the delivery and processes it, in the message's span.
    async fn process_delivery(
        &self,
        delivery: &Delivery,
        committed: &AtomicBool,
        first: Option<FirstAttempt>,
    ) -> Verdict {
        let (message, span, attempt) = match first {
            Some(first) => (first.message, first.span, Some(first.attempt)),
            None => {
                let message = Arc::new(Incoming::new(delivery, &self.queue));
                let span = self.message_span(&message);
                (message, span, None)
            }
        };
        self.process(&message, committed, attempt)
            .instrument(span)
            .await
    }

    /// The span of one message's handling.
    pub(super) fn message_span(&self, message: &Incoming) -> tracing::Span {
        let span = tracing::info_span!(
            "outbox.message",
            queue = %self.queue,
            message_id = message.key.as_deref().unwrap_or(""),
            correlation_id = message.correlation_id.as_deref().unwrap_or(""),
            // Filled in as the handling goes: the attempt under way (1 for the first), then
            // what became of the message.
            attempt = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        #[cfg(feature = "opentelemetry")]
        crate::trace_context::continue_trace(&span, &message.headers);
        span
    }

    /// Attempts until the message is settled; `first`, when given, is how the first attempt
    /// ended (in a group).
    async fn process(
        &self,
        message: &Arc<Incoming>,
        committed: &AtomicBool,
        mut first: Option<Attempt>,
    ) -> Verdict {
        let mut retries = 0;
        loop {
            tracing::Span::current().record("attempt", retries + 1);
            let attempt = match first.take() {
                Some(attempt) => attempt,
                None => self.attempt(message, committed).await,
            };
            let failure = match attempt {
                Attempt::Committed => {
                    self.concluded(Outcome::Acked);
                    return Verdict::Ack;
                }
                Attempt::Duplicate => {
                    self.concluded(Outcome::Duplicate);
                    tracing::info!(
                        "message already processed on this queue; acknowledged without calling the callback"
                    );
                    return Verdict::Ack;
                }
                Attempt::Nacked => {
                    self.concluded(Outcome::Nacked);
                    tracing::info!(
                        "the callback nacked the message; rolled back, dead-lettering it"
                    );
                    return Verdict::Nack;
                }
                Attempt::Failed(failure) => failure,
            };
            if !failure.is_transient() {
                self.concluded(Outcome::DeadLettered);
                tracing::error!(error = %failure, "processing failed; rolled back, dead-lettering the message");
                return Verdict::Nack;
            }
            if retries >= self.max_retries {
                self.concluded(Outcome::DeadLettered);
                tracing::error!(
                    error = %failure,
                    retries,
                    "all retries exhausted; dead-lettering the message"
                );
                return Verdict::Nack;
            }
            retries += 1;
            crate::metrics::consumed(&self.queue, Outcome::Retried);
            let wait = self.retry_wait * retries;
            tracing::warn!(
                error = %failure,
                retry = retries,
                of = self.max_retries,
                retry_in = ?wait,
                "transient failure; rolled back, the callback runs again in a new transaction"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// Counts what became of the message and records it on the message's span (the current
    /// one).
    fn concluded(&self, outcome: Outcome) {
        crate::metrics::consumed(&self.queue, outcome);
        tracing::Span::current().record("outcome", outcome.label());
    }

    /// One transaction: inbox row, callback, commit.
    async fn attempt(&self, message: &Arc<Incoming>, committed: &AtomicBool) -> Attempt {
        let txn = match self
            .bounds
            .begin_consumer(&self.db, self.callback_timeout)
            .await
        {
            Ok(txn) => txn,
            Err(err) => return Attempt::Failed(Failure::Database(err)),
        };
        let txn = match self.run_once(txn, Scope::Message, message).await {
            Once::Saved(txn) => txn,
            Once::Ended { attempt, .. } => return attempt,
        };
        match self.bounds.call(txn.commit()).await {
            Ok(()) => {
                committed.store(true, Ordering::SeqCst);
                crate::metrics::consumer_committed(
                    &self.queue,
                    message
                        .headers
                        .get(crate::headers::MSG_SENT_TIME)
                        .map(String::as_str),
                );
                // Outbox rows the callback wrote are committed: wake this process's relays.
                wake::committed();
                Attempt::Committed
            }
            Err(err) => Attempt::Failed(Failure::Database(err)),
        }
    }

    /// In `txn`, the inbox row, then the callback. Returns the transaction to commit when the
    /// callback saved the message; otherwise rolls it back and says how the attempt ended. In
    /// a group (`scope` [`Scope::Member`]) all of it runs in a savepoint of the group's
    /// transaction, rolled back to on failure, and the transaction is handed back to go on with.
    pub(super) async fn run_once(
        &self,
        txn: DatabaseTransaction,
        scope: Scope,
        message: &Arc<Incoming>,
    ) -> Once {
        if scope == Scope::Member
            && let Err(err) = self.bounds.call(txn.execute_unprepared(SAVEPOINT)).await
        {
            return Once::Ended {
                attempt: Attempt::Failed(Failure::Database(err)),
                txn: None,
            };
        }
        let inserted = inbox::insert(&txn, message, self.keep_for, &self.bounds);
        let inbox_row = match self.bounds.call(inserted).await {
            Ok(id) => id,
            Err(err) => {
                let attempt = if inbox::is_duplicate(&err) {
                    Attempt::Duplicate
                } else {
                    Attempt::Failed(Failure::Database(err))
                };
                return Once::Ended {
                    txn: end(txn, scope).await,
                    attempt,
                };
            }
        };
        let txn = Arc::new(txn);
        let decision = Arc::new(Decision::default());
        let payload = Payload::new(message.clone(), txn.clone(), decision.clone());
        let started = std::time::Instant::now();
        let outcome = self.call(payload, message).await;
        crate::metrics::callback_finished(&self.queue, started.elapsed());
        // The payload went with the callback's future; if it is still held elsewhere the
        // transaction cannot be ended here (it rolls back when the last holder drops it).
        let Ok(txn) = Arc::try_unwrap(txn) else {
            return Once::Ended {
                attempt: Attempt::Failed(Failure::PayloadKept),
                txn: None,
            };
        };
        match outcome {
            Err(failure) => Once::Ended {
                txn: end(txn, scope).await,
                attempt: Attempt::Failed(failure),
            },
            Ok(()) if decision.get() == Decision::NACKED => Once::Ended {
                txn: end(txn, scope).await,
                attempt: Attempt::Nacked,
            },
            Ok(()) => {
                if decision.get() == Decision::UNDECIDED {
                    tracing::warn!(
                        "the callback returned Ok without calling save() or nack(); treated as saved"
                    );
                }
                match self.alive(&txn, inbox_row).await {
                    Ok(()) => Once::Saved(txn),
                    Err(failure) => Once::Ended {
                        // In a group, the member's savepoint is rolled back to: on PostgreSQL
                        // that revives the aborted transaction for the members after it; a
                        // transaction the database rolled back has no savepoint left, and the
                        // group is processed again, member by member.
                        txn: end(txn, scope).await,
                        attempt: Attempt::Failed(failure),
                    },
                }
            }
        }
    }

    /// Checks, before a saved message is committed (or, in a group, before the next member
    /// starts), that its transaction can still commit: it reads back the inbox row it inserted
    /// (see [`inbox::still_holds`]). A dead transaction is counted, and fails the attempt, so
    /// that the message is retried and then dead-lettered rather than acknowledged with nothing
    /// committed; in a group, it is this member that is blamed, and the others go on.
    async fn alive(&self, txn: &DatabaseTransaction, inbox_row: uuid::Uuid) -> Result<(), Failure> {
        let how = match self.bounds.call(inbox::still_holds(txn, inbox_row)).await {
            Ok(true) => return Ok(()),
            Ok(false) => {
                "the transaction had been rolled back (a deadlock victim, or the callback ended \
                 it), so the statements after that ran outside it"
            }
            Err(err) if crate::db::errors::db_err_is_aborted_transaction(&err) => {
                "a statement in it failed and the error was ignored, which aborts the \
                 transaction (PostgreSQL)"
            }
            Err(err) => return Err(Failure::Database(err)),
        };
        crate::metrics::dead_transaction(&self.queue);
        Err(Failure::DeadTransaction(how))
    }

    /// Runs the callback with the message's correlation id ambient, catching panics, for at
    /// most the callback timeout (past it the callback's future is dropped, with its
    /// [`Payload`]: the transaction can then be rolled back).
    async fn call(&self, payload: Payload, message: &Incoming) -> Result<(), Failure> {
        let correlation_id = message
            .correlation_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let callback = self.callback.clone();
        let run = async move {
            // The call itself may panic before it returns a future.
            let future = std::panic::catch_unwind(AssertUnwindSafe(|| (*callback)(payload)))
                .map_err(|panic| Failure::Panic(panic_message(panic)))?;
            AssertUnwindSafe(future)
                .catch_unwind()
                .await
                .map_err(|panic| Failure::Panic(panic_message(panic)))?
                .map_err(Failure::Callback)
        };
        tokio::time::timeout(
            self.callback_timeout,
            crate::headers::with_correlation_id(correlation_id, run),
        )
        .await
        .unwrap_or(Err(Failure::TimedOut(self.callback_timeout)))
    }

    /// Rejects (dead-letters) a delivery, as the settling of a message whose handling panicked
    /// does.
    pub(super) async fn reject(&self, delivery: &Delivery) {
        if let Ok(Err(err)) = AssertUnwindSafe(self.transport.nack(delivery))
            .catch_unwind()
            .await
        {
            tracing::warn!(error = %err, "could not reject the message; the broker will deliver it again");
        }
    }

    async fn settle(&self, delivery: &Delivery, verdict: Verdict) {
        let settled = match verdict {
            Verdict::Ack => self.transport.ack(delivery).await,
            Verdict::Nack => self.transport.nack(delivery).await,
        };
        match (settled, verdict) {
            (Ok(()), _) => tracing::debug!(?verdict, "message settled"),
            (Err(err), Verdict::Ack) => tracing::warn!(
                error = %err,
                "could not acknowledge the message; the broker will deliver it again, and its inbox row makes that a duplicate"
            ),
            (Err(err), Verdict::Nack) => tracing::warn!(
                error = %err,
                "could not reject the message; the broker will deliver it again"
            ),
        }
    }
}

/// Rolls back `txn` (a transaction or a savepoint); whether that completed.
pub(super) async fn rollback(txn: DatabaseTransaction) -> bool {
    // A failed rollback means the connection is gone, which rolls back too.
    match tokio::time::timeout(ROLLBACK_WAIT, txn.rollback()).await {
        Ok(Ok(())) => return true,
        Ok(Err(err)) => tracing::debug!(error = %redacted(&err), "rollback failed"),
        Err(_) => tracing::warn!(
            wait = ?ROLLBACK_WAIT,
            "the rollback did not complete (a statement of the callback still runs?); the \
             transaction is left to the connection pool, which rolls it back or closes it"
        ),
    }
    false
}
