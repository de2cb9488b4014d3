//! The frame of a row: what the relay sends for an outbox row.

use crate::headers;
use crate::tables::published::Model as Row;
use crate::transport::Outgoing;

/// The frame of a row: its stored headers, less a broker's delivery state, plus `persistent`
/// and `content-type`, and the generated `dop-*` headers a row written without them (by SQL, a
/// trigger, another tool) lacks: `dop-msg-id` is the row's id, so that consumers deduplicate it
/// across resends and redeliveries; the correlation id defaults to it too.
///
/// - Delivery state ([`headers::is_delivery_state`]: `message-id`, `redelivered`, `x-death`...)
///   is dropped from every row, whoever wrote it: rows this library writes never hold it, rows
///   written by SQL or another tool may (RabbitMQ refuses a SEND carrying `message-id`).
///   `persistent` is always `true`.
/// - A stored identity header (`cap-msg-id`, a non-empty `dop-*`) is sent as stored: the write
///   path drops the ones a caller copied in and stores `cap-msg-id` only through
///   `Message::idempotency_key`, so a row's identity is what its writer chose. A row written by
///   django-outbox-pattern or by SQL sets `cap-msg-id` on purpose (that is the only way it has).
pub(super) fn outgoing(row: &Row) -> Outgoing {
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut dropped: Vec<&str> = Vec::new();
    if let Some(stored) = row.headers.as_object() {
        for (name, value) in stored {
            // The frame's own headers are the transport's to set; the others are the state
            // of some earlier delivery.
            if headers::is_delivery_state(name) {
                dropped.push(name);
                continue;
            }
            let value = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            headers.push((name.clone(), value));
        }
    }
    if !dropped.is_empty() {
        tracing::debug!(
            row = %row.id,
            headers = %dropped.join(", "),
            "a broker's delivery headers stored in the row are not sent"
        );
    }
    let id = row.id.to_string();
    let generated = [
        (headers::MSG_ID, id.clone()),
        (headers::MSG_DESTINATION, row.destination.clone()),
        (headers::MSG_TYPE, headers::PUBLISHED_TYPE.to_owned()),
        (headers::MSG_SENT_TIME, headers::format_sent_time(row.added)),
        (headers::CORRELATION_ID, id),
        ("persistent", "true".to_owned()),
        ("content-type", "application/json".to_owned()),
    ];
    // The ordering key is the column's: a stored header of that name never contradicts it.
    headers.retain(|(name, _)| name != headers::ORDERING_KEY);
    if let Some(key) = &row.msg_key {
        headers.push((headers::ORDERING_KEY.to_owned(), key.clone()));
    }
    for (name, value) in generated {
        let present = headers
            .iter()
            .any(|(n, v)| n == name && !(v.is_empty() && name.starts_with("dop-")));
        if !present {
            headers.retain(|(n, _)| n != name);
            headers.push((name.to_owned(), value));
        }
    }
    Outgoing {
        destination: row.destination.clone(),
        headers,
        body: serde_json::to_vec(&row.body).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    /// A row to `/topic/shipments`, written now, with `headers`.
    fn row_with(headers: serde_json::Value) -> Row {
        let added = chrono::Utc::now();
        Row {
            id: Uuid::new_v4(),
            version: None,
            destination: "/topic/shipments".into(),
            body: serde_json::json!({}),
            headers,
            added,
            expires_at: added,
            retry: 0,
            status: crate::tables::published::Status::Schedule,
            claim_token: None,
            locked_until: None,
            next_attempt_at: None,
            last_error: None,
            msg_key: None,
            seq: None,
        }
    }

    #[test]
    fn a_row_goes_out_with_its_headers_persistent_and_json() {
        let row = Row {
            destination: "/topic/x".into(),
            body: serde_json::json!({"a": 1}),
            ..row_with(serde_json::json!({"dop-msg-id": "m", "destination": "/evil", "x": "a:b"}))
        };
        let out = outgoing(&row);
        assert_eq!(out.destination, "/topic/x");
        assert_eq!(out.body, br#"{"a":1}"#);
        assert!(out.headers.contains(&("dop-msg-id".into(), "m".into())));
        assert!(out.headers.contains(&("x".into(), "a:b".into())));
        assert!(out.headers.contains(&("persistent".into(), "true".into())));
        assert!(
            out.headers
                .contains(&("content-type".into(), "application/json".into()))
        );
        assert!(!out.headers.iter().any(|(n, _)| n == "destination"));
    }

    #[test]
    fn a_row_written_without_generated_headers_goes_out_with_them() {
        let added = chrono::DateTime::parse_from_rfc3339("2026-11-26T18:03:13.484512+00:00")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let row = Row {
            destination: "/topic/x".into(),
            added,
            ..row_with(serde_json::json!({"x": "kept", "dop-msg-id": ""}))
        };
        let out = outgoing(&row);
        let id = row.id.to_string();
        assert_eq!(out.header("dop-msg-id"), Some(id.as_str()));
        assert_eq!(out.header("dop-correlation-id"), Some(id.as_str()));
        assert_eq!(out.header("dop-msg-destination"), Some("/topic/x"));
        assert_eq!(out.header("dop-msg-type"), Some("Published"));
        assert_eq!(
            out.header("dop-msg-sent-time"),
            Some("2026-11-26T18:03:13.484Z")
        );
        assert_eq!(out.header("x"), Some("kept"));
        assert_eq!(
            out.headers
                .iter()
                .filter(|(n, _)| n == "dop-msg-id")
                .count(),
            1
        );
    }

    #[test]
    fn a_row_s_stored_delivery_state_is_not_sent_and_its_identity_is() {
        // A row written by SQL from a consumed message's headers.
        let row = row_with(serde_json::json!({
            "subscription": "sub-1",
            "message-id": "T_sub-1@@session-1@@7",
            "ack": "T_sub-1@@session-1@@7",
            "redelivered": "true",
            "persistent": "false",
            "transaction": "tx-1",
            "x-death": "[]",
            "x-first-death-reason": "rejected",
            "x-last-death-queue": "orders",
            "x-delivery-count": "3",
            "x-received-from": "upstream",
            "cap-msg-id": "order-7",
            "dop-correlation-id": "request-42",
            "priority": "5",
            "expiration": "60000",
            "x-tenant": "acme",
        }));
        let out = outgoing(&row);
        for name in [
            "subscription",
            "message-id",
            "ack",
            "redelivered",
            "transaction",
            "x-death",
            "x-first-death-reason",
            "x-last-death-queue",
            "x-delivery-count",
            "x-received-from",
        ] {
            assert_eq!(out.header(name), None, "{name} is not sent");
        }
        assert_eq!(out.header("persistent"), Some("true"), "always persistent");
        assert_eq!(
            out.headers
                .iter()
                .filter(|(n, _)| n == "persistent")
                .count(),
            1
        );
        assert_eq!(
            out.header("cap-msg-id"),
            Some("order-7"),
            "a stored key is explicit"
        );
        assert_eq!(out.header("dop-msg-id"), Some(row.id.to_string().as_str()));
        assert_eq!(out.header("dop-correlation-id"), Some("request-42"));
        for (name, value) in [
            ("priority", "5"),
            ("expiration", "60000"),
            ("x-tenant", "acme"),
        ] {
            assert_eq!(out.header(name), Some(value), "{name} is the publisher's");
        }
    }
}
