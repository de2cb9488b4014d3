//! The outbox's own tables, as SeaORM migrations that a service runs next to its own.
//!
//! The library owns these tables: `published` (the outbox: one row per event waiting to be, or
//! already, relayed to the broker), `received` (the inbox: one row per consumed message, unique per
//! queue and message id, so a redelivered message is processed once), `outbox_housekeeping` (one
//! row per periodic cleanup task, through which relays agree on who runs it next) and
//! `outbox_unroutable` (one row per destination the broker had no queue for when the relay last
//! sent there). On PostgreSQL
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
//!
//! One file per migration, named after the name it is recorded under; this file lists them and
//! holds what several of them share (the notification trigger, the housekeeping table, the
//! column types per backend, the refusal to migrate an adopted database down).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

mod m20261126_000001_create_outbox_tables;
mod m20261201_000001_adopt_django_tables;
mod m20261201_000002_add_message_keys;
mod m20261201_000004_notify_idle_relays_only;
mod m20261201_000005_add_key_locks;
mod m20261206_000006_add_unroutable_destinations;

pub use m20261126_000001_create_outbox_tables::CreateOutboxTables;
pub use m20261201_000001_adopt_django_tables::AdoptDjangoTables;
pub use m20261201_000002_add_message_keys::AddMessageKeys;
pub use m20261201_000004_notify_idle_relays_only::NotifyIdleRelaysOnly;
pub use m20261201_000005_add_key_locks::AddKeyLocks;
pub use m20261206_000006_add_unroutable_destinations::AddUnroutableDestinations;

use m20261201_000001_adopt_django_tables::UNDO_ADOPTION;

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
        Box::new(AddUnroutableDestinations),
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
        Box::new(AddUnroutableDestinations),
    ]
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
