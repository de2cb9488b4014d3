//! The `outbox` command line, run as an operator runs it (the built binary, `DATABASE_URL` and
//! `OUTBOX_*` in its environment) against real databases and the real RabbitMQ: what each
//! command reports, changes and leaves alone, and its exit codes.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use outbox::tables::published::Status;
use outbox::tables::published::{Column, Model as Row};
use outbox::{Consumer, OutboxConfig, Payload, Published, Received};
use outbox_tests::stomp_peer::{
    QueueCleanup, RABBITMQ_STOMP, StompPeer, queue_figure, queue_message_count, topic_reader,
    unique,
};
use outbox_tests::{Backend, TestDb, eventually, on_every_backend};
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveEnum, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, TransactionTrait,
};
use serde_json::{Value, json};
use uuid::Uuid;

/// What a run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "exit code {}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

/// The `outbox` binary with the broker of the tests and, if given, `DATABASE_URL`.
fn command(database_url: Option<&str>, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox"));
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env("OUTBOX_STOMP_HOST_AND_PORTS", RABBITMQ_STOMP)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(url) = database_url {
        command.env("DATABASE_URL", url);
    }
    command
}

/// Runs `outbox <args>` to its end.
async fn outbox(database_url: Option<&str>, args: &[&str]) -> Run {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        command(database_url, args).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("`outbox {}` did not end within 60 s", args.join(" ")))
    .expect("run the outbox binary");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The first whole number in `text`.
fn first_number(text: &str) -> u64 {
    text.split(|c: char| !c.is_ascii_digit())
        .find(|part| !part.is_empty())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {text:?}"))
}

async fn rows(db: &DatabaseConnection) -> Vec<Row> {
    Published::find().all(db).await.expect("read the outbox")
}

async fn row(db: &DatabaseConnection, id: Uuid) -> Row {
    Published::find_by_id(id)
        .one(db)
        .await
        .expect("read a row")
        .expect("the row exists")
}

/// Writes `count` rows for `destination`; returns their ids.
async fn enqueue(db: &DatabaseConnection, destination: &str, count: usize) -> Vec<Uuid> {
    let txn = db.begin().await.unwrap();
    let messages = (0..count).map(|n| outbox::Message::from_json(destination, json!({ "n": n })));
    let written = outbox::enqueue_all(&txn, messages).await.unwrap();
    txn.commit().await.unwrap();
    written.into_iter().map(|row| row.id).collect()
}

/// Sets the rows' status (FAILED ones with a reason and their attempts spent) and backdates
/// them by `days`.
async fn set(db: &DatabaseConnection, ids: &[Uuid], status: Status, days: i64) {
    let added = Utc::now() - chrono::Duration::days(days);
    let mut update = Published::update_many()
        .col_expr(Column::Status, Expr::value(status.to_value()))
        .col_expr(Column::Added, Expr::value(added))
        .filter(Column::Id.is_in(ids.iter().copied()));
    if status == Status::Failed {
        update = update
            .col_expr(Column::Retry, Expr::value(50))
            .col_expr(
                Column::LastError,
                Expr::value("the broker sent an ERROR: not_found: test"),
            )
            .col_expr(
                Column::NextAttemptAt,
                Expr::value(Utc::now() + chrono::Duration::hours(1)),
            );
    }
    update.exec(db).await.expect("set the rows' status");
}

/// An inbox row for `queue`.
async fn receive(db: &DatabaseConnection, queue: &str) {
    let now = Utc::now();
    let row = outbox::tables::received::ActiveModel {
        id: Set(Uuid::new_v4()),
        queue: Set(queue.to_owned()),
        msg_id: Set(Some(Uuid::new_v4().to_string())),
        headers: Set(None),
        body: Set(None),
        added: Set(now),
        expires_at: Set(now + chrono::Duration::days(30)),
        retry: Set(0),
        status: Set(Status::Succeeded),
    };
    Received::insert(row)
        .exec_without_returning(db)
        .await
        .expect("insert an inbox row");
}

on_every_backend!(
    status_counts_match_the_table,
    retry_reschedules_only_the_failed_rows_its_filters_name,
    purge_dry_run_deletes_nothing_and_purge_deletes_only_what_it_should,
);

// ---------------------------------------------------------------------------------- status

async fn status_counts_match_the_table(backend: Backend) {
    let test = TestDb::new(backend).await;
    let orders = enqueue(&test.db, "/topic/orders.v1", 6).await;
    let prices = enqueue(&test.db, "/topic/prices", 3).await;
    set(&test.db, &orders[..2], Status::Succeeded, 0).await;
    set(&test.db, &orders[2..3], Status::Failed, 0).await;
    set(&test.db, &orders[3..4], Status::Schedule, 2).await;
    set(&test.db, &prices[..1], Status::Failed, 1).await;
    for queue in ["orders_q", "orders_q", "prices_q"] {
        receive(&test.db, queue).await;
    }

    let run = outbox(Some(&test.url), &["status", "--json"]).await.ok();
    let report: Value = serde_json::from_str(&run.stdout).expect("status --json prints JSON");

    let table = rows(&test.db).await;
    let mut expected: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    for row in &table {
        let counts = expected.entry(row.destination.clone()).or_default();
        match row.status {
            Status::Schedule => counts[0] += 1,
            Status::Succeeded => counts[1] += 1,
            Status::Failed => counts[2] += 1,
        }
    }
    let mut reported: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    for destination in report["destinations"].as_array().expect("destinations") {
        reported.insert(
            destination["destination"].as_str().unwrap().to_owned(),
            [
                destination["scheduled"].as_u64().unwrap(),
                destination["succeeded"].as_u64().unwrap(),
                destination["failed"].as_u64().unwrap(),
            ],
        );
    }
    assert_eq!(reported, expected);
    assert_eq!(expected["/topic/orders.v1"], [3, 2, 1]);
    assert_eq!(expected["/topic/prices"], [2, 0, 1]);
    assert_eq!(
        report["totals"],
        json!({"scheduled": 5, "succeeded": 2, "failed": 2})
    );

    // The oldest unsent row is the one backdated by two days.
    let age = report["oldest_pending_age_seconds"].as_i64().unwrap();
    assert!((2 * 86_400 - 60..2 * 86_400 + 60).contains(&age), "{age}");
    let orders_age = report["destinations"][0]["oldest_pending_age_seconds"]
        .as_i64()
        .unwrap();
    assert_eq!(orders_age, age);

    let failed = report["latest_failed"].as_array().unwrap();
    assert_eq!(failed.len(), 2);
    assert_eq!(
        failed[0]["id"],
        orders[2].to_string(),
        "the newest failure first"
    );
    assert_eq!(
        failed[0]["last_error"],
        "the broker sent an ERROR: not_found: test"
    );
    assert_eq!(failed[1]["id"], prices[0].to_string());
    assert_eq!(
        report["received"],
        json!({"total": 3, "queues": [{"queue": "orders_q", "rows": 2}, {"queue": "prices_q", "rows": 1}]})
    );

    // `--failed` bounds the list; the tables say the same as the JSON.
    let run = outbox(Some(&test.url), &["status", "--failed", "1"])
        .await
        .ok();
    assert!(
        run.stdout.contains("latest FAILED rows (1 of 2)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("the broker sent an ERROR: not_found: test"),
        "{}",
        run.stdout
    );
    let orders_line = run
        .stdout
        .lines()
        .find(|line| line.starts_with("/topic/orders.v1"))
        .expect("a line for the destination");
    let numbers: Vec<&str> = orders_line.split_whitespace().collect();
    assert_eq!(&numbers[1..4], ["3", "2", "1"], "{orders_line}");
    assert!(run.stdout.contains("inbox (received): 3 rows"));
    test.drop_database().await;
}

// ----------------------------------------------------------------------------------- retry

async fn retry_reschedules_only_the_failed_rows_its_filters_name(backend: Backend) {
    let test = TestDb::new(backend).await;
    let orders = enqueue(&test.db, "/topic/orders.v1", 4).await;
    let prices = enqueue(&test.db, "/topic/prices", 2).await;
    set(&test.db, &orders[..2], Status::Failed, 3).await;
    set(&test.db, &orders[2..3], Status::Failed, 0).await;
    set(&test.db, &orders[3..], Status::Succeeded, 3).await;
    set(&test.db, &prices, Status::Failed, 3).await;
    let url = test.url.as_str();

    let run = outbox(
        Some(url),
        &[
            "retry",
            "--destination",
            "/topic/orders.v1",
            "--older-than",
            "2d",
            "--dry-run",
        ],
    )
    .await
    .ok();
    assert_eq!(first_number(&run.stdout), 2, "{}", run.stdout);
    assert_eq!(row(&test.db, orders[0]).await.status, Status::Failed);

    let run = outbox(
        Some(url),
        &[
            "retry",
            "--destination",
            "/topic/orders.v1",
            "--older-than",
            "2d",
        ],
    )
    .await
    .ok();
    assert_eq!(first_number(&run.stdout), 2, "{}", run.stdout);
    for id in &orders[..2] {
        let retried = row(&test.db, *id).await;
        assert_eq!(retried.status, Status::Schedule);
        assert_eq!(retried.retry, 0);
        assert_eq!(retried.next_attempt_at, None);
        assert_eq!(
            retried.last_error.as_deref(),
            Some("the broker sent an ERROR: not_found: test"),
            "the reason is kept until the row is sent"
        );
        assert!(retried.expires_at > Utc::now() + chrono::Duration::days(29));
    }
    assert_eq!(row(&test.db, orders[2]).await.status, Status::Failed);
    assert_eq!(row(&test.db, orders[3]).await.status, Status::Succeeded);
    assert_eq!(row(&test.db, prices[0]).await.status, Status::Failed);

    // By id: only FAILED rows, whatever ids are named.
    let (a, b, sent) = (
        prices[0].to_string(),
        orders[2].to_string(),
        orders[3].to_string(),
    );
    let run = outbox(Some(url), &["retry", "--id", &a, "--id", &b, "--id", &sent])
        .await
        .ok();
    assert_eq!(first_number(&run.stdout), 2, "{}", run.stdout);
    assert_eq!(row(&test.db, orders[3]).await.status, Status::Succeeded);

    // With no filter: every FAILED row left.
    let run = outbox(Some(url), &["retry"]).await.ok();
    assert_eq!(first_number(&run.stdout), 1, "{}", run.stdout);
    assert!(
        rows(&test.db)
            .await
            .iter()
            .all(|r| r.status != Status::Failed)
    );
    test.drop_database().await;
}

#[tokio::test]
async fn retried_rows_are_sent_by_the_next_relay_run() {
    let test = TestDb::new(Backend::Postgres).await;
    let key = unique("cli_retry");
    let (mut reader, _cleanup) = topic_reader(&key).await;
    let destination = format!("/topic/{key}");
    let failed = enqueue(&test.db, &destination, 3).await;
    set(&test.db, &failed, Status::Failed, 1).await;
    let other = enqueue(&test.db, "/topic/cli_retry_elsewhere", 1).await;
    set(&test.db, &other, Status::Failed, 1).await;

    let mut relay = command(Some(&test.url), &["publish"])
        .env("OUTBOX_PRODUCER_WAITING_TIME", "0.2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start `outbox publish`");
    // The relay leaves FAILED rows alone.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        reader
            .next_message(Duration::from_millis(500))
            .await
            .is_none()
    );

    let run = outbox(Some(&test.url), &["retry", "--destination", &destination])
        .await
        .ok();
    assert_eq!(first_number(&run.stdout), 3, "{}", run.stdout);

    let mut received = Vec::new();
    while received.len() < 3 {
        let frame = reader
            .next_message(Duration::from_secs(10))
            .await
            .expect("the relay sends the rescheduled rows");
        received.push(frame.header("dop-msg-id").unwrap().to_owned());
    }
    received.sort();
    let mut expected: Vec<String> = failed.iter().map(Uuid::to_string).collect();
    expected.sort();
    assert_eq!(received, expected);
    let db = test.db.clone();
    eventually(Duration::from_secs(10), "the rows marked sent", || {
        let db = db.clone();
        let failed = failed.clone();
        async move {
            let mut all_sent = true;
            for id in failed {
                let sent = row(&db, id).await;
                all_sent &= sent.status == Status::Succeeded && sent.last_error.is_none();
            }
            all_sent
        }
    })
    .await;
    assert_eq!(row(&test.db, other[0]).await.status, Status::Failed);

    // SIGTERM: the relay stops cleanly.
    let pid = relay.id().expect("the relay's pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), relay.wait())
        .await
        .expect("the relay stops after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    test.drop_database().await;
}

// ----------------------------------------------------------------------------------- purge

async fn purge_dry_run_deletes_nothing_and_purge_deletes_only_what_it_should(backend: Backend) {
    let test = TestDb::new(backend).await;
    let ids = enqueue(&test.db, "/topic/purge", 9).await;
    let old_sent = &ids[0..2];
    let new_sent = &ids[2..3];
    let old_failed = &ids[3..5];
    let new_failed = &ids[5..6];
    let old_scheduled = &ids[6..8];
    let new_scheduled = &ids[8..9];
    set(&test.db, old_sent, Status::Succeeded, 10).await;
    set(&test.db, new_sent, Status::Succeeded, 0).await;
    set(&test.db, old_failed, Status::Failed, 10).await;
    set(&test.db, new_failed, Status::Failed, 0).await;
    set(&test.db, old_scheduled, Status::Schedule, 10).await;
    set(&test.db, new_scheduled, Status::Schedule, 0).await;
    let url = test.url.as_str();
    let remaining = |db: DatabaseConnection| async move {
        let mut ids: Vec<Uuid> = rows(&db).await.into_iter().map(|r| r.id).collect();
        ids.sort();
        ids
    };
    let without = |gone: &[&[Uuid]]| {
        let mut kept: Vec<Uuid> = ids
            .iter()
            .filter(|id| !gone.iter().any(|g| g.contains(id)))
            .copied()
            .collect();
        kept.sort();
        kept
    };

    for (status, expected) in [("sent", 3), ("failed", 3), ("all-sent-and-failed", 6)] {
        let mut args = vec!["purge", "--status", status, "--dry-run"];
        if status != "sent" {
            args.push("--force");
        }
        let run = outbox(Some(url), &args).await.ok();
        assert_eq!(
            first_number(&run.stdout),
            expected,
            "{status}: {}",
            run.stdout
        );
    }
    let run = outbox(Some(url), &["purge", "--older-than", "1w", "--dry-run"])
        .await
        .ok();
    assert_eq!(first_number(&run.stdout), 2, "{}", run.stdout);
    assert_eq!(remaining(test.db.clone()).await, without(&[]));

    // Rows never delivered (unsent or failed): refused without --force, dry run or not.
    for args in [
        &["purge", "--status", "scheduled"][..],
        &["purge", "--status", "scheduled", "--dry-run"][..],
        &["purge", "--status", "failed"][..],
        &["purge", "--status", "failed", "--dry-run"][..],
        &["purge", "--status", "all-sent-and-failed"][..],
        &[
            "purge",
            "--status",
            "all-sent-and-failed",
            "--older-than",
            "1d",
        ][..],
        &["purge", "--force"][..],
        &["purge", "--status", "sent", "--force"][..],
    ] {
        let run = outbox(Some(url), args).await;
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains("--force"), "{args:?}: {}", run.stderr);
    }
    assert_eq!(remaining(test.db.clone()).await, without(&[]));

    let run = outbox(
        Some(url),
        &["purge", "--status", "sent", "--older-than", "7d"],
    )
    .await
    .ok();
    assert_eq!(first_number(&run.stdout), 2, "{}", run.stdout);
    assert_eq!(remaining(test.db.clone()).await, without(&[old_sent]));

    let run = outbox(
        Some(url),
        &["purge", "--status", "all-sent-and-failed", "--force"],
    )
    .await
    .ok();
    assert_eq!(first_number(&run.stdout), 4, "{}", run.stdout);
    assert_eq!(
        remaining(test.db.clone()).await,
        without(&[old_sent, new_sent, old_failed, new_failed])
    );

    let run = outbox(
        Some(url),
        &[
            "purge",
            "--status",
            "scheduled",
            "--force",
            "--older-than",
            "1d",
        ],
    )
    .await
    .ok();
    assert_eq!(first_number(&run.stdout), 2, "{}", run.stdout);
    assert_eq!(remaining(test.db.clone()).await, new_scheduled.to_vec());
    test.drop_database().await;
}

// ------------------------------------------------------------------------------------- dlq

/// Settings for an in-process consumer: the test broker, short timings.
fn consumer_config() -> OutboxConfig {
    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = vec![("127.0.0.1".to_owned(), 61613)];
    config.receipt_timeout = Duration::from_secs(3);
    config.maximum_backoff = Duration::from_millis(300);
    config.consumer_shutdown_timeout = Duration::from_secs(10);
    config
}

/// A fresh queue, its dead-letter queue and its topic, declared by `outbox declare`; the
/// clean-up deletes both queues.
async fn declared_with_dead_letters(prefix: &str) -> (String, String, String, QueueCleanup) {
    let queue = unique(prefix);
    let dead_letters = format!("DLQ.{queue}");
    let cleanup = QueueCleanup(vec![queue.clone(), dead_letters.clone()]);
    let destination = format!("/topic/{queue}");
    outbox(None, &["declare", &destination]).await.ok();
    (queue, dead_letters, destination, cleanup)
}

/// The messages of a queue ready for a consumer (not those handed out and unacknowledged).
fn ready_messages(queue: &str) -> Option<usize> {
    queue_figure(queue, "messages_ready")
}

#[tokio::test]
async fn a_dead_letter_is_listed_without_loss_then_replayed_and_processed_once() {
    let test = TestDb::new(Backend::Postgres).await;
    let (queue, dead_letters, destination, _cleanup) = declared_with_dead_letters("cli_dlq").await;

    // A callback that fails the first time: the message is dead-lettered, then succeeds.
    let calls = Arc::new(AtomicUsize::new(0));
    let consumer = Consumer::builder(test.db.clone())
        .config(consumer_config())
        .destination(&destination)
        .start({
            let calls = calls.clone();
            move |payload: Payload| {
                let attempt = calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    if attempt == 1 {
                        return Err("the first attempt fails".into());
                    }
                    payload.save();
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
                }
            }
        })
        .unwrap();
    let mut peer = StompPeer::connect(RABBITMQ_STOMP).await.unwrap();
    peer.send(
        &destination,
        &[
            ("dop-msg-id", "m-1"),
            ("x-custom", "a:b"),
            ("persistent", "true"),
        ],
        br#"{"n": 1}"#,
    )
    .await
    .unwrap();
    peer.disconnect().await.unwrap();
    eventually(Duration::from_secs(15), "the message dead-lettered", || {
        let dead_letters = dead_letters.clone();
        async move { ready_messages(&dead_letters) == Some(1) }
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Listing, twice: the message is shown with its death reason and stays.
    for _ in 0..2 {
        let run = outbox(None, &["dlq", "list", &queue]).await.ok();
        assert!(run.stdout.contains("1 messages shown"), "{}", run.stdout);
        assert!(
            run.stdout.contains("x-first-death-reason: rejected"),
            "{}",
            run.stdout
        );
        assert!(
            run.stdout
                .contains(&format!("x-first-death-queue: {queue}")),
            "{}",
            run.stdout
        );
        assert!(run.stdout.contains("dop-msg-id: m-1"), "{}", run.stdout);
        assert!(run.stdout.contains("x-custom: a:b"), "{}", run.stdout);
        assert!(run.stdout.contains(r#"body: {"n": 1}"#), "{}", run.stdout);
        eventually(
            Duration::from_secs(10),
            "the message back in the DLQ",
            || {
                let dead_letters = dead_letters.clone();
                async move { ready_messages(&dead_letters) == Some(1) }
            },
        )
        .await;
    }
    let run = outbox(None, &["dlq", "list", &queue, "--json"]).await.ok();
    let listed: Value = serde_json::from_str(&run.stdout).expect("dlq list --json prints JSON");
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["headers"]["x-first-death-reason"], "rejected");
    assert_eq!(listed[0]["headers"]["dop-msg-id"], "m-1");
    assert_eq!(listed[0]["body"], json!({"n": 1}));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "listing delivers nothing");

    // Replay: back to the queue, processed by the running consumer, once.
    let run = outbox(None, &["dlq", "replay", &queue]).await.ok();
    assert_eq!(first_number(&run.stdout), 1, "{}", run.stdout);
    let db = test.db.clone();
    eventually(
        Duration::from_secs(15),
        "the replayed message processed",
        || {
            let db = db.clone();
            async move { Received::find().all(&db).await.unwrap().len() == 1 }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    consumer.stop().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let inbox = Received::find().all(&test.db).await.unwrap();
    assert_eq!(inbox[0].msg_id.as_deref(), Some("m-1"));
    let headers = inbox[0].headers.clone().unwrap();
    assert_eq!(headers["x-custom"], "a:b", "the original headers came back");
    assert!(headers.get("x-first-death-reason").is_none());
    assert_eq!(queue_message_count(&dead_letters), Some(0));
    assert_eq!(queue_message_count(&queue), Some(0));

    // Nothing left: a second replay moves nothing.
    let run = outbox(None, &["dlq", "replay", &queue]).await.ok();
    assert_eq!(first_number(&run.stdout), 0, "{}", run.stdout);
    test.drop_database().await;
}

#[tokio::test]
async fn replaying_into_a_missing_queue_fails_and_moves_nothing() {
    let queue = unique("cli_dlq_missing");
    let run = outbox(None, &["dlq", "replay", &queue]).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("not_found"), "{}", run.stderr);
    let run = outbox(None, &["dlq", "list", &queue]).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("outbox declare"), "{}", run.stderr);
}

// --------------------------------------------------------------------------------- declare

#[tokio::test]
async fn declare_creates_the_queues_so_a_message_sent_before_any_consumer_is_kept() {
    let key = unique("cli_declare");
    let queue = format!("{key}_named");
    let _cleanup = QueueCleanup(vec![queue.clone(), format!("DLQ.{queue}")]);
    let destination = format!("/topic/{key}");
    let run = outbox(None, &["declare", &destination, &queue]).await.ok();
    assert!(run.stdout.contains(&queue), "{}", run.stdout);
    assert_eq!(queue_message_count(&queue), Some(0));
    assert_eq!(queue_message_count(&format!("DLQ.{queue}")), Some(0));

    let mut peer = StompPeer::connect(RABBITMQ_STOMP).await.unwrap();
    peer.send(&destination, &[("dop-msg-id", "early")], b"{}")
        .await
        .unwrap();
    peer.disconnect().await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the early message kept",
        || async { queue_message_count(&queue) == Some(1) },
    )
    .await;

    // Declaring again, as a second deploy would, changes nothing and keeps the message.
    outbox(None, &["declare", &destination, &queue]).await.ok();
    assert_eq!(queue_message_count(&queue), Some(1));
}

// ------------------------------------------------------------------------------ exit codes

#[tokio::test]
async fn usage_and_configuration_errors_exit_2_and_operational_failures_exit_1() {
    let usage: &[&[&str]] = &[
        &["status"],
        &["bogus"],
        &["retry", "--older-than", "3x"],
        &["retry", "--id", "not-a-uuid"],
        &["purge", "--status", "scheduled"],
        &["dlq", "list", "q", "--limit", "0"],
    ];
    for args in usage {
        let run = outbox(None, args).await;
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
    }
    let run = command(Some("postgres://postgres@127.0.0.1:5432/x"), &["status"])
        .env("OUTBOX_MAXIMUM_RETRY_ATTEMPTS", "fifty")
        .output()
        .await
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("OUTBOX_MAXIMUM_RETRY_ATTEMPTS"));

    // Nothing listens on port 1.
    let run = outbox(Some("postgres://postgres@127.0.0.1:1/x"), &["status"]).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    let run = command(None, &["dlq", "list", "q"])
        .env("OUTBOX_STOMP_HOST_AND_PORTS", "127.0.0.1:1")
        .output()
        .await
        .unwrap();
    assert_eq!(run.status.code(), Some(1));

    for args in [&["--help"][..], &["dlq", "replay", "--help"][..]] {
        outbox(None, args).await.ok();
    }
    let help = outbox(None, &["--help"]).await.ok();
    assert!(help.stdout.contains("Exit codes"), "{}", help.stdout);
}

/// `outbox publish` on the database at `url`, polling every 0.1 s, its output shown.
fn spawn_publish(url: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
        .arg("publish")
        .env("DATABASE_URL", url)
        .env("OUTBOX_STOMP_HOST_AND_PORTS", RABBITMQ_STOMP)
        .env("OUTBOX_PRODUCER_WAITING_TIME", "0.1")
        .kill_on_drop(true)
        .spawn()
        .expect("start outbox publish")
}

#[tokio::test]
async fn the_outbox_binary_relays_and_exits_zero_on_sigterm_with_no_row_left_claimed() {
    let test = TestDb::new(Backend::Postgres).await;
    let key = unique("relay_binary");
    let (mut reader, _cleanup) = topic_reader(&key).await;
    enqueue(&test.db, &format!("/topic/{key}"), 50).await;
    let mut child = spawn_publish(&test.url);
    let mut ids = std::collections::HashSet::new();
    while ids.len() < 50 {
        let frame = reader
            .next_message(Duration::from_secs(20))
            .await
            .expect("the binary relays");
        ids.insert(frame.header("dop-msg-id").unwrap().to_owned());
    }
    enqueue(&test.db, &format!("/topic/{key}"), 50).await;
    let pid = child.id().expect("running");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let claimed = Published::find()
        .filter(Column::ClaimToken.is_not_null())
        .all(&test.db)
        .await
        .unwrap();
    assert!(claimed.is_empty(), "no row left claimed");
    test.drop_database().await;
}

#[tokio::test]
async fn the_relay_stops_on_sigquit_as_on_sigterm() {
    let test = TestDb::new(Backend::Postgres).await;
    let key = unique("relay_sigquit");
    let (mut reader, _cleanup) = topic_reader(&key).await;
    enqueue(&test.db, &format!("/topic/{key}"), 1).await;
    let mut child = spawn_publish(&test.url);
    // Relaying shows the relay runs, its signal handlers installed.
    reader
        .next_message(Duration::from_secs(20))
        .await
        .expect("the binary relays");
    let pid = child.id().expect("running");
    let sent = std::process::Command::new("kill")
        .args(["-QUIT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits after SIGQUIT")
        .unwrap();
    assert_eq!(status.code(), Some(0), "a clean stop, not a core dump");
    test.drop_database().await;
}

// ------------------------------------------------------------------ settings out of range

#[tokio::test]
async fn settings_that_once_panicked_or_looped_now_fail_at_start_naming_the_variable() {
    let test = TestDb::new(Backend::Postgres).await;
    for (variable, value) in [
        ("OUTBOX_DAYS_TO_KEEP_DATA", "99999999"),
        ("OUTBOX_DAYS_TO_KEEP_DATA", "0"),
        ("OUTBOX_PRODUCER_LEASE", "99999999999999"),
        ("OUTBOX_REMOVE_DATA_CACHE_TTL", "99999999999999"),
        ("OUTBOX_PUBLISHED_CHUNK_SIZE", "100000"),
        ("OUTBOX_PAUSE_FOR_RETRY", "99999999999999"),
        ("OUTBOX_CONSUMER_RETRY_WAIT", "99999999999999"),
        ("OUTBOX_CONSUMER_CALLBACK_TIMEOUT", "0"),
        ("OUTBOX_RECEIPT_TIMEOUT", "1e15"),
        ("OUTBOX_STOMP_HEARTBEATS", "4294967296,0"),
    ] {
        for args in [&["publish"][..], &["status"][..]] {
            let run = tokio::time::timeout(
                Duration::from_secs(30),
                command(Some(&test.url), args).env(variable, value).output(),
            )
            .await
            .unwrap_or_else(|_| panic!("{variable}={value} {args:?}: still running after 30 s"))
            .unwrap();
            let stderr = String::from_utf8_lossy(&run.stderr);
            assert_eq!(
                run.status.code(),
                Some(2),
                "{variable}={value} {args:?}: {stderr}"
            );
            assert!(stderr.contains(variable), "{variable}={value}: {stderr}");
            assert!(
                stderr.contains("must be between"),
                "{variable}={value}: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{variable}={value}: {stderr}");
        }
    }
    assert!(rows(&test.db).await.is_empty());
    test.drop_database().await;
}

// ---------------------------------------------------------------------- dlq replay, looping

#[tokio::test]
async fn replay_without_a_limit_ends_on_a_message_without_an_id_that_keeps_failing() {
    let test = TestDb::new(Backend::Postgres).await;
    let (queue, dead_letters, destination, _cleanup) =
        declared_with_dead_letters("cli_dlq_loop").await;
    // Every attempt fails: each copy the replay sends is dead-lettered again at once.
    let calls = Arc::new(AtomicUsize::new(0));
    let consumer = Consumer::builder(test.db.clone())
        .config(consumer_config())
        .destination(&destination)
        .start({
            let calls = calls.clone();
            move |_payload: Payload| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>("this message always fails") }
            }
        })
        .unwrap();
    // No dop-msg-id, no cap-msg-id: nothing in the message tells one copy from the next.
    let mut peer = StompPeer::connect(RABBITMQ_STOMP).await.unwrap();
    peer.send(&destination, &[("persistent", "true")], br#"{"n": 1}"#)
        .await
        .unwrap();
    peer.disconnect().await.unwrap();
    eventually(Duration::from_secs(15), "the message dead-lettered", || {
        let dead_letters = dead_letters.clone();
        async move { ready_messages(&dead_letters) == Some(1) }
    })
    .await;

    let run = outbox(None, &["dlq", "replay", &queue]).await.ok();
    assert!(
        run.stdout
            .contains("stopped at a message replayed earlier in this run"),
        "{}",
        run.stdout
    );
    assert_eq!(first_number(&run.stdout), 1, "{}", run.stdout);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "once, and once more after the replay"
    );
    eventually(Duration::from_secs(15), "the copy back in the DLQ", || {
        let dead_letters = dead_letters.clone();
        async move { ready_messages(&dead_letters) == Some(1) }
    })
    .await;
    // A later run is a new run: it replays the copy once, and stops again.
    let run = outbox(None, &["dlq", "replay", &queue]).await.ok();
    assert_eq!(first_number(&run.stdout), 1, "{}", run.stdout);
    consumer.stop().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    test.drop_database().await;
}

// ---------------------------------------------------------------------------------- secrets

/// A RabbitMQ user of its own, deleted when dropped.
struct BrokerUser(String);

impl BrokerUser {
    fn create(passcode: &str) -> BrokerUser {
        let name = unique("outbox_secret_user");
        for args in [
            vec!["--quiet", "add_user", name.as_str(), passcode],
            vec![
                "--quiet",
                "set_permissions",
                "-p",
                "/",
                name.as_str(),
                ".*",
                ".*",
                ".*",
            ],
        ] {
            let status = std::process::Command::new("rabbitmqctl")
                .args(&args)
                .status()
                .expect("run rabbitmqctl");
            assert!(status.success(), "rabbitmqctl {args:?}");
        }
        BrokerUser(name)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["--quiet", "delete_user", &self.0])
            .status();
    }
}

/// Fragments of the password and passcode of [`secrets_never_show`]: none of their forms
/// (plain, percent-encoded, percent-decoded) can show without one of these.
const SECRET_MARKERS: &[&str] = &["Qx7", "Dj4ngo", "Pk9"];

/// Runs `command` to its end (a minute at most); its exit code, and its stdout and stderr
/// together.
async fn run_to_the_end(what: &str, mut command: tokio::process::Command) -> (Option<i32>, String) {
    let run = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("{what}: still running"))
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    (run.status.code(), output)
}

#[track_caller]
fn assert_no_secret(what: &str, output: &str) {
    for marker in SECRET_MARKERS {
        assert!(
            !output.contains(marker),
            "{what} shows a secret ({marker}):\n{output}"
        );
    }
}

#[tokio::test]
async fn secrets_never_show_in_any_error_or_log_line() {
    // `#`, `?`, `@` and `%` in both: percent-encoded they are %23, %3F, %40 and %25.
    const PASSWORD: &str = "Qx7#pw?z@%41";
    const PASSWORD_ENCODED: &str = "Qx7%23pw%3Fz%40%2541";
    const PASSCODE: &str = "Pk9#v?q@%41";
    let test = TestDb::new(Backend::Postgres).await;
    let database = test.url.rsplit('/').next().unwrap().to_owned();
    // The server trusts local connections: the password is carried, not checked.
    let encoded_url = format!("postgres://postgres:{PASSWORD_ENCODED}@127.0.0.1:5432/{database}");
    let user = BrokerUser::create(PASSCODE);
    let key = unique("secrets");
    let (mut reader, _cleanup) = topic_reader(&key).await;
    enqueue(&test.db, &format!("/topic/{key}"), 3).await;

    // What the run is, its DATABASE_URL, more variables, its arguments.
    type SecretRun<'a> = (String, String, Vec<(&'a str, String)>, Vec<&'a str>);
    let runs: Vec<SecretRun> = vec![
        // Malformed: the password unencoded, as copied from a secret store.
        (
            "malformed URL".into(),
            format!("postgres://postgres:{PASSWORD}@127.0.0.1:5432/{database}"),
            vec![],
            vec!["status"],
        ),
        // A scheme copied from a Django setting.
        (
            "unknown scheme".into(),
            "postgresql+psycopg://app:Dj4ngo!Qx7@127.0.0.1:5432/app".into(),
            vec![],
            vec!["status"],
        ),
        (
            "unreachable server".into(),
            format!("postgres://postgres:{PASSWORD_ENCODED}@127.0.0.1:1/{database}"),
            vec![],
            vec!["status"],
        ),
        (
            "a URL where a setting goes".into(),
            encoded_url.clone(),
            vec![("OUTBOX_DATABASE_URL", encoded_url.clone())],
            vec!["status"],
        ),
        (
            "refused passcode".into(),
            encoded_url.clone(),
            vec![("OUTBOX_STOMP_PASSCODE", PASSCODE.into())],
            vec!["dlq", "list", "nothing"],
        ),
        ("status".into(), encoded_url.clone(), vec![], vec!["status"]),
    ];
    for (what, url, env, args) in runs {
        let mut command = command(Some(&url), &args);
        command.env("RUST_LOG", "trace");
        for (name, value) in &env {
            command.env(name, value);
        }
        let (code, output) = run_to_the_end(&what, command).await;
        assert_no_secret(&what, &output);
        if what != "status" {
            assert_ne!(code, Some(0), "{what} failed:\n{output}");
        }
    }

    // The relay, at the most verbose level, with the password and the passcode it uses.
    let mut relay = command(Some(&encoded_url), &["publish"])
        .env("RUST_LOG", "trace")
        .env("OUTBOX_STOMP_USERNAME", &user.0)
        .env("OUTBOX_STOMP_PASSCODE", PASSCODE)
        .env("OUTBOX_PRODUCER_WAITING_TIME", "0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the relay");
    // Read as it comes: a full pipe would stop the relay.
    let mut stderr = relay.stderr.take().expect("piped");
    let collected = tokio::spawn(async move {
        let mut logs = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stderr, &mut logs)
            .await
            .unwrap();
        logs
    });
    for _ in 0..3 {
        reader
            .next_message(Duration::from_secs(20))
            .await
            .expect("the relay sends with the user's passcode");
    }
    let pid = relay.id().expect("running");
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), relay.wait())
        .await
        .expect("the relay stops")
        .unwrap();
    let output = collected.await.unwrap();
    let logs = String::from_utf8_lossy(&output);
    assert!(logs.contains("relay started"), "{logs}");
    assert_no_secret("the relay's logs", &logs);

    // A consumer in this process, every log line captured: its passcode, and a callback
    // failing with a database error that quotes a URL.
    let captured = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let writer = {
        let captured = captured.clone();
        move || CapturedLog(captured.clone())
    };
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(writer)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    let queue = unique("secrets_consumer");
    let _queues = QueueCleanup(vec![queue.clone(), format!("DLQ.{queue}")]);
    let destination = format!("/topic/{queue}");
    let mut config = consumer_config();
    config.stomp_username = user.0.clone();
    config.stomp_passcode = outbox::config::Secret::new(PASSCODE);
    config.consumer_max_retry_attempts = 0;
    let consumer = Consumer::builder(test.db.clone())
        .config(config)
        .destination(&destination)
        .start({
            let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:5432/x");
            move |_payload: Payload| {
                let url = url.clone();
                async move {
                    let err = sea_orm::Database::connect(url).await.err();
                    Err::<(), _>(format!("no database: {err:?}"))
                }
            }
        })
        .unwrap();
    outbox(None, &["declare", &destination]).await.ok();
    let mut peer = StompPeer::connect(RABBITMQ_STOMP).await.unwrap();
    peer.send(&destination, &[("dop-msg-id", "s-1")], b"{}")
        .await
        .unwrap();
    peer.disconnect().await.unwrap();
    let dead = format!("DLQ.{queue}");
    eventually(Duration::from_secs(20), "the message dead-lettered", || {
        let dead = dead.clone();
        async move { ready_messages(&dead) == Some(1) }
    })
    .await;
    consumer.stop().await.unwrap();
    let logs = String::from_utf8_lossy(&captured.lock().unwrap()).into_owned();
    assert!(logs.contains("dead-lettering"), "{logs}");
    assert!(
        logs.contains("postgres:***@"),
        "the URL is shown, its password not: {logs}"
    );
    assert_no_secret("the consumer's logs", &logs);
    test.drop_database().await;
}

#[tokio::test]
async fn a_failed_database_connection_never_shows_its_password_in_the_user_info_or_the_query() {
    // A password in the user info, another as `?password=`, another as `&sslpassword=`.
    let unreachable = "postgres://postgres:Qx7-user@127.0.0.1:1/test\
                       ?password=Qx7-query&sslmode=prefer&sslpassword=Qx7-ssl";
    // An unknown scheme: the driver's error quotes the whole URL.
    let unknown_scheme = "postgress://postgres:Qx7-user@127.0.0.1:5432/test?password=Qx7-query";
    // (An unreachable server costs the command's connect timeout, 10 s: once is enough.)
    for (what, url, args) in [
        ("status, unknown scheme", unknown_scheme, &["status"][..]),
        ("publish, unreachable", unreachable, &["publish"][..]),
        (
            "retry, unknown scheme",
            unknown_scheme,
            &["retry", "--dry-run"][..],
        ),
    ] {
        let mut command = command(Some(url), args);
        command.env("RUST_LOG", "trace");
        let (code, output) = run_to_the_end(what, command).await;
        assert_ne!(code, Some(0), "{what}:\n{output}");
        assert!(output.contains("database"), "{what} says why:\n{output}");
        assert_no_secret(what, &output);
    }

    // The library's own logs: a relay on a pool whose connections fail, every line of the
    // outbox captured, and the error a service gets back from connecting. (SeaORM's span of
    // `Database::connect` and sqlx's warnings quote the URL as given, outside the library: the
    // command above redacts its whole output, a service's log pipeline has to.)
    let captured = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let writer = {
        let captured = captured.clone();
        move || CapturedLog(captured.clone())
    };
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("outbox=trace"))
        .with_writer(writer)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    let mut options = sea_orm::ConnectOptions::new(unreachable);
    options
        .connect_lazy(true)
        .acquire_timeout(Duration::from_millis(500));
    let db = sea_orm::Database::connect(options).await.unwrap();
    let mut settings = consumer_config();
    settings.maximum_backoff = Duration::from_millis(200);
    let relay = outbox::Producer::builder(db)
        .config(settings)
        .start()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    relay.stop().await.unwrap();
    let refused = sea_orm::Database::connect(unknown_scheme)
        .await
        .unwrap_err();
    let shown = outbox::Error::from(refused).to_string();
    assert!(shown.contains("postgres:***@"), "{shown}");
    assert_no_secret("the error of a refused URL", &shown);
    let logs = String::from_utf8_lossy(&captured.lock().unwrap()).into_owned();
    assert!(logs.contains("relay round failed"), "{logs}");
    assert_no_secret("the relay's logs", &logs);
}

#[tokio::test]
async fn a_passcode_sent_in_clear_to_a_remote_broker_is_warned_of_once_naming_the_address() {
    // 192.0.2.0/24 is reserved for documentation: nothing answers there.
    let run = |addresses: &'static str| async move {
        let run = command(None, &["declare", "/topic/plain_passcode_warning"])
            .env("OUTBOX_STOMP_HOST_AND_PORTS", addresses)
            .env("OUTBOX_STOMP_PASSCODE", "Pk9-plain")
            .env("OUTBOX_RECEIPT_TIMEOUT", "1")
            .env("OUTBOX_MAXIMUM_BACKOFF", "0.1")
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&run.stderr).into_owned()
    };
    let remote = run("192.0.2.1:61613,127.0.0.1:1").await;
    assert_eq!(
        remote.matches("sent in clear").count(),
        1,
        "one warning, for the remote address only:\n{remote}"
    );
    let warning = remote
        .lines()
        .find(|line| line.contains("sent in clear"))
        .unwrap_or_default();
    assert!(warning.contains("192.0.2.1:61613"), "{remote}");
    assert!(!warning.contains("127.0.0.1"), "{remote}");
    assert_no_secret("the warning", &remote);
    let local = run("127.0.0.1:1").await;
    assert!(!local.contains("sent in clear"), "{local}");
}

/// A log writer into a shared buffer.
struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------- list, show, check

#[tokio::test]
async fn list_show_and_received_list_find_one_message_by_its_filters() {
    let test = TestDb::new(Backend::Postgres).await;
    let url = test.url.as_str();
    let orders = enqueue(&test.db, "/topic/orders.v1", 3).await;
    let prices = enqueue(&test.db, "/topic/prices", 2).await;
    set(&test.db, &orders[..1], Status::Failed, 2).await;
    let correlation = row(&test.db, prices[1]).await.headers["dop-correlation-id"]
        .as_str()
        .unwrap()
        .to_owned();

    let failed = outbox(Some(url), &["list", "--status", "failed"])
        .await
        .ok();
    assert!(
        failed.stdout.contains(&orders[0].to_string()),
        "{}",
        failed.stdout
    );
    assert_eq!(
        failed.stdout.matches("/topic/").count(),
        1,
        "{}",
        failed.stdout
    );
    assert!(failed.stdout.contains("last error:"), "{}", failed.stdout);

    let json = outbox(
        Some(url),
        &["list", "--destination", "/topic/prices", "--json"],
    )
    .await
    .ok();
    let listed: Vec<Value> = serde_json::from_str(&json.stdout).unwrap();
    let ids: Vec<&str> = listed.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&prices[0].to_string().as_str()));

    let by_correlation = outbox(
        Some(url),
        &["list", "--correlation-id", &correlation, "--json"],
    )
    .await
    .ok();
    // One enqueue_all is one correlation: both price rows, and no order row.
    let found: Vec<Value> = serde_json::from_str(&by_correlation.stdout).unwrap();
    let mut found: Vec<&str> = found.iter().map(|r| r["id"].as_str().unwrap()).collect();
    found.sort_unstable();
    let mut expected = vec![prices[0].to_string(), prices[1].to_string()];
    expected.sort_unstable();
    assert_eq!(found, expected);

    let old = outbox(Some(url), &["list", "--until", "1d", "--json"])
        .await
        .ok();
    let old: Vec<Value> = serde_json::from_str(&old.stdout).unwrap();
    assert_eq!(old.len(), 1, "only the row backdated two days");
    let limited = outbox(Some(url), &["list", "--limit", "2"]).await.ok();
    assert!(limited.stdout.contains("the limit"), "{}", limited.stdout);

    let shown = outbox(Some(url), &["show", &prices[1].to_string()])
        .await
        .ok();
    assert!(
        shown.stdout.contains("destination  /topic/prices"),
        "{}",
        shown.stdout
    );
    assert!(
        shown
            .stdout
            .contains(&format!("dop-correlation-id: {correlation}"))
    );
    assert!(shown.stdout.contains("\"n\": 1"), "{}", shown.stdout);
    let missing = outbox(Some(url), &["show", &Uuid::new_v4().to_string()]).await;
    assert_eq!(missing.code, 1, "{}", missing.stderr);
    assert!(missing.stderr.contains("no outbox row has id"));

    let queue = unique("cli_received");
    let inbox = Received::find().all(&test.db).await.unwrap();
    assert!(inbox.is_empty());
    let consumed = outbox::tables::received::ActiveModel {
        id: Set(Uuid::new_v4()),
        queue: Set(queue.clone()),
        msg_id: Set(Some(prices[0].to_string())),
        headers: Set(Some(json!({ "dop-correlation-id": "c-1" }))),
        body: Set(Some(json!({ "text": "y".repeat(500) }))),
        added: Set(Utc::now()),
        expires_at: Set(Utc::now() + chrono::Duration::days(1)),
        retry: Set(0),
        status: Set(Status::Succeeded),
    };
    sea_orm::ActiveModelTrait::insert(consumed, &test.db)
        .await
        .unwrap();
    let received = outbox(Some(url), &["received", "list", "--queue", &queue])
        .await
        .ok();
    assert!(
        received.stdout.contains(&prices[0].to_string()),
        "{}",
        received.stdout
    );
    assert!(
        received.stdout.contains("--full shows it"),
        "the body is cut to a line"
    );
    let whole = outbox(
        Some(url),
        &[
            "received",
            "list",
            "--msg-id",
            &prices[0].to_string(),
            "--full",
        ],
    )
    .await
    .ok();
    assert!(whole.stdout.contains(&"y".repeat(500)));
    let none = outbox(Some(url), &["received", "list", "--queue", "nobody"])
        .await
        .ok();
    assert!(none.stdout.contains("no inbox rows match"));
    test.drop_database().await;
}

#[tokio::test]
async fn status_check_exits_3_with_the_threshold_crossed_and_0_when_healthy() {
    let test = TestDb::new(Backend::Postgres).await;
    let url = test.url.as_str();
    let healthy = outbox(
        Some(url),
        &[
            "status",
            "--check",
            "--max-pending-age",
            "60s",
            "--max-failed",
            "0",
        ],
    )
    .await
    .ok();
    assert!(
        healthy.stdout.starts_with("healthy: no row waiting"),
        "{}",
        healthy.stdout
    );

    let written = enqueue(&test.db, "/topic/orders.v1", 2).await;
    set(&test.db, &written[..1], Status::Schedule, 1).await;
    let late = outbox(
        Some(url),
        &["status", "--check", "--max-pending-age", "60s"],
    )
    .await;
    assert_eq!(late.code, 3, "{} {}", late.stdout, late.stderr);
    assert_eq!(late.stdout.lines().count(), 1);
    assert!(
        late.stdout
            .starts_with("unhealthy: the oldest unsent row has waited")
    );

    set(&test.db, &written[..1], Status::Failed, 1).await;
    set(&test.db, &written[1..], Status::Succeeded, 0).await;
    let failing = outbox(Some(url), &["status", "--check", "--max-failed", "0"]).await;
    assert_eq!(failing.code, 3);
    assert_eq!(
        failing.stdout.trim(),
        "unhealthy: 1 FAILED rows, more than 0"
    );
    let recent = outbox(
        Some(url),
        &[
            "status",
            "--check",
            "--max-failed",
            "0",
            "--failed-since",
            "1h",
        ],
    )
    .await
    .ok();
    assert!(
        recent.stdout.contains("0 FAILED rows counted"),
        "{}",
        recent.stdout
    );

    let no_threshold = outbox(Some(url), &["status", "--check"]).await;
    assert_eq!(no_threshold.code, 2, "{}", no_threshold.stderr);
    let database_down = outbox(
        Some("postgres://postgres@127.0.0.1:1/none"),
        &["status", "--check", "--max-failed", "0"],
    )
    .await;
    assert_eq!(database_down.code, 1, "{}", database_down.stderr);
    test.drop_database().await;
}
