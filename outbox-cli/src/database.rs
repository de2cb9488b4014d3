//! Connecting to the database a command works on.

use std::time::Duration;

use outbox::OutboxConfig;
use sea_orm::DatabaseConnection;

use crate::failure::Failure;

/// Connections an operation command needs: it runs one statement at a time.
pub(crate) const OPERATION_POOL: u32 = 2;

/// Connects to the database, with at most `pool` connections (default: SeaORM's, for the
/// relay), each with the statement and lock timeouts of `config` (`OUTBOX_DB_*`: the server
/// ends a statement past them, see [`OutboxConfig::database_options`]). A malformed URL is a
/// usage error, an unreachable server an operational one.
pub(crate) async fn connect(
    url: Option<String>,
    pool: Option<u32>,
    config: &OutboxConfig,
) -> Result<DatabaseConnection, Failure> {
    let Some(url) = url else {
        return Err(Failure::Usage(
            "DATABASE_URL is not set (or pass --database-url)".into(),
        ));
    };
    let mut options = config.database_options(url);
    options
        .connect_timeout(Duration::from_secs(10))
        .sqlx_logging(false);
    if let Some(pool) = pool {
        options.max_connections(pool);
    }
    sea_orm::Database::connect(options).await.map_err(|err| {
        let message = format!("cannot connect to the database: {err}");
        if is_configuration(&err) {
            Failure::Usage(message)
        } else {
            Failure::Operation(message)
        }
    })
}

/// Whether connecting failed on the URL itself (its form or its options), not the server.
fn is_configuration(err: &sea_orm::DbErr) -> bool {
    use sea_orm::{DbErr, RuntimeErr, sqlx};
    match err {
        DbErr::Conn(RuntimeErr::SqlxError(err)) => {
            matches!(err.as_ref(), sqlx::Error::Configuration(_))
        }
        DbErr::Conn(RuntimeErr::Internal(_)) => true,
        _ => false,
    }
}
