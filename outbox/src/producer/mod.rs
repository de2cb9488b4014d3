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

mod idle;
pub(crate) mod store;

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
use crate::config::Unroutable;
use crate::db::errors::again_on_conflict;
use crate::error::Error;
use crate::headers;
use crate::retention;
use crate::shutdown::Stoppable;
use crate::tables::published::Model as Row;
use crate::transport::{Outcome, Outgoing, Transport, TransportError, Unknown};
use crate::wake;

/// The PostgreSQL channel the outbox table's trigger notifies at every commit that inserted rows.
pub const NOTIFY_CHANNEL: &str = "outbox_published";

/// The longest pause after rows were given back by a broker that was reachable but did not
/// keep up (receipts late, or a connection it stopped reading during a memory alarm): the
/// receipt timeout already paced the attempt, and sending resumes this soon after the alarm
/// clears, however many attempts it blocked.
const SLOW_BROKER_PAUSE: Duration = Duration::from_secs(2);

/// Rows remembered as suspects of dropping their connection; beyond it the memory starts over
/// (a suspect forgotten is only sent in a batch again).
const SUSPECTS_REMEMBERED: usize = 10_000;

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

    /// The producer; checks the settings, makes them the process's ([`OutboxConfig::install`])
    /// and reads the TLS files they name.
    pub fn build(self) -> Result<Producer, Error> {
        let config = match self.config {
            Some(config) => config,
            None => OutboxConfig::from_env()?,
        };
        config.install()?;
        let (transport, isolation) = match self.transport {
            Some(transport) => (transport, self.isolation),
            None => {
                let transport = crate::transport::from_config(&config)?;
                let isolation = crate::transport::from_config(&config)?;
                (transport, self.isolation.or(Some(isolation)))
            }
        };
        Ok(Producer {
            db: self.db,
            transport,
            isolation,
            config: Arc::new(config),
            wake_pg: Arc::new(Notify::new()),
            sending: RwLock::new(()),
            lane: tokio::sync::Mutex::new(()),
            suspects: Mutex::new(HashSet::new()),
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
}

impl std::ops::AddAssign for RoundReport {
    fn add_assign(&mut self, other: RoundReport) {
        self.claimed += other.claimed;
        self.sent += other.sent;
        self.refused += other.refused;
        self.released += other.released;
        self.unroutable += other.unroutable;
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
        let mut pending_sampler = crate::metrics::PendingSampler::default();
        tracing::info!(batch = self.config.published_chunk_size, "relay started");
        let mut idle = idle::Idle::new(&self.db);
        loop {
            if futures::poll!(shutdown.as_mut()).is_ready() {
                break;
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
            let rounds = self.rounds();
            tokio::pin!(rounds);
            let result = tokio::select! {
                result = rounds.as_mut() => result,
                _ = shutdown.as_mut() => {
                    // Finish what is claimed; claim nothing more.
                    self.stopping.store(true, Ordering::Relaxed);
                    let _ = rounds.await;
                    break;
                }
            };
            match result {
                Ok(report) if report.claimed > 0 && report.released == 0 => {
                    backoff.reset();
                    idle.found_rows(&self.db).await;
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
            if idle.nothing_due(&self.db).await {
                if self.rounds().await.is_ok_and(|report| report.claimed > 0) {
                    idle.found_rows(&self.db).await;
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
        idle.stopped(&self.db).await;
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
        let claim = again_on_conflict(|| {
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

    /// Sends the claimed rows and records what became of each.
    ///
    /// Rows refused before go to the isolation lane; rows suspected of dropping their
    /// connection are sent alone, alongside the batch; the others in one pipelined batch. The
    /// rows of a batch that a refusal failed (RabbitMQ's ERROR names no receipt) are suspects:
    /// each is then sent alone on the isolation lane, where a refusal is its own.
    async fn settle(&self, rows: Vec<Row>, lease: Lease) -> Result<RoundReport, Error> {
        let mut lease = lease;
        let mut report = RoundReport {
            claimed: rows.len(),
            ..RoundReport::default()
        };
        let (lone, shared): (Vec<Row>, Vec<Row>) = rows.into_iter().partition(refused_before);
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
            report += self.isolate(isolate, &mut lease, proven).await?;
        }
        Ok(report)
    }

    /// Sends `rows` pipelined on the shared connection and settles what it can: receipted rows
    /// marked sent, rows at fault charged, the rest given back; returns the rows a refusal made
    /// suspects.
    async fn send_shared(&self, rows: Vec<Row>, token: Uuid) -> Result<Settled, Error> {
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
                    if released.is_empty()
                        && (alone || matches!(reason, TransportError::ConnectionLost(_)))
                    {
                        self.suspect(&row);
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
        settled.report.sent += self.mark_sent(&sent, token).await?;
        if let Some(why) = release_reason {
            settled.report.released += self.release(&released, token, &why).await?;
        }
        settled.report += self.unroutable(unroutable, token).await?;
        settled.report.released += self.nacked(&nacked, token).await?;
        Ok(settled)
    }

    /// Sends the rows on the isolation lane, oldest first, where nothing else is in flight: a
    /// refusal there is the row's own (or, for a group, one of the group's). A row to a
    /// destination not yet known to take messages goes alone; once one is receipted, the rows
    /// to its destination (a refusal of RabbitMQ's is the destination's: missing exchange,
    /// access refused) go together, pipelined, and alone again if that group is refused. A row
    /// refused before always goes alone. Stops at the first failure that is not a refusal (the
    /// broker is unreachable or slow), giving back the rest without a charge.
    async fn isolate(
        &self,
        rows: Vec<Row>,
        lease: &mut Lease,
        mut proven: HashSet<String>,
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
                    Outcome::Unknown(Unknown { reason, .. }) => {
                        back_reason.get_or_insert(reason);
                        back.push(row);
                    }
                }
            }
            report += self.unroutable(unroutable, lease.token).await?;
            report.released += self.nacked(&nacked, lease.token).await?;
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
    async fn hold(&self, lease: &mut Lease, rows: Vec<Row>) -> Result<Vec<Row>, Error> {
        if rows.is_empty() || !lease.expiring(&self.config) {
            return Ok(rows);
        }
        let started = Instant::now();
        let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
        let held: HashSet<Uuid> = again_on_conflict(|| {
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

    fn is_suspect(&self, row: &Row) -> bool {
        silently_failed_before(row) || lock(&self.suspects).contains(&row.id)
    }

    fn suspect(&self, row: &Row) {
        let mut suspects = lock(&self.suspects);
        if suspects.len() >= SUSPECTS_REMEMBERED {
            suspects.clear();
        }
        suspects.insert(row.id);
    }

    fn clear_suspect(&self, row: &Row) {
        lock(&self.suspects).remove(&row.id);
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
        let marked = again_on_conflict(|| store::mark_sent(&self.db, &ids, token)).await? as usize;
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
        if rows.is_empty() {
            return Ok(0);
        }
        if why.is_slow_broker() {
            tracing::warn!(rows = rows.len(), error = %why, "the broker did not keep up; rows given back without spending a retry");
        } else {
            self.link_failed.store(true, Ordering::Relaxed);
            tracing::warn!(rows = rows.len(), error = %why, "broker connection failed; rows given back without spending a retry");
        }
        crate::metrics::released(rows.len());
        let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
        again_on_conflict(|| store::release(&self.db, &ids, token)).await?;
        Ok(rows.len())
    }

    /// Settles the rows whose message no queue took, as `OUTBOX_UNROUTABLE` says: kept waiting
    /// (a pause of their own, no retry spent, `last_error` saying why), marked FAILED, or marked
    /// sent (dropped, as over STOMP).
    async fn unroutable(
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
        for (row, reply) in rows {
            crate::metrics::unroutable(&row.destination);
            let reason = unroutable_error(&row.destination, &reply);
            match self.config.unroutable {
                Unroutable::Retry => {
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
                    again_on_conflict(|| {
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
                    again_on_conflict(|| {
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
        again_on_conflict(|| store::mark_sent(&self.db, &dropped, token)).await?;
        Ok(report)
    }

    /// Gives back the rows the broker nacked (back-pressure), after a pause, charging nothing.
    async fn nacked(&self, rows: &[Row], token: Uuid) -> Result<usize, Error> {
        if rows.is_empty() {
            return Ok(0);
        }
        crate::metrics::nacked(rows.len());
        for row in rows {
            let age = (chrono::Utc::now() - row.added)
                .to_std()
                .unwrap_or_default();
            let pause = store::unroutable_pause(age, self.config.maximum_backoff);
            tracing::warn!(message_id = %row.id, destination = %row.destination, retry_in = ?pause, "the broker could not take the message now (basic.nack); given back without spending a retry");
            let ids = [row.id];
            again_on_conflict(|| store::release_after(&self.db, &ids, token, pause, None)).await?;
        }
        Ok(rows.len())
    }

    async fn refuse(&self, row: &Row, token: Uuid, reason: &str) -> Result<(), Error> {
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
        again_on_conflict(|| store::record_refusal(&self.db, row, token, &decision, reason))
            .await?;
        crate::metrics::refused(&row.destination, decision == store::Refusal::Failed);
        Ok(())
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

/// What a send on the shared connection settled, and the suspects it left for isolation.
#[derive(Default)]
struct Settled {
    report: RoundReport,
    suspects: Vec<Row>,
    /// Destinations of the rows receipted.
    proven: HashSet<String>,
}

/// The start of `last_error` for a row charged for being passed over (see [`passed_over`]).
const PASSED_OVER: &str = "not receipted while later messages on the connection were: ";

/// The `last_error` of a row the broker passed over silently.
/// The `last_error` of a row whose message no queue took: names the destination, and says
/// "no queue is bound to it" (which `outbox status` looks for).
pub(crate) fn unroutable_error(destination: &str, reply: &str) -> String {
    format!(
        "unroutable: the broker returned the message sent to `{destination}` ({reply}): {UNROUTABLE_MARK}; it waits for one without spending a retry"
    )
}

/// The words of an unroutable row's `last_error` that `outbox status` counts by.
pub(crate) const UNROUTABLE_MARK: &str = "no queue is bound to it";

fn passed_over(reason: &TransportError) -> String {
    format!("{PASSED_OVER}{reason}")
}

/// Whether the row was refused by the broker before: its later attempts go alone on the
/// isolation lane.
fn refused_before(row: &Row) -> bool {
    row.retry > 0 && !silently_failed_before(row)
}

/// Whether the row was charged for being passed over: it goes alone, alongside the batches, so
/// that later frames can show again whether the broker takes it.
fn silently_failed_before(row: &Row) -> bool {
    row.retry > 0
        && row
            .last_error
            .as_deref()
            .is_some_and(|error| error.starts_with(PASSED_OVER))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; a set of ids is still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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

/// The frame of a row: its stored headers, plus `persistent` and `content-type`, and the
/// generated `dop-*` headers a row written without them (by SQL, a trigger, another tool) lacks:
/// `dop-msg-id` is the row's id, so that consumers deduplicate it across resends and
/// redeliveries; the correlation id defaults to it too.
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
    let id = row.id.to_string();
    let generated = [
        (headers::MSG_ID, id.clone()),
        (headers::MSG_DESTINATION, row.destination.clone()),
        (headers::MSG_TYPE, headers::PUBLISHED_TYPE.to_owned()),
        (headers::MSG_SENT_TIME, headers::format_sent_time(row.added)),
        (headers::CORRELATION_ID, id),
        ("persistent", "true".to_owned()),
        ("content-type", "application/json".to_owned()),
    ];
    // The ordering key is the column's: a stored header of that name never contradicts it.
    headers.retain(|(name, _)| name != headers::ORDERING_KEY);
    if let Some(key) = &row.msg_key {
        headers.push((headers::ORDERING_KEY.to_owned(), key.clone()));
    }
    for (name, value) in generated {
        let present = headers
            .iter()
            .any(|(n, v)| n == name && !(v.is_empty() && name.starts_with("dop-")));
        if !present {
            headers.retain(|(n, _)| n != name);
            headers.push((name.to_owned(), value));
        }
    }
    Outgoing {
        destination: row.destination.clone(),
        headers,
        body: serde_json::to_vec(&row.body).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            status: crate::tables::published::Status::Schedule,
            claim_token: None,
            locked_until: None,
            next_attempt_at: None,
            last_error: None,
            msg_key: None,
            seq: None,
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

    #[test]
    fn a_row_written_without_generated_headers_goes_out_with_them() {
        let added = chrono::DateTime::parse_from_rfc3339("2026-11-26T18:03:13.484512+00:00")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let row = Row {
            id: Uuid::new_v4(),
            version: None,
            destination: "/topic/x".into(),
            body: serde_json::json!({}),
            headers: serde_json::json!({"x": "kept", "dop-msg-id": ""}),
            added,
            expires_at: added,
            retry: 0,
            status: crate::tables::published::Status::Schedule,
            claim_token: None,
            locked_until: None,
            next_attempt_at: None,
            last_error: None,
            msg_key: None,
            seq: None,
        };
        let out = outgoing(&row);
        let id = row.id.to_string();
        assert_eq!(out.header("dop-msg-id"), Some(id.as_str()));
        assert_eq!(out.header("dop-correlation-id"), Some(id.as_str()));
        assert_eq!(out.header("dop-msg-destination"), Some("/topic/x"));
        assert_eq!(out.header("dop-msg-type"), Some("Published"));
        assert_eq!(
            out.header("dop-msg-sent-time"),
            Some("2026-11-26T18:03:13.484Z")
        );
        assert_eq!(out.header("x"), Some("kept"));
        assert_eq!(
            out.headers
                .iter()
                .filter(|(n, _)| n == "dop-msg-id")
                .count(),
            1
        );
    }
}
