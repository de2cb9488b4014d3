//! The relay: moves outbox rows to the broker.
//!
//! Each round claims a batch of due rows with a short lease and a fresh claim token (committed at
//! once: no transaction or row lock is held while the broker is busy), sends the batch pipelined
//! with a receipt per message, marks the receipted rows SUCCEEDED in one statement and gives the
//! others back. A connection problem costs a row nothing; a row the broker refuses spends a retry
//! and, after the last one, is marked FAILED with the broker's reason. Several relays may share a
//! database: the lease and the token keep each row with one of them at a time, and a relay extends
//! its lease (token-checked) before every send that could outlast it, so that it never sends a row
//! another relay has taken over.
//!
//! Only a poison row pays for itself. RabbitMQ answers a SEND it refuses with an ERROR that names
//! no receipt and closes the connection, failing every batch pending on it: the rows that were not
//! receipted are then suspects, and each is sent alone on an isolation lane (a connection of its
//! own when the relay made its transport from the settings, else the shared one with every other
//! send stopped), where a refusal can only be its own. A row once refused is always sent alone
//! there, so that it never again takes a connection full of good rows down with it. A row the
//! broker passes over silently (no receipt while later messages on the connection were receipted)
//! is charged too; a row whose connection dropped is suspected, and sent alone but alongside the
//! others, until it is receipted or overtaken. When every batch times out (a slow or blocked
//! broker) nobody is charged.
//!
//! Retention (old sent rows deleted, unsent rows past `expires_at` failed) runs on a task of its
//! own, in bounded batches with pauses (see `retention`), never in the way of a round.
//!
//! The relay sleeps when nothing is due and wakes on the first of: a commit made by this process
//! through the library, a PostgreSQL notification (any process's commit), or its polling interval.

mod frame;
mod idle;
mod isolation;
mod lag;
mod listen;
mod pressure;
pub(crate) mod settle;
pub(crate) mod store;
mod unroutable;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sea_orm::DatabaseConnection;
use tokio::sync::{Notify, RwLock};
use tracing::Instrument;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::config::OutboxConfig;
use crate::db::bounds::DbBounds;
use crate::db::errors::again_on_conflict;
use crate::error::Error;
use crate::retention;
use crate::shutdown::Stoppable;
use crate::transport::Transport;
use crate::wake;

pub use crate::tables::published::NOTIFY_CHANNEL;

/// The longest pause after rows were given back by a broker that was reachable but did not
/// keep up (receipts late, or a connection it stopped reading during a memory alarm): the
/// receipt timeout already paced the attempt, and sending resumes this soon after the alarm
/// clears, however many attempts it blocked.
const SLOW_BROKER_PAUSE: Duration = Duration::from_secs(2);

/// What a stopping relay gives its batches in flight beyond a database call's deadline: the
/// settling that follows the call (a stop honours `OUTBOX_DB_STATEMENT_TIMEOUT` + 5 s).
const STOP_MARGIN: Duration = Duration::from_secs(2);

/// How long a stopping relay tries to withdraw its idle announcement.
const IDLE_WITHDRAWAL_WAIT: Duration = Duration::from_secs(1);

/// Time kept in hand on a lease: a send starts only when the lease outlasts the receipt timeout
/// by this much, else the lease is extended first.
const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// Runs the relay with settings from the environment ([`OutboxConfig::from_env`]) and the STOMP
/// broker they name, until SIGTERM, SIGINT or SIGQUIT; then it finishes the batch in flight and
/// returns.
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
    isolation: Option<Arc<dyn Transport>>,
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

    /// Sends suspected and once-refused rows, one at a time, through this transport: a
    /// connection of its own to the same broker (for a [`crate::transport::MemoryTransport`],
    /// [`crate::transport::MemoryTransport::new_connection`]). Without one, a relay given its
    /// transport stops its other sends while it sends such a row; a relay that makes its STOMP
    /// transport from the settings makes a second one for this.
    pub fn isolation_transport(mut self, transport: impl Transport + 'static) -> Self {
        self.isolation = Some(Arc::new(transport));
        self
    }

    /// The producer; checks the settings and reads the TLS files they name. The write path's
    /// settings are not changed (see [`crate::write::WriteSettings`]).
    pub fn build(self) -> Result<Producer, Error> {
        let config = match self.config {
            Some(config) => config,
            None => OutboxConfig::from_env()?,
        };
        config.validate()?;
        let (transport, isolation) = match self.transport {
            Some(transport) => (transport, self.isolation),
            None => {
                let transport = crate::transport::from_config(&config)?;
                let isolation = crate::transport::from_config(&config)?;
                (transport, self.isolation.or(Some(isolation)))
            }
        };
        Ok(Producer {
            bounds: DbBounds::new(&config),
            db: self.db,
            transport,
            isolation,
            config: Arc::new(config),
            wake_pg: Arc::new(Notify::new()),
            sending: RwLock::new(()),
            lane: tokio::sync::Mutex::new(()),
            suspects: Mutex::new(HashSet::new()),
            unroutable: Mutex::default(),
            pressure: Mutex::default(),
            stopping: AtomicBool::new(false),
            link_failed: AtomicBool::new(false),
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
    /// The bounds of every database call (`OUTBOX_DB_STATEMENT_TIMEOUT`).
    bounds: DbBounds,
    transport: Arc<dyn Transport>,
    /// The isolation lane's own connection, if there is one.
    isolation: Option<Arc<dyn Transport>>,
    config: Arc<OutboxConfig>,
    wake_pg: Arc<Notify>,
    /// Held shared by every send on `transport`, exclusively by a send on the isolation lane
    /// when the lane has no connection of its own.
    sending: RwLock<()>,
    /// One send at a time on the isolation lane: there, a refusal is the message's own.
    lane: tokio::sync::Mutex<()>,
    /// Rows whose batch lost its connection with them first in line, unreceipted: sent alone
    /// (alongside the batches) until they are receipted.
    suspects: Mutex<HashSet<Uuid>>,
    /// The destinations recorded as waiting for a queue, as far as this relay knows.
    unroutable: Mutex<unroutable::Recorded>,
    /// The destinations the broker rejects messages to, or that are in doubt.
    pressure: Mutex<pressure::Pressure>,
    /// Set when the relay is asked to stop: no new claim is made.
    stopping: AtomicBool,
    /// Set when rows were given back because the connection failed (as opposed to a broker
    /// that was reachable but slow or blocked) since the rounds began.
    link_failed: AtomicBool,
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
    /// Rows given back untouched (connection problem, or the broker's back-pressure).
    pub released: usize,
    /// Rows whose message no queue took (AMQP): kept waiting, dropped or failed as
    /// `OUTBOX_UNROUTABLE` says.
    pub unroutable: usize,
    /// Rows given back to wait a short pause of their own, no retry spent, because the broker
    /// rejects messages to their destination (a queue full with `x-overflow: reject-publish`)
    /// or the transport waits before reconnecting. Unlike `released`, the relay goes on with
    /// other rows meanwhile.
    pub deferred: usize,
}

impl std::ops::AddAssign for RoundReport {
    fn add_assign(&mut self, other: RoundReport) {
        self.claimed += other.claimed;
        self.sent += other.sent;
        self.refused += other.refused;
        self.released += other.released;
        self.unroutable += other.unroutable;
        self.deferred += other.deferred;
    }
}

impl Producer {
    /// A producer on `db`; see [`ProducerBuilder`].
    pub fn builder(db: DatabaseConnection) -> ProducerBuilder {
        ProducerBuilder {
            db,
            config: None,
            transport: None,
            isolation: None,
        }
    }

    /// Runs until `shutdown` completes; then finishes the batches in flight, disconnects and
    /// returns. Database and broker errors do not end it: they are logged and retried with
    /// backoff. Retention runs meanwhile on a task of its own, stopped at once on shutdown.
    pub async fn run_until(&self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        tokio::pin!(shutdown);
        self.stopping.store(false, Ordering::Relaxed);
        let mut commits = wake::subscribe();
        let listener = self.listen_postgres();
        let retention = tokio::spawn(retention::published::keep(
            self.db.clone(),
            self.config.clone(),
        ));
        let mut backoff = Backoff::new(self.config.maximum_backoff);
        let mut pending_sampler = lag::PendingSampler::default();
        tracing::info!(batch = self.config.published_chunk_size, "relay started");
        let mut idle = idle::Idle::new(&self.db, self.bounds);
        // Every database call below is bounded (`OUTBOX_DB_STATEMENT_TIMEOUT`), and each races
        // the shutdown: a database that stopped answering never holds up a stop.
        loop {
            if futures::poll!(shutdown.as_mut()).is_ready() {
                break;
            }
            let sampled = pending_sampler.sample_if_due(&self.db, &self.bounds);
            if unless_stopped(shutdown.as_mut(), sampled).await.is_none() {
                break;
            }
            if let Err(err) = self.transport.connect().await {
                // A transport that paces its reconnections says how long; else back off.
                let pause = err.retry_in().unwrap_or_else(|| {
                    let pause = backoff.next_pause();
                    tracing::warn!(error = %err, retry_in = ?pause, "broker unreachable; rows stay scheduled");
                    pause
                });
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = shutdown.as_mut() => break,
                }
            }
            let Some(result) = self.rounds_unless_stopped(shutdown.as_mut()).await else {
                break;
            };
            match result {
                Ok(report) if report.claimed > 0 && report.released == 0 => {
                    backoff.reset();
                    let found = idle.found_rows(&self.db);
                    if unless_stopped(shutdown.as_mut(), found).await.is_none() {
                        break;
                    }
                    continue;
                }
                Ok(report) if report.released > 0 => {
                    // The broker connection failed mid-batch, or the broker did not keep up:
                    // pause before claiming again; briefly when the link itself was fine.
                    let mut pause = backoff.next_pause();
                    if !self.link_failed.load(Ordering::Relaxed) {
                        pause = pause.min(SLOW_BROKER_PAUSE);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue,
                        _ = shutdown.as_mut() => break,
                    }
                }
                Ok(_) => backoff.reset(),
                Err(err) => {
                    // A database that failed or timed out: transient, nothing charged.
                    let pause = backoff.next_pause();
                    tracing::error!(error = %err, retry_in = ?pause, "relay round failed");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue,
                        _ = shutdown.as_mut() => break,
                    }
                }
            }
            // Nothing due: announce the relay idle (writers then notify), look again at once
            // and shortly after, then sleep until woken.
            let mut wait = self.config.producer_waiting_time;
            let announced = idle.nothing_due(&self.db);
            let Some(fresh) = unless_stopped(shutdown.as_mut(), announced).await else {
                break;
            };
            if fresh {
                let Some(again) = self.rounds_unless_stopped(shutdown.as_mut()).await else {
                    break;
                };
                if again.is_ok_and(|report| report.claimed > 0) {
                    let found = idle.found_rows(&self.db);
                    if unless_stopped(shutdown.as_mut(), found).await.is_none() {
                        break;
                    }
                    continue;
                }
                wait = wait.min(idle::SECOND_LOOK);
            }
            tokio::select! {
                _ = commits.changed() => {}
                _ = self.wake_pg.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.as_mut() => break,
            }
        }
        // Best effort: an announcement left behind lapses by itself (`idle::LEASE`).
        let _ = tokio::time::timeout(IDLE_WITHDRAWAL_WAIT, idle.stopped(&self.db)).await;
        retention.abort();
        if let Some(listener) = listener {
            listener.abort();
        }
        let _ = self.transport.disconnect().await;
        if let Some(isolation) = &self.isolation {
            let _ = isolation.disconnect().await;
        }
        tracing::info!("relay stopped");
        Ok(())
    }

    /// The rounds, unless `shutdown` completes first: then no batch is claimed any more, and
    /// the batches in flight are given [`Producer::stop_wait`] to finish (each of their
    /// database calls is bounded by the statement timeout, so they end by themselves even when
    /// the database stopped answering); past it they are abandoned, and their rows are sent
    /// again once their lease has run out (the consumers' inbox absorbs a second copy).
    async fn rounds_unless_stopped(
        &self,
        shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Option<Result<RoundReport, Error>> {
        let rounds = self.rounds();
        tokio::pin!(rounds);
        tokio::select! {
            result = rounds.as_mut() => Some(result),
            _ = shutdown => {
                self.stopping.store(true, Ordering::Relaxed);
                if tokio::time::timeout(self.stop_wait(), rounds).await.is_err() {
                    tracing::warn!(
                        waited = ?self.stop_wait(),
                        "batches still in flight at the stop were abandoned; their rows are \
                         sent again after their lease"
                    );
                }
                None
            }
        }
    }

    /// How long a stopping relay waits for its batches in flight: a database call's deadline
    /// (the statement timeout and its answer margin) and [`STOP_MARGIN`].
    fn stop_wait(&self) -> Duration {
        self.bounds.deadline() + STOP_MARGIN
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

    /// Expires rows past their `expires_at`, and deletes old sent rows when it is this relay's
    /// turn, as the relay's retention task does once a minute (for tests and scripts).
    pub async fn tidy(&self) -> Result<(), Error> {
        retention::published::run_once(&self.db, &self.config, retention::Pace::default()).await?;
        Ok(())
    }

    /// `relay_batches_in_flight` workers at once (a setting, `OUTBOX_RELAY_BATCHES_IN_FLIGHT`), on
    /// the one broker connection, each claiming and
    /// settling batch after batch until nothing is due (or a batch lost its connection, or the
    /// relay stops): while one batch waits for its receipts, the next is being claimed or
    /// marked, and a batch slowed by a suspect holds up no other.
    async fn rounds(&self) -> Result<RoundReport, Error> {
        self.link_failed.store(false, Ordering::Relaxed);
        let workers = self.config.relay_batches_in_flight.max(1);
        let reports = futures::future::join_all((0..workers).map(|_| self.worker())).await;
        let mut total = RoundReport::default();
        for report in reports {
            total += report?;
        }
        Ok(total)
    }

    async fn worker(&self) -> Result<RoundReport, Error> {
        let mut total = RoundReport::default();
        while !self.stopping.load(Ordering::Relaxed) {
            let report = self.round().await?;
            total += report;
            if report.claimed == 0 || report.released > 0 {
                break;
            }
        }
        Ok(total)
    }

    /// One round: claim a batch, send it, settle every row of it.
    pub async fn round(&self) -> Result<RoundReport, Error> {
        let started = Instant::now();
        let claim = again_on_conflict(&self.bounds, || {
            store::claim_batch(
                &self.db,
                self.config.published_chunk_size,
                self.config.producer_lease,
            )
        })
        .await?;
        if claim.rows.is_empty() {
            return Ok(RoundReport::default());
        }
        let span =
            tracing::info_span!("outbox.batch", size = claim.rows.len(), token = %claim.token);
        #[cfg(feature = "opentelemetry")]
        crate::trace_context::link_batch(&span, claim.rows.iter().map(|row| &row.headers));
        let lease = Lease {
            token: claim.token,
            until: started + self.config.producer_lease,
        };
        let report = self
            .settle(claim.rows, lease)
            .instrument(span.clone())
            .await?;
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
}

/// A claim's lease as this relay counts it: from before the claim was made, so never later than
/// the database's `locked_until`.
struct Lease {
    token: Uuid,
    until: Instant,
}

impl Lease {
    /// Whether a send started now could still be waiting for receipts when the lease ends (with
    /// a margin of half the lease's excess over the receipt timeout, at most [`LEASE_MARGIN`]).
    fn expiring(&self, config: &OutboxConfig) -> bool {
        let margin =
            (config.producer_lease.saturating_sub(config.receipt_timeout) / 2).min(LEASE_MARGIN);
        Instant::now() + config.receipt_timeout + margin >= self.until
    }
}

/// `call`, unless `shutdown` completes first (then `None`, and the call is dropped).
async fn unless_stopped<T>(
    shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    call: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        done = call => Some(done),
        _ = shutdown => None,
    }
}
