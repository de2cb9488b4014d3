//! An order. Every insert and update publishes `/topic/orders.v1` with body
//! `{"id": .., "customer": .., "total_cents": ..}`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "orders")]
#[outbox::publish(
    destination = "/topic/orders",
    version = "v1",
    fields(customer, total_cents)
)]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub customer: String,
    pub total_cents: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

// No `impl ActiveModelBehavior for ActiveModel {}`: `#[publish]` writes it.
