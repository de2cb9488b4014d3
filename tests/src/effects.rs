//! The business table a test consumer's callback writes to, in the message's transaction, and
//! what it says: one row per effect, so a message processed twice shows as two rows.

use std::collections::HashMap;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};

/// Creates the `effects` table (no unique key).
pub async fn create_effects_table(db: &DatabaseConnection) {
    db.execute_unprepared(
        "CREATE TABLE effects (msg_id VARCHAR(100) NOT NULL, note VARCHAR(100) NOT NULL)",
    )
    .await
    .expect("create the effects table");
}

/// Records one effect of `msg_id` on `db` (a callback's transaction).
pub async fn insert_effect(
    db: &impl ConnectionTrait,
    msg_id: &str,
    note: &str,
) -> Result<(), sea_orm::DbErr> {
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::MySql => "INSERT INTO effects (msg_id, note) VALUES (?, ?)",
        _ => "INSERT INTO effects (msg_id, note) VALUES ($1, $2)",
    };
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        sql,
        [msg_id.into(), note.into()],
    ))
    .await
    .map(|_| ())
}

/// Every effect row: (msg_id, note).
pub async fn effects(db: &impl ConnectionTrait) -> Vec<(String, String)> {
    let statement = Statement::from_string(
        db.get_database_backend(),
        "SELECT msg_id, note FROM effects",
    );
    db.query_all_raw(statement)
        .await
        .expect("read effects")
        .iter()
        .map(|row| {
            (
                row.try_get_by_index::<String>(0).expect("msg_id"),
                row.try_get_by_index::<String>(1).expect("note"),
            )
        })
        .collect()
}

/// Effect rows per message id, as `db` sees them.
pub async fn effect_counts(db: &impl ConnectionTrait) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (msg_id, _) in effects(db).await {
        *counts.entry(msg_id).or_default() += 1;
    }
    counts
}

/// Effect rows with `note`.
pub async fn effect_notes(db: &impl ConnectionTrait, note: &str) -> usize {
    effects(db).await.iter().filter(|(_, n)| n == note).count()
}

/// Messages with at least one effect.
pub async fn distinct_effects(db: &impl ConnectionTrait) -> usize {
    effect_counts(db).await.len()
}
