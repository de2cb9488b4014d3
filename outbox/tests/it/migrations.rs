//! The outbox migrations, up and down, against real PostgreSQL, MariaDB and SQLite databases.
//!
//! Rows are written with plain SQL, as another service (or the Python library sharing the tables)
//! would write them: the schema, not our entities, must enforce these rules.

use std::time::Duration;

use chrono::{DateTime, FixedOffset, SubsecRound, Utc};
use outbox_tests::{Backend, Migrator, TestDb, on_every_backend};
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{
    ConnectionTrait, DbBackend, DbErr, EntityTrait, ExecResult, Statement, TransactionTrait, Value,
};
use sea_orm_migration::{MigratorTrait, SchemaManager};
use serde_json::json;
use uuid::Uuid;

const MIGRATION_NAME: &str = "outbox_m20261126_000001_create_outbox_tables";
/// Listed after the tables' creation, where it does nothing: see `adopt_django()`.
const ADOPT_MIGRATION_NAME: &str = "outbox_m20261201_000001_adopt_django_tables";
/// Per-key ordering's columns and index.
const KEYS_MIGRATION_NAME: &str = "outbox_m20261201_000002_add_message_keys";
/// The trigger notifies only while a relay is idle (PostgreSQL; nothing elsewhere).
const IDLE_MIGRATION_NAME: &str = "outbox_m20261201_000004_notify_idle_relays_only";
/// The rows keyed writers lock (MariaDB and MySQL; nothing elsewhere).
const KEY_LOCKS_MIGRATION_NAME: &str = "outbox_m20261201_000005_add_key_locks";
/// The table of destinations the broker could not route to.
const UNROUTABLE_MIGRATION_NAME: &str = "outbox_m20261206_000006_add_unroutable_destinations";
const TABLES: [&str; 3] = ["published", "received", "outbox_housekeeping"];

on_every_backend!(
    up_creates_the_three_outbox_tables,
    published_requires_every_column_but_the_optional_ones,
    received_requires_every_column_but_msg_id_headers_and_body,
    received_msg_id_is_unique_per_queue,
    retry_cannot_be_negative,
    housekeeping_keeps_one_row_per_task,
    published_row_round_trips_through_a_seaorm_entity,
    down_drops_the_tables_and_up_recreates_them,
    applied_migration_is_recorded_under_its_namespaced_name,
);

async fn up_creates_the_three_outbox_tables(backend: Backend) {
    let t = TestDb::new(backend).await;
    let manager = SchemaManager::new(&t.db);
    for table in TABLES {
        assert!(
            manager.has_table(table).await.unwrap(),
            "{table} missing on {backend:?}"
        );
    }
    // The rows keyed writers lock, on MariaDB and MySQL only.
    match backend {
        Backend::MariaDb => assert_eq!(count(&t, "outbox_key_lock").await, 65_536),
        _ => assert!(!manager.has_table("outbox_key_lock").await.unwrap()),
    }
    insert(&t.db, "published", &published_row()).await.unwrap();
    insert(&t.db, "received", &received_row("orders", Some("m-1")))
        .await
        .unwrap();
    insert(&t.db, "outbox_housekeeping", &housekeeping_row("purge"))
        .await
        .unwrap();
    for table in TABLES {
        assert_eq!(count(&t, table).await, 1, "{table} on {backend:?}");
    }
    t.drop_database().await;
}

async fn published_requires_every_column_but_the_optional_ones(backend: Backend) {
    let t = TestDb::new(backend).await;
    let optional = [
        "version",
        "claim_token",
        "locked_until",
        "next_attempt_at",
        "last_error",
    ];
    insert(&t.db, "published", &with_nulls(published_row(), &optional))
        .await
        .unwrap();

    let required = [
        "id",
        "destination",
        "body",
        "headers",
        "added",
        "expires_at",
        "retry",
        "status",
    ];
    for column in required {
        let result = insert(&t.db, "published", &with_nulls(published_row(), &[column])).await;
        assert!(
            result.is_err(),
            "published.{column} accepted NULL on {backend:?}"
        );
    }
    assert_eq!(count(&t, "published").await, 1);
    t.drop_database().await;
}

async fn received_requires_every_column_but_msg_id_headers_and_body(backend: Backend) {
    let t = TestDb::new(backend).await;
    let optional = ["msg_id", "headers", "body"];
    insert(
        &t.db,
        "received",
        &with_nulls(received_row("orders", Some("m-1")), &optional),
    )
    .await
    .unwrap();

    for column in ["id", "queue", "added", "expires_at", "retry", "status"] {
        let row = with_nulls(received_row("orders", Some("m-2")), &[column]);
        let result = insert(&t.db, "received", &row).await;
        assert!(
            result.is_err(),
            "received.{column} accepted NULL on {backend:?}"
        );
    }
    assert_eq!(count(&t, "received").await, 1);
    t.drop_database().await;
}

async fn received_msg_id_is_unique_per_queue(backend: Backend) {
    let t = TestDb::new(backend).await;
    insert(&t.db, "received", &received_row("orders", Some("m-1")))
        .await
        .unwrap();

    let duplicate = insert(&t.db, "received", &received_row("orders", Some("m-1"))).await;
    let error = duplicate.expect_err("a second (orders, m-1) row was accepted");
    // SQLite names the columns, not the constraint.
    let expected = match backend {
        Backend::Sqlite => "UNIQUE constraint failed: received.queue, received.msg_id",
        _ => "received_queue_msg_id_key",
    };
    assert!(
        error.to_string().contains(expected),
        "the duplicate failed for another reason on {backend:?}: {error}"
    );

    // Two subscriptions of one service each record the same event once.
    insert(&t.db, "received", &received_row("invoices", Some("m-1")))
        .await
        .unwrap();
    // A message without an id cannot be deduplicated: it is never refused.
    insert(&t.db, "received", &received_row("orders", None))
        .await
        .unwrap();
    insert(&t.db, "received", &received_row("orders", None))
        .await
        .unwrap();
    // Case matters in queue names and message ids, as it does to RabbitMQ. (MariaDB still
    // ignores trailing spaces in keys.)
    insert(&t.db, "received", &received_row("Orders", Some("m-1")))
        .await
        .unwrap();
    insert(&t.db, "received", &received_row("orders", Some("M-1")))
        .await
        .unwrap();

    assert_eq!(count(&t, "received").await, 6);
    t.drop_database().await;
}

async fn retry_cannot_be_negative(backend: Backend) {
    let t = TestDb::new(backend).await;
    for (table, row) in [
        ("published", published_row()),
        ("received", received_row("orders", Some("m-1"))),
    ] {
        let negative = with_value(row.clone(), "retry", Value::from(-1));
        let result = insert(&t.db, table, &negative).await;
        assert!(result.is_err(), "{table}.retry accepted -1 on {backend:?}");
        insert(&t.db, table, &with_value(row, "retry", Value::from(0)))
            .await
            .unwrap();
    }
    t.drop_database().await;
}

async fn housekeeping_keeps_one_row_per_task(backend: Backend) {
    let t = TestDb::new(backend).await;
    insert(&t.db, "outbox_housekeeping", &housekeeping_row("purge"))
        .await
        .unwrap();
    let second = insert(&t.db, "outbox_housekeeping", &housekeeping_row("purge")).await;
    assert!(
        second.is_err(),
        "a second 'purge' row was accepted on {backend:?}"
    );
    let no_time = with_nulls(housekeeping_row("expire"), &["last_run_at"]);
    assert!(
        insert(&t.db, "outbox_housekeeping", &no_time)
            .await
            .is_err()
    );
    t.drop_database().await;
}

async fn published_row_round_trips_through_a_seaorm_entity(backend: Backend) {
    let t = TestDb::new(backend).await;
    // A non-UTC offset and microseconds: the instant, to the microsecond, is what must survive.
    let added = Utc::now()
        .trunc_subsecs(6)
        .with_timezone(&FixedOffset::east_opt(2 * 3600).unwrap());
    let written = published::Model {
        id: Uuid::new_v4(),
        version: Some("v1".into()),
        destination: "/topic/orders.v1".into(),
        body: json!({"id": 7, "customer": "ada", "total": 4200}),
        headers: json!({"dop-msg-id": "0b6d", "dop-correlation-id": "c0ff"}),
        added,
        expires_at: added + chrono::Duration::days(1),
        retry: 3,
        status: 1,
        claim_token: Some(Uuid::new_v4()),
        locked_until: Some(added + chrono::Duration::seconds(30)),
        next_attempt_at: None,
        last_error: Some("broker refused: PRECONDITION_FAILED".into()),
    };
    published::Entity::insert(published::ActiveModel::from(written.clone()))
        .exec_without_returning(&t.db)
        .await
        .unwrap();

    let read = published::Entity::find_by_id(written.id)
        .one(&t.db)
        .await
        .unwrap();
    assert_eq!(read.as_ref(), Some(&written), "on {backend:?}");
    t.drop_database().await;
}

async fn down_drops_the_tables_and_up_recreates_them(backend: Backend) {
    let t = TestDb::new(backend).await;
    insert(&t.db, "published", &published_row()).await.unwrap();

    Migrator::down(&t.db, None).await.unwrap();
    let manager = SchemaManager::new(&t.db);
    for table in TABLES.iter().chain(&["outbox_key_lock"]) {
        assert!(
            !manager.has_table(table).await.unwrap(),
            "{table} left behind on {backend:?}"
        );
    }
    if backend == Backend::Postgres {
        assert_eq!(
            notify_functions(&t).await,
            0,
            "outbox_published_notify() left behind"
        );
    }

    Migrator::up(&t.db, None).await.unwrap();
    for table in TABLES {
        assert!(
            manager.has_table(table).await.unwrap(),
            "{table} not recreated on {backend:?}"
        );
        assert_eq!(count(&t, table).await, 0);
    }
    insert(&t.db, "published", &published_row()).await.unwrap();
    t.drop_database().await;
}

async fn applied_migration_is_recorded_under_its_namespaced_name(backend: Backend) {
    let t = TestDb::new(backend).await;
    let applied = Migrator::get_applied_migrations(&t.db).await.unwrap();
    let names: Vec<&str> = applied.iter().map(|m| m.name()).collect();
    assert_eq!(
        names,
        [
            MIGRATION_NAME,
            ADOPT_MIGRATION_NAME,
            KEYS_MIGRATION_NAME,
            IDLE_MIGRATION_NAME,
            KEY_LOCKS_MIGRATION_NAME,
            UNROUTABLE_MIGRATION_NAME,
        ]
    );
    assert!(
        Migrator::get_pending_migrations(&t.db)
            .await
            .unwrap()
            .is_empty()
    );
    t.drop_database().await;
}

#[tokio::test]
async fn postgres_notifies_outbox_published_when_an_insert_commits_and_not_before() {
    let t = TestDb::new(Backend::Postgres).await;
    let mut listener = listen(&t).await;

    let txn = t.db.begin().await.unwrap();
    insert(&txn, "published", &published_row()).await.unwrap();
    assert_no_notification(&mut listener, "before commit").await;

    txn.commit().await.unwrap();
    let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("no notification within 5 s of the commit")
        .unwrap();
    assert_eq!(notification.channel(), "outbox_published");
    assert_eq!(notification.payload(), "");
    t.drop_database().await;
}

#[tokio::test]
async fn postgres_notifies_once_per_transaction_however_many_rows_it_inserts() {
    let t = TestDb::new(Backend::Postgres).await;
    let mut listener = listen(&t).await;

    let txn = t.db.begin().await.unwrap();
    for _ in 0..3 {
        insert(&txn, "published", &published_row()).await.unwrap();
    }
    txn.commit().await.unwrap();

    tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("no notification within 5 s of the commit")
        .unwrap();
    assert_no_notification(&mut listener, "after the first one").await;
    t.drop_database().await;
}

#[tokio::test]
async fn postgres_notifies_nobody_while_no_relay_is_idle() {
    let t = TestDb::new(Backend::Postgres).await;
    let mut listener = listen(&t).await;
    t.db.execute_unprepared("DELETE FROM outbox_idle_relay")
        .await
        .unwrap();
    let txn = t.db.begin().await.unwrap();
    insert(&txn, "published", &published_row()).await.unwrap();
    txn.commit().await.unwrap();
    assert_no_notification(&mut listener, "with no relay idle").await;
    // An announcement past its lease counts for nothing either.
    t.db.execute_unprepared(
        "INSERT INTO outbox_idle_relay (relay, until) VALUES (gen_random_uuid(), now() - interval '1 second')",
    )
    .await
    .unwrap();
    insert(&t.db, "published", &published_row()).await.unwrap();
    assert_no_notification(&mut listener, "with an expired announcement").await;
    t.db.execute_unprepared(
        "INSERT INTO outbox_idle_relay (relay, until) VALUES (gen_random_uuid(), now() + interval '1 hour')",
    )
    .await
    .unwrap();
    insert(&t.db, "published", &published_row()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a relay is idle: notified")
        .unwrap();
    t.drop_database().await;
}

#[tokio::test]
async fn postgres_rolled_back_insert_notifies_nobody() {
    let t = TestDb::new(Backend::Postgres).await;
    let mut listener = listen(&t).await;

    let txn = t.db.begin().await.unwrap();
    insert(&txn, "published", &published_row()).await.unwrap();
    txn.rollback().await.unwrap();

    assert_no_notification(&mut listener, "after a rollback").await;
    t.drop_database().await;
}

/// Listens, with a relay announced idle (writers notify only then).
async fn listen(t: &TestDb) -> PgListener {
    t.db.execute_unprepared(
        "INSERT INTO outbox_idle_relay (relay, until) VALUES (gen_random_uuid(), now() + interval '1 hour')",
    )
    .await
    .unwrap();
    let mut listener = PgListener::connect(&t.url).await.unwrap();
    listener.listen("outbox_published").await.unwrap();
    listener
}

async fn assert_no_notification(listener: &mut PgListener, when: &str) {
    if let Ok(received) = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await {
        panic!("a notification arrived {when}: {received:?}");
    }
}

async fn notify_functions(t: &TestDb) -> i64 {
    let sql = "SELECT count(*) AS n FROM pg_proc WHERE proname = 'outbox_published_notify'";
    let row =
        t.db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
            .await
            .unwrap();
    row.unwrap().try_get("", "n").unwrap()
}

/// A row as (column, value) pairs; `None` is written as a literal SQL `NULL`.
type Row = Vec<(&'static str, Option<Value>)>;

fn published_row() -> Row {
    let now = Utc::now().fixed_offset();
    vec![
        ("id", Some(Value::from(Uuid::new_v4()))),
        ("version", Some(Value::from("v1"))),
        ("destination", Some(Value::from("/topic/orders.v1"))),
        ("body", Some(Value::from(json!({"id": 1})))),
        (
            "headers",
            Some(Value::from(
                json!({"dop-msg-id": Uuid::new_v4().to_string()}),
            )),
        ),
        ("added", Some(Value::from(now))),
        (
            "expires_at",
            Some(Value::from(now + chrono::Duration::days(1))),
        ),
        ("retry", Some(Value::from(0))),
        ("status", Some(Value::from(1))),
        ("claim_token", Some(Value::from(Uuid::new_v4()))),
        ("locked_until", Some(Value::from(now))),
        ("next_attempt_at", Some(Value::from(now))),
        ("last_error", Some(Value::from("timeout"))),
    ]
}

fn received_row(queue: &str, msg_id: Option<&str>) -> Row {
    let now = Utc::now().fixed_offset();
    vec![
        ("id", Some(Value::from(Uuid::new_v4()))),
        ("queue", Some(Value::from(queue))),
        ("msg_id", msg_id.map(Value::from)),
        ("headers", Some(Value::from(json!({"dop-msg-id": msg_id})))),
        ("body", Some(Value::from(json!({"id": 1})))),
        ("added", Some(Value::from(now))),
        (
            "expires_at",
            Some(Value::from(now + chrono::Duration::days(1))),
        ),
        ("retry", Some(Value::from(0))),
        ("status", Some(Value::from(2))),
    ]
}

fn housekeeping_row(task: &str) -> Row {
    let now: DateTime<FixedOffset> = Utc::now().fixed_offset();
    vec![
        ("task", Some(Value::from(task))),
        ("last_run_at", Some(Value::from(now))),
    ]
}

fn with_nulls(mut row: Row, columns: &[&str]) -> Row {
    for (column, value) in &mut row {
        if columns.contains(column) {
            *value = None;
        }
    }
    row
}

fn with_value(mut row: Row, column: &str, value: Value) -> Row {
    for (name, cell) in &mut row {
        if *name == column {
            *cell = Some(value.clone());
        }
    }
    row
}

/// `INSERT INTO <table> (...) VALUES (...)` in the backend's own placeholder syntax.
async fn insert<C: ConnectionTrait>(db: &C, table: &str, row: &Row) -> Result<ExecResult, DbErr> {
    let backend = db.get_database_backend();
    let mut values = Vec::new();
    let placeholders: Vec<String> = row
        .iter()
        .map(|(_, cell)| match cell {
            None => "NULL".to_owned(),
            Some(value) => {
                values.push(value.clone());
                match backend {
                    DbBackend::Postgres => format!("${}", values.len()),
                    _ => "?".to_owned(),
                }
            }
        })
        .collect();
    let columns: Vec<&str> = row.iter().map(|(column, _)| *column).collect();
    let sql = format!(
        "INSERT INTO {table} ({}) VALUES ({})",
        columns.join(", "),
        placeholders.join(", ")
    );
    db.execute_raw(Statement::from_sql_and_values(backend, sql, values))
        .await
}

async fn count(t: &TestDb, table: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) AS n FROM {table}");
    let row =
        t.db.query_one_raw(Statement::from_string(t.backend.db_backend(), sql))
            .await;
    row.unwrap().unwrap().try_get("", "n").unwrap()
}

/// The `published` table as a service's SeaORM entity sees it.
mod published {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "published")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub version: Option<String>,
        pub destination: String,
        pub body: Json,
        pub headers: Json,
        pub added: DateTimeWithTimeZone,
        pub expires_at: DateTimeWithTimeZone,
        pub retry: i32,
        pub status: i32,
        pub claim_token: Option<Uuid>,
        pub locked_until: Option<DateTimeWithTimeZone>,
        pub next_attempt_at: Option<DateTimeWithTimeZone>,
        pub last_error: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
