//! The `dop-*` headers that django-outbox-pattern services read, the headers no caller may copy
//! into a message (reserved), and the ambient correlation id.
//!
//! Headers are built once, when the outbox row is written, and stored in its `headers` column;
//! the relay sends them as stored, less the broker's delivery state. A custom
//! `dop-correlation-id` wins over the generated one; the other four `dop-*` headers are always
//! generated. Reserved headers ([`is_reserved`]) a caller copies into a message are dropped when
//! it is written, with a warning.

use std::future::Future;
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

/// The id of the outbox row (a UUID), the consumer's idempotency key.
pub const MSG_ID: &str = "dop-msg-id";
/// The destination the row was written for (with its version suffix).
pub const MSG_DESTINATION: &str = "dop-msg-destination";
/// The kind of message: always `Published`.
pub const MSG_TYPE: &str = "dop-msg-type";
/// When the row was written: UTC, milliseconds, `Z` suffix.
pub const MSG_SENT_TIME: &str = "dop-msg-sent-time";
/// The id that ties together the messages caused by one request or one consumed message.
pub const CORRELATION_ID: &str = "dop-correlation-id";
/// The message's ordering key ([`crate::write::Message::key`]), on keyed messages only: a consumer
/// built with [`crate::consumer::ConsumerBuilder::ordered_by_key`] processes the messages of one key one at
/// a time. Python consumers ignore it.
pub const ORDERING_KEY: &str = "x-outbox-key";
/// The consumer's idempotency key when a message carries it (before `dop-msg-id`), as CAP and
/// django-outbox-pattern read it. The write path stores it only through
/// [`crate::write::Message::idempotency_key`].
pub const CAP_MSG_ID: &str = "cap-msg-id";
/// The value of [`MSG_TYPE`].
pub const PUBLISHED_TYPE: &str = "Published";

/// The headers that make a message itself: its identity, which consumers deduplicate on, and the
/// headers the library derives from the row. A message's own, never its parent's.
///
/// - `cap-msg-id` outranks `dop-msg-id` at every consumer (ours and django-outbox-pattern's):
///   copied from an incoming message, or set to a constant, it makes consumers acknowledge
///   distinct messages as duplicates. The write path stores it only through
///   [`crate::write::Message::idempotency_key`], the explicit way to deduplicate two writes.
/// - `dop-msg-id`, `dop-msg-destination`, `dop-msg-type`, `dop-msg-sent-time`: generated for
///   every row (they always won over custom headers).
/// - `x-outbox-key`: the row's ordering key ([`crate::write::Message::key`]), sent from its
///   column.
///
/// `dop-correlation-id` is not reserved: carrying it from a consumed message on is what it is
/// for.
pub const IDENTITY_HEADERS: [&str; 6] = [
    CAP_MSG_ID,
    MSG_ID,
    MSG_DESTINATION,
    MSG_TYPE,
    MSG_SENT_TIME,
    ORDERING_KEY,
];

/// The headers of one delivery or one frame, not of the message: what RabbitMQ puts on a STOMP
/// MESSAGE frame or an AMQP delivery, and the STOMP frame headers the transport sets itself.
/// Sent again on a new message they mean nothing or do harm, so no message carries them.
///
/// - `destination`, `content-length`, `receipt`, `transaction`: the frame's own (a copied
///   `transaction` would hold the SEND in a transaction nobody commits).
/// - `message-id`, `subscription`, `ack`, `redelivered`: the STOMP plugin's per-delivery headers.
///   RabbitMQ refuses a SEND that carries `message-id` (an ERROR, no receipt).
/// - `persistent`: shown for persistent messages; the relay sets `persistent:true` itself.
/// - `x-death`, `x-first-death-*`, `x-last-death-*` ([`DELIVERY_HEADER_PREFIXES`]): dead-lettering.
/// - `x-delivery-count` (quorum queues), `x-received-from` (federation: a copy would look like a
///   message that already went through the federation link), `x-shovelled`,
///   `x-shovelled-timestamp` (shovels), `x-stream-offset` (streams).
///
/// Kept, because a publisher sets them on purpose and RabbitMQ hands them on unchanged:
/// `content-type`, `content-encoding`, `priority`, `expiration`, `correlation-id`, `reply-to`,
/// `amqp-message-id`, `timestamp`, `type`, `user-id` and `app-id`. A message copied from another
/// one carries the parent's choices for them (RabbitMQ refuses a `user-id` that is not the
/// relay's own user).
pub const DELIVERY_HEADERS: [&str; 15] = [
    "destination",
    "content-length",
    "receipt",
    "transaction",
    "message-id",
    "subscription",
    "ack",
    "redelivered",
    "persistent",
    "x-death",
    "x-delivery-count",
    "x-received-from",
    "x-shovelled",
    "x-shovelled-timestamp",
    "x-stream-offset",
];

/// The prefixes of the headers RabbitMQ adds when it dead-letters a message
/// (`x-first-death-reason`, `x-first-death-queue`, `x-first-death-exchange`, and the
/// `x-last-death-*` ones of RabbitMQ 3.13 and later).
pub const DELIVERY_HEADER_PREFIXES: [&str; 2] = ["x-first-death-", "x-last-death-"];

/// Whether `name` is the broker's state of one delivery or a frame header
/// ([`DELIVERY_HEADERS`], [`DELIVERY_HEADER_PREFIXES`]): never sent on a message, whoever wrote
/// its row.
pub fn is_delivery_state(name: &str) -> bool {
    DELIVERY_HEADERS.contains(&name)
        || DELIVERY_HEADER_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

/// Whether `name` is reserved: a message's identity ([`IDENTITY_HEADERS`]) or a delivery's state
/// ([`is_delivery_state`]). A reserved header copied into a message (by
/// [`crate::write::Message::header`], the header hook, or from a consumed message's headers) is
/// dropped when the row is written, with a warning; so re-publishing a consumed message with all
/// its headers gives a message of its own.
///
/// ```
/// use outbox::headers::is_reserved;
///
/// assert!(is_reserved("cap-msg-id") && is_reserved("message-id") && is_reserved("x-first-death-reason"));
/// assert!(!is_reserved("dop-correlation-id") && !is_reserved("x-tenant") && !is_reserved("priority"));
/// ```
pub fn is_reserved(name: &str) -> bool {
    IDENTITY_HEADERS.contains(&name) || is_delivery_state(name)
}

tokio::task_local! {
    static AMBIENT_CORRELATION_ID: String;
}

/// Runs `future` with `id` as the ambient correlation id: every outbox row written inside it
/// (by `#[publish]` or [`crate::write::enqueue`]) carries `dop-correlation-id: id`, unless the row sets
/// its own.
///
/// ```
/// # async fn demo() {
/// outbox::with_correlation_id("req-42", async {
///     assert_eq!(outbox::correlation_id().as_deref(), Some("req-42"));
/// })
/// .await;
/// assert_eq!(outbox::correlation_id(), None);
/// # }
/// ```
pub async fn with_correlation_id<F: Future>(id: impl Into<String>, future: F) -> F::Output {
    AMBIENT_CORRELATION_ID.scope(id.into(), future).await
}

/// The ambient correlation id, if the current task runs inside [`with_correlation_id`] (or a
/// consumer callback).
pub fn correlation_id() -> Option<String> {
    AMBIENT_CORRELATION_ID.try_with(Clone::clone).ok()
}

/// What a header hook sees of a row being written.
#[derive(Debug, Clone, Copy)]
pub struct HeaderContext<'a> {
    /// The entity whose save writes the row (the module path of its `Model`), or `enqueue`.
    pub entity: &'a str,
    /// The destination, with its version suffix.
    pub destination: &'a str,
    /// The message body.
    pub body: &'a Value,
}

/// Installs a function that adds headers to every outbox row this process writes; `false`, and
/// nothing changed, when a hook is installed already. The same as
/// [`WriteSettings::header_hook`](crate::write::WriteSettings::header_hook), the one place the
/// write path's settings are set.
#[deprecated(
    since = "0.2.0",
    note = "use outbox::write::WriteSettings::new().header_hook(..).install()"
)]
pub fn set_header_hook(
    hook: impl Fn(&HeaderContext<'_>) -> Vec<(String, String)> + Send + Sync + 'static,
) -> bool {
    set_hook_once(Box::new(hook))
}

/// A function that adds headers to every outbox row the process writes.
pub(crate) type HeaderHook = dyn Fn(&HeaderContext<'_>) -> Vec<(String, String)> + Send + Sync;

/// The header hook, once installed (through `WriteSettings`).
static HEADER_HOOK: OnceLock<Box<HeaderHook>> = OnceLock::new();

/// Installs `hook` as the header hook unless one is; whether it was installed.
pub(crate) fn set_hook_once(hook: Box<HeaderHook>) -> bool {
    HEADER_HOOK.set(hook).is_ok()
}

/// The hook's headers for a row, if a hook is installed.
pub(crate) fn hook_headers(context: &HeaderContext<'_>) -> Vec<(String, String)> {
    HEADER_HOOK
        .get()
        .map(|hook| hook(context))
        .unwrap_or_default()
}

/// Formats a time as `dop-msg-sent-time` does: `2026-11-26T18:03:13.484Z`.
pub fn format_sent_time(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Reads a `dop-msg-sent-time` value as [`format_sent_time`] writes it (and django-outbox-pattern,
/// through `DjangoJSONEncoder`): UTC with a `Z` suffix, any number of fractional digits (none
/// when Python's microseconds are 0). `None` for anything else.
pub fn parse_sent_time(value: &str) -> Option<DateTime<Utc>> {
    chrono::NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S%.fZ")
        .ok()
        .map(|naive| naive.and_utc())
}

/// The correlation id of rows written now: the ambient one, or a fresh UUID shared by the rows
/// of one write.
pub(crate) fn current_or_new_correlation_id() -> String {
    correlation_id().unwrap_or_else(|| Uuid::new_v4().to_string())
}

/// Removes the reserved headers ([`is_reserved`]) from a message's custom headers; the names
/// removed.
pub(crate) fn drop_reserved(custom: &mut Map<String, Value>) -> Vec<String> {
    let reserved: Vec<String> = custom
        .keys()
        .filter(|name| is_reserved(name))
        .cloned()
        .collect();
    for name in &reserved {
        custom.remove(name);
    }
    reserved
}

/// The headers of a new outbox row: the custom ones, then the generated `dop-*` headers over
/// them (a custom `dop-correlation-id` is kept; otherwise `correlation`).
pub(crate) fn build(
    id: Uuid,
    destination: &str,
    added: DateTime<Utc>,
    correlation: &str,
    custom: Map<String, Value>,
) -> Map<String, Value> {
    let mut headers = custom;
    let custom_correlation = headers
        .get(CORRELATION_ID)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let correlation = custom_correlation.unwrap_or_else(|| correlation.to_owned());
    headers.insert(MSG_ID.into(), Value::String(id.to_string()));
    headers.insert(
        MSG_DESTINATION.into(),
        Value::String(destination.to_owned()),
    );
    headers.insert(MSG_TYPE.into(), Value::String(PUBLISHED_TYPE.into()));
    headers.insert(MSG_SENT_TIME.into(), Value::String(format_sent_time(added)));
    headers.insert(CORRELATION_ID.into(), Value::String(correlation));
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn custom(pairs: &[(&str, &str)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect()
    }

    #[test]
    fn sent_time_has_milliseconds_and_z() {
        let t = DateTime::parse_from_rfc3339("2026-11-26T18:03:13.484512+00:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(format_sent_time(t), "2026-11-26T18:03:13.484Z");
    }

    #[test]
    fn sent_time_reads_back_what_is_written_and_nothing_else() {
        let t = DateTime::parse_from_rfc3339("2026-11-26T18:03:13.484+00:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(parse_sent_time(&format_sent_time(t)), Some(t));
        let whole = DateTime::parse_from_rfc3339("2026-11-26T18:03:13+00:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(parse_sent_time("2026-11-26T18:03:13Z"), Some(whole));
        for bad in [
            "",
            "yesterday",
            "2026-11-26T18:03:13.484",
            "2026-11-26T18:03:13.484+01:00",
            "2026-11-26 18:03:13.484Z",
            "2026-13-26T18:03:13.484Z",
        ] {
            assert_eq!(parse_sent_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn generated_headers_win_except_correlation_id() {
        let id = Uuid::new_v4();
        let h = build(
            id,
            "/topic/x.v1",
            Utc::now(),
            "generated",
            custom(&[
                ("x-custom", "a:b"),
                ("dop-msg-id", "try-override"),
                ("dop-correlation-id", "mine"),
            ]),
        );
        assert_eq!(h["dop-msg-id"], id.to_string());
        assert_eq!(h["dop-msg-destination"], "/topic/x.v1");
        assert_eq!(h["dop-msg-type"], "Published");
        assert_eq!(h["dop-correlation-id"], "mine");
        assert_eq!(h["x-custom"], "a:b");
    }

    /// The headers of a MESSAGE frame as RabbitMQ's STOMP plugin delivers a relayed row (WIRE.md
    /// §3), plus those of a dead-lettered, quorum, federated and shovelled delivery.
    const DELIVERED: [&str; 21] = [
        "subscription",
        "destination",
        "message-id",
        "redelivered",
        "ack",
        "content-length",
        "persistent",
        "receipt",
        "transaction",
        "dop-msg-id",
        "dop-msg-destination",
        "dop-msg-type",
        "dop-msg-sent-time",
        "cap-msg-id",
        "x-outbox-key",
        "x-first-death-reason",
        "x-first-death-queue",
        "x-last-death-exchange",
        "x-delivery-count",
        "x-received-from",
        "x-shovelled-timestamp",
    ];

    /// What a publisher sets on purpose, and custom headers.
    const PUBLISHED: [&str; 15] = [
        "dop-correlation-id",
        "x-custom",
        "x-tenant",
        "traceparent",
        "content-type",
        "content-encoding",
        "priority",
        "expiration",
        "correlation-id",
        "reply-to",
        "amqp-message-id",
        "timestamp",
        "type",
        "app-id",
        "x-deathly-custom",
    ];

    #[test]
    fn identity_and_delivery_state_are_reserved_and_what_a_publisher_sets_is_not() {
        for name in DELIVERED {
            assert!(is_reserved(name), "{name} is reserved");
        }
        for name in PUBLISHED {
            assert!(!is_reserved(name), "{name} is not reserved");
        }
        // A row's identity is explicit (its writer's): only delivery state leaves every frame.
        for name in IDENTITY_HEADERS {
            assert!(
                !is_delivery_state(name),
                "{name} is identity, not delivery state"
            );
        }
        assert!(is_delivery_state("message-id") && is_delivery_state("x-last-death-queue"));
    }

    #[test]
    fn dropping_the_reserved_headers_keeps_the_others_and_names_what_it_dropped() {
        let mut headers = custom(&[
            ("cap-msg-id", "inherited"),
            ("message-id", "T_s@@session-1@@1"),
            ("subscription", "s"),
            ("redelivered", "false"),
            ("dop-msg-id", "parent"),
            ("dop-correlation-id", "corr"),
            ("x-tenant", "acme"),
            ("priority", "5"),
        ]);
        let mut dropped = drop_reserved(&mut headers);
        dropped.sort();
        assert_eq!(
            dropped,
            [
                "cap-msg-id",
                "dop-msg-id",
                "message-id",
                "redelivered",
                "subscription"
            ]
        );
        let kept: Vec<&str> = headers.keys().map(String::as_str).collect();
        assert_eq!(kept.len(), 3);
        for name in ["dop-correlation-id", "x-tenant", "priority"] {
            assert!(kept.contains(&name), "{name} kept");
        }
        assert!(drop_reserved(&mut headers).is_empty());
    }

    #[tokio::test]
    async fn ambient_correlation_id_is_inherited_and_fresh_outside() {
        let inside = with_correlation_id("req-1", async { current_or_new_correlation_id() }).await;
        assert_eq!(inside, "req-1");
        let (a, b) = (
            current_or_new_correlation_id(),
            current_or_new_correlation_id(),
        );
        assert_ne!(a, b);
        assert!(Uuid::parse_str(&a).is_ok());
    }
}
