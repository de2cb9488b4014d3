//! Group commits: several deliveries processed in one database transaction, each in a savepoint
//! of its own, committed together, then each settled with the broker.
//!
//! A group opens with a delivery and takes the deliveries that follow, one after another (one
//! transaction is one connection), until it holds its size or its wait has passed since it
//! opened. Each member's inbox row and callback run in a savepoint: a member that fails, nacks
//! or is a duplicate rolls back to its savepoint alone, and the others go on. Nothing is
//! acknowledged or rejected before the group's transaction has ended:
//!
//! - committed: the members saved are acknowledged, the duplicates too (the row that made each
//!   one a duplicate is either committed by another transaction, or this group's own, now
//!   committed: a duplicate is never acknowledged while the original it stands for may still
//!   roll back), the nacked and failed ones are dead-lettered;
//! - a member that failed transiently (a lock wait, a deadlock, the callback deadline, ...)
//!   closes the group at once: the members before it are committed, and it is tried again in a
//!   transaction of its own, with the usual retries, before the deliveries behind it (the order
//!   of a consumer with one in flight is kept);
//! - the group's own statements failed (BEGIN, a savepoint, the COMMIT), a rollback to a
//!   savepoint did not complete, or a callback kept its payload: the transaction is rolled back
//!   and every member is processed again, each in a transaction of its own (the usual path), so
//!   that a message that breaks a group is isolated.
//!
//! Everything runs under `catch_unwind`: a panic before the commit processes every member again
//! alone; after it, each member is settled as the commit decided.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use super::dispatch::{Attempt, Dispatcher, FirstAttempt, Once, Scope};
use super::failure::{Failure, panic_message};
use crate::consumer::payload::Incoming;
use crate::transport::Delivery;
use crate::wake;

/// Hands the consumer's deliveries to groups. A delivery goes to a group that waits idle for
/// more; else to a new group while fewer than `in_flight` run (so that a slow callback delays
/// no other message while there is room); else, all groups being busy, to the open group with
/// the fewest deliveries queued. A group takes deliveries for `wait` after its first, and at
/// most `size`. With a size of 1, each delivery is handled alone, as without groups.
pub(crate) struct Groups {
    dispatcher: Arc<Dispatcher>,
    size: usize,
    wait: Duration,
    in_flight: usize,
    /// The groups taking more deliveries.
    open: Vec<OpenGroup>,
    /// A delivery taken from the broker that no group could take yet.
    held: Option<Delivery>,
    /// Set when the subscription ends: the groups then start no member they were given.
    ended: Arc<AtomicBool>,
}

/// A group that takes more deliveries.
struct OpenGroup {
    more: mpsc::Sender<Delivery>,
    /// How many deliveries it was given.
    given: usize,
    /// When it stops taking more.
    deadline: Instant,
    /// Whether it waits for more, its members so far processed.
    idle: Arc<AtomicBool>,
}

impl OpenGroup {
    fn queued(&self) -> usize {
        self.more.max_capacity() - self.more.capacity()
    }
}

impl Groups {
    /// Groups of at most `size` deliveries, open `wait` after their first.
    pub(crate) fn new(
        dispatcher: Arc<Dispatcher>,
        size: usize,
        wait: Duration,
        in_flight: usize,
    ) -> Groups {
        Groups {
            dispatcher,
            size: size.max(1),
            wait,
            in_flight,
            open: Vec::new(),
            held: None,
            ended: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Forgets the groups that take no more.
    fn prune(&mut self) {
        let now = Instant::now();
        let size = self.size;
        self.open
            .retain(|group| !group.more.is_closed() && group.deadline > now && group.given < size);
    }

    /// Whether another delivery can be taken from the broker now.
    pub(crate) fn can_take(&self, tasks: &JoinSet<()>) -> bool {
        let now = Instant::now();
        self.held.is_none()
            && (tasks.len() < self.in_flight
                || self
                    .open
                    .iter()
                    .any(|group| !group.more.is_closed() && group.deadline > now))
    }

    /// Gives a delivery to a group (see [`Groups`]); holds it when none can take it (see
    /// [`Groups::can_take`]).
    pub(crate) fn take(&mut self, delivery: Delivery, tasks: &mut JoinSet<()>) {
        if self.size == 1 {
            if tasks.len() < self.in_flight {
                tasks.spawn(self.dispatcher.clone().handle(delivery));
            } else {
                self.held = Some(delivery);
            }
            return;
        }
        self.prune();
        let idle = self
            .open
            .iter()
            .position(|group| group.idle.load(Ordering::SeqCst) && group.queued() == 0);
        let chosen = match idle {
            Some(index) => Some(index),
            None if tasks.len() < self.in_flight => None,
            None => self
                .open
                .iter()
                .enumerate()
                .min_by_key(|(_, group)| group.queued())
                .map(|(index, _)| index),
        };
        let delivery = match chosen {
            // Never full: the channel holds a whole group.
            Some(index) => match self.open[index].more.try_send(delivery) {
                Ok(()) => {
                    self.open[index].given += 1;
                    return;
                }
                Err(refused) => {
                    self.open.swap_remove(index);
                    refused.into_inner()
                }
            },
            None => delivery,
        };
        if tasks.len() < self.in_flight {
            let (more, receiver) = mpsc::channel(self.size);
            let deadline = Instant::now() + self.wait;
            let idle = Arc::new(AtomicBool::new(false));
            tasks.spawn(run(
                self.dispatcher.clone(),
                delivery,
                Source {
                    backlog: VecDeque::new(),
                    more: receiver,
                    deadline,
                    idle: idle.clone(),
                    ended: self.ended.clone(),
                },
                self.size,
                self.wait,
            ));
            self.open.push(OpenGroup {
                more,
                given: 1,
                deadline,
                idle,
            });
        } else {
            self.held = Some(delivery);
        }
    }

    /// A task ended: the delivery held, if any, can go to a group now.
    pub(crate) fn task_ended(&mut self, tasks: &mut JoinSet<()>) {
        if let Some(delivery) = self.held.take() {
            self.take(delivery, tasks);
        }
    }

    /// The subscription ended (lost, or the consumer stops): the groups take no more, those
    /// running finish the members they started, and the deliveries not started (given to a
    /// group, or held) are dropped unsettled, as those still in the transport are: the broker
    /// delivers them again.
    pub(crate) fn close(&mut self) {
        self.open.clear();
        self.held = None;
        self.ended.store(true, Ordering::SeqCst);
        self.ended = Arc::new(AtomicBool::new(false));
    }
}

/// One member of a group: its delivery, and how its attempt in the group ended.
struct Member {
    delivery: Delivery,
    message: Arc<Incoming>,
    span: tracing::Span,
    attempt: Option<Attempt>,
    /// Its attempt left the group's transaction unusable.
    broke: bool,
}

/// How a group's transaction ended.
enum Ended {
    Committed,
    /// Rolled back as a whole (why): every member is processed again alone, but the one that
    /// broke the group, which goes on from its attempt.
    Broken(String),
    /// The group's handling panicked before its commit (the panic's message): the member under
    /// way is dead-lettered, as a message whose handling panics is; the others are processed
    /// again alone.
    Panicked(String),
}

/// Processes groups, the first opened with `first` and fed by the source, until no delivery
/// given to this task is left.
async fn run(
    dispatcher: Arc<Dispatcher>,
    first: Delivery,
    mut source: Source,
    size: usize,
    wait: Duration,
) {
    source.backlog.push_back(first);
    let mut opened = true;
    while let Some(first) = source.backlog.pop_front() {
        if !opened && source.ended() {
            // Not started: delivered again to the next subscription.
            break;
        }
        if !opened {
            source.deadline = Instant::now() + wait;
        }
        opened = false;
        let committed = AtomicBool::new(false);
        let mut members = Vec::with_capacity(size);
        let ended = AssertUnwindSafe(dispatcher.fill_and_commit(
            first,
            &mut source,
            size,
            &mut members,
            &committed,
        ))
        .catch_unwind()
        .await;
        // The group is closed: what was given to it meanwhile waits for the next one here.
        source.close();
        let ended = match ended {
            Ok(ended) => ended,
            Err(panic) if committed.load(Ordering::SeqCst) => {
                tracing::error!(queue = %dispatcher.queue, panic = %panic_message(panic), "a group panicked after its commit");
                Ended::Committed
            }
            Err(panic) => Ended::Panicked(panic_message(panic)),
        };
        dispatcher.settle_group(ended, members).await;
    }
}

/// Where a group's next member comes from: deliveries left by the previous group of the task,
/// then those the consumer gives it, until the deadline.
struct Source {
    backlog: VecDeque<Delivery>,
    more: mpsc::Receiver<Delivery>,
    deadline: Instant,
    /// Set while waiting for the consumer to give more.
    idle: Arc<AtomicBool>,
    /// Set when the subscription has ended (see [`Groups::close`]).
    ended: Arc<AtomicBool>,
}

impl Source {
    async fn next(&mut self) -> Option<Delivery> {
        if self.ended() {
            return None;
        }
        if let Some(delivery) = self.backlog.pop_front() {
            return Some(delivery);
        }
        match self.more.try_recv() {
            Ok(delivery) => Some(delivery),
            Err(TryRecvError::Disconnected) => None,
            Err(TryRecvError::Empty) => {
                self.idle.store(true, Ordering::SeqCst);
                let next = tokio::time::timeout_at(self.deadline, self.more.recv()).await;
                self.idle.store(false, Ordering::SeqCst);
                next.ok().flatten().filter(|_| !self.ended())
            }
        }
    }

    fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Takes no more from the consumer; keeps what it gave meanwhile for the next group.
    fn close(&mut self) {
        self.more.close();
        while let Ok(delivery) = self.more.try_recv() {
            self.backlog.push_back(delivery);
        }
    }
}

impl Dispatcher {
    /// Opens the group's transaction, runs its members in savepoints as they come, and commits.
    async fn fill_and_commit(
        &self,
        first: Delivery,
        source: &mut Source,
        size: usize,
        members: &mut Vec<Member>,
        committed: &AtomicBool,
    ) -> Ended {
        let mut next = Some(first);
        let begun = self.bounds.begin_consumer(&self.db, self.callback_timeout);
        let mut txn = match begun.await {
            Ok(txn) => txn,
            Err(err) => {
                if let Some(first) = next.take() {
                    members.push(self.member(first));
                }
                return Ended::Broken(format!("BEGIN failed: {}", Failure::Database(err)));
            }
        };
        loop {
            let delivery = match next.take() {
                Some(delivery) => delivery,
                None if members.len() >= size => break,
                None => match source.next().await {
                    Some(delivery) => delivery,
                    None => break,
                },
            };
            members.push(self.member(delivery));
            let Some(member) = members.last_mut() else {
                break;
            };
            let span = member.span.clone();
            span.record("attempt", 1);
            let once = self
                .run_once(txn, Scope::Member, &member.message)
                .instrument(span)
                .await;
            match once {
                Once::Saved(back) => {
                    member.attempt = Some(Attempt::Committed);
                    txn = back;
                }
                Once::Ended { attempt, txn: None } => {
                    let reason = match &attempt {
                        Attempt::Failed(failure) => {
                            format!("a member left the transaction unusable: {failure}")
                        }
                        _ => "a rollback to a savepoint did not complete".to_owned(),
                    };
                    member.attempt = Some(attempt);
                    member.broke = true;
                    // The transaction went with the member: the connection may still be busy
                    // (a statement of an abandoned callback); the pool rolls it back or closes
                    // it.
                    return Ended::Broken(reason);
                }
                Once::Ended {
                    attempt,
                    txn: Some(back),
                } => {
                    txn = back;
                    let transient =
                        matches!(&attempt, Attempt::Failed(failure) if failure.is_transient());
                    member.attempt = Some(attempt);
                    if transient {
                        // Retried alone, before the deliveries behind it.
                        break;
                    }
                }
            }
        }
        match self.bounds.call(txn.commit()).await {
            Ok(()) => {
                // The last thing before returning: a panic cannot come between.
                committed.store(true, Ordering::SeqCst);
                Ended::Committed
            }
            Err(err) => Ended::Broken(format!("COMMIT failed: {}", Failure::Database(err))),
        }
    }

    fn member(&self, delivery: Delivery) -> Member {
        let message = Arc::new(Incoming::new(&delivery, &self.queue));
        let span = self.message_span(&message);
        Member {
            delivery,
            message,
            span,
            attempt: None,
            broke: false,
        }
    }

    /// Settles each member of an ended group, in order, as [`Dispatcher::handle`] settles a
    /// message (retries of a transient failure included); processes each again alone when the
    /// group was rolled back.
    async fn settle_group(&self, ended: Ended, members: Vec<Member>) {
        match ended {
            Ended::Committed => {
                let saved = members
                    .iter()
                    .filter(|member| matches!(member.attempt, Some(Attempt::Committed)))
                    .count();
                crate::metrics::consumer_group(&self.queue, members.len());
                if saved > 0 {
                    // Outbox rows the callbacks wrote are committed: wake this process's relays.
                    wake::committed();
                }
                for member in members {
                    let Member {
                        delivery,
                        message,
                        span,
                        attempt,
                        ..
                    } = member;
                    let Some(attempt) = attempt else {
                        // Not reached: every member of a committed group has an outcome.
                        self.conclude(&delivery, None).await;
                        continue;
                    };
                    if matches!(attempt, Attempt::Committed) {
                        crate::metrics::consumer_committed(
                            &self.queue,
                            message
                                .headers
                                .get(crate::headers::MSG_SENT_TIME)
                                .map(String::as_str),
                        );
                    }
                    let first = FirstAttempt {
                        message,
                        span,
                        attempt,
                    };
                    self.conclude(&delivery, Some(first)).await;
                }
            }
            Ended::Broken(reason) => {
                tracing::warn!(
                    queue = %self.queue,
                    members = members.len(),
                    %reason,
                    "a group of messages was rolled back; processing each again in a transaction of its own"
                );
                for member in members {
                    match member.attempt {
                        Some(attempt) if member.broke => {
                            let first = FirstAttempt {
                                message: member.message,
                                span: member.span,
                                attempt,
                            };
                            self.conclude(&member.delivery, Some(first)).await;
                        }
                        _ => self.conclude(&member.delivery, None).await,
                    }
                }
            }
            Ended::Panicked(panic) => {
                for member in members {
                    if member.attempt.is_some() {
                        self.conclude(&member.delivery, None).await;
                        continue;
                    }
                    tracing::error!(
                        parent: &member.span,
                        queue = %self.queue,
                        %panic,
                        committed = false,
                        "handling a message panicked outside the callback; its effects are rolled back: dead-lettering it"
                    );
                    self.reject(&member.delivery).await;
                }
            }
        }
    }
}
