//! `outbox publish`: the relay, until SIGTERM, SIGINT or SIGQUIT.

use outbox::OutboxConfig;

use crate::database::connect;
use crate::failure::Failure;

/// Runs the relay on the database at `url` with `config`.
pub(crate) async fn run(config: OutboxConfig, url: Option<String>) -> Result<(), Failure> {
    let db = connect(url, None, &config).await?;
    let producer = outbox::Producer::builder(db).config(config).build()?;
    Ok(producer.run_until(outbox::shutdown::signal()).await?)
}
