//! The tested runbooks of docs/runbooks: each runbook's `sh` blocks run, in order and
//! unchanged, with bash against a control plane and workers started here, after the
//! pipelines the runbook talks about were set up; then the outcome is checked.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use sluice_e2e::local_stack::LocalStack;
use sluice_e2e::stack::{PrivateStack, Service};
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus, PipelineStatus};

const CONVERGE: Duration = Duration::from_secs(120);

/// The `sh` blocks of a runbook, in order.
fn sh_blocks(runbook: &str) -> Result<String> {
    sh_blocks_of(runbook, None)
}

/// The `sh` blocks of a runbook, in order: all of them, or those under the `## `
/// headings that start with `section` (e.g. "## 2.").
fn sh_blocks_of(runbook: &str, section: Option<&str>) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/runbooks")
        .join(runbook);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let mut script = String::new();
    let mut inside = false;
    let mut selected = section.is_none();
    for line in text.lines() {
        if !inside && line.starts_with("## ") {
            selected = section.is_none_or(|s| line.starts_with(s));
        }
        if !inside && line.trim_end() == "```sh" {
            inside = true;
        } else if inside && line.trim_end() == "```" {
            inside = false;
            script.push('\n');
        } else if inside && selected {
            script.push_str(line);
            script.push('\n');
        }
    }
    ensure!(
        !script.trim().is_empty(),
        "{runbook} has no sh block {section:?}"
    );
    Ok(script)
}

/// Runs the runbook's blocks with bash (-e: the first failing command fails it) in
/// `dir`, with sluicectl on the PATH pointed at the deployment.
async fn run(d: &Deployment, runbook: &str, dir: &Path) -> Result<Output> {
    run_with(d, runbook, dir, &[]).await
}

/// [`run`] with extra environment (e.g. a local stack's SLUICE_LOCAL_DIR).
async fn run_with(
    d: &Deployment,
    runbook: &str,
    dir: &Path,
    env: &[(String, String)],
) -> Result<Output> {
    run_script(d, runbook, sh_blocks(runbook)?, dir, env).await
}

/// Runs one section of a runbook (see [`sh_blocks_of`]).
async fn run_section(d: &Deployment, runbook: &str, section: &str, dir: &Path) -> Result<Output> {
    let script = sh_blocks_of(runbook, Some(section))?;
    run_script(d, runbook, script, dir, &[]).await
}

async fn run_script(
    d: &Deployment,
    runbook: &str,
    script: String,
    dir: &Path,
    env: &[(String, String)],
) -> Result<Output> {
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
        .envs(env.iter().map(|(k, v)| (k, v)))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_secrets_key_reseals_every_secret_and_nothing_stops() -> Result<()> {
    let mut d = Deployment::new().await?;
    let stack = LocalStack::start(&mut d, 2).await?;
    let mut client = d.client().await?;
    let old_key = std::fs::read_to_string(d.secrets_key_file.as_ref().context("key")?)?;
    let old_id = sluice_protocol::secrets::SecretBox::from_base64(&old_key)?
        .key_id()
        .to_owned();
    // Destinations with passwords (the local PostgreSQL trusts local connections, so
    // any password connects); the values are the suite's marked secrets.
    let mut tables = Vec::new();
    for (id, rows) in [("orders", 1500), ("invoices", 1200)] {
        let table = unique(id);
        let mut url = url::Url::parse(&d.database_url)?;
        url.set_password(Some(&format!("e2e-secret-{id}")))
            .map_err(|()| anyhow::anyhow!("password"))?;
        client
            .create_pipeline(generator_pipeline(
                id,
                rows,
                3,
                serde_json::json!({"url": url.to_string(), "table": table}),
                DesiredStatus::Active,
            ))
            .await?;
        tables.push((id, table, rows));
    }
    for (id, ..) in &tables {
        wait_converged(&mut client, id, PipelineStatus::Ready, CONVERGE).await?;
    }
    assert_eq!(stored_key_ids(&d).await?, [old_id.as_str()].repeat(2));

    let out = run_with(&d, "rotate-secrets-key.md", &workspace_root(), &stack.env()).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The control plane restarted: a new connection.
    let mut client = d.client().await?;
    assert!(
        stdout.contains("resealed: 2 values in 2 pipelines"),
        "{stdout}"
    );

    // The configured key file holds the new key; the old one is gone.
    let key_file = d.secrets_key_file.clone().context("key")?;
    let new_key = std::fs::read_to_string(&key_file)?;
    assert_ne!(new_key.trim(), old_key.trim());
    assert!(!key_file.with_extension("key.previous").exists());
    let new_id = sluice_protocol::secrets::SecretBox::from_base64(&new_key)?
        .key_id()
        .to_owned();
    assert_eq!(stored_key_ids(&d).await?, [new_id.as_str()].repeat(2));
    // Every process runs with the new key alone, and still opens every secret: a sync
    // of each pipeline succeeds and the rows are all there, written once.
    for name in ["control-plane", "worker-1", "worker-2"] {
        let log = stack.log(name)?;
        let loaded = log
            .lines()
            .rfind(|l| l.contains("secrets key loaded"))
            .with_context(|| format!("{name} logged no key"))?;
        assert!(
            loaded.contains(&new_id) && !loaded.contains(&old_id),
            "{name}: {loaded}"
        );
    }
    for (id, table, rows) in &tables {
        let p = get(&mut client, id).await?;
        assert_eq!(p.status, PipelineStatus::Ready as i32, "{id}");
        sluice_e2e::audit::check_rows(&d.pool, table, 3, *rows).await?;
    }
    stack.stop().await?;
    d.shutdown().await
}

/// The key id of every sealed value stored in the deployment's pipelines.
async fn stored_key_ids(d: &Deployment) -> Result<Vec<String>> {
    let specs: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT spec FROM pipelines ORDER BY id")
            .fetch_all(&d.pool)
            .await?;
    let mut ids = Vec::new();
    for spec in specs {
        let spec = sluice_protocol::spec::PipelineSpec::from_json(spec)?;
        ids.extend(sluice_protocol::secrets::sealed_key_ids(&spec));
    }
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_then_drain_a_worker_moves_pipelines_without_a_stop() -> Result<()> {
    let mut d = Deployment::new().await?;
    let stack = LocalStack::start(&mut d, 2).await?;
    let mut client = d.client().await?;
    // Pipelines on every partition of the signals topic (4 here), so that any worker
    // given a partition owns pipelines.
    let mut pipelines = Vec::new();
    let mut covered = std::collections::BTreeSet::new();
    for n in 0.. {
        let id = format!("p{n}");
        let partition = sluice_protocol::partition::partition_for(&format!("demo.{id}"), 4);
        if covered.insert(partition) || pipelines.len() < 6 {
            pipelines.push((id, unique(&format!("p{n}"))));
        }
        if covered.len() == 4 && pipelines.len() >= 6 {
            break;
        }
    }
    for (n, (id, table)) in pipelines.iter().enumerate() {
        client
            .create_pipeline(generator_pipeline(
                id,
                800 + 100 * n as u64,
                5,
                d.destination(table, false),
                DesiredStatus::Active,
            ))
            .await?;
    }
    for (id, _) in &pipelines {
        wait_converged(&mut client, id, PipelineStatus::Ready, CONVERGE).await?;
    }

    let root = workspace_root();
    let mut env = stack.env();
    env.push(("NEW_WORKER".into(), "worker-3".into()));
    run_with(&d, "scale-out.md", &root, &env).await?;
    let owners = owners_of(&mut client, &pipelines).await?;
    assert!(owners.contains(&"worker-3".to_owned()), "{owners:?}");

    env.push(("WORKER".into(), "worker-3".into()));
    let out = run_with(&d, "drain-a-worker.md", &root, &env).await?;
    let drained = std::fs::read_to_string(stack.local_dir.join("owned-by-worker-3.txt"))?;
    assert!(
        !drained.trim().is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let owners = owners_of(&mut client, &pipelines).await?;
    assert!(
        owners.iter().all(|o| o == "worker-1" || o == "worker-2"),
        "{owners:?}"
    );
    for (n, (id, table)) in pipelines.iter().enumerate() {
        let p = get(&mut client, id).await?;
        assert_eq!(p.status, PipelineStatus::Ready as i32, "{id}");
        sluice_e2e::audit::check_rows(&d.pool, table, 5, 800 + 100 * n as u64).await?;
    }
    stack.stop().await?;
    d.shutdown().await
}

async fn owners_of(client: &mut Client, pipelines: &[(String, String)]) -> Result<Vec<String>> {
    let mut owners = Vec::new();
    for (id, _) in pipelines {
        owners.push(get(client, id).await?.owner);
    }
    Ok(owners)
}

/// A pipeline READY and one paused during the outage: the runbook's checks pass while
/// Kafka is away (API up, nothing in ERROR) and after it (everything converged, the
/// pause applied, the rows exact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "outage drill on a private stack: run by deploy/local/test.sh with the chaos suite"]
async fn kafka_outage_changes_made_during_it_are_applied_after() -> Result<()> {
    outage_drill(Service::Kafka, "kafka-outage.md").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "outage drill on a private stack: run by deploy/local/test.sh with the chaos suite"]
async fn postgres_failover_calls_fail_then_everything_catches_up() -> Result<()> {
    outage_drill(Service::Postgres, "postgres-failover.md").await
}

async fn outage_drill(service: Service, runbook: &str) -> Result<()> {
    let private = PrivateStack::start().await?;
    let mut d = Deployment::on(private.infra()?).await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    d.start_worker("w2").await?;
    let mut tables = Vec::new();
    for (id, seed) in [("orders", 1), ("invoices", 2)] {
        let table = unique(id);
        client
            .create_pipeline(generator_pipeline(
                id,
                2000,
                seed,
                d.destination(&table, false),
                DesiredStatus::Active,
            ))
            .await?;
        tables.push((id, seed, table));
    }
    for (id, ..) in &tables {
        wait_converged(&mut client, id, PipelineStatus::Ready, CONVERGE).await?;
    }
    let dir = work_dir(runbook)?;
    private.stop(service).await?;
    let pause = client
        .update_pipeline(set_desired("invoices", DesiredStatus::Paused))
        .await;
    // Longer than the group session timeout (6 s here): the workers lose their
    // partitions when Kafka is away.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = run_section(&d, runbook, "## 1.", &dir).await?;
    let during = String::from_utf8_lossy(&during.stdout).into_owned();
    match service {
        Service::Kafka => {
            pause.context("the API works without Kafka")?;
            assert!(during.contains("invoices"), "{during}");
        }
        Service::Postgres => {
            assert!(pause.is_err(), "a change without the database: {pause:?}");
            assert!(during.contains("cannot reach its database"), "{during}");
        }
    }
    private.restart_stopped().await?;
    if matches!(service, Service::Postgres) {
        // The runbook says: issue again what failed. The call may meet the database
        // still coming back; it is retried like an operator would.
        wait_for("the pause went through", CONVERGE, || {
            let mut client = client.clone();
            async move {
                Ok(client
                    .update_pipeline(set_desired("invoices", DesiredStatus::Paused))
                    .await
                    .ok()
                    .map(|_| ()))
            }
        })
        .await?;
    }
    let after = run_section(&d, runbook, "## 2.", &dir).await?;
    let after = String::from_utf8_lossy(&after.stdout).into_owned();
    assert!(after.contains("orders"), "{after}");
    let invoices = get(&mut client, "invoices").await?;
    assert_eq!(
        (invoices.status, invoices.observed_generation),
        (PipelineStatus::Paused as i32, invoices.generation),
        "the pause made during the outage is applied"
    );
    assert_eq!(
        get(&mut client, "orders").await?.status,
        PipelineStatus::Ready as i32
    );
    for (_, seed, table) in &tables {
        sluice_e2e::audit::check_rows(&d.pool, table, *seed, 2000).await?;
    }
    d.shutdown().await?;
    drop(private);
    Ok(())
}

/// The stack runs from a copy of the binaries; the "new build" replaces the files
/// while it runs, as `cargo build` does. A backfill is under way throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_replaces_every_process_and_a_backfill_ends_exact() -> Result<()> {
    const BINARIES: [&str; 3] = ["sluice-control-plane", "sluice-worker", "sluicectl"];
    let mut d = Deployment::new().await?;
    let target = work_dir("rolling-upgrade")?.join("target");
    let bin = target.join("debug");
    std::fs::create_dir_all(&bin)?;
    for name in BINARIES {
        std::fs::copy(bin_path(name)?, bin.join(name))?;
    }
    let stack = LocalStack::start_from(&mut d, 2, Some(target.clone())).await?;
    let mut client = d.client().await?;
    let table = unique("orders");
    client
        .create_pipeline(generator_pipeline(
            "orders",
            2000,
            6,
            d.destination(&table, false),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "orders", PipelineStatus::Ready, CONVERGE).await?;
    let events = unique("events");
    client
        .create_pipeline(pipeline_request(
            "events",
            generator_config(30_000, 8, 1000, 2500),
            d.destination(&events, false),
            DesiredStatus::Paused,
        ))
        .await?;
    wait_converged(&mut client, "events", PipelineStatus::Paused, CONVERGE).await?;
    let audit = sluice_e2e::audit::WriteAudit::install(&d.pool, &events).await?;
    client
        .update_pipeline(set_desired("events", DesiredStatus::Active))
        .await?;
    wait_for("the backfill under way", CONVERGE, || async {
        Ok((audit.count(&d.pool).await? > 2000).then_some(()))
    })
    .await?;
    let old_pids: Vec<u32> = ["control-plane", "worker-1", "worker-2"]
        .iter()
        .map(|n| stack.pid(n))
        .collect::<Result<_>>()?;

    // The new build lands under the running processes.
    for name in BINARIES {
        let staged = bin.join(format!("{name}.new"));
        std::fs::copy(bin_path(name)?, &staged)?;
        std::fs::rename(&staged, bin.join(name))?;
    }
    let out = run_with(&d, "rolling-upgrade.md", &workspace_root(), &stack.env()).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The control plane restarted: a new connection.
    let mut client = d.client().await?;
    assert!(stdout.contains("older build"), "seen before: {stdout}");
    assert!(stdout.contains("migrations applied"), "{stdout}");
    for (name, old) in ["control-plane", "worker-1", "worker-2"]
        .iter()
        .zip(old_pids)
    {
        assert_ne!(stack.pid(name)?, old, "{name} was replaced");
    }
    assert!(
        get(&mut client, "events").await?.phase != "ERROR",
        "the backfill survived the upgrade"
    );
    wait_converged(&mut client, "events", PipelineStatus::Ready, CONVERGE).await?;
    audit.check_exact(&d.pool, 8, 30_000, None).await?;
    sluice_e2e::audit::check_rows(&d.pool, &table, 6, 2000).await?;
    stack.stop().await?;
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_partitions_grow_and_pipelines_move_without_a_replay() -> Result<()> {
    use sluice_protocol::partition::partition_for;
    let mut d = Deployment::new().await?;
    let stack = LocalStack::start(&mut d, 2).await?;
    let mut client = d.client().await?;
    // Ids of which some hash to another partition over 8 than over 4, some not.
    let mut pipelines = Vec::new();
    for n in 0.. {
        let id = format!("q{n}");
        let key = format!("demo.{id}");
        let moves = partition_for(&key, 8) != partition_for(&key, 4);
        let (moving, staying) =
            pipelines.iter().fold(
                (0, 0),
                |(m, s), (_, _, moved)| if *moved { (m + 1, s) } else { (m, s + 1) },
            );
        if (moves && moving < 4) || (!moves && staying < 2) {
            pipelines.push((id, unique(&format!("q{n}")), moves));
        }
        if pipelines.len() == 6 {
            break;
        }
    }
    for (n, (id, table, _)) in pipelines.iter().enumerate() {
        client
            .create_pipeline(generator_pipeline(
                id,
                600 + 100 * n as u64,
                4,
                d.destination(table, false),
                DesiredStatus::Active,
            ))
            .await?;
    }
    for (id, ..) in &pipelines {
        wait_converged(&mut client, id, PipelineStatus::Ready, CONVERGE).await?;
    }
    let audits = {
        let mut audits = Vec::new();
        for (_, table, _) in &pipelines {
            audits.push(sluice_e2e::audit::WriteAudit::install(&d.pool, table).await?);
        }
        audits
    };

    let mut env = stack.env();
    env.push(("PARTITIONS".into(), "8".into()));
    let out = run_with(&d, "signals-partitions.md", &workspace_root(), &env).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut client = d.client().await?;
    assert!(stdout.contains("grown from 4 to 8 partitions"), "{stdout}");
    assert!(stdout.contains("moved: 4 pipelines"), "{stdout}");

    let stored: Vec<(String, i32)> =
        sqlx::query_as("SELECT id, partition FROM pipelines ORDER BY id")
            .fetch_all(&d.pool)
            .await?;
    for (key, partition) in &stored {
        assert_eq!(*partition, partition_for(key, 8), "{key}");
    }
    for (n, ((id, table, _), audit)) in pipelines.iter().zip(&audits).enumerate() {
        let p = get(&mut client, id).await?;
        assert_eq!(p.status, PipelineStatus::Ready as i32, "{id}");
        assert!(!p.owner.is_empty(), "{id} has an owner");
        sluice_e2e::audit::check_rows(&d.pool, table, 4, 600 + 100 * n as u64).await?;
        // The move replayed nothing into the destination.
        assert_eq!(audit.count(&d.pool).await?, 0, "{id}: rows written again");
    }
    stack.stop().await?;
    d.shutdown().await
}
