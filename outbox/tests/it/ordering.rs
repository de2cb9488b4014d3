//! Per-key ordering against the real databases (and, for the consumer, the real RabbitMQ): the
//! migration that adds `msg_key` and `seq`, keys declared with `#[publish(key = ..)]` and
//! `Message::key`, a claim that takes at most one row per key and none behind an unsent one, a
//! FAILED row blocking its key until it is retried, concurrent writers of one key, and a consumer
//! that processes each key's messages one at a time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::tables::published::Status;
use outbox::tables::published::{Column, Model as Row};
use outbox::transport::MemoryTransport;
use outbox::{Consumer, Message, OutboxConfig, Payload, Producer, Published};
use outbox_tests::stomp_peer::{QueueCleanup, RABBITMQ_STOMP, unique};
use outbox_tests::{Backend, TestDb, count_with_status, eventually, on_every_backend};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, Schema,
    Statement, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use serde_json::json;

mod account {
    use sea_orm::entity::prelude::*;

    /// Keyed by a field on save, by its primary key on delete.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "accounts")]
    #[outbox::publish(destination = "/topic/accounts", key = owner)]
    #[outbox::publish(destination = "/topic/account-log", key = id, on(insert, delete))]
    #[outbox::publish(destination = "/topic/account-regions", key = super::region_key)]
    #[outbox::publish(destination = "/topic/account-misc")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub owner: String,
        pub region: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

fn region_key(account: &account::Model) -> String {
    format!("region-{}", account.region)
}

/// Settings for tests: short timings, one attempt per row before FAILED.
fn config() -> OutboxConfig {
    let (host, port) = RABBITMQ_STOMP.rsplit_once(':').expect("host:port");
    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = vec![(host.to_owned(), port.parse().expect("port"))];
    config.receipt_timeout = Duration::from_secs(2);
    config.producer_lease = Duration::from_secs(3);
    config.maximum_backoff = Duration::from_millis(300);
    config.producer_waiting_time = Duration::from_millis(100);
    config.pause_for_retry = Duration::ZERO;
    config.wait_retry = Duration::ZERO;
    config.maximum_retry_attempts = 1;
    config
}

fn memory_producer(db: &DatabaseConnection, transport: &MemoryTransport) -> Producer {
    Producer::builder(db.clone())
        .config(config())
        .transport(transport.new_connection())
        .isolation_transport(transport.new_connection())
        .build()
        .expect("a producer")
}

/// Writes `messages` in one transaction.
async fn write(db: &DatabaseConnection, messages: Vec<Message>) {
    let txn = db.begin().await.unwrap();
    outbox::enqueue_all(&txn, messages).await.unwrap();
    txn.commit().await.unwrap();
}

/// `(key, n)` of every message the transport was sent, in send order.
fn sent_keys(transport: &MemoryTransport) -> Vec<(Option<String>, i64)> {
    transport
        .sent()
        .iter()
        .map(|out| {
            let body: serde_json::Value = serde_json::from_slice(&out.body).unwrap();
            (
                out.header("x-outbox-key").map(str::to_owned),
                body["n"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Per key, the `n`s in the order they were sent.
fn per_key(sent: &[(Option<String>, i64)]) -> HashMap<String, Vec<i64>> {
    let mut keys: HashMap<String, Vec<i64>> = HashMap::new();
    for (key, n) in sent {
        if let Some(key) = key {
            keys.entry(key.clone()).or_default().push(*n);
        }
    }
    keys
}

on_every_backend!(
    keyed_rows_get_their_key_and_an_insertion_order,
    a_claim_takes_one_row_per_key_and_none_behind_an_unsent_one,
    a_failed_row_blocks_its_key_until_it_is_retried_and_others_flow,
    publish_attribute_keys_saves_and_deletes,
);

async fn keyed_rows_get_their_key_and_an_insertion_order(backend: Backend) {
    let test = TestDb::new(backend).await;
    write(
        &test.db,
        (0..5)
            .map(|n| Message::from_json("/topic/k", json!({ "n": n })).key("order-7"))
            .chain([Message::from_json("/topic/k", json!({"n": 99}))])
            .collect(),
    )
    .await;
    let order = match backend {
        Backend::Sqlite => "rowid",
        _ => "seq",
    };
    let rows = test
        .db
        .query_all_raw(Statement::from_string(
            test.db.get_database_backend(),
            format!("SELECT msg_key, seq, {order} AS position FROM published ORDER BY {order}"),
        ))
        .await
        .unwrap();
    assert_eq!(rows.len(), 6);
    let keys: Vec<Option<String>> = rows
        .iter()
        .map(|r| r.try_get("", "msg_key").unwrap())
        .collect();
    assert_eq!(keys[..5], vec![Some("order-7".to_owned()); 5][..]);
    assert_eq!(keys[5], None);
    let positions: Vec<i64> = rows
        .iter()
        .map(|r| r.try_get("", "position").unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    let seqs: Vec<Option<i64>> = rows.iter().map(|r| r.try_get("", "seq").unwrap()).collect();
    match backend {
        // `rowid` orders; the column stays empty.
        Backend::Sqlite => assert!(seqs.iter().all(Option::is_none)),
        _ => assert!(seqs.iter().all(Option::is_some), "{seqs:?}"),
    }

    // An empty or overlong key is refused before anything is written.
    let txn = test.db.begin().await.unwrap();
    let empty = Message::from_json("/topic/k", json!({}))
        .key("")
        .enqueue(&txn)
        .await;
    assert!(
        matches!(empty, Err(outbox::Error::InvalidDestination { .. })),
        "{empty:?}"
    );
    let long = Message::from_json("/topic/k", json!({}))
        .key("k".repeat(256))
        .enqueue(&txn)
        .await;
    assert!(
        matches!(long, Err(outbox::Error::InvalidDestination { .. })),
        "{long:?}"
    );
    txn.rollback().await.unwrap();

    // On PostgreSQL and MariaDB a keyed row needs a transaction (its writers' lock lasts as long
    // as one); SQLite, one writer at a time, takes it on an autocommit connection.
    let autocommit = Message::from_json("/topic/k", json!({}))
        .key("a")
        .enqueue(&test.db)
        .await;
    match backend {
        Backend::Sqlite => assert!(autocommit.is_ok(), "{autocommit:?}"),
        _ => assert!(
            matches!(
                autocommit,
                Err(outbox::Error::KeyedOutsideTransaction { .. })
            ),
            "{autocommit:?}"
        ),
    }
    // Unkeyed rows keep working on an autocommit connection everywhere.
    Message::from_json("/topic/k", json!({}))
        .enqueue(&test.db)
        .await
        .unwrap();
    test.drop_database().await;
}

async fn a_claim_takes_one_row_per_key_and_none_behind_an_unsent_one(backend: Backend) {
    let test = TestDb::new(backend).await;
    let transport = MemoryTransport::new();
    let mut messages = Vec::new();
    for n in 0..4 {
        for key in ["a", "b", "c"] {
            messages.push(Message::from_json("/topic/ordered", json!({ "n": n })).key(key));
        }
        messages.push(Message::from_json(
            "/topic/ordered",
            json!({ "n": 100 + n }),
        ));
    }
    write(&test.db, messages).await;
    let producer = memory_producer(&test.db, &transport);

    // One round: one row of each key (the first), and every unkeyed row.
    let report = producer.round().await.unwrap();
    assert_eq!((report.claimed, report.sent), (3 + 4, 3 + 4));
    let first = sent_keys(&transport);
    for key in ["a", "b", "c"] {
        assert_eq!(per_key(&first)[key], vec![0], "{first:?}");
    }

    let total = producer.drain().await.unwrap();
    assert_eq!(total.sent, 9);
    let sent = sent_keys(&transport);
    for (key, ns) in per_key(&sent) {
        assert_eq!(ns, vec![0, 1, 2, 3], "key {key}: {sent:?}");
    }
    assert_eq!(count_with_status(&test.db, Status::Succeeded).await, 16);
    test.drop_database().await;
}

async fn a_failed_row_blocks_its_key_until_it_is_retried_and_others_flow(backend: Backend) {
    let test = TestDb::new(backend).await;
    let transport = MemoryTransport::new();
    transport.refuse("/topic/poison");
    let mut messages = vec![Message::from_json("/topic/poison", json!({"n": 0})).key("blocked")];
    for n in 1..4 {
        messages.push(Message::from_json("/topic/fine", json!({ "n": n })).key("blocked"));
    }
    for n in 0..4 {
        messages.push(Message::from_json("/topic/fine", json!({ "n": n })).key("free"));
    }
    write(&test.db, messages).await;
    let producer = memory_producer(&test.db, &transport);
    producer.drain().await.unwrap();

    let sent = per_key(&sent_keys(&transport));
    assert_eq!(sent["free"], vec![0, 1, 2, 3]);
    assert!(!sent.contains_key("blocked"), "{sent:?}");
    assert_eq!(count_with_status(&test.db, Status::Failed).await, 1);
    let report = outbox::ops::status(&test.db, 10).await.unwrap();
    assert_eq!(report.blocked_key_count, 1);
    assert_eq!(
        report.blocked_keys,
        vec![outbox::ops::BlockedKey {
            key: "blocked".into(),
            failed: 1,
            waiting: 3
        }]
    );
    // More rounds change nothing while the row is FAILED.
    producer.drain().await.unwrap();
    assert!(!per_key(&sent_keys(&transport)).contains_key("blocked"));

    // Retried, the poison row goes first, then the rest of its key in order.
    transport.clear_refusals();
    transport.clear_sent();
    assert_eq!(outbox::ops::Retry::new().run(&test.db).await.unwrap(), 1);
    producer.drain().await.unwrap();
    assert_eq!(per_key(&sent_keys(&transport))["blocked"], vec![0, 1, 2, 3]);
    assert!(
        outbox::ops::status(&test.db, 10)
            .await
            .unwrap()
            .blocked_keys
            .is_empty()
    );
    test.drop_database().await;
}

async fn publish_attribute_keys_saves_and_deletes(backend: Backend) {
    use sea_orm::{ActiveModelTrait, Set};
    let test = TestDb::new(backend).await;
    let schema = Schema::new(test.db.get_database_backend());
    test.db
        .execute(&schema.create_table_from_entity(account::Entity))
        .await
        .unwrap();
    let saved = outbox::insert(
        &test.db,
        account::ActiveModel {
            id: Set(41),
            owner: Set("ada".into()),
            region: Set("eu".into()),
        },
    )
    .await
    .unwrap();
    let keys = |rows: Vec<Row>| -> Vec<(String, Option<String>)> {
        rows.into_iter()
            .map(|row| (row.destination, row.msg_key))
            .collect()
    };
    let rows = Published::find()
        .order_by_asc(Column::Destination)
        .all(&test.db)
        .await
        .unwrap();
    assert_eq!(
        keys(rows),
        vec![
            ("/topic/account-log".into(), Some("41".into())),
            ("/topic/account-misc".into(), None),
            ("/topic/account-regions".into(), Some("region-eu".into())),
            ("/topic/accounts".into(), Some("ada".into())),
        ]
    );
    let txn = test.db.begin().await.unwrap();
    account::ActiveModel {
        id: Set(saved.id),
        ..Default::default()
    }
    .delete(&txn)
    .await
    .unwrap();
    txn.commit().await.unwrap();
    let deletes = Published::find()
        .filter(Column::Destination.eq("/topic/account-log"))
        .order_by_asc(Column::Added)
        .all(&test.db)
        .await
        .unwrap();
    assert_eq!(deletes.len(), 2);
    assert_eq!(deletes[1].body, json!({"id": 41}));
    assert_eq!(deletes[1].msg_key.as_deref(), Some("41"));
    test.drop_database().await;
}

mod migration {
    use super::*;

    /// Applies the table-creating migrations, writes rows, then the keys migration: the table is
    /// not rewritten (same file node), the old rows keep `seq` NULL, new ones get numbers.
    #[tokio::test]
    async fn postgres_adds_the_key_columns_without_rewriting_the_table() {
        let test = TestDb::bare(Backend::Postgres).await;
        outbox_tests::Migrator::up(&test.db, Some(2)).await.unwrap();
        test.db
            .execute_unprepared(
                "INSERT INTO published (id, destination, body, headers, added, expires_at, retry, status) \
                 SELECT gen_random_uuid(), '/topic/old', '{}', '{}', now(), now() + interval '1 day', 0, 2 \
                 FROM generate_series(1, 1000)",
            )
            .await
            .unwrap();
        let node = || async {
            test.db
                .query_one_raw(Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT pg_relation_filenode('published')::bigint AS node",
                ))
                .await
                .unwrap()
                .unwrap()
                .try_get::<i64>("", "node")
                .unwrap()
        };
        let before = node().await;
        outbox_tests::Migrator::up(&test.db, None).await.unwrap();
        assert_eq!(node().await, before, "the table was rewritten");
        let applied: Vec<String> = outbox_tests::Migrator::get_applied_migrations(&test.db)
            .await
            .unwrap()
            .iter()
            .map(|m| m.name().to_owned())
            .collect();
        assert!(applied.contains(&"outbox_m20261201_000002_add_message_keys".to_owned()));
        let nulls = test
            .db
            .query_one_raw(Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT count(*) AS n FROM published WHERE seq IS NULL",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "n")
            .unwrap();
        assert_eq!(nulls, 1000);
        let index = test
            .db
            .query_one_raw(Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'published_key_unsent_idx'",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<String>("", "indexdef")
            .unwrap();
        assert!(index.contains("WHERE"), "not partial: {index}");
        write(
            &test.db,
            vec![Message::from_json("/topic/new", json!({})).key("k")],
        )
        .await;
        let row = Published::find()
            .filter(Column::Destination.eq("/topic/new"))
            .one(&test.db)
            .await
            .unwrap()
            .unwrap();
        assert!(row.seq.is_some());
        // And back down, and up again.
        outbox_tests::Migrator::down(&test.db, Some(1))
            .await
            .unwrap();
        outbox_tests::Migrator::up(&test.db, None).await.unwrap();
        test.drop_database().await;
    }

    /// On MariaDB both column changes are `ALGORITHM=INSTANT`, which MariaDB refuses rather than
    /// copy the table: that the migration applies over rows is the proof.
    #[tokio::test]
    async fn mariadb_adds_the_key_columns_instantly() {
        let test = TestDb::bare(Backend::MariaDb).await;
        outbox_tests::Migrator::up(&test.db, Some(2)).await.unwrap();
        test.db
            .execute_unprepared(
                "INSERT INTO published (id, destination, body, headers, added, expires_at, retry, status) \
                 VALUES (UNHEX(REPLACE(UUID(), '-', '')), '/topic/old', '{}', '{}', UTC_TIMESTAMP(6), \
                 UTC_TIMESTAMP(6) + INTERVAL 1 DAY, 0, 2)",
            )
            .await
            .unwrap();
        outbox_tests::Migrator::up(&test.db, None).await.unwrap();
        write(
            &test.db,
            vec![Message::from_json("/topic/new", json!({})).key("k")],
        )
        .await;
        let rows = Published::find()
            .order_by_asc(Column::Added)
            .all(&test.db)
            .await
            .unwrap();
        assert_eq!(rows[0].seq, None);
        assert!(rows[1].seq.is_some());
        outbox_tests::Migrator::down(&test.db, Some(1))
            .await
            .unwrap();
        outbox_tests::Migrator::up(&test.db, None).await.unwrap();
        test.drop_database().await;
    }

    /// Tables as django-outbox-pattern creates them, adopted: the ordering columns are added and
    /// recorded, so that the usual list has nothing left to apply; Django's inserts, which name
    /// their columns, get a `seq`.
    #[tokio::test]
    async fn an_adopted_django_table_gets_the_key_columns() {
        struct Adopt;
        impl MigratorTrait for Adopt {
            fn migrations() -> Vec<Box<dyn sea_orm_migration::MigrationTrait>> {
                outbox::migration::adopt_django()
            }
        }
        let test = TestDb::bare(Backend::Postgres).await;
        for statement in [
            "CREATE TABLE published (id uuid PRIMARY KEY, version varchar(100) NULL, \
             destination varchar(255) NOT NULL, body jsonb NOT NULL, added timestamptz NOT NULL, \
             expires_at timestamptz NOT NULL, retry integer NOT NULL, status integer NOT NULL, \
             headers jsonb NOT NULL)",
            "CREATE TABLE received (id uuid PRIMARY KEY, msg_id varchar(100) NULL UNIQUE, \
             headers jsonb NULL, body jsonb NULL, added timestamptz NOT NULL, \
             expires_at timestamptz NOT NULL, retry integer NOT NULL, status integer NOT NULL)",
            "CREATE TABLE django_migrations (id serial PRIMARY KEY, app varchar(255) NOT NULL, \
             name varchar(255) NOT NULL, applied timestamptz NOT NULL)",
        ] {
            test.db.execute_unprepared(statement).await.unwrap();
        }
        Adopt::up(&test.db, None).await.unwrap();
        let pending = outbox_tests::Migrator::get_pending_migrations(&test.db)
            .await
            .unwrap();
        assert!(
            pending.is_empty(),
            "{:?}",
            pending
                .iter()
                .map(|m| m.name().to_owned())
                .collect::<Vec<_>>()
        );
        test.db
            .execute_unprepared(
                "INSERT INTO published (id, version, destination, body, added, expires_at, retry, status, headers) \
                 VALUES (gen_random_uuid(), NULL, '/topic/django', '{}', now(), now() + interval '1 day', 0, 1, '{}')",
            )
            .await
            .unwrap();
        let row = Published::find().one(&test.db).await.unwrap().unwrap();
        assert!(row.seq.is_some());
        assert_eq!(row.msg_key, None);
        test.drop_database().await;
    }

    #[tokio::test]
    async fn sqlite_adds_the_key_columns_and_down_removes_them() {
        let test = TestDb::new(Backend::Sqlite).await;
        outbox_tests::Migrator::down(&test.db, Some(1))
            .await
            .unwrap();
        outbox_tests::Migrator::up(&test.db, None).await.unwrap();
        write(
            &test.db,
            vec![Message::from_json("/topic/new", json!({})).key("k")],
        )
        .await;
        test.drop_database().await;
    }
}

mod concurrent_writers {
    use super::*;

    /// Two transactions write a row of one key; the first to insert holds the key until it
    /// commits. Returns the bodies in send order once both committed, and whether the second
    /// insert had to wait.
    async fn second_insert_waits(test: &TestDb) -> bool {
        let first = test.db.begin().await.unwrap();
        Message::from_json("/topic/race", json!({"n": 1}))
            .key("race")
            .enqueue(&first)
            .await
            .unwrap();
        let db = test.connect().await;
        let second = tokio::spawn(async move {
            let txn = db.begin().await.unwrap();
            Message::from_json("/topic/race", json!({"n": 2}))
                .key("race")
                .enqueue(&txn)
                .await
                .unwrap();
            txn.commit().await.unwrap();
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let waited = !second.is_finished();
        first.commit().await.unwrap();
        second.await.unwrap();
        waited
    }

    /// PostgreSQL: the second writer waits for the first's commit (the advisory lock), so the
    /// order of `seq` is the order of commits and the relay sends 1 then 2.
    #[tokio::test]
    async fn postgres_serialises_the_writers_of_one_key() {
        let test = TestDb::new(Backend::Postgres).await;
        assert!(
            second_insert_waits(&test).await,
            "the second writer did not wait"
        );
        let transport = MemoryTransport::new();
        memory_producer(&test.db, &transport).drain().await.unwrap();
        assert_eq!(per_key(&sent_keys(&transport))["race"], vec![1, 2]);
        test.drop_database().await;
    }

    /// SQLite: one writer at a time anyway (the database's write lock), so the same holds.
    #[tokio::test]
    async fn sqlite_serialises_the_writers_of_one_key() {
        let test = TestDb::new(Backend::Sqlite).await;
        assert!(
            second_insert_waits(&test).await,
            "the second writer did not wait"
        );
        let transport = MemoryTransport::new();
        memory_producer(&test.db, &transport).drain().await.unwrap();
        assert_eq!(per_key(&sent_keys(&transport))["race"], vec![1, 2]);
        test.drop_database().await;
    }

    /// MariaDB: the second writer waits for the first's commit (the key's row in
    /// `outbox_key_lock`), so the order of `seq` is the order of commits, as on PostgreSQL.
    #[tokio::test]
    async fn mariadb_serialises_the_writers_of_one_key() {
        let test = TestDb::new(Backend::MariaDb).await;
        assert!(
            second_insert_waits(&test).await,
            "the second writer did not wait"
        );
        let transport = MemoryTransport::new();
        memory_producer(&test.db, &transport).drain().await.unwrap();
        assert_eq!(per_key(&sent_keys(&transport))["race"], vec![1, 2]);
        test.drop_database().await;
    }

    /// MariaDB without the key-lock migration: a keyed write names the migration to run.
    #[tokio::test]
    async fn mariadb_without_the_key_locks_names_the_migration() {
        let test = TestDb::new(Backend::MariaDb).await;
        test.db
            .execute_unprepared("DROP TABLE outbox_key_lock")
            .await
            .unwrap();
        let txn = test.db.begin().await.unwrap();
        let refused = Message::from_json("/topic/race", json!({"n": 1}))
            .key("race")
            .enqueue(&txn)
            .await
            .expect_err("no lock table");
        assert!(
            refused
                .to_string()
                .contains("outbox_m20261201_000005_add_key_locks"),
            "{refused}"
        );
        txn.rollback().await.unwrap();
        test.drop_database().await;
    }

    /// MariaDB: writers of different keys do not wait for each other (unless their keys share
    /// one of the 65,536 lock rows).
    #[tokio::test]
    async fn mariadb_writers_of_other_keys_do_not_wait() {
        let test = TestDb::new(Backend::MariaDb).await;
        let first = test.db.begin().await.unwrap();
        Message::from_json("/topic/race", json!({"n": 1}))
            .key("race-a")
            .enqueue(&first)
            .await
            .unwrap();
        let second = test.db.begin().await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            Message::from_json("/topic/race", json!({"n": 2}))
                .key("race-b")
                .enqueue(&second),
        )
        .await
        .expect("another key's writer does not wait")
        .unwrap();
        second.commit().await.unwrap();
        first.commit().await.unwrap();
        test.drop_database().await;
    }
}

/// The consumer in keyed mode, on the real RabbitMQ: 8 keys x 25 messages with `in_flight(8)`
/// and callbacks of random length. Each key's messages run one at a time in order; different
/// keys overlap.
#[tokio::test]
async fn ordered_consumer_processes_each_key_in_order_and_keys_in_parallel() {
    let test = TestDb::new(Backend::Postgres).await;
    let queue = unique("ordered_consumer");
    let _cleanup = QueueCleanup(vec![queue.clone(), format!("DLQ.{queue}")]);
    let destination = format!("/topic/{queue}");
    let consumer = Consumer::builder(test.db.clone())
        .destination(&destination)
        .config(config())
        .in_flight(8)
        .ordered_by_key()
        .build()
        .unwrap();
    consumer.declare().await.unwrap();

    let mut messages = Vec::new();
    for n in 0..25 {
        for key in 0..8 {
            messages.push(
                Message::from_json(&destination, json!({ "n": n })).key(format!("key-{key}")),
            );
        }
    }
    write(&test.db, messages).await;
    let producer = Producer::builder(test.db.clone())
        .config(config())
        .build()
        .unwrap();
    assert_eq!(producer.drain().await.unwrap().sent, 200);

    #[derive(Default)]
    struct Seen {
        by_key: HashMap<String, Vec<i64>>,
        running: HashSet<String>,
        overlapped_same_key: bool,
        max_running: usize,
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let recorder = seen.clone();
    let handle = Consumer::builder(test.db.clone())
        .destination(&destination)
        .config(config())
        .in_flight(8)
        .ordered_by_key()
        .start(move |payload: Payload| {
            let seen = recorder.clone();
            async move {
                let key = payload.header("x-outbox-key").unwrap_or("").to_owned();
                let n = payload.body()["n"].as_i64().unwrap_or(-1);
                {
                    let mut seen = seen.lock().unwrap();
                    if !seen.running.insert(key.clone()) {
                        seen.overlapped_same_key = true;
                    }
                    seen.max_running = seen.max_running.max(seen.running.len());
                }
                let pause = (n as u64 * 7 + key.len() as u64 * 3) % 6;
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let mut seen = seen.lock().unwrap();
                seen.running.remove(&key);
                seen.by_key.entry(key).or_default().push(n);
                payload.save();
                Ok::<_, outbox::Error>(())
            }
        })
        .unwrap();
    eventually(Duration::from_secs(30), "every message processed", || {
        let seen = seen.clone();
        async move {
            seen.lock()
                .unwrap()
                .by_key
                .values()
                .map(Vec::len)
                .sum::<usize>()
                >= 200
        }
    })
    .await;
    handle.stop().await.unwrap();
    let seen = seen.lock().unwrap();
    assert!(
        !seen.overlapped_same_key,
        "two messages of one key ran at once"
    );
    assert!(seen.max_running > 1, "keys were not processed in parallel");
    assert_eq!(seen.by_key.len(), 8);
    for (key, ns) in &seen.by_key {
        assert_eq!(*ns, (0..25).collect::<Vec<_>>(), "key {key}");
    }
}

/// A message dead-lettered by its callback does not hold its key up: the key's next messages are
/// processed after it, in order.
#[tokio::test]
async fn a_dead_lettered_message_does_not_block_its_key() {
    let test = TestDb::new(Backend::Postgres).await;
    let queue = unique("ordered_dead_letter");
    let _cleanup = QueueCleanup(vec![queue.clone(), format!("DLQ.{queue}")]);
    let destination = format!("/topic/{queue}");
    let builder = || {
        Consumer::builder(test.db.clone())
            .destination(&destination)
            .config(config())
            .in_flight(4)
            .ordered_by_key()
    };
    builder().build().unwrap().declare().await.unwrap();
    write(
        &test.db,
        (0..5)
            .map(|n| Message::from_json(&destination, json!({ "n": n })).key("k"))
            .collect(),
    )
    .await;
    let producer = Producer::builder(test.db.clone())
        .config(config())
        .build()
        .unwrap();
    assert_eq!(producer.drain().await.unwrap().sent, 5);

    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = seen.clone();
    let handle = builder()
        .start(move |payload: Payload| {
            let seen = recorder.clone();
            async move {
                let n = payload.body()["n"].as_i64().unwrap_or(-1);
                seen.lock().unwrap().push(n);
                if n == 0 {
                    return Err(outbox::Error::Config {
                        variable: "test".into(),
                        value: "0".into(),
                        reason: "this message is refused by its callback".into(),
                    });
                }
                payload.save();
                Ok(())
            }
        })
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "the key's other messages processed",
        || {
            let seen = seen.clone();
            async move { seen.lock().unwrap().len() >= 5 }
        },
    )
    .await;
    handle.stop().await.unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    test.drop_database().await;
}
