//! A message to write into the outbox by hand ([`Message`], [`enqueue`], [`enqueue_all`]), and
//! the insert of outbox rows that `#[publish]` saves use too.

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::ActiveValue::{NotSet, Set};
use sea_orm::{ConnectionTrait, DbErr, EntityTrait};
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::connection::{ConnectionKind, connection_kind};
use super::key_lock::lock_keys;
use super::publish::Route;
use super::settings;
use crate::error::Error;
use crate::headers;
use crate::tables::published::{
    ActiveModel, Column, Entity, MAX_DESTINATION_LEN, MAX_KEY_LEN, MAX_VERSION_LEN, Model, Status,
};
use crate::wake;

/// Rows per INSERT statement when many are written at once (well under every database's limit
/// on bound parameters).
const ROWS_PER_INSERT: usize = 500;

/// A message to write into the outbox: built by `#[publish]` for an entity, or by hand for
/// [`Message::enqueue`].
///
/// ```no_run
/// # async fn demo(txn: &sea_orm::DatabaseTransaction) -> Result<(), outbox::Error> {
/// use outbox::Message;
///
/// let row = Message::new("/topic/invoices", &serde_json::json!({"id": 7, "total": 120}))?
///     .version("v2")
///     .header("x-tenant", "acme")
///     .enqueue(txn)
///     .await?;
/// assert_eq!(row.destination, "/topic/invoices.v2");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    entity: &'static str,
    destination: String,
    version: Option<String>,
    body: Value,
    headers: Map<String, Value>,
    key: Option<String>,
}

/// The entity name of messages that no `#[publish]` entity made.
const ENQUEUED: &str = "enqueue";

impl Message {
    /// A message for `destination` with `body` encoded as JSON.
    pub fn new<B: Serialize + ?Sized>(
        destination: impl Into<String>,
        body: &B,
    ) -> Result<Self, Error> {
        let destination = destination.into();
        let body = serde_json::to_value(body).map_err(|source| Error::Serialize {
            entity: ENQUEUED,
            destination: destination.clone(),
            source,
        })?;
        Ok(Self::from_json(destination, body))
    }

    /// A message for `destination` with a body that is already JSON.
    pub fn from_json(destination: impl Into<String>, body: Value) -> Self {
        Self {
            entity: ENQUEUED,
            destination: destination.into(),
            version: None,
            body,
            headers: Map::new(),
            key: None,
        }
    }

    pub(crate) fn from_route(entity: &'static str, route: &Route, body: Value) -> Self {
        Self {
            entity,
            destination: route.destination.to_owned(),
            version: route.version.map(str::to_owned),
            body,
            headers: Map::new(),
            key: None,
        }
    }

    /// Sets the ordering key: the messages of one key (one order, one account) are sent, and
    /// with [`crate::consumer::ConsumerBuilder::ordered_by_key`] processed, one at a time in the order they
    /// were written; messages of different keys, or without one, go in parallel. At most
    /// [`MAX_KEY_LEN`] characters, not empty. See README's section on ordering.
    pub fn key(mut self, key: impl ToString) -> Self {
        self.key = Some(key.to_string());
        self
    }

    /// The ordering key, if one is set.
    pub fn key_ref(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// Sets the version: it is stored in the row and appended to the destination (`.v2`).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Adds a custom header. The generated `dop-*` headers win over custom ones, except
    /// `dop-correlation-id`, which a custom header may set.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers
            .insert(name.into(), Value::String(value.into()));
        self
    }

    /// The destination the row will carry: with its version suffix.
    pub fn full_destination(&self) -> String {
        match &self.version {
            Some(version) => format!("{}.{}", self.destination, version),
            None => self.destination.clone(),
        }
    }

    /// Writes the message into the outbox on `conn`: pass the transaction of the change it
    /// announces. On an autocommit connection the row is committed at once.
    pub async fn enqueue<C: ConnectionTrait>(self, conn: &C) -> Result<Model, Error> {
        let mut rows = insert_messages(conn, vec![self]).await?;
        wake_if_committed::<C>();
        rows.pop().ok_or(Error::Database(DbErr::RecordNotInserted))
    }

    /// The row for this message, written at `added`.
    fn into_row(
        self,
        added: DateTime<Utc>,
        lifetime: chrono::Duration,
        correlation: &str,
    ) -> Result<Model, Error> {
        let destination = self.full_destination();
        let invalid = |reason| Error::InvalidDestination {
            entity: self.entity,
            destination: destination.clone(),
            reason,
        };
        if self.destination.trim().is_empty() {
            return Err(invalid("the destination is empty"));
        }
        if destination.chars().count() > MAX_DESTINATION_LEN {
            return Err(invalid(
                "longer than 255 characters with its version suffix",
            ));
        }
        if let Some(key) = &self.key {
            if key.is_empty() {
                return Err(invalid("the ordering key is empty"));
            }
            if key.chars().count() > MAX_KEY_LEN {
                return Err(invalid("the ordering key is longer than 255 characters"));
            }
        }
        if let Some(version) = &self.version {
            if version.is_empty() {
                return Err(invalid("the version is empty"));
            }
            if version.chars().count() > MAX_VERSION_LEN {
                return Err(invalid("the version is longer than 100 characters"));
            }
        }
        let id = Uuid::new_v4();
        let mut custom = self.headers;
        let context = headers::HeaderContext {
            entity: self.entity,
            destination: &destination,
            body: &self.body,
        };
        for (name, value) in headers::hook_headers(&context) {
            custom.entry(name).or_insert(Value::String(value));
        }
        // The writer's trace, unless the message or the hook set one.
        #[cfg(feature = "opentelemetry")]
        if !custom.contains_key(crate::trace_context::TRACEPARENT) {
            for (name, value) in crate::trace_context::current_headers() {
                custom.insert(name, Value::String(value));
            }
        }
        let headers = headers::build(id, &destination, added, correlation, custom);
        Ok(Model {
            id,
            version: self.version,
            destination,
            body: self.body,
            headers: Value::Object(headers),
            added,
            expires_at: added + lifetime,
            retry: 0,
            status: Status::Schedule,
            claim_token: None,
            locked_until: None,
            next_attempt_at: None,
            last_error: None,
            msg_key: self.key,
            seq: None,
        })
    }
}

/// Writes a message into the outbox on `conn`; see [`Message`] for versions and headers.
///
/// For code paths that do not save a `#[publish]` entity, and for bulk operations (SeaORM's
/// `insert_many`/`update_many` run no hooks, so they publish nothing by themselves).
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), outbox::Error> {
/// outbox::transaction(db, |txn| {
///     Box::pin(async move {
///         // ... the change itself, on `txn` ...
///         outbox::enqueue(txn, "/topic/prices", &serde_json::json!({"sku": "A-1", "price": 990})).await?;
///         Ok::<_, outbox::Error>(())
///     })
/// })
/// .await
/// # }
/// ```
pub async fn enqueue<C, B>(conn: &C, destination: &str, body: &B) -> Result<Model, Error>
where
    C: ConnectionTrait,
    B: Serialize + ?Sized,
{
    Message::new(destination, body)?.enqueue(conn).await
}

/// Writes many messages into the outbox on `conn`, a few hundred rows per statement.
pub async fn enqueue_all<C: ConnectionTrait>(
    conn: &C,
    messages: impl IntoIterator<Item = Message>,
) -> Result<Vec<Model>, Error> {
    let rows = insert_messages(conn, messages.into_iter().collect()).await?;
    wake_if_committed::<C>();
    Ok(rows)
}

fn wake_if_committed<C: ?Sized>() {
    if connection_kind::<C>() == ConnectionKind::Autocommit {
        wake::committed();
    }
}

/// Builds the rows of `messages` and inserts them, all validated before anything is written.
pub(crate) async fn insert_messages<C: ConnectionTrait>(
    conn: &C,
    messages: Vec<Message>,
) -> Result<Vec<Model>, Error> {
    // Microseconds: what every supported database stores, so the returned rows equal the stored.
    let added = Utc::now().trunc_subsecs(6);
    let lifetime = settings::row_lifetime()?;
    let correlation = headers::current_or_new_correlation_id();
    let rows = messages
        .into_iter()
        .map(|message| message.into_row(added, lifetime, &correlation))
        .collect::<Result<Vec<_>, _>>()?;
    lock_keys(conn, &rows).await?;
    if conn.get_database_backend() == sea_orm::DbBackend::MySql {
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            conn.execute(&insert_with_sequence(chunk)?).await?;
        }
        return Ok(rows);
    }
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let active = chunk.iter().cloned().map(|row| ActiveModel {
            id: Set(row.id),
            version: Set(row.version),
            destination: Set(row.destination),
            body: Set(row.body),
            headers: Set(row.headers),
            added: Set(row.added),
            expires_at: Set(row.expires_at),
            retry: Set(row.retry),
            status: Set(row.status),
            claim_token: Set(None),
            locked_until: Set(None),
            next_attempt_at: Set(None),
            last_error: Set(None),
            msg_key: Set(row.msg_key),
            // The database's: `nextval` on PostgreSQL and MariaDB.
            seq: NotSet,
        });
        Entity::insert_many(active)
            .exec_without_returning(conn)
            .await?;
    }
    Ok(rows)
}

/// The rows as one INSERT that draws each `seq` with `NEXTVAL(published_seq)` (MariaDB, MySQL:
/// the column has no default there, see `AddMessageKeys`).
fn insert_with_sequence(rows: &[Model]) -> Result<sea_orm::sea_query::InsertStatement, Error> {
    use sea_orm::sea_query::{Expr, Query};
    let mut insert = Query::insert();
    insert.into_table(Entity).columns([
        Column::Id,
        Column::Version,
        Column::Destination,
        Column::Body,
        Column::Headers,
        Column::Added,
        Column::ExpiresAt,
        Column::Retry,
        Column::Status,
        Column::MsgKey,
        Column::Seq,
    ]);
    for row in rows {
        insert
            .values([
                Expr::val(row.id),
                Expr::val(row.version.clone()),
                Expr::val(row.destination.clone()),
                Expr::val(row.body.clone()),
                Expr::val(row.headers.clone()),
                Expr::val(row.added),
                Expr::val(row.expires_at),
                Expr::val(row.retry),
                Expr::val(sea_orm::ActiveEnum::to_value(&row.status)),
                Expr::val(row.msg_key.clone()),
                Expr::cust("NEXTVAL(published_seq)"),
            ])
            .map_err(|err| Error::Database(DbErr::Custom(err.to_string())))?;
    }
    Ok(insert)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(message: Message) -> Result<Model, Error> {
        message.into_row(Utc::now(), chrono::Duration::days(30), "corr")
    }

    #[test]
    fn version_is_appended_to_the_destination_and_kept() {
        let r = row(Message::from_json("/topic/orders", Value::Null).version("v1")).unwrap();
        assert_eq!(r.destination, "/topic/orders.v1");
        assert_eq!(r.version.as_deref(), Some("v1"));
        assert_eq!(r.headers["dop-msg-destination"], "/topic/orders.v1");
        assert_eq!(r.headers["dop-msg-id"], r.id.to_string());
        assert_eq!(r.status, Status::Schedule);
        assert_eq!(r.retry, 0);
        assert_eq!(r.expires_at - r.added, chrono::Duration::days(30));
    }

    #[test]
    fn empty_and_overlong_destinations_are_refused() {
        assert!(matches!(
            row(Message::from_json("", Value::Null)),
            Err(Error::InvalidDestination { .. })
        ));
        let long = format!("/topic/{}", "x".repeat(246));
        assert_eq!(long.len(), 253);
        assert!(row(Message::from_json(long.clone(), Value::Null)).is_ok());
        let err = row(Message::from_json(long, Value::Null).version("v1")).unwrap_err();
        assert!(err.to_string().contains("255"), "{err}");
    }

    #[test]
    fn a_body_that_cannot_be_encoded_is_a_typed_error() {
        let mut map = std::collections::HashMap::new();
        map.insert((1, 2), "tuple keys are not JSON");
        let err = Message::new("/topic/x", &map).unwrap_err();
        assert!(
            matches!(err, Error::Serialize { ref destination, .. } if destination == "/topic/x")
        );
    }
}
