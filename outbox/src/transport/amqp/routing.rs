//! What RabbitMQ's STOMP plugin does with a destination and with the headers of a frame, done
//! over AMQP 0-9-1: the exchange and routing key of a destination, the queue a SEND declares,
//! the properties and headers table a SEND's headers become, the `queue.declare` a SUBSCRIBE's
//! headers make, and the STOMP headers a delivery shows.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// A parsed STOMP destination, as the plugin's routing parser reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `/topic/key`: `amq.topic`, routing key `key`.
    Topic(String),
    /// `/exchange/name[/key]`.
    Exchange(String, Option<String>),
    /// `/queue/name`, or a bare name: a queue the plugin declares (durable).
    Queue(String),
    /// `/amq/queue/name`: an existing queue, not declared.
    AmqQueue(String),
    /// `/reply-queue/name`: an existing queue (the name may hold `/`).
    ReplyQueue(String),
}

impl Endpoint {
    /// Parses `destination` as the plugin does, refusing what it refuses.
    pub(crate) fn parse(destination: &str) -> Result<Endpoint, String> {
        let invalid = || format!("invalid destination `{destination}`");
        let parts: Vec<&str> = destination.split('/').collect();
        match parts.as_slice() {
            [name] if !name.is_empty() => Ok(Endpoint::Queue(unescape(name))),
            ["", "reply-queue", rest @ ..] if !rest.is_empty() => {
                let name = &destination["/reply-queue/".len()..];
                if name.is_empty() {
                    Err(invalid())
                } else {
                    Ok(Endpoint::ReplyQueue(name.to_owned()))
                }
            }
            ["", "exchange", rest @ ..] => match rest {
                [name] if !name.is_empty() => Ok(Endpoint::Exchange(unescape(name), None)),
                [name, key] if !name.is_empty() => {
                    Ok(Endpoint::Exchange(unescape(name), Some(unescape(key))))
                }
                _ => Err(invalid()),
            },
            ["", "topic", name] if !name.is_empty() => Ok(Endpoint::Topic(unescape(name))),
            ["", "queue", name] if !name.is_empty() => Ok(Endpoint::Queue(unescape(name))),
            ["", "amq", "queue", name] if !name.is_empty() => {
                Ok(Endpoint::AmqQueue(unescape(name)))
            }
            ["", "topic" | "queue" | "temp-queue", ..] | ["", "amq", "queue", ..] => Err(invalid()),
            _ => Err(format!("unknown destination `{destination}`")),
        }
    }

    /// The exchange and routing key a message to this endpoint is published with.
    pub(crate) fn routing(&self) -> (&str, &str) {
        match self {
            Endpoint::Topic(key) => ("amq.topic", key),
            Endpoint::Exchange(name, key) => (name, key.as_deref().unwrap_or("")),
            Endpoint::Queue(name) | Endpoint::AmqQueue(name) | Endpoint::ReplyQueue(name) => {
                ("", name)
            }
        }
    }
}

/// `%2F` back to `/`, as the plugin unescapes destination segments.
fn unescape(segment: &str) -> String {
    segment.replace("%2F", "/")
}

/// A routing key or exchange name as the plugin writes it into a delivery's `destination`.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'/' => out.push_str("%2F"),
            b'%' => out.push_str("%25"),
            32..=127 => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// The `destination` header of a delivery from `exchange` with `routing_key`, as the plugin
/// formats it.
pub(crate) fn format_destination(exchange: &str, routing_key: &str) -> String {
    match (exchange, routing_key) {
        ("", key) => format!("/queue/{}", escape(key)),
        ("amq.topic", key) => format!("/topic/{}", escape(key)),
        (name, "") => format!("/exchange/{}", escape(name)),
        (name, key) => format!("/exchange/{}/{}", escape(name), escape(key)),
    }
}

/// The SEND headers the plugin turns into AMQP properties (and so leaves out of the table).
const PROPERTY_HEADERS: [&str; 12] = [
    "content-type",
    "content-encoding",
    "persistent",
    "priority",
    "correlation-id",
    "reply-to",
    "expiration",
    "amqp-message-id",
    "timestamp",
    "type",
    "user-id",
    "app-id",
];

/// The frame headers that are the STOMP protocol's, not the message's: the relay never puts
/// them in a row's headers, and they are not forwarded.
const FRAME_HEADERS: [&str; 4] = ["destination", "content-length", "receipt", "transaction"];

/// The properties of a message whose SEND headers are `headers`, mapped as the plugin maps
/// them, always persistent (delivery mode 2). The headers the plugin keeps as such go into the
/// headers table, as long strings. Refused: a property value that AMQP cannot carry (over 255
/// bytes, or a `priority` or `timestamp` that is not a number).
pub(crate) fn properties(headers: &[(String, String)]) -> Result<BasicProperties, String> {
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    let mut table = FieldTable::default();
    let mut seen = std::collections::HashSet::new();
    for (name, value) in headers {
        // STOMP 1.2: the first of repeated headers wins.
        if !seen.insert(name.as_str()) || FRAME_HEADERS.contains(&name.as_str()) {
            continue;
        }
        let short = || -> Result<ShortString, String> {
            if value.len() > 255 {
                Err(format!(
                    "header `{name}` is {} bytes long; AMQP carries at most 255 in that property",
                    value.len()
                ))
            } else {
                Ok(ShortString::from(value.as_str()))
            }
        };
        let number = || -> Result<u64, String> {
            value
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("header `{name}` is `{value}`, not a whole number"))
        };
        properties = match name.as_str() {
            "content-type" => properties.with_content_type(short()?),
            "content-encoding" => properties.with_content_encoding(short()?),
            // Every message is persistent; the header only confirms it.
            "persistent" => properties,
            "priority" => {
                let priority = u8::try_from(number()?)
                    .map_err(|_| format!("header `priority` is `{value}`, above 255"))?;
                properties.with_priority(priority)
            }
            "correlation-id" => properties.with_correlation_id(short()?),
            "reply-to" => properties.with_reply_to(short()?),
            "expiration" => properties.with_expiration(short()?),
            "amqp-message-id" => properties.with_message_id(short()?),
            "timestamp" => properties.with_timestamp(number()?),
            "type" => properties.with_type(short()?),
            "user-id" => properties.with_user_id(short()?),
            "app-id" => properties.with_app_id(short()?),
            _ => {
                if name.len() > 255 {
                    return Err(format!("a header name is {} bytes long", name.len()));
                }
                table.insert(
                    ShortString::from(name.as_str()),
                    AMQPValue::LongString(LongString::from(value.as_bytes())),
                );
                properties
            }
        };
    }
    debug_assert!(PROPERTY_HEADERS.len() == 12);
    Ok(properties.with_headers(table))
}

/// The STOMP headers a subscriber of the plugin sees for a message with these properties
/// (besides the per-delivery ones), as the plugin derives them.
pub(crate) fn delivery_headers(properties: &BasicProperties) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    let mut push = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            headers.push((name.to_owned(), value));
        }
    };
    let text = |value: &Option<ShortString>| value.as_ref().map(|v| v.as_str().to_owned());
    push("content-type", text(properties.content_type()));
    push("content-encoding", text(properties.content_encoding()));
    push(
        "persistent",
        (*properties.delivery_mode() == Some(2)).then(|| "true".to_owned()),
    );
    push("priority", properties.priority().map(|p| p.to_string()));
    push("correlation-id", text(properties.correlation_id()));
    push(
        "reply-to",
        text(properties.reply_to()).map(|reply_to| {
            let prefixed = [
                "/exchange/",
                "/topic/",
                "/queue/",
                "/amq/queue/",
                "/reply-queue/",
            ]
            .iter()
            .any(|prefix| reply_to.starts_with(prefix));
            if prefixed {
                reply_to
            } else {
                format!("/reply-queue/{reply_to}")
            }
        }),
    );
    push("expiration", text(properties.expiration()));
    push("amqp-message-id", text(properties.message_id()));
    push("timestamp", properties.timestamp().map(|t| t.to_string()));
    push("type", text(properties.kind()));
    push("user-id", text(properties.user_id()));
    push("app-id", text(properties.app_id()));
    if let Some(table) = properties.headers() {
        for (name, value) in table.inner() {
            let value = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                AMQPValue::LongInt(n) => n.to_string(),
                AMQPValue::LongLongInt(n) => n.to_string(),
                AMQPValue::ShortInt(n) => n.to_string(),
                AMQPValue::LongUInt(n) => n.to_string(),
                _ => continue,
            };
            headers.push((name.as_str().to_owned(), value));
        }
    }
    headers
}

/// A `queue.declare` as the plugin makes it from a frame's headers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct QueueDeclare {
    /// The queue's name.
    pub(crate) queue: String,
    /// `durable`.
    pub(crate) durable: bool,
    /// `auto-delete`.
    pub(crate) auto_delete: bool,
    /// `exclusive`.
    pub(crate) exclusive: bool,
    /// The `x-*` arguments the plugin reads from headers, typed as it types them.
    pub(crate) arguments: FieldTable,
}

/// The headers the plugin turns into queue arguments, and whether each is a number (`long`)
/// or a string.
const ARGUMENT_HEADERS: [(&str, bool); 10] = [
    ("x-dead-letter-exchange", false),
    ("x-dead-letter-routing-key", false),
    ("x-expires", true),
    ("x-max-length", true),
    ("x-max-length-bytes", true),
    ("x-max-priority", true),
    ("x-message-ttl", true),
    ("x-max-age", false),
    ("x-stream-max-segment-size-bytes", true),
    ("x-queue-type", false),
];

/// The STOMP plugin's boolean: only `true`/`True` and `false`/`False` count.
fn boolean(value: &str) -> Option<bool> {
    match value {
        "true" | "True" => Some(true),
        "false" | "False" => Some(false),
        _ => None,
    }
}

/// The first header named `name`.
fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// Whether a queue of this kind is durable by default (a queue destination), or a subscription
/// queue of a topic or an exchange (not durable unless said).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueKind {
    /// `/queue/q` or a bare name.
    Named,
    /// The queue a SUBSCRIBE to `/topic/...` declares.
    Topic,
    /// The queue a SUBSCRIBE to `/exchange/...` declares.
    Exchange,
}

/// The `queue.declare` of queue `queue` that the plugin makes from `headers`.
pub(crate) fn queue_declare(
    queue: &str,
    kind: QueueKind,
    headers: &[(String, String)],
) -> Result<QueueDeclare, String> {
    let param = |name: &str| header(headers, name).and_then(boolean);
    // `persistent` and `durable` both set durability; the later in the plugin's fold wins, and
    // the relay's headers never hold both.
    let mut durable = param("durable").or_else(|| param("persistent"));
    let (mut exclusive, mut auto_delete) = match kind {
        QueueKind::Named => {
            durable.get_or_insert(true);
            (None, None)
        }
        QueueKind::Exchange => (Some(true), Some(true)),
        QueueKind::Topic => (Some(false), Some(true)),
    };
    if let Some(value) = param("exclusive") {
        exclusive = Some(value);
    }
    if let Some(value) = param("auto-delete") {
        auto_delete = Some(value);
    }
    let durable = durable.unwrap_or(false);
    let (default_exclusive, default_auto_delete) = if durable {
        (false, false)
    } else {
        (true, true)
    };
    let mut arguments = FieldTable::default();
    for (name, numeric) in ARGUMENT_HEADERS {
        let Some(value) = header(headers, name) else {
            continue;
        };
        let value = value.trim();
        let typed = if numeric {
            AMQPValue::LongLongInt(
                value
                    .parse()
                    .map_err(|_| format!("header `{name}` is `{value}`, not a whole number"))?,
            )
        } else {
            AMQPValue::LongString(LongString::from(value.as_bytes()))
        };
        arguments.insert(ShortString::from(name), typed);
    }
    Ok(QueueDeclare {
        queue: queue.to_owned(),
        durable,
        auto_delete: auto_delete.unwrap_or(default_auto_delete),
        exclusive: exclusive.unwrap_or(default_exclusive),
        arguments,
    })
}

/// The `queue.declare` of a consumer's queue: the plugin's, plus RabbitMQ's single active
/// consumer when the headers ask for it (`x-single-active-consumer: true`), typed as the boolean
/// an AMQP client declares. The STOMP plugin drops that header; the relay's declarations never
/// take it.
pub(crate) fn consumer_queue_declare(
    queue: &str,
    kind: QueueKind,
    headers: &[(String, String)],
) -> Result<QueueDeclare, String> {
    let mut declare = queue_declare(queue, kind, headers)?;
    let name = crate::transport::SINGLE_ACTIVE_CONSUMER;
    if let Some(value) = header(headers, name) {
        let on = boolean(value.trim())
            .ok_or_else(|| format!("header `{name}` is `{value}`, not `true` or `false`"))?;
        if on {
            declare
                .arguments
                .insert(ShortString::from(name), AMQPValue::Boolean(true));
        }
    }
    Ok(declare)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn destinations_route_as_the_stomp_plugin_routes_them() {
        let route = |d: &str| {
            Endpoint::parse(d).map(|e| {
                let (x, k) = e.routing();
                (x.to_owned(), k.to_owned())
            })
        };
        let pair = |x: &str, k: &str| Ok((x.to_owned(), k.to_owned()));
        assert_eq!(route("/topic/orders.v1"), pair("amq.topic", "orders.v1"));
        assert_eq!(route("/exchange/events/a.b"), pair("events", "a.b"));
        assert_eq!(route("/exchange/events"), pair("events", ""));
        assert_eq!(route("/queue/q"), pair("", "q"));
        assert_eq!(route("/amq/queue/q"), pair("", "q"));
        assert_eq!(route("/reply-queue/a/b"), pair("", "a/b"));
        assert_eq!(route("DLQ.orders"), pair("", "DLQ.orders"));
        assert_eq!(route("/topic/a%2Fb"), pair("amq.topic", "a/b"));
        for refused in [
            "/topic/a/b",
            "/topic/",
            "/queue/",
            "/exchange//k",
            "/exchange/e/k/x",
            "/nowhere/x",
            "",
        ] {
            assert!(route(refused).is_err(), "{refused} should be refused");
        }
        assert_eq!(
            Endpoint::parse("/queue/q").unwrap(),
            Endpoint::Queue("q".into())
        );
    }

    #[test]
    fn delivery_destinations_are_formatted_as_the_plugin_formats_them() {
        assert_eq!(format_destination("", "q"), "/queue/q");
        assert_eq!(format_destination("amq.topic", "a/b"), "/topic/a%2Fb");
        assert_eq!(format_destination("e", ""), "/exchange/e");
        assert_eq!(format_destination("e", "k"), "/exchange/e/k");
    }

    #[test]
    fn send_headers_become_properties_and_a_table_as_the_plugin_makes_them() {
        let props = properties(&owned(&[
            ("content-type", "application/json"),
            ("priority", "5"),
            ("timestamp", "1700000000"),
            ("amqp-message-id", "m-1"),
            ("type", "order"),
            ("dop-msg-id", "abc"),
            ("message-id", "kept-as-header"),
            ("dop-msg-id", "second is ignored"),
            ("content-length", "12"),
        ]))
        .unwrap();
        assert_eq!(*props.delivery_mode(), Some(2));
        assert_eq!(props.priority(), &Some(5));
        assert_eq!(props.timestamp(), &Some(1_700_000_000));
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "m-1");
        let table = props.headers().as_ref().unwrap().inner();
        assert_eq!(table.len(), 2);
        let mut seen = delivery_headers(&props);
        seen.sort();
        let mut expected = owned(&[
            ("content-type", "application/json"),
            ("persistent", "true"),
            ("priority", "5"),
            ("amqp-message-id", "m-1"),
            ("timestamp", "1700000000"),
            ("type", "order"),
            ("dop-msg-id", "abc"),
            ("message-id", "kept-as-header"),
        ]);
        expected.sort();
        assert_eq!(seen, expected);
        assert!(properties(&owned(&[("priority", "high")])).is_err());
        assert!(properties(&owned(&[("type", &"x".repeat(256))])).is_err());
    }

    #[test]
    fn subscription_headers_declare_queues_as_the_plugin_declares_them() {
        let headers = owned(&[
            ("durable", "true"),
            ("auto-delete", "false"),
            ("x-dead-letter-routing-key", "DLQ.q"),
            ("x-dead-letter-exchange", ""),
            ("x-message-ttl", "60000"),
            ("prefetch-count", "1"),
        ]);
        let declare = queue_declare("q", QueueKind::Topic, &headers).unwrap();
        assert!(declare.durable && !declare.auto_delete && !declare.exclusive);
        let args = declare.arguments.inner();
        assert_eq!(args.len(), 3);
        assert_eq!(
            args.get(&ShortString::from("x-message-ttl")),
            Some(&AMQPValue::LongLongInt(60000))
        );
        // A SEND to /queue/q with no headers: durable, as the plugin declares it.
        let plain = queue_declare("q", QueueKind::Named, &[]).unwrap();
        assert!(plain.durable && !plain.auto_delete && !plain.exclusive);
        // A topic subscription without durability: exclusive false, auto-delete.
        let temporary = queue_declare("q", QueueKind::Topic, &[]).unwrap();
        assert!(!temporary.durable && temporary.auto_delete && !temporary.exclusive);
        let exclusive =
            queue_declare("q", QueueKind::Topic, &owned(&[("exclusive", "True")])).unwrap();
        assert!(exclusive.exclusive);
        assert!(queue_declare("q", QueueKind::Named, &owned(&[("x-expires", "soon")])).is_err());
    }
}
