//! The atomic write path against real databases: a `#[publish]` entity and its outbox rows are
//! committed together or not at all, on PostgreSQL, MariaDB and SQLite.

use outbox::tables::published::Status;
use outbox::{Error, Published};
use outbox_tests::logs::Logs;
use outbox_tests::{Backend, TestDb, on_every_backend};
use sea_orm::ActiveValue::Set;
use sea_orm::{
    ActiveModelTrait, ConnectionTrait, DatabaseConnection, EntityTrait, ModelTrait, PaginatorTrait,
    QueryOrder, Schema, TransactionTrait,
};
use serde_json::json;

mod order {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "orders")]
    #[outbox::publish(destination = "/topic/orders", version = "v1", fields(customer, total))]
    #[outbox::publish(destination = "/topic/audit", serializer = audit, on(insert, update, delete))]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub customer: String,
        pub total: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    /// The audit record; it cannot be encoded for one customer name, to make the outbox write
    /// fail after the entity row was written.
    pub struct Audit<'a>(&'a Model);

    fn audit(model: &Model) -> Audit<'_> {
        Audit(model)
    }

    impl serde::Serialize for Audit<'_> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            if self.0.customer == "unencodable" {
                return Err(serde::ser::Error::custom(
                    "this audit record cannot be encoded",
                ));
            }
            serde_json::json!({ "order": self.0.id, "customer": self.0.customer })
                .serialize(serializer)
        }
    }
}

mod note {
    use sea_orm::entity::prelude::*;

    /// An entity allowed to publish on an autocommit connection.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "notes")]
    #[outbox::publish(destination = "/topic/notes", allow_autocommit)]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub text: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

async fn create_tables(db: &DatabaseConnection) {
    let schema = Schema::new(db.get_database_backend());
    for stmt in [
        schema.create_table_from_entity(order::Entity),
        schema.create_table_from_entity(note::Entity),
    ] {
        db.execute(&stmt).await.expect("create a test table");
    }
}

async fn setup(backend: Backend) -> TestDb {
    let test = TestDb::new(backend).await;
    create_tables(&test.db).await;
    test
}

fn new_order(customer: &str, total: i64) -> order::ActiveModel {
    order::ActiveModel {
        customer: Set(customer.to_owned()),
        total: Set(total),
        ..Default::default()
    }
}

async fn outbox_rows(db: &DatabaseConnection) -> Vec<outbox::tables::published::Model> {
    Published::find()
        .order_by_asc(outbox::tables::published::Column::Destination)
        .all(db)
        .await
        .expect("read the outbox")
}

async fn order_count(db: &DatabaseConnection) -> u64 {
    order::Entity::find().count(db).await.expect("count orders")
}

on_every_backend!(
    insert_writes_the_entity_and_one_row_per_attribute,
    update_publishes_and_delete_publishes_the_key,
    failing_outbox_write_rolls_back_the_entity,
    failing_outbox_insert_statement_rolls_back_the_entity,
    failing_entity_write_leaves_no_outbox_row,
    savepoint_failure_leaves_the_outer_transaction_usable,
    autocommit_save_is_refused_before_anything_is_written,
    allow_autocommit_entity_publishes_on_a_plain_connection,
    without_publishing_saves_the_entity_alone,
    rows_inherit_the_ambient_correlation_id,
    enqueue_writes_an_explicit_row_with_version_and_headers,
);

async fn insert_writes_the_entity_and_one_row_per_attribute(backend: Backend) {
    let test = setup(backend).await;
    let saved = outbox::insert(&test.db, new_order("ada", 4200))
        .await
        .expect("insert");
    assert_eq!(order_count(&test.db).await, 1);

    let rows = outbox_rows(&test.db).await;
    assert_eq!(rows.len(), 2, "one row per #[publish]: {rows:?}");
    let (audit, orders) = (&rows[0], &rows[1]);

    assert_eq!(orders.destination, "/topic/orders.v1");
    assert_eq!(orders.version.as_deref(), Some("v1"));
    assert_eq!(
        orders.body,
        json!({"id": saved.id, "customer": "ada", "total": 4200})
    );
    assert_eq!(orders.status, Status::Schedule);
    assert_eq!(orders.retry, 0);
    assert_eq!(orders.claim_token, None);
    assert_eq!(orders.next_attempt_at, None);
    assert_eq!(orders.last_error, None);
    let days = (orders.expires_at - orders.added).num_days();
    assert_eq!(days, 30, "expires_at = added + 30 days");

    let headers = orders.headers.as_object().expect("headers are an object");
    assert_eq!(headers["dop-msg-id"], orders.id.to_string());
    assert_eq!(headers["dop-msg-destination"], "/topic/orders.v1");
    assert_eq!(headers["dop-msg-type"], "Published");
    let sent_time = headers["dop-msg-sent-time"].as_str().unwrap();
    assert_eq!(sent_time, outbox::headers::format_sent_time(orders.added));
    assert!(
        sent_time.ends_with('Z') && sent_time.len() == 24,
        "{sent_time}"
    );
    assert!(uuid::Uuid::parse_str(headers["dop-correlation-id"].as_str().unwrap()).is_ok());

    assert_eq!(audit.destination, "/topic/audit");
    assert_eq!(audit.version, None);
    assert_eq!(audit.body, json!({"order": saved.id, "customer": "ada"}));
    assert_ne!(audit.id, orders.id);
    assert_eq!(
        audit.headers["dop-correlation-id"], orders.headers["dop-correlation-id"],
        "the rows of one save share a correlation id"
    );
    test.drop_database().await;
}

async fn update_publishes_and_delete_publishes_the_key(backend: Backend) {
    let test = setup(backend).await;
    let saved = outbox::insert(&test.db, new_order("ada", 1)).await.unwrap();
    let mut changed: order::ActiveModel = saved.clone().into();
    changed.total = Set(2);
    outbox::update(&test.db, changed).await.expect("update");
    let rows = outbox_rows(&test.db).await;
    assert_eq!(
        rows.len(),
        4,
        "insert and update both publish on both routes"
    );
    assert!(
        rows.iter()
            .any(|r| r.body == json!({"id": saved.id, "customer": "ada", "total": 2}))
    );

    let txn = test.db.begin().await.unwrap();
    saved.clone().delete(&txn).await.expect("delete");
    txn.commit().await.unwrap();
    let rows = outbox_rows(&test.db).await;
    assert_eq!(
        rows.len(),
        5,
        "only the audit route publishes deletes: {rows:?}"
    );
    assert!(
        rows.iter()
            .any(|r| r.destination == "/topic/audit" && r.body == json!({"id": saved.id}))
    );
    assert_eq!(order_count(&test.db).await, 0);

    // The same row again, and a row that never was: nothing deleted, nothing published.
    let txn = test.db.begin().await.unwrap();
    saved.clone().delete(&txn).await.expect("delete again");
    let mut never = saved.clone();
    never.id += 1000;
    never
        .delete(&txn)
        .await
        .expect("delete a row that does not exist");
    txn.commit().await.unwrap();
    assert_eq!(
        outbox_rows(&test.db).await.len(),
        5,
        "deleting no row publishes nothing"
    );
    test.drop_database().await;
}

async fn failing_outbox_write_rolls_back_the_entity(backend: Backend) {
    let test = setup(backend).await;
    let err = outbox::insert(&test.db, new_order("unencodable", 1))
        .await
        .expect_err("the audit body cannot be encoded");
    match &err {
        Error::Serialize {
            entity,
            destination,
            ..
        } => {
            assert!(entity.ends_with("order"), "{entity}");
            assert_eq!(destination, "/topic/audit");
        }
        other => panic!("expected a typed serialize error, got {other:?}"),
    }
    assert!(err.to_string().contains("cannot be encoded"), "{err}");
    assert_eq!(
        order_count(&test.db).await,
        0,
        "the entity row was rolled back"
    );
    assert!(outbox_rows(&test.db).await.is_empty());
    test.drop_database().await;
}

async fn failing_outbox_insert_statement_rolls_back_the_entity(backend: Backend) {
    let test = setup(backend).await;
    test.db
        .execute_unprepared("ALTER TABLE published RENAME TO published_elsewhere")
        .await
        .unwrap();
    let err = outbox::insert(&test.db, new_order("ada", 1))
        .await
        .expect_err("the outbox table is gone");
    assert!(matches!(err, Error::Database(_)), "{err:?}");
    assert_eq!(
        order_count(&test.db).await,
        0,
        "the entity row was rolled back"
    );
    test.drop_database().await;
}

async fn failing_entity_write_leaves_no_outbox_row(backend: Backend) {
    let test = setup(backend).await;
    let first = outbox::insert(&test.db, new_order("ada", 1)).await.unwrap();
    let before = outbox_rows(&test.db).await.len();
    let result = outbox::transaction(&test.db, |txn| {
        Box::pin(async move {
            outbox::enqueue(txn, "/topic/side-effect", &json!({"n": 1})).await?;
            let mut duplicate = new_order("bob", 2);
            duplicate.id = Set(first.id);
            duplicate.insert(txn).await?;
            Ok::<_, Error>(())
        })
    })
    .await;
    assert!(
        result.is_err(),
        "a duplicate primary key fails the entity write"
    );
    assert_eq!(
        outbox_rows(&test.db).await.len(),
        before,
        "no outbox row survived"
    );
    assert_eq!(order_count(&test.db).await, 1);
    test.drop_database().await;
}

async fn savepoint_failure_leaves_the_outer_transaction_usable(backend: Backend) {
    let test = setup(backend).await;
    let outer = test.db.begin().await.unwrap();
    outbox::insert(&outer, new_order("unencodable", 1))
        .await
        .expect_err("fails inside its savepoint");
    let kept = outbox::insert(&outer, new_order("ada", 2))
        .await
        .expect("the outer transaction is still usable");
    outer.commit().await.unwrap();

    let orders = order::Entity::find().all(&test.db).await.unwrap();
    assert_eq!(orders, vec![kept.clone()]);
    let rows = outbox_rows(&test.db).await;
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|r| r.body["id"] == json!(kept.id) || r.body["order"] == json!(kept.id))
    );
    test.drop_database().await;
}

async fn autocommit_save_is_refused_before_anything_is_written(backend: Backend) {
    let test = setup(backend).await;
    let err = new_order("ada", 1)
        .insert(&test.db)
        .await
        .expect_err("a publishing save on a pool connection is refused");
    let message = err.to_string();
    assert!(message.contains("outside a transaction"), "{message}");
    assert!(
        message.contains("outbox::save"),
        "the error names the fix: {message}"
    );
    assert_eq!(order_count(&test.db).await, 0, "the entity was not written");
    assert!(outbox_rows(&test.db).await.is_empty());

    // Inside the library's own helpers the typed error comes back.
    let typed = outbox::transaction(&test.db, |_txn| {
        let db = test.db.clone();
        Box::pin(async move { Ok::<_, Error>(new_order("ada", 1).insert(&db).await?) })
    })
    .await
    .expect_err("still refused");
    assert!(matches!(typed, Error::NotInTransaction { .. }), "{typed:?}");
    test.drop_database().await;
}

async fn allow_autocommit_entity_publishes_on_a_plain_connection(backend: Backend) {
    let test = setup(backend).await;
    let note = note::ActiveModel {
        text: Set("hello".into()),
        ..Default::default()
    }
    .insert(&test.db)
    .await
    .expect("allowed on an autocommit connection");
    let rows = outbox_rows(&test.db).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].body, json!({"id": note.id, "text": "hello"}));
    test.drop_database().await;
}

async fn without_publishing_saves_the_entity_alone(backend: Backend) {
    let test = setup(backend).await;
    let db = test.db.clone();
    outbox::write::without_publishing(async move { new_order("backfill", 1).insert(&db).await })
        .await
        .expect("no outbox row, so no transaction needed");
    assert_eq!(order_count(&test.db).await, 1);
    assert!(outbox_rows(&test.db).await.is_empty());
    test.drop_database().await;
}

async fn rows_inherit_the_ambient_correlation_id(backend: Backend) {
    let test = setup(backend).await;
    let db = test.db.clone();
    outbox::with_correlation_id("req-7", async move {
        outbox::insert(&db, new_order("ada", 1)).await.unwrap();
        outbox::enqueue(&db, "/topic/explicit", &json!({}))
            .await
            .unwrap();
    })
    .await;
    outbox::enqueue(&test.db, "/topic/outside", &json!({}))
        .await
        .unwrap();
    let rows = outbox_rows(&test.db).await;
    assert_eq!(rows.len(), 4);
    for row in &rows {
        let correlation = &row.headers["dop-correlation-id"];
        if row.destination == "/topic/outside" {
            assert_ne!(correlation, "req-7");
        } else {
            assert_eq!(correlation, "req-7", "{}", row.destination);
        }
    }
    test.drop_database().await;
}

async fn enqueue_writes_an_explicit_row_with_version_and_headers(backend: Backend) {
    let test = setup(backend).await;
    let row = outbox::Message::new("/topic/prices", &json!({"sku": "A-1", "price": 990}))
        .unwrap()
        .version("v2")
        .header("x-custom", "a:b")
        .header("dop-correlation-id", "my-correlation-id")
        .header("dop-msg-id", "try-override")
        .enqueue(&test.db)
        .await
        .unwrap();
    let stored = Published::find_by_id(row.id)
        .one(&test.db)
        .await
        .unwrap()
        .unwrap();
    // All but `seq`, which the database draws (see `Model::seq`).
    let stored_but_seq = outbox::tables::published::Model {
        seq: None,
        ..stored.clone()
    };
    assert_eq!(
        stored_but_seq, row,
        "what enqueue returns is what was stored"
    );
    assert_eq!(stored.destination, "/topic/prices.v2");
    assert_eq!(stored.headers["x-custom"], "a:b");
    assert_eq!(stored.headers["dop-correlation-id"], "my-correlation-id");
    assert_eq!(stored.headers["dop-msg-id"], stored.id.to_string());

    let err = outbox::enqueue(&test.db, "", &json!({})).await.unwrap_err();
    assert!(matches!(err, Error::InvalidDestination { .. }), "{err:?}");
    let many = (0..1200).map(|n| outbox::Message::from_json("/topic/bulk", json!({ "n": n })));
    let txn = test.db.begin().await.unwrap();
    let written = outbox::enqueue_all(&txn, many).await.unwrap();
    txn.commit().await.unwrap();
    assert_eq!(written.len(), 1200);
    assert_eq!(Published::find().count(&test.db).await.unwrap(), 1201);
    test.drop_database().await;
}

#[tokio::test]
async fn a_write_of_copied_headers_stores_none_reserved_and_warns_once_naming_them() {
    let test = setup(Backend::Postgres).await;
    // What a consumer's callback would copy from the message it got.
    let incoming = [
        ("subscription", "sub-1"),
        ("message-id", "T_sub-1@@session-1@@7"),
        ("redelivered", "true"),
        ("x-delivery-count", "1"),
        ("cap-msg-id", "order-7"),
        ("dop-msg-id", "parent"),
        ("dop-correlation-id", "request-42"),
        ("x-tenant", "acme"),
    ];
    let copies = (0..2).map(|n| {
        incoming.iter().fold(
            outbox::Message::from_json("/topic/shipments", json!({ "n": n })),
            |copy, (name, value)| copy.header(*name, *value),
        )
    });
    let (logs, guard) = Logs::capture_here("warn");
    let txn = test.db.begin().await.unwrap();
    let rows = outbox::enqueue_all(&txn, copies).await.unwrap();
    txn.commit().await.unwrap();
    drop(guard);
    let logs = logs.text();
    let warnings: Vec<&str> = logs.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "one warning for the write: {logs}");
    assert!(
        warnings[0].contains(
            "headers=cap-msg-id, dop-msg-id, message-id, redelivered, subscription, x-delivery-count"
        ) && warnings[0].contains("rows=2"),
        "{logs}"
    );
    for row in Published::find().all(&test.db).await.unwrap() {
        let headers = row.headers.as_object().unwrap();
        let mut names: Vec<&str> = headers.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "dop-correlation-id",
                "dop-msg-destination",
                "dop-msg-id",
                "dop-msg-sent-time",
                "dop-msg-type",
                "x-tenant"
            ]
        );
        assert_eq!(headers["dop-msg-id"], row.id.to_string());
        assert_eq!(headers["dop-correlation-id"], "request-42");
    }
    assert_eq!(rows.len(), 2);
    test.drop_database().await;
}
