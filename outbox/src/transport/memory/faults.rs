//! The faults a test can inject into the in-memory broker: refusals, an outage, silently
//! discarded SENDs, blocked publishers (a resource alarm), late receipts, `mandatory` publishes,
//! queues full with `reject-publish`, messages that do not decode.

use std::time::Duration;

use super::MemoryTransport;
#[cfg(doc)]
use crate::transport::{Outcome, SubscriptionEvent, Transport, TransportError};

impl MemoryTransport {
    /// From now on a SEND to a destination starting with `destination_prefix` is refused as
    /// RabbitMQ refuses a SEND to a missing exchange: a `NOT_FOUND` error, and the connection
    /// closes, so no later message of the same batch is receipted.
    pub fn refuse(&self, destination_prefix: &str) {
        self.broker().refused.push(destination_prefix.to_owned());
    }

    /// Undoes every [`MemoryTransport::refuse`].
    pub fn clear_refusals(&self) {
        self.broker().refused.clear();
    }

    /// `true`: the broker goes down: every connection closes (subscription receivers end,
    /// unacked deliveries return to their queues) and connect, send and subscribe fail with
    /// [`TransportError::Connect`] until `set_down(false)`. Queues and their messages survive.
    pub fn set_down(&self, down: bool) {
        let mut broker = self.broker();
        broker.down = down;
        if down {
            let open: Vec<u64> = broker.connections.keys().copied().collect();
            for connection in open {
                broker.close_connection(connection);
            }
        }
    }

    /// From now on a SEND to a destination starting with `destination_prefix` is dropped
    /// silently: no receipt, no error, the connection stays open (a frame a broker discards, or
    /// one lost on the way). Its sender learns of it only by a receipt timeout.
    pub fn discard(&self, destination_prefix: &str) {
        self.broker().discarded.push(destination_prefix.to_owned());
    }

    /// `true`: publishes are `mandatory`, as the AMQP transport's: a message that reaches no
    /// queue is answered [`Outcome::Unroutable`] (RabbitMQ's `basic.return` before the confirm)
    /// instead of receipted and dropped. `false` (the default): STOMP's behaviour.
    pub fn set_mandatory(&self, mandatory: bool) {
        self.broker().mandatory = mandatory;
    }

    /// Limits `queue` (declared durable, with no arguments, if missing) to `max_length` ready
    /// messages with `x-overflow: reject-publish`, as RabbitMQ's `x-max-length` does; `None`
    /// lifts the limit. A publish the queue has no room for is rejected: in mandatory (AMQP)
    /// mode that message is [`Outcome::Nacked`]; otherwise (STOMP) the connection closes with
    /// no ERROR, as RabbitMQ 3.10's STOMP plugin closes it, every receipt pending on it failing
    /// ([`Outcome::Unknown`], [`TransportError::ConnectionLost`]) and the rest of the batch not
    /// written. Consuming makes room.
    pub fn limit_queue(&self, queue: &str, max_length: Option<usize>) {
        let mut broker = self.broker();
        if !broker.queues.contains_key(queue) {
            let declaration = super::broker::Declaration {
                durable: true,
                auto_delete: false,
                arguments: Vec::new(),
            };
            let _ = broker.declare(queue, &declaration);
        }
        if let Some(q) = broker.queues.get_mut(queue) {
            q.max_length = max_length;
        }
    }

    /// Undoes every [`MemoryTransport::discard`].
    pub fn clear_discards(&self) {
        self.broker().discarded.clear();
    }

    /// `true`: the broker stops reading publishers, as RabbitMQ does under a memory or disk
    /// alarm: SENDs are neither routed nor receipted, and their senders time out. `false`: the
    /// frames waiting are read, in order, and receipted.
    pub fn set_blocked(&self, blocked: bool) {
        let mut broker = self.broker();
        broker.blocked = blocked;
        if !blocked {
            let open: Vec<u64> = broker.connections.keys().copied().collect();
            for connection in open {
                broker.read_unread(&self.broker, connection);
            }
        }
    }

    /// Receipts come `delay` after their message is routed (default: at once), as they do when
    /// RabbitMQ waits for a disk write before confirming. A refusal in the meantime fails them.
    pub fn set_receipt_delay(&self, delay: Duration) {
        self.broker().receipt_delay = delay;
    }

    /// How long [`Transport::send`] waits for receipts (default 10 s, as
    /// `OUTBOX_RECEIPT_TIMEOUT`).
    pub fn set_receipt_timeout(&self, timeout: Duration) {
        self.broker().receipt_timeout = Some(timeout);
    }

    /// From now on a message sent to a destination starting with `destination_prefix` reaches
    /// its consumers as one that does not decode (over STOMP: a header value that is not UTF-8,
    /// a frame above the maximum size), and is treated as the STOMP transport treats one: a
    /// subscription that declares a dead-letter route (`x-dead-letter-*`, as a consumer's does)
    /// receives [`SubscriptionEvent::Undecodable`] instead of the message, which goes to the
    /// dead-letter queue (dropped under automatic acknowledgement); any other subscription is
    /// not handed it and holds it unacknowledged until the connection closes. Where the STOMP
    /// transport decides a moment later, the broker decides as it hands the message over, so a
    /// subscription that only declares its queue rejects one waiting there too.
    pub fn undecodable(&self, destination_prefix: &str) {
        self.broker()
            .undecodable
            .push(destination_prefix.to_owned());
    }

    /// Undoes every [`MemoryTransport::undecodable`].
    pub fn clear_undecodable(&self) {
        self.broker().undecodable.clear();
    }
}
