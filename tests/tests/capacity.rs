//! A worker's capacity (--max-pipelines): at its limit it takes no more pipelines, and
//! the ones it declined show as UNASSIGNED with the reason until it has room.

use std::time::Duration;

use anyhow::Result;
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus, PipelineStatus};

const CONVERGE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_at_capacity_takes_no_more_and_says_why() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker_with("w1", &[("SLUICE_MAX_PIPELINES", "2")])
        .await?;
    for id in ["cap-0", "cap-1"] {
        client
            .create_pipeline(generator_pipeline(
                id,
                500,
                1,
                d.destination(&unique(&id.replace('-', "_")), true),
                DesiredStatus::Active,
            ))
            .await?;
        wait_converged(&mut client, id, PipelineStatus::Ready, CONVERGE).await?;
    }
    let third = unique("cap_2");
    client
        .create_pipeline(generator_pipeline(
            "cap-2",
            500,
            1,
            d.destination(&third, true),
            DesiredStatus::Active,
        ))
        .await?;
    let declined = wait_for("cap-2 declined", CONVERGE, || {
        let mut client = client.clone();
        async move {
            let p = get(&mut client, "cap-2").await?;
            Ok((!p.unassigned_reason.is_empty()).then_some(p))
        }
    })
    .await?;
    assert_eq!(declined.phase, "UNASSIGNED");
    assert_eq!(
        declined.unassigned_reason,
        "w1 is at capacity (2 pipelines, --max-pipelines)"
    );
    // It stays so across the worker's resyncs (2 s here): nothing of it runs.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let still = get(&mut client, "cap-2").await?;
    assert_eq!(
        (still.phase.as_str(), still.status),
        ("UNASSIGNED", PipelineStatus::Unspecified as i32)
    );
    assert!(!d.table_exists(&third).await?, "nothing was set up");

    // Room again: the worker takes it, and the reason goes.
    client
        .delete_pipeline(pb::DeletePipelineRequest {
            id: "cap-0".into(),
            ..Default::default()
        })
        .await?;
    wait_removed(&client, "cap-0", CONVERGE).await?;
    let taken = wait_converged(&mut client, "cap-2", PipelineStatus::Ready, CONVERGE).await?;
    assert_eq!(
        (taken.owner.as_str(), taken.unassigned_reason.as_str()),
        ("w1", "")
    );
    assert_eq!(d.row_count(&third).await?, 500);
    d.shutdown().await
}
