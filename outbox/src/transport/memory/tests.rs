//! The in-memory broker's own behaviour, case by case, against what RabbitMQ's STOMP plugin does:
//! what the transport conformance suite (`outbox/tests/it/conformance/`) cannot reach, such as the
//! faults a test injects and the broker's inspection methods.
//!
//! One job in one file although it is long: it is the unit-test module of `memory/` (compiled
//! only for tests, `#[cfg(test)] mod tests;`), one case per function, and the cases share the
//! private set-up below; splitting it would only scatter that set-up.

use std::time::Duration;

use super::*;
use crate::transport::AckMode;
use crate::transport::topic_matches;

const WAIT: Duration = Duration::from_secs(2);

fn message(destination: &str, body: &str) -> Outgoing {
    Outgoing {
        destination: destination.to_owned(),
        headers: vec![("x-custom".to_owned(), "a:b".to_owned())],
        body: body.as_bytes().to_vec(),
    }
}

fn subscription(destination: &str, id: &str, headers: &[(&str, &str)]) -> Subscription {
    Subscription {
        destination: destination.to_owned(),
        id: id.to_owned(),
        ack: AckMode::ClientIndividual,
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

/// The headers django-outbox-pattern declares a consumer's queue with (WIRE.md §3).
fn python_queue_headers(queue: &str, prefetch: &str) -> Vec<(String, String)> {
    [
        ("durable", "true"),
        ("auto-delete", "false"),
        ("exclusive", "False"),
        ("prefetch-count", prefetch),
        ("x-queue-name", queue),
        ("x-dead-letter-exchange", ""),
        ("x-dead-letter-routing-key", &format!("DLQ.{queue}")),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

async fn send_ok(broker: &MemoryTransport, messages: &[Outgoing]) {
    let report = broker.send(messages).await;
    assert!(
        report.all_receipted(),
        "not receipted: {:?}",
        report.failure()
    );
    assert!(report.failure().is_none());
}

async fn next(receiver: &mut Deliveries) -> Delivery {
    tokio::time::timeout(WAIT, receiver.recv())
        .await
        .expect("a delivery within 2 s")
        .expect("the subscription is open")
}

async fn nothing_more(receiver: &mut Deliveries) {
    if let Ok(Some(delivery)) =
        tokio::time::timeout(Duration::from_millis(100), receiver.recv()).await
    {
        panic!("unexpected delivery {delivery:?}");
    }
}

async fn closes(receiver: &mut Deliveries) {
    let end = tokio::time::timeout(WAIT, receiver.recv()).await;
    assert!(
        matches!(end, Ok(None)),
        "receiver should have ended: {end:?}"
    );
}

fn detail(error: &TransportError) -> &str {
    match error {
        TransportError::Broker { detail, .. } => detail,
        other => panic!("expected a broker error, got {other:?}"),
    }
}

#[tokio::test]
async fn topic_send_reaches_every_queue_bound_to_its_key() {
    let broker = MemoryTransport::new();
    let mut first = broker
        .subscribe(subscription(
            "/topic/orders.v1",
            "a",
            &[("x-queue-name", "billing")],
        ))
        .await
        .unwrap();
    let mut second = broker
        .subscribe(subscription(
            "/topic/orders.v1",
            "b",
            &[("x-queue-name", "shipping")],
        ))
        .await
        .unwrap();
    send_ok(&broker, &[message("/topic/orders.v1", "{}")]).await;
    assert_eq!(next(&mut first).await.destination, "/topic/orders.v1");
    assert_eq!(next(&mut second).await.destination, "/topic/orders.v1");
}

#[tokio::test]
async fn topic_bindings_match_wildcards_like_amq_topic() {
    let broker = MemoryTransport::new();
    let mut star = broker
        .subscribe(subscription(
            "/topic/orders.*",
            "a",
            &[("x-queue-name", "star")],
        ))
        .await
        .unwrap();
    let mut hash = broker
        .subscribe(subscription(
            "/topic/orders.#",
            "b",
            &[("x-queue-name", "hash")],
        ))
        .await
        .unwrap();
    send_ok(&broker, &[message("/topic/orders.v1.eu", "deep")]).await;
    send_ok(&broker, &[message("/topic/orders.v1", "shallow")]).await;
    assert_eq!(next(&mut star).await.body, b"shallow");
    nothing_more(&mut star).await;
    assert_eq!(next(&mut hash).await.body, b"deep");
    assert_eq!(next(&mut hash).await.body, b"shallow");
    assert!(topic_matches("orders.#", "orders"));
    assert!(!topic_matches("orders.*", "orders"));
}

#[tokio::test]
async fn sent_records_a_topic_message_no_queue_took_until_cleared() {
    let broker = MemoryTransport::new();
    let sent = message("/topic/nobody", "lost");
    send_ok(&broker, std::slice::from_ref(&sent)).await;
    assert_eq!(broker.sent(), vec![sent]);
    broker.clear_sent();
    assert!(broker.sent().is_empty());
    assert_eq!(broker.send_count(), 1);
}

#[tokio::test]
async fn messages_wait_in_a_named_queue_without_consumer() {
    let broker = MemoryTransport::new();
    let headers = python_queue_headers("orders_q", "1");
    let topology = Subscription {
        headers,
        ..subscription("/topic/orders", "declare", &[])
    };
    broker.subscribe(topology).await.unwrap();
    broker.unsubscribe("declare").await.unwrap();
    assert!(
        broker.queue_exists("orders_q"),
        "a durable queue outlives its consumer"
    );
    send_ok(
        &broker,
        &[
            message("/topic/orders", "one"),
            message("/topic/orders", "two"),
        ],
    )
    .await;
    assert_eq!(broker.queue_len("orders_q"), 2);
    let waiting = broker.queue_messages("orders_q");
    assert_eq!(waiting[0].destination, "/topic/orders");
    assert_eq!(
        waiting[0].headers,
        vec![("x-custom".to_owned(), "a:b".to_owned())]
    );
    assert_eq!(waiting[1].body, b"two");
}

#[tokio::test]
async fn temporary_and_non_durable_topic_queues_go_with_their_consumer() {
    let broker = MemoryTransport::new();
    broker
        .subscribe(subscription(
            "/topic/k",
            "named",
            &[("x-queue-name", "transient_q")],
        ))
        .await
        .unwrap();
    broker
        .subscribe(subscription("/topic/k", "temp", &[]))
        .await
        .unwrap();
    send_ok(&broker, &[message("/topic/k", "x")]).await;
    assert!(broker.queue_exists("transient_q"));
    broker.unsubscribe("named").await.unwrap();
    broker.unsubscribe("temp").await.unwrap();
    assert!(!broker.queue_exists("transient_q"));
    assert!(broker.broker().queues.is_empty());
    assert!(broker.broker().bindings.is_empty());
}

#[tokio::test]
async fn queue_destinations_reach_the_named_queue() {
    let broker = MemoryTransport::new();
    send_ok(
        &broker,
        &[message("/queue/work", "1"), message("DLQ.work", "2")],
    )
    .await;
    assert_eq!(
        broker.queue_len("work"),
        1,
        "a SEND to /queue/ declares the queue"
    );
    assert_eq!(broker.queue_len("DLQ.work"), 1, "so does a bare name");
    send_ok(&broker, &[message("/amq/queue/work", "3")]).await;
    assert_eq!(broker.queue_len("work"), 2);
    // `/amq/queue/` declares nothing: a missing queue drops the message, receipted.
    send_ok(&broker, &[message("/amq/queue/missing", "4")]).await;
    assert!(!broker.queue_exists("missing"));
    let mut work = broker
        .subscribe(subscription("/amq/queue/work", "w", &[]))
        .await
        .unwrap();
    let first = next(&mut work).await;
    assert_eq!(first.destination, "/queue/work");
    assert_eq!(first.body, b"1");
    assert_eq!(next(&mut work).await.body, b"3");
    let mut bare = broker
        .subscribe(subscription("DLQ.work", "d", &[]))
        .await
        .unwrap();
    assert_eq!(next(&mut bare).await.destination, "/queue/DLQ.work");
}

#[tokio::test]
async fn subscribing_to_a_missing_amq_queue_is_not_found_and_closes_the_connection() {
    let broker = MemoryTransport::new();
    let mut open = broker
        .subscribe(subscription("/queue/q", "open", &[]))
        .await
        .unwrap();
    let error = broker
        .subscribe(subscription("/amq/queue/missing", "s", &[]))
        .await
        .unwrap_err();
    assert_eq!(
        detail(&error),
        "NOT_FOUND - no queue 'missing' in vhost '/'"
    );
    assert!(!broker.is_connected());
    closes(&mut open).await;
}

#[tokio::test]
async fn deliveries_carry_the_sent_headers_and_fresh_ids() {
    let broker = MemoryTransport::new();
    let mut client = broker
        .subscribe(subscription(
            "/topic/t",
            "sub-1",
            &[("x-queue-name", "t_q")],
        ))
        .await
        .unwrap();
    let mut auto = broker
        .subscribe(Subscription {
            ack: AckMode::Auto,
            ..subscription("/topic/t", "sub-2", &[("x-queue-name", "t_auto")])
        })
        .await
        .unwrap();
    let mut sent = message("/topic/t", "{\"n\":1}");
    sent.headers.push(("dop-msg-id".into(), "row-1".into()));
    send_ok(&broker, &[sent.clone(), sent]).await;
    let first = next(&mut client).await;
    let second = next(&mut client).await;
    let names: Vec<&str> = first.headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "subscription",
            "destination",
            "message-id",
            "redelivered",
            "ack",
            "x-custom",
            "dop-msg-id",
            "content-length"
        ]
    );
    assert_eq!(first.header("x-custom"), Some("a:b"));
    assert_eq!(first.header("content-length"), Some("7"));
    assert_eq!(first.header("redelivered"), Some("false"));
    assert_eq!(first.header("ack"), Some(first.ack_id.as_str()));
    assert_eq!(first.header("message-id"), Some(first.message_id.as_str()));
    assert_eq!(first.subscription, "sub-1");
    assert_ne!(first.message_id, second.message_id);
    let unacked = next(&mut auto).await;
    assert_eq!(
        unacked.header("ack"),
        None,
        "no ack header on an auto subscription"
    );
    let _ = next(&mut auto).await;
    assert_eq!(broker.unacked_len("t_auto"), 0);
    // An empty body has no content-length, as with RabbitMQ.
    send_ok(&broker, &[message("/topic/t", "")]).await;
    assert_eq!(next(&mut auto).await.header("content-length"), None);
}

#[tokio::test]
async fn prefetch_bounds_unacked_deliveries_and_ack_releases_the_next() {
    let broker = MemoryTransport::new();
    let mut receiver = broker
        .subscribe(subscription("/queue/p", "s", &[("prefetch-count", "2")]))
        .await
        .unwrap();
    let batch: Vec<Outgoing> = (0..4)
        .map(|n| message("/queue/p", &n.to_string()))
        .collect();
    send_ok(&broker, &batch).await;
    let zero = next(&mut receiver).await;
    let one = next(&mut receiver).await;
    nothing_more(&mut receiver).await;
    assert_eq!(broker.queue_len("p"), 2);
    assert_eq!(broker.unacked_len("p"), 2);
    broker.ack(&zero).await.unwrap();
    assert_eq!(next(&mut receiver).await.body, b"2");
    nothing_more(&mut receiver).await;
    broker.ack(&one).await.unwrap();
    assert_eq!(next(&mut receiver).await.body, b"3");
    assert_eq!(broker.queue_len("p"), 0);
    // Acking twice: the delivery is no longer known.
    let error = broker.ack(&zero).await.unwrap_err();
    assert!(detail(&error).contains("has no subscription"));
    assert!(broker.is_connected(), "an unknown ack id is not fatal");
}

#[tokio::test]
async fn without_prefetch_every_message_is_delivered_at_once() {
    let broker = MemoryTransport::new();
    let mut receiver = broker
        .subscribe(subscription("/queue/u", "s", &[]))
        .await
        .unwrap();
    let batch: Vec<Outgoing> = (0..100)
        .map(|n| message("/queue/u", &n.to_string()))
        .collect();
    send_ok(&broker, &batch).await;
    for n in 0..100 {
        assert_eq!(next(&mut receiver).await.body, n.to_string().as_bytes());
    }
    assert_eq!(broker.unacked_len("u"), 100);
}

#[tokio::test]
async fn consumers_of_one_queue_share_it_round_robin() {
    let broker = MemoryTransport::new();
    let mut a = broker
        .subscribe(subscription("/queue/rr", "a", &[]))
        .await
        .unwrap();
    let mut b = broker
        .subscribe(subscription("/queue/rr", "b", &[]))
        .await
        .unwrap();
    let batch: Vec<Outgoing> = (0..4)
        .map(|n| message("/queue/rr", &n.to_string()))
        .collect();
    send_ok(&broker, &batch).await;
    assert_eq!(next(&mut a).await.body, b"0");
    assert_eq!(next(&mut b).await.body, b"1");
    assert_eq!(next(&mut a).await.body, b"2");
    assert_eq!(next(&mut b).await.body, b"3");
}

#[tokio::test]
async fn nack_without_a_dead_letter_exchange_drops_the_message() {
    let broker = MemoryTransport::new();
    let mut receiver = broker
        .subscribe(subscription(
            "/queue/plain",
            "s",
            &[("x-dead-letter-routing-key", "DLQ.plain")],
        ))
        .await
        .unwrap();
    send_ok(
        &broker,
        &[
            message("/queue/DLQ.plain", "keep"),
            message("/amq/queue/plain", "x"),
        ],
    )
    .await;
    let delivery = next(&mut receiver).await;
    broker.nack(&delivery).await.unwrap();
    assert_eq!(broker.queue_len("plain"), 0);
    assert_eq!(
        broker.queue_len("DLQ.plain"),
        1,
        "nothing was dead-lettered"
    );
}

#[tokio::test]
async fn a_delivery_of_an_earlier_connection_is_never_settled_on_the_current_one() {
    let broker = MemoryTransport::new();
    let mut receiver = broker
        .subscribe(subscription("/queue/g", "s", &[]))
        .await
        .unwrap();
    send_ok(&broker, &[message("/queue/g", "a")]).await;
    let old = next(&mut receiver).await;
    broker.disconnect().await.unwrap();
    let mut again = broker
        .subscribe(subscription("/queue/g", "s", &[]))
        .await
        .unwrap();
    let current = next(&mut again).await;
    assert_ne!(old.connection, current.connection);
    // RabbitMQ reads only subscription and delivery tag from an ack id, so an old id can
    // name a delivery of the new connection: the connection number is what tells them apart.
    let colliding = Delivery {
        ack_id: current.ack_id.clone(),
        ..old
    };
    for settle in [broker.ack(&colliding).await, broker.nack(&colliding).await] {
        assert_eq!(settle, Err(TransportError::stale_delivery()));
    }
    assert_eq!(
        broker.unacked_len("g"),
        1,
        "the current delivery is untouched"
    );
    broker.ack(&current).await.unwrap();
    assert_eq!(broker.unacked_len("g"), 0);
}

#[tokio::test]
async fn unsubscribe_keeps_unacked_deliveries_until_the_connection_closes() {
    let broker = MemoryTransport::new();
    let mut receiver = broker
        .subscribe(subscription("/queue/h", "s", &[]))
        .await
        .unwrap();
    send_ok(&broker, &[message("/queue/h", "held")]).await;
    let delivery = next(&mut receiver).await;
    broker.unsubscribe("s").await.unwrap();
    closes(&mut receiver).await;
    // As with RabbitMQ: no longer ackable, not yet back in the queue.
    let error = broker.ack(&delivery).await.unwrap_err();
    assert_eq!(
        error,
        TransportError::Broker {
            message: "Subscription not found".into(),
            detail: format!(
                "Message with id \"{}\" has no subscription",
                delivery.ack_id
            ),
        }
    );
    assert_eq!(broker.queue_len("h"), 0);
    assert_eq!(broker.unacked_len("h"), 1);
    broker.disconnect().await.unwrap();
    assert_eq!(broker.queue_len("h"), 1);
    assert_eq!(broker.queue_messages("h")[0].body, b"held");
    let error = broker.unsubscribe("s").await.unwrap_err();
    assert!(detail(&error).contains("not found"));
}

#[tokio::test]
async fn a_duplicated_subscription_id_is_refused_and_closes_the_connection() {
    let broker = MemoryTransport::new();
    let mut first = broker
        .subscribe(subscription("/queue/d", "same", &[]))
        .await
        .unwrap();
    let error = broker
        .subscribe(subscription("/queue/d", "same", &[]))
        .await
        .unwrap_err();
    assert!(error.is_broker_refusal());
    closes(&mut first).await;
}

#[tokio::test]
async fn a_refused_send_fails_the_rest_of_the_batch_and_closes_the_connection() {
    let broker = MemoryTransport::new();
    let mut receiver = broker
        .subscribe(subscription("/queue/in", "s", &[]))
        .await
        .unwrap();
    send_ok(&broker, &[message("/queue/in", "unacked")]).await;
    let _ = next(&mut receiver).await;
    broker.refuse("/topic/poison");
    let batch = [
        message("/topic/ok", "1"),
        message("/topic/poison.v1", "2"),
        message("/topic/ok", "3"),
    ];
    let report = broker.send(&batch).await;
    assert_eq!(report.receipted(), vec![true, false, false]);
    let failure = report.failure().cloned().unwrap();
    assert_eq!(
        failure,
        TransportError::Broker {
            message: "not_found".into(),
            detail: "NOT_FOUND - no exchange '/topic/poison.v1' in vhost '/'".into(),
        }
    );
    assert_eq!(
        broker.sent(),
        vec![message("/queue/in", "unacked"), batch[0].clone()]
    );
    closes(&mut receiver).await;
    assert_eq!(broker.queue_len("in"), 1, "the unacked delivery went back");
    // The next batch reconnects; refusals stay until cleared.
    let report = broker.send(&batch[2..]).await;
    assert!(report.all_receipted());
    broker.clear_refusals();
    assert!(broker.send(&batch[1..2]).await.all_receipted());
    assert_eq!(broker.send_count(), 4);
}

#[tokio::test]
async fn a_refusal_fails_the_pending_receipts_of_another_batch_on_the_connection() {
    let broker = MemoryTransport::new();
    broker.refuse("/exchange/missing");
    // Receipts come late: the first batch is still waiting for them when the second batch,
    // on the same connection, is refused.
    broker.set_receipt_delay(Duration::from_millis(300));
    let good = [message("/topic/ok", "1"), message("/topic/ok", "2")];
    let poison = [message("/exchange/missing/x", "3")];
    let (first, second) = tokio::join!(broker.send(&good), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        broker.send(&poison).await
    });
    assert_eq!(first.receipted(), vec![false, false], "{first:?}");
    assert!(
        first
            .outcomes
            .iter()
            .all(|o| matches!(o.error(), Some(TransportError::Broker { .. }))),
        "the other batch's receipts fail with the refusal: {first:?}"
    );
    assert_eq!(second.receipted(), vec![false]);
    // The good messages were routed all the same: sending them again duplicates them.
    assert_eq!(broker.sent(), good.to_vec());
}

#[tokio::test]
async fn unknown_exchanges_and_destinations_are_refused() {
    let broker = MemoryTransport::new();
    let report = broker.send(&[message("/exchange/nope/k", "x")]).await;
    assert!(detail(report.failure().unwrap()).starts_with("NOT_FOUND - no exchange 'nope'"));
    let report = broker.send(&[message("/bogus/x", "x")]).await;
    assert!(report.failure().unwrap().is_broker_refusal());
    let mut via_exchange = broker
        .subscribe(subscription(
            "/exchange/amq.topic/k",
            "s",
            &[("x-queue-name", "k_q")],
        ))
        .await
        .unwrap();
    send_ok(&broker, &[message("/topic/k", "x")]).await;
    assert_eq!(next(&mut via_exchange).await.destination, "/topic/k");
}

#[tokio::test]
async fn a_broker_that_is_down_refuses_connections_and_ends_subscriptions() {
    let broker = MemoryTransport::new();
    let mut receiver = broker
        .subscribe(Subscription {
            headers: python_queue_headers("q", "1"),
            ..subscription("/topic/t", "s", &[])
        })
        .await
        .unwrap();
    send_ok(&broker, &[message("/topic/t", "in flight")]).await;
    let delivery = next(&mut receiver).await;
    broker.set_down(true);
    closes(&mut receiver).await;
    let refused = |e: &TransportError| matches!(e, TransportError::Connect { .. });
    assert!(refused(&broker.connect().await.unwrap_err()));
    let report = broker
        .send(&[message("/topic/t", "a"), message("/topic/t", "b")])
        .await;
    assert_eq!(report.receipted(), vec![false, false]);
    assert!(refused(report.failure().unwrap()));
    assert!(refused(
        &broker
            .subscribe(subscription("/topic/t", "s", &[]))
            .await
            .unwrap_err()
    ));
    assert!(matches!(
        broker.ack(&delivery).await,
        Err(TransportError::ConnectionLost(_))
    ));
    assert_eq!(broker.send_count(), 2);
    broker.set_down(false);
    broker.connect().await.unwrap();
    assert_eq!(
        broker.queue_len("q"),
        1,
        "queues survive; the unacked message came back"
    );
    assert_eq!(broker.queue_messages("q")[0].body, b"in flight");
}

#[tokio::test]
async fn clones_share_a_connection_and_new_connections_are_independent() {
    let broker = MemoryTransport::new();
    let clone = broker.clone();
    let other = broker.new_connection();
    let mut mine = broker
        .subscribe(subscription("/queue/c", "s", &[]))
        .await
        .unwrap();
    let mut theirs = other
        .subscribe(subscription("/queue/c2", "s", &[]))
        .await
        .unwrap();
    send_ok(
        &clone,
        &[message("/queue/c", "1"), message("/queue/c2", "2")],
    )
    .await;
    let delivery = next(&mut mine).await;
    let their_delivery = next(&mut theirs).await;
    clone.ack(&delivery).await.unwrap();
    assert!(
        other.ack(&delivery).await.is_err(),
        "acks belong to their connection"
    );
    clone.disconnect().await.unwrap();
    closes(&mut mine).await;
    assert!(other.is_connected());
    other.ack(&their_delivery).await.unwrap();
    assert_eq!(other.sent().len(), 2, "one broker");
}

#[tokio::test]
async fn a_dropped_receiver_holds_its_client_deliveries_until_disconnect() {
    let broker = MemoryTransport::new();
    let receiver = broker
        .subscribe(subscription("/queue/gone", "s", &[]))
        .await
        .unwrap();
    drop(receiver);
    send_ok(&broker, &[message("/queue/gone", "x")]).await;
    assert_eq!(broker.unacked_len("gone"), 1);
    broker.disconnect().await.unwrap();
    assert_eq!(broker.queue_len("gone"), 1);
}

#[tokio::test]
async fn an_undecodable_message_to_a_reader_without_a_dead_letter_route_stays_unacknowledged() {
    let broker = MemoryTransport::new();
    broker.undecodable("/queue/plain");
    send_ok(&broker, &[message("/queue/plain", "garbled")]).await;
    // The same queue, by a destination the fault does not name.
    send_ok(&broker, &[message("plain", "fine")]).await;
    let mut reader = broker
        .subscribe(subscription("/queue/plain", "r", &[]))
        .await
        .unwrap();
    assert_eq!(next(&mut reader).await.body, b"fine");
    nothing_more(&mut reader).await;
    assert_eq!(broker.unacked_len("plain"), 2);
    broker.disconnect().await.unwrap();
    assert_eq!(broker.queue_len("plain"), 2, "both back in their queue");
}
