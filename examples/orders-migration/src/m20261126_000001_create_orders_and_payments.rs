//! The selling side: `orders`, and the `payments` taken for them.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, integer, pk_auto, string};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Orders::Table)
                    .col(pk_auto(Orders::Id))
                    .col(string(Orders::Customer))
                    .col(big_integer(Orders::TotalCents))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Payments::Table)
                    .col(pk_auto(Payments::Id))
                    .col(integer(Payments::OrderId))
                    .col(big_integer(Payments::AmountCents))
                    .foreign_key(
                        ForeignKey::create()
                            .name("payments_order_id_fkey")
                            .from(Payments::Table, Payments::OrderId)
                            .to(Orders::Table, Orders::Id),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Payments::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Orders::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Orders {
    Table,
    Id,
    Customer,
    TotalCents,
}

#[derive(DeriveIden)]
enum Payments {
    Table,
    Id,
    OrderId,
    AmountCents,
}
