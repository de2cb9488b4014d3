//! How a command failed, and so the exit code: a usage error, an operational failure, or an
//! unhealthy `status --check`.

use outbox::Error;
use outbox::transport::TransportError;

/// Exit code of an operation that failed: the database or the broker failed or refused.
pub(crate) const EXIT_FAILURE: u8 = 1;
/// Exit code of a run that could not start: bad arguments or settings.
pub(crate) const EXIT_USAGE: u8 = 2;
/// Exit code of `status --check` when a threshold is crossed.
pub(crate) const EXIT_UNHEALTHY: u8 = 3;

/// How a command failed, and so the exit code.
pub(crate) enum Failure {
    /// Bad arguments or settings: the run could not start.
    Usage(String),
    /// The database or the broker failed or refused an operation.
    Operation(String),
    /// `status --check` found a threshold crossed (the reason).
    Unhealthy(String),
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        match err {
            Error::Config { .. } => Failure::Usage(err.to_string()),
            Error::Transport(TransportError::Broker { ref message, .. })
                if message.eq_ignore_ascii_case("not_found") =>
            {
                Failure::Operation(format!(
                    "{err} (does the queue exist? `outbox declare <destination> <queue>` creates a consumer's queues)"
                ))
            }
            // Unusable TLS files, a refused login or vhost: the settings must change.
            Error::Transport(TransportError::Tls(_) | TransportError::Refused { .. }) => {
                Failure::Usage(err.to_string())
            }
            other => Failure::Operation(other.to_string()),
        }
    }
}
