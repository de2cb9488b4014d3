//! Where a scenario's CPU goes: the broker's, the database server's and the measured process's
//! CPU time, read from `/proc` before and after, per message. On a host where the broker, the
//! database and the library share the cores, a rate is bounded by the sum of the three.

use std::time::Duration;

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`: 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds (user and system) of process `pid`, from `/proc/<pid>/stat`.
fn process_cpu(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after it.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((user + system) / TICKS_PER_SECOND)
}

/// The name of process `pid` (`/proc/<pid>/comm`).
fn process_name(pid: &str) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim().to_owned())
}

/// CPU seconds of the broker's and the database servers' processes so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerCpu {
    /// RabbitMQ (`beam.smp` and its helpers).
    pub broker: f64,
    /// PostgreSQL's processes (`postgres`), or MariaDB's (`mariadbd`).
    pub database: f64,
}

impl ServerCpu {
    /// Reads every process of the host. A database backend that exits between two readings
    /// takes its CPU time with it: measure with the connections of the scenario open.
    pub fn now() -> ServerCpu {
        let mut cpu = ServerCpu::default();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return cpu;
        };
        for entry in entries.flatten() {
            let pid = entry.file_name();
            let Some(pid) = pid
                .to_str()
                .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let (Some(name), Some(seconds)) = (process_name(pid), process_cpu(pid)) else {
                continue;
            };
            match name.as_str() {
                "beam.smp" | "erl_child_setup" | "inet_gethost" => cpu.broker += seconds,
                "postgres" | "mariadbd" | "mysqld" => cpu.database += seconds,
                _ => {}
            }
        }
        cpu
    }

    /// CPU used since `earlier`.
    pub fn since(self, earlier: ServerCpu) -> ServerCpu {
        ServerCpu {
            broker: (self.broker - earlier.broker).max(0.0),
            database: (self.database - earlier.database).max(0.0),
        }
    }
}

/// CPU seconds of this process so far.
pub fn own() -> f64 {
    process_cpu("self").unwrap_or(0.0)
}

/// Prints `<prefix>.cpu_us.broker`, `.database`, `.own` and `.busy` (all three over the
/// elapsed time, in cores): microseconds of CPU per message, and how many cores were busy.
pub fn print(
    prefix: &str,
    servers: ServerCpu,
    own_seconds: f64,
    messages: usize,
    elapsed: Duration,
) {
    let per_message = |seconds: f64| 1e6 * seconds / messages.max(1) as f64;
    crate::figure(
        &format!("{prefix}.cpu_us.broker"),
        per_message(servers.broker),
        "us/msg",
    );
    crate::figure(
        &format!("{prefix}.cpu_us.database"),
        per_message(servers.database),
        "us/msg",
    );
    crate::figure(
        &format!("{prefix}.cpu_us.own"),
        per_message(own_seconds),
        "us/msg",
    );
    let busy = (servers.broker + servers.database + own_seconds) / elapsed.as_secs_f64().max(1e-9);
    crate::figure(&format!("{prefix}.cpu_cores_busy"), busy, "cores");
}
