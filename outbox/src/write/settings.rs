//! The write path's process-wide settings, set in one explicit place: the lifetime of the rows
//! it inserts and the hook that adds headers to them. Nothing else changes them: building a
//! `Producer` or a `Consumer` does not.
//!
//! A save has no settings in hand (SeaORM's hooks receive only a connection), so these are
//! process-wide. Without [`WriteSettings::install`], the row lifetime comes from
//! `OUTBOX_DAYS_TO_KEEP_DATA` (read once), else its default, and no hook adds headers.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::config::OutboxConfig;
use crate::error::Error;
use crate::headers::{self, HeaderContext, HeaderHook};

/// `days_to_keep_data` last installed; 0: none yet.
static INSTALLED_DAYS_TO_KEEP_DATA: AtomicU32 = AtomicU32::new(0);

/// `OUTBOX_DAYS_TO_KEEP_DATA` as read (once) from the environment, checked as `from_env` would.
static ENV_DAYS_TO_KEEP_DATA: OnceLock<Result<u32, (String, String)>> = OnceLock::new();

/// What the write path needs that a save does not say: how long the rows it writes may wait to
/// be sent (`expires_at`), and a hook that adds headers to each (a tenant, a schema version): the
/// counterpart of django-outbox-pattern's `DEFAULT_GENERATE_HEADERS`. Install it once at start,
/// before the first save.
///
/// ```
/// use outbox::write::WriteSettings;
///
/// # fn demo() -> Result<(), outbox::Error> {
/// let settings = outbox::OutboxConfig::from_env()?;
/// WriteSettings::from_config(&settings)
///     .header_hook(|row| vec![("x-origin".into(), format!("billing:{}", row.entity))])
///     .install()?;
/// # Ok(()) }
/// ```
#[must_use]
#[derive(Default)]
pub struct WriteSettings {
    days_to_keep_data: Option<u32>,
    header_hook: Option<Box<HeaderHook>>,
}

impl std::fmt::Debug for WriteSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteSettings")
            .field("days_to_keep_data", &self.days_to_keep_data)
            .field("header_hook", &self.header_hook.as_ref().map(|_| "set"))
            .finish()
    }
}

impl WriteSettings {
    /// Nothing set: installing it changes nothing.
    pub fn new() -> WriteSettings {
        WriteSettings::default()
    }

    /// The row lifetime of `config` (`days_to_keep_data`, `OUTBOX_DAYS_TO_KEEP_DATA`).
    pub fn from_config(config: &OutboxConfig) -> WriteSettings {
        WriteSettings::new().days_to_keep_data(config.days_to_keep_data)
    }

    /// Rows written may wait `days` days to be sent (then retention marks them FAILED).
    pub fn days_to_keep_data(mut self, days: u32) -> WriteSettings {
        self.days_to_keep_data = Some(days);
        self
    }

    /// Adds the hook's headers to every outbox row the process writes. Headers set on a
    /// [`crate::write::Message`] win over the hook's, and the generated `dop-*` headers win over both
    /// (except `dop-correlation-id`). A process has one hook: installing a second is refused.
    pub fn header_hook(
        mut self,
        hook: impl Fn(&HeaderContext<'_>) -> Vec<(String, String)> + Send + Sync + 'static,
    ) -> WriteSettings {
        self.header_hook = Some(Box::new(hook));
        self
    }

    /// Makes these the process's. The row lifetime can be installed again (the last one wins);
    /// the header hook only once. A refused setting changes nothing.
    pub fn install(self) -> Result<(), Error> {
        if let Some(days) = self.days_to_keep_data {
            let check = OutboxConfig {
                days_to_keep_data: days,
                ..OutboxConfig::default()
            };
            check.validate()?;
        }
        if let Some(hook) = self.header_hook
            && !headers::set_hook_once(hook)
        {
            return Err(Error::Config {
                variable: "WriteSettings::header_hook".into(),
                value: "a second hook".into(),
                reason: "a header hook is installed already: a process has one".into(),
            });
        }
        if let Some(days) = self.days_to_keep_data {
            INSTALLED_DAYS_TO_KEEP_DATA.store(days, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// How long a newly written outbox row may wait to be sent (`added` to `expires_at`):
/// `days_to_keep_data` as installed, else of `OUTBOX_DAYS_TO_KEEP_DATA`, else the default.
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
    match OutboxConfig::from_vars([("OUTBOX_DAYS_TO_KEEP_DATA".to_owned(), raw.clone())]) {
        Ok(config) => Ok(config.days_to_keep_data),
        Err(Error::Config { value, reason, .. }) => Err((value, reason)),
        Err(other) => Err((raw, other.to_string())),
    }
}
