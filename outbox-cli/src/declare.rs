//! `outbox declare`: a consumer's queue and dead-letter queue, created ahead of the consumer.

use clap::Args;
use outbox::OutboxConfig;

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

/// Declares the queue and dead-letter queue `args` names on the broker `config` names.
pub(crate) async fn run(args: DeclareArgs, config: &OutboxConfig) -> Result<(), Failure> {
    let broker = outbox::transport::from_config(config)?;
    let mut topology =
        outbox::consumer::Topology::new(config, &args.destination, args.queue.as_deref())?;
    if args.single_active_consumer {
        topology = topology.with_single_active_consumer(true);
    }
    topology.declare(broker.as_ref()).await?;
    println!(
        "declared {} (bound to {}) and its dead-letter queue {}",
        topology.queue(),
        topology.destination(),
        topology.dead_letter_queue()
    );
    Ok(())
}
