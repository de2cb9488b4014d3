//! Fault scenarios of the consumer: callbacks that hang, and a consumer killed in the middle of
//! its group commits. A known set of messages relayed, the fault, and the count at the business
//! table: every message's effect exactly once. Prints
//!
//! `fault.hung_callback sent=N effects=N lost=0 duplicate_effects=0 wire_duplicates=K ...`
//! `fault.consumer_killed_mid_group sent=N effects=N lost=0 duplicate_effects=0 ...`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::{Consumer, Payload, Producer};
use outbox_tests::binaries::child_vars;
use outbox_tests::faults::*;
use outbox_tests::stomp_peer::{RABBITMQ_STOMP, queue_message_count};

/// How many of its first attempts hang, for the message with this key: one in eight hangs once,
/// one in twenty-five twice (the consumer retries three times: all of them get through).
fn hung_attempts(key: &str) -> usize {
    let digest = key
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    if digest % 25 == 0 {
        2
    } else if digest % 8 == 0 {
        1
    } else {
        0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_callbacks_are_abandoned_at_the_deadline_and_nothing_is_lost_or_doubled() {
    let started = Instant::now();
    let n = counts(200, 2000);
    let (test, (destination, queue, wire_queue, _cleanup)) =
        fault_start("fault_hung_callback", TransportKind::Stomp).await;
    let mut wire = WireCounter::start(&destination, &wire_queue).await;
    enqueue_many(&test.db, &destination, n, 0).await;
    let relay = Producer::builder(pool(&test.url, 3).await)
        .config(config(RABBITMQ_STOMP))
        .start()
        .unwrap();

    let attempts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let mut settings = config(RABBITMQ_STOMP);
    settings.consumer_callback_timeout = Duration::from_millis(300);
    settings.consumer_max_retry_attempts = 3;
    settings.consumer_retry_wait = Duration::from_millis(50);
    let consumer = Consumer::builder(pool(&test.url, 6).await)
        .config(settings)
        .destination(&destination)
        .in_flight(4)
        .start({
            let attempts = attempts.clone();
            move |payload: Payload| {
                let attempts = attempts.clone();
                async move {
                    let key = payload.message_id().unwrap_or_default().to_owned();
                    let attempt = {
                        let mut attempts = attempts.lock().unwrap();
                        let seen = attempts.entry(key.clone()).or_default();
                        *seen += 1;
                        *seen
                    };
                    insert_effect(payload.db(), &key, "ok").await?;
                    if attempt <= hung_attempts(&key) {
                        // A remote call that never answers: its effect must be rolled back.
                        std::future::pending::<()>().await;
                    }
                    payload.save();
                    Ok::<_, BoxError>(())
                }
            }
        })
        .unwrap();

    wait_until_all_sent(&test.db, n, Duration::from_secs(60)).await;
    wait_until_consumed(&test.db, &queue, n, Duration::from_secs(120)).await;
    relay.stop().await.unwrap();
    consumer.stop().await.unwrap();

    let expected = outbox_ids(&test.db).await;
    let hung: usize = expected.iter().map(|key| hung_attempts(key)).sum();
    let counted = count(&expected, &effect_counts(&test.db).await);
    let wire_duplicates = wire.duplicates(&expected).await;
    let dead_lettered = queue_message_count(&format!("DLQ.{queue}"));
    summary(
        "hung_callback",
        &counted,
        wire_duplicates,
        &format!(
            "hung_attempts={hung} dead_lettered={} secs={:.1}",
            dead_lettered.unwrap_or(0),
            started.elapsed().as_secs_f64()
        ),
    );
    assert_exactly_once(&counted, n);
    assert!(hung > 0, "no callback hung");
    let calls: usize = attempts.lock().unwrap().values().sum();
    assert_eq!(calls, n + hung, "one more call per hung attempt, no other");
    assert_eq!(dead_lettered, Some(0), "nothing dead-lettered");
    test.drop_database().await;
}

const GROUP_CHILD_DB: &str = "OUTBOX_TEST_FAULT_GROUP_CHILD_DATABASE_URL";
const GROUP_CHILD_DESTINATION: &str = "OUTBOX_TEST_FAULT_GROUP_CHILD_DESTINATION";

/// The child process of `consumer_killed_mid_group_...`: this test binary run again with this
/// test alone. It consumes in groups of 16 until killed; without its variables it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the consumer child process of consumer_killed_mid_group_...; runs only as a child"]
async fn fault_child_group_consumer() {
    let Some((url, destination)) = child_vars(GROUP_CHILD_DB, GROUP_CHILD_DESTINATION) else {
        return;
    };
    let consumer = Consumer::builder(pool(&url, 4).await)
        .config(config(RABBITMQ_STOMP))
        .destination(destination)
        .in_flight(2)
        .group_size(16)
        .group_wait(Duration::from_millis(20))
        .build()
        .expect("child: consumer");
    // A group takes tens of milliseconds: most kills land inside one.
    consume_until_killed(consumer, Duration::from_millis(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_mid_group_loses_nothing_and_duplicates_no_effect() {
    let started = Instant::now();
    let n = counts(600, 5000);
    let kills = counts(6, 20);
    let (test, (destination, queue, wire_queue, _cleanup)) =
        fault_start("fault_group_kill", TransportKind::Stomp).await;
    let mut wire = WireCounter::start(&destination, &wire_queue).await;
    enqueue_many(&test.db, &destination, n, 0).await;
    relay_everything(&test.db, config(RABBITMQ_STOMP), n).await;

    let spawn = || {
        spawn_child_test(
            "faults_consumer::fault_child_group_consumer",
            &[
                (GROUP_CHILD_DB, &test.url),
                (GROUP_CHILD_DESTINATION, &destination),
            ],
        )
    };
    let mid_run_kills = kill_consumer_children(&test.db, n, kills, 40, spawn).await;
    let mut last = spawn();
    wait_until_consumed(&test.db, &queue, n, Duration::from_secs(90)).await;
    kill(&mut last).await;

    let expected = outbox_ids(&test.db).await;
    let counted = count(&expected, &effect_counts(&test.db).await);
    let wire_duplicates = wire.duplicates(&expected).await;
    let dead_lettered = queue_message_count(&format!("DLQ.{queue}"));
    summary(
        "consumer_killed_mid_group",
        &counted,
        wire_duplicates,
        &format!(
            "kills={kills} mid_run_kills={mid_run_kills} group_size=16 secs={:.1}",
            started.elapsed().as_secs_f64()
        ),
    );
    assert_exactly_once(&counted, n);
    assert_eq!(dead_lettered, Some(0), "nothing dead-lettered");
    assert!(mid_run_kills > 0, "no kill landed during processing");
    test.drop_database().await;
}
