//! Direct sends: a message to the broker now, without an outbox row (so without the outbox's
//! guarantee: nothing ties the send to a database commit). For notifications that need no
//! transaction, and for tools. django-outbox-pattern's `send_event` counterpart: the headers are
//! exactly the caller's, no `dop-*` header is added.

use serde::Serialize;
use tokio::sync::OnceCell;

use std::sync::Arc;

use crate::config::OutboxConfig;
use crate::error::Error;
use crate::headers;
use crate::transport::{Outcome, Outgoing, Transport, TransportError};

/// The process's broker connection for [`send`], made on first use from the environment.
static DIRECT: OnceCell<Arc<dyn Transport>> = OnceCell::const_new();

/// Sends `body` as JSON to `destination` at once, through a broker connection this process
/// opens on first use with the settings of the environment ([`OutboxConfig::from_env`]), and
/// waits for the broker's receipt. No outbox row is written.
///
/// The frame carries `headers` as given, less a broker's delivery state
/// ([`crate::headers::is_delivery_state`]: `message-id`, `redelivered`, the frame's own
/// headers...), plus `persistent:true` and `content-type:application/json` unless given; no
/// `dop-*` header is added (give `dop-msg-id` or `cap-msg-id` for consumers to deduplicate on).
///
/// ```no_run
/// # async fn demo() -> Result<(), outbox::Error> {
/// outbox::send(
///     "/topic/notifications",
///     &serde_json::json!({"user": 7, "text": "hello"}),
///     &[("dop-msg-id", "notification-7-1")],
/// )
/// .await?;
/// # Ok(()) }
/// ```
pub async fn send<B: Serialize + ?Sized>(
    destination: &str,
    body: &B,
    headers: &[(&str, &str)],
) -> Result<(), Error> {
    let transport = DIRECT
        .get_or_try_init(|| async { crate::transport::from_config(&OutboxConfig::from_env()?) })
        .await?;
    send_with(transport.as_ref(), destination, body, headers).await
}

/// [`send`] through the given transport.
pub async fn send_with<B: Serialize + ?Sized>(
    transport: &dyn Transport,
    destination: &str,
    body: &B,
    headers: &[(&str, &str)],
) -> Result<(), Error> {
    let message = direct_message(destination, body, headers)?;
    let report = transport.send(std::slice::from_ref(&message)).await;
    if report.all_receipted() {
        tracing::debug!(destination, "message sent directly");
        return Ok(());
    }
    let error = match report.outcomes.first() {
        Some(Outcome::Unroutable(reply)) => TransportError::Broker {
            message: format!("no queue is bound to `{destination}`"),
            detail: format!("the broker returned the message ({reply})"),
        },
        Some(Outcome::Nacked) => TransportError::Broker {
            message: "the broker could not take the message (basic.nack)".into(),
            detail: "try again later".into(),
        },
        _ => report
            .failure()
            .cloned()
            .unwrap_or_else(|| TransportError::ConnectionLost("no receipt".into())),
    };
    Err(Error::Transport(error))
}

fn direct_message<B: Serialize + ?Sized>(
    destination: &str,
    body: &B,
    headers: &[(&str, &str)],
) -> Result<Outgoing, Error> {
    if destination.trim().is_empty() {
        return Err(Error::InvalidDestination {
            entity: "send",
            destination: destination.to_owned(),
            reason: "empty destination",
        });
    }
    let body = serde_json::to_vec(body).map_err(|source| Error::Serialize {
        entity: "send",
        destination: destination.to_owned(),
        source,
    })?;
    let mut frame_headers: Vec<(String, String)> = headers
        .iter()
        .filter(|(name, _)| !headers::is_delivery_state(name))
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    for (name, value) in [("persistent", "true"), ("content-type", "application/json")] {
        if !frame_headers.iter().any(|(n, _)| n == name) {
            frame_headers.push((name.to_owned(), value.to_owned()));
        }
    }
    Ok(Outgoing {
        destination: destination.to_owned(),
        headers: frame_headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{AckMode, MemoryTransport, Subscription};

    #[test]
    fn a_direct_message_has_the_given_headers_and_nothing_of_the_outbox() {
        let message = direct_message(
            "/topic/x",
            &serde_json::json!({"a": 1}),
            &[
                ("dop-msg-id", "direct-1"),
                ("x-extra", "1"),
                ("receipt", "mine"),
            ],
        )
        .unwrap();
        assert_eq!(
            message.headers,
            [
                ("dop-msg-id", "direct-1"),
                ("x-extra", "1"),
                ("persistent", "true"),
                ("content-type", "application/json"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert_eq!(message.body, br#"{"a":1}"#);
        assert!(direct_message(" ", &1, &[]).is_err());
    }

    #[tokio::test]
    async fn send_with_waits_for_the_receipt() {
        let broker = MemoryTransport::new();
        let mut deliveries = broker
            .subscribe(Subscription {
                destination: "/queue/direct".into(),
                id: "s".into(),
                ack: AckMode::Auto,
                headers: vec![],
            })
            .await
            .unwrap();
        send_with(&broker, "/queue/direct", &[1, 2], &[("dop-msg-id", "d")])
            .await
            .unwrap();
        let delivery = deliveries.recv().await.unwrap();
        assert_eq!(delivery.body, b"[1,2]");
        assert_eq!(delivery.header("dop-msg-id"), Some("d"));
        broker.set_down(true);
        assert!(matches!(
            send_with(&broker, "/queue/direct", &1, &[]).await,
            Err(Error::Transport(_))
        ));
    }
}
