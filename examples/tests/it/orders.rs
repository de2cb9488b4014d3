//! How the orders service tests its use cases with the outbox's testing kit, without servers: a
//! SQLite file with the service's migrations, the in-memory broker
//! ([`outbox::transport::MemoryTransport`], which behaves as RabbitMQ's STOMP plugin does), the
//! relay run until the outbox is empty ([`outbox::Producer::drain`]), and the consumer run until
//! its queue is empty.
//!
//! A publishing test calls the use case, relays, and asserts on what the broker received
//! ([`MemoryTransport::sent`]). A consuming test sends a message to the broker as another
//! service would, runs the consumer, and asserts on the rows its callback wrote.

use std::path::PathBuf;
use std::time::Duration;

use outbox::producer::RoundReport;
use outbox::tables::published::Status;
use outbox::transport::{MemoryTransport, Outgoing};
use outbox::{Consumer, OutboxConfig, Published, Received};
use outbox_examples::orders::shipping::{self, ORDERS_DESTINATION, SHIPPING_QUEUE};
use outbox_examples::orders::{database, order, place_order, shipment};
use sea_orm::ActiveValue::Set;
use sea_orm::{DatabaseConnection, EntityTrait, QueryOrder};
use serde_json::{Value, json};

/// A fresh SQLite file with the service's migrations applied (the outbox's tables and its own),
/// removed when dropped.
struct TestDb {
    db: DatabaseConnection,
    file: PathBuf,
}

impl TestDb {
    async fn new() -> TestDb {
        let file = std::env::temp_dir().join(format!("orders_t_{}.db", uuid::Uuid::new_v4()));
        let db = database::open(&format!("sqlite://{}?mode=rwc", file.display()))
            .await
            .expect("open the test database");
        TestDb { db, file }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.file.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Relays every outbox row to `broker`, as the service's relay does, until none is left.
async fn relay_all(db: &DatabaseConnection, broker: &MemoryTransport) -> RoundReport {
    outbox::testing::drain(db, broker)
        .await
        .expect("relay the outbox")
}

/// Shipping's consumer on `broker`, its queues declared (a message sent to a topic before any
/// queue is bound to it is dropped, by RabbitMQ and by the in-memory broker alike).
async fn shipping_consumer(db: &DatabaseConnection, broker: &MemoryTransport) -> Consumer {
    let consumer = shipping::consumer(db.clone())
        .config(OutboxConfig::default())
        // A connection of its own: the consumer disconnects while it starts and stops.
        .transport(broker.new_connection())
        .build()
        .expect("a consumer");
    consumer.declare().await.expect("declare shipping's queues");
    consumer
}

/// Runs shipping until every message in its queue is processed: acknowledged, or dead-lettered.
async fn ship_all(consumer: &Consumer, broker: &MemoryTransport) {
    let queue_empty = async {
        while broker.queue_len(SHIPPING_QUEUE) + broker.unacked_len(SHIPPING_QUEUE) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(
        Duration::from_secs(20),
        consumer.run_until(shipping::ship, queue_empty),
    )
    .await
    .expect("shipping processes its queue in time")
    .expect("the consumer stops cleanly");
}

fn body(message: &Outgoing) -> Value {
    message.json().expect("a JSON body")
}

fn sent_to<'a>(sent: &'a [Outgoing], destination: &str) -> Vec<&'a Outgoing> {
    sent.iter()
        .filter(|message| message.destination == destination)
        .collect()
}

async fn shipments(db: &DatabaseConnection) -> Vec<(i32, String)> {
    shipment::Entity::find()
        .order_by_asc(shipment::Column::OrderId)
        .all(db)
        .await
        .expect("read the shipments")
        .into_iter()
        .map(|shipment| (shipment.order_id, shipment.customer))
        .collect()
}

// ------------------------------------------------------------------------------- publishing

#[tokio::test]
async fn placing_an_order_publishes_the_order_and_its_payment() {
    let test = TestDb::new().await;
    let broker = MemoryTransport::new();

    let order = outbox::with_correlation_id("checkout-42", place_order(&test.db, "ada", 4200))
        .await
        .expect("place an order");
    let report = relay_all(&test.db, &broker).await;

    assert_eq!(report.sent, 2);
    let sent = broker.sent();
    let orders = sent_to(&sent, "/topic/orders.v1");
    let payments = sent_to(&sent, "/topic/payments");
    assert_eq!((orders.len(), payments.len(), sent.len()), (1, 1, 2));
    assert_eq!(
        body(orders[0]),
        json!({"id": order.id, "customer": "ada", "total_cents": 4200})
    );
    let payment_body = body(payments[0]);
    assert_eq!(payment_body["order_id"], order.id);
    assert_eq!(payment_body["amount_cents"], 4200);

    // The headers django-outbox-pattern consumers read, and the frame's own.
    for (message, destination) in [
        (orders[0], "/topic/orders.v1"),
        (payments[0], "/topic/payments"),
    ] {
        let msg_id = message.header("dop-msg-id").expect("dop-msg-id");
        assert!(uuid::Uuid::parse_str(msg_id).is_ok(), "the outbox row's id");
        assert_eq!(message.header("dop-msg-destination"), Some(destination));
        assert_eq!(message.header("dop-msg-type"), Some("Published"));
        assert_eq!(message.header("dop-correlation-id"), Some("checkout-42"));
        assert!(message.header("dop-msg-sent-time").is_some());
        assert_eq!(message.header("persistent"), Some("true"));
        assert_eq!(message.header("content-type"), Some("application/json"));
    }

    // Sent, so marked SUCCEEDED in the outbox.
    let rows = Published::find().all(&test.db).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|row| row.status == Status::Succeeded));
}

#[tokio::test]
async fn changing_an_order_publishes_it_again_and_the_payment_not() {
    let test = TestDb::new().await;
    let broker = MemoryTransport::new();
    let order = place_order(&test.db, "grace", 990).await.unwrap();
    relay_all(&test.db, &broker).await;
    broker.clear_sent();

    let mut changed: order::ActiveModel = order.into();
    changed.total_cents = Set(1290);
    let order = outbox::update(&test.db, changed).await.unwrap();
    relay_all(&test.db, &broker).await;

    let sent = broker.sent();
    assert_eq!(sent.len(), 1, "payments publish on insert only");
    assert_eq!(sent[0].destination, "/topic/orders.v1");
    assert_eq!(
        body(&sent[0]),
        json!({"id": order.id, "customer": "grace", "total_cents": 1290})
    );
}

#[tokio::test]
async fn nothing_is_published_before_the_relay_runs() {
    let test = TestDb::new().await;
    let broker = MemoryTransport::new();
    place_order(&test.db, "linus", 100).await.unwrap();

    assert!(broker.sent().is_empty());
    let waiting = Published::find().all(&test.db).await.unwrap();
    assert_eq!(waiting.len(), 2);
    assert!(waiting.iter().all(|row| row.status == Status::Schedule));
}

// -------------------------------------------------------------------------------- consuming

#[tokio::test]
async fn shipping_ships_an_order_once_even_when_its_message_comes_twice() {
    let test = TestDb::new().await;
    let broker = MemoryTransport::new();
    let consumer = shipping_consumer(&test.db, &broker).await;
    // As selling's relay would send it; twice, as after an acknowledgement lost on the way.
    for _ in 0..2 {
        outbox::send::send_with(
            &broker,
            ORDERS_DESTINATION,
            &json!({"id": 7, "customer": "grace", "total_cents": 990}),
            &[("dop-msg-id", "2b0f6e0e-order-7")],
        )
        .await
        .unwrap();
    }

    ship_all(&consumer, &broker).await;

    assert_eq!(shipments(&test.db).await, [(7, "grace".to_owned())]);
    let inbox = Received::find().all(&test.db).await.unwrap();
    assert_eq!(inbox.len(), 1, "one inbox row per message id");
    assert_eq!(inbox[0].queue, SHIPPING_QUEUE);
    assert_eq!(broker.queue_len(&format!("DLQ.{SHIPPING_QUEUE}")), 0);
}

#[tokio::test]
async fn a_message_that_is_not_an_order_is_dead_lettered_and_ships_nothing() {
    let test = TestDb::new().await;
    let broker = MemoryTransport::new();
    let consumer = shipping_consumer(&test.db, &broker).await;
    outbox::send::send_with(
        &broker,
        ORDERS_DESTINATION,
        &json!({"sku": "A-1"}),
        &[("dop-msg-id", "not-an-order")],
    )
    .await
    .unwrap();

    ship_all(&consumer, &broker).await;

    assert!(shipments(&test.db).await.is_empty());
    let dead = broker.queue_messages(&format!("DLQ.{SHIPPING_QUEUE}"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].header("dop-msg-id"), Some("not-an-order"));
    assert!(
        Received::find().all(&test.db).await.unwrap().is_empty(),
        "the inbox row is rolled back with the rest"
    );
}

// ------------------------------------------------------------------------------- end to end

#[tokio::test]
async fn orders_placed_are_relayed_and_shipped_once_each() {
    let test = TestDb::new().await;
    let broker = MemoryTransport::new();
    let consumer = shipping_consumer(&test.db, &broker).await;
    let first = place_order(&test.db, "ada", 1000).await.unwrap();
    let second = place_order(&test.db, "barbara", 2500).await.unwrap();
    relay_all(&test.db, &broker).await;
    ship_all(&consumer, &broker).await;

    // A change after shipping publishes again; shipping does not ship the order twice.
    let mut changed: order::ActiveModel = first.clone().into();
    changed.total_cents = Set(1100);
    outbox::update(&test.db, changed).await.unwrap();
    relay_all(&test.db, &broker).await;
    ship_all(&consumer, &broker).await;

    assert_eq!(
        shipments(&test.db).await,
        [
            (first.id, "ada".to_owned()),
            (second.id, "barbara".to_owned())
        ]
    );
    assert_eq!(Received::find().all(&test.db).await.unwrap().len(), 3);
}
