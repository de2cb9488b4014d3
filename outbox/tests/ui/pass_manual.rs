//! `manual`: the entity keeps its own `ActiveModelBehavior` and calls `outbox::write::hooks` itself.

use sea_orm::entity::prelude::*;

#[outbox::publish(destination = "/topic/orders", manual)]
#[outbox::publish(destination = "/topic/audit", on(delete), manual)]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "orders")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub total: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

#[async_trait::async_trait]
impl ActiveModelBehavior for ActiveModel {
    async fn before_save<C>(self, db: &C, insert: bool) -> Result<Self, DbErr>
    where
        C: ConnectionTrait,
    {
        outbox::write::hooks::before_save::<Model, C>(db, insert)?;
        Ok(self)
    }

    async fn after_save<C>(model: Model, db: &C, insert: bool) -> Result<Model, DbErr>
    where
        C: ConnectionTrait,
    {
        outbox::write::hooks::after_save::<Model, C>(&model, db, insert).await?;
        Ok(model)
    }

    async fn after_delete<C>(self, db: &C) -> Result<Self, DbErr>
    where
        C: ConnectionTrait,
    {
        outbox::write::hooks::after_delete::<Model, C>(&self, db).await?;
        Ok(self)
    }
}

fn main() {}
