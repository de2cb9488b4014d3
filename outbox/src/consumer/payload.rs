//! What a consumer callback receives: the message ([`Payload`]) and the transaction to do its work
//! in, and how a callback says that its error is worth another try ([`Transient`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use sea_orm::DatabaseTransaction;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::Error;
use crate::headers::{CAP_MSG_ID, CORRELATION_ID, MSG_ID};
use crate::transport::Delivery;

/// The error type callbacks are reduced to: anything `?` turns into one.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A consumed message, as the consumer received it, and the transaction the callback works in.
///
/// The consumer begins the transaction, inserts the message's inbox row in it (the idempotency
/// record), then calls the callback. When the callback returns `Ok`, it commits and only then
/// acknowledges the message; on `Err` or a panic it rolls back and dead-letters the message
/// (unless the error is transient: see [`Transient`]). So everything the callback writes through
/// [`Payload::db`] happens exactly once in effect, together with the inbox row.
///
/// ```no_run
/// # async fn demo(db: sea_orm::DatabaseConnection) -> Result<(), outbox::Error> {
/// use sea_orm::ConnectionTrait;
///
/// #[derive(serde::Deserialize)]
/// struct OrderPlaced { id: i64 }
///
/// outbox::subscribe(db, "/topic/orders.v1", |payload: outbox::Payload| async move {
///     let order: OrderPlaced = payload.json()?;
///     payload
///         .db()
///         .execute_unprepared(&format!("UPDATE stock SET reserved = reserved + 1 WHERE order_id = {}", order.id))
///         .await?;
///     payload.save();
///     Ok::<_, outbox::Error>(())
/// })
/// .await
/// # }
/// ```
///
/// The payload belongs to the callback's future: it must not outlive it (moved into a spawned
/// task, say), or the transaction cannot be committed and the message is dead-lettered.
pub struct Payload {
    message: Arc<Incoming>,
    txn: Arc<DatabaseTransaction>,
    decision: Arc<Decision>,
}

impl Payload {
    pub(crate) fn new(
        message: Arc<Incoming>,
        txn: Arc<DatabaseTransaction>,
        decision: Arc<Decision>,
    ) -> Payload {
        Payload {
            message,
            txn,
            decision,
        }
    }

    /// The body as JSON; a body that is not JSON is a JSON string of its text (lossy UTF-8), as
    /// django-outbox-pattern keeps it.
    pub fn body(&self) -> &Value {
        &self.message.body
    }

    /// The body as a `T`; an [`Error::InvalidBody`] when it does not decode (with `?`, the
    /// message is dead-lettered).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        T::deserialize(&self.message.body).map_err(|source| Error::InvalidBody {
            queue: self.message.queue.clone(),
            message_id: self.message.key.clone(),
            source,
        })
    }

    /// Every header of the MESSAGE frame, unescaped (the first value of a repeated header): the
    /// broker's delivery state (`message-id`, `redelivered`...) and the message's identity
    /// (`cap-msg-id`, `dop-msg-id`) included. Copied into a message the callback writes, those
    /// are left out of its row ([`crate::headers::is_reserved`]): the new message has an identity
    /// of its own, and keeps the rest (`dop-correlation-id`, custom headers).
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.message.headers
    }

    /// One header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.message.headers.get(name).map(String::as_str)
    }

    /// The idempotency key: the first non-empty of `cap-msg-id`, `dop-msg-id` (the outbox row's
    /// id) and the broker's `message-id`. A message processed once under a key is not processed
    /// again under it on this queue.
    pub fn message_id(&self) -> Option<&str> {
        self.message.key.as_deref()
    }

    /// The message's `dop-correlation-id`. While the callback runs it is the ambient
    /// correlation id ([`crate::headers::correlation_id`]), so outbox rows the callback writes carry it;
    /// a message without one gets a fresh id for the callback's duration.
    pub fn correlation_id(&self) -> Option<&str> {
        self.message.correlation_id.as_deref()
    }

    /// The destination the message was sent to, as the broker reports it.
    pub fn destination(&self) -> &str {
        &self.message.destination
    }

    /// The consumer's queue.
    pub fn queue(&self) -> &str {
        &self.message.queue
    }

    /// Whether the broker delivered the message before (to this or another consumer).
    pub fn redelivered(&self) -> bool {
        self.header("redelivered") == Some("true")
    }

    /// The transaction to do the work in. The inbox row is already inserted in it; the consumer
    /// commits it after the callback returns `Ok`. Do not commit or roll it back yourself (a
    /// nested `begin()` is a savepoint, which is fine). On SQLite, use it rather than the pool:
    /// the pool may have no other connection while it is open.
    pub fn db(&self) -> &DatabaseTransaction {
        &self.txn
    }

    /// Marks the message processed: the consumer commits the transaction and acknowledges the
    /// message when the callback returns `Ok`. (django-outbox-pattern's `save()` inserts the
    /// inbox row; here the row is inserted before the callback runs, so `save()` only records
    /// the decision.) Returning `Ok` without calling it has the same effect, with a warning.
    pub fn save(&self) {
        self.decision.set(Decision::SAVED);
    }

    /// Rejects the message: when the callback returns, the transaction is rolled back (nothing
    /// the callback wrote is kept, the inbox row neither) and the message is NACKed without
    /// requeueing, so RabbitMQ moves it to the dead-letter queue `DLQ.<queue>`. Wins over
    /// [`Payload::save`].
    pub fn nack(&self) {
        self.decision.set(Decision::NACKED);
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Payload")
            .field("queue", &self.message.queue)
            .field("message_id", &self.message.key)
            .field("correlation_id", &self.message.correlation_id)
            .field("headers", &self.message.headers)
            .field("body", &self.message.body)
            .finish_non_exhaustive()
    }
}

/// What the callback decided: nothing yet, save, or nack (nack wins).
#[derive(Debug, Default)]
pub(crate) struct Decision(AtomicU8);

impl Decision {
    pub(crate) const UNDECIDED: u8 = 0;
    pub(crate) const SAVED: u8 = 1;
    pub(crate) const NACKED: u8 = 2;

    fn set(&self, decision: u8) {
        self.0.fetch_max(decision, Ordering::SeqCst);
    }

    pub(crate) fn get(&self) -> u8 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A message as the consumer parsed it once, shared by every attempt at processing it.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub(crate) queue: String,
    pub(crate) destination: String,
    /// The idempotency key.
    pub(crate) key: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) body: Value,
}

impl Incoming {
    pub(crate) fn new(delivery: &Delivery, queue: &str) -> Incoming {
        let mut headers = BTreeMap::new();
        for (name, value) in &delivery.headers {
            // STOMP 1.2: the first occurrence of a repeated header is its value.
            headers.entry(name.clone()).or_insert_with(|| value.clone());
        }
        let non_empty = |name: &str| headers.get(name).filter(|value| !value.is_empty()).cloned();
        let key = non_empty(CAP_MSG_ID)
            .or_else(|| non_empty(MSG_ID))
            .or_else(|| non_empty("message-id"))
            .or_else(|| Some(delivery.message_id.clone()).filter(|id| !id.is_empty()));
        let correlation_id = non_empty(CORRELATION_ID);
        let body = serde_json::from_slice(&delivery.body).unwrap_or_else(|err| {
            tracing::debug!(error = %err, "message body is not JSON; kept as a string");
            Value::String(String::from_utf8_lossy(&delivery.body).into_owned())
        });
        Incoming {
            queue: queue.to_owned(),
            destination: delivery.destination.clone(),
            key,
            correlation_id,
            headers,
            body,
        }
    }

    /// The headers as the inbox row stores them: a JSON object of strings.
    pub(crate) fn headers_json(&self) -> Value {
        Value::Object(
            self.headers
                .iter()
                .map(|(name, value)| (name.clone(), Value::String(value.clone())))
                .collect(),
        )
    }
}

/// Marks a callback's error as transient: the consumer rolls back, waits, and calls the callback
/// again in a new transaction (`consumer_max_retry_attempts` times, waiting
/// `consumer_retry_wait` × the attempt number) before dead-lettering the message.
///
/// The consumer recognises transient database errors by itself (a lost connection, a
/// serialization failure, a deadlock, a pool timeout); wrap anything else worth retrying, such
/// as a call to a service that is briefly unavailable:
///
/// ```no_run
/// # async fn reserve_stock() -> Result<(), std::io::Error> { Ok(()) }
/// # async fn demo(payload: outbox::Payload) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// reserve_stock().await.map_err(outbox::consumer::Transient::new)?;
/// # Ok(()) }
/// ```
///
/// It is recognised anywhere in an error's `source()` chain, so wrapping it in another error
/// (anyhow's included) keeps it transient.
pub struct Transient(TransientMark);

/// What [`Transient::source`](std::error::Error::source) returns: error wrappers that show only
/// the sources of the error they wrap (anyhow does) still show this, so it can be found.
struct TransientMark(BoxError);

impl Transient {
    /// Marks `error` as transient.
    pub fn new(error: impl Into<BoxError>) -> Transient {
        Transient(TransientMark(error.into()))
    }

    /// The error it marks.
    pub fn into_inner(self) -> Box<dyn std::error::Error + Send + Sync> {
        self.0.0
    }

    /// Whether `error` or an error in its `source()` chain is marked transient.
    pub fn is_marked(error: &(dyn std::error::Error + 'static)) -> bool {
        let mut next = Some(error);
        while let Some(error) = next {
            if error.is::<Transient>() || error.is::<TransientMark>() {
                return true;
            }
            next = error.source();
        }
        false
    }
}

impl fmt::Display for Transient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.0, f)
    }
}

impl fmt::Debug for Transient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Transient").field(&self.0.0).finish()
    }
}

impl std::error::Error for Transient {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl fmt::Display for TransientMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("marked transient")
    }
}

impl fmt::Debug for TransientMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TransientMark")
    }
}

impl std::error::Error for TransientMark {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(headers: &[(&str, &str)], body: &[u8]) -> Delivery {
        Delivery {
            subscription: "s".into(),
            destination: "/topic/t".into(),
            message_id: "T_s@@session@@1".into(),
            ack_id: "T_s@@session@@1".into(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            body: body.to_vec(),
            connection: 1,
        }
    }

    #[test]
    fn the_key_is_the_first_non_empty_of_cap_dop_and_broker_ids() {
        let key = |headers: &[(&str, &str)]| Incoming::new(&delivery(headers, b"{}"), "q").key;
        let all = [
            ("message-id", "broker"),
            ("dop-msg-id", "dop"),
            ("cap-msg-id", "cap"),
        ];
        assert_eq!(key(&all).as_deref(), Some("cap"));
        assert_eq!(key(&all[..2]).as_deref(), Some("dop"));
        assert_eq!(
            key(&[("cap-msg-id", ""), ("dop-msg-id", "dop")]).as_deref(),
            Some("dop")
        );
        assert_eq!(
            key(&[("dop-msg-id", "")]).as_deref(),
            Some("T_s@@session@@1")
        );
    }

    #[test]
    fn a_body_that_is_not_json_is_kept_as_a_string_and_headers_keep_their_first_value() {
        let message = Incoming::new(&delivery(&[("x", "1"), ("x", "2")], b"not json"), "q");
        assert_eq!(message.body, Value::String("not json".into()));
        assert_eq!(message.headers["x"], "1");
        assert_eq!(message.headers_json()["x"], "1");
        let json = Incoming::new(&delivery(&[], br#"{"a": [1, "two"]}"#), "q");
        assert_eq!(json.body, serde_json::json!({"a": [1, "two"]}));
    }

    #[test]
    fn transient_is_found_through_wrappers_that_hide_it() {
        let marked = Transient::new(std::io::Error::other("service down"));
        assert_eq!(marked.to_string(), "service down");
        assert!(Transient::is_marked(&marked));

        // A wrapper whose source() is the wrapped error's source(), as anyhow's boxed errors do.
        #[derive(Debug)]
        struct Opaque(Transient);
        impl fmt::Display for Opaque {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
        impl std::error::Error for Opaque {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.0.source()
            }
        }
        assert!(Transient::is_marked(&Opaque(Transient::new("x"))));
        assert!(!Transient::is_marked(&std::io::Error::other("plain")));
    }

    #[test]
    fn nack_wins_over_save() {
        let decision = Decision::default();
        assert_eq!(decision.get(), Decision::UNDECIDED);
        decision.set(Decision::SAVED);
        assert_eq!(decision.get(), Decision::SAVED);
        decision.set(Decision::NACKED);
        decision.set(Decision::SAVED);
        assert_eq!(decision.get(), Decision::NACKED);
    }
}
