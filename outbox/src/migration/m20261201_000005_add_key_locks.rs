//! `outbox_m20261201_000005_add_key_locks`: on MariaDB and MySQL, the rows a keyed write locks.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

/// MariaDB and MySQL: `outbox_key_lock`, 65,536 rows (`bucket` 0 to 65,535) that a keyed write
/// locks (`SELECT .. FOR UPDATE`, one row per key's bucket, in ascending order) before it
/// inserts, so that the writers of one key run one after the other until they commit, as the
/// advisory locks do on PostgreSQL: `seq`, drawn at insert after the lock, is then commit order
/// per key. Keys share a bucket by hash (one chance in 65,536 for two keys): two writers of
/// such keys wait for each other too. Nothing on PostgreSQL and SQLite. Recorded as
/// `outbox_m20261201_000005_add_key_locks`.
pub struct AddKeyLocks;

impl MigrationName for AddKeyLocks {
    fn name(&self) -> &str {
        "outbox_m20261201_000005_add_key_locks"
    }
}

// The rows the writers lock (see `published::lock_keys`): 0 to 65,535, as filled below.
const _: () = assert!(crate::write::KEY_LOCK_BUCKETS == 256 * 256);

const CREATE_KEY_LOCK_TABLE: &str = "CREATE TABLE IF NOT EXISTS outbox_key_lock (\
    bucket INT NOT NULL PRIMARY KEY) ENGINE=InnoDB";
// 256 x 256 from a recursive CTE of 256 rows: MySQL stops a recursion at 1,000 levels by
// default. `IGNORE`: a rerun after an interrupted `up` finds some rows there.
const FILL_KEY_LOCK_TABLE: &str = "INSERT IGNORE INTO outbox_key_lock (bucket) \
    WITH RECURSIVE byte (n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM byte WHERE n < 255) \
    SELECT high.n * 256 + low.n FROM byte AS high CROSS JOIN byte AS low";
const DROP_KEY_LOCK_TABLE: &str = "DROP TABLE IF EXISTS outbox_key_lock";

#[async_trait::async_trait]
impl MigrationTrait for AddKeyLocks {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::MySql {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared(CREATE_KEY_LOCK_TABLE).await?;
        db.execute_unprepared(FILL_KEY_LOCK_TABLE).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::MySql {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared(DROP_KEY_LOCK_TABLE)
            .await?;
        Ok(())
    }
}
