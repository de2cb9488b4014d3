//! A payment taken for an order. Payments are never changed, so only an insert publishes:
//! `/topic/payments`, with every field as the body (`{"id": .., "order_id": .., "amount_cents": ..}`).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "payments")]
#[outbox::publish(destination = "/topic/payments", on(insert))]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub order_id: i32,
    pub amount_cents: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}
