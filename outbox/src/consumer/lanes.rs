//! Key lanes: deliveries waiting to be dispatched, at most one running per ordering key when
//! the consumer is ordered by key, and at most `in_flight` at once.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::transport::Delivery;

/// The routing layer in front of the dispatcher: which delivery starts next.
///
/// Without keyed order, deliveries start as they arrive, while a callback slot is free. With it,
/// a delivery waits while an earlier one of its key (`x-outbox-key`) is being processed, and the
/// first waiting delivery whose key is free (or that has none) takes the next free slot: per key,
/// arrival order; across keys, parallel.
pub(super) struct Lanes {
    ordered: bool,
    /// Received, not started, in arrival order.
    waiting: VecDeque<Delivery>,
    /// The key of each task in flight that has one.
    running: HashMap<tokio::task::Id, String>,
    /// The keys of the tasks in flight.
    busy: HashSet<String>,
}

impl Lanes {
    pub(super) fn new(ordered: bool) -> Self {
        Lanes {
            ordered,
            waiting: VecDeque::new(),
            running: HashMap::new(),
            busy: HashSet::new(),
        }
    }

    /// Whether to read another delivery: without keyed order, only into a free slot; with it,
    /// always (the broker's prefetch bounds what waits here), so that other keys can proceed
    /// while the next delivery's key is busy.
    pub(super) fn accepts(&self, running: usize, in_flight: usize) -> bool {
        if self.ordered {
            true
        } else {
            running < in_flight && self.waiting.is_empty()
        }
    }

    pub(super) fn push(&mut self, delivery: Delivery) {
        self.waiting.push_back(delivery);
    }

    /// The first waiting delivery that may start now, with its key (in keyed mode).
    pub(super) fn next_ready(&mut self) -> Option<(Option<String>, Delivery)> {
        if !self.ordered {
            return self.waiting.pop_front().map(|delivery| (None, delivery));
        }
        let index = self.waiting.iter().position(|delivery| {
            delivery
                .header(crate::headers::ORDERING_KEY)
                .is_none_or(|key| !self.busy.contains(key))
        })?;
        let delivery = self.waiting.remove(index)?;
        let key = delivery
            .header(crate::headers::ORDERING_KEY)
            .map(str::to_owned);
        Some((key, delivery))
    }

    pub(super) fn started(&mut self, task: tokio::task::Id, key: Option<String>) {
        if let Some(key) = key {
            self.busy.insert(key.clone());
            self.running.insert(task, key);
        }
    }

    /// A task ended (normally or not): its key is free again.
    pub(super) fn finished(
        &mut self,
        joined: &Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    ) {
        let task = match joined {
            Ok((task, ())) => *task,
            Err(err) => err.id(),
        };
        if let Some(key) = self.running.remove(&task) {
            self.busy.remove(&key);
        }
    }

    pub(super) fn forget_waiting(&mut self) {
        self.waiting.clear();
    }
}
