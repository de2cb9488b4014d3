//! A test binary of its own: it sets the process-wide write settings.
//!
//! Settings built in code reach the write path through `WriteSettings`, the one place they are
//! set: the lifetime of the rows a service writes (`expires_at`) comes from the
//! `days_to_keep_data` it installed, not only from `OUTBOX_DAYS_TO_KEEP_DATA`; building a
//! `Producer` or a `Consumer` does not change it (it did before 0.2.0). The setting is
//! process-wide: this file is its own test binary, with one test, so that no other test installs
//! settings meanwhile.

use outbox::transport::MemoryTransport;
use outbox::write::WriteSettings;
use outbox::{Consumer, OutboxConfig, Producer};
use outbox_tests::{Backend, TestDb};
use sea_orm::TransactionTrait;
use serde_json::json;

/// The defaults with `days_to_keep_data` set, as a service sets it in code.
fn keeping(days: u32) -> OutboxConfig {
    let mut settings = OutboxConfig::default();
    settings.days_to_keep_data = days;
    settings
}

async fn lifetime_of_a_new_row(test: &TestDb) -> chrono::Duration {
    let txn = test.db.begin().await.unwrap();
    let row = outbox::enqueue(&txn, "/topic/lifetime", &json!({"n": 1}))
        .await
        .unwrap();
    txn.commit().await.unwrap();
    row.expires_at - row.added
}

#[tokio::test]
async fn rows_written_live_as_long_as_the_settings_built_in_code_say() {
    let test = TestDb::new(Backend::Postgres).await;
    assert_eq!(
        lifetime_of_a_new_row(&test).await,
        chrono::Duration::days(30),
        "the default, with no OUTBOX_DAYS_TO_KEEP_DATA and nothing installed"
    );

    Producer::builder(test.db.clone())
        .config(keeping(3))
        .transport(MemoryTransport::new())
        .build()
        .unwrap();
    assert_eq!(
        lifetime_of_a_new_row(&test).await,
        chrono::Duration::days(30),
        "building a producer leaves what writers write alone"
    );

    Consumer::builder(test.db.clone())
        .config(keeping(5))
        .destination("/topic/lifetime")
        .transport(MemoryTransport::new())
        .build()
        .unwrap();
    assert_eq!(
        lifetime_of_a_new_row(&test).await,
        chrono::Duration::days(30),
        "building a consumer leaves what writers write alone"
    );

    WriteSettings::from_config(&keeping(3)).install().unwrap();
    assert_eq!(
        lifetime_of_a_new_row(&test).await,
        chrono::Duration::days(3)
    );
    WriteSettings::new()
        .days_to_keep_data(36_500)
        .install()
        .unwrap();
    assert_eq!(
        lifetime_of_a_new_row(&test).await,
        chrono::Duration::days(36_500)
    );

    // Refused settings change nothing.
    let refused = keeping(0);
    let err = WriteSettings::from_config(&refused)
        .install()
        .unwrap_err()
        .to_string();
    assert!(err.contains("OUTBOX_DAYS_TO_KEEP_DATA"), "{err}");
    let err = Producer::builder(test.db.clone())
        .config(refused)
        .transport(MemoryTransport::new())
        .build()
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("between 1 and 36500"), "{err}");
    assert_eq!(
        lifetime_of_a_new_row(&test).await,
        chrono::Duration::days(36_500)
    );
    test.drop_database().await;
}
