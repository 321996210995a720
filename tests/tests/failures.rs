//! Failure paths: a connector error ends in ERROR (never "complete") and is retried
//! when the generation changes; a crashed worker's pipelines move to a survivor.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use sluice_e2e::audit::check_rows;
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus, PipelineStatus};

const CONVERGE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_error_lands_in_error_and_a_fixed_spec_retries() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;

    // A destination database that does not exist: a config error, not retried.
    let missing_db = d
        .database_url
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/no_such_db_here"))
        .expect("url has a path");
    let table = unique("fixed");
    client
        .create_pipeline(generator_pipeline(
            "broken",
            100,
            2,
            json!({"url": missing_db, "table": table}),
            DesiredStatus::Active,
        ))
        .await?;
    let failed = wait_converged(&mut client, "broken", PipelineStatus::Error, CONVERGE).await?;
    assert_eq!(failed.phase, "ERROR");
    assert!(
        failed.last_error.contains("no_such_db_here"),
        "last_error: {}",
        failed.last_error
    );

    // Fixing the spec bumps the generation, which retries from SETUP.
    let fix = set_destination("broken", d.destination(&table, false));
    let updated = client.update_pipeline(fix).await?.into_inner();
    assert_eq!(updated.generation, failed.generation + 1);
    let ready = wait_converged(&mut client, "broken", PipelineStatus::Ready, CONVERGE).await?;
    assert!(
        ready.last_error.is_empty(),
        "last_error is cleared on recovery"
    );
    assert_eq!(d.row_count(&table).await?, 100);
    let moves = history(&mut client, "broken").await?;
    assert_eq!(moves, ["SETUP", "ERROR", "SETUP", "BACKFILL", "READY"]);
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_workers_pipelines_move_to_the_survivor() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    d.start_worker("w2").await?;

    let ids: Vec<String> = (0..8).map(|i| format!("fleet-{i}")).collect();
    let mut tables = Vec::new();
    for id in &ids {
        let table = unique("fleet");
        client
            .create_pipeline(generator_pipeline(
                id,
                200,
                11,
                d.destination(&table, false),
                DesiredStatus::Active,
            ))
            .await?;
        tables.push(table);
    }
    let mut owners = Vec::new();
    for id in &ids {
        owners.push(
            wait_converged(&mut client, id, PipelineStatus::Ready, CONVERGE)
                .await?
                .owner,
        );
    }
    let victim = owners[0].clone();
    let survivor = if victim == "w1" { "w2" } else { "w1" };
    let victim_index = if victim == "w1" { 0 } else { 1 };
    d.take_worker(victim_index).kill().await?;

    // The survivor takes over once the victim's group session expires, and acts on
    // changes for every pipeline.
    for id in &ids {
        client
            .update_pipeline(set_desired(id, DesiredStatus::Paused))
            .await?;
    }
    for id in &ids {
        let p = wait_converged(&mut client, id, PipelineStatus::Paused, CONVERGE).await?;
        assert_eq!(p.owner, survivor, "{id} must be owned by the survivor");
    }
    for table in &tables {
        check_rows(&d.pool, table, 11, 200).await?;
    }
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_pipeline_that_fails_recovers_in_place_with_the_same_spec() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let table = unique("inplace");
    client
        .create_pipeline(generator_pipeline(
            "inplace",
            300,
            8,
            d.destination(&table, false),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "inplace", PipelineStatus::Ready, CONVERGE).await?;
    client
        .update_pipeline(set_desired("inplace", DesiredStatus::Paused))
        .await?;
    wait_converged(&mut client, "inplace", PipelineStatus::Paused, CONVERGE).await?;

    // Break the destination under the pipeline: its offsets table disappears.
    sqlx::query("ALTER TABLE public._sluice_offsets RENAME TO _sluice_offsets_away")
        .execute(&d.pool)
        .await?;
    client
        .update_pipeline(set_desired("inplace", DesiredStatus::Active))
        .await?;
    let failed = wait_converged(&mut client, "inplace", PipelineStatus::Error, CONVERGE).await?;
    assert!(
        failed.last_error.contains("_sluice_offsets"),
        "{}",
        failed.last_error
    );

    // Repair it and re-state ACTIVE: that bumps the generation and retries.
    sqlx::query("ALTER TABLE public._sluice_offsets_away RENAME TO _sluice_offsets")
        .execute(&d.pool)
        .await?;
    let retried = client
        .update_pipeline(set_desired("inplace", DesiredStatus::Active))
        .await?
        .into_inner();
    assert_eq!(retried.generation, failed.generation + 1);
    wait_converged(&mut client, "inplace", PipelineStatus::Ready, CONVERGE).await?;
    check_rows(&d.pool, &table, 8, 300).await?;
    let moves = history(&mut client, "inplace").await?;
    assert_eq!(
        moves,
        ["SETUP", "BACKFILL", "READY", "PAUSED", "ERROR", "SETUP", "BACKFILL", "READY"]
    );
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_interrupts_an_activity_that_keeps_retrying() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    // Nothing listens on port 1: connection refused is transient, so setup retries.
    let unreachable = json!({"url": "postgres://sluice:sluice@127.0.0.1:1/sluice", "table": "t"});
    client
        .create_pipeline(generator_pipeline(
            "stuck",
            50,
            1,
            unreachable,
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "stuck", PipelineStatus::Setup, CONVERGE).await?;

    let table = unique("unstuck");
    let fix = set_destination("stuck", d.destination(&table, false));
    client.update_pipeline(fix).await?;
    wait_converged(&mut client, "stuck", PipelineStatus::Ready, CONVERGE).await?;
    assert_eq!(d.row_count(&table).await?, 50);
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_pipeline_whose_destination_never_worked_still_removes_it() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let missing_db = d
        .database_url
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/no_such_db_either"))
        .expect("url has a path");
    client
        .create_pipeline(generator_pipeline(
            "doomed",
            10,
            1,
            json!({"url": missing_db, "table": "t"}),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "doomed", PipelineStatus::Error, CONVERGE).await?;
    client
        .delete_pipeline(pb::DeletePipelineRequest {
            id: "doomed".into(),
            ..Default::default()
        })
        .await?;
    wait_removed(&client, "doomed", CONVERGE).await?;
    let events = client
        .list_pipeline_events(pb::ListPipelineEventsRequest {
            pipeline_id: "doomed".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    let moves: Vec<&str> = events.iter().map(|e| e.to_status.as_str()).collect();
    assert_eq!(moves, ["SETUP", "ERROR", "TEARDOWN", "REMOVED"]);
    d.shutdown().await
}
