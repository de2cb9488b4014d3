//! The `outbox_housekeeping` table: one row per retention job, whose `last_run_at` says which
//! process took the job's turn last.

#[derive(sea_orm::DeriveIden, Clone, Copy)]
pub(crate) enum OutboxHousekeeping {
    Table,
    Task,
    LastRunAt,
}

pub(crate) use OutboxHousekeeping::{LastRunAt, Table, Task};
