//! Log lines a test reads: a plain-text `fmt` subscriber that writes into a buffer, on the test's
//! thread or for the whole process.

use std::sync::{Arc, Mutex};

use tracing_subscriber::EnvFilter;

/// A buffer of log lines, shared by the subscriber that writes them and the test that reads them.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// A subscriber that writes the events `filter` lets through (`outbox=debug`, `warn`) into
    /// these logs, without colours.
    pub fn subscriber(&self, filter: &str) -> impl tracing::Subscriber + Send + Sync + 'static {
        let writer = self.clone();
        tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(filter))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish()
    }

    /// Captures what `filter` lets through on this thread until the guard is dropped (a
    /// `#[tokio::test]` runs on one thread).
    pub fn capture_here(filter: &str) -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let guard = tracing::subscriber::set_default(logs.subscriber(filter));
        (logs, guard)
    }

    /// Every line written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
