//! `outbox`: run the relay and operate the outbox without writing code.
//!
//! Reads `DATABASE_URL` and the `OUTBOX_*` settings. Logs go to stderr; `RUST_LOG` sets the level
//! (default `info` for `publish`, `warn` for the other commands, whose output is on stdout).

// The doc comments below are clap's help text, plain text for a terminal: `<queue>` there is an
// argument's name, not an HTML tag.
#![allow(rustdoc::invalid_html_tags)]

mod browse;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use chrono::SecondsFormat;
use clap::{Args, Parser, Subcommand, ValueEnum};
use outbox::ops::{self, DeadLetter, Purge, PurgeStatus, Retry, StatusReport};
use outbox::transport::TransportError;
use outbox::{Error, OutboxConfig};
use sea_orm::DatabaseConnection;
use uuid::Uuid;

const LONG_ABOUT: &str = "\
The transactional outbox: run the relay, and operate the outbox and the consumers' dead-letter \
queues without writing SQL.

Settings come from the environment: DATABASE_URL (or --database-url) for the commands that use \
the database (publish, status, retry, purge), and the OUTBOX_* variables (OUTBOX_STOMP_HOST_AND_PORTS, \
OUTBOX_STOMP_USERNAME, ...) for those that use the broker (publish, dlq, declare). Logs go to \
stderr (RUST_LOG sets the level); results go to stdout.

Durations (--older-than) are a number and a unit: 90s, 15m, 12h, 30d, 2w, or several at once: 1d12h.

Exit codes:
  0  success (including a dry run, or nothing to do)
  1  operational failure: the database or the broker failed or refused an operation
  2  usage or configuration error: a bad argument, a missing or malformed DATABASE_URL, an
     invalid OUTBOX_* setting, unreadable TLS files, a login or vhost the broker refuses
  3  status --check: a threshold was crossed (the reason is printed on one line)";

#[derive(Parser)]
#[command(
    name = "outbox",
    version,
    about = "The transactional outbox: relay and operations",
    long_about = LONG_ABOUT
)]
struct Cli {
    /// The database holding the outbox tables.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay: send scheduled outbox rows to the broker until SIGTERM, SIGINT or SIGQUIT.
    Publish,
    /// Show what the outbox holds: rows per status and destination, failures, inbox rows.
    ///
    /// Rows per status and destination, the age of the oldest unsent row (how far behind the
    /// relay is), the latest FAILED rows with their last_error, and the inbox rows per queue.
    Status(StatusArgs),
    /// List outbox rows, newest first, by status, destination, correlation id, id or time.
    ///
    /// One row per message: its id (dop-msg-id), status, when it was written, its attempts and
    /// destination, then its correlation id, its body (cut to fit a line; --full shows it whole)
    /// and its last error. The filters combine: every one given must hold.
    List(browse::ListArgs),
    /// Show one outbox row whole: its status and timestamps, attempts, last error, headers and
    /// body.
    Show(browse::ShowArgs),
    /// Inspect the inbox (the received table): the messages consumers processed.
    #[command(subcommand)]
    Received(browse::ReceivedCommand),
    /// Put FAILED rows back to be sent.
    ///
    /// Each matching FAILED row gets status SCHEDULE, its attempts reset to 0, no retry pause,
    /// and a new lifetime of OUTBOX_DAYS_TO_KEEP_DATA days (so that an expired row is not expired
    /// again at once). Its last_error is kept until the relay sends it (which clears it) or
    /// fails it again (which replaces it). A running relay sends the rows at its next poll (on
    /// PostgreSQL at once: it is notified). Prints how many rows were rescheduled.
    Retry(RetryArgs),
    /// Delete sent or failed rows, in batches.
    ///
    /// Deletes the rows of one status (sent rows by default), optionally only those written
    /// longer ago than --older-than, a thousand rows per statement. Rows whose messages were never
    /// delivered (failed, or waiting to be sent) are deleted only with --force. Prints how many
    /// rows were deleted.
    Purge(PurgeArgs),
    /// Inspect and replay a consumer's dead-letter queue (DLQ.<queue>).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Create a consumer's queue and dead-letter queue ahead of the consumer.
    ///
    /// Declares <queue> bound to <destination>, and DLQ.<queue>, with the headers the consumer
    /// (and django-outbox-pattern) declare them with, without consuming. Run it before anything
    /// is published to a topic: the broker drops the messages sent to a topic before a queue is
    /// bound to it.
    Declare(DeclareArgs),
}

#[derive(Args)]
struct StatusArgs {
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// How many of the latest FAILED rows to show.
    #[arg(long, default_value_t = 10, value_name = "N")]
    failed: u64,
    /// Check thresholds instead of reporting: print one line and exit 0 when healthy, 3 with the
    /// first threshold crossed otherwise (for cron jobs and container health checks).
    #[arg(long)]
    check: bool,
    /// With --check: unhealthy when an unsent row has waited longer than this (60s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "check")]
    max_pending_age: Option<Duration>,
    /// With --check: unhealthy when more than this many rows are FAILED.
    #[arg(long, value_name = "N", requires = "check")]
    max_failed: Option<u64>,
    /// With --check and --max-failed: count only the FAILED rows written within this (1h, 1d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "max_failed")]
    failed_since: Option<Duration>,
}

#[derive(Args)]
struct RetryArgs {
    /// Only rows of this destination (with its version suffix, as `status` shows it).
    #[arg(long, value_name = "DESTINATION")]
    destination: Option<String>,
    /// Only this row (message id); repeat for several.
    #[arg(long = "id", value_name = "UUID")]
    ids: Vec<Uuid>,
    /// Only rows written longer ago than this (90s, 15m, 12h, 30d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    older_than: Option<Duration>,
    /// Count the rows that would be rescheduled; change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PurgeStatusArg {
    /// Sent rows (SUCCEEDED).
    Sent,
    /// Given-up rows (FAILED): their messages were never delivered. Needs --force.
    Failed,
    /// Sent and failed rows. Needs --force.
    AllSentAndFailed,
    /// Rows waiting to be sent (SCHEDULE): their messages are lost. Needs --force.
    Scheduled,
}

impl From<PurgeStatusArg> for PurgeStatus {
    fn from(arg: PurgeStatusArg) -> Self {
        match arg {
            PurgeStatusArg::Sent => PurgeStatus::Sent,
            PurgeStatusArg::Failed => PurgeStatus::Failed,
            PurgeStatusArg::AllSentAndFailed => PurgeStatus::SentAndFailed,
            PurgeStatusArg::Scheduled => PurgeStatus::Scheduled,
        }
    }
}

#[derive(Args)]
struct PurgeArgs {
    /// Which rows to delete.
    #[arg(long, value_enum, default_value_t = PurgeStatusArg::Sent)]
    status: PurgeStatusArg,
    /// Only rows written longer ago than this (90s, 15m, 12h, 30d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    older_than: Option<Duration>,
    /// Count the rows that would be deleted; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Required by --status failed, all-sent-and-failed and scheduled (dry run or not):
    /// deleting rows never delivered loses their messages.
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Show the messages of DLQ.<queue>, leaving them there.
    ///
    /// Shows each message's headers, the death reason among them (x-first-death-reason,
    /// x-first-death-queue, ...), and its body. Nothing is acknowledged: the broker puts the
    /// messages back in the dead-letter queue when this disconnects.
    List(DlqListArgs),
    /// Move the messages of DLQ.<queue> back to <queue>.
    ///
    /// Each message is sent to /amq/queue/<queue> with its original headers (the broker's own
    /// removed) and removed from the dead-letter queue only once the broker confirmed the copy:
    /// an interruption leaves a message in both queues at worst, and the consumer's inbox
    /// recognises the second copy. Fails before moving anything if <queue> does not exist.
    /// Each copy carries the run's id in an x-outbox-replay-run header: the replay stops at a
    /// copy of its own dead-lettered again during the run (so it ends even without --limit,
    /// for messages without an id too). Prints how many were moved.
    Replay(DlqReplayArgs),
}

#[derive(Args)]
struct DlqListArgs {
    /// The consumer's queue (not the DLQ. name).
    queue: String,
    /// The most messages to show.
    #[arg(long, default_value_t = 20, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    limit: u16,
    /// Print JSON: an array of {headers, body}.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DlqReplayArgs {
    /// The consumer's queue (not the DLQ. name).
    queue: String,
    /// The most messages to move (default: all).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    limit: Option<u16>,
}

#[derive(Args)]
struct DeclareArgs {
    /// The destination the consumer will read (/topic/orders.v1).
    destination: String,
    /// Its queue (default: the destination's last `/` segment).
    queue: Option<String>,
    /// Declare the queue with RabbitMQ's single active consumer (x-single-active-consumer), as
    /// a consumer built with `.single_active_consumer()` does. Needs the AMQP transport
    /// (OUTBOX_BROKER_URL).
    #[arg(long)]
    single_active_consumer: bool,
}

/// Exit code of an operation that failed: the database or the broker failed or refused.
const EXIT_FAILURE: u8 = 1;
/// Exit code of a run that could not start: bad arguments or settings.
const EXIT_USAGE: u8 = 2;
/// Exit code of `status --check` when a threshold is crossed.
const EXIT_UNHEALTHY: u8 = 3;

/// How a command failed, and so the exit code.
enum Failure {
    Usage(String),
    Operation(String),
    /// `status --check` found a threshold crossed (the reason).
    Unhealthy(String),
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        match err {
            Error::Config { .. } => Failure::Usage(err.to_string()),
            Error::Transport(TransportError::Broker { ref message, .. })
                if message.eq_ignore_ascii_case("not_found") =>
            {
                Failure::Operation(format!(
                    "{err} (does the queue exist? `outbox declare <destination> <queue>` creates a consumer's queues)"
                ))
            }
            // Unusable TLS files, a refused login or vhost: the settings must change.
            Error::Transport(TransportError::Tls(_) | TransportError::Refused { .. }) => {
                Failure::Usage(err.to_string())
            }
            other => Failure::Operation(other.to_string()),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Publish => "info",
        _ => "warn",
    };
    let redactor = Arc::new(Redactor::new(cli.database_url.as_deref()));
    let log_redactor = redactor.clone();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(move || RedactingStderr(log_redactor.clone()))
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("outbox: {}", redactor.redact(&message));
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Operation(message)) => {
            eprintln!("outbox: {}", redactor.redact(&message));
            ExitCode::from(EXIT_FAILURE)
        }
        Err(Failure::Unhealthy(reason)) => {
            println!("unhealthy: {reason}");
            ExitCode::from(EXIT_UNHEALTHY)
        }
    }
}

/// Takes the secrets of this run out of every error and log line: the credentials of any URL
/// ([`outbox::config::redact_credentials`]), and, wherever they appear, the database password and the
/// broker passcode this run was given, as written, percent-decoded and percent-encoded (a driver
/// may quote any of these, and an unparsable URL is quoted whole).
struct Redactor {
    secrets: Vec<String>,
}

/// Shorter secrets are not searched for in the text (they would blank out ordinary words);
/// the URL redaction still covers them.
const SHORTEST_SECRET: usize = 4;

impl Redactor {
    fn new(database_url: Option<&str>) -> Redactor {
        let mut secrets = Vec::new();
        if let Some(password) = database_url.and_then(url_password) {
            secrets.push(password.to_owned());
        }
        if let Ok(passcode) = std::env::var("OUTBOX_STOMP_PASSCODE") {
            let username =
                std::env::var("OUTBOX_STOMP_USERNAME").unwrap_or_else(|_| "guest".into());
            // The default guest/guest: the passcode is the user name, which is no secret.
            if passcode != username {
                secrets.push(passcode);
            }
        }
        let mut forms = Vec::new();
        for secret in secrets {
            forms.push(percent_decoded(&secret));
            forms.push(percent_encoded(&secret, true));
            forms.push(percent_encoded(&secret, false));
            forms.push(secret);
        }
        forms.retain(|form| form.chars().count() >= SHORTEST_SECRET);
        // Longest first: a form that contains another is replaced whole.
        forms.sort_by_key(|form| std::cmp::Reverse(form.len()));
        forms.dedup();
        Redactor { secrets: forms }
    }

    fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "***");
            }
        }
        outbox::config::redact_credentials(&text)
    }
}

/// The password of `scheme://user:password@host...`, as written, when the URL has one (the
/// part between the first `:` after `://` and the last `@` of the address, which holds even
/// when the password has unencoded `@`, `#`, `?` or `/`).
fn url_password(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let address = rest.split(char::is_whitespace).next()?;
    let userinfo = &address[..address.rfind('@')?];
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then_some(password)
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(high), Some(low)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((high * 16 + low) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every byte but RFC 3986's unreserved characters as `%XX`, in upper or lower case hex.
fn percent_encoded(text: &str, upper: bool) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else if upper {
            out.push_str(&format!("%{byte:02X}"));
        } else {
            out.push_str(&format!("%{byte:02x}"));
        }
    }
    out
}

/// Standard error through a [`Redactor`]: the log formatter writes each event in one piece.
struct RedactingStderr(Arc<Redactor>);

impl Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(self.0.redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let config = OutboxConfig::from_env()?;
    let url = cli.database_url;
    match cli.command {
        Command::Publish => {
            let db = connect(url, None).await?;
            let producer = outbox::Producer::builder(db).config(config).build()?;
            Ok(producer.run_until(outbox::shutdown::signal()).await?)
        }
        Command::Status(args) if args.check => {
            let db = connect(url, Some(OPERATION_POOL)).await?;
            if args.max_pending_age.is_none() && args.max_failed.is_none() {
                return Err(Failure::Usage(
                    "--check needs a threshold: --max-pending-age and/or --max-failed".into(),
                ));
            }
            let mut check = ops::HealthCheck::new();
            if let Some(age) = args.max_pending_age {
                check = check.max_pending_age(age);
            }
            if let Some(count) = args.max_failed {
                check = check.max_failed(count);
            }
            if let Some(window) = args.failed_since {
                check = check.failed_since(window);
            }
            let health = check.run(&db).await?;
            match health.crossed {
                Some(reason) => Err(Failure::Unhealthy(reason)),
                None => {
                    let waiting = match health.oldest_pending_age_seconds {
                        Some(age) => format!("the oldest unsent row has waited {age} s"),
                        None => "no row waiting".to_owned(),
                    };
                    println!("healthy: {waiting}; {} FAILED rows counted", health.failed);
                    Ok(())
                }
            }
        }
        Command::List(args) => {
            let db = connect(url, Some(OPERATION_POOL)).await?;
            let rows = args.search().run(&db).await?;
            args.print(&rows).map_err(Failure::Operation)
        }
        Command::Show(args) => {
            let db = connect(url, Some(OPERATION_POOL)).await?;
            match ops::show(&db, args.id()).await? {
                Some(row) => args.print(&row).map_err(Failure::Operation),
                None => Err(Failure::Operation(format!(
                    "no outbox row has id {} (it may have been sent and cleaned up)",
                    args.id()
                ))),
            }
        }
        Command::Received(browse::ReceivedCommand::List(args)) => {
            let db = connect(url, Some(OPERATION_POOL)).await?;
            let rows = args.search().run(&db).await?;
            args.print(&rows).map_err(Failure::Operation)
        }
        Command::Status(args) => {
            let db = connect(url, Some(OPERATION_POOL)).await?;
            let report = ops::status(&db, args.failed).await?;
            if args.json {
                let json = serde_json::to_string_pretty(&report)
                    .map_err(|e| Failure::Operation(format!("cannot encode the report: {e}")))?;
                println!("{json}");
            } else {
                print_status(&report);
            }
            Ok(())
        }
        Command::Retry(args) => {
            let db = connect(url, Some(OPERATION_POOL)).await?;
            let mut retry = Retry::new().config(&config).ids(args.ids);
            if let Some(destination) = args.destination {
                retry = retry.destination(destination);
            }
            if let Some(age) = args.older_than {
                retry = retry.older_than(age);
            }
            if args.dry_run {
                let rows = retry.count(&db).await?;
                println!("dry run: {rows} FAILED rows would be rescheduled");
            } else {
                let rows = retry.run(&db).await?;
                println!("{rows} FAILED rows rescheduled");
            }
            Ok(())
        }
        Command::Purge(args) => {
            let status = PurgeStatus::from(args.status);
            if status.needs_force() && !args.force {
                return Err(Failure::Usage(format!(
                    "--status {status} deletes rows whose messages were never delivered (`outbox retry` could still send them): add --force to mean it"
                )));
            }
            if args.force && !status.needs_force() {
                return Err(Failure::Usage(
                    "--force only applies to --status failed, all-sent-and-failed and scheduled"
                        .into(),
                ));
            }
            let db = connect(url, Some(OPERATION_POOL)).await?;
            let mut purge = Purge::new(status);
            if args.force {
                purge = purge.force();
            }
            if let Some(age) = args.older_than {
                purge = purge.older_than(age);
            }
            let age = args
                .older_than
                .map(|age| format!(", older than {}", format_age(age.as_secs())))
                .unwrap_or_default();
            if args.dry_run {
                let rows = purge.count(&db).await?;
                println!("dry run: {rows} rows would be deleted (status {status}{age})");
            } else {
                let rows = purge.run(&db).await?;
                println!("{rows} rows deleted (status {status}{age})");
            }
            Ok(())
        }
        Command::Dlq(DlqCommand::List(args)) => {
            let broker = outbox::transport::from_config(&config)?;
            let found =
                ops::dlq_list(broker.as_ref(), &args.queue, usize::from(args.limit)).await?;
            if args.json {
                let json: Vec<serde_json::Value> = found.iter().map(dead_letter_json).collect();
                let json = serde_json::to_string_pretty(&json)
                    .map_err(|e| Failure::Operation(format!("cannot encode the messages: {e}")))?;
                println!("{json}");
            } else {
                print_dead_letters(&args.queue, &found, args.limit);
            }
            Ok(())
        }
        Command::Dlq(DlqCommand::Replay(args)) => {
            let broker = outbox::transport::from_config(&config)?;
            let limit = args.limit.map(usize::from);
            let report = ops::dlq_replay(broker.as_ref(), &args.queue, limit).await?;
            println!(
                "{} messages moved from DLQ.{} back to {}",
                report.replayed, args.queue, args.queue
            );
            if report.stopped_at_repeat {
                println!(
                    "stopped at a message replayed earlier in this run and dead-lettered again: it stays in DLQ.{}",
                    args.queue
                );
            }
            Ok(())
        }
        Command::Declare(args) => {
            let broker = outbox::transport::from_config(&config)?;
            let mut topology =
                outbox::consumer::Topology::new(&config, &args.destination, args.queue.as_deref())?;
            if args.single_active_consumer {
                topology = topology.with_single_active_consumer(true);
            }
            topology.declare(broker.as_ref()).await?;
            println!(
                "declared {} (bound to {}) and its dead-letter queue {}",
                topology.queue(),
                topology.destination(),
                topology.dead_letter_queue()
            );
            Ok(())
        }
    }
}

/// Connections an operation command needs: it runs one statement at a time.
const OPERATION_POOL: u32 = 2;

/// Connects to the database, with at most `pool` connections (default: SeaORM's, for the
/// relay). A malformed URL is a usage error, an unreachable server an operational one.
async fn connect(url: Option<String>, pool: Option<u32>) -> Result<DatabaseConnection, Failure> {
    let Some(url) = url else {
        return Err(Failure::Usage(
            "DATABASE_URL is not set (or pass --database-url)".into(),
        ));
    };
    let mut options = sea_orm::ConnectOptions::new(url);
    options
        .connect_timeout(Duration::from_secs(10))
        .sqlx_logging(false);
    if let Some(pool) = pool {
        options.max_connections(pool);
    }
    sea_orm::Database::connect(options).await.map_err(|err| {
        let message = format!("cannot connect to the database: {err}");
        if is_configuration(&err) {
            Failure::Usage(message)
        } else {
            Failure::Operation(message)
        }
    })
}

fn is_configuration(err: &sea_orm::DbErr) -> bool {
    use sea_orm::{DbErr, RuntimeErr, sqlx};
    match err {
        DbErr::Conn(RuntimeErr::SqlxError(err)) => {
            matches!(err.as_ref(), sqlx::Error::Configuration(_))
        }
        DbErr::Conn(RuntimeErr::Internal(_)) => true,
        _ => false,
    }
}

/// Parses `90s`, `15m`, `12h`, `30d`, `2w`, or several at once (`1d12h`, `1h 30m`), with
/// humantime (which also takes `ms`, `min`, `days`, ...).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|err| {
        format!(
            "`{text}`: {err} (give a number and a unit: 90s, 15m, 12h, 30d, 2w, or several: 1d12h)"
        )
    })
}

/// `3d 4h`, `12m 5s`, `45s`: the largest unit, and the next one when it is not zero.
fn format_age(seconds: u64) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("w", 604_800),
        ("d", 86_400),
        ("h", 3600),
        ("m", 60),
        ("s", 1),
    ];
    let first = UNITS
        .iter()
        .position(|(_, size)| seconds >= *size)
        .unwrap_or(UNITS.len() - 1);
    let (name, size) = UNITS[first];
    let mut text = format!("{}{name}", seconds / size);
    if let Some((next, next_size)) = UNITS.get(first + 1) {
        let rest = (seconds % size) / next_size;
        if rest > 0 {
            text.push_str(&format!(" {rest}{next}"));
        }
    }
    text
}

fn age(seconds: Option<i64>) -> String {
    seconds
        .map(|s| format_age(u64::try_from(s).unwrap_or(0)))
        .unwrap_or_else(|| "-".into())
}

fn print_status(report: &StatusReport) {
    println!(
        "outbox status at {}",
        report.at.to_rfc3339_opts(SecondsFormat::Secs, true)
    );
    println!();
    let width = report
        .destinations
        .iter()
        .map(|d| d.destination.chars().count())
        .max()
        .unwrap_or(0)
        .max("destination".len());
    println!(
        "{:<width$}  {:>10}  {:>10}  {:>8}  oldest pending",
        "destination", "scheduled", "succeeded", "failed"
    );
    for d in &report.destinations {
        println!(
            "{:<width$}  {:>10}  {:>10}  {:>8}  {}",
            d.destination,
            d.counts.scheduled,
            d.counts.succeeded,
            d.counts.failed,
            age(d.oldest_pending_age_seconds)
        );
    }
    println!(
        "{:<width$}  {:>10}  {:>10}  {:>8}  {}",
        "total",
        report.totals.scheduled,
        report.totals.succeeded,
        report.totals.failed,
        age(report.oldest_pending_age_seconds)
    );
    println!();
    if report.latest_failed.is_empty() {
        println!("no FAILED rows");
    } else {
        println!(
            "latest FAILED rows ({} of {}):",
            report.latest_failed.len(),
            report.totals.failed
        );
        for row in &report.latest_failed {
            println!(
                "  {}  {}  added {}  attempts {}",
                row.id,
                row.destination,
                row.added.to_rfc3339_opts(SecondsFormat::Secs, true),
                row.retry
            );
            println!(
                "      {}",
                row.last_error.as_deref().unwrap_or("(no reason recorded)")
            );
        }
    }
    if !report.unroutable.is_empty() {
        println!();
        println!("unroutable rows (no queue is bound to their destination; they wait for one):");
        for (destination, rows) in &report.unroutable {
            println!("  {destination}  {rows}");
        }
    }
    if report.blocked_key_count > 0 {
        println!();
        println!(
            "ordering keys blocked by a FAILED row ({} of {}; `outbox retry` or `outbox purge --status failed --force` frees them):",
            report.blocked_keys.len(),
            report.blocked_key_count
        );
        for key in &report.blocked_keys {
            println!(
                "  {}  failed {}  waiting behind {}",
                key.key, key.failed, key.waiting
            );
        }
    }
    println!();
    println!("inbox (received): {} rows", report.received.total);
    for queue in &report.received.queues {
        println!("  {}  {}", queue.queue, queue.rows);
    }
}

/// The headers an operator looks at first, in this order.
const KEY_HEADERS: &[&str] = &[
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "dop-msg-id",
    "dop-msg-destination",
    "dop-msg-sent-time",
    "dop-correlation-id",
];

fn print_dead_letters(queue: &str, found: &[DeadLetter], limit: u16) {
    let more = if found.len() == usize::from(limit) {
        " (the limit: there may be more)"
    } else {
        ""
    };
    println!(
        "DLQ.{queue}: {} messages shown{more}; they stay in the queue",
        found.len()
    );
    for (n, dead) in found.iter().enumerate() {
        println!();
        println!("#{}", n + 1);
        for name in KEY_HEADERS {
            if let Some(value) = dead.header(name) {
                println!("  {name}: {value}");
            }
        }
        for (name, value) in dead.original_headers() {
            if !KEY_HEADERS.contains(&name.as_str()) {
                println!("  {name}: {value}");
            }
        }
        let body = String::from_utf8_lossy(&dead.body);
        let shown: String = body.chars().take(500).collect();
        let cut = if shown.len() < body.len() { " ..." } else { "" };
        println!("  body: {shown}{cut}");
    }
}

fn dead_letter_json(dead: &DeadLetter) -> serde_json::Value {
    let mut headers = serde_json::Map::new();
    for (name, value) in &dead.headers {
        // STOMP: the first occurrence of a header wins.
        headers
            .entry(name.clone())
            .or_insert_with(|| serde_json::Value::String(value.clone()));
    }
    let body = serde_json::from_slice(&dead.body).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&dead.body).into_owned())
    });
    serde_json::json!({ "headers": headers, "body": body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit_and_may_be_combined() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(2_592_000)));
        assert_eq!(parse_duration("1w"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("1d12h"), Ok(Duration::from_secs(129_600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        for bad in ["", "30", "d", "3x", "-1d", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn ages_show_their_two_largest_units() {
        assert_eq!(format_age(0), "0s");
        assert_eq!(format_age(45), "45s");
        assert_eq!(format_age(725), "12m 5s");
        assert_eq!(format_age(3600), "1h");
        assert_eq!(format_age(3 * 86_400 + 4 * 3600 + 5), "3d 4h");
    }

    #[test]
    fn the_run_s_secrets_are_redacted_in_every_form() {
        let url = "postgres://app:Qx7#pw?z@%41@127.0.0.1:5432/test";
        assert_eq!(url_password(url), Some("Qx7#pw?z@%41"));
        assert_eq!(url_password("postgres://app@h/db"), None);
        assert_eq!(url_password("not a url"), None);
        let redactor = Redactor::new(Some(url));
        for leak in [
            "Qx7#pw?z@%41",
            "Qx7#pw?z@A",
            "Qx7%23pw%3Fz%40%2541",
            "qx7: Qx7%23pw%3fz%40%2541",
        ] {
            let shown = redactor.redact(&format!("error near {leak} end"));
            assert!(!shown.contains("pw"), "{leak}: {shown}");
        }
        assert_eq!(
            redactor.redact("invalid URL postgresql+psycopg://u:Dj4ngo!@h/db"),
            "invalid URL postgresql+psycopg://u:***@h/db"
        );
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
