//! Why processing a message failed, and whether trying again may succeed.
//!
//! Transient: what the database says about a moment rather than about the message (the connection
//! was lost, the pool had no connection free, a serialization failure, a deadlock, a lock wait
//! timed out, SQLite was busy), and errors a callback marked with [`Transient`]. Everything else
//! is the message's or the code's fault: trying again would fail again.

use std::any::Any;
use std::fmt;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
use std::ops::Deref;

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
use sea_orm::sqlx;
use sea_orm::{DbErr, RuntimeErr};

use crate::Transient;
use crate::payload::BoxError;

/// A failed attempt at processing a message.
pub(crate) enum Failure {
    /// The consumer's own statements failed: BEGIN, the inbox insert, COMMIT.
    Database(DbErr),
    /// The callback returned an error.
    Callback(BoxError),
    /// The callback panicked (the message of the panic).
    Panic(String),
    /// The callback's future ended while something still held its [`crate::Payload`], so the
    /// transaction could not be committed.
    PayloadKept,
    /// The callback ran past the callback timeout and was abandoned: transient, since a hang
    /// is more often a moment's (a remote service, a lock) than the message's.
    TimedOut(std::time::Duration),
}

impl Failure {
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Failure::Database(err) => db_err_is_transient(err),
            Failure::Callback(err) => error_is_transient(err.as_ref()),
            Failure::TimedOut(_) => true,
            Failure::Panic(_) | Failure::PayloadKept => false,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Errors of database drivers may quote a connection URL.
            Failure::Database(err) => write!(
                f,
                "database: {}",
                crate::redact_credentials(&err.to_string())
            ),
            Failure::Callback(err) => {
                // The causes too (the top error alone may say only "query failed"), less those
                // that an error's own message already repeats.
                let mut text = err.to_string();
                let mut source = err.source();
                while let Some(cause) = source {
                    let cause_text = cause.to_string();
                    if !text.ends_with(&cause_text) {
                        text = format!("{text}: {cause_text}");
                    }
                    source = cause.source();
                }
                write!(f, "callback error: {}", crate::redact_credentials(&text))
            }
            Failure::Panic(message) => write!(f, "callback panicked: {message}"),
            Failure::TimedOut(timeout) => write!(
                f,
                "the callback ran longer than the callback timeout ({timeout:?}, \
                 OUTBOX_CONSUMER_CALLBACK_TIMEOUT) and was abandoned"
            ),
            Failure::PayloadKept => f.write_str(
                "the callback's Payload outlived its future (moved into another task?), so its \
                 transaction could not be committed",
            ),
        }
    }
}

/// The text of a panic's payload.
pub(crate) fn panic_message(panic: Box<dyn Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(message) => *message,
        Err(panic) => match panic.downcast::<&'static str>() {
            Ok(message) => (*message).to_owned(),
            Err(_) => "a panic without a message".to_owned(),
        },
    }
}

/// Whether `error`, or an error of its `source()` chain, is transient.
fn error_is_transient(error: &(dyn std::error::Error + 'static)) -> bool {
    if Transient::is_marked(error) {
        return true;
    }
    let mut next = Some(error);
    while let Some(error) = next {
        let transient = if let Some(err) = error.downcast_ref::<DbErr>() {
            db_err_is_transient(err)
        } else if let Some(crate::Error::Database(err)) = error.downcast_ref::<crate::Error>() {
            db_err_is_transient(err)
        } else if let Some(err) = error.downcast_ref::<RuntimeErr>() {
            runtime_err_is_transient(err)
        } else {
            sqlx_error_is_transient(error)
        };
        if transient {
            return true;
        }
        next = error.source();
    }
    false
}

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

fn runtime_err_is_transient(err: &RuntimeErr) -> bool {
    match err {
        #[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
        RuntimeErr::SqlxError(err) => sqlx_is_transient(err),
        _ => false,
    }
}

/// Whether `error` is a transient sqlx error (never, in a build without a database driver).
fn sqlx_error_is_transient(error: &(dyn std::error::Error + 'static)) -> bool {
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
        // lost.
        return matches!(mysql.number(), 1040 | 1053 | 1927 | 2006 | 2013);
    }
    // PostgreSQL: connection exceptions (08), too many connections, the server shutting down or
    // restarting (57P01-57P03).
    let code = err.code().unwrap_or_default();
    code.starts_with("08") || matches!(code.as_ref(), "53300" | "57P01" | "57P02" | "57P03")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn boxed(err: impl std::error::Error + Send + Sync + 'static) -> BoxError {
        Box::new(err)
    }

    #[test]
    fn lost_connections_and_pool_timeouts_are_transient_and_the_rest_is_not() {
        let io = DbErr::Exec(RuntimeErr::SqlxError(Arc::new(sqlx::Error::Io(
            std::io::Error::other("reset"),
        ))));
        assert!(db_err_is_transient(&io));
        let timeout = DbErr::ConnectionAcquire(sea_orm::error::ConnAcquireErr::Timeout);
        assert!(db_err_is_transient(&timeout));
        assert!(!db_err_is_transient(&DbErr::RecordNotFound("x".into())));
        let not_found = DbErr::Query(RuntimeErr::SqlxError(Arc::new(sqlx::Error::RowNotFound)));
        assert!(!db_err_is_transient(&not_found));

        assert!(Failure::Callback(boxed(io.clone())).is_transient());
        assert!(Failure::Callback(boxed(crate::Error::Database(io.clone()))).is_transient());
        assert!(Failure::Callback(Box::new(Transient::new("busy"))).is_transient());
        assert!(!Failure::Callback("plain".into()).is_transient());
        assert!(!Failure::Panic("boom".into()).is_transient());
        assert!(Failure::Database(io).is_transient());
    }

    #[test]
    fn panics_and_callback_errors_explain_themselves() {
        let panic = std::panic::catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
        assert_eq!(panic_message(panic), "boom 1");
        let panic = std::panic::catch_unwind(|| std::panic::panic_any(7)).unwrap_err();
        assert_eq!(panic_message(panic), "a panic without a message");
        let failure = Failure::Callback(boxed(crate::Error::Database(DbErr::Custom("no".into()))));
        assert_eq!(
            failure.to_string(),
            "callback error: database error: Custom Error: no"
        );
    }
}
