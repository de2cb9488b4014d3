//! Settings: [`OutboxConfig`], with the defaults of django-outbox-pattern, read from
//! `OUTBOX_<NAME>` environment variables. A malformed value, or an unknown `OUTBOX_` variable, is
//! an error that names the variable, at start rather than at first use.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::Error;

/// A secret setting (a passcode): kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Every setting of the outbox. `OutboxConfig::default()` has the documented defaults;
/// [`OutboxConfig::from_env`] overrides them from `OUTBOX_<FIELD NAME IN CAPITALS>`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct OutboxConfig {
    /// Broker addresses, tried in order (`OUTBOX_STOMP_HOST_AND_PORTS=host1:61613,host2:61613`).
    pub stomp_host_and_ports: Vec<(String, u16)>,
    /// The virtual host, sent as the CONNECT `host` header. Default `/`.
    pub stomp_vhost: String,
    /// Login. Default `guest`.
    pub stomp_username: String,
    /// Passcode. Default `guest`.
    pub stomp_passcode: Secret,
    /// Connect with TLS. Default false.
    pub stomp_use_ssl: bool,
    /// PEM bundle of the CAs to trust (instead of the public web roots).
    pub stomp_ca_certs: Option<PathBuf>,
    /// PEM client certificate chain, for brokers that ask for one.
    pub stomp_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub stomp_key_file: Option<PathBuf>,
    /// The name the server certificate must carry; default: the host of each address.
    pub stomp_tls_server_name: Option<String>,
    /// Check that the server certificate names the server. Default true.
    pub stomp_tls_verify_hostname: bool,
    /// Heartbeats `(outgoing, incoming)`; zero turns one direction off. Default 10 s each
    /// (`OUTBOX_STOMP_HEARTBEATS=10000,10000`, in milliseconds).
    pub stomp_heartbeats: (Duration, Duration),
    /// The longest pause between reconnection attempts. Default 3600 s.
    pub maximum_backoff: Duration,
    /// How long to wait for the receipts of a batch. Default 10 s.
    pub receipt_timeout: Duration,
    /// Largest frame accepted from the broker, in bytes. Default 64 MiB.
    pub stomp_max_frame_size: usize,

    /// Send attempts per message before it is marked FAILED. Default 50.
    pub maximum_retry_attempts: u32,
    /// Pause after the third failed attempt. Default 240 s.
    pub pause_for_retry: Duration,
    /// Pause after each later failed attempt. Default 60 s.
    pub wait_retry: Duration,
    /// Rows per relay batch. Default 200.
    pub published_chunk_size: u32,
    /// The relay's polling interval when nothing wakes it. Default 1 s (fractions allowed).
    pub producer_waiting_time: Duration,
    /// How long a relay holds the rows it claimed; another relay takes them over after that.
    /// Default 60 s; always longer than `receipt_timeout`.
    pub producer_lease: Duration,
    /// Days a row is kept: sent rows are deleted after this, unsent rows expire (FAILED).
    /// Default 30.
    pub days_to_keep_data: u32,
    /// At most one cleanup of old rows per this period, across all relays. Default 86400 s.
    pub remove_data_cache_ttl: Duration,

    /// SUBSCRIBE headers that declare a consumer's queues. Default
    /// `{"durable": "true", "auto-delete": "false", "prefetch-count": "1"}`
    /// (`OUTBOX_STOMP_QUEUE_HEADERS` takes a JSON object).
    pub stomp_queue_headers: BTreeMap<String, String>,
    /// Declare consumer queues exclusive. Default false.
    pub exclusive_queue: bool,
    /// How long a stopping consumer waits for callbacks in flight. Default 90 s.
    pub consumer_shutdown_timeout: Duration,
    /// Attempts of a callback that failed on a transient database error. Default 3.
    pub consumer_max_retry_attempts: u32,
    /// Base wait between those attempts (2, 4, 6 s with the default 2 s).
    pub consumer_retry_wait: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            stomp_host_and_ports: vec![("127.0.0.1".into(), 61613)],
            stomp_vhost: "/".into(),
            stomp_username: "guest".into(),
            stomp_passcode: Secret::new("guest"),
            stomp_use_ssl: false,
            stomp_ca_certs: None,
            stomp_cert_file: None,
            stomp_key_file: None,
            stomp_tls_server_name: None,
            stomp_tls_verify_hostname: true,
            stomp_heartbeats: (Duration::from_secs(10), Duration::from_secs(10)),
            maximum_backoff: Duration::from_secs(3600),
            receipt_timeout: Duration::from_secs(10),
            stomp_max_frame_size: 64 * 1024 * 1024,
            maximum_retry_attempts: 50,
            pause_for_retry: Duration::from_secs(240),
            wait_retry: Duration::from_secs(60),
            published_chunk_size: 200,
            producer_waiting_time: Duration::from_secs(1),
            producer_lease: Duration::from_secs(60),
            days_to_keep_data: 30,
            remove_data_cache_ttl: Duration::from_secs(86400),
            stomp_queue_headers: [
                ("durable", "true"),
                ("auto-delete", "false"),
                ("prefetch-count", "1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            exclusive_queue: false,
            consumer_shutdown_timeout: Duration::from_secs(90),
            consumer_max_retry_attempts: 3,
            consumer_retry_wait: Duration::from_secs(2),
        }
    }
}

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

    fn set(&mut self, name: &str, raw: &str) -> Result<(), Error> {
        let bad = |reason: String| Error::Config {
            variable: name.to_owned(),
            value: if name.ends_with("PASSCODE") {
                "***".into()
            } else {
                raw.to_owned()
            },
            reason,
        };
        let value = raw.trim();
        match name {
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
            _ => {
                return Err(bad(format!(
                    "not an outbox setting (variables starting with {NOT_SETTINGS_PREFIX} are ignored)"
                )));
            }
        }
        Ok(())
    }

    /// Checks the settings together: the relations between them that no single value shows.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |variable: &str, value: String, reason: &str| Error::Config {
            variable: variable.to_owned(),
            value,
            reason: reason.to_owned(),
        };
        if self.stomp_host_and_ports.is_empty() {
            return Err(bad(
                "OUTBOX_STOMP_HOST_AND_PORTS",
                String::new(),
                "no broker address",
            ));
        }
        if self.published_chunk_size == 0 {
            return Err(bad(
                "OUTBOX_PUBLISHED_CHUNK_SIZE",
                "0".into(),
                "must be at least 1",
            ));
        }
        if self.maximum_retry_attempts == 0 {
            return Err(bad(
                "OUTBOX_MAXIMUM_RETRY_ATTEMPTS",
                "0".into(),
                "must be at least 1",
            ));
        }
        if self.producer_lease <= self.receipt_timeout {
            return Err(bad(
                "OUTBOX_PRODUCER_LEASE",
                format!("{:?}", self.producer_lease),
                "must be longer than OUTBOX_RECEIPT_TIMEOUT, or another relay could take over rows still awaiting their receipts",
            ));
        }
        if self.stomp_key_file.is_some() != self.stomp_cert_file.is_some() {
            return Err(bad(
                "OUTBOX_STOMP_KEY_FILE",
                String::new(),
                "a client key needs OUTBOX_STOMP_CERT_FILE, and a certificate needs its key",
            ));
        }
        Ok(())
    }
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
    Duration::try_from_secs_f64(seconds)
        .map_err(|_| "expected a non-negative number of seconds".into())
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

/// How long a newly written outbox row may wait to be sent (`added` to `expires_at`):
/// `OUTBOX_DAYS_TO_KEEP_DATA` days.
pub(crate) fn row_lifetime() -> Result<chrono::Duration, Error> {
    let days = match std::env::var("OUTBOX_DAYS_TO_KEEP_DATA") {
        Ok(raw) => {
            let mut config = OutboxConfig::default();
            config.set("OUTBOX_DAYS_TO_KEEP_DATA", &raw)?;
            config.days_to_keep_data
        }
        Err(_) => OutboxConfig::default().days_to_keep_data,
    };
    Ok(chrono::Duration::days(i64::from(days)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_those_of_django_outbox_pattern() {
        let c = OutboxConfig::default();
        assert_eq!(c.maximum_retry_attempts, 50);
        assert_eq!(c.pause_for_retry, Duration::from_secs(240));
        assert_eq!(c.wait_retry, Duration::from_secs(60));
        assert_eq!(c.published_chunk_size, 200);
        assert_eq!(c.producer_waiting_time, Duration::from_secs(1));
        assert_eq!(c.maximum_backoff, Duration::from_secs(3600));
        assert_eq!(c.days_to_keep_data, 30);
        assert_eq!(c.remove_data_cache_ttl, Duration::from_secs(86400));
        assert_eq!(c.stomp_queue_headers["prefetch-count"], "1");
        assert!(c.validate().is_ok());
    }

    #[test]
    fn variables_override_the_defaults() {
        let c = OutboxConfig::from_vars(vars(&[
            ("OUTBOX_STOMP_HOST_AND_PORTS", "a:61613, b:61614"),
            ("OUTBOX_PRODUCER_WAITING_TIME", "0.25"),
            ("OUTBOX_STOMP_HEARTBEATS", "0,5000"),
            (
                "OUTBOX_STOMP_QUEUE_HEADERS",
                r#"{"durable": "true", "prefetch-count": 50}"#,
            ),
            ("OUTBOX_TEST_POSTGRES_URL", "ignored"),
            ("PATH", "ignored"),
        ]))
        .unwrap();
        assert_eq!(
            c.stomp_host_and_ports,
            vec![("a".to_owned(), 61613), ("b".to_owned(), 61614)]
        );
        assert_eq!(c.producer_waiting_time, Duration::from_millis(250));
        assert_eq!(c.stomp_heartbeats, (Duration::ZERO, Duration::from_secs(5)));
        assert_eq!(c.stomp_queue_headers["prefetch-count"], "50");
    }

    #[test]
    fn malformed_and_unknown_variables_are_named() {
        for (name, value) in [
            ("OUTBOX_MAXIMUM_RETRY_ATTEMPTS", "fifty"),
            ("OUTBOX_STOMP_HOST_AND_PORTS", "nohost"),
            ("OUTBOX_STOMP_USE_SSL", "maybe"),
            ("OUTBOX_WAIT_RETRY", "-1"),
            ("OUTBOX_MAXIMUM_RETRIES", "3"),
        ] {
            let err = OutboxConfig::from_vars(vars(&[(name, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn a_passcode_never_shows() {
        let c = OutboxConfig::from_vars(vars(&[("OUTBOX_STOMP_PASSCODE", "s3cret")])).unwrap();
        assert_eq!(c.stomp_passcode.expose(), "s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn a_lease_shorter_than_the_receipt_timeout_is_refused() {
        let err = OutboxConfig::from_vars(vars(&[
            ("OUTBOX_PRODUCER_LEASE", "5"),
            ("OUTBOX_RECEIPT_TIMEOUT", "10"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("OUTBOX_PRODUCER_LEASE"), "{err}");
    }
}
