//! The tested runbooks of docs/runbooks: each runbook's `sh` blocks run, in order and
//! unchanged, with bash against a control plane and workers started here, after the
//! pipelines the runbook talks about were set up; then the outcome is checked.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus, PipelineStatus};

const CONVERGE: Duration = Duration::from_secs(120);

/// The `sh` blocks of a runbook, in order.
fn sh_blocks(runbook: &str) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/runbooks")
        .join(runbook);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let mut script = String::new();
    let mut inside = false;
    for line in text.lines() {
        if !inside && line.trim_end() == "```sh" {
            inside = true;
        } else if inside && line.trim_end() == "```" {
            inside = false;
            script.push('\n');
        } else if inside {
            script.push_str(line);
            script.push('\n');
        }
    }
    ensure!(!script.trim().is_empty(), "{runbook} has no sh block");
    Ok(script)
}

/// Runs the runbook's blocks with bash (-e: the first failing command fails it) in
/// `dir`, with sluicectl on the PATH pointed at the deployment.
async fn run(d: &Deployment, runbook: &str, dir: &Path) -> Result<Output> {
    let script = sh_blocks(runbook)?;
    let bin_dir = bin_path("sluicectl")?
        .parent()
        .map(Path::to_path_buf)
        .context("bin dir")?;
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir)
        .env("PATH", path)
        .env(
            "SLUICE_SERVER",
            format!(
                "http://{}",
                d.control_plane_addr.clone().unwrap_or_default()
            ),
        )
        .env("SLUICE_TOKEN", d.token.clone().unwrap_or_default())
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "{runbook} failed:\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

fn work_dir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(unique(name));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_everything_then_resume_exactly_what_ran() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    d.start_worker("w2").await?;
    for (id, desired) in [
        ("orders", DesiredStatus::Active),
        ("invoices", DesiredStatus::Active),
        ("refunds", DesiredStatus::Active),
        ("archive", DesiredStatus::Paused),
    ] {
        client
            .create_pipeline(generator_pipeline(
                id,
                2000,
                1,
                d.destination(&unique(id), false),
                desired,
            ))
            .await?;
    }
    for id in ["orders", "invoices", "refunds"] {
        wait_converged(&mut client, id, PipelineStatus::Ready, CONVERGE).await?;
    }
    wait_converged(&mut client, "archive", PipelineStatus::Paused, CONVERGE).await?;

    let dir = work_dir("pause-everything")?;
    run(&d, "pause-everything.md", &dir).await?;

    let listed = std::fs::read_to_string(dir.join("active-before-pause.txt"))?;
    let mut listed: Vec<&str> = listed.lines().collect();
    listed.sort_unstable();
    assert_eq!(listed, ["t1/invoices", "t1/orders", "t1/refunds"]);
    for id in ["orders", "invoices", "refunds"] {
        let p = get(&mut client, id).await?;
        assert_eq!(
            (p.desired_status, p.status),
            (DesiredStatus::Active as i32, PipelineStatus::Ready as i32),
            "{id}"
        );
        // Each went through PAUSED and back.
        let moves = history(&mut client, id).await?;
        assert!(
            moves.ends_with(&["PAUSED".to_owned(), "READY".to_owned()]),
            "{id}: {moves:?}"
        );
    }
    let archive = get(&mut client, "archive").await?;
    assert_eq!(
        archive.desired_status,
        DesiredStatus::Paused as i32,
        "left paused"
    );
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_error_fixes_the_spec_and_writes_each_record_once() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let table = unique("orders");
    let right_url = d.database_url.clone();
    let wrong_url = wrong_user(&right_url)?;
    client
        .create_pipeline(generator_pipeline(
            "orders",
            3000,
            9,
            serde_json::json!({"url": wrong_url, "table": table}),
            DesiredStatus::Active,
        ))
        .await?;
    wait_for("orders in ERROR", CONVERGE, || {
        let mut client = client.clone();
        async move {
            let p = get(&mut client, "orders").await?;
            Ok((p.status == PipelineStatus::Error as i32).then_some(()))
        }
    })
    .await?;

    // The operator's corrected spec file.
    let dir = work_dir("recover-error")?;
    std::fs::write(
        dir.join("orders.yaml"),
        format!(
            "id: orders\nspec:\n  source:\n    type: generator\n    config:\n      count: 3000\n      seed: 9\n  destination:\n    type: postgres\n    config:\n      url: {right_url}\n      table: {table}\n"
        ),
    )?;
    let out = run(&d, "recover-error.md", &dir).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ERROR"),
        "list --status error shows it:\n{stdout}"
    );
    assert!(
        stdout.contains("no_such_sluice_user") && stdout.contains("does not exist"),
        "describe shows why:\n{stdout}"
    );
    assert!(stdout.contains("pipeline/orders updated"), "{stdout}");

    let p = get(&mut client, "orders").await?;
    assert_eq!(p.status, PipelineStatus::Ready as i32);
    sluice_e2e::audit::check_rows(&d.pool, &table, 9, 3000).await?;
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_backfill_brings_deleted_rows_back_with_a_reset_run() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let table = unique("orders");
    client
        .create_pipeline(generator_pipeline(
            "orders",
            2500,
            4,
            d.destination(&table, false),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "orders", PipelineStatus::Ready, CONVERGE).await?;
    sqlx::query(&format!("DELETE FROM public.{table} WHERE id % 5 = 0"))
        .execute(&d.pool)
        .await?;
    assert_eq!(d.row_count(&table).await?, 2000);

    let dir = work_dir("re-backfill")?;
    let out = run(&d, "re-backfill.md", &dir).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("reset") && stdout.contains("succeeded"),
        "{stdout}"
    );

    sluice_e2e::audit::check_rows(&d.pool, &table, 4, 2500).await?;
    let runs = client
        .list_runs(pb::ListRunsRequest {
            pipeline_id: "orders".into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .runs;
    assert_eq!(
        (runs[0].trigger.as_str(), runs[0].outcome.as_str()),
        ("reset", "succeeded")
    );
    d.shutdown().await
}

/// The URL with a user the database does not know (the local PostgreSQL trusts
/// local connections, so a wrong password alone would pass).
fn wrong_user(url: &str) -> Result<String> {
    let mut parsed = url::Url::parse(url)?;
    parsed
        .set_username("no_such_sluice_user")
        .map_err(|()| anyhow::anyhow!("cannot set a user in {url}"))?;
    Ok(parsed.to_string())
}
