//! WatchPipelines against the real binaries: the snapshot, then every change as it
//! commits, removals, resuming from a token, tenant isolation, and sluicectl watch.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus, PipelineStatus, WatchEventType};
use tokio::io::AsyncBufReadExt;

const CONVERGE: Duration = Duration::from_secs(90);

type Events = tonic::Streaming<pb::WatchPipelinesResponse>;

async fn watch(client: &mut Client, resume_token: &str) -> Result<Events> {
    Ok(client
        .watch_pipelines(pb::WatchPipelinesRequest {
            resume_token: resume_token.into(),
            pipeline_ids: Vec::new(),
        })
        .await?
        .into_inner())
}

/// Reads events until one satisfies `done`; returns everything read, that one last.
async fn until(
    events: &mut Events,
    what: &str,
    mut done: impl FnMut(&pb::WatchPipelinesResponse) -> bool,
) -> Result<Vec<pb::WatchPipelinesResponse>> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let next = tokio::time::timeout_at(deadline, events.message())
            .await
            .with_context(|| format!("waiting for {what}; saw {}", describe(&seen)))??;
        let Some(event) = next else {
            bail!("the watch ended before {what}; saw {}", describe(&seen));
        };
        let hit = done(&event);
        seen.push(event);
        if hit {
            return Ok(seen);
        }
    }
}

fn describe(events: &[pb::WatchPipelinesResponse]) -> String {
    events
        .iter()
        .map(|e| {
            let p = e.pipeline.clone().unwrap_or_default();
            format!("{}:{}:{}", e.r#type, p.id, p.phase)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn is(event: &pb::WatchPipelinesResponse, kind: WatchEventType, id: &str) -> bool {
    event.r#type == kind as i32 && event.pipeline.as_ref().is_some_and(|p| p.id == id)
}

fn status_is(event: &pb::WatchPipelinesResponse, id: &str, status: PipelineStatus) -> bool {
    is(event, WatchEventType::Changed, id)
        && event
            .pipeline
            .as_ref()
            .is_some_and(|p| p.status == status as i32 && p.observed_generation == p.generation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_the_snapshot_then_every_change_and_resumes_from_a_token() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let dest = |name: &str| d.destination(&unique(name), false);
    client
        .create_pipeline(generator_pipeline(
            "early",
            10,
            1,
            dest("early"),
            DesiredStatus::Paused,
        ))
        .await?;
    wait_converged(&mut client, "early", PipelineStatus::Paused, CONVERGE).await?;

    // Another tenant's pipelines stay out of this tenant's watch.
    let other_token = d.create_token("t-other", "operator").await?;
    let mut other = d.client_with(Some(&other_token)).await?;

    let mut events = watch(&mut client, "").await?;
    let start = until(&mut events, "SYNCED", |e| {
        e.r#type == WatchEventType::Synced as i32
    })
    .await?;
    assert_eq!(start.len(), 2, "{}", describe(&start));
    assert!(is(&start[0], WatchEventType::Existing, "early"));
    // Only a whole snapshot can be resumed after: SYNCED carries the token, EXISTING not.
    assert!(start[0].resume_token.is_empty() && !start[1].resume_token.is_empty());

    other
        .create_pipeline(generator_pipeline(
            "foreign",
            10,
            1,
            dest("foreign"),
            DesiredStatus::Paused,
        ))
        .await?;
    client
        .create_pipeline(generator_pipeline(
            "live",
            500,
            2,
            dest("live"),
            DesiredStatus::Active,
        ))
        .await?;
    let changes = until(&mut events, "live READY", |e| {
        status_is(e, "live", PipelineStatus::Ready)
    })
    .await?;
    assert!(
        !changes.iter().any(|e| e
            .pipeline
            .as_ref()
            .is_some_and(|p| p.id.contains("foreign"))),
        "{}",
        describe(&changes)
    );

    client
        .update_pipeline(set_desired("live", DesiredStatus::Paused))
        .await?;
    let paused = until(&mut events, "live PAUSED", |e| {
        status_is(e, "live", PipelineStatus::Paused)
    })
    .await?;
    let token = paused
        .last()
        .map(|e| e.resume_token.clone())
        .unwrap_or_default();

    // A removal arrives as REMOVED once the row is gone.
    client
        .delete_pipeline(pb::DeletePipelineRequest {
            id: "early".into(),
            ..Default::default()
        })
        .await?;
    until(&mut events, "early REMOVED", |e| {
        is(e, WatchEventType::Removed, "early")
    })
    .await?;
    drop(events);

    // Resumed from the token: no snapshot, the changes after it, the removal among them.
    let mut resumed = watch(&mut client, &token).await?;
    let after = until(&mut resumed, "early REMOVED again", |e| {
        is(e, WatchEventType::Removed, "early")
    })
    .await?;
    assert!(
        after
            .iter()
            .all(|e| e.r#type != WatchEventType::Existing as i32
                && e.r#type != WatchEventType::Synced as i32),
        "{}",
        describe(&after)
    );
    drop(resumed);

    // A token this server never issued is INVALID_ARGUMENT before any event.
    let bad = client
        .watch_pipelines(pb::WatchPipelinesRequest {
            resume_token: "nope".into(),
            pipeline_ids: Vec::new(),
        })
        .await
        .expect_err("bad token");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    // sluicectl watch prints the same, one line per event.
    let mut ctl = tokio::process::Command::new(bin_path("sluicectl")?)
        .args([
            "--server",
            &format!(
                "http://{}",
                d.control_plane_addr.clone().unwrap_or_default()
            ),
            "watch",
            "live",
        ])
        .env("SLUICE_TOKEN", d.token.clone().unwrap_or_default())
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = ctl.stdout.take().context("stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut printed = Vec::new();
    client
        .update_pipeline(set_desired("live", DesiredStatus::Active))
        .await?;
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .with_context(|| format!("sluicectl watch printed {printed:?}"))??
            .context("sluicectl watch ended")?;
        let ready = line.starts_with("CHANGED") && line.contains(" READY ");
        printed.push(line);
        if ready {
            break;
        }
    }
    assert!(printed[0].starts_with("EVENT"), "{printed:?}");
    assert!(
        printed[1].starts_with("EXISTING") && printed[1].contains("live"),
        "{printed:?}"
    );
    assert_eq!(printed[2], "SYNCED", "{printed:?}");
    ctl.kill().await?;
    d.shutdown().await
}
