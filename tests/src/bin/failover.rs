//! Benchmark: failover. Two workers own a fleet of READY pipelines; one is killed (-9).
//! Measured: from the kill until every pipeline the dead worker owned is owned by the
//! survivor and READY for its current generation. Each run is a fresh deployment; the
//! group session timeout, which bounds how soon the survivor may take over, is the
//! reference every run is divided by.
//!
//! Run (release build):
//! `cargo build --release --bins && cargo run --release -p sluice-e2e --bin failover -- --runs 5`

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use sluice_e2e::*;
use sluice_protocol::pb::DesiredStatus;

#[derive(Debug, Parser)]
#[command(
    about = "Measure failover: kill -9 a worker, time until its pipelines are READY on the survivor"
)]
struct Args {
    /// Runs per session timeout.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Pipelines in the fleet (about half end up on the worker that is killed).
    #[arg(long, default_value_t = 200)]
    pipelines: usize,
    /// Group session timeouts to measure, in milliseconds (the worker default is 10000).
    #[arg(long, value_delimiter = ',', default_value = "10000,3000")]
    session_timeouts_ms: Vec<u64>,
    /// Resync interval of the workers, in milliseconds (the worker default is 30000).
    #[arg(long, default_value_t = 30_000)]
    resync_interval_ms: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "failover of a worker owning about {} of {} READY pipelines; {} runs each",
        args.pipelines / 2,
        args.pipelines,
        args.runs
    );
    for session in &args.session_timeouts_ms {
        let mut seconds = Vec::new();
        let mut owned = Vec::new();
        for run in 0..args.runs {
            let (took, victims) = one_run(&args, *session)
                .await
                .with_context(|| format!("run {run} (session timeout {session} ms)"))?;
            eprintln!("session {session} ms, run {run}: {victims} pipelines in {took:.2?}");
            seconds.push(took.as_secs_f64());
            owned.push(victims);
        }
        seconds.sort_by(f64::total_cmp);
        let pick = |q: f64| seconds[((seconds.len() - 1) as f64 * q).round() as usize];
        let reference = *session as f64 / 1000.0;
        println!(
            "session timeout {reference:.1} s: pipelines moved {:?}; failover p50 {:.2} s \
             ({:.2}× the session timeout), p99 {:.2} s ({:.2}×), max {:.2} s",
            owned,
            pick(0.5),
            pick(0.5) / reference,
            pick(0.99),
            pick(0.99) / reference,
            seconds[seconds.len() - 1]
        );
    }
    Ok(())
}

/// One deployment, one kill; returns the failover time and how many pipelines moved.
async fn one_run(args: &Args, session_ms: u64) -> Result<(Duration, usize)> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    let env = [
        ("SLUICE_SESSION_TIMEOUT_MS", session_ms.to_string()),
        (
            "SLUICE_RESYNC_INTERVAL_MS",
            args.resync_interval_ms.to_string(),
        ),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    d.start_worker_with("victim", &env).await?;
    d.start_worker_with("survivor", &env).await?;
    let table = unique("fleet");
    for i in 0..args.pipelines {
        let mut destination = d.destination(&format!("{table}_{i}"), true);
        destination["batch_size"] = serde_json::json!(10);
        client
            .create_pipeline(generator_pipeline(
                &format!("fleet-{i}"),
                10,
                1,
                destination,
                DesiredStatus::Active,
            ))
            .await?;
    }
    wait_fleet_ready(&d.pool, args.pipelines, Duration::from_secs(300)).await?;
    let victims: BTreeSet<String> =
        sqlx::query_scalar::<_, String>("SELECT id FROM pipelines WHERE owner = 'victim'")
            .fetch_all(&d.pool)
            .await?
            .into_iter()
            .collect();
    let killed = Instant::now();
    d.take_worker_named("victim")?.kill().await?;
    let ids: Vec<String> = victims.iter().cloned().collect();
    wait_for(
        "the survivor to own them, READY",
        Duration::from_secs(300),
        || {
            let pool = d.pool.clone();
            let ids = ids.clone();
            async move {
                // Owned, READY, and writing: the survivor's write lane has fenced the
                // destination offsets with its own epoch.
                let moved: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pipelines p JOIN public._sluice_offsets o \
                   ON o.pipeline_id = p.id AND o.owner_epoch = p.owner_epoch \
                 WHERE p.id = ANY($1) AND p.owner = 'survivor' \
                   AND p.status = 'READY' AND p.observed_generation >= p.generation",
                )
                .bind(&ids)
                .fetch_one(&pool)
                .await?;
                Ok((moved == ids.len() as i64).then_some(()))
            }
        },
    )
    .await?;
    let took = killed.elapsed();
    d.shutdown().await?;
    Ok((took, victims.len()))
}
