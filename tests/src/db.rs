//! A fresh database per test: a fresh, uniquely named database per test, on a real
//! PostgreSQL, MariaDB or SQLite, with the outbox's migrations applied.
//!
//! Server databases are named `outbox_t_<uuid>` and are created through an admin URL:
//! `OUTBOX_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`) and
//! `OUTBOX_TEST_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/test`). A server that does not
//! answer fails the test, naming the URL and the variable: a skipped test would pass unseen.
//! SQLite uses a file in the system temp dir, removed when the `TestDb` goes away, with a pool of
//! several connections (as a relay next to a request handler would have).
//!
//! A test that panics leaves its server database behind; `.ci/run` drops every `outbox_t_%`
//! database before it starts.

use std::path::PathBuf;
use std::time::Duration;

use sea_orm::sqlx::sqlite::SqliteJournalMode;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend};
use sea_orm_migration::MigratorTrait;
use uuid::Uuid;

const POSTGRES_URL_VAR: &str = "OUTBOX_TEST_POSTGRES_URL";
const POSTGRES_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";
const MYSQL_URL_VAR: &str = "OUTBOX_TEST_MYSQL_URL";
const MYSQL_URL_DEFAULT: &str = "mysql://root@127.0.0.1:3306/test";

/// Connections per pool: more than one everywhere, SQLite included, so that a test sees the
/// locking a real deployment sees.
const POOL_SIZE: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    MariaDb,
    Sqlite,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Postgres, Backend::MariaDb, Backend::Sqlite];

    /// SeaORM's name for this backend's SQL dialect.
    pub fn db_backend(self) -> DbBackend {
        match self {
            Backend::Postgres => DbBackend::Postgres,
            Backend::MariaDb => DbBackend::MySql,
            Backend::Sqlite => DbBackend::Sqlite,
        }
    }
}

/// The outbox's migrations alone, as a service's `Migrator` would run them.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn sea_orm_migration::MigrationTrait>> {
        outbox::migration::migrations()
    }
}

/// One test's own database.
pub struct TestDb {
    pub db: DatabaseConnection,
    /// Where the database is: hand it to anything that opens its own connection.
    pub url: String,
    pub backend: Backend,
    /// `outbox_t_<uuid>`: the server database's name, or the SQLite file's stem.
    name: String,
    /// The server's admin URL (`None` for SQLite).
    admin_url: Option<String>,
    /// The SQLite file, deleted when dropped.
    _file: Option<TempDbFile>,
}

impl TestDb {
    /// A fresh database with the outbox's migrations applied.
    pub async fn new(backend: Backend) -> TestDb {
        let test_db = TestDb::bare(backend).await;
        if let Err(e) = Migrator::up(&test_db.db, None).await {
            panic!(
                "applying the outbox migrations to {} failed: {e}",
                test_db.url
            );
        }
        test_db
    }

    /// A fresh, empty database.
    pub async fn bare(backend: Backend) -> TestDb {
        let name = format!("outbox_t_{}", Uuid::new_v4().simple());
        let (url, admin_url, file) = match backend {
            Backend::Postgres | Backend::MariaDb => {
                let (var, default) = admin_url_source(backend);
                let admin_url = std::env::var(var).unwrap_or_else(|_| default.to_owned());
                let admin = admin_connection(backend, &admin_url).await;
                let create = match backend {
                    Backend::Postgres => format!(r#"CREATE DATABASE "{name}""#),
                    _ => format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4"),
                };
                if let Err(e) = admin.execute_unprepared(&create).await {
                    panic!("creating test database {name} through {admin_url} failed: {e}");
                }
                let _ = admin.close().await;
                (with_database(&admin_url, &name), Some(admin_url), None)
            }
            Backend::Sqlite => {
                let file = TempDbFile(std::env::temp_dir().join(format!("{name}.db")));
                (
                    format!("sqlite://{}?mode=rwc", file.0.display()),
                    None,
                    Some(file),
                )
            }
        };
        let db = open_pool(backend, &url).await;
        TestDb {
            db,
            url,
            backend,
            name,
            admin_url,
            _file: file,
        }
    }

    /// Another pool on the same database, as a second relay or consumer would open.
    pub async fn connect(&self) -> DatabaseConnection {
        open_pool(self.backend, &self.url).await
    }

    /// Closes this pool and drops the database (PostgreSQL: ending every other session on it)
    /// or deletes the file.
    pub async fn drop_database(self) {
        let _ = self.db.close_by_ref().await;
        if let Some(admin_url) = &self.admin_url {
            let admin = admin_connection(self.backend, admin_url).await;
            let drop = match self.backend {
                Backend::Postgres => {
                    format!(r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#, self.name)
                }
                _ => format!("DROP DATABASE IF EXISTS `{}`", self.name),
            };
            if let Err(e) = admin.execute_unprepared(&drop).await {
                panic!(
                    "dropping test database {} through {admin_url} failed: {e}",
                    self.name
                );
            }
            let _ = admin.close().await;
        }
        // The SQLite file goes with `self.file`.
    }
}

/// A SQLite database file and its journal files, removed on drop (also when a test panics).
struct TempDbFile(PathBuf);

impl Drop for TempDbFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

fn admin_url_source(backend: Backend) -> (&'static str, &'static str) {
    match backend {
        Backend::Postgres => (POSTGRES_URL_VAR, POSTGRES_URL_DEFAULT),
        _ => (MYSQL_URL_VAR, MYSQL_URL_DEFAULT),
    }
}

async fn admin_connection(backend: Backend, admin_url: &str) -> DatabaseConnection {
    let mut options = ConnectOptions::new(admin_url);
    options
        .max_connections(1)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(10))
        .sqlx_logging(false);
    match Database::connect(options).await {
        Ok(db) => db,
        Err(e) => {
            let (var, _) = admin_url_source(backend);
            panic!(
                "{backend:?} test server at {admin_url} is not reachable ({e}); \
                 start it, or point {var} at one"
            )
        }
    }
}

async fn open_pool(backend: Backend, url: &str) -> DatabaseConnection {
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(POOL_SIZE)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(30))
        .sqlx_logging(false);
    if backend == Backend::Sqlite {
        // WAL lets readers go on while a relay holds the write lock; the busy timeout makes a
        // second writer wait for the lock instead of failing at once.
        options.map_sqlx_sqlite_opts(|o| {
            o.journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(10))
        });
    }
    match Database::connect(options).await {
        Ok(db) => db,
        Err(e) => panic!("connecting to test database {url} failed: {e}"),
    }
}

/// `admin_url` with its database (the URL's path) replaced by `database`.
fn with_database(admin_url: &str, database: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut url = format!("{}/{database}", &base[..path_start]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

/// Polls `check` until it holds, failing the test with `what` when `limit` passes first.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + limit;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many outbox rows have `status`.
pub async fn count_with_status(
    db: &DatabaseConnection,
    status: outbox::tables::published::Status,
) -> u64 {
    use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
    outbox::Published::find()
        .filter(outbox::tables::published::Column::Status.eq(status))
        .count(db)
        .await
        .expect("count outbox rows")
}

/// Runs each scenario, an `async fn(Backend)` of the test file, on every backend, as the tests
/// `postgres::<scenario>`, `mariadb::<scenario>` and `sqlite::<scenario>`.
#[macro_export]
macro_rules! on_every_backend {
    ($($scenario:ident),* $(,)?) => {
        mod postgres { $( #[tokio::test] async fn $scenario() { super::$scenario($crate::db::Backend::Postgres).await } )* }
        mod mariadb { $( #[tokio::test] async fn $scenario() { super::$scenario($crate::db::Backend::MariaDb).await } )* }
        mod sqlite { $( #[tokio::test] async fn $scenario() { super::$scenario($crate::db::Backend::Sqlite).await } )* }
    };
}
