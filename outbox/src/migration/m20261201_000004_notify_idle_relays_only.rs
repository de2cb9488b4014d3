//! `outbox_m20261201_000004_notify_idle_relays_only`: on PostgreSQL, the `published` trigger
//! notifies only while a relay is idle.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use super::{CREATE_NOTIFY_FUNCTION, refuse_down_if_adopted};

/// PostgreSQL: the `published` trigger notifies only while a relay has announced itself idle in
/// the new `outbox_idle_relay` table (unlogged: a relay's announcement needs no disk flush, and
/// a crash forgets them all, which only makes the relays poll until they announce again). Every
/// transaction that queued a NOTIFY takes one database-wide lock at commit; in busy periods,
/// when no relay is idle, writers now queue none and commit side by side. An idle relay is still
/// woken within milliseconds. Relays of a version before this one never announce themselves:
/// after this migration they find new rows at their poll (`OUTBOX_PRODUCER_WAITING_TIME`) until
/// they are upgraded. Nothing on MariaDB, MySQL and SQLite (no trigger there). Recorded as
/// `outbox_m20261201_000004_notify_idle_relays_only`.
pub struct NotifyIdleRelaysOnly;

impl MigrationName for NotifyIdleRelaysOnly {
    fn name(&self) -> &str {
        "outbox_m20261201_000004_notify_idle_relays_only"
    }
}

const CREATE_IDLE_RELAY_TABLE: &str = "CREATE UNLOGGED TABLE IF NOT EXISTS outbox_idle_relay (\
    relay uuid PRIMARY KEY, \
    until timestamp with time zone NOT NULL)";
const DROP_IDLE_RELAY_TABLE: &str = "DROP TABLE IF EXISTS outbox_idle_relay";

const CREATE_IDLE_NOTIFY_FUNCTION: &str = r#"
CREATE OR REPLACE FUNCTION outbox_published_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM outbox_idle_relay WHERE until > now()) THEN
        PERFORM pg_notify('outbox_published', '');
    END IF;
    RETURN NULL;
END;
$$"#;

#[async_trait::async_trait]
impl MigrationTrait for NotifyIdleRelaysOnly {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared(CREATE_IDLE_RELAY_TABLE).await?;
        db.execute_unprepared(CREATE_IDLE_NOTIFY_FUNCTION).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        refuse_down_if_adopted(manager, self.name()).await?;
        let db = manager.get_connection();
        db.execute_unprepared(CREATE_NOTIFY_FUNCTION).await?;
        db.execute_unprepared(DROP_IDLE_RELAY_TABLE).await?;
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
