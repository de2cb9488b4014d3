//! A message to write into the outbox by hand ([`Message`], [`enqueue`], [`enqueue_all`]), and
//! the insert of outbox rows that `#[publish]` saves use too.

use std::collections::BTreeSet;

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
use crate::tables::received::MAX_MSG_ID_LEN;
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
    idempotency_key: Option<String>,
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
            idempotency_key: None,
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
            idempotency_key: None,
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

    /// Sets the idempotency key: consumers (ours, django-outbox-pattern's, CAP's) process one
    /// message per key and queue, and acknowledge the others as duplicates. For two writes that
    /// announce the same thing (a retried request, an import run twice): give them one key, such
    /// as the request's id. Written as the `cap-msg-id` header, which consumers read before
    /// `dop-msg-id`. Without it each message is its own (keyed by its row id). At most
    /// [`MAX_MSG_ID_LEN`] characters (the inbox column), not empty.
    ///
    /// ```no_run
    /// # async fn demo(txn: &sea_orm::DatabaseTransaction) -> Result<(), outbox::Error> {
    /// use outbox::Message;
    ///
    /// // A payment request retried by its client writes a second row: consumers act once.
    /// Message::new("/topic/payments", &serde_json::json!({"amount": 990}))?
    ///     .idempotency_key("payment-request-8c1f")
    ///     .enqueue(txn)
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Adds a custom header. Reserved headers ([`headers::is_reserved`]: a message's identity,
    /// such as `cap-msg-id` and the generated `dop-*` headers, and a broker's delivery state,
    /// such as `message-id` and `redelivered`) are dropped when the message is written, with a
    /// warning: copying a consumed message's headers into a new one is safe. A custom
    /// `dop-correlation-id` is kept.
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

    /// The row for this message, written at `added`; the reserved headers it was given are
    /// left out and noted in `dropped`.
    fn into_row(
        self,
        added: DateTime<Utc>,
        lifetime: chrono::Duration,
        correlation: &str,
        dropped: &mut DroppedHeaders,
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
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() {
                return Err(invalid("the idempotency key is empty"));
            }
            if key.chars().count() > MAX_MSG_ID_LEN {
                return Err(invalid("the idempotency key is longer than 100 characters"));
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
        dropped.note(&destination, headers::drop_reserved(&mut custom));
        if let Some(key) = self.idempotency_key {
            custom.insert(headers::CAP_MSG_ID.into(), Value::String(key));
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
    let mut dropped = DroppedHeaders::default();
    let rows = messages
        .into_iter()
        .map(|message| message.into_row(added, lifetime, &correlation, &mut dropped))
        .collect::<Result<Vec<_>, _>>()?;
    insert_rows(conn, &rows).await?;
    dropped.warn();
    Ok(rows)
}

/// The reserved headers left out of the rows of one write, reported in one warning.
#[derive(Debug, Default)]
struct DroppedHeaders {
    names: BTreeSet<String>,
    rows: usize,
    destination: Option<String>,
}

impl DroppedHeaders {
    fn note(&mut self, destination: &str, names: Vec<String>) {
        if names.is_empty() {
            return;
        }
        self.rows += 1;
        self.names.extend(names);
        self.destination
            .get_or_insert_with(|| destination.to_owned());
    }

    /// One warning for the write, naming every header dropped from its rows.
    fn warn(self) {
        if self.rows == 0 {
            return;
        }
        let names = self.names.into_iter().collect::<Vec<_>>().join(", ");
        tracing::warn!(
            headers = %names,
            rows = self.rows,
            destination = self.destination.as_deref().unwrap_or_default(),
            "reserved headers (a message's identity, a broker's delivery state) left out of the \
             outbox rows written; to deduplicate messages on purpose use Message::idempotency_key"
        );
    }
}

/// Inserts built rows, a few hundred per statement.
async fn insert_rows<C: ConnectionTrait>(conn: &C, rows: &[Model]) -> Result<(), Error> {
    lock_keys(conn, rows).await?;
    if conn.get_database_backend() == sea_orm::DbBackend::MySql {
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            conn.execute(&insert_with_sequence(chunk)?).await?;
        }
        return Ok(());
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
    Ok(())
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
        message.into_row(
            Utc::now(),
            chrono::Duration::days(30),
            "corr",
            &mut DroppedHeaders::default(),
        )
    }

    /// A consumed message's headers, as RabbitMQ's STOMP plugin delivers a relayed row that was
    /// written with an idempotency key.
    const INCOMING: [(&str, &str); 11] = [
        ("subscription", "sub-1"),
        ("destination", "/topic/orders"),
        ("message-id", "T_sub-1@@session-1@@7"),
        ("redelivered", "false"),
        ("ack", "T_sub-1@@session-1@@7"),
        ("persistent", "true"),
        ("cap-msg-id", "order-7"),
        ("dop-msg-id", "3f1c55a2-0000-4000-8000-000000000007"),
        ("dop-msg-sent-time", "2026-11-26T18:03:13.484Z"),
        ("dop-correlation-id", "request-42"),
        ("x-tenant", "acme"),
    ];

    fn copied(destination: &str) -> Message {
        INCOMING.iter().fold(
            Message::from_json(destination, Value::Null),
            |message, (name, value)| message.header(*name, *value),
        )
    }

    /// Every line at WARN or above logged on this thread while `f` runs.
    fn logs_of(f: impl FnOnce()) -> String {
        let (logs, guard) = outbox_tests::logs::Logs::capture_here("warn");
        f();
        drop(guard);
        logs.text()
    }

    #[test]
    fn a_message_copied_from_a_consumed_one_keeps_none_of_its_identity_or_delivery_state() {
        let mut dropped = DroppedHeaders::default();
        let r = copied("/topic/shipments")
            .into_row(Utc::now(), chrono::Duration::days(30), "corr", &mut dropped)
            .unwrap();
        let headers = r.headers.as_object().unwrap();
        assert_eq!(headers["dop-msg-id"], r.id.to_string(), "an id of its own");
        assert_eq!(headers["dop-msg-destination"], "/topic/shipments");
        assert_ne!(headers["dop-msg-sent-time"], "2026-11-26T18:03:13.484Z");
        assert_eq!(
            headers["dop-correlation-id"], "request-42",
            "correlation goes on"
        );
        assert_eq!(headers["x-tenant"], "acme");
        for name in [
            "cap-msg-id",
            "subscription",
            "destination",
            "message-id",
            "redelivered",
            "ack",
            "persistent",
        ] {
            assert!(!headers.contains_key(name), "{name} left out");
        }
        assert_eq!(dropped.rows, 1);
        assert_eq!(
            dropped.names.iter().collect::<Vec<_>>(),
            [
                "ack",
                "cap-msg-id",
                "destination",
                "dop-msg-id",
                "dop-msg-sent-time",
                "message-id",
                "persistent",
                "redelivered",
                "subscription"
            ]
        );
    }

    #[test]
    fn one_warning_per_write_names_every_dropped_header() {
        let mut dropped = DroppedHeaders::default();
        for message in [
            copied("/topic/a"),
            Message::from_json("/topic/b", Value::Null).header("x-death", "[]"),
            Message::from_json("/topic/c", Value::Null).header("x-tenant", "acme"),
        ] {
            message
                .into_row(Utc::now(), chrono::Duration::days(30), "corr", &mut dropped)
                .unwrap();
        }
        assert_eq!(dropped.rows, 2, "the third row had nothing reserved");
        let logs = logs_of(|| dropped.warn());
        assert_eq!(logs.lines().count(), 1, "{logs}");
        assert!(logs.contains("WARN"), "{logs}");
        assert!(
            logs.contains("headers=ack, cap-msg-id, destination, dop-msg-id, dop-msg-sent-time, message-id, persistent, redelivered, subscription, x-death"),
            "{logs}"
        );
        assert!(
            logs.contains("rows=2") && logs.contains("destination=\"/topic/a\""),
            "{logs}"
        );
        assert!(logs.contains("Message::idempotency_key"), "{logs}");
        let nothing = logs_of(|| DroppedHeaders::default().warn());
        assert!(
            nothing.is_empty(),
            "no warning when nothing was dropped: {nothing}"
        );
    }

    #[test]
    fn the_idempotency_key_is_the_only_way_to_cap_msg_id() {
        let r = row(Message::from_json("/topic/x", Value::Null)
            .header("cap-msg-id", "constant")
            .idempotency_key("order-7"))
        .unwrap();
        assert_eq!(r.headers["cap-msg-id"], "order-7");
        let r = row(Message::from_json("/topic/x", Value::Null).header("cap-msg-id", "constant"))
            .unwrap();
        assert!(r.headers.get("cap-msg-id").is_none());
        let refused = |key: String| {
            row(Message::from_json("/topic/x", Value::Null).idempotency_key(key))
                .unwrap_err()
                .to_string()
        };
        assert!(refused(String::new()).contains("idempotency key is empty"));
        assert!(refused("k".repeat(101)).contains("longer than 100"));
        assert!(
            row(Message::from_json("/topic/x", Value::Null).idempotency_key("é".repeat(100)))
                .is_ok()
        );
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
