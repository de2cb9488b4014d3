//! Publishing one batch: the checks before it, then its publishes on a confirm-mode channel of
//! its own, and each publish's outcome from its confirm and the batch's returns.
//!
//! Why a channel per batch in flight: lapin gives a returned message to whichever confirm of its
//! channel completes next, so on a channel that several batches share, one batch's confirm can
//! carry another batch's return, and nothing tells the two apart. A channel that carries one
//! batch at a time holds only that batch's returns, all handed out once its confirms completed;
//! they are then pinned on the batch's publishes by identity ([`super::returns`]).
//!
//! The link keeps a few idle publisher channels ([`Publishers`]): a batch takes one (or opens
//! one), and gives it back once every confirm of the batch came. After a confirm timeout or any
//! error the channel is dropped (lapin closes it), so that a late confirm or return of that batch
//! can never reach a later one. Batches still go pipelined, each on its own channel.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use super::link::{Link, broker_error};
use super::returns::{self, Confirmed, Identity};
use super::routing::{self, Endpoint};
use super::{BLOCKED_POLL, CONFIRM_WINDOW, lock};
use crate::transport::{Outcome, Outgoing, SendReport, TransportError};

/// Idle publisher channels a link keeps for its next batches; beyond that, a channel given
/// back is closed.
const IDLE_PUBLISHERS: usize = 16;

/// The link's idle confirm-mode channels, each free of any batch.
#[derive(Default)]
pub(super) struct Publishers {
    idle: Mutex<Vec<Channel>>,
}

impl Publishers {
    /// An idle channel that is still open, if any.
    fn take(&self) -> Option<Channel> {
        let mut idle = lock(&self.idle);
        while let Some(channel) = idle.pop() {
            if channel.status().connected() {
                return Some(channel);
            }
        }
        None
    }

    /// Keeps `channel` for a later batch (every confirm of its batch came).
    pub(super) fn give_back(&self, channel: Channel) {
        let mut idle = lock(&self.idle);
        if idle.len() < IDLE_PUBLISHERS {
            idle.push(channel);
        }
        // Else dropped: lapin closes a channel when its last handle goes.
    }
}

/// A new channel in confirm mode.
pub(super) async fn open_publisher(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// A message of the batch that is to be published: its index, where it goes, its properties.
struct Plan {
    index: usize,
    endpoint: Endpoint,
    properties: BasicProperties,
}

impl Link {
    /// Publishes `messages` and waits for their confirms, all within `timeout`.
    pub(super) async fn send(&self, messages: &[Outgoing], timeout: Duration) -> SendReport {
        let deadline = tokio::time::Instant::now() + timeout;
        // A blocked connection takes publishes and never confirms them: wait, then give back.
        while self.connection.status().blocked() {
            if tokio::time::Instant::now() >= deadline {
                // As over STOMP: no answer in time, nobody's fault, nothing charged.
                tracing::warn!(broker = %self.address, "the broker blocks the connection (a resource alarm): nothing published");
                return SendReport::unsent(messages.len(), TransportError::Blocked(timeout));
            }
            tokio::time::sleep(BLOCKED_POLL).await;
        }
        let mut outcomes: Vec<Option<Outcome>> = vec![None; messages.len()];
        let plans = match self.checked(messages, &mut outcomes).await {
            Ok(plans) => plans,
            Err(err) => return SendReport::unsent(messages.len(), err),
        };
        if !plans.is_empty() {
            self.publish(messages, plans, deadline, timeout, &mut outcomes)
                .await;
        }
        SendReport {
            outcomes: outcomes
                .into_iter()
                .map(|outcome| outcome.unwrap_or_else(|| Outcome::unknown(TransportError::Closed)))
                .collect(),
        }
    }

    /// The messages to publish, once each distinct exchange was checked and each queue a SEND
    /// would declare declared, before anything is published; the ones refused get their
    /// outcome. An error that is not a refusal fails the whole batch.
    async fn checked(
        &self,
        messages: &[Outgoing],
        outcomes: &mut [Option<Outcome>],
    ) -> Result<Vec<Plan>, TransportError> {
        let mut plans = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            match Endpoint::parse(&message.destination)
                .and_then(|endpoint| Ok((endpoint, routing::properties(&message.headers)?)))
            {
                Ok((endpoint, properties)) => plans.push(Plan {
                    index,
                    endpoint,
                    properties,
                }),
                Err(reason) => {
                    outcomes[index] = Some(Outcome::Refused(TransportError::Broker {
                        message: format!("cannot publish to `{}`", message.destination),
                        detail: reason,
                    }))
                }
            }
        }
        let key = |endpoint: &Endpoint| match endpoint {
            Endpoint::Topic(_) | Endpoint::Exchange(..) => Some(endpoint.routing().0.to_owned()),
            Endpoint::Queue(name) => Some(format!("queue:{name}")),
            Endpoint::AmqQueue(_) | Endpoint::ReplyQueue(_) => None,
        };
        let mut checked: HashSet<String> = HashSet::new();
        let mut refused: HashMap<String, TransportError> = HashMap::new();
        for plan in &plans {
            let Some(key) = key(&plan.endpoint) else {
                continue;
            };
            if checked.contains(&key) {
                continue;
            }
            let check = match &plan.endpoint {
                Endpoint::Queue(name) => {
                    self.declare_for_send(name, &messages[plan.index].headers)
                        .await
                }
                _ => self.check_exchange(&key).await,
            };
            match check {
                Ok(()) => {}
                Err(err @ TransportError::Broker { .. }) => {
                    refused.insert(key.clone(), err);
                }
                Err(err) => return Err(err),
            }
            checked.insert(key);
        }
        Ok(plans
            .into_iter()
            .filter(|plan| {
                let err = key(&plan.endpoint).and_then(|key| refused.get(&key));
                if let Some(err) = err {
                    outcomes[plan.index] = Some(Outcome::Refused(err.clone()));
                }
                err.is_none()
            })
            .collect())
    }

    /// Publishes `plans` on a channel of their own and records each one's outcome.
    async fn publish(
        &self,
        messages: &[Outgoing],
        plans: Vec<Plan>,
        deadline: tokio::time::Instant,
        timeout: Duration,
        outcomes: &mut [Option<Outcome>],
    ) {
        let unknown = |reason: TransportError, outcomes: &mut [Option<Outcome>]| {
            for plan in &plans {
                outcomes[plan.index] = Some(Outcome::unknown(reason.clone()));
            }
        };
        let channel = match self.publishers.take() {
            Some(channel) => channel,
            None => match tokio::time::timeout_at(deadline, open_publisher(&self.connection)).await
            {
                Ok(Ok(channel)) => channel,
                Ok(Err(err)) => return unknown(broker_error(err), outcomes),
                Err(_) => return unknown(TransportError::ReceiptTimeout(timeout), outcomes),
            },
        };
        // What the broker said of each publish, before its returns are pinned.
        let mut confirmed: Vec<Option<Confirmed>> = vec![None; plans.len()];
        let mut returned = Vec::new();
        let numbers: Vec<usize> = (0..plans.len()).collect();
        for chunk in numbers.chunks(CONFIRM_WINDOW) {
            // A chunk's permits at once: batches that each waited for the rest of theirs while
            // holding some would wait for each other until the deadline.
            let count = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            let mut permits = match tokio::time::timeout_at(
                deadline,
                self.window.clone().acquire_many_owned(count),
            )
            .await
            {
                Ok(Ok(permits)) => permits,
                failed => {
                    let reason = match failed {
                        Ok(_) => TransportError::Closed,
                        Err(_) => TransportError::ReceiptTimeout(timeout),
                    };
                    for number in chunk {
                        confirmed[*number] = Some(Confirmed::Not(reason.clone()));
                    }
                    continue;
                }
            };
            let mut pending = Vec::with_capacity(chunk.len());
            for number in chunk {
                let plan = &plans[*number];
                let (exchange, routing_key) = plan.endpoint.routing();
                let published = tokio::time::timeout_at(
                    deadline,
                    channel.basic_publish(
                        exchange.into(),
                        routing_key.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &messages[plan.index].body,
                        plan.properties.clone(),
                    ),
                )
                .await;
                match published {
                    Ok(Ok(confirm)) => pending.push((*number, confirm)),
                    Ok(Err(err)) => confirmed[*number] = Some(Confirmed::Not(broker_error(err))),
                    Err(_) => {
                        confirmed[*number] =
                            Some(Confirmed::Not(TransportError::ReceiptTimeout(timeout)))
                    }
                }
            }
            // Confirms come in publish order on the channel: awaiting them in that order costs
            // no head-of-line wait. The returns they carry are the batch's, in no useful order.
            for (number, confirm) in pending {
                confirmed[number] = Some(match tokio::time::timeout_at(deadline, confirm).await {
                    Ok(Ok(Confirmation::Ack(message))) => {
                        returned.extend(message);
                        Confirmed::Ack
                    }
                    Ok(Ok(Confirmation::Nack(message))) => {
                        returned.extend(message);
                        Confirmed::Nack
                    }
                    Ok(Ok(Confirmation::NotRequested)) => Confirmed::Not(
                        TransportError::ConnectionLost("the channel lost confirm mode".into()),
                    ),
                    Ok(Err(err)) => Confirmed::Not(broker_error(err)),
                    Err(_) => Confirmed::Not(TransportError::ReceiptTimeout(timeout)),
                });
                drop(permits.split(1));
            }
        }
        let sent: Vec<(Identity<'_>, Confirmed)> = plans
            .iter()
            .zip(confirmed)
            .map(|(plan, confirmed)| {
                let (exchange, routing_key) = plan.endpoint.routing();
                (
                    Identity::of(
                        exchange,
                        routing_key,
                        &plan.properties,
                        &messages[plan.index].body,
                    ),
                    confirmed.unwrap_or(Confirmed::Not(TransportError::Closed)),
                )
            })
            .collect();
        let complete = sent
            .iter()
            .all(|(_, confirmed)| !matches!(confirmed, Confirmed::Not(_)));
        for (plan, outcome) in plans.iter().zip(returns::pin(&sent, &returned, complete)) {
            outcomes[plan.index] = Some(outcome);
        }
        if complete && channel.status().connected() {
            self.publishers.give_back(channel);
        }
        // Else dropped, and closed by lapin: a late confirm or return of this batch goes with it.
    }
}
