use sea_orm::entity::prelude::*;

pub struct Summary {
    pub total: i64,
}

#[outbox::publish(destination = "/topic/orders", serializer = summary)]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "orders")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub total: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

fn summary(order: &Model) -> Summary {
    Summary { total: order.total }
}

fn main() {}
