//! Wake-up from other processes' commits: on PostgreSQL the relay LISTENs on
//! [`super::NOTIFY_CHANNEL`], which the outbox table's trigger notifies at every commit that
//! inserted rows; elsewhere it polls.

#[cfg(feature = "postgres")]
use std::time::Duration;

#[cfg(feature = "postgres")]
use tokio::sync::Notify;

#[cfg(feature = "postgres")]
use super::NOTIFY_CHANNEL;
use super::Producer;
#[cfg(feature = "postgres")]
use crate::backoff::Backoff;

impl Producer {
    /// On PostgreSQL, a task that LISTENs for commits of outbox rows and wakes the relay.
    #[cfg(feature = "postgres")]
    pub(super) fn listen_postgres(&self) -> Option<tokio::task::JoinHandle<()>> {
        if self.db.get_database_backend() != sea_orm::DbBackend::Postgres {
            return None;
        }
        let pool = self.db.get_postgres_connection_pool().clone();
        let wake = self.wake_pg.clone();
        Some(tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_secs(60));
            loop {
                match listen(&pool, &wake).await {
                    Ok(()) => backoff.reset(),
                    Err(err) => tracing::warn!(error = %err, "LISTEN failed; polling meanwhile"),
                }
                tokio::time::sleep(backoff.next_pause()).await;
            }
        }))
    }

    /// Without the PostgreSQL driver there is nothing to listen to: rows wake the relay by polling.
    #[cfg(not(feature = "postgres"))]
    pub(super) fn listen_postgres(&self) -> Option<tokio::task::JoinHandle<()>> {
        None
    }
}

/// Forwards notifications to `wake` until the listener fails.
#[cfg(feature = "postgres")]
async fn listen(pool: &sea_orm::sqlx::PgPool, wake: &Notify) -> Result<(), sea_orm::sqlx::Error> {
    let mut listener = sea_orm::sqlx::postgres::PgListener::connect_with(pool).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    // Rows committed while not listening are found by the next round anyway.
    wake.notify_one();
    loop {
        listener.recv().await?;
        wake.notify_one();
    }
}
