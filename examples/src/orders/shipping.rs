//! Shipping: the consumer of `/topic/orders.v1`, which ships each order once.
//!
//! The consumer runs [`ship`] once per message in effect: it opens a transaction, records the
//! message in the inbox (the `received` table), runs the callback in that transaction, commits,
//! and only then acknowledges the message. A redelivered message finds itself in the inbox and is
//! acknowledged without running the callback again; an error rolls everything back and the
//! message goes to the dead-letter queue `DLQ.shipping.orders.v1`.
//!
//! The inbox recognises a message, not an order: an order that changes publishes a new message.
//! So `ship` also looks for the order's shipment, and ships only orders it has not shipped.

use sea_orm::ActiveValue::Set;
use sea_orm::{ActiveModelTrait, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use serde::Deserialize;

use super::shipment;

/// The destination shipping consumes (`/topic/orders` of version `v1`).
pub const ORDERS_DESTINATION: &str = "/topic/orders.v1";

/// Shipping's own queue on that destination. Each consuming service names its own queue, so that
/// each gets every message.
pub const SHIPPING_QUEUE: &str = "shipping.orders.v1";

/// What shipping reads of an order message (it ignores the other fields).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OrderMessage {
    /// The order's id.
    pub id: i32,
    /// Who ordered.
    pub customer: String,
}

/// The consumer of shipping's queue, to finish with settings (`.config(..)`), a transport in tests
/// (`.transport(..)`), and `.build()`.
pub fn consumer(db: DatabaseConnection) -> outbox::consumer::ConsumerBuilder {
    outbox::Consumer::builder(db)
        .destination(ORDERS_DESTINATION)
        .queue(SHIPPING_QUEUE)
}

/// The consumer's callback: ships the order of the message, unless it was shipped already.
///
/// Everything is written through [`outbox::Payload::db`], the transaction that holds the
/// message's inbox row. A body that is not an order is an error: the message is dead-lettered.
pub async fn ship(payload: outbox::Payload) -> Result<(), outbox::Error> {
    let order: OrderMessage = payload.json()?;
    let txn = payload.db();
    let shipped = shipment::Entity::find()
        .filter(shipment::Column::OrderId.eq(order.id))
        .one(txn)
        .await?;
    match shipped {
        Some(shipment) => {
            tracing::info!(order_id = order.id, shipped_at = %shipment.shipped_at, "order already shipped");
        }
        None => {
            shipment::ActiveModel {
                order_id: Set(order.id),
                customer: Set(order.customer.clone()),
                shipped_at: Set(chrono::Utc::now()),
                ..Default::default()
            }
            .insert(txn)
            .await?;
            tracing::info!(order_id = order.id, customer = %order.customer, "order shipped");
        }
    }
    payload.save();
    Ok(())
}
