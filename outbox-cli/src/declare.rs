//! `outbox declare`: a consumer's queue and dead-letter queue, created ahead of the consumer;
//! with `DATABASE_URL`, the outbox rows waiting for a queue at its destination then go at once.

use clap::Args;
use outbox::OutboxConfig;

use crate::database;
use crate::failure::Failure;

/// The arguments of `declare`.
#[derive(Args)]
pub(crate) struct DeclareArgs {
    /// The destination the consumer will read (/topic/orders.v1).
    destination: String,
    /// Its queue (default: the destination's last `/` segment).
    queue: Option<String>,
    /// Declare the queue with RabbitMQ's single active consumer (x-single-active-consumer), as
    /// a consumer built with `.single_active_consumer()` does. Needs the AMQP transport
    /// (OUTBOX_BROKER_URL).
    #[arg(long)]
    single_active_consumer: bool,
}

/// Declares the queue and dead-letter queue `args` names on the broker `config` names; with a
/// database, then makes the outbox rows waiting for a queue at that destination due at once.
pub(crate) async fn run(
    args: DeclareArgs,
    config: &OutboxConfig,
    url: Option<String>,
) -> Result<(), Failure> {
    let broker = outbox::transport::from_config(config)?;
    let mut topology =
        outbox::consumer::Topology::new(config, &args.destination, args.queue.as_deref())?;
    if args.single_active_consumer {
        topology = topology.with_single_active_consumer(true);
    }
    let declared = match url {
        Some(url) => {
            let db = database::connect(Some(url), Some(database::OPERATION_POOL), config).await?;
            Some(outbox::ops::declare(&db, broker.as_ref(), &topology).await?)
        }
        None => {
            topology.declare(broker.as_ref()).await?;
            None
        }
    };
    println!(
        "declared {} (bound to {}) and its dead-letter queue {}",
        topology.queue(),
        topology.destination(),
        topology.dead_letter_queue()
    );
    match declared {
        Some(declared) => println!(
            "{} outbox rows waiting for a queue at {} are due now",
            declared.woken,
            declared.destinations.join(", ")
        ),
        None => println!(
            "no DATABASE_URL: outbox rows already waiting for a queue there are sent at their \
             destination's next probe"
        ),
    }
    Ok(())
}
