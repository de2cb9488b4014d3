use sea_orm::entity::prelude::*;

/// A column type that is not `serde::Serialize`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveValueType)]
pub struct Cents(i64);

#[outbox::publish(destination = "/topic/orders")]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "orders")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub price: Cents,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

fn main() {}
