//! `outbox`: run the relay and operate the outbox without writing code.
//!
//! Reads `DATABASE_URL` and the `OUTBOX_*` settings. Logs go to stderr; `RUST_LOG` sets the level
//! (default `info`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "outbox",
    version,
    about = "The transactional outbox: relay and operations"
)]
struct Cli {
    /// The database holding the outbox tables.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay: send scheduled outbox rows to the broker until SIGTERM or SIGINT.
    Publish,
}

/// Exit code of a run that could not start: bad settings, no database.
const EXIT_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let Some(url) = cli.database_url else {
        eprintln!("outbox: DATABASE_URL is not set (or pass --database-url)");
        return ExitCode::from(EXIT_CONFIG);
    };
    let config = match outbox::OutboxConfig::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("outbox: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let db = match sea_orm::Database::connect(url.as_str()).await {
        Ok(db) => db,
        Err(err) => {
            eprintln!("outbox: cannot connect to the database: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match cli.command {
        Command::Publish => match outbox::Producer::builder(db).config(config).build() {
            Ok(producer) => producer.run_until(outbox::shutdown_signal()).await,
            Err(err) => {
                eprintln!("outbox: {err}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("outbox: {err}");
            ExitCode::FAILURE
        }
    }
}
