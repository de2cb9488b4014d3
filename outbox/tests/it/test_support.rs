//! The test tools checked against the real RabbitMQ (127.0.0.1:61613): the raw STOMP peer that
//! other tests use as an independent witness, and the fault proxy they break links with.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use outbox_tests::proxy::FaultProxy;
use outbox_tests::stomp_peer::{
    QueueCleanup, RABBITMQ_STOMP, StompPeer, delete_queue, queue_message_count, unique,
};

const SECOND: Duration = Duration::from_secs(1);
const PATIENCE: Duration = Duration::from_secs(5);

fn rabbitmq() -> SocketAddr {
    RABBITMQ_STOMP
        .parse()
        .unwrap_or_else(|e| panic!("{RABBITMQ_STOMP} is not a socket address: {e}"))
}

async fn peer(addr: impl tokio::net::ToSocketAddrs) -> StompPeer {
    StompPeer::connect(addr).await.unwrap_or_else(|e| {
        panic!("cannot connect to RabbitMQ's STOMP port ({e}); is rabbitmq_stomp enabled?")
    })
}

/// Waits until `condition` holds, for at most `PATIENCE`.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn peer_receives_custom_headers_and_binary_bodies_exactly() {
    let key = unique("support_key");
    let queue = unique("support_q");
    let _cleanup = QueueCleanup(vec![queue.clone()]);
    let mut subscriber = peer(RABBITMQ_STOMP).await;
    let sub = subscriber
        .subscribe(
            &format!("/topic/{key}"),
            &[
                ("durable", "true"),
                ("auto-delete", "false"),
                ("x-queue-name", &queue),
                ("prefetch-count", "1"),
            ],
        )
        .await
        .unwrap();

    let mut sender = peer(RABBITMQ_STOMP).await;
    let tricky = "colon: newline\nbackslash\\ end";
    let body = b"{\"nul\":\"a\0b\"}";
    sender
        .send(
            &format!("/topic/{key}"),
            &[("x-tricky", tricky), ("dop-msg-id", "id-1")],
            body,
        )
        .await
        .unwrap();

    let message = subscriber.next_message(PATIENCE).await.expect("a MESSAGE");
    assert_eq!(message.command, "MESSAGE");
    assert_eq!(message.header("x-tricky"), Some(tricky));
    assert_eq!(message.header("dop-msg-id"), Some("id-1"));
    assert_eq!(message.header("subscription"), Some(sub.as_str()));
    assert_eq!(
        message.header("destination"),
        Some(format!("/topic/{key}").as_str())
    );
    assert_eq!(message.header("redelivered"), Some("false"));
    assert_eq!(message.body, body, "content-length honoured across the NUL");
    subscriber.ack(&message).await.unwrap();
    assert!(subscriber.next_message(SECOND / 4).await.is_none());
    subscriber.unsubscribe(&sub).await.unwrap();
    subscriber.disconnect().await.unwrap();
    sender.disconnect().await.unwrap();

    // The durable queue outlives the connection, until a test deletes it.
    assert!(queue_message_count(&queue).is_some());
    delete_queue(&queue);
    assert_eq!(queue_message_count(&queue), None);
}

#[tokio::test]
async fn proxy_forwards_both_ways() {
    let queue = unique("support_proxy_q");
    let _cleanup = QueueCleanup(vec![queue.clone()]);
    let proxy = FaultProxy::start(rabbitmq()).await;
    let mut client = peer(proxy.addr()).await;
    assert_eq!(proxy.accepted(), 1);
    assert_eq!(proxy.connections(), 1);
    client
        .subscribe(&format!("/queue/{queue}"), &[])
        .await
        .unwrap();
    client
        .send(&format!("/queue/{queue}"), &[], b"through the proxy")
        .await
        .unwrap();
    let message = client.next_message(PATIENCE).await.expect("a MESSAGE");
    assert_eq!(message.body, b"through the proxy");
    client.ack(&message).await.unwrap();
    client.disconnect().await.unwrap();
    eventually("the proxy sees the connection close", || {
        proxy.connections() == 0
    })
    .await;
}

#[tokio::test]
async fn proxy_cut_closes_open_connections_only() {
    let proxy = FaultProxy::start(rabbitmq()).await;
    let mut client = peer(proxy.addr()).await;
    proxy.cut();
    let read = tokio::time::timeout(SECOND, client.read_frame())
        .await
        .expect("the cut shows within 1 s");
    assert!(
        matches!(read, Ok(None) | Err(_)),
        "expected end of stream, got {read:?}"
    );
    eventually("the cut connection is closed", || proxy.connections() == 0).await;
    // New connections go through.
    let again = peer(proxy.addr()).await;
    again.disconnect().await.unwrap();
    assert_eq!(proxy.accepted(), 2);
}

#[tokio::test]
async fn proxy_stall_holds_bytes_until_released() {
    let queue = unique("support_stall_q");
    let _cleanup = QueueCleanup(vec![queue.clone()]);
    let proxy = FaultProxy::start(rabbitmq()).await;
    let mut client = peer(proxy.addr()).await;
    proxy.stall(true);
    let receipt = client
        .send_without_waiting(&format!("/queue/{queue}"), &[], b"held")
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(SECOND, client.wait_receipt(&receipt))
            .await
            .is_err(),
        "no receipt through a stalled link"
    );
    assert_eq!(proxy.connections(), 1, "the socket stays open");
    // A connection opened while stalled hangs as well.
    let stalled_connect = tokio::time::timeout(SECOND, StompPeer::connect(proxy.addr())).await;
    assert!(stalled_connect.is_err(), "CONNECT answered through a stall");

    proxy.stall(false);
    tokio::time::timeout(PATIENCE, client.wait_receipt(&receipt))
        .await
        .expect("the receipt arrives once released")
        .unwrap();
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn proxy_slow_delays_every_chunk() {
    let queue = unique("support_slow_q");
    let _cleanup = QueueCleanup(vec![queue.clone()]);
    let proxy = FaultProxy::start(rabbitmq()).await;
    let mut client = peer(proxy.addr()).await;
    proxy.slow(Some(Duration::from_millis(300)));
    let started = Instant::now();
    client
        .send(&format!("/queue/{queue}"), &[], b"slow")
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(600),
        "a round trip is two delayed chunks, took {elapsed:?}"
    );
    proxy.slow(None);
    let started = Instant::now();
    client
        .send(&format!("/queue/{queue}"), &[], b"fast")
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(300));
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn proxy_refuse_makes_connect_fail_until_lifted() {
    let proxy = FaultProxy::start(rabbitmq()).await;
    let open = peer(proxy.addr()).await;
    proxy.refuse(true);
    let refused = tokio::time::timeout(SECOND, StompPeer::connect(proxy.addr()))
        .await
        .expect("a refused connection fails at once");
    assert!(refused.is_err());
    assert_eq!(proxy.accepted(), 2);
    assert_eq!(
        proxy.connections(),
        1,
        "the open connection is not affected"
    );
    open.disconnect().await.unwrap();
    proxy.refuse(false);
    peer(proxy.addr()).await.disconnect().await.unwrap();
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_connections() {
    let proxy = FaultProxy::start(rabbitmq()).await;
    let addr = proxy.addr();
    let mut client = peer(addr).await;
    drop(proxy);
    let read = tokio::time::timeout(SECOND, client.read_frame())
        .await
        .expect("the drop shows within 1 s");
    assert!(matches!(read, Ok(None) | Err(_)), "got {read:?}");
    let connect = tokio::time::timeout(SECOND, tokio::net::TcpStream::connect(addr)).await;
    assert!(
        !matches!(connect, Ok(Ok(_))),
        "the listener is gone after the drop"
    );
}
