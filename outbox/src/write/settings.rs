//! The write path's process-wide settings: the lifetime of the rows it inserts.

use crate::error::Error;

/// How long a newly written outbox row may wait to be sent (`added` to `expires_at`).
pub(crate) fn row_lifetime() -> Result<chrono::Duration, Error> {
    crate::config::row_lifetime()
}
