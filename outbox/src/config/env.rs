//! Reading the settings from `OUTBOX_*` environment variables: each variable's parser, and
//! the error that names a malformed or unknown variable.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::secret::{redact_credentials, shown_value};
use super::{OutboxConfig, Secret};
use crate::error::Error;

/// Environment variables with this prefix are not settings (test and benchmark knobs).
const NOT_SETTINGS_PREFIX: &str = "OUTBOX_TEST_";

impl OutboxConfig {
    /// The defaults, overridden by the `OUTBOX_*` environment variables.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_vars(
            std::env::vars_os().filter_map(|(k, v)| {
                Some((k.into_string().ok()?, v.to_string_lossy().into_owned()))
            }),
        )
    }

    /// The defaults, overridden by `OUTBOX_*` pairs (for tests and for other configuration sources).
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, Error> {
        let mut config = Self::default();
        for (name, value) in vars {
            if !name.starts_with("OUTBOX_") || name.starts_with(NOT_SETTINGS_PREFIX) {
                continue;
            }
            config.set(&name, &value)?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Sets the one setting that the variable `name` holds, from its raw value.
    pub(super) fn set(&mut self, name: &str, raw: &str) -> Result<(), Error> {
        let bad = |reason: String| Error::Config {
            variable: name.to_owned(),
            value: shown_value(name, raw),
            reason,
        };
        let value = raw.trim();
        match name {
            "OUTBOX_BROKER_URL" => self.broker_url = parse_broker_urls(value).map_err(bad)?,
            "OUTBOX_UNROUTABLE" => self.unroutable = value.parse().map_err(bad)?,
            "OUTBOX_STOMP_HOST_AND_PORTS" => {
                self.stomp_host_and_ports = parse_hosts(value).map_err(bad)?
            }
            "OUTBOX_STOMP_VHOST" => self.stomp_vhost = value.to_owned(),
            "OUTBOX_STOMP_USERNAME" => self.stomp_username = value.to_owned(),
            "OUTBOX_STOMP_PASSCODE" => self.stomp_passcode = Secret::new(raw),
            "OUTBOX_STOMP_USE_SSL" => self.stomp_use_ssl = parse_bool(value).map_err(bad)?,
            "OUTBOX_STOMP_CA_CERTS" => self.stomp_ca_certs = parse_path(value),
            "OUTBOX_STOMP_CERT_FILE" => self.stomp_cert_file = parse_path(value),
            "OUTBOX_STOMP_KEY_FILE" => self.stomp_key_file = parse_path(value),
            "OUTBOX_STOMP_TLS_SERVER_NAME" => {
                self.stomp_tls_server_name = (!value.is_empty()).then(|| value.to_owned())
            }
            "OUTBOX_STOMP_TLS_VERIFY_HOSTNAME" => {
                self.stomp_tls_verify_hostname = parse_bool(value).map_err(bad)?
            }
            "OUTBOX_STOMP_HEARTBEATS" => {
                self.stomp_heartbeats = parse_heartbeats(value).map_err(bad)?
            }
            "OUTBOX_MAXIMUM_BACKOFF" => self.maximum_backoff = parse_seconds(value).map_err(bad)?,
            "OUTBOX_RECEIPT_TIMEOUT" => self.receipt_timeout = parse_seconds(value).map_err(bad)?,
            "OUTBOX_STOMP_MAX_FRAME_SIZE" => {
                self.stomp_max_frame_size = parse_number(value).map_err(bad)?
            }
            "OUTBOX_MAXIMUM_RETRY_ATTEMPTS" => {
                self.maximum_retry_attempts = parse_number(value).map_err(bad)?
            }
            "OUTBOX_PAUSE_FOR_RETRY" => self.pause_for_retry = parse_seconds(value).map_err(bad)?,
            "OUTBOX_WAIT_RETRY" => self.wait_retry = parse_seconds(value).map_err(bad)?,
            "OUTBOX_PUBLISHED_CHUNK_SIZE" => {
                self.published_chunk_size = parse_number(value).map_err(bad)?
            }
            "OUTBOX_RELAY_BATCHES_IN_FLIGHT" => {
                self.relay_batches_in_flight = parse_number(value).map_err(bad)?
            }
            "OUTBOX_PRODUCER_WAITING_TIME" => {
                self.producer_waiting_time = parse_seconds(value).map_err(bad)?
            }
            "OUTBOX_PRODUCER_LEASE" => self.producer_lease = parse_seconds(value).map_err(bad)?,
            "OUTBOX_DAYS_TO_KEEP_DATA" => {
                self.days_to_keep_data = parse_number(value).map_err(bad)?
            }
            "OUTBOX_REMOVE_DATA_CACHE_TTL" => {
                self.remove_data_cache_ttl = parse_seconds(value).map_err(bad)?
            }
            "OUTBOX_STOMP_QUEUE_HEADERS" => {
                self.stomp_queue_headers = parse_headers(value).map_err(bad)?
            }
            "OUTBOX_EXCLUSIVE_QUEUE" => self.exclusive_queue = parse_bool(value).map_err(bad)?,
            "OUTBOX_CONSUMER_SHUTDOWN_TIMEOUT" => {
                self.consumer_shutdown_timeout = parse_seconds(value).map_err(bad)?
            }
            "OUTBOX_CONSUMER_MAX_RETRY_ATTEMPTS" => {
                self.consumer_max_retry_attempts = parse_number(value).map_err(bad)?
            }
            "OUTBOX_CONSUMER_RETRY_WAIT" => {
                self.consumer_retry_wait = parse_seconds(value).map_err(bad)?
            }
            "OUTBOX_CONSUMER_CALLBACK_TIMEOUT" => {
                self.consumer_callback_timeout = parse_seconds(value).map_err(bad)?
            }
            "OUTBOX_CONSUMER_GROUP_SIZE" => {
                self.consumer_group_size = parse_number(value).map_err(bad)?
            }
            "OUTBOX_CONSUMER_GROUP_WAIT" => {
                self.consumer_group_wait = parse_seconds(value).map_err(bad)?
            }
            "OUTBOX_DB_STATEMENT_TIMEOUT" => {
                self.db_statement_timeout = parse_seconds(value).map_err(bad)?
            }
            "OUTBOX_DB_LOCK_TIMEOUT" => self.db_lock_timeout = parse_seconds(value).map_err(bad)?,
            _ => {
                return Err(bad(format!(
                    "not an outbox setting (variables starting with {NOT_SETTINGS_PREFIX} are ignored)"
                )));
            }
        }
        Ok(())
    }
}

fn parse_broker_urls(value: &str) -> Result<Vec<Secret>, String> {
    let urls: Vec<Secret> = value
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(Secret::new)
        .collect();
    for url in &urls {
        check_broker_url(url.expose())?;
    }
    Ok(urls)
}

/// The shape of one broker URL: `amqp://` or `amqps://`, with a host. (The transport parses
/// the rest, and says what it refuses, when it is built.)
pub(super) fn check_broker_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("amqps://")
        .or_else(|| url.strip_prefix("amqp://"))
        .ok_or_else(|| {
            format!(
                "`{}` is not an amqp:// or amqps:// URL",
                redact_credentials(url)
            )
        })?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host.is_empty() || host.starts_with(':') {
        return Err(format!("`{}` has no host", redact_credentials(url)));
    }
    Ok(())
}

fn parse_hosts(value: &str) -> Result<Vec<(String, u16)>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (host, port) = entry
                .rsplit_once(':')
                .ok_or_else(|| format!("`{entry}` is not host:port"))?;
            let port = port
                .parse()
                .map_err(|_| format!("`{port}` in `{entry}` is not a port number"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(format!("`{entry}` has no host"));
            }
            Ok((host.to_owned(), port))
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|hosts| {
            if hosts.is_empty() {
                Err("no broker address".into())
            } else {
                Ok(hosts)
            }
        })
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

fn parse_path(value: &str) -> Option<PathBuf> {
    (!value.is_empty()).then(|| PathBuf::from(value))
}

fn parse_number<T: FromStr>(value: &str) -> Result<T, String>
where
    T::Err: fmt::Display,
{
    value
        .parse()
        .map_err(|e: T::Err| format!("not a whole number: {e}"))
}

fn parse_seconds(value: &str) -> Result<Duration, String> {
    let seconds: f64 = value
        .parse()
        .map_err(|_| "expected a number of seconds (fractions allowed)".to_owned())?;
    if seconds.is_finite() && seconds > 0.0 {
        // Beyond what a Duration holds: far beyond any setting's range.
        Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("{seconds} seconds is far beyond the setting's range"))
    } else {
        Duration::try_from_secs_f64(seconds)
            .map_err(|_| "expected a non-negative number of seconds".into())
    }
}

fn parse_heartbeats(value: &str) -> Result<(Duration, Duration), String> {
    let (outgoing, incoming) = value
        .split_once(',')
        .ok_or("expected outgoing,incoming in milliseconds, like 10000,10000")?;
    let ms = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| format!("`{v}` is not a number of milliseconds"))
    };
    Ok((ms(outgoing)?, ms(incoming)?))
}

fn parse_headers(value: &str) -> Result<BTreeMap<String, String>, String> {
    let object: BTreeMap<String, serde_json::Value> = serde_json::from_str(value)
        .map_err(|e| format!("expected a JSON object of header names to values: {e}"))?;
    Ok(object
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect())
}
