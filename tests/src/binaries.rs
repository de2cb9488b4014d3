//! The workspace's binaries, for the suites that run them as child processes.

use std::path::PathBuf;

/// The `outbox` command (`outbox-cli`), built next to this test binary: in
/// `$CARGO_TARGET_DIR/<profile>/`. `cargo test --workspace` builds it with `outbox-cli`'s tests.
pub fn outbox_command() -> PathBuf {
    let exe = std::env::current_exe().expect("this test binary");
    let profile_dir = exe
        .ancestors()
        .nth(2)
        .expect("a test binary in <target>/<profile>/deps");
    let command = profile_dir.join(format!("outbox{}", std::env::consts::EXE_SUFFIX));
    assert!(
        command.is_file(),
        "{} is missing: build it with `cargo build -p outbox-cli --all-features --bins` \
         (`cargo test --workspace` does)",
        command.display()
    );
    command
}

/// The database URL and destination a child test process reads from the variables `db_var`
/// and `destination_var`; `None` when either is unset (the child test run on its own).
pub fn child_vars(db_var: &str, destination_var: &str) -> Option<(String, String)> {
    Some((
        std::env::var(db_var).ok()?,
        std::env::var(destination_var).ok()?,
    ))
}
