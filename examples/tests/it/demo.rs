//! The orders binary as a newcomer runs it: `orders --once` with no environment at all (an
//! embedded SQLite file and the in-memory broker) places its orders, ships them and exits 0.

use std::process::Command;

#[test]
fn the_orders_demo_runs_with_no_setup_and_exits_after_shipping() {
    let dir = std::env::temp_dir().join(format!("orders_demo_{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_orders"))
        .arg("--once")
        .current_dir(&dir)
        // No DATABASE_URL, no OUTBOX_* settings: what a fresh clone has.
        .env_clear()
        // Any free port: the default one may be taken on the machine running the tests.
        .env("METRICS_PORT", "0")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the orders binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let database_created = dir.join("orders.db").exists();
    let _ = std::fs::remove_dir_all(&dir);

    assert!(
        output.status.success(),
        "orders --once failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("Placed 3 orders"), "{stdout}");
    assert_eq!(
        stdout.matches("SEND /topic/orders.v1").count(),
        3,
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("SEND /topic/payments").count(),
        3,
        "{stdout}"
    );
    assert!(
        database_created,
        "the embedded database is a file in the current directory"
    );
}
