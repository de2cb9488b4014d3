//! The orders service's `Migrator`: the outbox's tables first, then the service's own.
//!
//! This is the form to copy into a service. The outbox's migrations are added outside the list
//! of the service's own, because `sea-orm-cli migrate generate` rewrites that list from the
//! `mod m…;` declarations of this file alone; `own_migrations` ends the file, where `generate`
//! goes on appending.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/orders sea-orm-cli migrate up -d examples/orders-migration
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/orders cargo run -p orders-migration -- up
//! sea-orm-cli migrate generate add_order_notes -d examples/orders-migration
//! ```

pub use sea_orm_migration::prelude::*;

mod m20261126_000001_create_orders_and_payments;
mod m20261126_000002_create_shipments;

/// The outbox's migrations (`outbox_m…`), then the service's (`m…`), oldest first.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut migrations = outbox::migration::migrations();
        migrations.extend(own_migrations());
        migrations
    }
}

// `sea-orm-cli migrate generate` appends here. Keep this function last in the file.
fn own_migrations() -> Vec<Box<dyn MigrationTrait>> {
    vec![
        Box::new(m20261126_000001_create_orders_and_payments::Migration),
        Box::new(m20261126_000002_create_shipments::Migration),
    ]
}
