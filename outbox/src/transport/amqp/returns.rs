//! The messages RabbitMQ returned (`basic.return`: no queue took a `mandatory` publish), matched
//! to the publishes of one batch by identity rather than by the confirm lapin hands them with.
//!
//! lapin keeps a channel's returned messages in one queue and gives the oldest to whichever
//! confirm completes next; a multiple `basic.ack` completes its confirms in a `HashMap`'s order.
//! So the return a confirm carries need not be its own publish's. What holds instead, on a
//! channel that carries one batch at a time ([`super::publish`]): RabbitMQ sends a publish's
//! return before its ack, and lapin handles a channel's frames in order, so once every confirm
//! of the batch has completed, every return of the batch has been handed to one of them, and
//! nothing else was. The batch's returns are then complete, and each is pinned on the publish
//! with its identity: exchange, routing key, message id (`dop-msg-id`, else `cap-msg-id`, else
//! the `message-id` property) and body.
//!
//! When some confirms did not complete (a timeout, a closed channel), a completed one may still
//! have been handed a return of an unconfirmed publish, while its own return waits in lapin's
//! queue. A confirm without a return then proves the publish routed only if every return
//! received belongs to a publish whose confirm completed (see [`pin`]).

use std::collections::HashMap;

use lapin::BasicProperties;
use lapin::message::BasicReturnMessage;
use lapin::types::AMQPValue;

use crate::headers::{CAP_MSG_ID, MSG_ID};
use crate::transport::{Outcome, TransportError};

/// What tells one publish of a batch from another, and its return from another's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Identity<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    id: Option<&'a [u8]>,
    body: &'a [u8],
}

impl<'a> Identity<'a> {
    /// The identity of a message published with these properties and body.
    pub(super) fn of(
        exchange: &'a str,
        routing_key: &'a str,
        properties: &'a BasicProperties,
        body: &'a [u8],
    ) -> Identity<'a> {
        Identity {
            exchange,
            routing_key,
            id: message_id(properties),
            body,
        }
    }

    /// The identity of the publish the broker returned.
    pub(super) fn of_return(returned: &'a BasicReturnMessage) -> Identity<'a> {
        let delivery = &returned.delivery;
        Identity::of(
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            &delivery.properties,
            &delivery.data,
        )
    }

    /// Where it went, as a text for a log or an error.
    fn route(&self) -> String {
        format!("exchange `{}`, key `{}`", self.exchange, self.routing_key)
    }
}

/// The message id a publish carries: `dop-msg-id`, else `cap-msg-id` (as consumers read it),
/// else the AMQP `message-id` property.
fn message_id(properties: &BasicProperties) -> Option<&[u8]> {
    let header = |name: &str| {
        properties
            .headers()
            .as_ref()
            .and_then(|table| table.inner().get(name))
            .and_then(|value| match value {
                AMQPValue::LongString(text) => Some(text.as_bytes()),
                AMQPValue::ShortString(text) => Some(text.as_str().as_bytes()),
                _ => None,
            })
    };
    header(MSG_ID).or_else(|| header(CAP_MSG_ID)).or_else(|| {
        properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().as_bytes())
    })
}

/// What the broker said of one publish, its return left aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Confirmed {
    /// `basic.ack`.
    Ack,
    /// `basic.nack`.
    Nack,
    /// No confirm: a timeout, a closed channel or connection.
    Not(TransportError),
}

/// The outcome of each publish of a batch (`sent`, in order), from its own confirm and the
/// returns the batch's confirms carried. `every_confirm_completed`: no confirm of the batch is
/// missing, so `returned` holds every return of the batch.
///
/// A publish whose identity came back is [`Outcome::Unroutable`], never receipted. When only
/// some of several publishes with one identity came back, which ones is not known: they are
/// all unknown ([`TransportError::ReturnNotPinned`]), not charged and sent again. An ack
/// without a return is [`Outcome::Receipted`] only when the returns are known complete for it;
/// else it is unknown too.
pub(super) fn pin(
    sent: &[(Identity<'_>, Confirmed)],
    returned: &[BasicReturnMessage],
    every_confirm_completed: bool,
) -> Vec<Outcome> {
    let mut publishes: HashMap<Identity<'_>, Vec<usize>> = HashMap::new();
    for (index, (identity, _)) in sent.iter().enumerate() {
        publishes.entry(*identity).or_default().push(index);
    }
    let mut returns: HashMap<Identity<'_>, Vec<&BasicReturnMessage>> = HashMap::new();
    let mut stray = None;
    for message in returned {
        let identity = Identity::of_return(message);
        if publishes.contains_key(&identity) {
            returns.entry(identity).or_default().push(message);
        } else {
            tracing::warn!(route = %identity.route(), "the broker returned a message that matches no publish of its batch");
            stray.get_or_insert(identity);
        }
    }
    // More returns than publishes of an identity: one of them is not this batch's.
    if let Some((identity, _)) = returns
        .iter()
        .find(|(identity, messages)| messages.len() > publishes[*identity].len())
    {
        stray.get_or_insert(*identity);
    }
    // Whether a confirm without a return proves its publish routed: every return of the batch
    // was handed out, or every one received belongs to publishes whose confirms completed (a
    // completed confirm's own return then cannot be left behind in lapin's queue).
    let returns_complete = stray.is_none()
        && (every_confirm_completed
            || returns.keys().all(|identity| {
                publishes[identity]
                    .iter()
                    .all(|index| !matches!(sent[*index].1, Confirmed::Not(_)))
            }));
    let unpinned = |identity: &Identity<'_>| {
        Outcome::unknown(TransportError::ReturnNotPinned {
            route: identity.route(),
        })
    };
    let mut outcomes: Vec<Option<Outcome>> = vec![None; sent.len()];
    for (identity, indexes) in &publishes {
        let came_back = returns.get(identity).map_or(0, Vec::len);
        if came_back == 0 {
            for index in indexes {
                outcomes[*index] = Some(match &sent[*index].1 {
                    Confirmed::Ack if returns_complete => Outcome::Receipted,
                    Confirmed::Ack => match stray {
                        Some(stray) => unpinned(&stray),
                        None => Outcome::unknown(missing_confirm(sent)),
                    },
                    Confirmed::Nack => Outcome::Nacked,
                    Confirmed::Not(reason) => Outcome::unknown(reason.clone()),
                });
            }
        } else if came_back == indexes.len() {
            let reply = returns[identity]
                .first()
                .map(|message| format!("{} {}", message.reply_code, message.reply_text.as_str()))
                .unwrap_or_default();
            for index in indexes {
                outcomes[*index] = Some(Outcome::Unroutable(reply.clone()));
            }
        } else {
            tracing::warn!(
                route = %identity.route(),
                sent = indexes.len(),
                returned = came_back,
                "identical messages sent together, some returned: all given back to be sent again"
            );
            for index in indexes {
                outcomes[*index] = Some(unpinned(identity));
            }
        }
    }
    outcomes
        .into_iter()
        .map(|outcome| outcome.unwrap_or_else(|| Outcome::unknown(TransportError::Closed)))
        .collect()
}

/// Why a confirm of the batch is missing: the first publish's that has none.
fn missing_confirm(sent: &[(Identity<'_>, Confirmed)]) -> TransportError {
    sent.iter()
        .find_map(|(_, confirmed)| match confirmed {
            Confirmed::Not(reason) => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or(TransportError::Closed)
}

#[cfg(test)]
mod tests {
    use lapin::message::Delivery;
    use lapin::types::{FieldTable, LongString, ShortString};

    use super::*;

    fn properties(id: &str) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(MSG_ID),
            AMQPValue::LongString(LongString::from(id.as_bytes())),
        );
        BasicProperties::default().with_headers(headers)
    }

    fn returned(key: &str, properties: &BasicProperties, body: &[u8]) -> BasicReturnMessage {
        let mut delivery = Delivery::mock(
            0,
            ShortString::from("amq.topic"),
            ShortString::from(key),
            false,
            body.to_vec(),
        );
        delivery.properties = properties.clone();
        BasicReturnMessage {
            delivery,
            reply_code: 312,
            reply_text: ShortString::from("NO_ROUTE"),
        }
    }

    fn timeout() -> TransportError {
        TransportError::ReceiptTimeout(std::time::Duration::from_secs(1))
    }

    #[test]
    fn each_return_is_pinned_on_its_own_publish_whichever_confirm_carried_it() {
        let ids: Vec<BasicProperties> = (0..4).map(|n| properties(&n.to_string())).collect();
        // Bound, unbound, bound, unbound: the unbound ones come back, in any order.
        let keys = ["bound", "unbound", "bound", "unbound"];
        let sent: Vec<_> = (0..4)
            .map(|n| {
                (
                    Identity::of("amq.topic", keys[n], &ids[n], b"{}"),
                    Confirmed::Ack,
                )
            })
            .collect();
        let returns = [
            returned("unbound", &ids[3], b"{}"),
            returned("unbound", &ids[1], b"{}"),
        ];
        let outcomes = pin(&sent, &returns, true);
        let reply = Outcome::Unroutable("312 NO_ROUTE".into());
        assert_eq!(
            outcomes,
            [Outcome::Receipted, reply.clone(), Outcome::Receipted, reply]
        );
    }

    #[test]
    fn identical_publishes_partly_returned_are_all_unknown() {
        let same = properties("same");
        let other = properties("other");
        let sent = [
            (Identity::of("amq.topic", "k", &same, b"x"), Confirmed::Ack),
            (Identity::of("amq.topic", "k", &same, b"x"), Confirmed::Ack),
            (Identity::of("amq.topic", "k", &other, b"x"), Confirmed::Ack),
        ];
        let outcomes = pin(&sent, &[returned("k", &same, b"x")], true);
        assert!(matches!(
            &outcomes[..2],
            [Outcome::Unknown(a), Outcome::Unknown(b)]
                if matches!(a.reason, TransportError::ReturnNotPinned { .. })
                    && matches!(b.reason, TransportError::ReturnNotPinned { .. })
        ));
        assert_eq!(outcomes[2], Outcome::Receipted);
        // All of them returned: all unroutable.
        let both = [returned("k", &same, b"x"), returned("k", &same, b"x")];
        let outcomes = pin(&sent[..2], &both, true);
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Unroutable(_))));
    }

    #[test]
    fn an_ack_without_a_return_proves_nothing_while_a_return_may_be_left_behind() {
        let (a, b) = (properties("a"), properties("b"));
        // `b`'s confirm carried `a`'s return, and `a` was never confirmed: `b`'s own return may
        // wait in lapin's queue.
        let sent = [
            (
                Identity::of("amq.topic", "k", &a, b"x"),
                Confirmed::Not(timeout()),
            ),
            (Identity::of("amq.topic", "k", &b, b"x"), Confirmed::Ack),
        ];
        let outcomes = pin(&sent, &[returned("k", &a, b"x")], false);
        assert!(matches!(outcomes[0], Outcome::Unroutable(_)));
        assert_eq!(outcomes[1], Outcome::unknown(timeout()));
        // The returns received all belong to confirmed publishes: the ack proves `b` routed.
        let sent = [
            (Identity::of("amq.topic", "k", &a, b"x"), Confirmed::Ack),
            (Identity::of("amq.topic", "k", &b, b"x"), Confirmed::Ack),
            (
                Identity::of("amq.topic", "j", &b, b"x"),
                Confirmed::Not(timeout()),
            ),
        ];
        let outcomes = pin(&sent, &[returned("k", &a, b"x")], false);
        assert!(matches!(outcomes[0], Outcome::Unroutable(_)));
        assert_eq!(outcomes[1], Outcome::Receipted);
        assert_eq!(outcomes[2], Outcome::unknown(timeout()));
    }

    #[test]
    fn a_return_that_matches_no_publish_makes_every_bare_ack_unknown() {
        let (a, b) = (properties("a"), properties("b"));
        let sent = [
            (Identity::of("amq.topic", "k", &a, b"x"), Confirmed::Ack),
            (Identity::of("amq.topic", "k", &b, b"x"), Confirmed::Nack),
        ];
        let outcomes = pin(&sent, &[returned("k", &properties("z"), b"x")], true);
        assert!(matches!(
            &outcomes[0],
            Outcome::Unknown(unknown) if matches!(unknown.reason, TransportError::ReturnNotPinned { .. })
        ));
        assert_eq!(outcomes[1], Outcome::Nacked);
    }

    #[test]
    fn the_message_id_falls_back_to_cap_msg_id_then_the_property() {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(CAP_MSG_ID),
            AMQPValue::LongString(LongString::from(&b"cap"[..])),
        );
        let cap = BasicProperties::default().with_headers(headers);
        assert_eq!(message_id(&cap), Some(&b"cap"[..]));
        let property = BasicProperties::default().with_message_id(ShortString::from("m"));
        assert_eq!(message_id(&property), Some(&b"m"[..]));
        assert_eq!(message_id(&properties("d")), Some(&b"d"[..]));
        assert_eq!(message_id(&BasicProperties::default()), None);
    }
}
