//! Why processing a message failed, and whether trying again may succeed.
//!
//! Transient: what the database says about a moment rather than about the message (the connection
//! was lost, the pool had no connection free, a serialization failure, a deadlock, a lock wait
//! timed out, SQLite was busy), and errors a callback marked with [`Transient`]. Everything else
//! is the message's or the code's fault: trying again would fail again.

use std::any::Any;
use std::fmt;

use sea_orm::{DbErr, RuntimeErr};

use crate::consumer::Transient;
use crate::consumer::payload::BoxError;
use crate::db::errors::{db_err_is_transient, runtime_err_is_transient, sqlx_error_is_transient};

/// A failed attempt at processing a message.
pub(crate) enum Failure {
    /// The consumer's own statements failed: BEGIN, the inbox insert, COMMIT.
    Database(DbErr),
    /// The callback returned an error.
    Callback(BoxError),
    /// The callback panicked (the message of the panic).
    Panic(String),
    /// The callback's future ended while something still held its [`crate::consumer::Payload`], so the
    /// transaction could not be committed.
    PayloadKept,
    /// The callback ran past the callback timeout and was abandoned: transient, since a hang
    /// is more often a moment's (a remote service, a lock) than the message's.
    TimedOut(std::time::Duration),
    /// The callback returned `Ok`, but its transaction could no longer commit: a statement in
    /// it had failed and the error was not returned (PostgreSQL then aborts the whole
    /// transaction), or the database had rolled it back (a MariaDB deadlock victim). The text
    /// says which. Transient: a deadlock is a moment's; a statement that fails every time fails
    /// every retry and the message is dead-lettered.
    DeadTransaction(&'static str),
}

impl Failure {
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Failure::Database(err) => db_err_is_transient(err),
            Failure::Callback(err) => error_is_transient(err.as_ref()),
            Failure::TimedOut(_) | Failure::DeadTransaction(_) => true,
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
                crate::config::redact_credentials(&err.to_string())
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
                write!(
                    f,
                    "callback error: {}",
                    crate::config::redact_credentials(&text)
                )
            }
            Failure::Panic(message) => write!(f, "callback panicked: {message}"),
            Failure::TimedOut(timeout) => write!(
                f,
                "the callback ran longer than the callback timeout ({timeout:?}, \
                 OUTBOX_CONSUMER_CALLBACK_TIMEOUT) and was abandoned"
            ),
            Failure::DeadTransaction(how) => write!(
                f,
                "the callback returned Ok, but its transaction could not commit: {how}; nothing \
                 it wrote was committed (return the database error from the callback instead \
                 of ignoring it, or run the statement that may fail in a savepoint of its own)"
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
        } else if let Some(crate::error::Error::Database(err)) =
            error.downcast_ref::<crate::error::Error>()
        {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sea_orm::sqlx;

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
        assert!(Failure::Callback(boxed(crate::error::Error::Database(io.clone()))).is_transient());
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
        let failure = Failure::Callback(boxed(crate::error::Error::Database(DbErr::Custom(
            "no".into(),
        ))));
        assert_eq!(
            failure.to_string(),
            "callback error: database error: Custom Error: no"
        );
    }
}
