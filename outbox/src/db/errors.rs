//! Database errors classified once for every caller: transient (it may go away by itself) and
//! conflict (another transaction made the database undo a statement, which can simply run again).

use std::future::Future;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
use std::ops::Deref;
use std::time::Duration;

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
use sea_orm::sqlx;
use sea_orm::{DbErr, RuntimeErr};
use uuid::Uuid;

use super::bounds::DbBounds;

/// How many times a relay statement runs again after a conflict ([`again_on_conflict`]).
const CONFLICT_RETRIES: u32 = 4;

/// Runs a statement within `bounds` (see [`DbBounds::call`]), and again (a few times, after a
/// short pause) when the database undid it for a conflict with another transaction (a
/// deadlock victim, a lock wait timeout; see `db_err_is_conflict`). Relays and writers share
/// the table's indexes, so MariaDB can pick a relay's claim or settle as a deadlock victim;
/// every such statement only touches rows that hold the claim's token, so running it again is
/// safe.
pub(crate) async fn again_on_conflict<T, F, Fut>(
    bounds: &DbBounds,
    mut statement: F,
) -> Result<T, DbErr>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbErr>>,
{
    let mut conflicts = 0;
    loop {
        match bounds.call(statement()).await {
            Err(err) if conflicts < CONFLICT_RETRIES && db_err_is_conflict(&err) => {
                conflicts += 1;
                let jitter = u64::from(Uuid::new_v4().as_u128() as u8 % 20);
                tracing::debug!(error = %redacted(&err), conflicts, "a statement met a conflict; running it again");
                tokio::time::sleep(Duration::from_millis((10 << conflicts) + jitter)).await;
            }
            other => return other,
        }
    }
}

/// `err` as a log line may show it: without the credentials of a URL it quotes.
pub(crate) fn redacted(err: &dyn std::fmt::Display) -> String {
    crate::config::redact_credentials(&err.to_string())
}

/// Whether a database error may go away by itself: a lost connection, a pool timeout, a
/// conflict with another transaction, the server restarting, a statement the server ended at
/// its statement timeout, a call the client abandoned without an answer ([`DbBounds`]).
pub(crate) fn db_err_is_transient(err: &DbErr) -> bool {
    match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(runtime) | DbErr::Query(runtime) => runtime_err_is_transient(runtime),
        _ => false,
    }
}

/// Whether the database refused a statement because of another transaction and undid it (a
/// deadlock victim, a serialization failure, a lock wait that timed out, SQLite busy): the
/// statement took no effect and can simply run again. A lost connection is not one: whether
/// its statement took effect is unknown.
pub(crate) fn db_err_is_conflict(err: &DbErr) -> bool {
    match err {
        #[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
        DbErr::Exec(RuntimeErr::SqlxError(err)) | DbErr::Query(RuntimeErr::SqlxError(err)) => {
            match err.deref() {
                sqlx::Error::Database(db) => database_error_is_conflict(db.deref()),
                _ => false,
            }
        }
        _ => false,
    }
}

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
fn database_error_is_conflict(err: &dyn sqlx::error::DatabaseError) -> bool {
    #[cfg(feature = "mysql")]
    if let Some(mysql) = err.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        // Deadlock, lock wait timeout.
        return matches!(mysql.number(), 1213 | 1205);
    }
    let code = err.code().unwrap_or_default();
    #[cfg(feature = "sqlite")]
    if err
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
    {
        // SQLITE_BUSY and SQLITE_LOCKED, with their extended codes (the low byte is the primary).
        return code
            .parse::<i32>()
            .is_ok_and(|code| matches!(code & 0xff, 5 | 6));
    }
    // PostgreSQL: serialization failure, deadlock, lock not available.
    matches!(code.as_ref(), "40001" | "40P01" | "55P03")
}

/// Whether the database refused a statement because the transaction it ran in had already
/// failed: PostgreSQL's `25P02` ("current transaction is aborted, commands ignored until end of
/// transaction block"). Once any statement of a PostgreSQL transaction fails, every later one
/// does, and its COMMIT rolls back (with no error: the command tag says `ROLLBACK`).
pub(crate) fn db_err_is_aborted_transaction(err: &DbErr) -> bool {
    match err {
        #[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
        DbErr::Exec(RuntimeErr::SqlxError(err)) | DbErr::Query(RuntimeErr::SqlxError(err)) => {
            match err.deref() {
                sqlx::Error::Database(db) => db.code().is_some_and(|code| code == "25P02"),
                _ => false,
            }
        }
        _ => false,
    }
}

pub(crate) fn runtime_err_is_transient(err: &RuntimeErr) -> bool {
    match err {
        #[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
        RuntimeErr::SqlxError(err) => sqlx_is_transient(err),
        _ => false,
    }
}

/// Whether `error` is a transient sqlx error (never, in a build without a database driver).
pub(crate) fn sqlx_error_is_transient(error: &(dyn std::error::Error + 'static)) -> bool {
    #[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
    if let Some(err) = error.downcast_ref::<sqlx::Error>() {
        return sqlx_is_transient(err);
    }
    let _ = error;
    false
}

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
fn sqlx_is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => database_error_is_transient(db.deref()),
        _ => false,
    }
}

/// PostgreSQL SQLSTATE classes and codes, MySQL/MariaDB error numbers, SQLite result codes: a
/// conflict ([`database_error_is_conflict`]), or the connection or the server going away.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
fn database_error_is_transient(err: &dyn sqlx::error::DatabaseError) -> bool {
    if database_error_is_conflict(err) {
        return true;
    }
    #[cfg(feature = "mysql")]
    if let Some(mysql) = err.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        // Too many connections, server shutdown, connection killed, server gone, connection
        // lost, the statement timeout (MariaDB max_statement_time, MySQL max_execution_time).
        return matches!(
            mysql.number(),
            1040 | 1053 | 1927 | 2006 | 2013 | 1969 | 3024
        );
    }
    // PostgreSQL: connection exceptions (08), too many connections, the server shutting down or
    // restarting (57P01-57P03), a statement cancelled (57014: its statement timeout), a session
    // ended for idling in a transaction (25P03).
    let code = err.code().unwrap_or_default();
    code.starts_with("08")
        || matches!(
            code.as_ref(),
            "53300" | "57P01" | "57P02" | "57P03" | "57014" | "25P03"
        )
}

/// Which of the database's own timeouts ended a statement, if one did: `statement` (its
/// statement timeout, or an idle transaction's), `lock` (a lock wait).
pub(crate) fn server_timeout(err: &DbErr) -> Option<&'static str> {
    match err {
        #[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
        DbErr::Exec(RuntimeErr::SqlxError(err))
        | DbErr::Query(RuntimeErr::SqlxError(err))
        | DbErr::Conn(RuntimeErr::SqlxError(err)) => match err.deref() {
            sqlx::Error::Database(db) => database_error_timeout(db.deref()),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
fn database_error_timeout(err: &dyn sqlx::error::DatabaseError) -> Option<&'static str> {
    #[cfg(feature = "mysql")]
    if let Some(mysql) = err.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return match mysql.number() {
            1969 | 3024 => Some("statement"),
            1205 => Some("lock"),
            _ => None,
        };
    }
    match err.code().unwrap_or_default().as_ref() {
        "57014" | "25P03" => Some("statement"),
        "55P03" => Some("lock"),
        _ => None,
    }
}
