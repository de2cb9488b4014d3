//! `outbox list`, `outbox show` and `outbox received list`: one message among many, found by its
//! status, destination, correlation id, id or time, printed to fit a terminal (or as JSON).

use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand, ValueEnum};
use outbox::OutboxConfig;
use outbox::ops::{self, FindReceived, FindRows};
use outbox::tables::published::Model as Row;
use outbox::tables::published::Status;
use outbox::tables::received::Model as ReceivedRow;
use serde_json::Value;
use uuid::Uuid;

use crate::database::{OPERATION_POOL, connect};
use crate::duration::parse_duration;
use crate::failure::Failure;

/// Characters of a body shown on a line of `list` (`--full` shows it whole).
const BODY_WIDTH: usize = 60;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    /// Waiting to be sent (SCHEDULE).
    Scheduled,
    /// Sent and receipted (SUCCEEDED).
    Sent,
    /// Given up (FAILED).
    Failed,
}

impl From<StatusArg> for Status {
    fn from(status: StatusArg) -> Status {
        match status {
            StatusArg::Scheduled => Status::Schedule,
            StatusArg::Sent => Status::Succeeded,
            StatusArg::Failed => Status::Failed,
        }
    }
}

/// Filters of `list` and `received list`, and how to print what they find.
#[derive(Args)]
pub struct ListArgs {
    /// Only rows in this status.
    #[arg(long, value_enum)]
    status: Option<StatusArg>,
    /// Only rows for this destination (with its version suffix, as `status` shows it).
    #[arg(long, value_name = "DESTINATION")]
    destination: Option<String>,
    /// Only rows whose dop-correlation-id header is this.
    #[arg(long, value_name = "ID")]
    correlation_id: Option<String>,
    /// Only the row of this message id (dop-msg-id).
    #[arg(long = "id", value_name = "UUID")]
    id: Option<Uuid>,
    #[command(flatten)]
    common: Common,
}

/// What `list` and `received list` share.
#[derive(Args)]
pub struct Common {
    /// Only rows written at or after this time: RFC 3339 (2026-12-01T08:00:00Z) or a duration
    /// ago (90s, 15m, 12h, 30d).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// Only rows written before this time (same forms as --since).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// At most this many rows, newest first.
    #[arg(long, default_value_t = outbox::ops::DEFAULT_LIMIT, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    limit: u64,
    /// Print JSON (every field, bodies whole) instead of lines.
    #[arg(long)]
    json: bool,
    /// Show bodies whole instead of cut to fit a line.
    #[arg(long)]
    full: bool,
}

#[derive(Args)]
pub struct ShowArgs {
    /// The message id (dop-msg-id).
    id: Uuid,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum ReceivedCommand {
    /// List the inbox's rows: the messages consumers processed, newest first.
    List(ReceivedListArgs),
}

#[derive(Args)]
pub struct ReceivedListArgs {
    /// Only messages consumed from this queue.
    #[arg(long, value_name = "QUEUE")]
    queue: Option<String>,
    /// Only messages whose idempotency key (dop-msg-id, ...) is this.
    #[arg(long, value_name = "KEY")]
    msg_id: Option<String>,
    /// Only messages whose dop-correlation-id header is this.
    #[arg(long, value_name = "ID")]
    correlation_id: Option<String>,
    #[command(flatten)]
    common: Common,
}

impl ListArgs {
    /// The search these arguments describe.
    pub fn search(&self) -> FindRows {
        let mut find = FindRows::new().limit(self.common.limit);
        if let Some(status) = self.status {
            find = find.status(status.into());
        }
        if let Some(destination) = &self.destination {
            find = find.destination(destination.clone());
        }
        if let Some(correlation_id) = &self.correlation_id {
            find = find.correlation_id(correlation_id.clone());
        }
        if let Some(id) = self.id {
            find = find.id(id);
        }
        if let Some(since) = self.common.since {
            find = find.since(since);
        }
        if let Some(until) = self.common.until {
            find = find.until(until);
        }
        find
    }

    /// Prints the rows found, as lines or JSON.
    pub fn print(&self, rows: &[Row]) -> Result<(), String> {
        if self.common.json {
            return print_json(&rows);
        }
        if rows.is_empty() {
            println!("no rows match");
            return Ok(());
        }
        for row in rows {
            println!(
                "{}  {:<9}  {}  attempts {}  {}",
                row.id,
                status_name(row.status),
                timestamp(row.added),
                row.retry,
                row.destination,
            );
            let correlation = row.headers["dop-correlation-id"].as_str().unwrap_or("-");
            println!(
                "    correlation {correlation}  body {}",
                body_text(&row.body, self.common.full)
            );
            if let Some(error) = &row.last_error {
                println!("    last error: {error}");
            }
        }
        print_limit_note(rows.len(), self.common.limit);
        Ok(())
    }
}

impl ReceivedListArgs {
    /// The search these arguments describe.
    pub fn search(&self) -> FindReceived {
        let mut find = FindReceived::new().limit(self.common.limit);
        if let Some(queue) = &self.queue {
            find = find.queue(queue.clone());
        }
        if let Some(msg_id) = &self.msg_id {
            find = find.msg_id(msg_id.clone());
        }
        if let Some(correlation_id) = &self.correlation_id {
            find = find.correlation_id(correlation_id.clone());
        }
        if let Some(since) = self.common.since {
            find = find.since(since);
        }
        if let Some(until) = self.common.until {
            find = find.until(until);
        }
        find
    }

    /// Prints the inbox rows found, as lines or JSON.
    pub fn print(&self, rows: &[ReceivedRow]) -> Result<(), String> {
        if self.common.json {
            return print_json(&rows);
        }
        if rows.is_empty() {
            println!("no inbox rows match");
            return Ok(());
        }
        for row in rows {
            println!(
                "{}  {}  key {}  {}",
                timestamp(row.added),
                row.queue,
                row.msg_id.as_deref().unwrap_or("-"),
                row.id,
            );
            let headers = row.headers.as_ref().unwrap_or(&Value::Null);
            let correlation = headers["dop-correlation-id"].as_str().unwrap_or("-");
            let body = row.body.as_ref().unwrap_or(&Value::Null);
            println!(
                "    correlation {correlation}  body {}",
                body_text(body, self.common.full)
            );
        }
        print_limit_note(rows.len(), self.common.limit);
        Ok(())
    }
}

impl ShowArgs {
    /// The message id to show.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Prints one row whole: its life, its headers and its body.
    pub fn print(&self, row: &Row) -> Result<(), String> {
        if self.json {
            return print_json(row);
        }
        println!("id           {}", row.id);
        println!("destination  {}", row.destination);
        println!("status       {}", status_name(row.status));
        println!("attempts     {}", row.retry);
        println!("added        {}", timestamp(row.added));
        println!("expires at   {}", timestamp(row.expires_at));
        let optional = |t: Option<DateTime<Utc>>| t.map(timestamp).unwrap_or_else(|| "-".into());
        println!("next attempt {}", optional(row.next_attempt_at));
        println!("locked until {}", optional(row.locked_until));
        println!(
            "claimed by   {}",
            row.claim_token
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into())
        );
        println!("last error   {}", row.last_error.as_deref().unwrap_or("-"));
        println!("headers:");
        if let Some(headers) = row.headers.as_object() {
            for (name, value) in headers {
                println!("  {name}: {}", value.as_str().unwrap_or(&value.to_string()));
            }
        }
        println!("body:");
        let body = serde_json::to_string_pretty(&row.body)
            .map_err(|e| format!("cannot encode the body: {e}"))?;
        println!("{body}");
        Ok(())
    }
}

fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<(), String> {
    let json =
        serde_json::to_string_pretty(value).map_err(|e| format!("cannot encode the rows: {e}"))?;
    println!("{json}");
    Ok(())
}

fn print_limit_note(shown: usize, limit: u64) {
    if u64::try_from(shown).is_ok_and(|shown| shown == limit) {
        println!("({shown} rows shown: the limit; --limit shows more)");
    }
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::Schedule => "scheduled",
        Status::Succeeded => "sent",
        Status::Failed => "FAILED",
    }
}

fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The body as compact JSON, cut to [`BODY_WIDTH`] characters unless `full`.
fn body_text(body: &Value, full: bool) -> String {
    let text = body.to_string();
    if full || text.chars().count() <= BODY_WIDTH {
        return text;
    }
    let cut: String = text.chars().take(BODY_WIDTH).collect();
    format!("{cut}... ({} bytes; --full shows it)", text.len())
}

/// `list`: the outbox rows `args` finds.
pub async fn list(
    args: ListArgs,
    config: &OutboxConfig,
    url: Option<String>,
) -> Result<(), Failure> {
    let db = connect(url, Some(OPERATION_POOL), config).await?;
    let rows = args.search().run(&db).await?;
    args.print(&rows).map_err(Failure::Operation)
}

/// `show`: one outbox row whole.
pub async fn show(
    args: ShowArgs,
    config: &OutboxConfig,
    url: Option<String>,
) -> Result<(), Failure> {
    let db = connect(url, Some(OPERATION_POOL), config).await?;
    match ops::show(&db, args.id()).await? {
        Some(row) => args.print(&row).map_err(Failure::Operation),
        None => Err(Failure::Operation(format!(
            "no outbox row has id {} (it may have been sent and cleaned up)",
            args.id()
        ))),
    }
}

/// `received list`: the inbox rows `args` finds.
pub async fn received(
    command: ReceivedCommand,
    config: &OutboxConfig,
    url: Option<String>,
) -> Result<(), Failure> {
    let ReceivedCommand::List(args) = command;
    let db = connect(url, Some(OPERATION_POOL), config).await?;
    let rows = args.search().run(&db).await?;
    args.print(&rows).map_err(Failure::Operation)
}

/// `--since`/`--until`: an RFC 3339 time, or a duration ago.
fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text.trim()) {
        return Ok(at.with_timezone(&Utc));
    }
    let ago = parse_duration(text).map_err(|duration| {
        format!("not an RFC 3339 time (2026-12-01T08:00:00Z) nor a duration ago: {duration}")
    })?;
    let ago = chrono::Duration::from_std(ago).map_err(|_| "the duration is too long".to_owned())?;
    Utc::now()
        .checked_sub_signed(ago)
        .ok_or_else(|| "the duration reaches before any time the outbox holds".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc_3339_or_a_duration_ago() {
        assert_eq!(
            parse_time("2026-12-01T08:00:00+01:00").unwrap(),
            DateTime::parse_from_rfc3339("2026-12-01T07:00:00Z").unwrap()
        );
        let ago = Utc::now() - parse_time("2h").unwrap();
        assert!((7199..=7201).contains(&ago.num_seconds()), "{ago}");
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn long_bodies_are_cut_to_a_line_unless_full() {
        let body = serde_json::json!({ "text": "x".repeat(200) });
        let cut = body_text(&body, false);
        assert!(cut.starts_with("{\"text\":\"xxx"));
        assert!(cut.ends_with("(211 bytes; --full shows it)"), "{cut}");
        assert_eq!(body_text(&body, true), body.to_string());
        assert_eq!(
            body_text(&serde_json::json!({"id": 1}), false),
            "{\"id\":1}"
        );
    }
}
