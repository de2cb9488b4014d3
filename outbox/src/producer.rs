//! The relay: moves outbox rows to the broker.
//!
//! Each round claims a batch of due rows with a short lease and a fresh claim token (committed at
//! once: no transaction or row lock is held while the broker is busy), sends the batch pipelined
//! with a receipt per message, marks the receipted rows SUCCEEDED in one statement and gives the
//! others back. A connection problem costs a row nothing; a row the broker refuses spends a retry
//! and, after the last one, is marked FAILED with the broker's reason. Several relays may share a
//! database: the lease and the token keep each row with one of them at a time.
//!
//! The relay sleeps when nothing is due and wakes on the first of: a commit made by this process
//! through the library, a PostgreSQL notification (any process's commit), or its polling interval.

pub(crate) mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::DatabaseConnection;
use tokio::sync::Notify;
use tracing::Instrument;
use uuid::Uuid;

use crate::published::Model as Row;
use crate::shutdown::Stoppable;
use crate::transport::{Outgoing, StompTransport, Transport, TransportError};
use crate::{Error, OutboxConfig, wake};

/// The PostgreSQL channel the outbox table's trigger notifies at every commit that inserted rows.
pub const NOTIFY_CHANNEL: &str = "outbox_published";

/// Batches a relay has in flight at once: the database work of one overlaps the broker's work
/// on another.
const BATCHES_IN_FLIGHT: usize = 3;

/// How often the relay looks for expired rows.
const EXPIRY_CHECK_EVERY: Duration = Duration::from_secs(60);

/// Runs the relay with settings from the environment ([`OutboxConfig::from_env`]) and the STOMP
/// broker they name, until SIGTERM or SIGINT; then it finishes the batch in flight and returns.
///
/// ```no_run
/// # async fn demo() -> Result<(), outbox::Error> {
/// let db = sea_orm::Database::connect(std::env::var("DATABASE_URL").unwrap()).await?;
/// outbox::run_producer(db).await
/// # }
/// ```
pub async fn run_producer(db: DatabaseConnection) -> Result<(), Error> {
    let producer = Producer::builder(db)
        .config(OutboxConfig::from_env()?)
        .build()?;
    producer.run_until(crate::shutdown::signal()).await
}

/// Configures a [`Producer`].
#[must_use]
pub struct ProducerBuilder {
    db: DatabaseConnection,
    config: Option<OutboxConfig>,
    transport: Option<Arc<dyn Transport>>,
}

impl ProducerBuilder {
    /// Uses these settings instead of the environment's.
    pub fn config(mut self, config: OutboxConfig) -> Self {
        self.config = Some(config);
        self
    }

    /// Sends through this transport instead of a STOMP connection made from the settings (a
    /// [`crate::transport::MemoryTransport`] in tests).
    pub fn transport(mut self, transport: impl Transport + 'static) -> Self {
        self.transport = Some(Arc::new(transport));
        self
    }

    /// Sends through a shared transport.
    pub fn shared_transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// The producer; checks the settings, makes them the process's ([`OutboxConfig::install`])
    /// and reads the TLS files they name.
    pub fn build(self) -> Result<Producer, Error> {
        let config = match self.config {
            Some(config) => config,
            None => OutboxConfig::from_env()?,
        };
        config.install()?;
        let transport = match self.transport {
            Some(transport) => transport,
            None => Arc::new(StompTransport::new(&config)?),
        };
        Ok(Producer {
            db: self.db,
            transport,
            config: Arc::new(config),
            wake_pg: Arc::new(Notify::new()),
        })
    }

    /// Builds the producer and runs it on a task of its own.
    pub fn start(self) -> Result<ProducerHandle, Error> {
        let producer = self.build()?;
        Ok(ProducerHandle(Stoppable::spawn(move |stop| async move {
            producer.run_until(stop).await
        })))
    }
}

/// A producer started with [`ProducerBuilder::start`]; dropping it stops the producer too.
pub struct ProducerHandle(Stoppable);

impl ProducerHandle {
    /// Asks the producer to stop (it finishes the batch in flight) and waits for it.
    pub async fn stop(self) -> Result<(), Error> {
        self.0.stop().await
    }

    /// Waits for the producer to end (it ends only when stopped).
    pub async fn join(self) -> Result<(), Error> {
        self.0.join().await
    }
}

/// The relay: claims due outbox rows, sends them with receipts, and records what became of each.
/// Several may share a database. See [`run_producer`] and [`ProducerBuilder`].
pub struct Producer {
    db: DatabaseConnection,
    transport: Arc<dyn Transport>,
    config: Arc<OutboxConfig>,
    wake_pg: Arc<Notify>,
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RoundReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows sent and marked SUCCEEDED.
    pub sent: usize,
    /// Rows the broker refused (a retry spent, or FAILED).
    pub refused: usize,
    /// Rows given back untouched (connection problem).
    pub released: usize,
}

impl std::ops::AddAssign for RoundReport {
    fn add_assign(&mut self, other: RoundReport) {
        self.claimed += other.claimed;
        self.sent += other.sent;
        self.refused += other.refused;
        self.released += other.released;
    }
}

impl Producer {
    /// A producer on `db`; see [`ProducerBuilder`].
    pub fn builder(db: DatabaseConnection) -> ProducerBuilder {
        ProducerBuilder {
            db,
            config: None,
            transport: None,
        }
    }

    /// Runs until `shutdown` completes; then finishes the batch in flight, disconnects and
    /// returns. Database and broker errors do not end it: they are logged and retried with
    /// backoff.
    pub async fn run_until(&self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let mut commits = wake::subscribe();
        let listener = self.listen_postgres();
        let mut backoff = Backoff::new(self.config.maximum_backoff);
        let mut last_expiry_check: Option<Instant> = None;
        let mut pending_sampler = crate::metrics::PendingSampler::default();
        tracing::info!(batch = self.config.published_chunk_size, "relay started");
        loop {
            if futures::poll!(shutdown.as_mut()).is_ready() {
                break;
            }
            // Database work only: it goes on while the broker is down.
            if last_expiry_check.is_none_or(|at| at.elapsed() >= EXPIRY_CHECK_EVERY) {
                last_expiry_check = Some(Instant::now());
                self.housekeeping().await;
            }
            pending_sampler.sample_if_due(&self.db).await;
            if let Err(err) = self.transport.connect().await {
                let pause = backoff.next_pause();
                tracing::warn!(error = %err, retry_in = ?pause, "broker unreachable; rows stay scheduled");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = shutdown.as_mut() => break,
                }
            }
            match self.rounds().await {
                Ok(report) if report.claimed > 0 && report.released == 0 => {
                    backoff.reset();
                    continue;
                }
                Ok(report) if report.released > 0 => {
                    // The broker connection failed mid-batch: pause before claiming again.
                    let pause = backoff.next_pause();
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue,
                        _ = shutdown.as_mut() => break,
                    }
                }
                Ok(_) => backoff.reset(),
                Err(err) => {
                    let pause = backoff.next_pause();
                    tracing::error!(error = %err, retry_in = ?pause, "relay round failed");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue,
                        _ = shutdown.as_mut() => break,
                    }
                }
            }
            // Nothing due: sleep until woken.
            tokio::select! {
                _ = commits.changed() => {}
                _ = self.wake_pg.notified() => {}
                _ = tokio::time::sleep(self.config.producer_waiting_time) => {}
                _ = shutdown.as_mut() => break,
            }
        }
        if let Some(listener) = listener {
            listener.abort();
        }
        let _ = self.transport.disconnect().await;
        tracing::info!("relay stopped");
        Ok(())
    }

    /// Sends every due row, round after round, until none is left; returns the totals. For
    /// tests and scripts: a service's test can save entities, drain the outbox into a
    /// [`crate::transport::MemoryTransport`], then look at what was published.
    pub async fn drain(&self) -> Result<RoundReport, Error> {
        let mut total = RoundReport::default();
        loop {
            let report = self.rounds().await?;
            total += report;
            if report.claimed == 0 || report.released > 0 {
                return Ok(total);
            }
        }
    }

    /// [`BATCHES_IN_FLIGHT`] rounds at once, on the one broker connection: while one batch
    /// waits for its receipts, the next is being claimed or marked.
    async fn rounds(&self) -> Result<RoundReport, Error> {
        let reports = futures::future::join_all((0..BATCHES_IN_FLIGHT).map(|_| self.round())).await;
        let mut total = RoundReport::default();
        for report in reports {
            total += report?;
        }
        Ok(total)
    }

    /// One round: claim a batch, send it, settle every row of it.
    pub async fn round(&self) -> Result<RoundReport, Error> {
        let started = Instant::now();
        let claim = store::claim_batch(
            &self.db,
            self.config.published_chunk_size,
            self.config.producer_lease,
        )
        .await?;
        if claim.rows.is_empty() {
            return Ok(RoundReport::default());
        }
        let span =
            tracing::info_span!("outbox.batch", size = claim.rows.len(), token = %claim.token);
        let report = self.settle(claim).instrument(span.clone()).await?;
        crate::metrics::batch_relayed(report.claimed, started.elapsed());
        span.in_scope(|| {
            tracing::info!(
                sent = report.sent,
                refused = report.refused,
                released = report.released,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "batch relayed"
            )
        });
        Ok(report)
    }

    /// Sends the claimed rows and records what became of each. When the broker refuses a SEND
    /// (RabbitMQ then closes the connection, so nothing behind it is receipted), the first
    /// unreceipted row is sent alone: refused alone, it is the culprit and spends a retry;
    /// the rest are sent again. So only a poison row pays.
    async fn settle(&self, claim: store::Claim) -> Result<RoundReport, Error> {
        let token = claim.token;
        let mut report = RoundReport {
            claimed: claim.rows.len(),
            ..RoundReport::default()
        };
        let mut pending: Vec<Row> = claim.rows;
        while !pending.is_empty() {
            let frames: Vec<Outgoing> = pending.iter().map(outgoing).collect();
            let result = self.transport.send(&frames).await;
            let mut sent = Vec::new();
            let mut unsent = Vec::new();
            for (row, receipted) in pending.into_iter().zip(result.receipted) {
                if receipted {
                    sent.push(row);
                } else {
                    unsent.push(row);
                }
            }
            report.sent += self.mark_sent(&sent, token).await?;
            let Some(failure) = result.failure.filter(|_| !unsent.is_empty()) else {
                break;
            };
            if !failure.is_broker_refusal() {
                report.released += self.release(&unsent, token, &failure).await?;
                break;
            }
            let mut rest = unsent.into_iter();
            let Some(suspect) = rest.next() else { break };
            let alone = self.transport.send(&[outgoing(&suspect)]).await;
            match alone.failure {
                None if alone.all_receipted() => {
                    report.sent += self
                        .mark_sent(std::slice::from_ref(&suspect), token)
                        .await?;
                }
                Some(err) if err.is_broker_refusal() => {
                    self.refuse(&suspect, token, &err).await?;
                    report.refused += 1;
                }
                other => {
                    let err = other.unwrap_or(TransportError::Closed);
                    let mut back = vec![suspect];
                    back.extend(rest);
                    report.released += self.release(&back, token, &err).await?;
                    break;
                }
            }
            pending = rest.collect();
        }
        Ok(report)
    }

    async fn mark_sent(&self, rows: &[Row], token: Uuid) -> Result<usize, Error> {
        if rows.is_empty() {
            return Ok(0);
        }
        for row in rows {
            tracing::debug!(message_id = %row.id, destination = %row.destination, correlation_id = row.correlation_id(), outcome = "sent", "message receipted");
        }
        crate::metrics::sent(rows);
        let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
        let marked = store::mark_sent(&self.db, &ids, token).await? as usize;
        if marked < rows.len() {
            tracing::warn!(
                receipted = rows.len(),
                marked,
                "some receipted rows had been taken over by another relay after this relay's lease ran out; they may be sent twice"
            );
        }
        Ok(rows.len())
    }

    async fn release(
        &self,
        rows: &[Row],
        token: Uuid,
        why: &TransportError,
    ) -> Result<usize, Error> {
        tracing::warn!(rows = rows.len(), error = %why, "broker connection failed; rows given back without spending a retry");
        crate::metrics::released(rows.len());
        let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
        store::release(&self.db, &ids, token).await?;
        Ok(rows.len())
    }

    async fn refuse(&self, row: &Row, token: Uuid, why: &TransportError) -> Result<(), Error> {
        let failures = u32::try_from(row.retry).unwrap_or(0).saturating_add(1);
        let decision = store::after_failure(
            failures,
            self.config.maximum_retry_attempts,
            self.config.pause_for_retry,
            self.config.wait_retry,
            chrono::Utc::now(),
        );
        let reason = why.to_string();
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
            store::Refusal::RetryAt(at) => tracing::warn!(
                message_id = %row.id,
                destination = %row.destination,
                correlation_id = row.correlation_id(),
                outcome = "retried",
                attempt = failures,
                next_attempt_at = %at,
                error = %reason,
                "the broker refused the message; it will be retried"
            ),
        }
        store::record_refusal(&self.db, row, token, &decision, &reason).await?;
        crate::metrics::refused(&row.destination, decision == store::Refusal::Failed);
        Ok(())
    }

    /// Expires rows past their `expires_at`, and deletes old sent rows when it is this relay's
    /// turn. Failures are logged: they must not stop relaying.
    async fn housekeeping(&self) {
        match store::expire(&self.db).await {
            Ok(0) => {}
            Ok(expired) => {
                crate::metrics::expired(expired);
                tracing::error!(
                    expired,
                    "outbox rows expired before they could be sent; marked FAILED (see last_error)"
                )
            }
            Err(err) => tracing::warn!(error = %err, "expiring old rows failed"),
        }
        match store::take_cleanup_turn(&self.db, self.config.remove_data_cache_ttl).await {
            Ok(true) => {
                let cutoff = chrono::Utc::now()
                    - chrono::Duration::days(i64::from(self.config.days_to_keep_data));
                match store::delete_sent_before(&self.db, cutoff).await {
                    Ok(deleted) => tracing::info!(deleted, "old sent rows deleted"),
                    Err(err) => tracing::warn!(error = %err, "deleting old sent rows failed"),
                }
            }
            Ok(false) => {}
            Err(err) => tracing::warn!(error = %err, "cleanup coordination failed"),
        }
    }

    /// On PostgreSQL, a task that LISTENs for commits of outbox rows and wakes the relay.
    #[cfg(feature = "postgres")]
    fn listen_postgres(&self) -> Option<tokio::task::JoinHandle<()>> {
        if self.db.get_database_backend() != sea_orm::DbBackend::Postgres {
            return None;
        }
        let pool = self.db.get_postgres_connection_pool().clone();
        let wake = self.wake_pg.clone();
        Some(tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_secs(60));
            loop {
                match listen(&pool, &wake).await {
                    Ok(()) => backoff.reset(),
                    Err(err) => tracing::warn!(error = %err, "LISTEN failed; polling meanwhile"),
                }
                tokio::time::sleep(backoff.next_pause()).await;
            }
        }))
    }

    /// Without the PostgreSQL driver there is nothing to listen to: rows wake the relay by polling.
    #[cfg(not(feature = "postgres"))]
    fn listen_postgres(&self) -> Option<tokio::task::JoinHandle<()>> {
        None
    }
}

/// Forwards notifications to `wake` until the listener fails.
#[cfg(feature = "postgres")]
async fn listen(pool: &sea_orm::sqlx::PgPool, wake: &Notify) -> Result<(), sea_orm::sqlx::Error> {
    let mut listener = sea_orm::sqlx::postgres::PgListener::connect_with(pool).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    // Rows committed while not listening are found by the next round anyway.
    wake.notify_one();
    loop {
        listener.recv().await?;
        wake.notify_one();
    }
}

/// The frame of a row: its stored headers, plus `persistent` and `content-type`.
fn outgoing(row: &Row) -> Outgoing {
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(stored) = row.headers.as_object() {
        for (name, value) in stored {
            // Frame-level headers are the transport's to set.
            if matches!(
                name.as_str(),
                "destination" | "content-length" | "receipt" | "transaction"
            ) {
                continue;
            }
            let value = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            headers.push((name.clone(), value));
        }
    }
    for (name, value) in [("persistent", "true"), ("content-type", "application/json")] {
        if !headers.iter().any(|(n, _)| n == name) {
            headers.push((name.to_owned(), value.to_owned()));
        }
    }
    Outgoing {
        destination: row.destination.clone(),
        headers,
        body: serde_json::to_vec(&row.body).unwrap_or_default(),
    }
}

/// Reconnection pacing: `min(2^n + jitter, maximum)` seconds after the n-th failure in a row.
#[derive(Debug)]
pub(crate) struct Backoff {
    failures: u32,
    maximum: Duration,
}

impl Backoff {
    pub(crate) fn new(maximum: Duration) -> Self {
        Self {
            failures: 0,
            maximum,
        }
    }

    pub(crate) fn next_pause(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let base = 2f64.powi(self.failures.min(30) as i32);
        let jitter = (Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
        Duration::from_secs_f64(base + jitter).min(self.maximum)
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(10));
        let first = backoff.next_pause();
        assert!(first >= Duration::from_secs(2) && first < Duration::from_secs(3));
        let second = backoff.next_pause();
        assert!(second >= Duration::from_secs(4) && second < Duration::from_secs(5));
        for _ in 0..10 {
            assert!(backoff.next_pause() <= Duration::from_secs(10));
        }
        backoff.reset();
        assert!(backoff.next_pause() < Duration::from_secs(3));
    }

    #[test]
    fn a_row_goes_out_with_its_headers_persistent_and_json() {
        let row = Row {
            id: Uuid::new_v4(),
            version: None,
            destination: "/topic/x".into(),
            body: serde_json::json!({"a": 1}),
            headers: serde_json::json!({"dop-msg-id": "m", "destination": "/evil", "x": "a:b"}),
            added: chrono::Utc::now(),
            expires_at: chrono::Utc::now(),
            retry: 0,
            status: crate::Status::Schedule,
            claim_token: None,
            locked_until: None,
            next_attempt_at: None,
            last_error: None,
        };
        let out = outgoing(&row);
        assert_eq!(out.destination, "/topic/x");
        assert_eq!(out.body, br#"{"a":1}"#);
        assert!(out.headers.contains(&("dop-msg-id".into(), "m".into())));
        assert!(out.headers.contains(&("x".into(), "a:b".into())));
        assert!(out.headers.contains(&("persistent".into(), "true".into())));
        assert!(
            out.headers
                .contains(&("content-type".into(), "application/json".into()))
        );
        assert!(!out.headers.iter().any(|(n, _)| n == "destination"));
    }
}
