//! The metrics recorder of a test binary that reads what the relay and the consumer record.

use metrics_util::debugging::{DebuggingRecorder, Snapshotter};

/// Installs a debugging recorder as the process's recorder, describes every outbox metric, and
/// returns what reads it. A recorder is global: one per test binary.
pub fn install_recorder() -> Snapshotter {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");
    outbox::metrics::describe();
    snapshotter
}
