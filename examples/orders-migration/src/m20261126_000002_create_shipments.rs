//! The shipping side: one `shipments` row per order, written by the consumer of
//! `/topic/orders.v1`. No foreign key to `orders`: shipping knows orders only from their
//! messages, as it would in a service of its own with its own database.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{integer_uniq, pk_auto, string, timestamp_with_time_zone};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Shipments::Table)
                    .col(pk_auto(Shipments::Id))
                    .col(integer_uniq(Shipments::OrderId))
                    .col(string(Shipments::Customer))
                    .col(timestamp_with_time_zone(Shipments::ShippedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Shipments::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Shipments {
    Table,
    Id,
    OrderId,
    Customer,
    ShippedAt,
}
