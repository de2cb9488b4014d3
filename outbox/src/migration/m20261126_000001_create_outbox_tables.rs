//! The first migration, `outbox_m20261126_000001_create_outbox_tables`: the outbox's tables.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use super::{
    CREATE_NOTIFY_FUNCTION, CREATE_NOTIFY_TRIGGER, ColumnTypes, DROP_NOTIFY_FUNCTION,
    DROP_NOTIFY_TRIGGER, OutboxHousekeeping, housekeeping_table,
};

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
