//! The header hook adds headers to every row; a process-wide setting, so it has a test binary of
//! its own.

use outbox::write::WriteSettings;
use outbox_tests::{Backend, TestDb};
use serde_json::json;

#[tokio::test]
async fn the_header_hook_adds_headers_below_custom_and_generated_ones_and_no_reserved_one() {
    WriteSettings::new()
        .header_hook(|row| {
            vec![
                (
                    "x-origin".into(),
                    format!("{} -> {}", row.entity, row.destination),
                ),
                ("x-tenant".into(), "from-hook".into()),
                ("dop-msg-id".into(), "hook-cannot-override".into()),
                // A constant key would make consumers take every message for the first one.
                ("cap-msg-id".into(), "billing".into()),
                ("message-id".into(), "not-on-a-send".into()),
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
    assert!(row.headers.get("cap-msg-id").is_none(), "{}", row.headers);
    assert!(row.headers.get("message-id").is_none(), "{}", row.headers);
    let keyed = outbox::Message::new("/topic/hooked", &json!({"n": 2}))
        .unwrap()
        .idempotency_key("invoice-7")
        .enqueue(&test.db)
        .await
        .unwrap();
    assert_eq!(keyed.headers["cap-msg-id"], "invoice-7");
    test.drop_database().await;
}
