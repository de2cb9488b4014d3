//! The database's clock, as SQL expressions: times that relays on several hosts compare
//! (`locked_until`, `next_attempt_at`, what is due) come from the database, so that hosts with
//! skewed clocks agree on who holds a lease: `now()` on PostgreSQL, `UTC_TIMESTAMP(6)` on
//! MariaDB. SQLite keeps its timestamps as text in the format sqlx writes and lives on one host
//! anyway: there the process clock is used.

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::DbBackend;
use sea_orm::sea_query::{Expr, SimpleExpr};

pub(crate) fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

pub(crate) fn to_chrono(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

/// Microseconds of `duration`, for SQL interval literals (saturating far beyond any setting).
pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX / 2)
}

/// The database's current time, `offset` later (earlier when `later` is false), as an SQL
/// expression; on SQLite the process clock's value. The interval is a literal computed here,
/// never input.
pub(crate) fn db_time(backend: DbBackend, offset: Duration, later: bool) -> SimpleExpr {
    let sign = if later { '+' } else { '-' };
    let us = micros(offset);
    match backend {
        DbBackend::Postgres => Expr::cust(format!("(now() {sign} interval '{us} microseconds')")),
        DbBackend::MySql => Expr::cust(format!(
            "(UTC_TIMESTAMP(6) {sign} INTERVAL {us} MICROSECOND)"
        )),
        _ => {
            let offset = to_chrono(offset);
            let at = if later {
                now() + offset
            } else {
                now() - offset
            };
            Expr::value(at)
        }
    }
}

/// The database's current time ([`db_time`] with no offset).
pub(crate) fn db_now(backend: DbBackend) -> SimpleExpr {
    db_time(backend, Duration::ZERO, true)
}
