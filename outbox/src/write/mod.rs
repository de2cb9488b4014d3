//! The atomic write path: an entity row and its outbox rows are committed together or not at all.
//!
//! SeaORM's hooks receive only a `ConnectionTrait` and SeaORM opens no transaction around
//! `insert`/`update`/`save`, so atomicity holds only when the save runs on a transaction. This
//! module therefore offers [`save`], [`insert`], [`update`] and [`transaction`], which open one (a
//! savepoint inside an existing transaction), and [`hooks`], which refuse a publishing save on an
//! autocommit connection before anything is written.

mod connection;
mod django_json;
#[doc(hidden)]
pub mod generated;
pub mod hooks;
mod key_lock;
mod message;
mod publish;
pub(crate) mod settings;

use std::future::Future;
use std::pin::Pin;

use sea_orm::{
    ActiveModelBehavior, ActiveModelTrait, EntityTrait, IntoActiveModel, TransactionSession,
    TransactionTrait,
};

use crate::error::Error;
use crate::wake;
pub(crate) use connection::{ConnectionKind, connection_kind};
pub(crate) use hooks::take_hook_error;
pub use hooks::without_publishing;
#[cfg(feature = "migration")]
pub(crate) use key_lock::KEY_LOCK_BUCKETS;
pub use message::{Message, enqueue, enqueue_all};
pub use publish::{ActiveModelOf, Event, Events, Publish, Route};
pub use settings::WriteSettings;

/// The future a [`transaction`] callback returns.
pub type TransactionFuture<'c, T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>>;

/// Runs `callback` in a transaction on `db` (a savepoint when `db` is itself a transaction),
/// commits when it returns `Ok`, rolls back when it returns `Err`; then, if it committed, wakes
/// this process's relays.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), outbox::Error> {
/// let id = outbox::transaction(db, |txn| {
///     Box::pin(async move {
///         let row = outbox::enqueue(txn, "/topic/orders", &serde_json::json!({"id": 1})).await?;
///         Ok::<_, outbox::Error>(row.id)
///     })
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn transaction<C, F, T, E>(db: &C, callback: F) -> Result<T, E>
where
    C: TransactionTrait,
    F: for<'c> FnOnce(&'c C::Transaction) -> TransactionFuture<'c, T, E> + Send,
    T: Send,
    E: From<Error> + Send,
{
    hooks::keeping_typed_errors(async move {
        let txn = db.begin().await.map_err(|e| E::from(Error::from(e)))?;
        match callback(&txn).await {
            Ok(value) => {
                txn.commit().await.map_err(|e| E::from(Error::from(e)))?;
                if connection_kind::<C>() != ConnectionKind::Transaction {
                    wake::committed();
                }
                Ok(value)
            }
            Err(err) => {
                // The callback's error is what the caller needs; a failed rollback only
                // means the connection is gone, which rolls back as well.
                let _ = txn.rollback().await;
                Err(err)
            }
        }
    })
    .await
}

/// Inserts an active model in its own transaction (a savepoint inside one), with its outbox rows.
pub async fn insert<C, A>(db: &C, model: A) -> Result<<A::Entity as EntityTrait>::Model, Error>
where
    C: TransactionTrait,
    A: ActiveModelTrait + ActiveModelBehavior + Send + 'static,
    <A::Entity as EntityTrait>::Model: IntoActiveModel<A>,
{
    transaction(db, |txn| {
        Box::pin(async move { Ok(model.insert(txn).await?) })
    })
    .await
}

/// Updates an active model in its own transaction (a savepoint inside one), with its outbox rows.
pub async fn update<C, A>(db: &C, model: A) -> Result<<A::Entity as EntityTrait>::Model, Error>
where
    C: TransactionTrait,
    A: ActiveModelTrait + ActiveModelBehavior + Send + 'static,
    <A::Entity as EntityTrait>::Model: IntoActiveModel<A>,
{
    transaction(db, |txn| {
        Box::pin(async move { Ok(model.update(txn).await?) })
    })
    .await
}

/// Inserts or updates an active model (as `ActiveModelTrait::save` does) in its own transaction
/// (a savepoint inside one), with its outbox rows.
pub async fn save<C, A>(db: &C, model: A) -> Result<A, Error>
where
    C: TransactionTrait,
    A: ActiveModelTrait + ActiveModelBehavior + Send + 'static,
    <A::Entity as EntityTrait>::Model: IntoActiveModel<A>,
{
    transaction(db, |txn| {
        Box::pin(async move { Ok(model.save(txn).await?) })
    })
    .await
}
