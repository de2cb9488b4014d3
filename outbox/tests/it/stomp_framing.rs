//! The STOMP transport against a scripted broker on a local socket, for what RabbitMQ cannot be
//! made to send on cue: the exact NACK frames written for messages that do not decode or exceed
//! the maximum frame size, and the report of them that the consumer counts. (The same cases
//! against the real RabbitMQ, end to end with the dead-letter queue, are `fault.undecodable` in
//! `outbox-cli/tests/faults_stomp.rs`.)

use std::time::Duration;

use outbox::OutboxConfig;
use outbox::transport::{
    AckMode, StompSettings, StompTransport, Subscription, SubscriptionEvent, Transport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads one frame sent by the client (heartbeats skipped): its command and headers.
async fn read_frame(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
) -> (String, Vec<(String, String)>) {
    loop {
        while buffer.first().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            buffer.remove(0);
        }
        if let Some(end) = buffer.iter().position(|b| *b == 0) {
            let frame: Vec<u8> = buffer.drain(..=end).collect();
            let text = String::from_utf8(frame[..frame.len() - 1].to_vec()).expect("UTF-8");
            let head = text.split("\n\n").next().unwrap_or_default();
            let mut lines = head.lines();
            let command = lines.next().unwrap_or_default().to_owned();
            let headers = lines
                .filter_map(|line| line.split_once(':'))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            return (command, headers);
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("a frame from the client in time")
            .expect("read");
        assert!(n > 0, "the client closed the connection");
        buffer.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn message(ack: &str, extra: &[u8], body: &[u8]) -> Vec<u8> {
    let mut frame =
        format!("MESSAGE\ndestination:/topic/t\nmessage-id:id-{ack}\nsubscription:s1\nack:{ack}\n")
            .into_bytes();
    frame.extend_from_slice(extra);
    frame.extend_from_slice(format!("content-length:{}\n\n", body.len()).as_bytes());
    frame.extend_from_slice(body);
    frame.push(0);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_oversized_messages_are_nacked_reported_and_the_next_one_delivered() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let broker = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buffer = Vec::new();
        let (command, _) = read_frame(&mut stream, &mut buffer).await;
        assert_eq!(command, "CONNECT");
        stream
            .write_all(b"CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\0")
            .await
            .unwrap();
        let (command, headers) = read_frame(&mut stream, &mut buffer).await;
        assert_eq!(command, "SUBSCRIBE");
        let receipt = header(&headers, "receipt")
            .expect("a receipt request")
            .to_owned();
        let mut script = format!("RECEIPT\nreceipt-id:{receipt}\n\n\0\n").into_bytes();
        script.extend(message("bad", b"x-bad:\xff\xfe\n", b"{}"));
        script.extend_from_slice(b"\n");
        script.extend(message("big", b"", &vec![b'x'; 5000]));
        script.extend(message("good", b"", b"{\"ok\": true}"));
        // In small pieces, as a slow network would deliver them.
        for piece in script.chunks(100) {
            stream.write_all(piece).await.unwrap();
        }
        // The good message's ACK, and the two NACKs (which come a moment after the frames).
        let mut nacks = Vec::new();
        let mut acks = Vec::new();
        for _ in 0..3 {
            let (command, headers) = read_frame(&mut stream, &mut buffer).await;
            let id = header(&headers, "id").unwrap_or_default().to_owned();
            match command.as_str() {
                "NACK" => {
                    assert_eq!(header(&headers, "requeue"), Some("false"));
                    nacks.push(id);
                }
                "ACK" => acks.push(id),
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(acks, ["good"]);
        nacks
    });

    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = vec![("127.0.0.1".into(), port)];
    config.stomp_heartbeats = (Duration::ZERO, Duration::ZERO);
    config.stomp_max_frame_size = 1024;
    config.receipt_timeout = Duration::from_secs(5);
    let transport = StompTransport::new(StompSettings::from(&config)).unwrap();
    let mut deliveries = transport
        .subscribe(Subscription {
            destination: "/topic/t".into(),
            id: "s1".into(),
            ack: AckMode::ClientIndividual,
            headers: vec![
                ("x-queue-name".into(), "framing_q".into()),
                ("x-dead-letter-routing-key".into(), "DLQ.framing_q".into()),
                ("prefetch-count".into(), "5".into()),
            ],
        })
        .await
        .unwrap();
    // The good message, then word of the two rejected ones, which the consumer counts.
    let mut undecodable = Vec::new();
    let mut delivered = Vec::new();
    while delivered.len() + undecodable.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), deliveries.next_event())
            .await
            .expect("the next event in time")
            .expect("the subscription is open");
        match event {
            SubscriptionEvent::Delivery(delivery) => {
                assert_eq!(delivery.ack_id, "good");
                assert_eq!(delivery.body, b"{\"ok\": true}");
                transport.ack(&delivery).await.unwrap();
                delivered.push(delivery.ack_id);
            }
            SubscriptionEvent::Undecodable(message) => undecodable.push(message),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(delivered, ["good"]);
    let nacks = tokio::time::timeout(Duration::from_secs(10), broker)
        .await
        .expect("the scripted broker finished")
        .unwrap();
    assert_eq!(nacks, ["bad", "big"]);
    let reported: Vec<(&str, &str, Option<&str>)> = undecodable
        .iter()
        .map(|m| {
            (
                m.subscription.as_str(),
                m.queue.as_str(),
                m.message_id.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        reported,
        [
            ("s1", "framing_q", Some("id-bad")),
            ("s1", "framing_q", Some("id-big")),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_to_a_reader_without_a_dead_letter_route_is_left_alone() {
    // A reader of a dead-letter queue (`outbox dlq`) declares no dead-letter route: a NACK
    // would send the message on to a queue that may not exist. It stays unacknowledged.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let broker = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buffer = Vec::new();
        read_frame(&mut stream, &mut buffer).await;
        stream
            .write_all(b"CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\0")
            .await
            .unwrap();
        let (_, headers) = read_frame(&mut stream, &mut buffer).await;
        let receipt = header(&headers, "receipt").unwrap().to_owned();
        let mut script = format!("RECEIPT\nreceipt-id:{receipt}\n\n\0").into_bytes();
        script.extend(message("bad", b"x-bad:\xff\xfe\n", b"{}"));
        script.extend(message("good", b"", b"{}"));
        stream.write_all(&script).await.unwrap();
        // The next frame the client writes is the good message's ACK: no NACK before it.
        read_frame(&mut stream, &mut buffer).await
    });
    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = vec![("127.0.0.1".into(), port)];
    config.stomp_heartbeats = (Duration::ZERO, Duration::ZERO);
    let transport = StompTransport::new(StompSettings::from(&config)).unwrap();
    let mut deliveries = transport
        .subscribe(Subscription {
            destination: "/amq/queue/DLQ.x".into(),
            id: "s1".into(),
            ack: AckMode::ClientIndividual,
            headers: vec![("prefetch-count".into(), "5".into())],
        })
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), deliveries.recv())
        .await
        .expect("the good message in time")
        .expect("a delivery");
    assert_eq!(delivery.ack_id, "good");
    // Past the moment an undecodable message would be rejected.
    tokio::time::sleep(Duration::from_millis(500)).await;
    transport.ack(&delivery).await.unwrap();
    let (command, headers) = tokio::time::timeout(Duration::from_secs(10), broker)
        .await
        .expect("the scripted broker finished")
        .unwrap();
    assert_eq!(command, "ACK");
    assert_eq!(header(&headers, "id"), Some("good"));
}
