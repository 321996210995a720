//! A worker's threads and open files do not grow with the READY pipelines it owns:
//! every lane reads through the worker's one shared consumer, and an idle pipeline
//! keeps no producer. `SLUICE_DENSITY_PIPELINES` sets the larger count (default 100);
//! the density benchmark (docs/benchmarks.md) measures thousands on a release build.

use std::time::Duration;

use anyhow::{Context, Result};
use sluice_e2e::procstat::{settled, thread_names};
use sluice_e2e::*;
use sluice_protocol::pb::PipelineStatus;

const CONVERGE: Duration = Duration::from_secs(300);

async fn create_ready(d: &Deployment, client: &mut Client, from: usize, to: usize) -> Result<()> {
    create_generator_fleet(d, client, "dense", from..to, 5).await?;
    for i in from..to {
        wait_converged(
            client,
            &format!("dense-{i}"),
            PipelineStatus::Ready,
            CONVERGE,
        )
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_ready_pipeline_costs_its_worker_no_thread_and_no_file() -> Result<()> {
    let many: usize = std::env::var("SLUICE_DENSITY_PIPELINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let pid = d.worker("w1")?.pid().context("worker pid")?;

    create_ready(&d, &mut client, 0, 10).await?;
    let few = settled(pid).await?;
    create_ready(&d, &mut client, 10, many).await?;
    let lots = settled(pid).await?;
    eprintln!("10 READY pipelines: {few:?}; {many}: {lots:?}");
    // A small fixed allowance: the worker's own and the destination's connection
    // pools may open a few more connections under the larger burst of setups.
    assert!(
        lots.threads <= few.threads + 4,
        "threads grew from {} to {} with {many} pipelines: {}",
        few.threads,
        lots.threads,
        thread_names(pid)
    );
    assert!(
        lots.files <= few.files + 24,
        "open files grew from {} to {} with {many} pipelines",
        few.files,
        lots.files
    );
    d.shutdown().await
}
