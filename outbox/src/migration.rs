//! The outbox's own tables, as SeaORM migrations that a service runs next to its own.
//!
//! The library owns three tables: `published` (the outbox: one row per event waiting to be, or
//! already, relayed to the broker), `received` (the inbox: one row per consumed message, unique per
//! queue and message id, so a redelivered message is processed once) and `outbox_housekeeping` (one
//! row per periodic cleanup task, through which relays agree on who runs it next). On PostgreSQL
//! an insert into `published` also fires a `NOTIFY outbox_published` at commit while a relay has
//! announced itself idle (in `outbox_idle_relay`), so idle relays wake at once instead of waiting
//! for their next poll, and busy periods queue no notification.
//!
//! [`migrations()`] lists the library's migrations in order; a service's `Migrator` starts its own
//! list with them. Migration status is tracked by name, so each name here is namespaced with
//! `outbox_` (it cannot collide with a service's `m2026…` files) and is never changed.
//!
//! The schema is written once with sea-query's builders and rendered per backend; where backends
//! differ it branches on [`SchemaManager::get_database_backend`]:
//!
//! | column kind | PostgreSQL                 | MariaDB / MySQL | SQLite                         |
//! |-------------|----------------------------|-----------------|--------------------------------|
//! | uuid        | `uuid`                     | `binary(16)`    | `uuid_text`                    |
//! | json        | `jsonb`                    | `json`          | `json_text`                    |
//! | timestamp   | `timestamp with time zone` | `DATETIME(6)`   | `timestamp_with_timezone_text` |
//!
//! MariaDB's `TIMESTAMP`, which sea-query would otherwise choose, ends in 2038.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

/// The library's migrations, oldest first.
///
/// A service puts these at the head of its own `Migrator`'s list. Build the list outside any
/// `vec![...]`: `sea-orm-cli migrate generate` rewrites the file's `vec![...]` from the local
/// `mod m…;` declarations alone, and would silently drop a library migration listed inside it.
/// Keeping the service's own migrations in a `vec![...]` that ends a function at the bottom of
/// the file lets `generate` go on appending new ones there.
///
/// ```
/// # mod m20220101_000001_create_orders {
/// #     use sea_orm_migration::prelude::*;
/// #     #[derive(DeriveMigrationName)]
/// #     pub struct Migration;
/// #     #[async_trait::async_trait]
/// #     impl MigrationTrait for Migration {
/// #         async fn up(&self, _: &SchemaManager) -> Result<(), DbErr> { Ok(()) }
/// #     }
/// # }
/// use sea_orm_migration::prelude::*;
///
/// pub struct Migrator;
///
/// #[async_trait::async_trait]
/// impl MigratorTrait for Migrator {
///     fn migrations() -> Vec<Box<dyn MigrationTrait>> {
///         let mut migrations = outbox::migration::migrations();
///         migrations.extend(own_migrations());
///         migrations
///     }
/// }
///
/// // `sea-orm-cli migrate generate` appends here. Keep this function last in the file.
/// fn own_migrations() -> Vec<Box<dyn MigrationTrait>> {
///     vec![
///         Box::new(m20220101_000001_create_orders::Migration),
///     ]
/// }
/// # assert_eq!(Migrator::migrations()[0].name(), "outbox_m20261126_000001_create_outbox_tables");
/// ```
pub fn migrations() -> Vec<Box<dyn MigrationTrait>> {
    // `AdoptDjangoTables` does nothing after `CreateOutboxTables`; it is listed so that a database
    // adopted with `adopt_django()` knows it, and later migrations go after it.
    vec![
        Box::new(CreateOutboxTables),
        Box::new(AdoptDjangoTables),
        Box::new(AddMessageKeys),
        Box::new(NotifyIdleRelaysOnly),
        Box::new(AddKeyLocks),
    ]
}

/// The migrations that adopt a PostgreSQL database whose `published` and `received` tables
/// django-outbox-pattern created, so that the outbox's relay and consumer work on it while the
/// Django application goes on writing, unchanged.
///
/// Run them once, with a `Migrator` of their own, before the service's usual one:
///
/// ```ignore
/// struct Adopt;
/// impl MigratorTrait for Adopt {
///     fn migrations() -> Vec<Box<dyn MigrationTrait>> {
///         outbox::migration::adopt_django()
///     }
/// }
/// Adopt::up(&db, None).await?;    // adds the outbox's columns, indexes and tables
/// Migrator::up(&db, None).await?; // the usual list: applies only what is newer
/// ```
///
/// A list of its own, because SeaORM decides which migrations are pending before it runs the
/// first: in [`migrations()`], where it is listed too (doing nothing there, after the tables are
/// created), it could not keep the table-creating migration from running on Django's tables.
/// See [`AdoptDjangoTables`] for what it changes.
pub fn adopt_django() -> Vec<Box<dyn MigrationTrait>> {
    vec![
        Box::new(AdoptDjangoTables),
        Box::new(NotifyIdleRelaysOnly),
        Box::new(AddKeyLocks),
    ]
}

/// Adopts django-outbox-pattern's tables on PostgreSQL. Recorded as
/// `outbox_m20261201_000001_adopt_django_tables`.
///
/// Adds to `published` the relay's nullable columns (`claim_token`, `locked_until`,
/// `next_attempt_at`, `last_error`: NULL is what a fresh row has, so Django's inserts leave them
/// valid) and its indexes; to `received` a `queue` column (`DEFAULT ''` for Django's inserts) and
/// the outbox's `UNIQUE(queue, msg_id)`; creates `outbox_housekeeping` and the
/// `outbox_published` notification trigger. Django's columns, constraints and indexes stay as they
/// are, Django's `UNIQUE(msg_id)` included: on an adopted database a message id is processed once
/// per database, as Django does it, not once per queue. It then records
/// `outbox_m20261126_000001_create_outbox_tables` as applied in `seaql_migrations` (SeaORM's
/// default migration table), so that [`migrations()`] applies only what came after it. It also
/// adds per-key ordering's `msg_key`, `seq` and index as [`AddMessageKeys`] does (Django's inserts
/// name their columns: `msg_key` stays NULL, `seq` takes its default) and records that migration
/// too; a database adopted before it existed gets them from [`AddMessageKeys`] at its next
/// `migrate up`. A database with the outbox's own tables is left as it is.
///
/// Refused, with an error saying why: on MariaDB, MySQL and SQLite (Django stores UUIDs there as
/// 32 hexadecimal characters, which the outbox's entities do not read); on a database without
/// Django's tables; on tables that already have the outbox's columns.
pub struct AdoptDjangoTables;

impl MigrationName for AdoptDjangoTables {
    fn name(&self) -> &str {
        "outbox_m20261201_000001_adopt_django_tables"
    }
}

const ADOPT_PUBLISHED: &str = "ALTER TABLE published \
    ADD COLUMN claim_token uuid NULL, \
    ADD COLUMN locked_until timestamp with time zone NULL, \
    ADD COLUMN next_attempt_at timestamp with time zone NULL, \
    ADD COLUMN last_error text NULL";
const ADOPT_PUBLISHED_INDEXES: [&str; 2] = [
    "CREATE INDEX published_status_added_idx ON published (status, added)",
    "CREATE INDEX published_added_idx ON published (added)",
];
const ADOPT_RECEIVED: [&str; 3] = [
    "ALTER TABLE received ADD COLUMN queue varchar(255) NOT NULL DEFAULT ''",
    "CREATE UNIQUE INDEX received_queue_msg_id_key ON received (queue, msg_id)",
    "CREATE INDEX received_added_idx ON received (added)",
];
/// What `up` (and [`AddMessageKeys`] after it) added, taken back (see `down`).
const UNDO_ADOPTION: [&str; 13] = [
    "DELETE FROM seaql_migrations WHERE version LIKE 'outbox\\_%'",
    "DROP INDEX IF EXISTS published_key_unsent_idx",
    "ALTER TABLE published DROP COLUMN IF EXISTS msg_key, DROP COLUMN IF EXISTS seq",
    "DROP SEQUENCE IF EXISTS published_seq",
    DROP_NOTIFY_TRIGGER,
    DROP_NOTIFY_FUNCTION,
    "DROP TABLE IF EXISTS outbox_housekeeping",
    "DROP INDEX IF EXISTS received_added_idx",
    "DROP INDEX IF EXISTS received_queue_msg_id_key",
    "ALTER TABLE received DROP COLUMN IF EXISTS queue",
    "DROP INDEX IF EXISTS published_added_idx",
    "DROP INDEX IF EXISTS published_status_added_idx",
    "ALTER TABLE published DROP COLUMN claim_token, DROP COLUMN locked_until, \
     DROP COLUMN next_attempt_at, DROP COLUMN last_error",
];
const RECORD_CREATE: &str = "INSERT INTO seaql_migrations (version, applied_at) \
    VALUES ('outbox_m20261126_000001_create_outbox_tables', CAST(EXTRACT(EPOCH FROM now()) AS bigint)) \
    ON CONFLICT (version) DO NOTHING";

const RECORD_KEYS: &str = "INSERT INTO seaql_migrations (version, applied_at) \
    VALUES ('outbox_m20261201_000002_add_message_keys', CAST(EXTRACT(EPOCH FROM now()) AS bigint)) \
    ON CONFLICT (version) DO NOTHING";

#[async_trait::async_trait]
impl MigrationTrait for AdoptDjangoTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        // The outbox's own tables (in `migrations()`, after the migration that created them):
        // nothing to adopt.
        if manager.has_table("published").await?
            && manager.has_column("published", "claim_token").await?
        {
            return Ok(());
        }
        let django_tables =
            manager.has_table("published").await? && manager.has_table("received").await?;
        if backend != DbBackend::Postgres {
            return Err(DbErr::Migration(format!(
                "{}: adopting django-outbox-pattern's tables is supported on PostgreSQL only: \
                 on MariaDB, MySQL and SQLite Django stores UUIDs as 32 hexadecimal characters, \
                 which the outbox's entities do not read",
                self.name()
            )));
        }
        if !django_tables {
            return Err(DbErr::Migration(format!(
                "{}: no `published` and `received` tables to adopt; a database without \
                 django-outbox-pattern's tables needs only outbox::migration::migrations()",
                self.name()
            )));
        }
        if manager.has_column("received", "queue").await? {
            return Err(DbErr::Migration(format!(
                "{}: `received` already has the outbox's `queue` column: these are not \
                 django-outbox-pattern's tables as it leaves them",
                self.name()
            )));
        }
        let db = manager.get_connection();
        db.execute_unprepared(ADOPT_PUBLISHED).await?;
        for statement in ADOPT_PUBLISHED_INDEXES.into_iter().chain(ADOPT_RECEIVED) {
            db.execute_unprepared(statement).await?;
        }
        let types = ColumnTypes::for_backend(backend);
        manager.create_table(housekeeping_table(&types)).await?;
        db.execute_unprepared(CREATE_NOTIFY_FUNCTION).await?;
        db.execute_unprepared(CREATE_NOTIFY_TRIGGER).await?;
        // Per-key ordering's columns and index, as `AddMessageKeys` adds them.
        for statement in KEYS_POSTGRES_UP {
            db.execute_unprepared(statement).await?;
        }
        db.execute_unprepared(RECORD_CREATE).await?;
        db.execute_unprepared(RECORD_KEYS).await?;
        Ok(())
    }

    /// On the outbox's own tables, nothing (`up` did nothing there either). On an adopted
    /// database, refuses: SeaORM would go on to the table-creating migration's `down`, which drops
    /// `published` and `received`, and those are Django's tables. The error says how to take the
    /// adoption back by hand.
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        refuse_down_if_adopted(manager, self.name()).await
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

/// Refuses to migrate an adopted django-outbox-pattern database down (PostgreSQL with Django's
/// `django_migrations`): the migrations down would end by dropping Django's `published` and
/// `received` tables. Every migration after the adoption checks it first, so that a refused
/// `migrate down` changes nothing at all.
async fn refuse_down_if_adopted(manager: &SchemaManager<'_>, name: &str) -> Result<(), DbErr> {
    if manager.get_database_backend() != DbBackend::Postgres
        || !manager.has_table("django_migrations").await?
    {
        return Ok(());
    }
    Err(DbErr::Migration(format!(
        "{name}: refusing to migrate an adopted django-outbox-pattern database down: the \
         migrations down would drop Django's `published` and `received` tables. To take the \
         adoption back by hand: {}",
        UNDO_ADOPTION.join("; ")
    )))
}

/// Adds per-key ordering to `published`: a nullable `msg_key` (the ordering key, `NULL` for a
/// message without one) and an insertion sequence `seq`, with an index over the unsent rows of
/// each key. Recorded as `outbox_m20261201_000002_add_message_keys`.
///
/// Additive, and no rewrite of a populated table on any backend:
///
/// - PostgreSQL: `seq bigint NULL` is added without a default (a catalogue change), then given
///   `DEFAULT nextval('published_seq')`, which only new rows evaluate. Rows written before keep
///   `NULL`: they have no key, and `NULL` sorts before every number. The index is partial:
///   `(msg_key, seq) WHERE status <> 2 AND msg_key IS NOT NULL`, so sent rows cost it nothing.
/// - MariaDB / MySQL: a `SEQUENCE published_seq` and the column, added with `ALGORITHM=INSTANT`
///   (MariaDB refuses rather than copy the table). No column default: MariaDB 10.11 crashes
///   evaluating a `DEFAULT NEXTVAL(..)` in concurrent prepared inserts, so the library's insert
///   names `NEXTVAL(published_seq)` itself (rows written by other tools get `NULL`: give a keyed
///   row its `seq` that way too). No partial indexes there: `(msg_key, status, seq)`, which a
///   claim reads in two short ranges around `status = 2`.
/// - SQLite: `rowid` already numbers the rows in insertion order, and the claim orders by it:
///   `seq` is added for the entity's sake and stays `NULL`. The index is partial, as on
///   PostgreSQL, over `msg_key` (every SQLite index ends in the `rowid`).
///
/// An adopted django-outbox-pattern table gets the same columns from this migration: Django's
/// inserts name their columns, so `msg_key` stays `NULL` and `seq` takes its default.
pub struct AddMessageKeys;

impl MigrationName for AddMessageKeys {
    fn name(&self) -> &str {
        "outbox_m20261201_000002_add_message_keys"
    }
}

const KEYS_POSTGRES_UP: [&str; 4] = [
    "ALTER TABLE published ADD COLUMN msg_key varchar(255) NULL, ADD COLUMN seq bigint NULL",
    "CREATE SEQUENCE IF NOT EXISTS published_seq OWNED BY published.seq",
    "ALTER TABLE published ALTER COLUMN seq SET DEFAULT nextval('published_seq')",
    "CREATE INDEX published_key_unsent_idx ON published (msg_key, seq) \
     WHERE status <> 2 AND msg_key IS NOT NULL",
];
const KEYS_POSTGRES_DOWN: [&str; 2] = [
    "DROP INDEX IF EXISTS published_key_unsent_idx",
    // Drops the sequence too (OWNED BY).
    "ALTER TABLE published DROP COLUMN IF EXISTS msg_key, DROP COLUMN IF EXISTS seq",
];
const KEYS_MYSQL_UP: [&str; 3] = [
    // `IF NOT EXISTS`: `migrate fresh` drops the tables, not necessarily the sequence.
    "CREATE SEQUENCE IF NOT EXISTS published_seq",
    "ALTER TABLE published ADD COLUMN msg_key varchar(255) CHARACTER SET utf8mb4 \
     COLLATE utf8mb4_bin NULL, ADD COLUMN seq bigint NULL, ALGORITHM=INSTANT",
    "CREATE INDEX published_key_unsent_idx ON published (msg_key, status, seq)",
];
const KEYS_MYSQL_DOWN: [&str; 3] = [
    "DROP INDEX published_key_unsent_idx ON published",
    "ALTER TABLE published DROP COLUMN msg_key, DROP COLUMN seq",
    "DROP SEQUENCE IF EXISTS published_seq",
];
const KEYS_SQLITE_UP: [&str; 3] = [
    "ALTER TABLE published ADD COLUMN msg_key varchar(255) NULL",
    "ALTER TABLE published ADD COLUMN seq bigint NULL",
    "CREATE INDEX published_key_unsent_idx ON published (msg_key) \
     WHERE status <> 2 AND msg_key IS NOT NULL",
];
const KEYS_SQLITE_DOWN: [&str; 3] = [
    "DROP INDEX IF EXISTS published_key_unsent_idx",
    "ALTER TABLE published DROP COLUMN msg_key",
    "ALTER TABLE published DROP COLUMN seq",
];

#[async_trait::async_trait]
impl MigrationTrait for AddMessageKeys {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let statements: &[&str] = match manager.get_database_backend() {
            DbBackend::Postgres => &KEYS_POSTGRES_UP,
            DbBackend::MySql => &KEYS_MYSQL_UP,
            _ => &KEYS_SQLITE_UP,
        };
        let db = manager.get_connection();
        for statement in statements {
            db.execute_unprepared(statement).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        refuse_down_if_adopted(manager, self.name()).await?;
        let statements: &[&str] = match manager.get_database_backend() {
            DbBackend::Postgres => &KEYS_POSTGRES_DOWN,
            DbBackend::MySql => &KEYS_MYSQL_DOWN,
            _ => &KEYS_SQLITE_DOWN,
        };
        let db = manager.get_connection();
        for statement in statements {
            db.execute_unprepared(statement).await?;
        }
        Ok(())
    }

    /// PostgreSQL and SQLite apply it all or nothing; MariaDB commits each DDL statement.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

/// Creates `published`, `received` and `outbox_housekeeping` (and, on PostgreSQL, the
/// `outbox_published` notification trigger). Recorded as
/// `outbox_m20261126_000001_create_outbox_tables`.
pub struct CreateOutboxTables;

impl MigrationName for CreateOutboxTables {
    fn name(&self) -> &str {
        "outbox_m20261126_000001_create_outbox_tables"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateOutboxTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let types = ColumnTypes::for_backend(manager.get_database_backend());

        manager.create_table(published_table(&types)).await?;
        // (status, added): the relay's claim reads the oldest waiting rows, and the cleanup the
        // oldest sent ones, without walking past the other statuses; it also serves lookups by
        // status alone.
        manager
            .create_index(
                Index::create()
                    .name("published_status_added_idx")
                    .table(Published::Table)
                    .col(Published::Status)
                    .col(Published::Added)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "published_added_idx",
                Published::Table,
                Published::Added,
            ))
            .await?;

        manager.create_table(received_table(&types)).await?;
        manager
            .create_index(index(
                "received_added_idx",
                Received::Table,
                Received::Added,
            ))
            .await?;

        manager.create_table(housekeeping_table(&types)).await?;

        if manager.get_database_backend() == DbBackend::Postgres {
            let db = manager.get_connection();
            db.execute_unprepared(CREATE_NOTIFY_FUNCTION).await?;
            db.execute_unprepared(CREATE_NOTIFY_TRIGGER).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            let db = manager.get_connection();
            db.execute_unprepared(DROP_NOTIFY_TRIGGER).await?;
            db.execute_unprepared(DROP_NOTIFY_FUNCTION).await?;
        }
        for table in [
            OutboxHousekeeping::Table.into_iden(),
            Received::Table.into_iden(),
            Published::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }

    /// All or nothing on every backend: PostgreSQL and SQLite roll back a half-applied schema;
    /// MariaDB commits each DDL statement on its own whatever we ask.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

/// PostgreSQL: the `published` trigger notifies only while a relay has announced itself idle in
/// the new `outbox_idle_relay` table (unlogged: a relay's announcement needs no disk flush, and
/// a crash forgets them all, which only makes the relays poll until they announce again). Every
/// transaction that queued a NOTIFY takes one database-wide lock at commit; in busy periods,
/// when no relay is idle, writers now queue none and commit side by side. An idle relay is still
/// woken within milliseconds. Relays of a version before this one never announce themselves:
/// after this migration they find new rows at their poll (`OUTBOX_PRODUCER_WAITING_TIME`) until
/// they are upgraded. Nothing on MariaDB, MySQL and SQLite (no trigger there). Recorded as
/// `outbox_m20261201_000004_notify_idle_relays_only`.
pub struct NotifyIdleRelaysOnly;

impl MigrationName for NotifyIdleRelaysOnly {
    fn name(&self) -> &str {
        "outbox_m20261201_000004_notify_idle_relays_only"
    }
}

const CREATE_IDLE_RELAY_TABLE: &str = "CREATE UNLOGGED TABLE IF NOT EXISTS outbox_idle_relay (\
    relay uuid PRIMARY KEY, \
    until timestamp with time zone NOT NULL)";
const DROP_IDLE_RELAY_TABLE: &str = "DROP TABLE IF EXISTS outbox_idle_relay";

const CREATE_IDLE_NOTIFY_FUNCTION: &str = r#"
CREATE OR REPLACE FUNCTION outbox_published_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM outbox_idle_relay WHERE until > now()) THEN
        PERFORM pg_notify('outbox_published', '');
    END IF;
    RETURN NULL;
END;
$$"#;

#[async_trait::async_trait]
impl MigrationTrait for NotifyIdleRelaysOnly {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared(CREATE_IDLE_RELAY_TABLE).await?;
        db.execute_unprepared(CREATE_IDLE_NOTIFY_FUNCTION).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        refuse_down_if_adopted(manager, self.name()).await?;
        let db = manager.get_connection();
        db.execute_unprepared(CREATE_NOTIFY_FUNCTION).await?;
        db.execute_unprepared(DROP_IDLE_RELAY_TABLE).await?;
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

/// MariaDB and MySQL: `outbox_key_lock`, 65,536 rows (`bucket` 0 to 65,535) that a keyed write
/// locks (`SELECT .. FOR UPDATE`, one row per key's bucket, in ascending order) before it
/// inserts, so that the writers of one key run one after the other until they commit, as the
/// advisory locks do on PostgreSQL: `seq`, drawn at insert after the lock, is then commit order
/// per key. Keys share a bucket by hash (one chance in 65,536 for two keys): two writers of
/// such keys wait for each other too. Nothing on PostgreSQL and SQLite. Recorded as
/// `outbox_m20261201_000005_add_key_locks`.
pub struct AddKeyLocks;

impl MigrationName for AddKeyLocks {
    fn name(&self) -> &str {
        "outbox_m20261201_000005_add_key_locks"
    }
}

// The rows the writers lock (see `published::lock_keys`): 0 to 65,535, as filled below.
const _: () = assert!(crate::write::KEY_LOCK_BUCKETS == 256 * 256);

const CREATE_KEY_LOCK_TABLE: &str = "CREATE TABLE IF NOT EXISTS outbox_key_lock (\
    bucket INT NOT NULL PRIMARY KEY) ENGINE=InnoDB";
// 256 x 256 from a recursive CTE of 256 rows: MySQL stops a recursion at 1,000 levels by
// default. `IGNORE`: a rerun after an interrupted `up` finds some rows there.
const FILL_KEY_LOCK_TABLE: &str = "INSERT IGNORE INTO outbox_key_lock (bucket) \
    WITH RECURSIVE byte (n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM byte WHERE n < 255) \
    SELECT high.n * 256 + low.n FROM byte AS high CROSS JOIN byte AS low";
const DROP_KEY_LOCK_TABLE: &str = "DROP TABLE IF EXISTS outbox_key_lock";

#[async_trait::async_trait]
impl MigrationTrait for AddKeyLocks {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::MySql {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared(CREATE_KEY_LOCK_TABLE).await?;
        db.execute_unprepared(FILL_KEY_LOCK_TABLE).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::MySql {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared(DROP_KEY_LOCK_TABLE)
            .await?;
        Ok(())
    }
}

// `CREATE OR REPLACE` because `migrate fresh` drops tables (and with them the trigger) but not
// functions: the function of an earlier run is still there when `up` runs again.
const CREATE_NOTIFY_FUNCTION: &str = r#"
CREATE OR REPLACE FUNCTION outbox_published_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_published', '');
    RETURN NULL;
END;
$$"#;

// Statement level: one notification per inserting statement, and PostgreSQL folds identical
// notifications of one transaction into one, delivered only at commit.
const CREATE_NOTIFY_TRIGGER: &str = r#"
CREATE TRIGGER outbox_published_notify
AFTER INSERT ON published
FOR EACH STATEMENT EXECUTE FUNCTION outbox_published_notify()"#;

const DROP_NOTIFY_TRIGGER: &str = "DROP TRIGGER IF EXISTS outbox_published_notify ON published";
const DROP_NOTIFY_FUNCTION: &str = "DROP FUNCTION IF EXISTS outbox_published_notify()";

#[derive(DeriveIden)]
enum Published {
    Table,
    Id,
    Version,
    Destination,
    Body,
    Headers,
    Added,
    ExpiresAt,
    Retry,
    Status,
    ClaimToken,
    LockedUntil,
    NextAttemptAt,
    LastError,
}

#[derive(DeriveIden)]
enum Received {
    Table,
    Id,
    Queue,
    MsgId,
    Headers,
    Body,
    Added,
    ExpiresAt,
    Retry,
    Status,
}

#[derive(DeriveIden)]
enum OutboxHousekeeping {
    Table,
    Task,
    LastRunAt,
}

/// The column types that differ between backends.
struct ColumnTypes {
    json: ColumnType,
    timestamp: ColumnType,
    /// Appended to a varchar that must compare byte for byte.
    exact_collation: Option<&'static str>,
}

impl ColumnTypes {
    fn for_backend(backend: DbBackend) -> Self {
        match backend {
            DbBackend::Postgres => ColumnTypes {
                json: ColumnType::JsonBinary,
                timestamp: ColumnType::TimestampWithTimeZone,
                exact_collation: None,
            },
            DbBackend::MySql => ColumnTypes {
                json: ColumnType::Json,
                timestamp: ColumnType::custom("DATETIME(6)"),
                // The default collations ignore case: `Orders` and `orders` are two RabbitMQ
                // queues, and must not share message ids. (`_bin` still pads: trailing spaces
                // are ignored; MariaDB's `_nopad_bin` would not be, but MySQL lacks it.)
                exact_collation: Some("CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"),
            },
            // SQLite and any backend added later: SeaORM's own defaults.
            _ => ColumnTypes {
                json: ColumnType::Json,
                timestamp: ColumnType::TimestampWithTimeZone,
                exact_collation: None,
            },
        }
    }

    fn json(&self, column: impl IntoIden) -> ColumnDef {
        ColumnDef::new_with_type(column, self.json.clone())
    }

    fn timestamp(&self, column: impl IntoIden) -> ColumnDef {
        ColumnDef::new_with_type(column, self.timestamp.clone())
    }

    /// A `varchar(len)` compared byte for byte, as a key of identifiers must be.
    fn exact_string(&self, column: impl IntoIden, len: u32) -> ColumnDef {
        match self.exact_collation {
            Some(collation) => ColumnDef::new_with_type(
                column,
                ColumnType::custom(format!("varchar({len}) {collation}")),
            ),
            None => ColumnDef::new(column).string_len(len).to_owned(),
        }
    }
}

fn published_table(types: &ColumnTypes) -> TableCreateStatement {
    Table::create()
        .table(Published::Table)
        .col(
            ColumnDef::new(Published::Id)
                .uuid()
                .not_null()
                .primary_key(),
        )
        .col(ColumnDef::new(Published::Version).string_len(100).null())
        .col(
            ColumnDef::new(Published::Destination)
                .string_len(255)
                .not_null(),
        )
        .col(types.json(Published::Body).not_null())
        .col(types.json(Published::Headers).not_null())
        .col(types.timestamp(Published::Added).not_null())
        .col(types.timestamp(Published::ExpiresAt).not_null())
        .col(ColumnDef::new(Published::Retry).integer().not_null())
        .col(ColumnDef::new(Published::Status).integer().not_null())
        .col(ColumnDef::new(Published::ClaimToken).uuid().null())
        .col(types.timestamp(Published::LockedUntil).null())
        .col(types.timestamp(Published::NextAttemptAt).null())
        .col(ColumnDef::new(Published::LastError).text().null())
        .check(retry_not_negative(
            "published_retry_check",
            Published::Retry,
        ))
        .to_owned()
}

fn received_table(types: &ColumnTypes) -> TableCreateStatement {
    Table::create()
        .table(Received::Table)
        .col(ColumnDef::new(Received::Id).uuid().not_null().primary_key())
        .col(types.exact_string(Received::Queue, 255).not_null())
        .col(types.exact_string(Received::MsgId, 100).null())
        .col(types.json(Received::Headers).null())
        .col(types.json(Received::Body).null())
        .col(types.timestamp(Received::Added).not_null())
        .col(types.timestamp(Received::ExpiresAt).not_null())
        .col(ColumnDef::new(Received::Retry).integer().not_null())
        .col(ColumnDef::new(Received::Status).integer().not_null())
        .check(retry_not_negative("received_retry_check", Received::Retry))
        // NULL message ids never collide (SQL's NULL <> NULL), on all three backends.
        .index(
            Index::create()
                .name("received_queue_msg_id_key")
                .unique()
                .col(Received::Queue)
                .col(Received::MsgId),
        )
        .to_owned()
}

fn housekeeping_table(types: &ColumnTypes) -> TableCreateStatement {
    Table::create()
        .table(OutboxHousekeeping::Table)
        .col(
            ColumnDef::new(OutboxHousekeeping::Task)
                .string_len(64)
                .not_null()
                .primary_key(),
        )
        .col(types.timestamp(OutboxHousekeeping::LastRunAt).not_null())
        .to_owned()
}

/// A table-level check: MariaDB does not accept a named check on the column itself.
fn retry_not_negative(name: &'static str, retry: impl IntoIden) -> Check {
    Check::named(name, Expr::col(retry).gte(0))
}

fn index(name: &str, table: impl IntoIden, column: impl IntoIden) -> IndexCreateStatement {
    Index::create()
        .name(name)
        .table(table)
        .col(column)
        .to_owned()
}
