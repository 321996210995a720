//! End-to-end lifecycle tests: real control plane and worker binaries against the real
//! PostgreSQL and Kafka started by `deploy/local/up.sh`.

use std::time::Duration;

use anyhow::Result;
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus, PipelineStatus};

const CONVERGE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_lands_every_record_then_pause_and_resume_lose_nothing() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;

    let table = unique("orders");
    let created = client
        .create_pipeline(generator_pipeline(
            "orders",
            10_000,
            42,
            d.destination(&table, false),
            DesiredStatus::Active,
        ))
        .await?
        .into_inner();
    assert_eq!(created.desired_status, DesiredStatus::Active as i32);
    assert_eq!(created.generation, 1);

    let ready = wait_converged(&mut client, "orders", PipelineStatus::Ready, CONVERGE).await?;
    assert_eq!(ready.phase, "READY");
    assert_eq!(ready.owner, "w1");
    assert_eq!(d.row_count(&table).await?, 10_000);
    assert_eq!(
        amount_sum(&d.pool, &table).await?,
        expected_amount_sum(42, 10_000)
    );

    // Pause: the worker persists PAUSED for the new generation.
    let paused = client
        .update_pipeline(set_desired("orders", DesiredStatus::Paused))
        .await?
        .into_inner();
    assert_eq!(paused.generation, 2);
    assert_eq!(paused.phase, "PAUSING");
    let p = wait_converged(&mut client, "orders", PipelineStatus::Paused, CONVERGE).await?;
    assert_eq!(p.observed_generation, p.generation);

    // Pausing again is a no-op that bumps nothing.
    let again = client
        .update_pipeline(set_desired("orders", DesiredStatus::Paused))
        .await?
        .into_inner();
    assert_eq!(again.generation, 2);

    client
        .update_pipeline(set_desired("orders", DesiredStatus::Active))
        .await?;
    let r = wait_converged(&mut client, "orders", PipelineStatus::Ready, CONVERGE).await?;
    assert_eq!(r.generation, 3);
    assert_eq!(d.row_count(&table).await?, 10_000);
    assert_eq!(
        amount_sum(&d.pool, &table).await?,
        expected_amount_sum(42, 10_000)
    );

    // READY → PAUSED → READY, each exactly once, and no READY → BACKFILL flap.
    let history = client
        .list_pipeline_events(pb::ListPipelineEventsRequest {
            pipeline_id: "orders".into(),
        })
        .await?
        .into_inner()
        .events;
    let moves: Vec<String> = history
        .iter()
        .map(|e| format!("{}>{}", e.from_status, e.to_status))
        .collect();
    assert_eq!(
        moves,
        [
            ">SETUP",
            "SETUP>BACKFILL",
            "BACKFILL>READY",
            "READY>PAUSED",
            "PAUSED>READY"
        ]
    );
    d.shutdown().await
}
