//! Settings: [`OutboxConfig`], with the defaults of django-outbox-pattern, read from
//! `OUTBOX_<NAME>` environment variables. A malformed value, an unknown `OUTBOX_` variable, or a
//! value outside its range ([`OutboxConfig::validate`]) is an error that names the variable, at
//! start rather than at first use. Every duration and count is bounded, so no setting can reach an
//! arithmetic overflow of dates or clocks, nor a statement with more bind parameters than a
//! database accepts.
//!
//! - `mod.rs`: the settings, their defaults, and [`OutboxConfig::validate`].
//! - `env.rs`: reading and parsing the `OUTBOX_*` variables.
//! - `bounds.rs`: the range of every duration and count, and the `MAX_*` limits.
//! - `secret.rs`: [`Secret`] and the redaction of credentials.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::Error;
use bounds::seconds_text;
use env::check_broker_url;

mod bounds;
mod env;
mod secret;
#[cfg(test)]
mod tests;

pub use bounds::{MAX_PUBLISHED_CHUNK_SIZE, MAX_RELAY_BATCHES_IN_FLIGHT};
pub use secret::{Secret, redact_credentials, url_secrets};

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
    /// Check that the server certificate names the server. Default true. `false` is refused
    /// unless `stomp_ca_certs` names a private CA: with the public web roots, any publicly
    /// trusted certificate, issued for any name, would be accepted.
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
    /// The write path, which has no `OutboxConfig` in hand, takes it from the
    /// [`crate::write::WriteSettings`] the process installed, else from
    /// `OUTBOX_DAYS_TO_KEEP_DATA`: building a `Producer` or `Consumer` does not change it.
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

    /// The longest a database statement of the outbox may run (`OUTBOX_DB_STATEMENT_TIMEOUT`).
    /// Default 30 s (0.1 s to 3600 s). A call that gets no answer within it and 1 s more (a
    /// stalled connection) is abandoned by the client; on the connections made with
    /// [`OutboxConfig::database_options`] (those of the `outbox` command) the server ends the
    /// statement itself (PostgreSQL `statement_timeout`, MariaDB `max_statement_time`). Either
    /// way the call fails as a transient error: retried, logged and counted, never charged to a
    /// row. A stopping relay waits at most this and 5 s for its batches in flight.
    pub db_statement_timeout: Duration,
    /// The longest a database statement of the outbox waits for a lock another transaction
    /// holds (`OUTBOX_DB_LOCK_TIMEOUT`). Default 10 s (0.1 s to 3600 s; at most
    /// `db_statement_timeout`). PostgreSQL `lock_timeout`, MariaDB `innodb_lock_wait_timeout`
    /// (whole seconds, rounded up): set on the connections made with
    /// [`OutboxConfig::database_options`], and in every consumer transaction, so that a
    /// redelivered message never waits for good behind the uncommitted inbox row of a consumer
    /// that stopped answering: it fails transiently and is tried again.
    pub db_lock_timeout: Duration,
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
            db_statement_timeout: Duration::from_secs(30),
            db_lock_timeout: Duration::from_secs(10),
        }
    }
}

impl OutboxConfig {
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
        self.check_ranges()?;
        if self.producer_lease <= self.receipt_timeout {
            return Err(bad(
                "OUTBOX_PRODUCER_LEASE",
                seconds_text(self.producer_lease),
                "must be longer than OUTBOX_RECEIPT_TIMEOUT, or another relay could take over rows still awaiting their receipts".into(),
            ));
        }
        if self.db_lock_timeout > self.db_statement_timeout {
            return Err(bad(
                "OUTBOX_DB_LOCK_TIMEOUT",
                seconds_text(self.db_lock_timeout),
                "must be at most OUTBOX_DB_STATEMENT_TIMEOUT, which ends the statement first"
                    .into(),
            ));
        }
        self.validate_tls()?;
        if self.stomp_key_file.is_some() != self.stomp_cert_file.is_some() {
            return Err(bad(
                "OUTBOX_STOMP_KEY_FILE",
                String::new(),
                "a client key needs OUTBOX_STOMP_CERT_FILE, and a certificate needs its key".into(),
            ));
        }
        Ok(())
    }

    /// TLS without host name verification only against a private CA: with the public web
    /// roots, any publicly trusted certificate for any name would pass.
    fn validate_tls(&self) -> Result<(), Error> {
        let tls = self.stomp_use_ssl
            || self
                .broker_url
                .iter()
                .any(|url| url.expose().starts_with("amqps://"));
        if tls && !self.stomp_tls_verify_hostname && self.stomp_ca_certs.is_none() {
            return Err(Error::Config {
                variable: "OUTBOX_STOMP_TLS_VERIFY_HOSTNAME".into(),
                value: "false".into(),
                reason: "refused with the public web roots, which would accept any publicly \
                         trusted certificate issued for any name: keep it true (name the expected \
                         certificate name with OUTBOX_STOMP_TLS_SERVER_NAME), or trust a private \
                         CA with OUTBOX_STOMP_CA_CERTS"
                    .into(),
            });
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

    /// Whether these settings select the AMQP transport (`OUTBOX_BROKER_URL` is set).
    pub fn uses_amqp(&self) -> bool {
        !self.broker_url.is_empty()
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
