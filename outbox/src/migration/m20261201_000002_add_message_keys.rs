//! `outbox_m20261201_000002_add_message_keys`: per-key ordering's `msg_key`, `seq` and index.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use super::refuse_down_if_adopted;

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

pub(super) const KEYS_POSTGRES_UP: [&str; 4] = [
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
