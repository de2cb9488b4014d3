//! Settings: [`OutboxConfig`], with the defaults of django-outbox-pattern, read from
//! `OUTBOX_<NAME>` environment variables. A malformed value, an unknown `OUTBOX_` variable, or a
//! value outside its range ([`OutboxConfig::validate`]) is an error that names the variable, at
//! start rather than at first use. Every duration and count is bounded, so no setting can reach an
//! arithmetic overflow of dates or clocks, nor a statement with more bind parameters than a
//! database accepts.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::error::Error;

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
    /// The AMQP 0-9-1 broker URLs, tried in order (`OUTBOX_BROKER_URL=amqp://user:pass@host:5672/vhost`,
    /// `amqps://` for TLS, comma-separated for failover). Empty (the default): the STOMP
    /// transport, from the `stomp_*` settings. Set, it selects the AMQP transport (the `amqp`
    /// feature) and carries the address, user, password and vhost, so the `stomp_*` settings of
    /// those must stay at their defaults; the TLS files and heartbeats apply to it as to STOMP.
    /// Kept out of `Debug` output: the URLs hold the password.
    pub broker_url: Vec<Secret>,
    /// What the relay does with a message that no queue takes (an AMQP `basic.return`):
    /// `OUTBOX_UNROUTABLE=retry` (the default: it waits, without spending a retry, until a queue
    /// is bound or it expires), `fail` or `drop`.
    pub unroutable: Unroutable,
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
    /// (`OUTBOX_STOMP_HEARTBEATS=10000,10000`, in milliseconds; each 0 to 3,600,000).
    pub stomp_heartbeats: (Duration, Duration),
    /// The longest pause between reconnection attempts. Default 3600 s (0.01 s to 86,400 s).
    pub maximum_backoff: Duration,
    /// How long to wait for the receipts of a batch. Default 10 s (0.01 s to 3600 s).
    pub receipt_timeout: Duration,
    /// Largest frame accepted from the broker, in bytes. Default 64 MiB (4 KiB to 1 GiB).
    pub stomp_max_frame_size: usize,

    /// Send attempts per message before it is marked FAILED. Default 50 (1 to 1,000,000).
    pub maximum_retry_attempts: u32,
    /// Pause after the third failed attempt. Default 240 s (0 to 30 days).
    pub pause_for_retry: Duration,
    /// Pause after each later failed attempt. Default 60 s (0 to 30 days).
    pub wait_retry: Duration,
    /// Rows per relay batch. Default 200 (1 to [`MAX_PUBLISHED_CHUNK_SIZE`]: a batch is marked
    /// sent in one statement with a bind parameter per row).
    pub published_chunk_size: u32,
    /// Batches a relay keeps in flight at once on its broker connection, each claimed, sent and
    /// marked on its own: while one waits for its receipts, another is claimed or marked.
    /// Default 3 (1 to [`MAX_RELAY_BATCHES_IN_FLIGHT`]). More batches use more of the database
    /// and the broker at once (5 moved 5% more over STOMP and 17% more over AMQP on the
    /// benchmark machine), hold more claimed rows in memory, and put more copies on the wire
    /// after a refusal that closes the connection (up to this many batches of them).
    pub relay_batches_in_flight: u32,
    /// The relay's polling interval when nothing wakes it. Default 1 s (fractions allowed;
    /// 0.01 s to 3600 s).
    pub producer_waiting_time: Duration,
    /// How long a relay holds the rows it claimed; another relay takes them over after that.
    /// Default 60 s (1 s to 86,400 s); always longer than `receipt_timeout`.
    pub producer_lease: Duration,
    /// Days a row is kept: sent rows are deleted after this, unsent rows expire (FAILED).
    /// Default 30 (1 to 36,500; 0 is refused: every row would expire before it could be sent).
    /// The write path, which has no `OutboxConfig` in hand, takes it from the settings a
    /// [`crate::producer::Producer`] or [`crate::consumer::Consumer`] was last built with in this process
    /// ([`OutboxConfig::install`]), else from `OUTBOX_DAYS_TO_KEEP_DATA`.
    pub days_to_keep_data: u32,
    /// At most one cleanup of old rows per this period, across all relays. Default 86400 s
    /// (0 to 30 days).
    pub remove_data_cache_ttl: Duration,

    /// SUBSCRIBE headers that declare a consumer's queues. Default
    /// `{"durable": "true", "auto-delete": "false", "prefetch-count": "1"}`
    /// (`OUTBOX_STOMP_QUEUE_HEADERS` takes a JSON object).
    pub stomp_queue_headers: BTreeMap<String, String>,
    /// Declare consumer queues exclusive. Default false.
    pub exclusive_queue: bool,
    /// How long a stopping consumer waits for callbacks in flight. Default 90 s (0 to 86,400 s).
    pub consumer_shutdown_timeout: Duration,
    /// Further attempts of a callback that failed transiently. Default 3 (0 to 100).
    pub consumer_max_retry_attempts: u32,
    /// Base wait between those attempts (2, 4, 6 s with the default 2 s; 0 to 3600 s).
    pub consumer_retry_wait: Duration,
    /// How long one attempt of a callback may run. Past it the callback is abandoned, its
    /// transaction rolled back, and the message handled as a transient failure: tried again,
    /// then dead-lettered. Default 300 s (0.01 s to 86,400 s): with the default retries, every
    /// attempt of a message that hangs (4 × 300 s, plus 12 s of waits) ends before RabbitMQ's
    /// default `consumer_timeout` of 30 minutes, which would otherwise close the channel.
    pub consumer_callback_timeout: Duration,
    /// How many messages a consumer processes in one database transaction, each in a savepoint
    /// of its own, committed together and acknowledged after that commit (a group commit).
    /// Default 1, a transaction per message (1 to 64): a callback that hangs delays the members
    /// queued behind it in its group until the callback deadline, so groups are chosen, not
    /// imposed. A group holds at most prefetch / in-flight messages.
    pub consumer_group_size: u32,
    /// How long a group stays open for more messages after its first one. Default 2 ms (0 to
    /// 1 s; 0 commits as soon as no message is waiting).
    pub consumer_group_wait: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            broker_url: Vec::new(),
            unroutable: Unroutable::Retry,
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
            relay_batches_in_flight: 3,
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
            consumer_callback_timeout: Duration::from_secs(300),
            consumer_group_size: 1,
            consumer_group_wait: Duration::from_millis(2),
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
            _ => {
                return Err(bad(format!(
                    "not an outbox setting (variables starting with {NOT_SETTINGS_PREFIX} are ignored)"
                )));
            }
        }
        Ok(())
    }

    /// Checks every setting: each duration and count against its range (so that none can
    /// overflow a date, a clock or a statement's bind parameters), and the relations between
    /// them that no single value shows. The error names the variable and the range. The
    /// builders of [`crate::producer::Producer`] and [`crate::consumer::Consumer`] call it, so settings built in code
    /// are checked as those read from the environment are.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |variable: &str, value: String, reason: String| Error::Config {
            variable: variable.to_owned(),
            value,
            reason,
        };
        if self.stomp_host_and_ports.is_empty() {
            return Err(bad(
                "OUTBOX_STOMP_HOST_AND_PORTS",
                String::new(),
                "no broker address".into(),
            ));
        }
        self.validate_broker_url()?;
        for (variable, value, range) in self.duration_settings() {
            range.check(variable, value)?;
        }
        for (variable, value, range) in self.count_settings() {
            range.check(variable, value)?;
        }
        let (outgoing, incoming) = self.stomp_heartbeats;
        for beat in [outgoing, incoming] {
            if beat > MAX_HEARTBEAT {
                return Err(bad(
                    "OUTBOX_STOMP_HEARTBEATS",
                    format!("{},{}", outgoing.as_millis(), incoming.as_millis()),
                    format!(
                        "each must be between 0 and {} milliseconds",
                        MAX_HEARTBEAT.as_millis()
                    ),
                ));
            }
        }
        if self.producer_lease <= self.receipt_timeout {
            return Err(bad(
                "OUTBOX_PRODUCER_LEASE",
                seconds_text(self.producer_lease),
                "must be longer than OUTBOX_RECEIPT_TIMEOUT, or another relay could take over rows still awaiting their receipts".into(),
            ));
        }
        if self.stomp_key_file.is_some() != self.stomp_cert_file.is_some() {
            return Err(bad(
                "OUTBOX_STOMP_KEY_FILE",
                String::new(),
                "a client key needs OUTBOX_STOMP_CERT_FILE, and a certificate needs its key".into(),
            ));
        }
        Ok(())
    }

    /// `broker_url` against the settings it replaces: one scheme for all its URLs, and no
    /// `OUTBOX_STOMP_*` address, login or vhost beside it (which of the two would win is not
    /// something to guess at start).
    fn validate_broker_url(&self) -> Result<(), Error> {
        let Some(first) = self.broker_url.first() else {
            return Ok(());
        };
        let bad = |variable: &str, reason: String| Error::Config {
            variable: variable.to_owned(),
            value: String::new(),
            reason,
        };
        let shown = self.broker_urls_redacted();
        for url in &self.broker_url {
            check_broker_url(url.expose()).map_err(|reason| Error::Config {
                variable: "OUTBOX_BROKER_URL".into(),
                value: shown.clone(),
                reason,
            })?;
        }
        let tls = first.expose().starts_with("amqps://");
        if self
            .broker_url
            .iter()
            .any(|url| url.expose().starts_with("amqps://") != tls)
        {
            return Err(Error::Config {
                variable: "OUTBOX_BROKER_URL".into(),
                value: shown,
                reason: "mixes amqp:// and amqps:// URLs: use one scheme for every address".into(),
            });
        }
        let defaults = OutboxConfig::default();
        let replaced = [
            (
                "OUTBOX_STOMP_HOST_AND_PORTS",
                self.stomp_host_and_ports != defaults.stomp_host_and_ports,
            ),
            (
                "OUTBOX_STOMP_VHOST",
                self.stomp_vhost != defaults.stomp_vhost,
            ),
            (
                "OUTBOX_STOMP_USERNAME",
                self.stomp_username != defaults.stomp_username,
            ),
            (
                "OUTBOX_STOMP_PASSCODE",
                self.stomp_passcode != defaults.stomp_passcode,
            ),
        ];
        if let Some((variable, _)) = replaced.iter().find(|(_, set)| *set) {
            return Err(bad(
                variable,
                "contradicts OUTBOX_BROKER_URL, which carries the broker's address, user, \
                 password and vhost: set one or the other"
                    .into(),
            ));
        }
        if self.stomp_use_ssl && !tls {
            return Err(bad(
                "OUTBOX_STOMP_USE_SSL",
                "asks for TLS but OUTBOX_BROKER_URL is amqp://: use amqps:// URLs".into(),
            ));
        }
        Ok(())
    }

    /// `broker_url` as it may be shown: comma-separated, every password replaced by `***`.
    pub fn broker_urls_redacted(&self) -> String {
        self.broker_url
            .iter()
            .map(|url| redact_credentials(url.expose()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether these settings select the AMQP transport (`OUTBOX_BROKER_URL` is set).
    pub fn uses_amqp(&self) -> bool {
        !self.broker_url.is_empty()
    }

    /// The durations, with their variables and ranges.
    fn duration_settings(&self) -> [(&'static str, Duration, Range<Duration>); 11] {
        const DAY: Duration = Duration::from_secs(86_400);
        const HOUR: Duration = Duration::from_secs(3600);
        const CENTISECOND: Duration = Duration::from_millis(10);
        let within = |min, max| Range { min, max };
        [
            (
                "OUTBOX_MAXIMUM_BACKOFF",
                self.maximum_backoff,
                within(CENTISECOND, DAY),
            ),
            (
                "OUTBOX_RECEIPT_TIMEOUT",
                self.receipt_timeout,
                within(CENTISECOND, HOUR),
            ),
            (
                "OUTBOX_PAUSE_FOR_RETRY",
                self.pause_for_retry,
                within(Duration::ZERO, 30 * DAY),
            ),
            (
                "OUTBOX_WAIT_RETRY",
                self.wait_retry,
                within(Duration::ZERO, 30 * DAY),
            ),
            (
                "OUTBOX_PRODUCER_WAITING_TIME",
                self.producer_waiting_time,
                within(CENTISECOND, HOUR),
            ),
            (
                "OUTBOX_PRODUCER_LEASE",
                self.producer_lease,
                within(Duration::from_secs(1), DAY),
            ),
            (
                "OUTBOX_REMOVE_DATA_CACHE_TTL",
                self.remove_data_cache_ttl,
                within(Duration::ZERO, 30 * DAY),
            ),
            (
                "OUTBOX_CONSUMER_SHUTDOWN_TIMEOUT",
                self.consumer_shutdown_timeout,
                within(Duration::ZERO, DAY),
            ),
            (
                "OUTBOX_CONSUMER_RETRY_WAIT",
                self.consumer_retry_wait,
                within(Duration::ZERO, HOUR),
            ),
            (
                "OUTBOX_CONSUMER_CALLBACK_TIMEOUT",
                self.consumer_callback_timeout,
                within(CENTISECOND, DAY),
            ),
            (
                "OUTBOX_CONSUMER_GROUP_WAIT",
                self.consumer_group_wait,
                within(Duration::ZERO, Duration::from_secs(1)),
            ),
        ]
    }

    /// The counts, with their variables and ranges.
    fn count_settings(&self) -> [(&'static str, u64, Range<u64>); 7] {
        let within = |min, max| Range { min, max };
        [
            (
                "OUTBOX_STOMP_MAX_FRAME_SIZE",
                self.stomp_max_frame_size as u64,
                within(4096, 1 << 30),
            ),
            (
                "OUTBOX_MAXIMUM_RETRY_ATTEMPTS",
                u64::from(self.maximum_retry_attempts),
                within(1, 1_000_000),
            ),
            (
                "OUTBOX_PUBLISHED_CHUNK_SIZE",
                u64::from(self.published_chunk_size),
                within(1, u64::from(MAX_PUBLISHED_CHUNK_SIZE)),
            ),
            (
                "OUTBOX_RELAY_BATCHES_IN_FLIGHT",
                u64::from(self.relay_batches_in_flight),
                within(1, u64::from(MAX_RELAY_BATCHES_IN_FLIGHT)),
            ),
            (
                "OUTBOX_DAYS_TO_KEEP_DATA",
                u64::from(self.days_to_keep_data),
                within(1, u64::from(MAX_DAYS_TO_KEEP_DATA)),
            ),
            (
                "OUTBOX_CONSUMER_MAX_RETRY_ATTEMPTS",
                u64::from(self.consumer_max_retry_attempts),
                within(0, 100),
            ),
            (
                "OUTBOX_CONSUMER_GROUP_SIZE",
                u64::from(self.consumer_group_size),
                within(1, u64::from(MAX_CONSUMER_GROUP_SIZE)),
            ),
        ]
    }

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

/// The most batches a relay keeps in flight (`relay_batches_in_flight`).
pub const MAX_RELAY_BATCHES_IN_FLIGHT: u32 = 64;

/// The largest `published_chunk_size`. A batch is marked sent (and released) in one UPDATE with
/// one bind parameter per row and five more (the claim token, the status and the three cleared
/// columns); SQLite accepts at most 32,766 parameters per statement (PostgreSQL and MariaDB
/// 65,535), so the tightest backend sets the bound for all.
pub const MAX_PUBLISHED_CHUNK_SIZE: u32 = 32_766 - 5;

/// The largest `days_to_keep_data`: a century, far from chrono's limits whatever the date.
const MAX_DAYS_TO_KEEP_DATA: u32 = 36_500;

/// The largest consumer group: PostgreSQL keeps the subtransactions of 64 savepoints in a
/// session's shared cache; more overflow it, which slows every other session's snapshots.
pub const MAX_CONSUMER_GROUP_SIZE: u32 = 64;

/// The longest heartbeat: an hour (STOMP carries heartbeats as milliseconds, sent as `u32`).
const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);

/// The inclusive range of a setting.
struct Range<T> {
    min: T,
    max: T,
}

impl Range<Duration> {
    fn check(&self, variable: &str, value: Duration) -> Result<(), Error> {
        if value < self.min || value > self.max {
            return Err(Error::Config {
                variable: variable.to_owned(),
                value: seconds_text(value),
                reason: format!(
                    "must be between {} and {} seconds",
                    seconds_text(self.min),
                    seconds_text(self.max)
                ),
            });
        }
        Ok(())
    }
}

impl Range<u64> {
    fn check(&self, variable: &str, value: u64) -> Result<(), Error> {
        if value < self.min || value > self.max {
            return Err(Error::Config {
                variable: variable.to_owned(),
                value: value.to_string(),
                reason: format!("must be between {} and {}", self.min, self.max),
            });
        }
        Ok(())
    }
}

/// A duration as the variables give it: seconds, with a fraction only when there is one.
fn seconds_text(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        duration.as_secs().to_string()
    } else {
        format!("{}", duration.as_secs_f64())
    }
}

/// The value of `name` as an error may show it: never a passcode, and a URL without its
/// credentials (an `OUTBOX_DATABASE_URL`, which is not a setting, would otherwise be printed
/// whole).
fn shown_value(name: &str, raw: &str) -> String {
    let upper = name.to_ascii_uppercase();
    if ["PASSCODE", "PASSWORD", "SECRET", "TOKEN"]
        .iter()
        .any(|word| upper.contains(word))
    {
        "***".into()
    } else {
        redact_credentials(raw)
    }
}

/// What the relay does with a message that no queue takes ([`OutboxConfig::unroutable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unroutable {
    /// Keep it waiting, on a backoff of its own that spends no retry, until a queue is bound
    /// or it expires.
    Retry,
    /// Mark it FAILED at once.
    Fail,
    /// Mark it sent, as the STOMP transport does (the broker dropped it).
    Drop,
}

impl FromStr for Unroutable {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value.to_ascii_lowercase().as_str() {
            "retry" => Ok(Unroutable::Retry),
            "fail" => Ok(Unroutable::Fail),
            "drop" => Ok(Unroutable::Drop),
            _ => Err("expected retry, fail or drop".into()),
        }
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
fn check_broker_url(url: &str) -> Result<(), String> {
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

/// `text` with the credentials of every URL in it replaced by `***`: the password of
/// `scheme://user:password@host` (the user name is kept), whatever the scheme, and whether or not
/// the URL parses: a password holding `#`, `?`, `/` or `@` unencoded, as copied from a setting,
/// is cut at the last `@` of the address. Errors of database drivers quote the URL they were
/// given; every output that may carry one goes through this (the command line's errors and
/// logs, the consumer's failure reports, the values of refused settings).
///
/// ```
/// assert_eq!(
///     outbox::config::redact_credentials("cannot parse postgresql+psycopg://app:Dj4ngo!@db:5432/app"),
///     "cannot parse postgresql+psycopg://app:***@db:5432/app",
/// );
/// ```
pub fn redact_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // The address runs to the next blank or quote: a password may hold anything else.
        let end = after
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>'))
            .unwrap_or(after.len());
        let address = &after[..end];
        match address.rfind('@') {
            Some(last_at) => {
                let userinfo = &address[..last_at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&address[last_at..]);
            }
            None => out.push_str(address),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
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
    fn a_broker_url_selects_amqp_and_refuses_what_contradicts_it() {
        let c = OutboxConfig::from_vars(vars(&[(
            "OUTBOX_BROKER_URL",
            "amqp://app:S3cret-pw@a:5672/prod, amqp://app:S3cret-pw@b:5672/prod",
        )]))
        .unwrap();
        assert!(c.uses_amqp());
        assert_eq!(c.broker_url.len(), 2);
        assert_eq!(
            c.broker_urls_redacted(),
            "amqp://app:***@a:5672/prod,amqp://app:***@b:5672/prod"
        );
        assert!(!format!("{c:?}").contains("S3cret-pw"));
        assert!(!OutboxConfig::default().uses_amqp());

        let refused = |pairs: &[(&str, &str)]| {
            let err = OutboxConfig::from_vars(vars(pairs))
                .unwrap_err()
                .to_string();
            assert!(!err.contains("S3cret-pw"), "{err}");
            err
        };
        let url = ("OUTBOX_BROKER_URL", "amqp://app:S3cret-pw@a:5672/prod");
        for (variable, value) in [
            ("OUTBOX_STOMP_HOST_AND_PORTS", "b:61613"),
            ("OUTBOX_STOMP_USERNAME", "other"),
            ("OUTBOX_STOMP_PASSCODE", "other"),
            ("OUTBOX_STOMP_VHOST", "other"),
            ("OUTBOX_STOMP_USE_SSL", "true"),
        ] {
            let err = refused(&[url, (variable, value)]);
            assert!(err.contains(variable), "{err}");
        }
        let err = refused(&[(
            "OUTBOX_BROKER_URL",
            "amqp://app:S3cret-pw@a:5672/,amqps://app:S3cret-pw@b:5671/",
        )]);
        assert!(err.contains("mixes"), "{err}");
        let err = refused(&[("OUTBOX_BROKER_URL", "stomp://app:S3cret-pw@a:61613")]);
        assert!(err.contains("OUTBOX_BROKER_URL"), "{err}");
        let err = refused(&[("OUTBOX_BROKER_URL", "amqp://app:S3cret-pw@/vhost")]);
        assert!(err.contains("no host"), "{err}");
        // TLS with amqps:// is consistent.
        OutboxConfig::from_vars(vars(&[
            ("OUTBOX_BROKER_URL", "amqps://app:S3cret-pw@a:5671/"),
            ("OUTBOX_STOMP_USE_SSL", "true"),
        ]))
        .unwrap();
    }

    #[test]
    fn the_unroutable_policy_is_read() {
        assert_eq!(OutboxConfig::default().unroutable, Unroutable::Retry);
        for (value, policy) in [
            ("retry", Unroutable::Retry),
            ("FAIL", Unroutable::Fail),
            ("drop", Unroutable::Drop),
        ] {
            let c = OutboxConfig::from_vars(vars(&[("OUTBOX_UNROUTABLE", value)])).unwrap();
            assert_eq!(c.unroutable, policy);
        }
        assert!(OutboxConfig::from_vars(vars(&[("OUTBOX_UNROUTABLE", "keep")])).is_err());
    }

    #[test]
    fn defaults_are_those_of_django_outbox_pattern() {
        let c = OutboxConfig::default();
        assert_eq!(c.maximum_retry_attempts, 50);
        assert_eq!(c.pause_for_retry, Duration::from_secs(240));
        assert_eq!(c.wait_retry, Duration::from_secs(60));
        assert_eq!(c.published_chunk_size, 200);
        assert_eq!(c.relay_batches_in_flight, 3);
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

    #[test]
    fn every_duration_and_count_outside_its_range_is_refused_naming_the_variable_and_range() {
        for (name, value, range) in [
            (
                "OUTBOX_DAYS_TO_KEEP_DATA",
                "99999999",
                "between 1 and 36500",
            ),
            ("OUTBOX_DAYS_TO_KEEP_DATA", "0", "between 1 and 36500"),
            (
                "OUTBOX_PRODUCER_LEASE",
                "99999999999999",
                "between 1 and 86400 seconds",
            ),
            (
                "OUTBOX_REMOVE_DATA_CACHE_TTL",
                "99999999999999",
                "between 0 and 2592000 seconds",
            ),
            (
                "OUTBOX_PUBLISHED_CHUNK_SIZE",
                "100000",
                "between 1 and 32761",
            ),
            ("OUTBOX_PUBLISHED_CHUNK_SIZE", "0", "between 1 and 32761"),
            ("OUTBOX_RELAY_BATCHES_IN_FLIGHT", "0", "between 1 and 64"),
            ("OUTBOX_RELAY_BATCHES_IN_FLIGHT", "65", "between 1 and 64"),
            (
                "OUTBOX_PAUSE_FOR_RETRY",
                "99999999999999",
                "between 0 and 2592000 seconds",
            ),
            (
                "OUTBOX_WAIT_RETRY",
                "2592001",
                "between 0 and 2592000 seconds",
            ),
            (
                "OUTBOX_CONSUMER_RETRY_WAIT",
                "99999999999999",
                "between 0 and 3600 seconds",
            ),
            (
                "OUTBOX_CONSUMER_CALLBACK_TIMEOUT",
                "0",
                "between 0.01 and 86400 seconds",
            ),
            (
                "OUTBOX_CONSUMER_SHUTDOWN_TIMEOUT",
                "1e12",
                "between 0 and 86400 seconds",
            ),
            (
                "OUTBOX_CONSUMER_MAX_RETRY_ATTEMPTS",
                "101",
                "between 0 and 100",
            ),
            ("OUTBOX_CONSUMER_GROUP_SIZE", "65", "between 1 and 64"),
            ("OUTBOX_CONSUMER_GROUP_SIZE", "0", "between 1 and 64"),
            (
                "OUTBOX_CONSUMER_GROUP_WAIT",
                "1.5",
                "between 0 and 1 seconds",
            ),
            (
                "OUTBOX_MAXIMUM_BACKOFF",
                "0",
                "between 0.01 and 86400 seconds",
            ),
            (
                "OUTBOX_RECEIPT_TIMEOUT",
                "1e15",
                "between 0.01 and 3600 seconds",
            ),
            (
                "OUTBOX_PRODUCER_WAITING_TIME",
                "0",
                "between 0.01 and 3600 seconds",
            ),
            (
                "OUTBOX_MAXIMUM_RETRY_ATTEMPTS",
                "0",
                "between 1 and 1000000",
            ),
            (
                "OUTBOX_STOMP_MAX_FRAME_SIZE",
                "100",
                "between 4096 and 1073741824",
            ),
            (
                "OUTBOX_STOMP_HEARTBEATS",
                "5000000000,0",
                "between 0 and 3600000 milliseconds",
            ),
        ] {
            let err = OutboxConfig::from_vars(vars(&[(name, value)]))
                .expect_err(&format!("{name}={value} accepted"))
                .to_string();
            assert!(err.contains(name), "{err}");
            assert!(err.contains(range), "{name}={value}: {err}");
        }
    }

    #[test]
    fn the_bounds_themselves_are_accepted() {
        let c = OutboxConfig::from_vars(vars(&[
            ("OUTBOX_DAYS_TO_KEEP_DATA", "36500"),
            ("OUTBOX_PUBLISHED_CHUNK_SIZE", "32761"),
            ("OUTBOX_RELAY_BATCHES_IN_FLIGHT", "64"),
            ("OUTBOX_STOMP_HEARTBEATS", "3600000,0"),
            ("OUTBOX_CONSUMER_CALLBACK_TIMEOUT", "0.01"),
            ("OUTBOX_CONSUMER_MAX_RETRY_ATTEMPTS", "0"),
            ("OUTBOX_CONSUMER_GROUP_SIZE", "64"),
            ("OUTBOX_CONSUMER_GROUP_WAIT", "0"),
            ("OUTBOX_PAUSE_FOR_RETRY", "0"),
            ("OUTBOX_PRODUCER_LEASE", "86400"),
            ("OUTBOX_RECEIPT_TIMEOUT", "3600"),
        ]))
        .unwrap();
        assert_eq!(c.consumer_callback_timeout, Duration::from_millis(10));
        // The extremes reach no overflow of the dates they are added to.
        let now = chrono::Utc::now();
        let _ = now + chrono::Duration::days(i64::from(c.days_to_keep_data));
        let _ = std::time::Instant::now() + c.receipt_timeout + c.producer_lease;
    }

    #[test]
    fn settings_built_in_code_are_checked_too() {
        let c = OutboxConfig {
            days_to_keep_data: 0,
            ..OutboxConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("OUTBOX_DAYS_TO_KEEP_DATA"), "{err}");
        let c = OutboxConfig {
            consumer_retry_wait: Duration::MAX,
            ..OutboxConfig::default()
        };
        assert!(c.validate().is_err());
        let c = OutboxConfig {
            stomp_heartbeats: (
                Duration::ZERO,
                Duration::from_millis(u64::from(u32::MAX) + 1),
            ),
            ..OutboxConfig::default()
        };
        assert!(c.install().is_err());
    }

    #[test]
    fn the_default_callback_timeout_lets_every_attempt_end_before_rabbitmq_s_consumer_timeout() {
        let c = OutboxConfig::default();
        let attempts = c.consumer_max_retry_attempts + 1;
        let waits: u32 = (1..=c.consumer_max_retry_attempts).sum();
        let worst = c.consumer_callback_timeout * attempts + c.consumer_retry_wait * waits;
        assert!(worst < Duration::from_secs(30 * 60), "{worst:?}");
    }

    #[test]
    fn credentials_are_redacted_from_any_url_even_malformed() {
        for (text, shown) in [
            (
                "cannot connect: postgres://postgres:Qx7#pw?z@127.0.0.1:5432/test failed",
                "cannot connect: postgres://postgres:***@127.0.0.1:5432/test failed",
            ),
            (
                "postgresql+psycopg://app:Dj4ngo!@db.internal:5432/app",
                "postgresql+psycopg://app:***@db.internal:5432/app",
            ),
            (
                "url \"mysql://root:p%40ss%25w0rd%23@h/db\" refused",
                "url \"mysql://root:***@h/db\" refused",
            ),
            (
                "amqps://u:a@b@c/d@host:5671/vh",
                "amqps://u:***@host:5671/vh",
            ),
            (
                "two: a://x:1@h and b://y:2@k",
                "two: a://x:***@h and b://y:***@k",
            ),
            (
                "no password: postgres://postgres@127.0.0.1/test",
                "no password: postgres://postgres@127.0.0.1/test",
            ),
            ("nothing here", "nothing here"),
            ("sqlite://db.sqlite?mode=rwc", "sqlite://db.sqlite?mode=rwc"),
        ] {
            assert_eq!(redact_credentials(text), shown);
        }
    }

    #[test]
    fn a_refused_value_shows_no_credentials() {
        let err = OutboxConfig::from_vars(vars(&[(
            "OUTBOX_DATABASE_URL",
            "postgres://app:hunter2@db/app",
        )]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("OUTBOX_DATABASE_URL"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = OutboxConfig::from_vars(vars(&[("OUTBOX_BROKER_PASSWORD", "hunter2")]))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
