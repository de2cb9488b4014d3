//! `outbox`: run the relay and operate the outbox without writing code.
//!
//! Reads `DATABASE_URL` and the `OUTBOX_*` settings. Logs go to stderr; `RUST_LOG` sets the level
//! (default `info` for `publish`, `warn` for the other commands, whose output is on stdout).

// The doc comments below are clap's help text, plain text for a terminal: `<queue>` there is an
// argument's name, not an HTML tag.
#![allow(rustdoc::invalid_html_tags)]

mod browse;
mod database;
mod declare;
mod dlq;
mod duration;
mod failure;
mod publish;
mod purge;
mod redact;
mod retry;
mod status;

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use outbox::OutboxConfig;

use failure::{EXIT_FAILURE, EXIT_UNHEALTHY, EXIT_USAGE, Failure};
use redact::{RedactingStderr, Redactor};

const LONG_ABOUT: &str = "\
The transactional outbox: run the relay, and operate the outbox and the consumers' dead-letter \
queues without writing SQL.

Settings come from the environment: DATABASE_URL (or --database-url) for the commands that use \
the database (publish, status, retry, purge; declare when it is set), and the OUTBOX_* variables \
(OUTBOX_STOMP_HOST_AND_PORTS, OUTBOX_STOMP_USERNAME, ...) for those that use the broker (publish, \
dlq, declare). Logs go to stderr (RUST_LOG sets the level); results go to stdout.

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
    Status(status::StatusArgs),
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
    Retry(retry::RetryArgs),
    /// Delete sent or failed rows, in batches.
    ///
    /// Deletes the rows of one status (sent rows by default), optionally only those written
    /// longer ago than --older-than, a thousand rows per statement. Rows whose messages were never
    /// delivered (failed, or waiting to be sent) are deleted only with --force. Prints how many
    /// rows were deleted.
    Purge(purge::PurgeArgs),
    /// Inspect and replay a consumer's dead-letter queue (DLQ.<queue>).
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Create a consumer's queue and dead-letter queue ahead of the consumer.
    ///
    /// Declares <queue> bound to <destination>, and DLQ.<queue>, with the headers the consumer
    /// (and django-outbox-pattern) declare them with, without consuming. Run it before anything
    /// is published to a topic: the broker drops the messages sent to a topic before a queue is
    /// bound to it. With DATABASE_URL, the outbox rows kept waiting for a queue at that
    /// destination (AMQP: the broker returned them) are then due at once.
    Declare(declare::DeclareArgs),
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

/// Runs the subcommand: each lives in the file of its name.
async fn run(cli: Cli) -> Result<(), Failure> {
    let config = OutboxConfig::from_env()?;
    let url = cli.database_url;
    match cli.command {
        Command::Publish => publish::run(config, url).await,
        Command::Status(args) => status::run(args, &config, url).await,
        Command::List(args) => browse::list(args, &config, url).await,
        Command::Show(args) => browse::show(args, &config, url).await,
        Command::Received(command) => browse::received(command, &config, url).await,
        Command::Retry(args) => retry::run(args, &config, url).await,
        Command::Purge(args) => purge::run(args, &config, url).await,
        Command::Dlq(command) => dlq::run(command, &config).await,
        Command::Declare(args) => declare::run(args, &config, url).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
