//! One open AMQP connection and its channels: failover across the URLs, the confirm window and
//! the pool of publisher channels ([`super::publish`] publishes on them), the checks and
//! declarations before a publish, and a channel per subscription.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::tcp::AMQPUriTcpExt;
use lapin::types::FieldTable;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{Semaphore, mpsc};

use super::publish::{Publishers, open_publisher};
use super::routing::{self, Endpoint, QueueKind};
use super::{CONFIRM_WINDOW, Settings, lock};
use crate::transport::{
    AckMode, Deliveries, Delivery, Subscription, SubscriptionEvent, TransportError,
};

/// Deliveries buffered per subscription beyond its prefetch.
const DELIVERY_QUEUE: usize = 1024;

/// One open connection and its channels.
pub(super) struct Link {
    pub(super) generation: u64,
    pub(super) address: String,
    pub(super) connection: Connection,
    /// Idle confirm-mode channels, one per batch in flight ([`super::publish`]).
    pub(super) publishers: Publishers,
    /// Publishes awaiting their confirms, across every batch.
    pub(super) window: Arc<Semaphore>,
    /// Exchanges known to exist on this connection (a passive declare succeeded).
    exchanges: tokio::sync::Mutex<HashSet<String>>,
    /// Queues this connection declared for a SEND (to `/queue/q` or a bare name).
    queues: tokio::sync::Mutex<HashSet<String>>,
    pub(super) subscriptions: Mutex<HashMap<String, Route>>,
}

/// A subscription's channel and consumer.
pub(super) struct Route {
    pub(super) channel: Channel,
    pub(super) consumer_tag: String,
}

impl Link {
    /// Connects to the first URL that answers.
    pub(super) async fn open(settings: &Settings, generation: u64) -> Result<Self, TransportError> {
        let mut last_error = None;
        for uri in &settings.urls {
            match Self::open_one(settings, uri, generation).await {
                Ok(link) => return Ok(link),
                // A refused login or a TLS setting is the same everywhere.
                Err(err @ TransportError::Refused { .. }) | Err(err @ TransportError::Tls(_)) => {
                    return Err(err);
                }
                Err(err) => {
                    tracing::debug!(broker = %address_of(uri), error = %err, "broker address failed");
                    last_error = Some(err);
                }
            }
        }
        let addresses = settings
            .urls
            .iter()
            .map(address_of)
            .collect::<Vec<_>>()
            .join(", ");
        Err(TransportError::Connect {
            addresses,
            reason: match last_error {
                Some(TransportError::Connect { reason, .. }) => reason,
                Some(other) => other.to_string(),
                None => "no address configured".into(),
            },
        })
    }

    async fn open_one(
        settings: &Settings,
        uri: &AMQPUri,
        generation: u64,
    ) -> Result<Self, TransportError> {
        let address = address_of(uri);
        let connect_failed = |reason: String| TransportError::Connect {
            addresses: address.clone(),
            reason,
        };
        let runtime =
            lapin::runtime::default_runtime().map_err(|err| connect_failed(err.to_string()))?;
        let tls = match uri.scheme {
            AMQPScheme::AMQPS => {
                let tls = settings
                    .tls
                    .as_ref()
                    .ok_or_else(|| TransportError::Tls("amqps:// without TLS settings".into()))?;
                let name = tls
                    .server_name
                    .clone()
                    .unwrap_or_else(|| uri.authority.host.clone());
                Some((tls.connector.clone(), name))
            }
            AMQPScheme::AMQP => None,
        };
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("outbox relay ({})", std::process::id()).into());
        let timeout = settings.receipt_timeout;
        let connect = Connection::connector(
            uri.clone(),
            runtime,
            async move |uri: AMQPUri, runtime| {
                // The TCP connection as lapin makes it, then our own TLS client over it: the
                // CA, client certificate and server name settings, with ring.
                let mut plain = uri.clone();
                plain.scheme = AMQPScheme::AMQP;
                let stream = plain
                    .connect_async(&runtime)
                    .await
                    .map_err(lapin::Error::from)?;
                match &tls {
                    Some((connector, name)) => stream
                        .into_rustls(connector, name)
                        .await
                        .map_err(lapin::Error::from),
                    None => Ok(stream),
                }
            },
            properties,
        );
        let connection = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| connect_failed(format!("no connection within {timeout:?}")))?
            .map_err(|err| login_error(&address, err))?;
        // A first publisher channel, so that a broker that refuses them fails the connect.
        let publishers = Publishers::default();
        publishers.give_back(
            open_publisher(&connection)
                .await
                .map_err(|err| connect_failed(err.to_string()))?,
        );
        tracing::info!(
            broker = %address,
            heartbeat = connection.configuration().heartbeat(),
            "connected to the broker over AMQP"
        );
        Ok(Self {
            generation,
            address,
            connection,
            publishers,
            window: Arc::new(Semaphore::new(CONFIRM_WINDOW)),
            exchanges: tokio::sync::Mutex::new(HashSet::new()),
            queues: tokio::sync::Mutex::new(HashSet::new()),
            subscriptions: Mutex::new(HashMap::new()),
        })
    }

    pub(super) fn is_open(&self) -> bool {
        self.connection.status().connected()
    }

    pub(super) async fn close_quietly(&self) {
        if self.connection.status().connected() {
            let _ = self.connection.close(200, "reconnecting".into()).await;
        }
    }

    /// A lapin error as the trait's: a refusal of the broker (a channel or connection closed
    /// with a reply code) or a lost connection.
    pub(super) fn error(&self, err: lapin::Error) -> TransportError {
        broker_error(err)
    }

    /// Checks that `exchange` exists (a passive declare, once per connection). The default
    /// exchange always does.
    pub(super) async fn check_exchange(&self, exchange: &str) -> Result<(), TransportError> {
        if exchange.is_empty() {
            return Ok(());
        }
        let mut known = self.exchanges.lock().await;
        if known.contains(exchange) {
            return Ok(());
        }
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|err| self.error(err))?;
        let checked = channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match checked {
            Ok(()) => {
                let _ = channel.close(200, "checked".into()).await;
                known.insert(exchange.to_owned());
                Ok(())
            }
            Err(err) => Err(broker_error(err)),
        }
    }

    /// Declares queue `name` as the STOMP plugin does for a SEND to `/queue/name` or `name`
    /// (durable), once per connection, on a channel of its own.
    pub(super) async fn declare_for_send(
        &self,
        name: &str,
        headers: &[(String, String)],
    ) -> Result<(), TransportError> {
        let mut declared = self.queues.lock().await;
        if declared.contains(name) {
            return Ok(());
        }
        let declare =
            routing::queue_declare(name, QueueKind::Named, headers).map_err(|detail| {
                TransportError::Broker {
                    message: format!("cannot declare queue `{name}`"),
                    detail,
                }
            })?;
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|err| self.error(err))?;
        declare_queue(&channel, &declare).await?;
        let _ = channel.close(200, "declared".into()).await;
        declared.insert(name.to_owned());
        Ok(())
    }

    pub(super) async fn subscribe(
        &self,
        subscription: Subscription,
    ) -> Result<Deliveries, TransportError> {
        let endpoint = Endpoint::parse(&subscription.destination).map_err(|detail| {
            TransportError::Broker {
                message: format!("cannot subscribe to `{}`", subscription.destination),
                detail,
            }
        })?;
        let headers = &subscription.headers;
        let named = routing_header(headers, "x-queue-name");
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|err| self.error(err))?;
        let queue = match &endpoint {
            Endpoint::Queue(name) => {
                let declare = routing::consumer_queue_declare(name, QueueKind::Named, headers)
                    .map_err(|detail| invalid_subscription(&subscription, detail))?;
                declare_queue(&channel, &declare).await?;
                name.clone()
            }
            Endpoint::AmqQueue(name) | Endpoint::ReplyQueue(name) => name.clone(),
            Endpoint::Topic(_) | Endpoint::Exchange(..) => {
                let kind = if matches!(endpoint, Endpoint::Topic(_)) {
                    QueueKind::Topic
                } else {
                    QueueKind::Exchange
                };
                let name = named.clone().unwrap_or_default();
                let declare = routing::consumer_queue_declare(&name, kind, headers)
                    .map_err(|detail| invalid_subscription(&subscription, detail))?;
                let queue = declare_queue(&channel, &declare).await?;
                let (exchange, key) = endpoint.routing();
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        exchange.into(),
                        key.into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(broker_error)?;
                queue
            }
        };
        let prefetch = routing_header(headers, "prefetch-count")
            .and_then(|value| value.trim().parse::<u16>().ok())
            .unwrap_or(0);
        if prefetch > 0 {
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await
                .map_err(broker_error)?;
        }
        let consumer_tag = format!("T_{}", subscription.id);
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                consumer_tag.as_str().into(),
                BasicConsumeOptions {
                    no_ack: subscription.ack == AckMode::Auto,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(broker_error)?;
        lock(&self.subscriptions).insert(
            subscription.id.clone(),
            Route {
                channel,
                consumer_tag: consumer_tag.clone(),
            },
        );
        let capacity = usize::from(prefetch).clamp(1, DELIVERY_QUEUE);
        let (tx, rx) = mpsc::channel(capacity);
        let id = subscription.id;
        let generation = self.generation;
        tokio::spawn(async move {
            // Ends when the broker cancels the consumer (its queue deleted), the channel or the
            // connection closes, or the subscriber drops its receiver: the consumer then
            // subscribes again, which declares the queue again.
            while let Some(next) = consumer.next().await {
                let Ok(delivery) = next else { break };
                let destination = routing::format_destination(
                    delivery.exchange.as_str(),
                    delivery.routing_key.as_str(),
                );
                let tag = delivery.delivery_tag;
                let message_id = format!("{consumer_tag}@@{generation}@@{tag}");
                let mut headers = vec![
                    ("subscription".to_owned(), id.clone()),
                    ("destination".to_owned(), destination.clone()),
                    ("message-id".to_owned(), message_id.clone()),
                    ("redelivered".to_owned(), delivery.redelivered.to_string()),
                ];
                headers.extend(routing::delivery_headers(&delivery.properties));
                headers.push(("content-length".to_owned(), delivery.data.len().to_string()));
                let delivery = Delivery {
                    subscription: id.clone(),
                    destination,
                    message_id,
                    ack_id: tag.to_string(),
                    headers,
                    body: delivery.data,
                    connection: generation,
                };
                if tx
                    .send(SubscriptionEvent::Delivery(delivery))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            tracing::debug!(subscription = %id, "the AMQP consumer ended");
        });
        tracing::debug!(broker = %self.address, queue = %queue, "subscribed over AMQP");
        Ok(Deliveries::new(rx))
    }
}

/// Declares `declare` on `channel`; the queue's name (the broker's, for an unnamed one).
async fn declare_queue(
    channel: &Channel,
    declare: &routing::QueueDeclare,
) -> Result<String, TransportError> {
    let queue = channel
        .queue_declare(
            declare.queue.as_str().into(),
            QueueDeclareOptions {
                passive: false,
                durable: declare.durable,
                exclusive: declare.exclusive,
                auto_delete: declare.auto_delete,
                nowait: false,
            },
            declare.arguments.clone(),
        )
        .await
        .map_err(broker_error)?;
    Ok(queue.name().as_str().to_owned())
}

fn invalid_subscription(subscription: &Subscription, detail: String) -> TransportError {
    TransportError::Broker {
        message: format!("cannot subscribe to `{}`", subscription.destination),
        detail,
    }
}

fn routing_header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.clone())
}

/// `host:port` of a URL, without its credentials.
fn address_of(uri: &AMQPUri) -> String {
    format!("{}:{}", uri.authority.host, uri.authority.port)
}

/// A lapin error as the trait's: a protocol error (a reply code from the broker: 404, 403,
/// 406, ...) is a refusal; anything else, a lost connection.
pub(super) fn broker_error(err: lapin::Error) -> TransportError {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => TransportError::Broker {
            message: amqp.get_id().to_string(),
            detail: amqp.get_message().as_str().to_owned(),
        },
        _ => TransportError::ConnectionLost(err.to_string()),
    }
}

/// The error of a failed login: a refusal when the broker said why, else a connection failure.
fn login_error(address: &str, err: lapin::Error) -> TransportError {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => TransportError::Refused {
            address: address.to_owned(),
            message: amqp.get_message().as_str().to_owned(),
        },
        lapin::ErrorKind::AuthProviderError(reason) => TransportError::Refused {
            address: address.to_owned(),
            message: reason.clone(),
        },
        _ => TransportError::Connect {
            addresses: address.to_owned(),
            reason: crate::config::redact_credentials(&err.to_string()),
        },
    }
}
