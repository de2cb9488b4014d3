//! A RabbitMQ queue with a length limit that rejects publishes beyond it (`x-max-length`,
//! `x-overflow: reject-publish`), declared over AMQP 0-9-1 because RabbitMQ's STOMP plugin drops
//! `x-overflow`; bound to `amq.topic` with its own name as the key, so that `/topic/<name>`
//! reaches it; deleted when dropped.

use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties};

use crate::settings::{RABBITMQ_AMQP, amqp_url};
use crate::stomp_peer::{QueueCleanup, unique};

/// A durable queue of RabbitMQ limited to `max_length` ready messages, rejecting publishes
/// beyond (see the module docs).
pub struct LimitedQueue {
    /// The queue's name, unique to the test.
    pub name: String,
    _cleanup: QueueCleanup,
}

impl LimitedQueue {
    /// Declares `<prefix>_<uuid>` limited to `max_length` ready messages, bound to `amq.topic`
    /// with its name as the key.
    pub async fn declare(prefix: &str, max_length: u32) -> LimitedQueue {
        let name = unique(prefix);
        let cleanup = QueueCleanup(vec![name.clone()]);
        let url = amqp_url(RABBITMQ_AMQP.parse().expect("an address"));
        let connection = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("AMQP connection to RabbitMQ");
        let channel = connection.create_channel().await.expect("AMQP channel");
        let mut arguments = FieldTable::default();
        arguments.insert("x-max-length".into(), AMQPValue::LongUInt(max_length));
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString(LongString::from("reject-publish")),
        );
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .expect("queue.declare with x-max-length and x-overflow");
        channel
            .queue_bind(
                name.as_str().into(),
                "amq.topic".into(),
                name.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("queue.bind to amq.topic");
        let _ = connection.close(200, "declared".into()).await;
        LimitedQueue {
            name,
            _cleanup: cleanup,
        }
    }

    /// `/topic/<name>`: routed to the queue through `amq.topic`, declaring nothing.
    pub fn topic(&self) -> String {
        format!("/topic/{}", self.name)
    }

    /// `/amq/queue/<name>`: the queue itself, declaring nothing.
    pub fn queue_destination(&self) -> String {
        format!("/amq/queue/{}", self.name)
    }
}
