//! The outbox relay: publishes queued signals to the signals topic, keyed by pipeline id
//! and explicitly partitioned by the stored partition, and marks them sent only after
//! Kafka acknowledged them. If Kafka is down the signals wait in Postgres.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use sqlx::{PgPool, Row};
use tokio::sync::Notify;

/// How often the relay looks at the outbox without being woken: covers changes made by
/// another control-plane instance and retries after a Kafka failure.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
const BATCH: i64 = 200;

pub struct OutboxRelay {
    pub pool: PgPool,
    pub producer: FutureProducer,
    pub signals_topic: String,
    pub wakeup: Arc<Notify>,
}

impl OutboxRelay {
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut last_cleanup = tokio::time::Instant::now();
        loop {
            loop {
                match self.relay_batch().await {
                    Ok(0) => break,
                    Ok(n) => tracing::debug!(signals = n, "signals relayed"),
                    Err(e) => {
                        tracing::warn!(error = %e, "relaying signals failed, will retry");
                        break;
                    }
                }
            }
            if last_cleanup.elapsed() > Duration::from_secs(60) {
                last_cleanup = tokio::time::Instant::now();
                let cleaned = sqlx::query(
                    "DELETE FROM signal_outbox WHERE sent_at < now() - interval '1 hour'",
                )
                .execute(&self.pool)
                .await;
                if let Err(e) = cleaned {
                    tracing::warn!(error = %e, "outbox cleanup failed");
                }
                // Idempotency keys are honoured for a day.
                if let Err(e) = crate::store::purge_request_log(&self.pool).await {
                    tracing::warn!(error = %e, "request log cleanup failed");
                }
            }
            tokio::select! {
                _ = self.wakeup.notified() => {}
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Relays up to one batch; returns how many signals were sent.
    async fn relay_batch(&self) -> Result<usize, RelayError> {
        let mut tx = self.pool.begin().await?;
        // SKIP LOCKED lets several control-plane instances relay side by side.
        let rows = sqlx::query(
            "SELECT id, pipeline_id, partition, payload FROM signal_outbox \
             WHERE sent_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut signals = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.try_get("id")?;
            let pipeline_id: String = row.try_get("pipeline_id")?;
            let partition: i32 = row.try_get("partition")?;
            let payload: Vec<u8> = row.try_get("payload")?;
            signals.push((id, pipeline_id, partition, payload));
        }
        // All sends of a batch are in flight together; the rows stay locked meanwhile,
        // so another relay cannot send them twice.
        let sends = signals
            .iter()
            .map(|(id, pipeline_id, partition, payload)| async move {
                let record = FutureRecord::to(&self.signals_topic)
                    .key(pipeline_id)
                    .partition(*partition)
                    .payload(payload);
                self.producer
                    .send(record, Timeout::After(Duration::from_secs(5)))
                    .await
                    .map(|_| *id)
                    .map_err(|(e, _)| e)
            });
        let mut sent = Vec::with_capacity(signals.len());
        let mut failure = None;
        for result in futures::future::join_all(sends).await {
            match result {
                Ok(id) => sent.push(id),
                Err(e) => failure = Some(e),
            }
        }
        sqlx::query("UPDATE signal_outbox SET sent_at = clock_timestamp() WHERE id = ANY($1)")
            .bind(&sent)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        match failure {
            // Unacknowledged signals stay queued for the next attempt.
            Some(e) => Err(RelayError::Kafka(e)),
            None => Ok(sent.len()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("kafka: {0}")]
    Kafka(rdkafka::error::KafkaError),
}
