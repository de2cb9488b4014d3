//! The outbox's own tables, as SeaORM migrations that a service runs next to its own.
//!
//! The library owns three tables: `published` (the outbox: one row per event waiting to be, or
//! already, relayed to the broker), `received` (the inbox: one row per consumed message, unique per
//! queue and message id, so a redelivered message is processed once) and `outbox_housekeeping` (one
//! row per periodic cleanup task, through which relays agree on who runs it next). On PostgreSQL
//! an insert into `published` also fires a `NOTIFY outbox_published` at commit, so idle relays wake
//! at once instead of waiting for their next poll.
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
    vec![Box::new(CreateOutboxTables)]
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
