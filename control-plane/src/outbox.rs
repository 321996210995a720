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
                    Ok(Relayed {
                        sent: 0,
                        deferred: 0,
                    }) => break,
                    Ok(Relayed { sent, deferred }) => {
                        tracing::debug!(sent, deferred, "signals relayed")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "relaying signals failed, will retry");
                        break;
                    }
                }
            }
            if last_cleanup.elapsed() > Duration::from_secs(60) {
                last_cleanup = tokio::time::Instant::now();
                self.clean_up().await;
            }
            tokio::select! {
                _ = self.wakeup.notified() => {}
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn clean_up(&self) {
        let cleaned =
            sqlx::query("DELETE FROM signal_outbox WHERE sent_at < now() - interval '1 hour'")
                .execute(&self.pool)
                .await;
        if let Err(e) = cleaned {
            tracing::warn!(error = %e, "outbox cleanup failed");
        }
        // A signal that could not be sent for a day is given up: signals only wake
        // workflows, which re-read their rows on every resync anyway.
        match sqlx::query(
            "DELETE FROM signal_outbox WHERE sent_at IS NULL AND created_at < now() - interval '1 day'",
        )
        .execute(&self.pool)
        .await
        {
            Ok(done) if done.rows_affected() > 0 => {
                tracing::warn!(signals = done.rows_affected(), "gave up signals that failed for a day")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "outbox cleanup failed"),
        }
        // Idempotency keys are honoured for a day.
        if let Err(e) = crate::store::purge_request_log(&self.pool).await {
            tracing::warn!(error = %e, "request log cleanup failed");
        }
        if let Err(e) = crate::store::purge_ownership_history(&self.pool).await {
            tracing::warn!(error = %e, "ownership history cleanup failed");
        }
        // Watch resume tokens are honoured for a day; their tombstones a little longer.
        let keep = crate::service::WATCH_TOKEN_LIFETIME + std::time::Duration::from_secs(3600);
        if let Err(e) = crate::store::delete_old_tombstones(&self.pool, keep).await {
            tracing::warn!(error = %e, "tombstone cleanup failed");
        }
    }

    /// Relays up to one batch of due signals. Each signal Kafka did not acknowledge is
    /// deferred with its own backoff, so a signal that keeps failing (a partition the
    /// topic lacks, say) never holds back the ones queued behind it.
    async fn relay_batch(&self) -> Result<Relayed, RelayError> {
        let mut tx = self.pool.begin().await?;
        // SKIP LOCKED lets several control-plane instances relay side by side.
        let rows = sqlx::query(
            "SELECT id, pipeline_id, partition, payload, traceparent, \
                    extract(epoch FROM clock_timestamp() - created_at)::float8 AS age \
             FROM signal_outbox \
             WHERE sent_at IS NULL AND next_attempt_at <= now() \
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(Relayed::default());
        }
        let mut signals = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.try_get("id")?;
            let pipeline_id: String = row.try_get("pipeline_id")?;
            let partition: i32 = row.try_get("partition")?;
            let payload: Vec<u8> = row.try_get("payload")?;
            // A span per signal, in the trace of the change; its context rides along
            // in the Kafka record's headers to the worker.
            let traceparent: Option<String> = row.try_get("traceparent")?;
            let span = tracing::info_span!(
                "signal",
                otel.name = "relay signal",
                otel.kind = "producer",
                pipeline_id = %pipeline_id,
                trace_id = tracing::field::Empty,
            );
            sluice_infra::telemetry::set_parent(&span, traceparent.as_deref());
            sluice_infra::telemetry::record_trace_id(&span);
            let header = sluice_infra::telemetry::traceparent(&span);
            signals.push((id, pipeline_id, partition, payload, header, span));
        }
        let ages: Vec<f64> = rows
            .iter()
            .map(|r| r.try_get::<f64, _>("age").unwrap_or(0.0))
            .collect();
        let sending = std::time::Instant::now();
        // All sends of a batch are in flight together; the rows stay locked meanwhile,
        // so another relay cannot send them twice.
        let sends = signals.iter().map(
            |(id, pipeline_id, partition, payload, header, span)| async move {
                let mut record = FutureRecord::to(&self.signals_topic)
                    .key(pipeline_id)
                    .partition(*partition)
                    .payload(payload);
                if let Some(value) = header {
                    record = record.headers(rdkafka::message::OwnedHeaders::new().insert(
                        rdkafka::message::Header {
                            key: "traceparent",
                            value: Some(value.as_str()),
                        },
                    ));
                }
                let _span = span;
                let sent = self
                    .producer
                    .send(record, Timeout::After(Duration::from_secs(5)))
                    .await;
                (*id, sent.map(|_| ()).map_err(|(e, _)| e))
            },
        );
        let mut sent = Vec::with_capacity(signals.len());
        let mut failed = Vec::new();
        let results = futures::future::join_all(sends).await;
        let send_seconds = sending.elapsed().as_secs_f64();
        for ((id, result), age) in results.into_iter().zip(&ages) {
            match result {
                Ok(()) => {
                    crate::metrics::API.signals_sent.inc();
                    crate::metrics::API
                        .signal_relay_seconds
                        .observe(age + send_seconds);
                    sent.push(id)
                }
                Err(e) => {
                    crate::metrics::API.signals_deferred.inc();
                    failed.push((id, e.to_string()))
                }
            }
        }
        sqlx::query("UPDATE signal_outbox SET sent_at = clock_timestamp() WHERE id = ANY($1)")
            .bind(&sent)
            .execute(&mut *tx)
            .await?;
        if let Some((_, example)) = failed.first() {
            tracing::warn!(signals = failed.len(), error = %example, "signals not acknowledged by Kafka; retrying them later");
            let (ids, errors): (Vec<i64>, Vec<String>) = failed.into_iter().unzip();
            // 1 s, 2 s, 4 s ... capped at a minute.
            sqlx::query(
                "UPDATE signal_outbox o SET attempts = o.attempts + 1, last_error = f.error, \
                 next_attempt_at = clock_timestamp() \
                   + LEAST(interval '1 second' * power(2, o.attempts), interval '60 seconds') \
                 FROM UNNEST($1::bigint[], $2::text[]) AS f(id, error) WHERE o.id = f.id",
            )
            .bind(&ids)
            .bind(&errors)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(Relayed {
                sent: sent.len(),
                deferred: ids.len(),
            });
        }
        tx.commit().await?;
        Ok(Relayed {
            sent: sent.len(),
            deferred: 0,
        })
    }
}

/// What one relay batch did.
#[derive(Debug, Default)]
struct Relayed {
    sent: usize,
    deferred: usize,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}
