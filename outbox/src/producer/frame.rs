//! The frame of a row: what the relay sends for an outbox row.

use crate::headers;
use crate::tables::published::Model as Row;
use crate::transport::Outgoing;

/// The frame of a row: its stored headers, plus `persistent` and `content-type`, and the
/// generated `dop-*` headers a row written without them (by SQL, a trigger, another tool) lacks:
/// `dop-msg-id` is the row's id, so that consumers deduplicate it across resends and
/// redeliveries; the correlation id defaults to it too.
pub(super) fn outgoing(row: &Row) -> Outgoing {
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(stored) = row.headers.as_object() {
        for (name, value) in stored {
            // Frame-level headers are the transport's to set.
            if matches!(
                name.as_str(),
                "destination" | "content-length" | "receipt" | "transaction"
            ) {
                continue;
            }
            let value = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            headers.push((name.clone(), value));
        }
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

    #[test]
    fn a_row_goes_out_with_its_headers_persistent_and_json() {
        let row = Row {
            id: Uuid::new_v4(),
            version: None,
            destination: "/topic/x".into(),
            body: serde_json::json!({"a": 1}),
            headers: serde_json::json!({"dop-msg-id": "m", "destination": "/evil", "x": "a:b"}),
            added: chrono::Utc::now(),
            expires_at: chrono::Utc::now(),
            retry: 0,
            status: crate::tables::published::Status::Schedule,
            claim_token: None,
            locked_until: None,
            next_attempt_at: None,
            last_error: None,
            msg_key: None,
            seq: None,
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
            id: Uuid::new_v4(),
            version: None,
            destination: "/topic/x".into(),
            body: serde_json::json!({}),
            headers: serde_json::json!({"x": "kept", "dop-msg-id": ""}),
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
}
