//! Triggers from RabbitMQ, as High-templar 3.1 consumes them: the direct exchange `hightemplar`
//! (declared non-durable, not auto-delete, so django-binder, which never declares it, can
//! publish), and a queue of this process's own, `hightemplar_<uuid4>`, exclusive, bound with the
//! literal routing key `*`. Every node has its own queue, so every node gets every trigger and
//! delivers it to its own subscribers.
//!
//! A body that is not `{"rooms": [...], "data": ...}` is logged and dropped. When the broker is
//! unreachable or the connection drops, the consumer retries with a doubling wait (0.5 s up to
//! `amqp_retry_max_secs`) while the WebSocket side keeps serving.

use std::sync::Weak;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use plaza_protocol::hightemplar::{parse_trigger, uuid4};

use super::HighTemplar;

/// First wait before reconnecting; it doubles up to the configured maximum.
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Unacknowledged deliveries the broker may push ahead (High-templar sets none).
const PREFETCH: u16 = 1000;
/// High-templar binds its queue with this literal key; publishers must use it.
const ROUTING_KEY: &str = "*";

#[derive(Debug, thiserror::Error)]
enum AmqpError {
    #[error("{step}: {source}")]
    Broker {
        step: &'static str,
        source: lapin::Error,
    },
    #[error("the consumer was cancelled by the broker")]
    Cancelled,
}

fn at(step: &'static str) -> impl FnOnce(lapin::Error) -> AmqpError {
    move |source| AmqpError::Broker { step, source }
}

/// Runs until the High-templar side is gone.
pub async fn consume(ht: Weak<HighTemplar>, url: String, exchange: String, max_retry: Duration) {
    let mut wait = FIRST_RETRY;
    loop {
        let mut connected = false;
        let result = session(&ht, &url, &exchange, &mut connected).await;
        if ht.strong_count() == 0 {
            return;
        }
        if connected {
            wait = FIRST_RETRY;
        }
        match result {
            Ok(()) => return,
            Err(e) => tracing::warn!(
                error = %e,
                retry_in_ms = wait.as_millis() as u64,
                "High-templar: RabbitMQ unavailable; triggers wait until it is back"
            ),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(max_retry.max(FIRST_RETRY));
    }
}

/// One connection's life: declare, bind, consume until an error.
async fn session(
    ht: &Weak<HighTemplar>,
    url: &str,
    exchange: &str,
    connected: &mut bool,
) -> Result<(), AmqpError> {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(at("connect"))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(at("open a channel"))?;
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: false,
                auto_delete: false,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(at("declare the exchange"))?;
    let mut random = [0u8; 16];
    let _ = getrandom::fill(&mut random);
    let queue = format!("hightemplar_{}", uuid4(random));
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                durable: false,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(at("declare the queue"))?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.into(),
            ROUTING_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(at("bind the queue"))?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(at("set the prefetch"))?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "plaza".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(at("consume"))?;
    *connected = true;
    tracing::info!(%exchange, %queue, "High-templar: consuming RabbitMQ triggers");
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.map_err(at("receive"))?;
        let Some(ht) = ht.upgrade() else {
            return Ok(());
        };
        ht.counters.rabbitmq_messages_received.fetch_add(1, Relaxed);
        match parse_trigger(&delivery.data) {
            Ok(trigger) => ht.deliver_local(&trigger),
            Err(e) => tracing::warn!(
                error = %e,
                bytes = delivery.data.len(),
                "High-templar: dropped a RabbitMQ trigger"
            ),
        }
        drop(ht);
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(at("acknowledge"))?;
    }
    Err(AmqpError::Cancelled)
}
