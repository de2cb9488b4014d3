//! The attribute works wherever it is written among the struct's attributes.

mod above_derive {
    use sea_orm::entity::prelude::*;

    #[outbox::publish(destination = "/topic/a")]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "a")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

mod below_derive {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "b")]
    #[outbox::publish(destination = "/topic/b")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

mod around_derive {
    use outbox::publish;
    use sea_orm::entity::prelude::*;

    #[publish(destination = "/topic/c1")]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[publish(destination = "/topic/c2", on(delete))]
    #[sea_orm(table_name = "c")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

mod above_sea_orm_model {
    use sea_orm::entity::prelude::*;

    #[outbox::publish(destination = "/topic/d")]
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "d")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
    }
}

mod below_sea_orm_model {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "e")]
    #[outbox::publish(destination = "/topic/e1")]
    #[outbox::publish(destination = "/topic/e2")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
    }
}

fn routes<M: outbox::write::Publish>() -> usize {
    M::ROUTES.len()
}

fn main() {
    assert_eq!(routes::<above_derive::Model>(), 1);
    assert_eq!(routes::<below_derive::Model>(), 1);
    assert_eq!(routes::<around_derive::Model>(), 2);
    assert_eq!(routes::<above_sea_orm_model::Model>(), 1);
    assert_eq!(routes::<below_sea_orm_model::Model>(), 2);
}
