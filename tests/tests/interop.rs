//! A test binary of its own: the trace tests set the global tracing subscriber.
//!
//! Side by side with the Python library itself: django-outbox-pattern (the version pinned in
//! `interop/requirements.txt`) running the Django project of `interop/`, on the real PostgreSQL
//! and RabbitMQ, against our consumer, our relay (the `outbox` binary) and our queues.
//!
//! The Python side is the virtualenv whose interpreter `OUTBOX_TEST_PYTHON` names (`.ci/run`
//! makes it and sets the variable). Without it these tests fail, saying how to make one: a skip
//! would pass unseen. Every Python process runs under a time limit and is killed when its test
//! ends, passing or not. Django and our service each have their own database (both have a
//! `received` table); they meet only on the broker.
//!
//! The trace tests also run the Python side instrumented with
//! opentelemetry-instrumentation-django-outbox-pattern, its spans written to a file that the test
//! reads, and record ours through OpenTelemetry's in-memory exporter.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use outbox::consumer::ConsumerHandle;
use outbox::{Consumer, OutboxConfig, Payload};
use outbox_tests::stomp_peer::{
    QueueCleanup, RABBITMQ_STOMP, StompPeer, queue_figure, unescape, unique,
};
use outbox_tests::{Backend, TestDb, eventually};
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, Statement};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

const PYTHON_VAR: &str = "OUTBOX_TEST_PYTHON";
/// How long one `manage.py` command may run before the test gives up on it.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);
/// How long a test waits for messages to cross.
const DELIVERY_LIMIT: Duration = Duration::from_secs(60);

// ------------------------------------------------------------------------------- the Python side

/// The virtualenv's interpreter, or a failure that says how to get one.
fn python() -> PathBuf {
    match std::env::var_os(PYTHON_VAR) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => panic!(
            "{PYTHON_VAR} is not set: these tests run the Python library django-outbox-pattern. \
             Make its virtualenv with `python3 -m venv /tmp/interop && /tmp/interop/bin/pip \
             install -r interop/requirements.txt` and set {PYTHON_VAR}=/tmp/interop/bin/python \
             (.ci/run does both)"
        ),
    }
}

fn project_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../interop"))
}

/// The Django project on a database of its own, with its migrations (the library's and the
/// project's) applied.
struct Django {
    db: TestDb,
    /// The destination the `@publish` model announces to.
    destination: String,
    /// The STOMP port the project uses (61613, or a recording proxy's).
    stomp_port: u16,
    /// Where the long-running processes write their logs.
    logs: tempdir::Dir,
    /// The file every `manage.py` process appends its OpenTelemetry spans to, when the
    /// project is instrumented (`INTEROP_SPANS`, see `interop/interop_project/tracing.py`).
    spans: Option<PathBuf>,
}

/// A `manage.py` process that runs until the test stops it; killed when dropped.
struct Background {
    child: Child,
    log: PathBuf,
    what: String,
}

impl Django {
    async fn new(destination: &str) -> Django {
        let django = Django {
            db: TestDb::bare(Backend::Postgres).await,
            destination: destination.to_owned(),
            stomp_port: 61613,
            logs: tempdir::Dir::new(),
            spans: None,
        };
        django.manage(&["migrate", "-v0"], None).await;
        django
    }

    fn database_name(&self) -> &str {
        self.db
            .url
            .rsplit('/')
            .next()
            .and_then(|last| last.split('?').next())
            .expect("a database URL ends with the database name")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(python());
        command
            .arg("manage.py")
            .args(args)
            .current_dir(project_dir())
            .env("INTEROP_DB_NAME", self.database_name())
            .env("INTEROP_DESTINATION", &self.destination)
            .env("INTEROP_STOMP_PORT", self.stomp_port.to_string())
            .env("PYTHONUNBUFFERED", "1")
            .env(
                "INTEROP_SPANS",
                self.spans.as_deref().unwrap_or(Path::new("")),
            )
            // Nothing written into the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .kill_on_drop(true);
        command
    }

    /// `manage.py write_orders` with `args`: the ids of the rows it wrote.
    async fn write_orders(&self, args: &[&str]) -> Vec<String> {
        let command: Vec<&str> = std::iter::once("write_orders")
            .chain(args.iter().copied())
            .collect();
        serde_json::from_str(self.manage(&command, None).await.trim())
            .expect("write_orders prints the ids")
    }

    /// Runs `manage.py <args>` to its end, with `stdin` as its input; its stdout.
    async fn manage(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut command = self.command(args);
        command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("running {} manage.py failed: {e}", python().display()));
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            pipe.write_all(input.as_bytes()).await.expect("write stdin");
            drop(pipe);
        }
        let output = tokio::time::timeout(COMMAND_LIMIT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "`manage.py {}` did not end within {COMMAND_LIMIT:?}",
                    args.join(" ")
                )
            })
            .expect("wait for manage.py");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "`manage.py {}` failed ({}):\nstdout: {stdout}\nstderr: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// Starts `manage.py <args>` (the relay or a consumer), its output going to a log file.
    fn spawn(&self, args: &[&str]) -> Background {
        let log = self.logs.path().join(format!("{}.log", unique("manage")));
        let file = std::fs::File::create(&log).expect("create a log file");
        let mut command = self.command(args);
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone the log file"))
            .stderr(file);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting manage.py failed: {e}"));
        Background {
            child,
            log,
            what: format!("manage.py {}", args.join(" ")),
        }
    }

    /// Instruments every later `manage.py` process with opentelemetry-instrumentation-django-
    /// outbox-pattern, its spans written to a file of the log directory.
    fn record_spans(&mut self) {
        self.spans = Some(self.logs.path().join("spans.jsonl"));
    }

    /// The spans the instrumented processes have finished so far.
    fn spans(&self) -> Vec<PySpan> {
        let path = self.spans.as_ref().expect("an instrumented project");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("a span line"))
            .collect()
    }

    /// The `dop-msg-id` of every effect the project's callback left, one per processing.
    async fn effects(&self) -> Vec<String> {
        strings(&self.db.db, "SELECT msg_id FROM shop_effect ORDER BY id").await
    }

    /// Waits until the project's callback has left an effect for each of `ids`.
    async fn wait_for_effects(&self, ids: &[String], what: &str) {
        eventually(DELIVERY_LIMIT, what, || async move {
            let effects = self.effects().await;
            ids.iter().all(|id| effects.contains(id))
        })
        .await;
    }
}

impl Background {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if the process has ended.
    #[track_caller]
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("poll the process") {
            panic!("{} ended ({status}):\n{}", self.what, self.log());
        }
    }

    /// Stops the process as an operator does (SIGTERM), killing it if it takes over 15 s.
    async fn stop(mut self) -> String {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        self.log()
    }
}

/// A directory removed when dropped.
mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> Dir {
            let path = std::env::temp_dir().join(super::unique("outbox_interop"));
            std::fs::create_dir_all(&path).expect("create a temp dir");
            Dir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn strings(db: &DatabaseConnection, sql: &str) -> Vec<String> {
    let rows = db
        .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .map(|row| {
            row.try_get::<Option<String>>("", "msg_id")
                .expect("read msg_id")
                .unwrap_or_default()
        })
        .collect()
}

// -------------------------------------------------------------------------------- our side

fn config() -> OutboxConfig {
    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = vec![("127.0.0.1".to_owned(), 61613)];
    config.receipt_timeout = Duration::from_secs(3);
    config.maximum_backoff = Duration::from_millis(300);
    config.consumer_shutdown_timeout = Duration::from_secs(10);
    config
}

/// Our consumer on `queue`, recording the `dop-msg-id` of each message its callback processed.
fn our_consumer(
    db: &DatabaseConnection,
    destination: &str,
    queue: &str,
) -> (ConsumerHandle, Arc<Mutex<Vec<String>>>) {
    let effects = Arc::new(Mutex::new(Vec::new()));
    let handle = Consumer::builder(db.clone())
        .config(config())
        .destination(destination)
        .queue(queue)
        .start({
            let effects = effects.clone();
            move |payload: Payload| {
                let effects = effects.clone();
                async move {
                    let id = payload.header("dop-msg-id").unwrap_or_default().to_owned();
                    payload.save();
                    effects.lock().unwrap().push(id);
                    Ok::<_, outbox::Error>(())
                }
            }
        })
        .expect("start our consumer");
    (handle, effects)
}

/// The `outbox publish` binary on `database_url`, sending through `stomp`.
fn our_relay(database_url: &str, stomp: &str) -> Child {
    Command::new(outbox_tests::binaries::outbox_command())
        .arg("publish")
        .env("DATABASE_URL", database_url)
        .env("OUTBOX_STOMP_HOST_AND_PORTS", stomp)
        .env("OUTBOX_PRODUCER_WAITING_TIME", "0.2")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the outbox binary")
}

/// The consumers RabbitMQ counts on `queue`, `None` when the queue does not exist.
fn queue_consumers(queue: &str) -> Option<usize> {
    queue_figure(queue, "consumers")
}

async fn wait_consumers(queue: &str, count: usize) {
    eventually(
        Duration::from_secs(30),
        &format!("{count} consumer(s) on queue {queue}"),
        || async move { queue_consumers(queue) == Some(count) },
    )
    .await;
}

/// How often each id occurs.
fn tally<'a>(ids: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for id in ids {
        *counts.entry(id.clone()).or_insert(0) += 1;
    }
    counts
}

// ---------------------------------------------------------------------------------- the tests

/// Django writes through the decorator and through `Published.objects.create`, the Python relay
/// sends, our consumer processes each message once; three direct sends with one `dop-msg-id`
/// are one effect.
#[tokio::test]
async fn python_relay_to_our_consumer() {
    let key = unique("interop_py_to_rs");
    let destination = format!("/topic/{key}");
    let _queues = QueueCleanup(vec![key.clone(), format!("DLQ.{key}")]);
    let ours = TestDb::new(Backend::Postgres).await;
    let django = Django::new(&destination).await;

    let (consumer, effects) = our_consumer(&ours.db, &destination, &key);
    wait_consumers(&key, 1).await;

    let written: Vec<String> = django
        .write_orders(&["--decorated", "3", "--explicit", "3"])
        .await;
    assert_eq!(written.len(), 6, "{written:?}");
    let mut relay = django.spawn(&["publish"]);
    {
        let effects = effects.clone();
        let written = written.clone();
        eventually(
            DELIVERY_LIMIT,
            "our consumer processed the six rows",
            || {
                let done = written
                    .iter()
                    .all(|id| effects.lock().unwrap().contains(id));
                async move { done }
            },
        )
        .await;
    }
    relay.assert_running();
    relay.stop().await;

    // Three direct sends of one message, then another one: with one message in flight at a
    // time, once the last is processed the three copies have been handled.
    let direct = unique("direct");
    let last = unique("last");
    django
        .manage(
            &["send_direct", &destination, &direct, "--count", "3"],
            None,
        )
        .await;
    django
        .manage(&["send_direct", &destination, &last], None)
        .await;
    {
        let effects = effects.clone();
        let last = last.clone();
        eventually(DELIVERY_LIMIT, "the last direct send processed", || {
            let done = effects.lock().unwrap().contains(&last);
            async move { done }
        })
        .await;
    }
    consumer.stop().await.expect("stop our consumer");

    let counts = tally(effects.lock().unwrap().iter());
    let mut expected: BTreeMap<String, usize> = written.iter().map(|id| (id.clone(), 1)).collect();
    expected.insert(direct, 1);
    expected.insert(last, 1);
    assert_eq!(counts, expected, "effects per dop-msg-id");
    let published: Vec<i32> = {
        let rows = django
            .db
            .db
            .query_all_raw(Statement::from_string(
                django.db.db.get_database_backend(),
                "SELECT status FROM published",
            ))
            .await
            .expect("read Django's outbox");
        rows.iter()
            .map(|row| row.try_get::<i32>("", "status").expect("status"))
            .collect()
    };
    assert_eq!(
        published,
        vec![2; 6],
        "the Python relay marked its rows sent"
    );
    django.db.drop_database().await;
    ours.drop_database().await;
}

/// Rows our library wrote, relayed by the `outbox` binary, are processed once each by the
/// library's `manage.py subscribe` and its README callback.
#[tokio::test]
async fn our_relay_to_python_subscribe() {
    let key = unique("interop_rs_to_py");
    let destination = format!("/topic/{key}");
    let _queues = QueueCleanup(vec![key.clone(), format!("DLQ.{key}")]);
    let ours = TestDb::new(Backend::Postgres).await;
    let django = Django::new(&destination).await;

    let mut subscriber = django.spawn(&["subscribe", "shop.callbacks.record", &destination]);
    wait_consumers(&key, 1).await;

    let mut ids = Vec::new();
    for n in 0..5 {
        let body = serde_json::json!({"n": n, "text": "wörld: colon\\backslash\nnewline"});
        let row = outbox::Message::new(&destination, &body)
            .expect("a message")
            .header("x-custom", "a:b")
            .enqueue(&ours.db)
            .await
            .expect("enqueue");
        ids.push(row.id.to_string());
    }
    let row = outbox::Message::new(&destination, &serde_json::json!({"versioned": true}))
        .expect("a message")
        .enqueue(&ours.db)
        .await
        .expect("enqueue");
    ids.push(row.id.to_string());

    let mut relay = our_relay(&ours.url, RABBITMQ_STOMP);
    django
        .wait_for_effects(&ids, "manage.py subscribe processed every row")
        .await;
    // Long enough for a duplicate to show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    subscriber.assert_running();
    let _ = relay.kill().await;
    let log = subscriber.stop().await;

    let effects = django.effects().await;
    let counts = tally(effects.iter().filter(|id| ids.contains(id)));
    let expected: BTreeMap<String, usize> = ids.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(counts, expected, "effects per dop-msg-id; log:\n{log}");
    let received = strings(&django.db.db, "SELECT msg_id FROM received").await;
    for id in &ids {
        assert!(received.contains(id), "{id} is in Django's inbox");
    }
    django.db.drop_database().await;
    ours.drop_database().await;
}

/// One queue, read at once by `manage.py subscribe` and by our consumer, whichever declared it
/// first: neither is refused (no PRECONDITION_FAILED), and each message is processed by exactly
/// one of them.
async fn shared_queue(python_first: bool) {
    let key = unique("interop_shared");
    let destination = format!("/topic/{key}");
    let _queues = QueueCleanup(vec![key.clone(), format!("DLQ.{key}")]);
    let ours = TestDb::new(Backend::Postgres).await;
    let django = Django::new(&destination).await;

    let args = ["subscribe", "shop.callbacks.record", destination.as_str()];
    let (mut subscriber, (consumer, rust_effects)) = if python_first {
        let subscriber = django.spawn(&args);
        wait_consumers(&key, 1).await;
        (subscriber, our_consumer(&ours.db, &destination, &key))
    } else {
        let consumer = our_consumer(&ours.db, &destination, &key);
        wait_consumers(&key, 1).await;
        (django.spawn(&args), consumer)
    };
    wait_consumers(&key, 2).await;

    let ids: Vec<String> = (0..30).map(|_| unique("shared")).collect();
    let mut peer = StompPeer::connect(RABBITMQ_STOMP)
        .await
        .expect("connect to RabbitMQ");
    for (n, id) in ids.iter().enumerate() {
        peer.send(
            &destination,
            &[("dop-msg-id", id.as_str()), ("persistent", "true")],
            format!(r#"{{"n": {n}}}"#).as_bytes(),
        )
        .await
        .expect("send");
    }
    let _ = peer.disconnect().await;

    eventually(
        DELIVERY_LIMIT,
        "every message processed by one side or the other",
        || {
            let ids = ids.clone();
            let rust_effects = rust_effects.clone();
            let django = &django;
            async move {
                let python = django.effects().await;
                let rust = rust_effects.lock().unwrap().clone();
                ids.iter()
                    .all(|id| python.contains(id) || rust.contains(id))
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    subscriber.assert_running();
    let queue_consumers_at_end = queue_consumers(&key);
    consumer.stop().await.expect("stop our consumer");
    let log = subscriber.stop().await;

    assert!(
        !log.contains("PRECONDITION_FAILED"),
        "the Python consumer was refused:\n{log}"
    );
    assert_eq!(
        queue_consumers_at_end,
        Some(2),
        "both sides still subscribed"
    );
    let python = tally(django.effects().await.iter());
    let rust = tally(rust_effects.lock().unwrap().iter());
    for id in &ids {
        let by_python = python.get(id).copied().unwrap_or(0);
        let by_rust = rust.get(id).copied().unwrap_or(0);
        assert_eq!(
            by_python + by_rust,
            1,
            "{id}: processed {by_python} time(s) by Python and {by_rust} by us"
        );
    }
    let (python_share, rust_share) = (
        ids.iter().filter(|id| python.contains_key(*id)).count(),
        ids.iter().filter(|id| rust.contains_key(*id)).count(),
    );
    assert!(
        python_share > 0 && rust_share > 0,
        "both consumers took part: Python {python_share}, us {rust_share}"
    );
    assert_eq!(
        python.len(),
        python_share,
        "Python processed only our messages"
    );
    assert_eq!(rust.len(), rust_share, "we processed only our messages");
    django.db.drop_database().await;
    ours.drop_database().await;
}

#[tokio::test]
async fn shared_queue_declared_by_python() {
    shared_queue(true).await;
}

#[tokio::test]
async fn shared_queue_declared_by_us() {
    shared_queue(false).await;
}

// ------------------------------------------------------------------------- the frames compared

/// A recorded SEND frame: its headers (unescaped, in the order sent) and its body.
type Send = (Vec<(String, String)>, Vec<u8>);

/// A TCP proxy to RabbitMQ's STOMP port that keeps every byte the client sent.
struct Recorder {
    port: u16,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let record = sent.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let Ok(broker) = TcpStream::connect(RABBITMQ_STOMP).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut broker_read, mut broker_write) = broker.into_split();
                    let upstream = async move {
                        let mut buffer = [0u8; 8192];
                        while let Ok(n) = client_read.read(&mut buffer).await {
                            if n == 0 || broker_write.write_all(&buffer[..n]).await.is_err() {
                                break;
                            }
                            record.lock().unwrap().extend_from_slice(&buffer[..n]);
                        }
                        let _ = broker_write.shutdown().await;
                    };
                    let downstream = async move {
                        let _ = tokio::io::copy(&mut broker_read, &mut client_write).await;
                        let _ = client_write.shutdown().await;
                    };
                    tokio::join!(upstream, downstream);
                });
            }
        });
        Recorder { port, sent }
    }

    /// The SEND frames recorded so far: headers (unescaped, in the order sent) and body.
    fn sends(&self) -> Vec<Send> {
        let bytes = self.sent.lock().unwrap().clone();
        let mut frames = Vec::new();
        let mut rest = &bytes[..];
        loop {
            // Heart-beats and frame-ending EOLs between frames.
            while let Some((b'\n' | b'\r', tail)) = rest.split_first() {
                rest = tail;
            }
            let Some(end) = find(rest, b"\n\n").or_else(|| find(rest, b"\r\n\r\n")) else {
                break;
            };
            let head = String::from_utf8_lossy(&rest[..end]).replace('\r', "");
            let mut lines = head.lines();
            let command = lines.next().unwrap_or_default().to_owned();
            let headers: Vec<(String, String)> = lines
                .filter_map(|line| line.split_once(':'))
                .map(|(name, value)| {
                    (
                        name.to_owned(),
                        if command == "CONNECT" || command == "STOMP" {
                            value.to_owned()
                        } else {
                            unescape(value).expect("a well-escaped header")
                        },
                    )
                })
                .collect();
            let body_start = end + if rest[end] == b'\r' { 4 } else { 2 };
            let length = headers
                .iter()
                .find(|(name, _)| name == "content-length")
                .and_then(|(_, value)| value.parse::<usize>().ok());
            let body_end = match length {
                Some(length) => body_start + length,
                None => match find(&rest[body_start..], b"\0") {
                    Some(at) => body_start + at,
                    None => break,
                },
            };
            if body_end >= rest.len() {
                break;
            }
            if command == "SEND" {
                frames.push((headers, rest[body_start..body_end].to_vec()));
            }
            rest = &rest[body_end + 1..];
        }
        frames
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The same outbox row sent by the Python relay and by ours: the SEND frames' headers compared
/// name by name. The differences are exactly those README's wire section lists.
#[tokio::test]
async fn the_same_row_sent_by_both_relays() {
    let key = unique("interop_frames");
    let destination = format!("/topic/{key}");
    let ours = TestDb::new(Backend::Postgres).await;
    let python_recorder = Recorder::start().await;
    let mut django = Django::new(&destination).await;
    django.stomp_port = python_recorder.port;

    let headers = r#"{"x-custom": "a:b", "dop-correlation-id": "my-correlation-id", "dop-msg-id": "try-override"}"#;
    let written: Vec<String> = django
        .write_orders(&["--explicit", "1", "--headers", headers])
        .await;
    let row_id = written[0].clone();

    // The row, copied column by column into our outbox.
    let row = django
        .db
        .db
        .query_one_raw(Statement::from_string(
            django.db.db.get_database_backend(),
            format!(
                "SELECT destination, version, body, headers, added, expires_at \
                 FROM published WHERE id = '{row_id}'"
            ),
        ))
        .await
        .expect("read Django's row")
        .expect("Django's row exists");
    let copy = outbox::tables::published::Model {
        id: row_id.parse().expect("a UUID"),
        version: row.try_get("", "version").expect("version"),
        destination: row.try_get("", "destination").expect("destination"),
        body: row.try_get("", "body").expect("body"),
        headers: row.try_get("", "headers").expect("headers"),
        added: row.try_get("", "added").expect("added"),
        expires_at: row.try_get("", "expires_at").expect("expires_at"),
        retry: 0,
        status: outbox::tables::published::Status::Schedule,
        claim_token: None,
        locked_until: None,
        next_attempt_at: None,
        last_error: None,
        msg_key: None,
        seq: None,
    };
    outbox::Published::insert(sea_orm::IntoActiveModel::into_active_model(copy))
        .exec(&ours.db)
        .await
        .expect("copy the row into our outbox");

    let mut python_relay = django.spawn(&["publish"]);
    eventually(DELIVERY_LIMIT, "the Python relay sent the row", || {
        let sent = !python_recorder.sends().is_empty();
        async move { sent }
    })
    .await;
    python_relay.assert_running();
    python_relay.stop().await;

    let our_recorder = Recorder::start().await;
    let mut relay = our_relay(&ours.url, &format!("127.0.0.1:{}", our_recorder.port));
    eventually(DELIVERY_LIMIT, "our relay sent the row", || {
        let sent = !our_recorder.sends().is_empty();
        async move { sent }
    })
    .await;
    let _ = relay.kill().await;

    let (python_headers, python_body) = python_recorder.sends().remove(0);
    let (our_headers, our_body) = our_recorder.sends().remove(0);
    let python: BTreeMap<String, String> = python_headers.into_iter().collect();
    let ours_map: BTreeMap<String, String> = our_headers.into_iter().collect();
    println!("Python relay's SEND headers: {python:#?}\nour relay's SEND headers: {ours_map:#?}");

    // Same name, same value.
    for name in [
        "destination",
        "dop-msg-id",
        "dop-msg-destination",
        "dop-msg-type",
        "dop-msg-sent-time",
        "dop-correlation-id",
        "x-custom",
    ] {
        assert_eq!(python.get(name), ours_map.get(name), "header {name}");
    }
    assert_eq!(python["dop-msg-id"], row_id);
    assert_eq!(python["dop-correlation-id"], "my-correlation-id");
    assert_eq!(python["x-custom"], "a:b");
    // The differences, each listed in README's wire section.
    let python_names: BTreeSet<&str> = python.keys().map(String::as_str).collect();
    let our_names: BTreeSet<&str> = ours_map.keys().map(String::as_str).collect();
    let only_ours: BTreeSet<&str> = our_names.difference(&python_names).copied().collect();
    let only_python: BTreeSet<&str> = python_names.difference(&our_names).copied().collect();
    assert_eq!(
        only_ours,
        BTreeSet::from(["content-type", "persistent", "receipt"]),
        "headers only our relay sends"
    );
    assert!(
        only_python.is_empty(),
        "headers only Python sends: {only_python:?}"
    );
    assert_eq!(ours_map["content-type"], "application/json");
    assert_eq!(ours_map["persistent"], "true");
    // content-length: each side's own body, which differ in spacing and escaping only.
    assert_eq!(python["content-length"], python_body.len().to_string());
    assert_eq!(ours_map["content-length"], our_body.len().to_string());
    let python_json: Value = serde_json::from_slice(&python_body).expect("Python's body is JSON");
    let our_json: Value = serde_json::from_slice(&our_body).expect("our body is JSON");
    assert_eq!(python_json, our_json, "the bodies as JSON values");
    django.db.drop_database().await;
    ours.drop_database().await;
}

// ----------------------------------------------------------------- an existing Django database

/// The adopt step's own migrator, as a service runs it once.
struct Adopt;

impl sea_orm_migration::MigratorTrait for Adopt {
    fn migrations() -> Vec<Box<dyn sea_orm_migration::MigrationTrait>> {
        outbox::migration::adopt_django()
    }
}

/// A database django-outbox-pattern created, adopted: Django goes on writing, unchanged, our
/// relay sends its rows, and `manage.py subscribe` (on the same database, its `received` now
/// adopted as well) processes each once.
#[tokio::test]
async fn our_relay_on_an_adopted_django_database() {
    use sea_orm_migration::MigratorTrait;

    let key = unique("interop_adopted");
    let destination = format!("/topic/{key}");
    let _queues = QueueCleanup(vec![key.clone(), format!("DLQ.{key}")]);
    let django = Django::new(&destination).await;
    // Rows written before the adoption are relayed too.
    let mut ids: Vec<String> = django
        .write_orders(&["--decorated", "1", "--explicit", "1"])
        .await;

    Adopt::up(&django.db.db, None).await.expect("adopt");
    let pending = outbox_tests::Migrator::get_pending_migrations(&django.db.db)
        .await
        .expect("pending migrations");
    assert!(
        pending.is_empty(),
        "after adopting, the outbox's list has nothing left to apply: {:?}",
        pending
            .iter()
            .map(|m| m.name().to_owned())
            .collect::<Vec<_>>()
    );
    outbox_tests::Migrator::up(&django.db.db, None)
        .await
        .expect("migrate up after adopting");

    let mut subscriber = django.spawn(&["subscribe", "shop.callbacks.record", &destination]);
    wait_consumers(&key, 1).await;
    let later: Vec<String> = django
        .write_orders(&["--decorated", "2", "--explicit", "2"])
        .await;
    ids.extend(later);

    let mut relay = our_relay(&django.db.url, RABBITMQ_STOMP);
    django
        .wait_for_effects(
            &ids,
            "manage.py subscribe processed every Django row our relay sent",
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    subscriber.assert_running();
    let _ = relay.kill().await;
    let log = subscriber.stop().await;

    let counts = tally(django.effects().await.iter());
    let expected: BTreeMap<String, usize> = ids.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(counts, expected, "effects per dop-msg-id; log:\n{log}");
    let rows = outbox::Published::find()
        .all(&django.db.db)
        .await
        .expect("Django's rows read through our entity");
    assert_eq!(rows.len(), ids.len());
    assert!(
        rows.iter()
            .all(|row| row.status == outbox::tables::published::Status::Succeeded),
        "our relay marked Django's rows sent"
    );
    let received = outbox::Received::find()
        .all(&django.db.db)
        .await
        .expect("Django's inbox read through our entity");
    assert_eq!(received.len(), ids.len(), "Django's inbox rows, queue ''");

    // Our consumer on the same, adopted inbox: a message Django's consumer processed is a
    // duplicate for it too (Django's UNIQUE(msg_id) stays), a new one is processed.
    let ours_key = format!("{key}_rs");
    let ours_destination = format!("/topic/{ours_key}");
    let _our_queues = QueueCleanup(vec![ours_key.clone(), format!("DLQ.{ours_key}")]);
    let (consumer, effects) = our_consumer(&django.db.db, &ours_destination, &ours_key);
    wait_consumers(&ours_key, 1).await;
    let fresh = unique("fresh");
    let mut peer = StompPeer::connect(RABBITMQ_STOMP)
        .await
        .expect("connect to RabbitMQ");
    for id in [ids[0].as_str(), fresh.as_str()] {
        peer.send(
            &ours_destination,
            &[("dop-msg-id", id)],
            br#"{"again": true}"#,
        )
        .await
        .expect("send");
    }
    let _ = peer.disconnect().await;
    {
        let effects = effects.clone();
        let fresh = fresh.clone();
        eventually(
            DELIVERY_LIMIT,
            "our consumer processed the new message",
            || {
                let done = effects.lock().unwrap().contains(&fresh);
                async move { done }
            },
        )
        .await;
    }
    consumer.stop().await.expect("stop our consumer");
    assert_eq!(
        *effects.lock().unwrap(),
        vec![fresh],
        "the message Django's consumer processed is not processed again"
    );

    // Migrating down would go on to drop Django's tables: refused, and nothing is dropped.
    let error = outbox_tests::Migrator::down(&django.db.db, None)
        .await
        .expect_err("migrating an adopted database down is refused");
    assert!(error.to_string().contains("refusing"), "{error}");
    let rows = outbox::Published::find()
        .all(&django.db.db)
        .await
        .expect("Django's outbox is still there");
    assert_eq!(rows.len(), ids.len());
    django.db.drop_database().await;
}

/// Elsewhere than on PostgreSQL the adopt step refuses, saying why.
#[tokio::test]
async fn adopting_is_refused_outside_postgres() {
    use sea_orm_migration::MigratorTrait;

    for backend in [Backend::MariaDb, Backend::Sqlite] {
        let t = TestDb::bare(backend).await;
        let error = Adopt::up(&t.db, None)
            .await
            .expect_err("adopting is refused");
        assert!(
            error.to_string().contains("PostgreSQL only"),
            "{backend:?}: {error}"
        );
        t.drop_database().await;
    }
}

// ------------------------------------------------------------- traces across the two languages

/// A span a Python process finished, as `interop/interop_project/tracing.py` writes it.
#[derive(Debug, serde::Deserialize)]
struct PySpan {
    name: String,
    kind: String,
    trace_id: String,
    span_id: String,
    parent_span_id: Option<String>,
    parent_is_remote: Option<bool>,
}

/// The spans this process records, through `tracing-opentelemetry` into OpenTelemetry's
/// in-memory exporter: one global subscriber for the whole test binary, installed by the first
/// test that needs it (the consumer runs in tasks of its own). Each test finds its own spans by
/// their trace id.
fn our_spans() -> &'static InMemorySpanExporter {
    static SPANS: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    &SPANS
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            let layer =
                tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-interop"));
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
                .expect("the only global subscriber of this test binary");
            (exporter, provider)
        })
        .0
}

fn finished(exporter: &InMemorySpanExporter) -> Vec<SpanData> {
    exporter
        .get_finished_spans()
        .expect("read the exported spans")
}

/// A trace started around a Django save (the instrumentor's `save published` span, inside the
/// test command's own span) crosses the Python relay (which re-injects its `send` span) and
/// continues in our consumer: our `outbox.message` span is in the same trace, the child of the
/// relay's send span, a remote parent.
#[tokio::test]
async fn a_django_trace_continues_in_our_consumer() {
    let exporter = our_spans();
    let key = unique("interop_trace_py_to_rs");
    let destination = format!("/topic/{key}");
    let _queues = QueueCleanup(vec![key.clone(), format!("DLQ.{key}")]);
    let ours = TestDb::new(Backend::Postgres).await;
    let mut django = Django::new(&destination).await;
    django.record_spans();

    let (consumer, effects) = our_consumer(&ours.db, &destination, &key);
    wait_consumers(&key, 1).await;
    let written: Vec<String> = django
        .write_orders(&["--decorated", "1", "--span", "checkout"])
        .await;
    assert_eq!(written.len(), 1, "{written:?}");
    let checkout = {
        let spans = django.spans();
        let checkout: Vec<&PySpan> = spans.iter().filter(|s| s.name == "checkout").collect();
        assert_eq!(checkout.len(), 1, "{spans:?}");
        (checkout[0].trace_id.clone(), checkout[0].span_id.clone())
    };

    let mut relay = django.spawn(&["publish"]);
    eventually(
        DELIVERY_LIMIT,
        "our consumer processed the row and closed its span",
        || {
            let processed = effects.lock().unwrap().contains(&written[0]);
            let closed = finished(exporter).iter().any(|span| {
                span.name == "outbox.message"
                    && span.span_context.trace_id().to_string() == checkout.0
            });
            async move { processed && closed }
        },
    )
    .await;
    relay.assert_running();
    let relay_log = relay.stop().await;
    consumer.stop().await.expect("stop our consumer");

    let python = django.spans();
    let sends: Vec<&PySpan> = python
        .iter()
        .filter(|s| s.trace_id == checkout.0 && s.name.starts_with("send "))
        .collect();
    assert_eq!(
        sends.len(),
        1,
        "the Python relay's send span, in the save's trace: {python:?}\n{relay_log}"
    );
    assert_eq!(sends[0].kind, "PRODUCER");
    let saves: Vec<&PySpan> = python
        .iter()
        .filter(|s| {
            s.name.starts_with("save published ") && s.parent_span_id.as_ref() == Some(&checkout.1)
        })
        .collect();
    assert_eq!(
        saves.len(),
        1,
        "the save's span, under the command's: {python:?}"
    );
    assert_eq!(
        sends[0].parent_span_id.as_ref(),
        Some(&saves[0].span_id),
        "the relay continued the row's trace"
    );

    let ours_spans = finished(exporter);
    let messages: Vec<&SpanData> = ours_spans
        .iter()
        .filter(|span| {
            span.name == "outbox.message" && span.span_context.trace_id().to_string() == checkout.0
        })
        .collect();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(
        messages[0].parent_span_id.to_string(),
        sends[0].span_id,
        "our message span is the child of the Python relay's send span"
    );
    assert!(messages[0].parent_span_is_remote);
    django.db.drop_database().await;
    ours.drop_database().await;
}

/// A row we save inside a span, relayed by the `outbox` binary, is processed by the
/// instrumented `manage.py subscribe`: its `process` span is in our trace, the child of our
/// writer's span (our relay sends the row's `traceparent` as written).
#[tokio::test]
async fn our_trace_continues_in_python_subscribe() {
    let exporter = our_spans();
    let key = unique("interop_trace_rs_to_py");
    let destination = format!("/topic/{key}");
    let _queues = QueueCleanup(vec![key.clone(), format!("DLQ.{key}")]);
    let ours = TestDb::new(Backend::Postgres).await;
    let mut django = Django::new(&destination).await;
    django.record_spans();

    let mut subscriber = django.spawn(&["subscribe", "shop.callbacks.record", &destination]);
    wait_consumers(&key, 1).await;
    let row = outbox::enqueue(&ours.db, &destination, &serde_json::json!({"traced": true}))
        .instrument(tracing::info_span!("interop.writer"))
        .await
        .expect("enqueue");
    let id = row.id.to_string();
    let writer = {
        let spans = finished(exporter);
        let writer: Vec<&SpanData> = spans
            .iter()
            .filter(|span| {
                span.name == "interop.writer"
                    && row.headers["traceparent"].as_str().is_some_and(|parent| {
                        parent.contains(&span.span_context.span_id().to_string())
                    })
            })
            .collect();
        assert_eq!(writer.len(), 1, "the writer's span, named by the row");
        writer[0].span_context.clone()
    };

    let mut relay = our_relay(&ours.url, RABBITMQ_STOMP);
    eventually(
        DELIVERY_LIMIT,
        "manage.py subscribe processed the row and wrote its span",
        || {
            let django = &django;
            let id = id.clone();
            let trace = writer.trace_id().to_string();
            async move {
                django.effects().await.contains(&id)
                    && django
                        .spans()
                        .iter()
                        .any(|s| s.trace_id == trace && s.name.starts_with("process "))
            }
        },
    )
    .await;
    subscriber.assert_running();
    let _ = relay.kill().await;
    let log = subscriber.stop().await;

    let python = django.spans();
    let process: Vec<&PySpan> = python
        .iter()
        .filter(|s| s.trace_id == writer.trace_id().to_string() && s.name.starts_with("process "))
        .collect();
    assert_eq!(process.len(), 1, "{python:?}\n{log}");
    assert_eq!(process[0].kind, "CONSUMER");
    assert_eq!(
        process[0].parent_span_id,
        Some(writer.span_id().to_string()),
        "the Python consumer's span is the child of our writer's"
    );
    assert_eq!(process[0].parent_is_remote, Some(true));
    django.db.drop_database().await;
    ours.drop_database().await;
}
