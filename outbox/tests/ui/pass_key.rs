use sea_orm::entity::prelude::*;

/// Keys from a field, from a function, and from the primary key on a route with deletes.
#[outbox::publish(destination = "/topic/orders", key = customer)]
#[outbox::publish(destination = "/topic/order-regions", key = self::region_key)]
#[outbox::publish(destination = "/topic/order-log", key = id, on(insert, update, delete))]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "orders")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub customer: String,
    pub region: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

fn region_key(model: &Model) -> impl ToString + use<> {
    model.region.clone()
}

fn main() {}
