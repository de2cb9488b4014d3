//! The process-wide row lifetime: how long a row the write path inserts may wait to be sent,
//! from the settings last [installed](OutboxConfig::install), else `OUTBOX_DAYS_TO_KEEP_DATA`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use super::OutboxConfig;
use crate::error::Error;

impl OutboxConfig {
    /// Makes these settings the process's for the paths that have no `OutboxConfig` in hand:
    /// today the lifetime of the rows the write path inserts (`expires_at`, from
    /// `days_to_keep_data`). The builders of [`crate::producer::Producer`] and [`crate::consumer::Consumer`] call
    /// it; a service that only writes (its relay runs elsewhere) and builds its settings in code
    /// calls it once at start. Without it the write path reads `OUTBOX_DAYS_TO_KEEP_DATA` (once).
    /// With several settings in one process, the last installed wins.
    pub fn install(&self) -> Result<(), Error> {
        self.validate()?;
        INSTALLED_DAYS_TO_KEEP_DATA.store(self.days_to_keep_data, Ordering::Relaxed);
        Ok(())
    }
}

/// `days_to_keep_data` of the settings last [installed](OutboxConfig::install); 0: none yet.
static INSTALLED_DAYS_TO_KEEP_DATA: AtomicU32 = AtomicU32::new(0);

/// `OUTBOX_DAYS_TO_KEEP_DATA` as read (once) from the environment, checked as `from_env` would.
static ENV_DAYS_TO_KEEP_DATA: OnceLock<Result<u32, (String, String)>> = OnceLock::new();

/// How long a newly written outbox row may wait to be sent (`added` to `expires_at`):
/// `days_to_keep_data` of the installed settings, else of `OUTBOX_DAYS_TO_KEEP_DATA`, else the
/// default.
pub(crate) fn row_lifetime() -> Result<chrono::Duration, Error> {
    let installed = INSTALLED_DAYS_TO_KEEP_DATA.load(Ordering::Relaxed);
    let days = if installed > 0 {
        installed
    } else {
        ENV_DAYS_TO_KEEP_DATA
            .get_or_init(days_to_keep_data_from_env)
            .clone()
            .map_err(|(value, reason)| Error::Config {
                variable: "OUTBOX_DAYS_TO_KEEP_DATA".into(),
                value,
                reason,
            })?
    };
    Ok(chrono::Duration::days(i64::from(days)))
}

fn days_to_keep_data_from_env() -> Result<u32, (String, String)> {
    let Ok(raw) = std::env::var("OUTBOX_DAYS_TO_KEEP_DATA") else {
        return Ok(OutboxConfig::default().days_to_keep_data);
    };
    let mut config = OutboxConfig::default();
    let checked = config
        .set("OUTBOX_DAYS_TO_KEEP_DATA", &raw)
        .and_then(|()| config.validate());
    match checked {
        Ok(()) => Ok(config.days_to_keep_data),
        Err(Error::Config { value, reason, .. }) => Err((value, reason)),
        Err(other) => Err((raw, other.to_string())),
    }
}
