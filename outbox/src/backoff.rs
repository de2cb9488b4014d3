//! Reconnection pacing, shared by the relay and the consumer: `min(2^n + jitter, maximum)`
//! seconds after the n-th failure in a row.

use std::time::Duration;

use uuid::Uuid;

/// Reconnection pacing: `min(2^n + jitter, maximum)` seconds after the n-th failure in a row.
#[derive(Debug)]
pub(crate) struct Backoff {
    failures: u32,
    maximum: Duration,
}

impl Backoff {
    pub(crate) fn new(maximum: Duration) -> Self {
        Self {
            failures: 0,
            maximum,
        }
    }

    pub(crate) fn next_pause(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let base = 2f64.powi(self.failures.min(30) as i32);
        let jitter = (Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
        Duration::from_secs_f64(base + jitter).min(self.maximum)
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(10));
        let first = backoff.next_pause();
        assert!(first >= Duration::from_secs(2) && first < Duration::from_secs(3));
        let second = backoff.next_pause();
        assert!(second >= Duration::from_secs(4) && second < Duration::from_secs(5));
        for _ in 0..10 {
            assert!(backoff.next_pause() <= Duration::from_secs(10));
        }
        backoff.reset();
        assert!(backoff.next_pause() < Duration::from_secs(3));
    }
}
