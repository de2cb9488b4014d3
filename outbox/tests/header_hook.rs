//! The header hook adds headers to every row; a process-wide setting, so it has a test binary of
//! its own.

use outbox::write::WriteSettings;
use outbox_tests::{Backend, TestDb};
use serde_json::json;

#[tokio::test]
async fn the_header_hook_adds_headers_below_custom_and_generated_ones() {
    WriteSettings::new()
        .header_hook(|row| {
            vec![
                (
                    "x-origin".into(),
                    format!("{} -> {}", row.entity, row.destination),
                ),
                ("x-tenant".into(), "from-hook".into()),
                ("dop-msg-id".into(), "hook-cannot-override".into()),
            ]
        })
        .install()
        .unwrap();
    let second = WriteSettings::new().header_hook(|_| Vec::new()).install();
    let err = second.expect_err("a second hook is refused").to_string();
    assert!(err.contains("header hook is installed already"), "{err}");
    let test = TestDb::new(Backend::Sqlite).await;
    let row = outbox::Message::new("/topic/hooked", &json!({"n": 1}))
        .unwrap()
        .header("x-tenant", "from-message")
        .enqueue(&test.db)
        .await
        .unwrap();
    assert_eq!(row.headers["x-origin"], "enqueue -> /topic/hooked");
    assert_eq!(row.headers["x-tenant"], "from-message");
    assert_eq!(row.headers["dop-msg-id"], row.id.to_string());
    test.drop_database().await;
}
