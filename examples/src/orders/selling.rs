//! Selling's use case: placing an order.

use sea_orm::ActiveValue::Set;
use sea_orm::{ActiveModelTrait, DatabaseConnection};

use super::{order, payment};

/// Places an order for `customer` and takes its payment, in one transaction: the two rows and
/// their two outbox messages (`/topic/orders.v1`, `/topic/payments`) commit together, or nothing
/// does.
///
/// Inside `outbox::with_correlation_id(id, ..)` both messages carry `dop-correlation-id: id`.
pub async fn place_order(
    db: &DatabaseConnection,
    customer: &str,
    total_cents: i64,
) -> Result<order::Model, outbox::Error> {
    let customer = customer.to_owned();
    outbox::transaction(db, |txn| {
        Box::pin(async move {
            let order = order::ActiveModel {
                customer: Set(customer),
                total_cents: Set(total_cents),
                ..Default::default()
            }
            .insert(txn)
            .await?;
            payment::ActiveModel {
                order_id: Set(order.id),
                amount_cents: Set(order.total_cents),
                ..Default::default()
            }
            .insert(txn)
            .await?;
            tracing::info!(order_id = order.id, customer = %order.customer, total_cents, "order placed");
            Ok(order)
        })
    })
    .await
}
