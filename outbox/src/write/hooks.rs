//! The hooks that `#[publish]` calls from the entity's `ActiveModelBehavior`. An entity that
//! keeps its own hooks (`#[publish(.., manual)]`) calls them itself:
//!
//! ```ignore
//! #[async_trait::async_trait]
//! impl ActiveModelBehavior for ActiveModel {
//!     async fn before_save<C: ConnectionTrait>(self, db: &C, insert: bool) -> Result<Self, DbErr> {
//!         outbox::write::hooks::before_save::<Model, C>(db, insert)?;
//!         Ok(self)
//!     }
//!     async fn after_save<C: ConnectionTrait>(model: Model, db: &C, insert: bool) -> Result<Model, DbErr> {
//!         outbox::write::hooks::after_save::<Model, C>(&model, db, insert).await?;
//!         Ok(model)
//!     }
//! }
//! ```

use std::any::type_name;
use std::cell::RefCell;
use std::future::Future;

use sea_orm::{ActiveModelTrait, ConnectionTrait, DbErr, EntityTrait};

use super::connection::{ConnectionKind, connection_kind};
use super::message::{Message, insert_messages};
use super::publish::{ActiveModelOf, Event, Publish};
use crate::error::Error;
use crate::wake;

tokio::task_local! {
    /// The typed error behind the last `DbErr` a hook returned, for [`take_hook_error`].
    static HOOK_ERROR: RefCell<Option<Error>>;
    /// Set by [`without_publishing`].
    static NOT_PUBLISHING: ();
}

/// Turns an outbox error raised inside a SeaORM hook into the `DbErr` the hook must return,
/// keeping the typed error for the library call around the save ([`super::save`], [`super::transaction`], ...).
fn hook_error(err: Error) -> DbErr {
    match err {
        Error::Database(db) => db,
        err => {
            let db = DbErr::Custom(err.to_string());
            let _ = HOOK_ERROR.try_with(|slot| *slot.borrow_mut() = Some(err));
            db
        }
    }
}

/// Runs `future` (a save or a transaction) so that the hooks it runs keep the typed errors
/// behind the `DbErr`s they return, for [`take_hook_error`].
pub(super) async fn keeping_typed_errors<F: Future>(future: F) -> F::Output {
    HOOK_ERROR.scope(RefCell::new(None), future).await
}

/// The typed error that a hook turned into `err`, if any.
pub(crate) fn take_hook_error(err: &DbErr) -> Option<Error> {
    let DbErr::Custom(message) = err else {
        return None;
    };
    HOOK_ERROR
        .try_with(|slot| {
            let mut slot = slot.borrow_mut();
            match slot.as_ref() {
                Some(stashed) if stashed.to_string() == *message => slot.take(),
                _ => None,
            }
        })
        .ok()
        .flatten()
}

/// Runs `future` with publishing turned off: saves of `#[publish]` entities inside it write no
/// outbox rows and need no transaction. For migrations, repairs and backfills.
///
/// ```
/// # async fn demo() {
/// outbox::write::without_publishing(async {
///     // `order.save(&db).await` here writes the order and no outbox row.
/// })
/// .await;
/// # }
/// ```
pub async fn without_publishing<F: Future>(future: F) -> F::Output {
    NOT_PUBLISHING.scope((), future).await
}

fn publishing_suppressed() -> bool {
    NOT_PUBLISHING.try_with(|_| ()).is_ok()
}

/// Refuses a publishing save on an autocommit connection, before anything is written.
pub fn before_save<M: Publish, C: ConnectionTrait>(db: &C, insert: bool) -> Result<(), DbErr> {
    let _ = db;
    check_atomic::<M, C>(Event::of_save(insert)).map_err(hook_error)
}

/// Writes the model's outbox rows on the connection of the save.
pub async fn after_save<M: Publish, C: ConnectionTrait>(
    model: &M,
    db: &C,
    insert: bool,
) -> Result<(), DbErr> {
    if publishing_suppressed() {
        return Ok(());
    }
    let messages = messages_of(model, Event::of_save(insert)).map_err(hook_error)?;
    write_messages(db, messages).await.map_err(hook_error)
}

/// Refuses a publishing delete on an autocommit connection, before anything is deleted.
pub fn before_delete<M: Publish, C: ConnectionTrait>(db: &C) -> Result<(), DbErr> {
    let _ = db;
    check_atomic::<M, C>(Event::Delete).map_err(hook_error)
}

/// Before a delete: refuses a publishing delete on an autocommit connection, then writes the
/// delete's outbox rows (body `{"id": <primary key>}`) only if the row exists, read by its
/// key with `FOR UPDATE` (PostgreSQL, MariaDB, MySQL) so that the delete that follows in the
/// same transaction is the one that removes it. SeaORM runs `after_delete` whether or not
/// anything was deleted; this hook is what `#[publish]` generates instead, so that deleting
/// a row that does not exist publishes nothing. It costs one `SELECT` by primary key per
/// delete of an entity with a delete route. (On SQLite the row is read without a lock: a
/// concurrent delete between the read and ours can still publish one delete too many.)
pub async fn before_delete_existing<M: Publish, C: ConnectionTrait>(
    active: &ActiveModelOf<M>,
    db: &C,
) -> Result<(), DbErr> {
    check_atomic::<M, C>(Event::Delete).map_err(hook_error)?;
    if publishing_suppressed() || !publishes::<M>(Event::Delete) {
        return Ok(());
    }
    if !row_exists::<M, C>(active, db).await? {
        return Ok(());
    }
    let messages = deleted_messages::<M>(active).map_err(hook_error)?;
    write_messages(db, messages).await.map_err(hook_error)
}

/// Writes the outbox rows of a deleted row, whose body is `{"id": <primary key>}`.
pub async fn after_delete<M: Publish, C: ConnectionTrait>(
    active: &ActiveModelOf<M>,
    db: &C,
) -> Result<(), DbErr> {
    if publishing_suppressed() || !publishes::<M>(Event::Delete) {
        return Ok(());
    }
    let messages = deleted_messages::<M>(active).map_err(hook_error)?;
    write_messages(db, messages).await.map_err(hook_error)
}

/// Whether the row the active model's key names exists, locked for the rest of the transaction
/// where the backend can lock rows. An active model without its whole key names no row.
async fn row_exists<M: Publish, C: ConnectionTrait>(
    active: &ActiveModelOf<M>,
    db: &C,
) -> Result<bool, DbErr> {
    use sea_orm::{ColumnTrait, Iterable, PrimaryKeyToColumn, QueryFilter, QuerySelect};

    let mut find = <M::Entity as EntityTrait>::find();
    for key in <<M::Entity as EntityTrait>::PrimaryKey as Iterable>::iter() {
        let column = key.into_column();
        match active.get(column).into_value() {
            Some(value) => find = find.filter(column.eq(value)),
            None => return Ok(false),
        }
    }
    if db.get_database_backend() != sea_orm::DbBackend::Sqlite {
        find = find.lock_exclusive();
    }
    Ok(find.one(db).await?.is_some())
}

fn publishes<M: Publish>(event: Event) -> bool {
    M::ROUTES.iter().any(|route| route.on.contains(event))
}

fn check_atomic<M: Publish, C: ?Sized>(event: Event) -> Result<(), Error> {
    if M::ALLOW_AUTOCOMMIT || publishing_suppressed() || !publishes::<M>(event) {
        return Ok(());
    }
    match connection_kind::<C>() {
        ConnectionKind::Transaction => Ok(()),
        ConnectionKind::Autocommit | ConnectionKind::Unknown => Err(Error::NotInTransaction {
            entity: M::ENTITY,
            connection: type_name::<C>(),
        }),
    }
}

fn messages_of<M: Publish>(model: &M, event: Event) -> Result<Vec<Message>, Error> {
    let mut messages = Vec::with_capacity(M::ROUTES.len());
    for (index, route) in M::ROUTES.iter().enumerate() {
        if !route.on.contains(event) {
            continue;
        }
        let body = model.body(index).map_err(|source| Error::Serialize {
            entity: M::ENTITY,
            destination: route.destination.to_owned(),
            source,
        })?;
        let mut message = Message::from_route(M::ENTITY, route, body);
        if let Some(key) = model.key(index) {
            message = message.key(key);
        }
        messages.push(message);
    }
    Ok(messages)
}

fn deleted_messages<M: Publish>(active: &ActiveModelOf<M>) -> Result<Vec<Message>, Error> {
    let key = M::deleted_key(active)
        .map_err(|source| Error::Serialize {
            entity: M::ENTITY,
            destination: String::new(),
            source,
        })?
        .ok_or(Error::MissingKey { entity: M::ENTITY })?;
    let body = serde_json::json!({ "id": key });
    Ok(M::ROUTES
        .iter()
        .enumerate()
        .filter(|(_, route)| route.on.contains(Event::Delete))
        .map(|(index, route)| {
            let message = Message::from_route(M::ENTITY, route, body.clone());
            match M::deleted_message_key(active, index) {
                Some(key) => message.key(key),
                None => message,
            }
        })
        .collect())
}

/// Inserts the rows; on an autocommit connection they are committed now, so wake the relays.
async fn write_messages<C: ConnectionTrait>(db: &C, messages: Vec<Message>) -> Result<(), Error> {
    if messages.is_empty() {
        return Ok(());
    }
    insert_messages(db, messages).await?;
    if connection_kind::<C>() == ConnectionKind::Autocommit {
        wake::committed();
    }
    Ok(())
}
