//! `outbox_m20261201_000001_adopt_django_tables`: adopting django-outbox-pattern's tables on
//! PostgreSQL.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use super::m20261201_000002_add_message_keys::KEYS_POSTGRES_UP;
use super::{
    CREATE_NOTIFY_FUNCTION, CREATE_NOTIFY_TRIGGER, ColumnTypes, DROP_NOTIFY_FUNCTION,
    DROP_NOTIFY_TRIGGER, housekeeping_table, refuse_down_if_adopted,
};

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
///
/// [`AddMessageKeys`]: super::AddMessageKeys
/// [`migrations()`]: super::migrations
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
///
/// [`AddMessageKeys`]: super::AddMessageKeys
pub(super) const UNDO_ADOPTION: [&str; 13] = [
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
