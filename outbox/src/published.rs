//! The outbox table, `published`: one row per message to relay, and how a row is built.
//!
//! A row is written in the transaction of the change it announces and holds everything the relay
//! sends: the destination (with its version suffix), the JSON body and the headers, generated
//! once at insert. The relay's bookkeeping (`claim_token`, `locked_until`, `next_attempt_at`,
//! `last_error`) starts empty.

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::entity::prelude::*;
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ConnectionTrait,
};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::publish::Route;
use crate::{Error, config, headers, wake, write};

/// The longest destination, version suffix included, that the `destination` column holds.
pub const MAX_DESTINATION_LEN: usize = 255;
/// The longest ordering key that the `msg_key` column holds.
pub const MAX_KEY_LEN: usize = 255;
/// The longest version that the `version` column holds.
pub const MAX_VERSION_LEN: usize = 100;
/// Rows per INSERT statement when many are written at once (well under every database's limit
/// on bound parameters).
const ROWS_PER_INSERT: usize = 500;

/// Where a row is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, Serialize)]
#[sea_orm(rs_type = "i32", db_type = "Integer")]
pub enum Status {
    /// Given up: expired, or refused by the broker too many times. See `last_error`.
    #[sea_orm(num_value = -1)]
    Failed,
    /// Waiting to be sent.
    #[sea_orm(num_value = 1)]
    Schedule,
    /// Sent, and receipted by the broker.
    #[sea_orm(num_value = 2)]
    Succeeded,
}

/// A row of the outbox table.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "published")]
pub struct Model {
    /// The message id, sent as `dop-msg-id`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The version of `#[publish(version = ..)]`, already appended to `destination`.
    pub version: Option<String>,
    /// The STOMP destination, with its version suffix.
    pub destination: String,
    /// The message body.
    pub body: Json,
    /// Every header sent with the message, as a JSON object of strings.
    pub headers: Json,
    /// When the row was written.
    pub added: DateTimeUtc,
    /// After this time an unsent row is given up (FAILED), never sent.
    pub expires_at: DateTimeUtc,
    /// Failed sends so far.
    pub retry: i32,
    /// Where the row is in its life.
    pub status: Status,
    /// The relay that holds the row while sending it.
    pub claim_token: Option<Uuid>,
    /// Until when that relay holds it; after that another relay may take it.
    pub locked_until: Option<DateTimeUtc>,
    /// Not to be sent before this time (a retry's pause).
    pub next_attempt_at: Option<DateTimeUtc>,
    /// Why the last send failed, or why the row was given up.
    #[sea_orm(column_type = "Text", nullable)]
    pub last_error: Option<String>,
    /// The ordering key ([`Message::key`], `#[publish(key = ..)]`), sent as `x-outbox-key`: the
    /// rows of one key are sent one at a time, in `seq` order. `None`: no order is kept.
    pub msg_key: Option<String>,
    /// The insertion sequence, given by the database (`None` in the rows [`Message::enqueue`]
    /// returns, and on SQLite, where `rowid` orders the rows instead; rows older than the column
    /// are `None` too, before all others).
    pub seq: Option<i64>,
}

/// The outbox table has no relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

impl Model {
    /// The row's `dop-correlation-id` header, for logs; `""` when it has none.
    pub(crate) fn correlation_id(&self) -> &str {
        self.headers
            .get(crate::headers::CORRELATION_ID)
            .and_then(serde_json::Value::as_str)
            .unwrap_or("")
    }
}

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
    /// with [`crate::ConsumerBuilder::ordered_by_key`] processed, one at a time in the order they
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
    if write::connection_kind::<C>() == write::ConnectionKind::Autocommit {
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
    let lifetime = config::row_lifetime()?;
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

/// Before keyed rows are inserted, holds each key until the transaction ends, in one order, so
/// that the writers of one key run one after the other until they commit: on PostgreSQL a
/// transaction-scoped advisory lock per key (by hash), on MariaDB and MySQL the row of the key's
/// bucket in `outbox_key_lock` (`SELECT .. FOR UPDATE`; migration
/// `outbox_m20261201_000005_add_key_locks`); SQLite has one writer at a time anyway. Sequence numbers
/// are drawn after the lock, at insert: per key, `seq` order is then commit order, and no relay
/// can see a later row of a key while an earlier one may still commit. A statement on an
/// autocommit connection would release the lock before its insert: a keyed row is refused there.
async fn lock_keys<C: ConnectionTrait>(conn: &C, rows: &[Model]) -> Result<(), Error> {
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
    if write::connection_kind::<C>() == write::ConnectionKind::Autocommit {
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
