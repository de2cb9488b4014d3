//! The outbox rows a scenario writes and reads back.

use outbox::Published;
use outbox::tables::published::Model as Row;
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, TransactionTrait};
use serde_json::json;

/// Every row of the outbox table.
pub async fn rows(db: &DatabaseConnection) -> Vec<Row> {
    Published::find().all(db).await.expect("read the outbox")
}

/// `count` messages `{"n": 0}`, `{"n": 1}`... to `destination`, saved in one transaction.
pub async fn enqueue_many(db: &DatabaseConnection, destination: &str, count: usize) {
    let txn = db.begin().await.unwrap();
    let messages = (0..count).map(|n| outbox::Message::from_json(destination, json!({ "n": n })));
    outbox::enqueue_all(&txn, messages).await.unwrap();
    txn.commit().await.unwrap();
}

/// In one transaction: three good messages to `good`, one to `poison`, three more to `good`.
/// Returns the poison row.
pub async fn enqueue_poison_between_goods(
    db: &DatabaseConnection,
    good: &str,
    poison: &str,
) -> Row {
    let txn = db.begin().await.unwrap();
    enqueue_numbered(&txn, good, 0..3).await;
    let bad = outbox::enqueue(&txn, poison, &json!({"poison": true}))
        .await
        .unwrap();
    enqueue_numbered(&txn, good, 3..6).await;
    txn.commit().await.unwrap();
    bad
}

async fn enqueue_numbered(
    db: &impl ConnectionTrait,
    destination: &str,
    ns: std::ops::Range<usize>,
) {
    for n in ns {
        outbox::enqueue(db, destination, &json!({ "n": n }))
            .await
            .unwrap();
    }
}
