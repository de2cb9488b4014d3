//! When the STOMP transport may open its next connection: right away, unless the broker has been
//! closing its connections soon after login while receipts were outstanding, with no ERROR.
//!
//! RabbitMQ 3.10's STOMP plugin has no handler for a publisher nack: a SEND to a queue that is
//! full with `x-overflow: reject-publish` ends the connection without an ERROR, and without the
//! receipts still due on it. Reconnecting at once and sending the same messages again would make
//! a full queue a reconnect-and-resend loop. So a connection that ends that way, early, is
//! followed by a pause before the next one: 1 s, doubling up to 15 s, and back to none after a
//! connection that lived or ended with nothing outstanding. Callers are told to wait
//! ([`TransportError::ReconnectPaused`]) rather than kept waiting, so that a stopping relay is
//! never held up by the pause.

use std::time::{Duration, Instant};

#[cfg(doc)]
use crate::transport::TransportError;

/// A connection that ends sooner than this after its login counts as ended early.
const EARLY: Duration = Duration::from_secs(10);
/// The pause after the first early end of an episode.
const FIRST_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause: the queue gets room, and sending resumes, within this.
const LONGEST_PAUSE: Duration = Duration::from_secs(15);

/// How a connection ended, as the task that drove it saw it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ending {
    /// From the login to the end.
    pub(super) lived: Duration,
    /// When it ended.
    pub(super) at: Instant,
    /// Receipts that were still due when it ended.
    pub(super) outstanding: usize,
    /// The broker closed (or reset) the socket without an ERROR, and not after our DISCONNECT;
    /// not heartbeats missed, nor a write that made no progress.
    pub(super) silently: bool,
}

impl Ending {
    fn early(&self) -> bool {
        self.silently && self.outstanding > 0 && self.lived < EARLY
    }
}

/// The pacing state of one transport.
#[derive(Debug, Default)]
pub(super) struct Pacing {
    /// Connections in a row that ended early.
    early_ends: u32,
    /// No connection opens before this.
    not_before: Option<Instant>,
}

impl Pacing {
    /// Takes note of how the last connection ended.
    pub(super) fn ended(&mut self, ending: &Ending) {
        if !ending.early() {
            if self.early_ends > 0 {
                tracing::info!(
                    early_ends = self.early_ends,
                    "broker connections last again; reconnecting without a pause"
                );
            }
            self.early_ends = 0;
            self.not_before = None;
            return;
        }
        self.early_ends = self.early_ends.saturating_add(1);
        let pause = pause_after(self.early_ends);
        self.not_before = Some(ending.at + pause);
        if self.early_ends == 1 {
            tracing::warn!(
                lived = ?ending.lived,
                receipts_outstanding = ending.outstanding,
                retry_in = ?pause,
                "the broker closed the connection soon after login, with receipts outstanding and no ERROR \
                 (RabbitMQ's STOMP plugin does so when a queue with x-overflow reject-publish is full); \
                 reconnecting with a pause of 1 s, doubling up to 15 s, while this goes on"
            );
        } else {
            tracing::debug!(early_ends = self.early_ends, retry_in = ?pause, "broker connection ended early again");
        }
    }

    /// How long to wait before opening a connection at `now`, if at all.
    pub(super) fn wait(&self, now: Instant) -> Option<Duration> {
        self.not_before
            .filter(|at| *at > now)
            .map(|at| at.duration_since(now))
    }
}

/// The pause after the `n`-th early end in a row (`n` from 1).
fn pause_after(n: u32) -> Duration {
    let doubled = FIRST_PAUSE.saturating_mul(1u32 << n.saturating_sub(1).min(16));
    doubled.min(LONGEST_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ending(lived: u64, outstanding: usize, silently: bool) -> Ending {
        Ending {
            lived: Duration::from_secs(lived),
            at: Instant::now(),
            outstanding,
            silently,
        }
    }

    #[test]
    fn early_silent_ends_pause_1_2_4_8_then_15_seconds() {
        let pauses: Vec<u64> = (1..=7).map(|n| pause_after(n).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 15, 15, 15]);
        assert_eq!(pause_after(u32::MAX), LONGEST_PAUSE);
    }

    #[test]
    fn only_an_early_silent_end_with_receipts_outstanding_pauses() {
        for harmless in [
            ending(1, 0, true),  // nothing outstanding
            ending(1, 3, false), // an ERROR, or our own DISCONNECT
            ending(60, 3, true), // it lived
        ] {
            let mut pacing = Pacing::default();
            pacing.ended(&harmless);
            assert_eq!(pacing.wait(Instant::now()), None, "{harmless:?}");
        }
        let mut pacing = Pacing::default();
        pacing.ended(&ending(0, 2, true));
        let wait = pacing.wait(Instant::now()).expect("a pause");
        assert!(
            wait <= FIRST_PAUSE && wait > Duration::from_millis(900),
            "{wait:?}"
        );
        pacing.ended(&ending(0, 2, true));
        assert!(pacing.wait(Instant::now()).expect("a pause") > FIRST_PAUSE);
    }

    #[test]
    fn a_connection_that_lived_resets_the_pause() {
        let mut pacing = Pacing::default();
        for _ in 0..6 {
            pacing.ended(&ending(0, 1, true));
        }
        assert!(pacing.wait(Instant::now()).expect("a pause") > Duration::from_secs(14));
        pacing.ended(&ending(30, 1, true));
        assert_eq!(pacing.wait(Instant::now()), None);
        pacing.ended(&ending(0, 1, true));
        assert!(pacing.wait(Instant::now()).expect("a pause") <= FIRST_PAUSE);
    }
}
