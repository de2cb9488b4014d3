//! A bound on every database call: a connection that stops answering (a half-open socket, a
//! stalled network), a lock held by a transaction that never ends, or a statement that runs on
//! must not hang the relay, a consumer or their stop.
//!
//! Three layers, because no one of them covers every case:
//!
//! - **The client's deadline** ([`DbBounds::call`]): every call the relay, the consumer and
//!   retention make is abandoned when no answer came within the statement timeout and
//!   [`ANSWER_MARGIN`]. Only this covers a connection that stopped answering: the server's own
//!   timeouts cannot reach a client that hears nothing. (sqlx opens the database socket itself
//!   and sets no TCP keepalive, and neither sqlx nor SeaORM lets a caller set one, so a dead
//!   peer is noticed here, not by the kernel.) The abandoned connection goes back to the pool,
//!   which tests it on a task of its own before reuse.
//! - **The connection's settings** ([`OutboxConfig::database_options`]): on a pool made with
//!   them (the `outbox` command's), the server ends any statement past the statement timeout,
//!   any lock wait past the lock timeout, and a session left idle in a transaction, so that an
//!   abandoned statement frees its connection and its locks by itself. They are set when each
//!   connection opens (PostgreSQL's startup options: no round trip), never on a pool the outbox
//!   is handed, which the service's own statements share.
//! - **The consumer's transactions** ([`DbBounds::begin_consumer`],
//!   [`DbBounds::bound_inbox_insert`]): on a pool the consumer is handed, its transactions
//!   carry their own bounds (PostgreSQL `SET LOCAL`, which ends with the transaction; MariaDB
//!   `SET STATEMENT ... FOR` on the inbox insert), so that a redelivered copy never waits for
//!   good behind the uncommitted inbox row of a consumer that stopped answering.
//!
//! Every timeout is a transient failure: the relay gives its rows back uncharged and tries
//! again after a pause, a consumer tries the message again. Each is counted
//! (`outbox_database_timeouts_total`).

use std::future::Future;
use std::time::Duration;

use sea_orm::{
    ConnectOptions, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    RuntimeErr, Statement, TransactionTrait,
};

use super::errors::{redacted, server_timeout};
use crate::config::OutboxConfig;

/// How long after the statement timeout the client still waits for an answer: the server's
/// own timeout fires first, and its error needs a round trip to arrive.
pub(crate) const ANSWER_MARGIN: Duration = Duration::from_secs(1);

/// The bounds of one relay's or consumer's database calls (`OUTBOX_DB_STATEMENT_TIMEOUT`,
/// `OUTBOX_DB_LOCK_TIMEOUT`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DbBounds {
    statement: Duration,
    lock: Duration,
}

impl DbBounds {
    pub(crate) fn new(config: &OutboxConfig) -> DbBounds {
        DbBounds {
            statement: config.db_statement_timeout,
            lock: config.db_lock_timeout,
        }
    }

    /// How long a call may go without an answer before the client abandons it.
    pub(crate) fn deadline(&self) -> Duration {
        self.statement + ANSWER_MARGIN
    }

    /// Runs one database call for at most [`DbBounds::deadline`]. Past it the call is
    /// abandoned (its connection goes back to the pool, which tests it before reuse) and fails
    /// as a lost connection: transient. Timeouts, the client's and the server's, are counted.
    pub(crate) async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, DbErr>>,
    ) -> Result<T, DbErr> {
        match tokio::time::timeout(self.deadline(), call).await {
            Ok(Err(err)) => {
                if let Some(kind) = server_timeout(&err) {
                    crate::metrics::database_timeout(kind);
                    tracing::debug!(kind, error = %redacted(&err), "the database ended a statement at its timeout");
                }
                Err(err)
            }
            Ok(done) => done,
            Err(_) => {
                crate::metrics::database_timeout("no_answer");
                tracing::debug!(deadline = ?self.deadline(), "the database did not answer in time; the call is abandoned");
                Err(no_answer(self.deadline()))
            }
        }
    }

    /// Begins a consumer's transaction, within the client's deadline, and on PostgreSQL bounds
    /// it for its life (`SET LOCAL`, one round trip): each lock wait to the lock timeout, each
    /// statement (the callback's too) to the longer of the statement timeout and the callback
    /// timeout (the callback is abandoned at the latter anyway), an idle stretch to the
    /// callback timeout and the statement timeout (past it the consumer that holds it has
    /// stopped answering: the server ends the session, and the inbox row it holds is free).
    pub(crate) async fn begin_consumer(
        &self,
        db: &DatabaseConnection,
        callback_timeout: Duration,
    ) -> Result<DatabaseTransaction, DbErr> {
        let txn = self.call(db.begin()).await?;
        if txn.get_database_backend() == DbBackend::Postgres {
            let set = format!(
                "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}; \
                 SET LOCAL idle_in_transaction_session_timeout = {}",
                millis(self.lock),
                millis(self.statement.max(callback_timeout)),
                millis(callback_timeout + self.statement),
            );
            self.call(txn.execute_unprepared(&set)).await?;
        }
        Ok(txn)
    }

    /// The inbox insert with its bounds on MariaDB: the lock wait behind another transaction's
    /// row of the same key and the statement itself, for this statement alone. In a
    /// MariaDB-only comment, which MySQL reads as a comment (it has no `SET STATEMENT`); on
    /// PostgreSQL the transaction carries the bounds ([`DbBounds::begin_consumer`]).
    pub(crate) fn bound_inbox_insert(&self, mut insert: Statement) -> Statement {
        if insert.db_backend == DbBackend::MySql {
            insert.sql = format!(
                "/*M! SET STATEMENT innodb_lock_wait_timeout = {}, max_statement_time = {} FOR */ {}",
                whole_seconds(self.lock),
                seconds(self.statement),
                insert.sql
            );
        }
        insert
    }
}

/// The error of a call abandoned without an answer: a connection error, so transient
/// everywhere it is classified.
fn no_answer(deadline: Duration) -> DbErr {
    DbErr::Conn(RuntimeErr::Internal(format!(
        "no answer from the database within {deadline:?} (OUTBOX_DB_STATEMENT_TIMEOUT and {}s); \
         the call was abandoned",
        ANSWER_MARGIN.as_secs()
    )))
}

fn millis(duration: Duration) -> u128 {
    duration.as_millis().max(1)
}

/// Seconds with a fraction, as MariaDB's `max_statement_time` takes them.
fn seconds(duration: Duration) -> String {
    format!("{:.3}", duration.as_secs_f64())
}

/// Whole seconds, rounded up, at least 1, as `innodb_lock_wait_timeout` takes them.
fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs_f64().ceil().max(1.0) as u64
}

impl OutboxConfig {
    /// Connect options for a database pool whose every statement the server bounds:
    /// `db_statement_timeout` and `db_lock_timeout`, and a session left idle in a transaction
    /// for as long as the statement timeout is ended (its locks freed). PostgreSQL: the
    /// connection's startup options `statement_timeout`, `lock_timeout` and
    /// `idle_in_transaction_session_timeout` (no round trip). MariaDB: `max_statement_time`,
    /// `innodb_lock_wait_timeout` (whole seconds, rounded up) and `idle_transaction_timeout`,
    /// set as each connection opens (MySQL takes the lock wait alone). SQLite: nothing (no
    /// network; sqlx's busy timeout bounds its lock waits).
    ///
    /// The `outbox` command connects with these. Use them for a pool you hand the relay or a
    /// consumer alone; the relay, the consumer and retention bound their calls on the client's
    /// side whatever the pool, but only the server can end a statement it runs, and free its
    /// connection and locks. Every statement on the pool gets these bounds, a consumer
    /// callback's included (in a consumer's transaction the callback timeout bounds a
    /// statement when it is longer). The options keep the rest of SeaORM's: set the pool's
    /// size and timeouts on them; do not replace their `map_sqlx_postgres_opts` or
    /// `map_sqlx_mysql_pool_opts`, which carry the bounds.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), outbox::Error> {
    /// let config = outbox::OutboxConfig::from_env()?;
    /// let mut options = config.database_options(std::env::var("DATABASE_URL").unwrap());
    /// options.max_connections(5);
    /// let db = sea_orm::Database::connect(options).await?;
    /// let relay = outbox::Producer::builder(db).config(config).build()?;
    /// relay.run_until(outbox::shutdown::signal()).await?;
    /// # Ok(()) }
    /// ```
    pub fn database_options(&self, url: impl Into<String>) -> ConnectOptions {
        #[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(unused_mut))]
        let mut options = ConnectOptions::new(url);
        let (statement, lock) = (self.db_statement_timeout, self.db_lock_timeout);
        #[cfg(feature = "postgres")]
        options.map_sqlx_postgres_opts(move |pg| {
            pg.options([
                ("statement_timeout", millis(statement).to_string()),
                ("lock_timeout", millis(lock).to_string()),
                (
                    "idle_in_transaction_session_timeout",
                    millis(statement).to_string(),
                ),
            ])
        });
        #[cfg(feature = "mysql")]
        {
            // MariaDB's own variables in a MariaDB-only comment: MySQL has none of them.
            let set = format!(
                "SET SESSION innodb_lock_wait_timeout = {} /*M! , max_statement_time = {}, \
                 idle_transaction_timeout = {} */",
                whole_seconds(lock),
                seconds(statement),
                whole_seconds(statement),
            );
            options.map_sqlx_mysql_pool_opts(move |pool| {
                let set = set.clone();
                pool.after_connect(move |connection, _| {
                    let set = set.clone();
                    Box::pin(async move {
                        sea_orm::sqlx::Executor::execute(
                            connection,
                            sea_orm::sqlx::AssertSqlSafe(set),
                        )
                        .await
                        .map(|_| ())
                    })
                })
            });
        }
        let _ = (statement, lock);
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_as_each_server_takes_them() {
        assert_eq!(millis(Duration::from_millis(2500)), 2500);
        assert_eq!(millis(Duration::from_micros(10)), 1);
        assert_eq!(seconds(Duration::from_millis(2500)), "2.500");
        assert_eq!(whole_seconds(Duration::from_millis(100)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(2100)), 3);
        assert_eq!(whole_seconds(Duration::from_secs(10)), 10);
    }

    #[tokio::test]
    async fn a_call_without_an_answer_is_abandoned_as_transient_after_the_deadline() {
        let config = OutboxConfig {
            db_statement_timeout: Duration::from_millis(100),
            db_lock_timeout: Duration::from_millis(100),
            ..OutboxConfig::default()
        };
        let bounds = DbBounds::new(&config);
        let started = std::time::Instant::now();
        let err = bounds
            .call(std::future::pending::<Result<(), DbErr>>())
            .await
            .unwrap_err();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(1100) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert!(crate::db::errors::db_err_is_transient(&err), "{err}");
        assert!(
            err.to_string().contains("OUTBOX_DB_STATEMENT_TIMEOUT"),
            "{err}"
        );
    }
}
