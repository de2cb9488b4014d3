//! The in-process wake-up signal: commits made by the library itself ([`crate::write::save`],
//! [`crate::write::transaction`], ...) tell the relays of this process that rows are waiting, so they
//! need not wait for their next poll. Relays in other processes learn of commits through
//! PostgreSQL's LISTEN/NOTIFY, or by polling.

use std::sync::LazyLock;

use tokio::sync::watch;

static COMMITS: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::channel(0).0);

/// Records that outbox rows were committed.
pub(crate) fn committed() {
    COMMITS.send_modify(|count| *count = count.wrapping_add(1));
}

/// A receiver that sees every [`committed`] made after it was created: a relay keeps one, checks
/// it before waiting, and so never misses a commit that happened while it was busy.
pub fn subscribe() -> watch::Receiver<u64> {
    COMMITS.subscribe()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_commit_made_while_busy_is_seen_later() {
        let mut rx = subscribe();
        committed();
        tokio::time::timeout(std::time::Duration::from_secs(1), rx.changed())
            .await
            .expect("the commit is seen")
            .expect("the sender lives forever");
    }
}
