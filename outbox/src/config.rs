//! Settings, read from `OUTBOX_<NAME>` environment variables with the defaults of
//! django-outbox-pattern. A malformed value is an error that names the variable.

use std::str::FromStr;

use crate::Error;

/// Days a row is kept: the retention of sent rows and the default lifetime (`expires_at`) of an
/// unsent one. Variable `OUTBOX_DAYS_TO_KEEP_DATA`.
pub const DAYS_TO_KEEP_DATA: Setting<u32> = Setting {
    variable: "OUTBOX_DAYS_TO_KEEP_DATA",
    default: 30,
};

/// A setting: its environment variable and its default.
#[derive(Debug, Clone, Copy)]
pub struct Setting<T> {
    /// The environment variable that overrides the default.
    pub variable: &'static str,
    /// The value when the variable is not set.
    pub default: T,
}

impl<T: FromStr + Copy> Setting<T>
where
    T::Err: std::fmt::Display,
{
    /// The value from the environment, or the default when the variable is unset.
    pub fn from_env(&self) -> Result<T, Error> {
        match std::env::var(self.variable) {
            Ok(value) => value.trim().parse().map_err(|e: T::Err| Error::Config {
                variable: self.variable,
                value,
                reason: e.to_string(),
            }),
            Err(std::env::VarError::NotPresent) => Ok(self.default),
            Err(std::env::VarError::NotUnicode(value)) => Err(Error::Config {
                variable: self.variable,
                value: value.to_string_lossy().into_owned(),
                reason: "not valid UTF-8".into(),
            }),
        }
    }
}

/// How long a newly written outbox row may wait to be sent (`added` to `expires_at`), from
/// [`DAYS_TO_KEEP_DATA`].
pub(crate) fn row_lifetime() -> Result<chrono::Duration, Error> {
    Ok(chrono::Duration::days(i64::from(
        DAYS_TO_KEEP_DATA.from_env()?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_value_names_its_variable() {
        let setting = Setting::<u32> {
            variable: "OUTBOX_TEST_SETTING_MALFORMED",
            default: 3,
        };
        // SAFETY: this variable is read by this test only.
        unsafe { std::env::set_var(setting.variable, "thirty") };
        let err = setting.from_env().unwrap_err().to_string();
        assert!(err.contains("OUTBOX_TEST_SETTING_MALFORMED"), "{err}");
        assert!(err.contains("thirty"), "{err}");
    }

    #[test]
    fn an_unset_variable_gives_the_default() {
        let setting = Setting::<u32> {
            variable: "OUTBOX_TEST_SETTING_UNSET",
            default: 3,
        };
        assert_eq!(setting.from_env().unwrap(), 3);
    }
}
