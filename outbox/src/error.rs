//! The errors of the outbox, each with the context an operator needs to act on it.

use sea_orm::DbErr;

/// An error of the outbox library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A publishing save on a connection that is not a transaction: the outbox rows could be
    /// written without the entity, or the entity without them. Refused before anything is written.
    #[error(
        "refusing to publish `{entity}` outside a transaction (connection type `{connection}`): \
         save it with `outbox::save(&db, model)` or inside `outbox::transaction(&db, ..)`, pass a \
         `DatabaseTransaction`, or add `allow_autocommit` to its `#[publish]` attribute"
    )]
    NotInTransaction {
        /// The entity (module path of its `Model`).
        entity: &'static str,
        /// The connection type the save was given.
        connection: &'static str,
    },

    /// A delete of a publishing entity whose active model does not hold its primary key, which the
    /// message body of a delete is made of.
    #[error(
        "cannot publish the delete of `{entity}`: its active model does not hold the primary key"
    )]
    MissingKey {
        /// The entity (module path of its `Model`).
        entity: &'static str,
    },

    /// A message with an ordering key written on PostgreSQL, MariaDB or MySQL on an autocommit
    /// connection: the lock that keeps the key's writers in commit order lasts only as long as a
    /// transaction. Refused before anything is written.
    #[error(
        "refusing to write a keyed outbox message outside a transaction (connection type \
         `{connection}`): the writers of one key are serialised by a transaction-scoped lock; \
         write it inside `outbox::transaction(&db, ..)` or on a `DatabaseTransaction`"
    )]
    KeyedOutsideTransaction {
        /// The connection type the message was written on.
        connection: &'static str,
    },

    /// A message body could not be encoded as JSON.
    #[error("cannot encode the message body of `{entity}` for `{destination}`: {source}")]
    Serialize {
        /// The entity, or `enqueue` for an explicit row.
        entity: &'static str,
        /// The destination of the message (with its version suffix).
        destination: String,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },

    /// A destination or version that the outbox table cannot hold.
    #[error("invalid destination `{destination}` for `{entity}`: {reason}")]
    InvalidDestination {
        /// The entity, or `enqueue` for an explicit row.
        entity: &'static str,
        /// The destination as given (with its version suffix).
        destination: String,
        /// Why it is refused.
        reason: &'static str,
    },

    /// A setting that is missing, malformed or out of range.
    #[error("invalid setting {variable}={value:?}: {reason}")]
    Config {
        /// The environment variable (or field) of the setting.
        variable: String,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: String,
    },

    /// The broker could not be reached, or refused a frame.
    #[error("broker error: {0}")]
    Transport(#[from] crate::transport::TransportError),

    /// A background task of the library ended abnormally (it panicked or was cancelled).
    #[error("outbox task stopped: {0}")]
    Stopped(String),

    /// The database refused an operation. Shown without credentials: a driver's error may
    /// quote the connection URL ([`crate::config::redact_credentials`]).
    #[error("database error: {}", crate::config::redact_credentials(&.0.to_string()))]
    Database(#[source] DbErr),

    /// A consumed message's body is not the JSON a callback asked for ([`crate::consumer::Payload::json`]).
    #[error("the body of message {message_id:?} from queue `{queue}` does not decode: {source}")]
    InvalidBody {
        /// The consumer's queue.
        queue: String,
        /// The message's idempotency key, if it has one.
        message_id: Option<String>,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
}

impl From<DbErr> for Error {
    /// Recovers the typed error behind a `DbErr` that the write hooks raised (SeaORM's hooks can
    /// only return `DbErr`), or wraps any other database error.
    fn from(err: DbErr) -> Self {
        crate::write::take_hook_error(&err).unwrap_or(Error::Database(err))
    }
}

/// The result type of the outbox.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_error_shows_no_password_of_the_url_it_quotes() {
        let err = Error::Database(DbErr::Conn(sea_orm::RuntimeErr::Internal(
            "cannot connect to postgres://app:Qx7-user@db/app?password=Qx7-query&sslmode=require"
                .into(),
        )));
        let shown = err.to_string();
        assert!(!shown.contains("Qx7"), "{shown}");
        assert!(shown.contains("postgres://app:***@db/app?password=***&sslmode=require"));
    }
}
