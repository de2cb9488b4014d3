//! A scratch database per run, on the server `DATABASE_URL` names, with the outbox's tables and the
//! benchmark's own; dropped at the end.

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Schema};
use sea_orm_migration::MigratorTrait;

use crate::scenarios::{item, published_item};

/// Migrates the outbox's tables.
struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn sea_orm_migration::MigrationTrait>> {
        outbox::migration::migrations()
    }
}

/// A database that lives as long as a run.
pub struct Scratch {
    pub url: String,
    pub db: DatabaseConnection,
    admin: Option<(DatabaseConnection, String)>,
    file: Option<std::path::PathBuf>,
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Scratch {
    /// Creates the database, its tables, and a pool of `pool` connections on it.
    pub async fn create(server_url: &str, pool: u32) -> Result<Scratch, BoxError> {
        let scratch = Scratch::create_bare(server_url, pool).await?;
        let db = &scratch.db;
        Migrator::up(db, None).await?;
        let schema = Schema::new(db.get_database_backend());
        db.execute(&schema.create_table_from_entity(item::Entity))
            .await?;
        db.execute(&schema.create_table_from_entity(published_item::Entity))
            .await?;
        Ok(scratch)
    }

    /// Creates an empty database and a pool of `pool` connections on it.
    pub async fn create_bare(server_url: &str, pool: u32) -> Result<Scratch, BoxError> {
        let name = format!("outbox_bench_{}", uuid::Uuid::new_v4().simple());
        let (url, admin, file) = if server_url.starts_with("sqlite:") {
            let path = std::env::temp_dir().join(format!("{name}.db"));
            (
                format!("sqlite://{}?mode=rwc", path.display()),
                None,
                Some(path),
            )
        } else {
            let admin = Database::connect(server_url).await?;
            let quoted = match admin.get_database_backend() {
                DbBackend::Postgres => format!("\"{name}\""),
                _ => format!("`{name}`"),
            };
            admin
                .execute_unprepared(&format!("CREATE DATABASE {quoted}"))
                .await?;
            (
                with_database(server_url, &name),
                Some((admin, quoted)),
                None,
            )
        };
        let mut options = ConnectOptions::new(url.clone());
        options
            .max_connections(pool)
            .min_connections(1)
            .sqlx_logging(false);
        let db = Database::connect(options).await?;
        if db.get_database_backend() == DbBackend::Sqlite {
            db.execute_unprepared("PRAGMA journal_mode=WAL").await?;
        }
        Ok(Scratch {
            url,
            db,
            admin,
            file,
        })
    }

    /// The database's name (the last segment of its URL).
    pub fn name(&self) -> &str {
        self.url
            .rsplit('/')
            .next()
            .and_then(|last| last.split('?').next())
            .unwrap_or_default()
    }

    /// Another pool on the same database.
    pub async fn connect(&self, pool: u32) -> Result<DatabaseConnection, BoxError> {
        let mut options = ConnectOptions::new(self.url.clone());
        options
            .max_connections(pool)
            .min_connections(1)
            .sqlx_logging(false);
        Ok(Database::connect(options).await?)
    }

    /// Drops the database.
    pub async fn drop(self) {
        let _ = self.db.close().await;
        if let Some((admin, quoted)) = self.admin {
            let force = if admin.get_database_backend() == DbBackend::Postgres {
                " WITH (FORCE)"
            } else {
                ""
            };
            let _ = admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {quoted}{force}"))
                .await;
        }
        if let Some(path) = self.file {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
    }
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..path_start], name);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}
