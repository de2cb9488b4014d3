//! What [`StompTransport::new`](super::StompTransport::new) takes: the broker's addresses and
//! login, TLS, heartbeats, the receipt timeout and the largest frame accepted.
//!
//! `StompSettings::default()` has the documented defaults of the `OUTBOX_*` settings, and
//! `StompSettings::from(&config)` takes those of a configuration (both in `transport/select.rs`,
//! the one place that reads the configuration for a transport).

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::config::Secret;

/// TLS for a broker connection: the CAs to trust, an optional client certificate, and how the
/// broker's certificate is checked. The STOMP transport uses it when
/// [`StompSettings::tls`] is set; the AMQP transport for `amqps://` URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsOptions {
    /// A PEM bundle of the CAs to trust; `None`: the public web roots
    /// (`OUTBOX_STOMP_CA_CERTS`).
    pub ca_certs: Option<PathBuf>,
    /// A PEM client certificate chain, for brokers that ask for one; set together with
    /// `key_file` (`OUTBOX_STOMP_CERT_FILE`).
    pub cert_file: Option<PathBuf>,
    /// The PEM private key of the client certificate (`OUTBOX_STOMP_KEY_FILE`).
    pub key_file: Option<PathBuf>,
    /// The name the broker's certificate must carry; `None`: the host of each address
    /// (`OUTBOX_STOMP_TLS_SERVER_NAME`).
    pub server_name: Option<String>,
    /// Whether the certificate must name the server; the chain is checked either way. Default
    /// true (`OUTBOX_STOMP_TLS_VERIFY_HOSTNAME`).
    pub verify_hostname: bool,
}

impl Default for TlsOptions {
    /// The public web roots, no client certificate, the server's name verified.
    fn default() -> Self {
        TlsOptions {
            ca_certs: None,
            cert_file: None,
            key_file: None,
            server_name: None,
            verify_hostname: true,
        }
    }
}

/// How a [`StompTransport`](super::StompTransport) reaches its broker. `Debug` shows no
/// passcode.
///
/// ```
/// use std::time::Duration;
/// use outbox::transport::{StompSettings, StompTransport};
///
/// let mut settings = StompSettings::default();
/// settings.addresses = vec![("rabbit-1".into(), 61613), ("rabbit-2".into(), 61613)];
/// settings.receipt_timeout = Duration::from_secs(5);
/// let transport = StompTransport::new(settings).expect("no TLS files to read");
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StompSettings {
    /// Broker addresses, tried in order (`OUTBOX_STOMP_HOST_AND_PORTS`).
    pub addresses: Vec<(String, u16)>,
    /// The virtual host, sent as the CONNECT `host` header (`OUTBOX_STOMP_VHOST`).
    pub vhost: String,
    /// The login (`OUTBOX_STOMP_USERNAME`).
    pub login: String,
    /// The passcode (`OUTBOX_STOMP_PASSCODE`).
    pub passcode: Secret,
    /// TLS, or `None` for a plain TCP connection (`OUTBOX_STOMP_USE_SSL`).
    pub tls: Option<TlsOptions>,
    /// Heartbeats `(outgoing, incoming)`; zero turns one direction off
    /// (`OUTBOX_STOMP_HEARTBEATS`).
    pub heartbeats: (Duration, Duration),
    /// How long a receipt (and a connection attempt) is awaited (`OUTBOX_RECEIPT_TIMEOUT`).
    pub receipt_timeout: Duration,
    /// The largest frame accepted from the broker, in bytes (`OUTBOX_STOMP_MAX_FRAME_SIZE`).
    pub max_frame_size: usize,
}

impl StompSettings {
    /// Warns, once per address and process, that the passcode goes in clear to a broker that
    /// is not on this host: without TLS, anyone on the path reads the CONNECT frame. The
    /// warning names the address, never the passcode. A relay makes two transports (and a
    /// service may make more): the warning still shows once.
    pub(super) fn warn_of_a_plain_passcode(&self) {
        if self.tls.is_some() || self.passcode.expose().is_empty() {
            return;
        }
        static WARNED: OnceLock<Mutex<HashSet<(String, u16)>>> = OnceLock::new();
        let Ok(mut warned) = WARNED.get_or_init(Mutex::default).lock() else {
            return;
        };
        for (host, port) in &self.addresses {
            if is_loopback(host) || !warned.insert((host.clone(), *port)) {
                continue;
            }
            tracing::warn!(
                address = %format!("{host}:{port}"),
                login = %self.login,
                "the STOMP passcode is sent in clear to a broker that is not on this host: \
                 anyone on the network path can read it; set OUTBOX_STOMP_USE_SSL=true"
            );
        }
    }
}

/// Whether `host` is this machine: `localhost` or a loopback address (names are not resolved).
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_this_machine_and_others_are_not() {
        for host in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "localhost",
            "LOCALHOST",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "10.0.0.5",
            "rabbit.internal",
            "0.0.0.0",
            "::",
            "localhost.example",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
