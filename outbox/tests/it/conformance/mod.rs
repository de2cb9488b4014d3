//! The transport conformance suite: the same cases against `MemoryTransport` (in both of its
//! modes), the STOMP transport and the AMQP transport, so that the in-memory broker passes what
//! RabbitMQ passes, or [`DIFFERENCES`] says where it does not and why.
//!
//! - `subject.rs`: the transport under test, a way to open another connection to the same
//!   broker, and what that transport is expected to answer where transports differ.
//! - `cases.rs`: one `async fn(Subject)` per case.
//! - this file: the list of differences, and the tests `<subject>::<case>` that run every case
//!   on every subject.
//!
//! A case a subject cannot run is never skipped silently: it is listed in [`DIFFERENCES`], and
//! the case checks on entry that its subject is not able to run it only where the list says so.

mod cases;
mod subject;

use subject::Subject;

/// Where a subject does not run a case, and why: `("<subject>::<case>", reason)`.
pub(crate) const DIFFERENCES: &[(&str, &str)] = &[
    (
        "memory_amqp::a_refusal_fails_the_pending_receipts_of_its_connection",
        "the memory broker has no passive exchange check: in mandatory mode a refused SEND \
         still closes the connection as over STOMP (run by memory_stomp), where the AMQP \
         transport refuses exactly the message to the missing exchange",
    ),
    (
        "amqp::an_undecodable_message_is_reported_and_dead_lettered",
        "lapin decodes every frame RabbitMQ sends (headers are AMQP field tables, and no frame \
         size is enforced on deliveries): the AMQP transport never reports an undecodable message",
    ),
    (
        "stomp::a_blocked_connection_holds_its_messages_until_unblocked",
        "needs RabbitMQ's memory alarm, which a shared run must not raise: covered by the \
         isolated CI step broker_blocked, test \
         broker_blocked_by_a_memory_alarm_charges_nothing_stops_and_resumes \
         (tests/tests/faults_stomp.rs)",
    ),
    (
        "amqp::a_blocked_connection_holds_its_messages_until_unblocked",
        "needs RabbitMQ's memory alarm, which a shared run must not raise: covered by the \
         isolated CI step broker_blocked, test \
         broker_blocked_over_amqp_charges_nothing_stops_and_resumes (tests/tests/faults_stomp.rs)",
    ),
];

/// Every case, by name, as the tests and [`DIFFERENCES`] name them.
const CASES: &[&str] = &[
    "a_batch_is_receipted_in_order",
    "a_refusal_fails_the_pending_receipts_of_its_connection",
    "an_unroutable_message_is_dropped_or_returned",
    "a_nacked_message_is_dead_lettered_and_an_acked_one_is_gone",
    "an_unacked_delivery_comes_again_after_its_connection_closes",
    "redeclaring_a_queue_with_other_arguments_is_a_precondition_failure",
    "an_undecodable_message_is_reported_and_dead_lettered",
    "a_blocked_connection_holds_its_messages_until_unblocked",
    "a_rejected_publish_is_nacked_or_closes_the_connection",
];

/// The reason `subject` does not run `case`, if it is listed.
fn listed(subject: &str, case: &str) -> Option<&'static str> {
    let key = format!("{subject}::{case}");
    DIFFERENCES
        .iter()
        .find(|(listed, _)| *listed == key)
        .map(|(_, reason)| *reason)
}

/// Runs each case, an `async fn(Subject)` of `cases.rs`, on every subject, as the tests
/// `conformance::<subject>::<case>`.
macro_rules! on_every_subject {
    ($($case:ident),* $(,)?) => {
        on_every_subject!(@subject memory_stomp $($case),*);
        on_every_subject!(@subject memory_amqp $($case),*);
        on_every_subject!(@subject stomp $($case),*);
        on_every_subject!(@subject amqp $($case),*);
        #[test]
        fn every_case_is_named() {
            assert_eq!(CASES, [$(stringify!($case)),*]);
        }
    };
    (@subject $subject:ident $($case:ident),*) => {
        mod $subject {
            $(
                #[tokio::test]
                async fn $case() {
                    super::cases::$case(super::Subject::$subject()).await
                }
            )*
        }
    };
}

on_every_subject!(
    a_batch_is_receipted_in_order,
    a_refusal_fails_the_pending_receipts_of_its_connection,
    an_unroutable_message_is_dropped_or_returned,
    a_nacked_message_is_dead_lettered_and_an_acked_one_is_gone,
    an_unacked_delivery_comes_again_after_its_connection_closes,
    redeclaring_a_queue_with_other_arguments_is_a_precondition_failure,
    an_undecodable_message_is_reported_and_dead_lettered,
    a_blocked_connection_holds_its_messages_until_unblocked,
    a_rejected_publish_is_nacked_or_closes_the_connection,
);

/// Prints the differences, and holds the list to the subjects: a listed case is one its subject
/// cannot run, and a case a subject cannot run is listed.
#[tokio::test]
async fn differences_are_listed_and_not_run() {
    for (key, reason) in DIFFERENCES {
        let (subject, case) = key.split_once("::").expect("<subject>::<case>");
        assert!(CASES.contains(&case), "{key}: no such case");
        assert!(Subject::NAMES.contains(&subject), "{key}: no such subject");
        println!("{subject:>12}  {case}\n{:>12}  {reason}", "");
    }
    for subject in Subject::every() {
        for case in CASES {
            let listed = listed(subject.name(), case).is_some();
            assert_eq!(
                subject.can_run(case),
                !listed,
                "{}::{case}: {}",
                subject.name(),
                if listed {
                    "listed as not run, but the subject can run it"
                } else {
                    "not run, but not listed in DIFFERENCES"
                }
            );
        }
    }
}
