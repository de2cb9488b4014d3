//! Destinations the broker rejects messages to: a queue full with `x-overflow: reject-publish`
//! (a length limit, or at-least-once dead-lettering). Back-pressure, nobody's fault: their rows
//! wait a short pause of their own, spending no retry, and go out again once a probe is taken.
//!
//! Over AMQP a rejection is a clean `basic.nack` of that very message. RabbitMQ 3.10's STOMP
//! plugin instead closes the connection with no ERROR and no receipt, failing everything
//! pending on it: then the destinations of the rows left unreceipted are in doubt, and their
//! rows go alone on the isolation lane until one of each is receipted. A row alone on its
//! connection whose connection the broker closes silently is taken as rejected, and its
//! destination kept off the shared connection until a probe is receipted, so that a full queue
//! never takes the rows of other destinations down with it.
//!
//! An episode begins with the first rejection (logged once, at WARN) and ends when a message to
//! the destination is receipted (logged at INFO). Its rows wait until the next probe: 2 s after
//! the first rejection, doubling up to 15 s, so that a queue that gets room is written to again
//! within 15 s.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::Producer;
use super::isolation::lock;

/// The pause after the first rejection of an episode.
const FIRST_PAUSE: Duration = Duration::from_secs(2);
/// The longest pause between probes of a destination.
const LONGEST_PAUSE: Duration = Duration::from_secs(15);
/// Destinations remembered (rejecting or in doubt); beyond it the memory starts over.
const REMEMBERED: usize = 10_000;
/// An episode that begins this soon after the destination's last one was warned about is logged
/// at DEBUG: a queue kept at its limit takes some messages and rejects others, batch after batch.
const WARN_AGAIN_AFTER: Duration = Duration::from_secs(300);

/// What the relay knows of the destinations the broker rejects messages to.
#[derive(Debug, Default)]
pub(super) struct Pressure {
    rejecting: HashMap<String, Episode>,
    /// Destinations with rows unreceipted when a connection closed without an ERROR: one of
    /// them may be rejecting, so their rows go alone until one of each is receipted.
    doubtful: HashSet<String>,
    /// When each destination's last episode was warned about.
    warned: HashMap<String, Instant>,
}

/// One destination's rejections, from the first to the next receipt.
#[derive(Debug)]
struct Episode {
    since: Instant,
    /// Messages rejected in the episode.
    rejected: u64,
    /// Rejections in a row (a batch's counts once).
    steps: u32,
    /// No row of the destination is sent before this.
    retry_at: Instant,
    /// Rejections closed the connection (STOMP): its rows go alone, on the isolation lane.
    closes: bool,
    /// Its beginning was logged at WARN: its end is logged at INFO.
    warned: bool,
}

/// The pause after the `n`-th rejection in a row (`n` from 1): 2 s, 4 s, 8 s, then 15 s.
fn pause_after(n: u32) -> Duration {
    FIRST_PAUSE
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(LONGEST_PAUSE)
}

impl Pressure {
    fn rejected(&mut self, destination: &str, messages: usize, closes: bool) -> Duration {
        let now = Instant::now();
        if self.rejecting.len() >= REMEMBERED && !self.rejecting.contains_key(destination) {
            self.rejecting.clear();
        }
        self.doubtful.remove(destination);
        let episode = self
            .rejecting
            .entry(destination.to_owned())
            .or_insert_with(|| Episode {
                since: now,
                rejected: 0,
                steps: 0,
                retry_at: now,
                closes,
                warned: false,
            });
        let first = episode.steps == 0;
        let warn = first
            && self
                .warned
                .get(destination)
                .is_none_or(|at| at.elapsed() >= WARN_AGAIN_AFTER);
        episode.rejected += messages as u64;
        episode.steps = episode.steps.saturating_add(1);
        episode.closes |= closes;
        let pause = pause_after(episode.steps);
        episode.retry_at = now + pause;
        if warn {
            if self.warned.len() >= REMEMBERED {
                self.warned.clear();
            }
            self.warned.insert(destination.to_owned(), now);
            episode.warned = true;
            tracing::warn!(
                destination,
                retry_in = ?pause,
                how = if closes { "the broker closed the connection with this message alone pending (RabbitMQ's STOMP plugin does so for a rejected publish)" } else { "basic.nack" },
                "the broker rejects messages to this destination (a queue full with x-overflow reject-publish?); \
                 its rows wait without spending a retry and are tried again every 15 s at most until one is taken"
            );
        } else {
            tracing::debug!(destination, rejected = episode.rejected, retry_in = ?pause, "rejected again");
        }
        pause
    }

    /// How long rows to `destination` still wait, if its broker rejects them.
    fn waiting(&self, destination: &str) -> Option<Duration> {
        let episode = self.rejecting.get(destination)?;
        let now = Instant::now();
        (episode.retry_at > now).then(|| episode.retry_at - now)
    }

    fn goes_alone(&self, destination: &str) -> bool {
        self.doubtful.contains(destination)
            || self.rejecting.get(destination).is_some_and(|e| e.closes)
    }

    fn doubt<'a>(&mut self, destinations: impl IntoIterator<Item = &'a str>) {
        for destination in destinations {
            if self.doubtful.len() >= REMEMBERED {
                self.doubtful.clear();
            }
            if !self.rejecting.contains_key(destination) {
                self.doubtful.insert(destination.to_owned());
            }
        }
    }

    fn taken(&mut self, destination: &str) {
        self.doubtful.remove(destination);
        let Some(episode) = self.rejecting.remove(destination) else {
            return;
        };
        let (rejected, after) = (episode.rejected, episode.since.elapsed());
        if episode.warned {
            tracing::info!(
                destination,
                rejected,
                ?after,
                "the broker takes messages to this destination again"
            );
        } else {
            tracing::debug!(
                destination,
                rejected,
                ?after,
                "the broker takes messages to this destination again"
            );
        }
    }
}

impl Producer {
    /// Records that the broker rejected `messages` messages to `destination` (`closes`: by
    /// closing the connection, as over STOMP); returns how long its rows wait.
    pub(super) fn rejected(&self, destination: &str, messages: usize, closes: bool) -> Duration {
        crate::metrics::rejected(destination, messages);
        lock(&self.pressure).rejected(destination, messages, closes)
    }

    /// How long rows to `destination` still wait for the next probe, if the broker rejects
    /// messages to it.
    pub(super) fn rejecting(&self, destination: &str) -> Option<Duration> {
        lock(&self.pressure).waiting(destination)
    }

    /// Whether rows to `destination` go alone, on the isolation lane: it is in doubt, or the
    /// broker rejects messages to it by closing the connection.
    pub(super) fn goes_alone(&self, destination: &str) -> bool {
        lock(&self.pressure).goes_alone(destination)
    }

    /// Puts in doubt the destinations of rows left unreceipted when a connection closed
    /// without an ERROR.
    pub(super) fn doubt<'a>(&self, destinations: impl IntoIterator<Item = &'a str>) {
        lock(&self.pressure).doubt(destinations);
    }

    /// Destinations a message was just receipted to: no longer rejecting nor in doubt.
    pub(super) fn taken(&self, destinations: &HashSet<String>) {
        let mut pressure = lock(&self.pressure);
        if pressure.rejecting.is_empty() && pressure.doubtful.is_empty() {
            return;
        }
        for destination in destinations {
            pressure.taken(destination);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_wait_2_4_8_then_15_seconds_until_a_message_is_taken() {
        let pauses: Vec<u64> = (1..=6).map(|n| pause_after(n).as_secs()).collect();
        assert_eq!(pauses, [2, 4, 8, 15, 15, 15]);
        let mut pressure = Pressure::default();
        assert_eq!(pressure.rejected("/topic/full", 3, false), FIRST_PAUSE);
        assert!(pressure.waiting("/topic/full").is_some());
        assert!(!pressure.goes_alone("/topic/full"), "a nack needs no lane");
        assert_eq!(pressure.rejected("/topic/full", 1, false), pause_after(2));
        pressure.taken("/topic/full");
        assert_eq!(pressure.waiting("/topic/full"), None);
        assert_eq!(pressure.rejected("/topic/full", 1, false), FIRST_PAUSE);
    }

    #[test]
    fn a_destination_in_doubt_goes_alone_until_taken_or_rejected() {
        let mut pressure = Pressure::default();
        pressure.doubt(["/topic/a", "/topic/b"]);
        assert!(pressure.goes_alone("/topic/a") && pressure.goes_alone("/topic/b"));
        pressure.taken("/topic/a");
        assert!(!pressure.goes_alone("/topic/a"));
        pressure.rejected("/topic/b", 1, true);
        assert!(
            pressure.goes_alone("/topic/b"),
            "rejected by closing: alone"
        );
        assert!(pressure.waiting("/topic/b").is_some());
        pressure.taken("/topic/b");
        assert!(!pressure.goes_alone("/topic/b"));
    }
}
