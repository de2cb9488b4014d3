//! Stalls of a broker connection, for each transport, against fake brokers (one that never
//! confirms, one that promises a frame it never finishes, one that never answers the login) and
//! RabbitMQ behind a slow link: a connection that answers nothing is left for the next address,
//! a lying frame ends its connection, connecting stops at once when asked, and a message that
//! takes longer than the receipt timeout to write is still receipted.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::transport::{
    ConnectionEvent, Outcome, StompSettings, StompTransport, Transport, TransportError,
};
use outbox::{Consumer, OutboxConfig, Payload};
use outbox_tests::fake_broker::{Behaviour, FakeBroker};
use outbox_tests::proxy::FaultProxy;
use outbox_tests::settings::RABBITMQ_STOMP;
use outbox_tests::stomp_peer::{QueueCleanup, unique};
use outbox_tests::transports::{TransportKind, outgoing};
use outbox_tests::{Backend, TestDb};

/// The events a transport reported, in order.
fn recorded(transport: &dyn Transport) -> Arc<Mutex<Vec<ConnectionEvent>>> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    transport.observe(Arc::new(move |event: &ConnectionEvent| {
        sink.lock().unwrap().push(event.clone())
    }));
    events
}

fn stomp_at(addresses: &[String], receipt_timeout: Duration) -> OutboxConfig {
    let mut config = outbox_tests::settings::stomp(RABBITMQ_STOMP);
    config.stomp_host_and_ports = addresses
        .iter()
        .map(|address| {
            let (host, port) = address.rsplit_once(':').expect("host:port");
            (host.to_owned(), port.parse().expect("port"))
        })
        .collect();
    config.receipt_timeout = receipt_timeout;
    config
}

#[tokio::test]
async fn a_broker_that_heartbeats_but_never_receipts_is_left_for_the_next_address() {
    let sick = FakeBroker::start(Behaviour::NeverReceipts).await;
    let config = stomp_at(
        &[sick.addr().to_string(), RABBITMQ_STOMP.to_owned()],
        Duration::from_secs(1),
    );
    let transport = StompTransport::new(StompSettings::from(&config)).unwrap();
    let events = recorded(&transport);
    let message = outgoing("/topic/outbox_stalls_nowhere", "{}");

    let started = Instant::now();
    let report = transport.send(std::slice::from_ref(&message)).await;
    assert!(
        matches!(
            report.outcomes[..],
            [Outcome::Unknown(ref unknown)] if unknown.reason == TransportError::ReceiptTimeout(Duration::from_secs(1))
        ),
        "{report:?}"
    );
    let report = transport.send(std::slice::from_ref(&message)).await;
    assert!(report.all_receipted(), "{report:?}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    let sick_address = sick.addr().to_string();
    assert_eq!(
        *events.lock().unwrap(),
        [
            ConnectionEvent::Connected {
                address: sick_address.clone(),
                reconnection: false
            },
            ConnectionEvent::ReceiptTimeout {
                address: sick_address.clone(),
                messages: 1
            },
            ConnectionEvent::Abandoned {
                address: sick_address
            },
            ConnectionEvent::Connected {
                address: RABBITMQ_STOMP.to_owned(),
                reconnection: true
            },
        ]
    );
    // Sticky: the next connection starts where the last one was.
    transport.disconnect().await.unwrap();
    assert!(transport.send(&[message]).await.all_receipted());
    assert_eq!(sick.accepted(), 1, "the sick broker was tried again");
}

#[tokio::test]
async fn a_frame_whose_content_length_lies_ends_its_connection() {
    let liar = FakeBroker::start(Behaviour::LyingContentLength).await;
    let mut config = stomp_at(&[liar.addr().to_string()], Duration::from_secs(1));
    // The grace: the receipt timeout, or two heartbeat intervals (1 s here) if longer.
    config.stomp_heartbeats = (Duration::from_millis(500), Duration::from_millis(500));
    let transport = StompTransport::new(StompSettings::from(&config)).unwrap();
    transport.connect().await.unwrap();
    let started = Instant::now();
    // The connection that swallows the broker's heartbeats into a frame that never ends is
    // given up, and the next connect opens another.
    while liar.accepted() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the connection stayed open for {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = transport.connect().await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "ended before its grace"
    );
}

/// A transport of `kind` whose brokers accept the connection and never answer the login.
async fn silent_transport(kind: TransportKind) -> (Arc<dyn Transport>, Vec<FakeBroker>) {
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(FakeBroker::start(Behaviour::Silent).await);
    }
    let mut config = match kind {
        TransportKind::Stomp => stomp_at(
            &silent
                .iter()
                .map(|broker| broker.addr().to_string())
                .collect::<Vec<_>>(),
            Duration::from_secs(5),
        ),
        TransportKind::Amqp => outbox_tests::settings::amqp(
            &silent
                .iter()
                .map(|broker| outbox_tests::settings::amqp_url(broker.addr()))
                .collect::<Vec<_>>()
                .join(","),
        ),
    };
    config.receipt_timeout = Duration::from_secs(5);
    config.producer_lease = Duration::from_secs(10);
    (outbox::transport::from_config(&config).unwrap(), silent)
}

async fn connecting_stops_at_once_when_asked(kind: TransportKind) {
    let (transport, silent) = silent_transport(kind).await;
    let connecting = tokio::spawn({
        let transport = transport.clone();
        async move { transport.connect().await }
    });
    outbox_tests::eventually(Duration::from_secs(5), "a login under way", || async {
        silent[0].accepted() > 0
    })
    .await;
    let stopping = Instant::now();
    transport.stop_connecting();
    let result = connecting.await.unwrap();
    assert_eq!(result, Err(TransportError::Closed));
    assert!(stopping.elapsed() < Duration::from_millis(500));
    // Stopped: nothing waits to connect.
    let report = transport.send(&[outgoing("/topic/x", "{}")]).await;
    assert_eq!(report.failure(), Some(&TransportError::Closed));
    assert_eq!(silent[1].accepted(), 0, "the next address was tried");
    // Resumed: it connects again (and waits for the login, cut short here).
    transport.resume_connecting();
    let attempt = tokio::time::timeout(Duration::from_millis(500), transport.connect()).await;
    assert!(attempt.is_err(), "connecting resumed: {attempt:?}");
    assert_eq!(silent[0].accepted(), 2);
}

#[tokio::test]
async fn connecting_stops_at_once_when_asked_stomp() {
    connecting_stops_at_once_when_asked(TransportKind::Stomp).await;
}

#[tokio::test]
async fn connecting_stops_at_once_when_asked_amqp() {
    connecting_stops_at_once_when_asked(TransportKind::Amqp).await;
}

#[tokio::test]
async fn a_consumer_stops_at_once_while_its_broker_never_answers_the_login() {
    let test = TestDb::new(Backend::Sqlite).await;
    let (transport, silent) = silent_transport(TransportKind::Stomp).await;
    let consumer = Consumer::builder(test.db.clone())
        .config(outbox_tests::settings::stomp(RABBITMQ_STOMP))
        .shared_transport(transport)
        .destination("/topic/outbox_stalls_consumer")
        .start(|_: Payload| async { Ok::<(), std::io::Error>(()) })
        .unwrap();
    outbox_tests::eventually(Duration::from_secs(5), "a login under way", || async {
        silent[0].accepted() > 0
    })
    .await;
    let stopping = Instant::now();
    consumer.stop().await.unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(1),
        "the consumer took {:?} to stop",
        stopping.elapsed()
    );
}

/// A message that takes twice the receipt timeout to cross the link is receipted: its receipt
/// timeout starts once its last byte is written.
async fn a_message_slower_to_write_than_the_receipt_timeout_is_receipted(kind: TransportKind) {
    let proxy = FaultProxy::start(kind.broker_addr()).await;
    proxy.rate(Some(512 * 1024));
    let mut config = kind.config_at(proxy.addr());
    config.receipt_timeout = Duration::from_secs(2);
    let transport = outbox::transport::from_config(&config).unwrap();
    let events = recorded(transport.as_ref());
    transport.connect().await.unwrap();
    // A queue takes them: an unroutable message would come back whole (AMQP's basic.return)
    // through the slow link before its confirm.
    let queue = unique("outbox_stalls_large");
    let _cleanup = QueueCleanup(vec![queue.clone()]);
    let destination = format!("/queue/{queue}");
    let large = outgoing(&destination, &"x".repeat(2 * 1024 * 1024));
    let small = outgoing(&destination, "{}");
    let started = Instant::now();
    let report = transport.send(&[large, small]).await;
    assert!(report.all_receipted(), "{report:?}");
    assert!(
        started.elapsed() > config.receipt_timeout,
        "the link was not slow: {:?}",
        started.elapsed()
    );
    assert!(
        !events
            .lock()
            .unwrap()
            .iter()
            .any(|event| matches!(event, ConnectionEvent::ReceiptTimeout { .. })),
        "{events:?}"
    );
    transport.disconnect().await.unwrap();
}

#[tokio::test]
async fn a_message_slower_to_write_than_the_receipt_timeout_is_receipted_stomp() {
    a_message_slower_to_write_than_the_receipt_timeout_is_receipted(TransportKind::Stomp).await;
}

#[tokio::test]
async fn a_message_slower_to_write_than_the_receipt_timeout_is_receipted_amqp() {
    a_message_slower_to_write_than_the_receipt_timeout_is_receipted(TransportKind::Amqp).await;
}
