//! `outbox_m20261206_000006_add_unroutable_destinations`: the destinations waiting for a queue.

use sea_orm_migration::prelude::*;

use super::ColumnTypes;

/// `outbox_unroutable`: one row per destination whose last message the broker returned because
/// no queue was bound to it (see `outbox::tables::unroutable`). A new, small table: nothing of
/// `published` changes, so it is added without touching the outbox's rows or indexes, on every
/// backend and on an adopted Django database alike. Recorded as
/// `outbox_m20261206_000006_add_unroutable_destinations`.
///
/// A relay of an earlier version beside one of this version (a rolling deploy) neither writes
/// nor reads the table: it keeps unroutable rows waiting as before, and `outbox status` shows
/// only the destinations the newer relays recorded.
pub struct AddUnroutableDestinations;

impl MigrationName for AddUnroutableDestinations {
    fn name(&self) -> &str {
        "outbox_m20261206_000006_add_unroutable_destinations"
    }
}

#[derive(DeriveIden)]
enum OutboxUnroutable {
    Table,
    Destination,
    Reply,
    Since,
    LastReturnedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for AddUnroutableDestinations {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let types = ColumnTypes::for_backend(manager.get_database_backend());
        manager
            .create_table(
                Table::create()
                    .table(OutboxUnroutable::Table)
                    .if_not_exists()
                    .col(
                        types
                            .exact_string(OutboxUnroutable::Destination, 255)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(OutboxUnroutable::Reply).text().not_null())
                    .col(types.timestamp(OutboxUnroutable::Since).not_null())
                    .col(types.timestamp(OutboxUnroutable::LastReturnedAt).not_null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(OutboxUnroutable::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
