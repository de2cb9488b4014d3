//! `outbox dlq list` and `outbox dlq replay`: a consumer's dead-letter queue, shown or moved
//! back to its queue.

use clap::{Args, Subcommand};
use outbox::OutboxConfig;
use outbox::ops::{self, DeadLetter};

use crate::failure::Failure;

/// The subcommands of `dlq`.
#[derive(Subcommand)]
pub(crate) enum DlqCommand {
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

/// The arguments of `dlq list`.
#[derive(Args)]
pub(crate) struct DlqListArgs {
    /// The consumer's queue (not the DLQ. name).
    queue: String,
    /// The most messages to show.
    #[arg(long, default_value_t = 20, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    limit: u16,
    /// Print JSON: an array of {headers, body}.
    #[arg(long)]
    json: bool,
}

/// The arguments of `dlq replay`.
#[derive(Args)]
pub(crate) struct DlqReplayArgs {
    /// The consumer's queue (not the DLQ. name).
    queue: String,
    /// The most messages to move (default: all).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    limit: Option<u16>,
}

/// Runs a `dlq` subcommand on the broker `config` names.
pub(crate) async fn run(command: DlqCommand, config: &OutboxConfig) -> Result<(), Failure> {
    match command {
        DlqCommand::List(args) => list(args, config).await,
        DlqCommand::Replay(args) => replay(args, config).await,
    }
}

/// `dlq list`: the messages of DLQ.<queue>, left there.
async fn list(args: DlqListArgs, config: &OutboxConfig) -> Result<(), Failure> {
    let broker = outbox::transport::from_config(config)?;
    let found = ops::dlq_list(broker.as_ref(), &args.queue, usize::from(args.limit)).await?;
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

/// `dlq replay`: the messages of DLQ.<queue> moved back to <queue>.
async fn replay(args: DlqReplayArgs, config: &OutboxConfig) -> Result<(), Failure> {
    let broker = outbox::transport::from_config(config)?;
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

/// The messages found in DLQ.<queue>, the headers an operator looks at first leading.
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

/// One dead letter as `{headers, body}`: the body as JSON when it is JSON, else as text.
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
