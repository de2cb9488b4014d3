//! `outbox list`, `outbox show` and `outbox received list`: finding one message among the rows,
//! by status, destination, correlation id, message id or the time it was written.
//!
//! The filters compose (every given one must hold); rows come newest first, at most `limit` of
//! them, so a search over 30 days of rows stays one indexed, bounded query.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, SimpleExpr};
use sea_orm::{
    ColumnTrait, Condition, DatabaseConnection, DbBackend, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use uuid::Uuid;

use crate::error::Error;
use crate::tables::published::Status;
use crate::tables::published::{Column, Entity, Model as Row};
use crate::tables::received;

/// Rows shown when no limit is given.
pub const DEFAULT_LIMIT: u64 = 50;

/// A search of the outbox table: every filter set must hold.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), outbox::Error> {
/// use outbox::tables::published::Status;
/// let stuck = outbox::ops::FindRows::new()
///     .status(Status::Failed)
///     .destination("/topic/orders.v1")
///     .limit(20)
///     .run(db)
///     .await?;
/// for row in stuck {
///     println!("{} {:?}", row.id, row.last_error);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FindRows {
    status: Option<Status>,
    destination: Option<String>,
    correlation_id: Option<String>,
    id: Option<Uuid>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    limit: u64,
}

impl Default for FindRows {
    fn default() -> Self {
        FindRows {
            status: None,
            destination: None,
            correlation_id: None,
            id: None,
            since: None,
            until: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

impl FindRows {
    /// Every row (the newest [`DEFAULT_LIMIT`]).
    pub fn new() -> FindRows {
        FindRows::default()
    }

    /// Only rows in `status`.
    pub fn status(mut self, status: Status) -> FindRows {
        self.status = Some(status);
        self
    }

    /// Only rows for `destination`, exactly (with its version suffix: `/topic/orders.v1`).
    pub fn destination(mut self, destination: impl Into<String>) -> FindRows {
        self.destination = Some(destination.into());
        self
    }

    /// Only rows whose `dop-correlation-id` header is `correlation_id`.
    pub fn correlation_id(mut self, correlation_id: impl Into<String>) -> FindRows {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Only the row of message `id` (`dop-msg-id`).
    pub fn id(mut self, id: Uuid) -> FindRows {
        self.id = Some(id);
        self
    }

    /// Only rows written at or after `since`.
    pub fn since(mut self, since: DateTime<Utc>) -> FindRows {
        self.since = Some(since);
        self
    }

    /// Only rows written before `until`.
    pub fn until(mut self, until: DateTime<Utc>) -> FindRows {
        self.until = Some(until);
        self
    }

    /// At most `limit` rows (at least one).
    pub fn limit(mut self, limit: u64) -> FindRows {
        self.limit = limit.max(1);
        self
    }

    /// The matching rows, newest first.
    pub async fn run(&self, db: &DatabaseConnection) -> Result<Vec<Row>, Error> {
        let mut condition = Condition::all();
        if let Some(status) = self.status {
            condition = condition.add(Column::Status.eq(status));
        }
        if let Some(destination) = &self.destination {
            condition = condition.add(Column::Destination.eq(destination.as_str()));
        }
        if let Some(id) = self.id {
            condition = condition.add(Column::Id.eq(id));
        }
        if let Some(since) = self.since {
            condition = condition.add(Column::Added.gte(since));
        }
        if let Some(until) = self.until {
            condition = condition.add(Column::Added.lt(until));
        }
        if let Some(correlation_id) = &self.correlation_id {
            condition = condition.add(header_is(
                db.get_database_backend(),
                "headers",
                "dop-correlation-id",
                correlation_id,
            ));
        }
        Ok(Entity::find()
            .filter(condition)
            .order_by_desc(Column::Added)
            .order_by_desc(Column::Id)
            .limit(self.limit)
            .all(db)
            .await?)
    }
}

/// The row of message `id`, if the outbox holds it.
pub async fn show(db: &DatabaseConnection, id: Uuid) -> Result<Option<Row>, Error> {
    Ok(Entity::find_by_id(id).one(db).await?)
}

/// A search of the inbox table (`received`): every filter set must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FindReceived {
    queue: Option<String>,
    msg_id: Option<String>,
    correlation_id: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    limit: u64,
}

impl Default for FindReceived {
    fn default() -> Self {
        FindReceived {
            queue: None,
            msg_id: None,
            correlation_id: None,
            since: None,
            until: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

impl FindReceived {
    /// Every inbox row (the newest [`DEFAULT_LIMIT`]).
    pub fn new() -> FindReceived {
        FindReceived::default()
    }

    /// Only messages consumed from `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> FindReceived {
        self.queue = Some(queue.into());
        self
    }

    /// Only messages whose idempotency key (`dop-msg-id`, ...) is `msg_id`.
    pub fn msg_id(mut self, msg_id: impl Into<String>) -> FindReceived {
        self.msg_id = Some(msg_id.into());
        self
    }

    /// Only messages whose `dop-correlation-id` header is `correlation_id`.
    pub fn correlation_id(mut self, correlation_id: impl Into<String>) -> FindReceived {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Only messages processed at or after `since`.
    pub fn since(mut self, since: DateTime<Utc>) -> FindReceived {
        self.since = Some(since);
        self
    }

    /// Only messages processed before `until`.
    pub fn until(mut self, until: DateTime<Utc>) -> FindReceived {
        self.until = Some(until);
        self
    }

    /// At most `limit` rows (at least one).
    pub fn limit(mut self, limit: u64) -> FindReceived {
        self.limit = limit.max(1);
        self
    }

    /// The matching inbox rows, newest first.
    pub async fn run(&self, db: &DatabaseConnection) -> Result<Vec<received::Model>, Error> {
        use received::Column as C;
        let mut condition = Condition::all();
        if let Some(queue) = &self.queue {
            condition = condition.add(C::Queue.eq(queue.as_str()));
        }
        if let Some(msg_id) = &self.msg_id {
            condition = condition.add(C::MsgId.eq(msg_id.as_str()));
        }
        if let Some(since) = self.since {
            condition = condition.add(C::Added.gte(since));
        }
        if let Some(until) = self.until {
            condition = condition.add(C::Added.lt(until));
        }
        if let Some(correlation_id) = &self.correlation_id {
            condition = condition.add(header_is(
                db.get_database_backend(),
                "headers",
                "dop-correlation-id",
                correlation_id,
            ));
        }
        Ok(received::Entity::find()
            .filter(condition)
            .order_by_desc(C::Added)
            .order_by_desc(C::Id)
            .limit(self.limit)
            .all(db)
            .await?)
    }
}

/// `column`'s JSON object has the string `value` under `name`, in each backend's JSON dialect.
/// Header names are the library's own constants, never input, so they may be spliced in.
fn header_is(backend: DbBackend, column: &str, name: &str, value: &str) -> SimpleExpr {
    let sql = match backend {
        DbBackend::Postgres => format!("(\"{column}\"::jsonb ->> '{name}') = $1"),
        DbBackend::MySql => {
            format!("JSON_UNQUOTE(JSON_EXTRACT(`{column}`, '$.\"{name}\"')) = ?")
        }
        _ => format!("json_extract(\"{column}\", '$.\"{name}\"') = ?"),
    };
    Expr::cust_with_values(sql, [value.to_owned()])
}
