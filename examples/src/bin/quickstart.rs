//! The five-minute start: an embedded SQLite database, an entity with `#[publish]`, the outbox rows
//! its saves write, the relay sending them to an in-memory broker, and a consumer processing them
//! once each. Nothing to install or configure.
//!
//! ```sh
//! cargo run -p outbox-examples --bin quickstart
//! ```

use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use sea_orm::ActiveValue::Set;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, EntityTrait, QueryOrder, Schema};

mod order {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "orders")]
    #[outbox::publish(destination = "/topic/orders", version = "v1", fields(customer, total))]
    #[outbox::publish(destination = "/topic/billing", serializer = billing)]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub customer: String,
        pub total: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    fn billing(order: &Model) -> serde_json::Value {
        serde_json::json!({ "order": order.id, "amount_cents": order.total })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // An in-memory SQLite database lives as long as its one connection.
    let mut options = ConnectOptions::new("sqlite::memory:");
    options
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None::<Duration>)
        .max_lifetime(None::<Duration>)
        .sqlx_logging(false);
    let db = Database::connect(options).await?;

    // The outbox tables, then the service's own.
    Migrator::up(&db, None).await?;
    let schema = Schema::new(db.get_database_backend());
    db.execute(&schema.create_table_from_entity(order::Entity))
        .await?;

    // Each save commits the order and its outbox rows in one transaction.
    let order = outbox::insert(
        &db,
        order::ActiveModel {
            customer: Set("ada".into()),
            total: Set(4200),
            ..Default::default()
        },
    )
    .await?;
    let mut paid: order::ActiveModel = order.into();
    paid.total = Set(3900);
    outbox::with_correlation_id("checkout-42", outbox::update(&db, paid)).await?;

    // Without an annotated entity, an explicit row in the caller's transaction.
    outbox::transaction(&db, |txn| {
        Box::pin(async move {
            outbox::enqueue(
                txn,
                "/topic/newsletter",
                &serde_json::json!({"email": "ada@example.com"}),
            )
            .await?;
            Ok::<_, outbox::Error>(())
        })
    })
    .await?;

    let rows = outbox::Published::find()
        .order_by_asc(outbox::tables::published::Column::Added)
        .all(&db)
        .await?;
    println!("{} rows in the outbox, waiting for the relay:", rows.len());
    for row in rows {
        println!();
        println!("  {} {:?}  {}", row.id, row.status, row.destination);
        println!("  body    {}", row.body);
        println!(
            "  headers {}",
            serde_json::to_string(&row.headers).unwrap_or_default()
        );
    }

    // A consumer of the orders, its queues declared first: a broker drops a message sent to a
    // topic that no queue is bound to.
    let broker = outbox::transport::MemoryTransport::new();
    let consumer = outbox::Consumer::builder(db.clone())
        .destination("/topic/orders.v1")
        .queue("quickstart.orders")
        .config(outbox::OutboxConfig::default())
        .transport(broker.new_connection())
        .build()?;
    consumer.declare().await?;

    // The relay, here sending to the in-memory broker (in production: RabbitMQ over STOMP).
    let relay = outbox::Producer::builder(db.clone())
        .config(outbox::OutboxConfig::default())
        .transport(broker.clone())
        .build()?;
    let report = relay.drain().await?;
    println!();
    println!("The relay sent {} messages:", report.sent);
    for message in broker.sent() {
        println!(
            "  SEND {}  {}",
            message.destination,
            String::from_utf8_lossy(&message.body)
        );
    }

    // The consumer processes each order message once, in a transaction with its inbox row.
    println!();
    let queue_drained = async {
        while broker.queue_len("quickstart.orders") + broker.unacked_len("quickstart.orders") > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    consumer
        .run_until(
            |payload: outbox::Payload| async move {
                println!(
                    "  consumed {} (message {})",
                    payload.body(),
                    payload.message_id().unwrap_or("-")
                );
                payload.save();
                Ok::<_, outbox::Error>(())
            },
            queue_drained,
        )
        .await?;
    let inbox = outbox::Received::find().all(&db).await?;
    println!(
        "{} rows in the inbox: each message processed once.",
        inbox.len()
    );
    Ok(())
}
