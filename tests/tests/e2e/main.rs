//! The end-to-end fault scenarios that share no process-wide state, one binary: each module is a
//! former test file. Beside it: `faults` and `interop` (each sets a global tracing subscriber),
//! `faults_relay` and `faults_stomp` (their restart and memory-alarm scenarios run alone in CI).

mod faults_consumer;
mod faults_ordering;
mod faults_reject;
mod faults_transactions;
