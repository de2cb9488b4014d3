//! Opening the service's database, with its schema up to date.

use std::time::Duration;

use orders_migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::SqliteJournalMode;
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};

/// Connects to `url` (PostgreSQL, MariaDB/MySQL or SQLite) and applies the migrations not yet
/// applied: the outbox's tables, then the service's (see the `orders-migration` crate).
///
/// Migrating at start keeps the example free of setup steps; a deployed service usually runs
/// `orders-migration up` as a step of its own instead.
pub async fn open(url: &str) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url);
    options.max_connections(5).sqlx_logging(false);
    if url.starts_with("sqlite:") {
        // The relay, the consumer and the use cases write at the same time: WAL lets readers go
        // on while one of them writes, and the busy timeout makes a writer wait for the lock
        // instead of failing at once.
        options.map_sqlx_sqlite_opts(|sqlite| {
            sqlite
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(10))
        });
    }
    let db = Database::connect(options).await?;
    Migrator::up(&db, None).await?;
    Ok(db)
}
