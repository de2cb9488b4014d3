//! `#[publish]` on entities written the ways SeaORM users write them, saved on PostgreSQL, MariaDB
//! and SQLite: the expanded format (`DeriveEntity` with separate `Column` and `PrimaryKey`
//! enums), the dense `#[sea_orm::model]` format, and UUID, String and composite primary keys.

use outbox_tests::{Backend, TestDb, on_every_backend};
use sea_orm::ActiveValue::Set;
use std::collections::BTreeSet;

use sea_orm::{ConnectionTrait, EntityTrait, Schema};
use serde_json::{Value, json};
use uuid::Uuid;

/// The expanded format: every part written out. The key field carries `#[sea_orm(primary_key)]`
/// as well, which `DeriveModel` and `DeriveActiveModel` accept, so that `#[publish]` (which sees
/// the struct alone) knows the key.
mod cake {
    use sea_orm::entity::prelude::*;

    #[derive(Copy, Clone, Default, Debug, DeriveEntity)]
    pub struct Entity;

    impl EntityName for Entity {
        fn table_name(&self) -> &'static str {
            "cakes"
        }
    }

    #[derive(Clone, Debug, PartialEq, DeriveModel, DeriveActiveModel)]
    #[outbox::publish(destination = "/topic/cakes")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub name: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveColumn)]
    pub enum Column {
        Id,
        Name,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DerivePrimaryKey)]
    pub enum PrimaryKey {
        Id,
    }

    impl PrimaryKeyTrait for PrimaryKey {
        type ValueType = i32;

        fn auto_increment() -> bool {
            true
        }
    }

    #[derive(Copy, Clone, Debug, EnumIter)]
    pub enum Relation {}

    impl ColumnTrait for Column {
        type EntityName = Entity;

        fn def(&self) -> ColumnDef {
            match self {
                Self::Id => ColumnType::Integer.def(),
                Self::Name => ColumnType::String(StringLen::N(100)).def(),
            }
        }
    }

    impl RelationTrait for Relation {
        fn def(&self) -> RelationDef {
            panic!("no relations")
        }
    }
}

/// The dense format of SeaORM 2.
mod baker {
    use sea_orm::entity::prelude::*;

    #[outbox::publish(destination = "/topic/bakers")]
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "bakers")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub name: String,
    }
}

mod ticket {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "tickets")]
    #[outbox::publish(destination = "/topic/tickets")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub code: Uuid,
        pub title: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

mod country {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "countries")]
    #[outbox::publish(destination = "/topic/countries", fields(name, iso))]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub iso: String,
        pub name: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

mod stock {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "stocks")]
    #[outbox::publish(destination = "/topic/stocks")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub warehouse: i32,
        #[sea_orm(primary_key, auto_increment = false)]
        pub sku: String,
        pub quantity: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

async fn create<E: EntityTrait>(t: &TestDb, entity: E) {
    let schema = Schema::new(t.db.get_database_backend());
    t.db.execute(&schema.create_table_from_entity(entity))
        .await
        .expect("create the entity's table");
}

/// The outbox's rows as (destination, body), in no particular order (rows written within one
/// clock tick have no order).
async fn bodies(t: &TestDb) -> BTreeSet<(String, String)> {
    outbox::Published::find()
        .all(&t.db)
        .await
        .expect("read the outbox")
        .into_iter()
        .map(|row| (row.destination, row.body.to_string()))
        .collect()
}

fn rows(expected: Vec<(&str, Value)>) -> BTreeSet<(String, String)> {
    expected
        .into_iter()
        .map(|(destination, body)| (destination.to_owned(), body.to_string()))
        .collect()
}

async fn every_format_and_key_publishes(backend: Backend) {
    let t = TestDb::new(backend).await;
    create(&t, cake::Entity).await;
    create(&t, baker::Entity).await;
    create(&t, ticket::Entity).await;
    create(&t, country::Entity).await;
    create(&t, stock::Entity).await;

    let cake = outbox::insert(
        &t.db,
        cake::ActiveModel {
            name: Set("sponge".into()),
            ..Default::default()
        },
    )
    .await
    .expect("insert an expanded-format entity");
    let mut renamed: cake::ActiveModel = cake.clone().into();
    renamed.name = Set("lemon".into());
    outbox::update(&t.db, renamed)
        .await
        .expect("update an expanded-format entity");
    outbox::insert(
        &t.db,
        baker::ActiveModel {
            name: Set("ada".into()),
            ..Default::default()
        },
    )
    .await
    .expect("insert a dense-format entity");
    let code = Uuid::new_v4();
    outbox::insert(
        &t.db,
        ticket::ActiveModel {
            code: Set(code),
            title: Set("late".into()),
        },
    )
    .await
    .expect("insert with a UUID key");
    outbox::insert(
        &t.db,
        country::ActiveModel {
            iso: Set("PT".into()),
            name: Set("Portugal".into()),
        },
    )
    .await
    .expect("insert with a String key");
    outbox::insert(
        &t.db,
        stock::ActiveModel {
            warehouse: Set(3),
            sku: Set("A-1".into()),
            quantity: Set(12),
        },
    )
    .await
    .expect("insert with a composite key");

    assert_eq!(
        bodies(&t).await,
        rows(vec![
            ("/topic/cakes", json!({"id": cake.id, "name": "sponge"})),
            ("/topic/cakes", json!({"id": cake.id, "name": "lemon"})),
            ("/topic/bakers", json!({"id": 1, "name": "ada"})),
            (
                "/topic/tickets",
                json!({"id": code.to_string(), "title": "late"})
            ),
            ("/topic/countries", json!({"id": "PT", "name": "Portugal"})),
            (
                "/topic/stocks",
                json!({"id": [3, "A-1"], "warehouse": 3, "sku": "A-1", "quantity": 12})
            ),
        ]),
        "{backend:?}"
    );
    t.drop_database().await;
}

on_every_backend!(every_format_and_key_publishes);
