//! The outbox rows a scenario writes and reads back.

use std::time::Duration;

use outbox::Published;
use outbox::tables::published::{Column, Model as Row};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter,
    Statement, TransactionTrait,
};
use serde_json::json;

use crate::stomp_peer::{QueueCleanup, StompPeer, topic_reader, unique};

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

/// Moves the `added` time of every row to `destination` back by `by`, keeping their order: rows
/// written that long ago.
pub async fn set_back(db: &DatabaseConnection, destination: &str, by: Duration) {
    let seconds = by.as_secs();
    let shift = match db.get_database_backend() {
        DbBackend::Postgres => Some(format!(
            "UPDATE published SET added = added - interval '{seconds} seconds' WHERE destination = $1"
        )),
        DbBackend::MySql => Some(format!(
            "UPDATE published SET added = added - INTERVAL {seconds} SECOND WHERE destination = ?"
        )),
        _ => None,
    };
    if let Some(sql) = shift {
        let backend = db.get_database_backend();
        db.execute_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [destination.into()],
        ))
        .await
        .expect("set the rows back");
        return;
    }
    // SQLite keeps its timestamps as text: one row at a time.
    let by = chrono::Duration::from_std(by).expect("a duration");
    for row in Published::find()
        .filter(Column::Destination.eq(destination))
        .all(db)
        .await
        .expect("read the outbox")
    {
        Published::update_many()
            .col_expr(Column::Added, Expr::value(row.added - by))
            .filter(Column::Id.eq(row.id))
            .exec(db)
            .await
            .expect("set a row back");
    }
}

/// A poison row among good ones, and the reader of the good ones.
pub struct PoisonAmongGoods {
    /// Reads `/topic/<key>`, where the good messages go.
    pub reader: StompPeer,
    pub cleanup: QueueCleanup,
    /// The row to a missing exchange: RabbitMQ refuses it (over STOMP with an ERROR that
    /// closes the connection).
    pub bad: Row,
}

/// In one transaction: three messages to `/topic/<key>` (a fresh key from `prefix`), one to a
/// missing exchange, three more to the topic; the topic is read from before.
pub async fn poison_among_goods(db: &DatabaseConnection, prefix: &str) -> PoisonAmongGoods {
    let key = unique(prefix);
    let (reader, cleanup) = topic_reader(&key).await;
    let good = format!("/topic/{key}");
    let poison = format!("/exchange/{}/x", unique("missing"));
    let txn = db.begin().await.unwrap();
    enqueue_numbered(&txn, &good, 0..3).await;
    let bad = outbox::enqueue(&txn, &poison, &json!({"poison": true}))
        .await
        .unwrap();
    enqueue_numbered(&txn, &good, 3..6).await;
    txn.commit().await.unwrap();
    PoisonAmongGoods {
        reader,
        cleanup,
        bad,
    }
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
