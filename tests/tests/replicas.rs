//! Several control-plane replicas behind one deployment: the outbox relay is safe with
//! two or more (no lost signal; a duplicate is harmless), even when one is killed in the
//! middle of a burst of changes.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Result};
use sluice_e2e::*;
use sluice_protocol::pb::{DesiredStatus, PipelineStatus};

const CONVERGE: Duration = Duration::from_secs(120);

/// Workers re-read pipelines only when signalled (their resync is 10 minutes), so every
/// change below reaches its owner through a signal or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_one_killed_mid_burst_every_update_is_acted_on() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut b = d.start_control_plane().await?;
    let (a_addr, a_process) = d.start_control_plane_replica("control-plane-a").await?;
    let mut a = d.client_at(&a_addr).await?;
    let slow_resync = [("SLUICE_RESYNC_INTERVAL_MS", "600000")];
    d.start_worker_with("w1", &slow_resync).await?;
    d.start_worker_with("w2", &slow_resync).await?;
    let ids: Vec<String> = (0..10).map(|i| format!("burst-{i}")).collect();
    for id in &ids {
        b.create_pipeline(generator_pipeline(
            id,
            200,
            1,
            d.destination(&unique(&id.replace('-', "_")), true),
            DesiredStatus::Active,
        ))
        .await?;
    }
    for id in &ids {
        wait_converged(&mut b, id, PipelineStatus::Ready, CONVERGE).await?;
    }

    // 500 updates, alternating between the replicas; A is killed (SIGKILL) halfway.
    let mut a_process = Some(a_process);
    let mut last: HashMap<String, DesiredStatus> = HashMap::new();
    let (mut via_a, mut via_b, mut failed_on_a) = (0, 0, 0);
    for i in 0..500 {
        if i == 250 {
            if let Some(p) = a_process.take() {
                p.kill().await?;
            }
        }
        let id = &ids[i % ids.len()];
        let desired = if (i / ids.len()).is_multiple_of(2) {
            DesiredStatus::Paused
        } else {
            DesiredStatus::Active
        };
        let on_a = i.is_multiple_of(2) && a_process.is_some();
        let result = if on_a {
            a.update_pipeline(set_desired(id, desired)).await
        } else {
            b.update_pipeline(set_desired(id, desired)).await
        };
        match result {
            Ok(_) => {
                if on_a {
                    via_a += 1;
                } else {
                    via_b += 1;
                }
                last.insert(id.clone(), desired);
            }
            Err(e) if on_a => {
                failed_on_a += 1;
                eprintln!("update {i} on A failed: {e}");
            }
            Err(e) => bail!("update {i} on B failed: {e}"),
        }
    }
    eprintln!("updates: {via_a} on A, {via_b} on B, {failed_on_a} failed on A");
    assert!(via_a >= 100 && via_b >= 250, "{via_a} / {via_b}");

    // Every pipeline converges on its last accepted update.
    for id in &ids {
        let want = match last[id] {
            DesiredStatus::Paused => PipelineStatus::Paused,
            _ => PipelineStatus::Ready,
        };
        wait_converged(&mut b, id, want, CONVERGE).await?;
        let p = get(&mut b, id).await?;
        assert_eq!(p.observed_generation, p.generation, "{id}");
    }
    // Nothing is left in the outbox: B relayed what A had not.
    let unsent: i64 =
        sqlx::query_scalar("SELECT count(*) FROM signal_outbox WHERE sent_at IS NULL")
            .fetch_one(&d.pool)
            .await?;
    assert_eq!(unsent, 0);
    d.shutdown().await
}
