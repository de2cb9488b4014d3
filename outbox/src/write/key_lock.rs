//! Ordering keys' write locks: the writers of one key are serialised until they commit, so that
//! per key `seq` order is commit order and no relay sees a later row of a key while an earlier
//! one may still commit.

use sea_orm::{ConnectionTrait, DbErr};

use super::connection::{ConnectionKind, connection_kind};
use crate::error::Error;
use crate::tables::published::Model;

/// Before keyed rows are inserted, holds each key until the transaction ends, in one order, so
/// that the writers of one key run one after the other until they commit: on PostgreSQL a
/// transaction-scoped advisory lock per key (by hash), on MariaDB and MySQL the row of the key's
/// bucket in `outbox_key_lock` (`SELECT .. FOR UPDATE`; migration
/// `outbox_m20261201_000005_add_key_locks`); SQLite has one writer at a time anyway. Sequence numbers
/// are drawn after the lock, at insert: per key, `seq` order is then commit order, and no relay
/// can see a later row of a key while an earlier one may still commit. A statement on an
/// autocommit connection would release the lock before its insert: a keyed row is refused there.
pub(super) async fn lock_keys<C: ConnectionTrait>(conn: &C, rows: &[Model]) -> Result<(), Error> {
    let backend = conn.get_database_backend();
    if backend == sea_orm::DbBackend::Sqlite {
        return Ok(());
    }
    let mut hashes: Vec<i64> = rows
        .iter()
        .filter_map(|row| row.msg_key.as_deref())
        .map(key_lock_id)
        .collect();
    if hashes.is_empty() {
        return Ok(());
    }
    if connection_kind::<C>() == ConnectionKind::Autocommit {
        return Err(Error::KeyedOutsideTransaction {
            connection: std::any::type_name::<C>(),
        });
    }
    // The ids are numbers this function computed: written into the statement, which then needs
    // no array binding.
    let statement = if backend == sea_orm::DbBackend::Postgres {
        hashes.sort_unstable();
        hashes.dedup();
        // `unnest` yields the array in order: the locks are taken in ascending order, so two
        // writers that lock the same keys in one call never deadlock.
        let ids: Vec<String> = hashes.iter().map(i64::to_string).collect();
        format!(
            "SELECT count(pg_advisory_xact_lock(k)) FROM unnest(ARRAY[{}]::bigint[]) AS k",
            ids.join(",")
        )
    } else {
        let mut buckets: Vec<u64> = hashes
            .iter()
            .map(|hash| hash.unsigned_abs() % KEY_LOCK_BUCKETS)
            .collect();
        buckets.sort_unstable();
        buckets.dedup();
        // Rows of the primary key, read in ascending order: locked in that order, and only
        // those records (no gap lock for an equality on a unique key).
        let ids: Vec<String> = buckets.iter().map(u64::to_string).collect();
        format!(
            "SELECT bucket FROM outbox_key_lock WHERE bucket IN ({}) ORDER BY bucket FOR UPDATE",
            ids.join(",")
        )
    };
    match conn.execute_unprepared(&statement).await {
        Ok(_) => Ok(()),
        // A database the library's latest migrations did not reach: say which one is missing.
        Err(err)
            if backend != sea_orm::DbBackend::Postgres
                && err.to_string().contains("1146")
                && err.to_string().contains("outbox_key_lock") =>
        {
            Err(Error::Database(DbErr::Custom(format!(
                "a keyed write needs the table outbox_key_lock: run the outbox's migrations \
                 (outbox_m20261201_000005_add_key_locks) ({err})"
            ))))
        }
        Err(err) => Err(err.into()),
    }
}

/// The rows of `outbox_key_lock` on MariaDB and MySQL: a key locks row
/// `|key_lock_id(key)| % KEY_LOCK_BUCKETS`.
pub(crate) const KEY_LOCK_BUCKETS: u64 = 65_536;

/// The advisory lock id of an ordering key: FNV-1a (64 bits) of its bytes, fixed so that every
/// process of every version takes the same lock for the same key.
pub(crate) fn key_lock_id(key: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"outbox-key:".iter().chain(key.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash as i64
}
