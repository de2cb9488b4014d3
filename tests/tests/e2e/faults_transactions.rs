//! Callbacks whose transaction dies under them: a statement fails and the callback ignores the
//! error (PostgreSQL then aborts the whole transaction, and its COMMIT rolls back with no error),
//! or the database picks the callback's transaction as a deadlock victim and rolls it back
//! (MariaDB; the callback's later statements would then autocommit). Either way the callback
//! returns `Ok`, and acknowledging the message would lose it: every message must end as a
//! committed effect or a dead letter, and an innocent message processed in the same group as a
//! broken one must run its callback and commit. Prints
//!
//! `fault.swallowed_db_error sent=N effects=N lost=0 duplicate_effects=0 wire_duplicates=0 dead_lettered=K ...`
//! `fault.swallowed_db_error_mariadb sent=N effects=N lost=0 duplicate_effects=0 wire_duplicates=0 deadlock_victims=K ...`

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::{Consumer, Payload, Producer, Published};
use outbox_tests::faults::*;
use outbox_tests::stomp_peer::{RABBITMQ_STOMP, queue_message_count};
use outbox_tests::{Backend, TestDb};
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, TransactionTrait};

/// What a message's callback does, by its number `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Breaks its transaction on every attempt: dead-lettered once its retries are spent.
    AlwaysBreaks,
    /// Breaks its transaction on its first attempt only: committed on a retry.
    BreaksOnce,
    /// Never breaks anything.
    Innocent,
}

fn role(n: u64) -> Role {
    match n % 4 {
        0 => Role::AlwaysBreaks,
        1 => Role::BreaksOnce,
        _ => Role::Innocent,
    }
}

/// The outbox's rows: message id and the `n` of its body.
async fn numbered_rows(db: &DatabaseConnection) -> HashMap<String, u64> {
    Published::find()
        .all(db)
        .await
        .expect("read the outbox")
        .into_iter()
        .map(|row| {
            let n = row.body["n"].as_u64().expect("a numbered body");
            (row.id.to_string(), n)
        })
        .collect()
}

/// Attempts seen per message id.
type Attempts = Arc<Mutex<HashMap<String, usize>>>;

fn next_attempt(attempts: &Attempts, key: &str) -> usize {
    let mut seen = attempts.lock().unwrap();
    let count = seen.entry(key.to_owned()).or_insert(0);
    *count += 1;
    *count
}

/// Polls `settled` until it holds or `limit` has passed; whether it held.
async fn settled_within<F, Fut>(limit: Duration, mut settled: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if settled().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// One phase's outcome: the messages that should have their effect, and those that should be
/// dead-lettered.
struct Phase {
    expected_effects: HashSet<String>,
    expected_dead: usize,
    dead_lettered: usize,
    attempted: usize,
    messages: usize,
    /// Messages left in the consumer's queue at the end.
    left: usize,
}

/// Swallowed errors on PostgreSQL: alone (group size 1) and in groups of 16. A quarter of the
/// messages break their transaction on every attempt, a quarter on their first attempt only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swallowed_database_errors_are_never_acknowledged_with_nothing_committed() {
    let started = Instant::now();
    let per_phase = counts(48, 400);
    let test = TestDb::new(Backend::Postgres).await;
    create_effects_table(&test.db).await;
    test.db
        .execute_unprepared("CREATE TABLE audit (id INT PRIMARY KEY)")
        .await
        .unwrap();
    test.db
        .execute_unprepared("INSERT INTO audit (id) VALUES (1)")
        .await
        .unwrap();

    let mut phases = Vec::new();
    for (index, group) in [1u32, 16].into_iter().enumerate() {
        let (destination, queue, _wire, _cleanup) = fresh_destination("fault_swallowed");
        declare_consumer_queues(&destination).await;
        let before: HashSet<String> = numbered_rows(&test.db).await.into_keys().collect();
        enqueue_many(&test.db, &destination, per_phase, index * per_phase).await;
        let rows: HashMap<String, u64> = numbered_rows(&test.db)
            .await
            .into_iter()
            .filter(|(id, _)| !before.contains(id))
            .collect();
        let relay = Producer::builder(pool(&test.url, 3).await)
            .config(config(RABBITMQ_STOMP))
            .start()
            .unwrap();
        let attempts: Attempts = Arc::default();
        let seen = attempts.clone();
        let consumer = Consumer::builder(pool(&test.url, 4).await)
            .config(config(RABBITMQ_STOMP))
            .destination(&destination)
            .in_flight(2)
            .group_size(group)
            .group_wait(Duration::from_millis(200))
            .start(move |payload: Payload| {
                let seen = seen.clone();
                async move {
                    let key = payload.message_id().unwrap_or_default().to_owned();
                    let n = payload.body()["n"].as_u64().unwrap_or(0);
                    let attempt = next_attempt(&seen, &key);
                    insert_effect(payload.db(), &key, "ok").await?;
                    let breaks = match role(n) {
                        Role::AlwaysBreaks => true,
                        Role::BreaksOnce => attempt == 1,
                        Role::Innocent => false,
                    };
                    if breaks {
                        // The "ignore the duplicate-key error" habit: the audit row exists.
                        let ignored = payload
                            .db()
                            .execute_unprepared("INSERT INTO audit (id) VALUES (1)")
                            .await;
                        assert!(ignored.is_err(), "the audit insert conflicts");
                    }
                    payload.save();
                    Ok::<(), BoxError>(())
                }
            })
            .unwrap();

        let expected_effects: HashSet<String> = rows
            .iter()
            .filter(|(_, n)| role(**n) != Role::AlwaysBreaks)
            .map(|(id, _)| id.clone())
            .collect();
        let expected_dead = rows.len() - expected_effects.len();
        let dlq = format!("DLQ.{queue}");
        let db = test.db.clone();
        let wanted = expected_effects.clone();
        // Not `eventually`: on a timeout the summary line still reports what was lost.
        settled_within(Duration::from_secs(60), || {
            let db = db.clone();
            let wanted = wanted.clone();
            let dlq = dlq.clone();
            async move {
                let effects = effect_counts(&db).await;
                wanted.iter().all(|id| effects.contains_key(id))
                    && queue_message_count(&dlq) == Some(expected_dead)
            }
        })
        .await;
        // Time for a wrong acknowledgement or a second effect to show.
        tokio::time::sleep(Duration::from_millis(500)).await;
        consumer.stop().await.unwrap();
        relay.stop().await.unwrap();
        let attempted = attempts
            .lock()
            .unwrap()
            .keys()
            .filter(|key| rows.contains_key(*key))
            .count();
        phases.push(Phase {
            expected_effects,
            expected_dead,
            dead_lettered: queue_message_count(&dlq).unwrap_or(0),
            attempted,
            messages: rows.len(),
            left: queue_message_count(&queue).unwrap_or(usize::MAX),
        });
    }

    let effects = effect_counts(&test.db).await;
    let report = tally(&phases, &effects);
    summary(
        "swallowed_db_error",
        &report.counted,
        0,
        &format!(
            "dead_lettered={} groups=1,16 secs={:.1}",
            report.dead_lettered,
            started.elapsed().as_secs_f64()
        ),
    );
    report.assert_clean(&phases);
    test.drop_database().await;
}

/// What all phases add up to: every message an effect or a dead letter, none with both.
struct Report {
    counted: Counted,
    dead_lettered: usize,
}

fn tally(phases: &[Phase], effects: &HashMap<String, usize>) -> Report {
    let expected: HashSet<String> = phases
        .iter()
        .flat_map(|phase| phase.expected_effects.iter().cloned())
        .collect();
    let mut counted = count(&expected, effects);
    let messages: usize = phases.iter().map(|phase| phase.messages).sum();
    let dead_lettered: usize = phases.iter().map(|phase| phase.dead_lettered).sum();
    // Every message sent; a message is lost when it has neither its effect nor a dead letter
    // (effects of the messages that must be dead-lettered would be effects of a dead
    // transaction: they count as duplicates, never as "not lost").
    counted.sent = messages;
    counted.lost += messages.saturating_sub(expected.len() + dead_lettered);
    counted.duplicate_effects += effects
        .keys()
        .filter(|key| !expected.contains(*key))
        .count();
    Report {
        counted,
        dead_lettered,
    }
}

impl Report {
    fn assert_clean(&self, phases: &[Phase]) {
        assert_eq!(self.counted.lost, 0, "messages lost");
        assert_eq!(self.counted.duplicate_effects, 0, "effects done twice");
        for phase in phases {
            assert_eq!(
                phase.dead_lettered, phase.expected_dead,
                "exactly the messages that always break are dead-lettered"
            );
            assert_eq!(phase.left, 0, "nothing left in the queue");
            assert_eq!(
                phase.attempted, phase.messages,
                "every message ran its callback (none dead-lettered without running)"
            );
        }
    }
}

/// A deadlock victim on MariaDB: for a quarter of the messages, the callback's first attempt
/// locks a row, then a row that another transaction (heavier, so InnoDB rolls back the
/// callback's) holds while it waits for the first: the callback's statement fails with 1213
/// and its whole transaction is rolled back; the callback ignores the error and returns `Ok`.
/// Alone and in groups of 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_victim_on_mariadb_is_never_acknowledged_with_nothing_committed() {
    let started = Instant::now();
    let per_phase = counts(24, 200);
    let test = TestDb::new(Backend::MariaDb).await;
    create_effects_table(&test.db).await;
    for statement in [
        "CREATE TABLE locks (id INT PRIMARY KEY, v INT NOT NULL) ENGINE=InnoDB",
        "INSERT INTO locks (id, v) VALUES (1, 0), (2, 0)",
        "CREATE TABLE ballast (id INT PRIMARY KEY, v INT NOT NULL) ENGINE=InnoDB",
    ] {
        test.db.execute_unprepared(statement).await.unwrap();
    }
    let values: Vec<String> = (0..300).map(|id| format!("({id}, 0)")).collect();
    test.db
        .execute_unprepared(&format!(
            "INSERT INTO ballast (id, v) VALUES {}",
            values.join(", ")
        ))
        .await
        .unwrap();
    let other = pool(&test.url, 2).await;
    let victims = Arc::new(Mutex::new(0usize));
    // One deadlock at a time.
    let dance = Arc::new(tokio::sync::Mutex::new(()));

    let mut phases = Vec::new();
    for (index, group) in [1u32, 4].into_iter().enumerate() {
        let (destination, queue, _wire, _cleanup) = fresh_destination("fault_deadlock_victim");
        declare_consumer_queues(&destination).await;
        let before: HashSet<String> = numbered_rows(&test.db).await.into_keys().collect();
        enqueue_many(&test.db, &destination, per_phase, index * per_phase).await;
        let rows: HashMap<String, u64> = numbered_rows(&test.db)
            .await
            .into_iter()
            .filter(|(id, _)| !before.contains(id))
            .collect();
        let relay = Producer::builder(pool(&test.url, 3).await)
            .config(config(RABBITMQ_STOMP))
            .start()
            .unwrap();
        let attempts: Attempts = Arc::default();
        let (seen, other, victims_seen, dance) = (
            attempts.clone(),
            other.clone(),
            victims.clone(),
            dance.clone(),
        );
        let consumer = Consumer::builder(pool(&test.url, 4).await)
            .config(config(RABBITMQ_STOMP))
            .destination(&destination)
            .in_flight(2)
            .group_size(group)
            .group_wait(Duration::from_millis(200))
            .start(move |payload: Payload| {
                let (seen, other, victims_seen, dance) = (
                    seen.clone(),
                    other.clone(),
                    victims_seen.clone(),
                    dance.clone(),
                );
                async move {
                    let key = payload.message_id().unwrap_or_default().to_owned();
                    let n = payload.body()["n"].as_u64().unwrap_or(0);
                    let attempt = next_attempt(&seen, &key);
                    // Message ids are UUIDs: safe to inline.
                    payload
                        .db()
                        .execute_unprepared(&format!(
                            "INSERT INTO effects (msg_id, note) VALUES ('{key}', 'ok')"
                        ))
                        .await?;
                    if n.is_multiple_of(4) && attempt == 1 {
                        let _one_at_a_time = dance.lock().await;
                        payload
                            .db()
                            .execute_unprepared("UPDATE locks SET v = v + 1 WHERE id = 1")
                            .await?;
                        let heavy = other.begin().await?;
                        heavy
                            .execute_unprepared("UPDATE ballast SET v = v + 1")
                            .await?;
                        heavy
                            .execute_unprepared("UPDATE locks SET v = v + 1 WHERE id = 2")
                            .await?;
                        let waits_for_one = tokio::spawn(async move {
                            let waited = heavy
                                .execute_unprepared("UPDATE locks SET v = v + 1 WHERE id = 1")
                                .await;
                            let _ = heavy.rollback().await;
                            waited
                        });
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        // The deadlock: ignored, as the habit goes.
                        let ignored = payload
                            .db()
                            .execute_unprepared("UPDATE locks SET v = v + 1 WHERE id = 2")
                            .await;
                        if ignored.is_err() {
                            *victims_seen.lock().unwrap() += 1;
                        }
                        let _ = waits_for_one.await;
                    }
                    payload.save();
                    Ok::<(), BoxError>(())
                }
            })
            .unwrap();

        let expected_effects: HashSet<String> = rows.keys().cloned().collect();
        let db = test.db.clone();
        let wanted = expected_effects.clone();
        settled_within(Duration::from_secs(60), || {
            let db = db.clone();
            let wanted = wanted.clone();
            async move {
                let effects = effect_counts(&db).await;
                wanted.iter().all(|id| effects.contains_key(id))
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        consumer.stop().await.unwrap();
        relay.stop().await.unwrap();
        let attempted = attempts
            .lock()
            .unwrap()
            .keys()
            .filter(|key| rows.contains_key(*key))
            .count();
        phases.push(Phase {
            expected_effects,
            expected_dead: 0,
            dead_lettered: queue_message_count(&format!("DLQ.{queue}")).unwrap_or(0),
            attempted,
            messages: rows.len(),
            left: queue_message_count(&queue).unwrap_or(usize::MAX),
        });
    }

    let effects = effect_counts(&test.db).await;
    let report = tally(&phases, &effects);
    let victims = *victims.lock().unwrap();
    summary(
        "swallowed_db_error_mariadb",
        &report.counted,
        0,
        &format!(
            "deadlock_victims={victims} groups=1,4 secs={:.1}",
            started.elapsed().as_secs_f64()
        ),
    );
    report.assert_clean(&phases);
    assert!(
        victims > 0,
        "no callback was picked as a deadlock victim: the scenario proved nothing"
    );
    test.drop_database().await;
}
