//! What `#[outbox::publish]` generates, checked without a database: the routes, the bodies and
//! the key of a deleted row, for each way of writing the attribute.

use outbox::write::Events;
use outbox::write::Publish;
use outbox::write::Route;
use sea_orm::ActiveValue::{NotSet, Set};
use serde_json::{Value, json};

/// Two stacked routes above the derive: `fields(...)` with a version, and a serializer that also
/// publishes deletes.
mod order {
    use sea_orm::entity::prelude::*;

    #[outbox::publish(destination = "/topic/orders", version = "v1", fields(total))]
    #[outbox::publish(destination = "/topic/audit", serializer = audit_body, on(insert, update, delete))]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "orders")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub total: i64,
        pub note: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    #[derive(serde::Serialize)]
    pub struct Audit {
        pub order: i32,
        pub note: String,
    }

    pub fn audit_body(order: &Model) -> Audit {
        Audit {
            order: order.id,
            note: order.note.clone(),
        }
    }
}

/// Every column, a composite key, the attribute below the derive, delete-only publishing, and a
/// module that shadows `core` and `outbox` (the generated code names absolute paths).
mod order_line {
    use sea_orm::entity::prelude::*;

    #[allow(dead_code)]
    mod core {}
    #[allow(dead_code)]
    mod outbox {}

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "order_lines")]
    #[::outbox::publish(destination = "/topic/lines")]
    #[::outbox::publish(destination = "/topic/lines.deleted", on(delete), allow_autocommit)]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub order_id: i32,
        #[sea_orm(primary_key, auto_increment = false)]
        pub line: i16,
        pub sku: String,
        pub price: f64,
        pub gift: Option<bool>,
        #[sea_orm(ignore)]
        pub cached: u8,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

/// SeaORM 2's `#[sea_orm::model]`, our attribute above it: the relation field is no column.
mod user {
    use sea_orm::entity::prelude::*;

    #[outbox::publish(destination = "/topic/users", on(insert))]
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub name: String,
        #[sea_orm(has_one)]
        pub profile: HasOne<super::profile::Entity>,
    }
}

/// `#[sea_orm::model]` with our attribute below it, where SeaORM copies it onto `ModelEx` too.
mod profile {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "profiles")]
    #[outbox::publish(destination = "/topic/profiles", on(update))]
    #[outbox::publish(destination = "/topic/pictures", fields(picture))]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub picture: String,
        #[sea_orm(unique)]
        pub user_id: i32,
        #[sea_orm(belongs_to, from = "user_id", to = "id")]
        pub user: BelongsTo<super::user::Entity>,
    }
}

/// `manual`: the `Publish` impl only; the entity writes its own hooks around `outbox::write::hooks`.
mod invoice {
    use sea_orm::entity::prelude::*;

    #[outbox::publish(destination = "/topic/invoices", fields(number), manual)]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "invoices")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub number: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    #[async_trait::async_trait]
    impl ActiveModelBehavior for ActiveModel {
        async fn after_save<C>(model: Model, db: &C, insert: bool) -> Result<Model, DbErr>
        where
            C: ConnectionTrait,
        {
            outbox::write::hooks::after_save::<Model, C>(&model, db, insert).await?;
            Ok(model)
        }
    }
}

fn order() -> order::Model {
    order::Model {
        id: 7,
        total: 4200,
        note: "gift wrap".to_owned(),
    }
}

#[test]
fn stacked_attributes_are_routes_in_attribute_order() {
    assert_eq!(
        order::Model::ROUTES,
        &[
            Route {
                destination: "/topic/orders",
                version: Some("v1"),
                on: Events::SAVE,
            },
            Route {
                destination: "/topic/audit",
                version: None,
                on: Events::SAVE.with(Events::DELETE),
            },
        ]
    );
    const { assert!(!order::Model::ALLOW_AUTOCOMMIT) };
    assert_eq!(order::Model::ENTITY, "it::macro_expansion::order");
}

#[test]
fn fields_body_is_the_key_and_the_listed_fields() {
    assert_eq!(order().body(0).unwrap(), json!({"id": 7, "total": 4200}));
}

#[test]
fn serializer_body_is_the_function_result() {
    assert_eq!(
        order().body(1).unwrap(),
        json!({"order": 7, "note": "gift wrap"})
    );
}

#[test]
fn body_of_an_unknown_route_is_null() {
    assert_eq!(order().body(2).unwrap(), Value::Null);
}

#[test]
fn deleted_key_is_read_from_the_active_model() {
    let active = order::ActiveModel {
        id: Set(7),
        total: NotSet,
        note: NotSet,
    };
    assert_eq!(order::Model::deleted_key(&active).unwrap(), Some(json!(7)));
}

#[test]
fn deleted_key_is_none_when_the_key_is_not_set() {
    let active = order::ActiveModel {
        id: NotSet,
        total: Set(1),
        note: NotSet,
    };
    assert_eq!(order::Model::deleted_key(&active).unwrap(), None);
}

fn line() -> order_line::Model {
    order_line::Model {
        order_id: 7,
        line: 2,
        sku: "TEA-1".to_owned(),
        price: 3.5,
        gift: None,
        cached: 9,
    }
}

#[test]
fn default_body_is_the_composite_key_and_every_column() {
    assert_eq!(
        line().body(0).unwrap(),
        json!({
            "id": [7, 2],
            "order_id": 7,
            "line": 2,
            "sku": "TEA-1",
            "price": 3.5,
            "gift": null,
        })
    );
}

#[test]
fn delete_only_route_and_allow_autocommit() {
    assert_eq!(order_line::Model::ROUTES[0].on, Events::SAVE);
    assert_eq!(order_line::Model::ROUTES[1].on, Events::DELETE);
    const { assert!(order_line::Model::ALLOW_AUTOCOMMIT) };
}

#[test]
fn deleted_composite_key_is_an_array() {
    let active = order_line::ActiveModel {
        order_id: Set(7),
        line: Set(2),
        ..Default::default()
    };
    assert_eq!(
        order_line::Model::deleted_key(&active).unwrap(),
        Some(json!([7, 2]))
    );
    let half = order_line::ActiveModel {
        order_id: Set(7),
        ..Default::default()
    };
    assert_eq!(order_line::Model::deleted_key(&half).unwrap(), None);
}

#[test]
fn sea_orm_model_above_leaves_relations_out_of_the_body() {
    assert_eq!(
        user::Model::ROUTES,
        &[Route {
            destination: "/topic/users",
            version: None,
            on: Events::INSERT,
        }]
    );
    let user = user::Model {
        id: 1,
        name: "ada".to_owned(),
    };
    assert_eq!(user.body(0).unwrap(), json!({"id": 1, "name": "ada"}));
}

#[test]
fn sea_orm_model_below_publishes_model_once() {
    assert_eq!(profile::Model::ROUTES.len(), 2);
    assert_eq!(profile::Model::ROUTES[0].on, Events::UPDATE);
    let profile = profile::Model {
        id: 3,
        picture: "ada.png".to_owned(),
        user_id: 1,
    };
    assert_eq!(
        profile.body(0).unwrap(),
        json!({"id": 3, "picture": "ada.png", "user_id": 1})
    );
    assert_eq!(
        profile.body(1).unwrap(),
        json!({"id": 3, "picture": "ada.png"})
    );
}

#[test]
fn manual_generates_publish_only() {
    assert_eq!(invoice::Model::ROUTES[0].destination, "/topic/invoices");
    let invoice = invoice::Model {
        id: 5,
        number: "F-0005".to_owned(),
    };
    assert_eq!(
        invoice.body(0).unwrap(),
        json!({"id": 5, "number": "F-0005"})
    );
    // Without a delete route the trait's default applies.
    let active = invoice::ActiveModel {
        id: Set(5),
        number: NotSet,
    };
    assert_eq!(invoice::Model::deleted_key(&active).unwrap(), None);
}
