//! Finding messages (`ops::FindRows`, `ops::show`, `ops::FindReceived`) and checking the outbox's
//! health (`ops::HealthCheck`) on a seeded table, on every backend.

use std::time::Duration;

use chrono::Utc;
use outbox::ops::{FindReceived, FindRows, HealthCheck};
use outbox::tables::published::Column;
use outbox::tables::published::Status;
use outbox::tables::received;
use outbox_tests::{Backend, TestDb, on_every_backend};
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveEnum, ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, TransactionTrait,
};
use serde_json::json;
use uuid::Uuid;

on_every_backend!(
    rows_are_found_by_each_filter_and_their_combinations,
    inbox_rows_are_found_by_queue_key_and_correlation_id,
    health_check_names_the_first_threshold_crossed,
);

/// Writes one row per (destination, correlation id) pair; returns their ids in that order.
async fn seed(db: &sea_orm::DatabaseConnection, rows: &[(&str, &str)]) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for (destination, correlation) in rows {
        let written = outbox::with_correlation_id((*correlation).to_owned(), async {
            let txn = db.begin().await.unwrap();
            let row = outbox::Message::from_json(*destination, json!({ "d": destination }))
                .enqueue(&txn)
                .await
                .unwrap();
            txn.commit().await.unwrap();
            row
        })
        .await;
        ids.push(written.id);
    }
    ids
}

/// Sets a row's status and backdates it by `minutes`.
async fn age(db: &sea_orm::DatabaseConnection, id: Uuid, status: Status, minutes: i64) {
    outbox::Published::update_many()
        .col_expr(Column::Status, Expr::value(status.to_value()))
        .col_expr(
            Column::Added,
            Expr::value(Utc::now() - chrono::Duration::minutes(minutes)),
        )
        .filter(Column::Id.eq(id))
        .exec(db)
        .await
        .unwrap();
}

fn ids(rows: &[outbox::tables::published::Model]) -> Vec<Uuid> {
    rows.iter().map(|row| row.id).collect()
}

async fn rows_are_found_by_each_filter_and_their_combinations(backend: Backend) {
    let test = TestDb::new(backend).await;
    let db = &test.db;
    let written = seed(
        db,
        &[
            ("/topic/orders.v1", "corr-a"),
            ("/topic/orders.v1", "corr-b"),
            ("/topic/billing", "corr-a"),
            ("/topic/billing", "corr-c"),
        ],
    )
    .await;
    age(db, written[0], Status::Failed, 120).await;
    age(db, written[1], Status::Schedule, 60).await;
    age(db, written[2], Status::Succeeded, 30).await;
    age(db, written[3], Status::Schedule, 10).await;

    // Newest first.
    let all = FindRows::new().run(db).await.unwrap();
    assert_eq!(
        ids(&all),
        vec![written[3], written[2], written[1], written[0]]
    );
    let failed = FindRows::new()
        .status(Status::Failed)
        .run(db)
        .await
        .unwrap();
    assert_eq!(ids(&failed), vec![written[0]]);
    let orders = FindRows::new()
        .destination("/topic/orders.v1")
        .run(db)
        .await
        .unwrap();
    assert_eq!(ids(&orders), vec![written[1], written[0]]);
    let correlated = FindRows::new()
        .correlation_id("corr-a")
        .run(db)
        .await
        .unwrap();
    assert_eq!(ids(&correlated), vec![written[2], written[0]]);
    let one = FindRows::new().id(written[3]).run(db).await.unwrap();
    assert_eq!(ids(&one), vec![written[3]]);
    let window = FindRows::new()
        .since(Utc::now() - chrono::Duration::minutes(90))
        .until(Utc::now() - chrono::Duration::minutes(20))
        .run(db)
        .await
        .unwrap();
    assert_eq!(ids(&window), vec![written[2], written[1]]);
    let combined = FindRows::new()
        .correlation_id("corr-a")
        .status(Status::Succeeded)
        .destination("/topic/billing")
        .run(db)
        .await
        .unwrap();
    assert_eq!(ids(&combined), vec![written[2]]);
    let limited = FindRows::new().limit(2).run(db).await.unwrap();
    assert_eq!(ids(&limited), vec![written[3], written[2]]);
    assert!(
        FindRows::new()
            .correlation_id("nobody")
            .run(db)
            .await
            .unwrap()
            .is_empty()
    );

    let shown = outbox::ops::show(db, written[1]).await.unwrap().unwrap();
    assert_eq!(shown.destination, "/topic/orders.v1");
    assert_eq!(shown.headers["dop-correlation-id"], "corr-b");
    assert!(
        outbox::ops::show(db, Uuid::new_v4())
            .await
            .unwrap()
            .is_none()
    );
    test.drop_database().await;
}

async fn inbox_rows_are_found_by_queue_key_and_correlation_id(backend: Backend) {
    let test = TestDb::new(backend).await;
    let db = &test.db;
    let mut written = Vec::new();
    for (n, (queue, key, correlation)) in [
        ("orders", "m-1", "corr-a"),
        ("orders", "m-2", "corr-b"),
        ("billing", "m-1", "corr-a"),
    ]
    .into_iter()
    .enumerate()
    {
        let added = Utc::now() - chrono::Duration::minutes(10 - n as i64);
        let row = received::ActiveModel {
            id: Set(Uuid::new_v4()),
            queue: Set(queue.to_owned()),
            msg_id: Set(Some(key.to_owned())),
            headers: Set(Some(
                json!({ "dop-msg-id": key, "dop-correlation-id": correlation }),
            )),
            body: Set(Some(json!({ "n": n }))),
            added: Set(added),
            expires_at: Set(added + chrono::Duration::days(30)),
            retry: Set(0),
            status: Set(Status::Succeeded),
        }
        .insert(db)
        .await
        .unwrap();
        written.push(row.id);
    }
    let rows = |found: Vec<received::Model>| found.iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        rows(FindReceived::new().queue("orders").run(db).await.unwrap()),
        vec![written[1], written[0]]
    );
    assert_eq!(
        rows(FindReceived::new().msg_id("m-1").run(db).await.unwrap()),
        vec![written[2], written[0]]
    );
    assert_eq!(
        rows(
            FindReceived::new()
                .correlation_id("corr-a")
                .queue("billing")
                .run(db)
                .await
                .unwrap()
        ),
        vec![written[2]]
    );
    assert_eq!(
        rows(FindReceived::new().limit(1).run(db).await.unwrap()),
        vec![written[2]]
    );
    test.drop_database().await;
}

async fn health_check_names_the_first_threshold_crossed(backend: Backend) {
    let test = TestDb::new(backend).await;
    let db = &test.db;

    let empty = HealthCheck::new()
        .max_pending_age(Duration::from_secs(60))
        .max_failed(0)
        .run(db)
        .await
        .unwrap();
    assert_eq!(
        (
            empty.oldest_pending_age_seconds,
            empty.failed,
            empty.crossed
        ),
        (None, 0, None)
    );

    let written = seed(db, &[("/topic/a", "c"), ("/topic/b", "c")]).await;
    age(db, written[0], Status::Schedule, 5).await;
    let late = HealthCheck::new()
        .max_pending_age(Duration::from_secs(60))
        .run(db)
        .await
        .unwrap();
    assert!(late.oldest_pending_age_seconds.unwrap() >= 300);
    assert!(
        late.crossed
            .as_deref()
            .unwrap()
            .starts_with("the oldest unsent row has waited"),
        "{late:?}"
    );
    let patient = HealthCheck::new()
        .max_pending_age(Duration::from_secs(3600))
        .run(db)
        .await
        .unwrap();
    assert_eq!(patient.crossed, None);

    age(db, written[0], Status::Failed, 120).await;
    age(db, written[1], Status::Succeeded, 0).await;
    let failing = HealthCheck::new().max_failed(0).run(db).await.unwrap();
    assert_eq!(failing.failed, 1);
    assert_eq!(
        failing.crossed.as_deref(),
        Some("1 FAILED rows, more than 0")
    );
    // The failure is two hours old: outside a one-hour window it does not count.
    let recent = HealthCheck::new()
        .max_failed(0)
        .failed_since(Duration::from_secs(3600))
        .run(db)
        .await
        .unwrap();
    assert_eq!((recent.failed, recent.crossed), (0, None));
    test.drop_database().await;
}
