//! The transport a case runs against, and what that transport answers where transports differ
//! by design (an unroutable message, a refused SEND) rather than by a limit of the memory broker.

use std::time::Duration;

use outbox::OutboxConfig;
use outbox::transport::{
    AmqpSettings, AmqpTransport, MemoryTransport, Outgoing, StompSettings, StompTransport,
    Transport,
};
use outbox_tests::limited_queue::LimitedQueue;
use outbox_tests::settings::{self, RABBITMQ_AMQP, RABBITMQ_STOMP, amqp_url};
use outbox_tests::stomp_peer::{QueueCleanup, queue_message_count, unique};

use super::listed;

/// The largest frame the STOMP subject reads: a larger MESSAGE is one it cannot decode (the
/// smallest `OUTBOX_STOMP_MAX_FRAME_SIZE` allowed).
const STOMP_MAX_FRAME_SIZE: usize = 4096;

/// What a subject answers a message that no queue takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unroutable {
    /// Receipted, and dropped by the broker (STOMP).
    Dropped,
    /// [`outbox::transport::Outcome::Unroutable`] (AMQP's `mandatory` publish).
    Returned,
}

/// What a subject answers a batch where the broker refuses one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The refusal closes the connection: the refused message and every one pending after it
    /// is unknown, with the broker's error (STOMP: RabbitMQ's ERROR names no receipt).
    ClosesTheConnection,
    /// The destination is checked before publishing: exactly the refused message is refused,
    /// the others are confirmed (AMQP's passive `exchange.declare`).
    RefusesTheMessage,
}

/// What a subject answers a publish to a queue full with `x-overflow: reject-publish`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rejection {
    /// That message alone is [`outbox::transport::Outcome::Nacked`] (AMQP's `basic.nack`).
    Nacks,
    /// The connection closes with no ERROR: the rejected message and every one pending with it
    /// is unknown, lost with the connection (RabbitMQ 3.10's STOMP plugin).
    ClosesTheConnection,
}

/// A queue of the subject's broker limited to a few messages, rejecting publishes beyond.
pub(crate) struct Limited {
    pub(super) name: String,
    _declared: Option<LimitedQueue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `MemoryTransport` as it is by default: STOMP's answers.
    MemoryStomp,
    /// `MemoryTransport` with `set_mandatory(true)`: AMQP's answers to an unroutable message.
    MemoryAmqp,
    Stomp,
    Amqp,
}

/// A transport under test, with the broker behind it.
pub(crate) struct Subject {
    kind: Kind,
    config: OutboxConfig,
    transport: Box<dyn Transport>,
    memory: Option<MemoryTransport>,
}

impl Subject {
    /// Every subject's name, as the tests and the differences name them.
    pub(super) const NAMES: &[&str] = &["memory_stomp", "memory_amqp", "stomp", "amqp"];

    /// The in-memory broker, answering as RabbitMQ answers STOMP.
    pub(super) fn memory_stomp() -> Subject {
        Subject::memory(Kind::MemoryStomp)
    }

    /// The in-memory broker, answering as RabbitMQ answers the AMQP transport's publishes.
    pub(super) fn memory_amqp() -> Subject {
        let subject = Subject::memory(Kind::MemoryAmqp);
        if let Some(memory) = &subject.memory {
            memory.set_mandatory(true);
        }
        subject
    }

    fn memory(kind: Kind) -> Subject {
        let memory = MemoryTransport::new();
        Subject {
            kind,
            config: settings::stomp(RABBITMQ_STOMP),
            transport: Box::new(memory.clone()),
            memory: Some(memory),
        }
    }

    /// The STOMP transport, to RabbitMQ's STOMP plugin.
    pub(super) fn stomp() -> Subject {
        let mut config = settings::stomp(RABBITMQ_STOMP);
        config.stomp_max_frame_size = STOMP_MAX_FRAME_SIZE;
        Subject {
            kind: Kind::Stomp,
            transport: stomp_transport(&config),
            config,
            memory: None,
        }
    }

    /// The AMQP 0-9-1 transport, to RabbitMQ.
    pub(super) fn amqp() -> Subject {
        let addr = RABBITMQ_AMQP.parse().expect("an address");
        let config = settings::amqp(&amqp_url(addr));
        Subject {
            kind: Kind::Amqp,
            transport: amqp_transport(&config),
            config,
            memory: None,
        }
    }

    /// Every subject, for the test that holds the differences to them.
    pub(super) fn every() -> Vec<Subject> {
        vec![
            Subject::memory_stomp(),
            Subject::memory_amqp(),
            Subject::stomp(),
            Subject::amqp(),
        ]
    }

    /// Its name in the tests and in the differences.
    pub(super) fn name(&self) -> &'static str {
        match self.kind {
            Kind::MemoryStomp => "memory_stomp",
            Kind::MemoryAmqp => "memory_amqp",
            Kind::Stomp => "stomp",
            Kind::Amqp => "amqp",
        }
    }

    /// The settings it was built from (consumer topologies read their queue headers).
    pub(super) fn config(&self) -> &OutboxConfig {
        &self.config
    }

    /// The transport under test.
    pub(super) fn transport(&self) -> &dyn Transport {
        self.transport.as_ref()
    }

    /// Another connection to the same broker, as a second process would open.
    pub(super) fn connection(&self) -> Box<dyn Transport> {
        match (&self.memory, self.kind) {
            (Some(memory), _) => Box::new(memory.new_connection()),
            (None, Kind::Amqp) => amqp_transport(&self.config),
            (None, _) => stomp_transport(&self.config),
        }
    }

    /// Deletes the queues from RabbitMQ when dropped (nothing to delete in memory).
    pub(super) fn cleanup(&self, queues: &[&str]) -> QueueCleanup {
        match self.memory {
            Some(_) => QueueCleanup(Vec::new()),
            None => QueueCleanup(queues.iter().map(|q| (*q).to_owned()).collect()),
        }
    }

    /// The messages in a queue, ready and unacknowledged; `None` if it does not exist.
    pub(super) fn queue_message_count(&self, queue: &str) -> Option<usize> {
        match &self.memory {
            Some(memory) => memory
                .queue_exists(queue)
                .then(|| memory.queue_len(queue) + memory.unacked_len(queue)),
            None => queue_message_count(queue),
        }
    }

    /// How long to wait before concluding that nothing more arrives.
    pub(super) fn quiet(&self) -> Duration {
        match self.memory {
            Some(_) => Duration::from_millis(100),
            None => Duration::from_millis(700),
        }
    }

    /// Its answer to a message no queue takes.
    pub(super) fn unroutable(&self) -> Unroutable {
        match self.kind {
            Kind::MemoryStomp | Kind::Stomp => Unroutable::Dropped,
            Kind::MemoryAmqp | Kind::Amqp => Unroutable::Returned,
        }
    }

    /// Its answer to a batch with a refused message; `None` where the memory broker cannot
    /// answer as the transport it stands for.
    pub(super) fn refusal(&self) -> Option<Refusal> {
        match self.kind {
            Kind::MemoryStomp | Kind::Stomp => Some(Refusal::ClosesTheConnection),
            Kind::Amqp => Some(Refusal::RefusesTheMessage),
            Kind::MemoryAmqp => None,
        }
    }

    /// Its answer to a publish to a full queue with `x-overflow: reject-publish`.
    pub(super) fn rejection(&self) -> Rejection {
        match self.kind {
            Kind::MemoryStomp | Kind::Stomp => Rejection::ClosesTheConnection,
            Kind::MemoryAmqp | Kind::Amqp => Rejection::Nacks,
        }
    }

    /// Whether the transport waits before reconnecting after the broker closed a connection
    /// early with receipts outstanding (the STOMP transport); the memory broker does not.
    pub(super) fn paces_reconnections(&self) -> bool {
        self.kind == Kind::Stomp
    }

    /// A queue limited to `max_length` ready messages with `x-overflow: reject-publish`: on
    /// RabbitMQ declared over AMQP (and deleted when dropped), in memory with
    /// [`MemoryTransport::limit_queue`].
    pub(super) async fn limited_queue(&self, prefix: &str, max_length: u32) -> Limited {
        match &self.memory {
            Some(memory) => {
                let name = unique(prefix);
                memory.limit_queue(&name, Some(max_length as usize));
                Limited {
                    name,
                    _declared: None,
                }
            }
            None => {
                let declared = LimitedQueue::declare(prefix, max_length).await;
                Limited {
                    name: declared.name.clone(),
                    _declared: Some(declared),
                }
            }
        }
    }

    /// A message to `destination` that its subscribers receive as one they cannot decode;
    /// `None` where no such message exists.
    pub(super) fn undecodable_message(&self, destination: &str) -> Option<Outgoing> {
        let body = match (&self.memory, self.kind) {
            (Some(memory), _) => {
                memory.undecodable(destination);
                b"garbled".to_vec()
            }
            (None, Kind::Stomp) => vec![b'x'; 2 * STOMP_MAX_FRAME_SIZE],
            (None, _) => return None,
        };
        Some(Outgoing {
            destination: destination.to_owned(),
            headers: Vec::new(),
            body,
        })
    }

    /// The broker's resource alarm, where a test may raise it without touching RabbitMQ.
    pub(super) fn alarm(&self) -> Option<&MemoryTransport> {
        self.memory.as_ref()
    }

    /// Whether it can run `case`: `false` exactly for the cases [`super::DIFFERENCES`] lists.
    pub(super) fn can_run(&self, case: &str) -> bool {
        match case {
            "a_refusal_fails_the_pending_receipts_of_its_connection" => self.refusal().is_some(),
            "an_undecodable_message_is_reported_and_dead_lettered" => {
                !matches!(self.kind, Kind::Amqp)
            }
            "a_blocked_connection_holds_its_messages_until_unblocked" => self.alarm().is_some(),
            _ => true,
        }
    }

    /// Whether to run `case`: when it cannot, it must be listed with its reason, which is
    /// printed (a case is never skipped silently).
    pub(super) fn runs(&self, case: &str) -> bool {
        let reason = listed(self.name(), case);
        if self.can_run(case) {
            assert!(
                reason.is_none(),
                "{}::{case} is listed as not run",
                self.name()
            );
            return true;
        }
        let reason = reason.unwrap_or_else(|| {
            panic!(
                "{}::{case} cannot run and is not listed in DIFFERENCES",
                self.name()
            )
        });
        println!("{}::{case} not run: {reason}", self.name());
        false
    }
}

fn stomp_transport(config: &OutboxConfig) -> Box<dyn Transport> {
    Box::new(StompTransport::new(StompSettings::from(config)).expect("a STOMP transport"))
}

fn amqp_transport(config: &OutboxConfig) -> Box<dyn Transport> {
    Box::new(
        AmqpSettings::try_from(config)
            .and_then(AmqpTransport::new)
            .expect("an AMQP transport"),
    )
}
