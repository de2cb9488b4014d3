//! The `Migrator` that `sea-orm-cli migrate` runs for the outbox tables alone.
//!
//! A service that already has a migration crate does not need this one: it puts
//! [`outbox::migration::migrations()`] at the head of its own `Migrator`'s list instead (see that
//! function's docs for the form that survives `sea-orm-cli migrate generate`). This crate serves a
//! service whose schema is managed elsewhere, and the outbox's own CI.
//!
//! ```sh
//! sea-orm-cli migrate up -d migration
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/app cargo run -p outbox-migration -- up
//! ```

pub use sea_orm_migration::prelude::*;

/// Applies and reverts the outbox's migrations, recorded in `seaql_migrations` under their
/// `outbox_m…` names.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        outbox::migration::migrations()
    }
}
