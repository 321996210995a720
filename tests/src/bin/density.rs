//! Benchmark: density. One worker owns N READY, idle pipelines (generator sources of
//! one record, PostgreSQL destinations). Measured: the time until all are READY, and
//! the worker's threads, open files, resident memory and CPU use with 10 pipelines and
//! with N, once they settle; the cost per added pipeline is compared with the goal of 50 KB
//! (the reference), so the figure is a ratio.
//!
//! Run (release build):
//! `cargo build --release --bins && cargo run --release -p sluice-e2e --bin density -- --pipelines 10000`

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use sluice_e2e::procstat::{cpu_share, settled};
use sluice_e2e::*;

const GOAL_KB_PER_PIPELINE: f64 = 50.0;
/// How long the idle worker's CPU use is measured.
const IDLE_WINDOW: Duration = Duration::from_secs(20);

#[derive(Debug, Parser)]
#[command(about = "Measure what idle READY pipelines cost one worker")]
struct Args {
    /// READY pipelines on the worker at the end.
    #[arg(long, default_value_t = 10_000)]
    pipelines: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut d = Deployment::new().await?;
    d.control_plane_args = vec![
        "--max-pipelines-per-tenant".into(),
        (args.pipelines + 10).to_string(),
    ];
    let mut client = d.start_control_plane().await?;
    d.start_worker("dense").await?;
    let pid = d.worker("dense")?.pid().context("worker pid")?;

    create(&d, &mut client, 0, 10).await?;
    ready(&d, 10).await?;
    let few = settled(pid).await?;
    let few_cpu = cpu_share(pid, IDLE_WINDOW).await?;
    let started = Instant::now();
    create(&d, &mut client, 10, args.pipelines).await?;
    ready(&d, args.pipelines).await?;
    let took = started.elapsed();
    let lots = settled(pid).await?;
    let lots_cpu = cpu_share(pid, IDLE_WINDOW).await?;
    let admin =
        sluice_infra::kafka::KafkaSettings::new(d.infra.kafka_bootstrap_servers.clone()).admin()?;
    let (topics, partitions) = admin
        .topics_under(&format!("{}.", d.topic_namespace))
        .await?;
    let added = (args.pipelines - 10) as f64;
    let per_pipeline = (lots.rss_kb as f64 - few.rss_kb as f64) / added;
    println!(
        "{} READY idle pipelines on one worker: {} created and READY in {:.1} s ({:.0} per s)",
        args.pipelines,
        args.pipelines - 10,
        took.as_secs_f64(),
        added / took.as_secs_f64()
    );
    println!(
        "threads {} -> {}, open files {} -> {}, RSS {} KB -> {} KB (10 -> {} pipelines)",
        few.threads, lots.threads, few.files, lots.files, few.rss_kb, lots.rss_kb, args.pipelines
    );
    println!(
        "worker CPU while all are idle: {:.1} % of a core with 10, {:.1} % with {} \
         (over {} s each)",
        100.0 * few_cpu,
        100.0 * lots_cpu,
        args.pipelines,
        IDLE_WINDOW.as_secs()
    );
    println!(
        "RSS per idle pipeline {per_pipeline:.1} KB = {:.2}x the {GOAL_KB_PER_PIPELINE} KB goal; \
         Kafka: {topics} topics, {partitions} partitions in the deployment's namespace \
         (inputs topics are made on a pipeline's first push; none was pushed to)",
        per_pipeline / GOAL_KB_PER_PIPELINE,
    );
    d.shutdown().await
}

async fn create(d: &Deployment, client: &mut Client, from: usize, to: usize) -> Result<()> {
    create_generator_fleet(d, client, "dense", from..to, 1).await
}

async fn ready(d: &Deployment, n: usize) -> Result<()> {
    wait_fleet_ready(&d.pool, n, Duration::from_secs(7200)).await
}
