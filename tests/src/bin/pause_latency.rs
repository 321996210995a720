//! Benchmark: time from `UpdatePipeline(desired_status=PAUSED)` returning to the worker
//! persisting PAUSED (the status event's commit-time timestamp), over many pauses of a
//! READY pipeline. Starts its own control plane and worker against the local
//! PostgreSQL and Kafka (deploy/local/up.sh), like the end-to-end tests.
//!
//! Under load: `--others N` READY pipelines owned by the same worker (idle, their write
//! lanes reading), and `--backfill R` one more pipeline backfilling R records into
//! PostgreSQL throughout the measurement (started again whenever it finishes).
//!
//! Run: `cargo build --release --bins && cargo run --release -p sluice-e2e --bin
//! pause-latency -- --pauses 200 --others 1000 --backfill 2000000`

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::Parser;
use sluice_e2e::*;
use sluice_protocol::pb::{DesiredStatus, PipelineStatus};

#[derive(Debug, Parser)]
#[command(about = "Measure pause latency (UpdatePipeline returned → PAUSED persisted)")]
struct Args {
    /// Number of pause/resume cycles to measure.
    #[arg(long, default_value_t = 200)]
    pauses: usize,
    /// Other READY pipelines on the same worker.
    #[arg(long, default_value_t = 0)]
    others: usize,
    /// Records of one more pipeline that backfills during the measurement (0: none).
    #[arg(long, default_value_t = 0)]
    backfill: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut d = Deployment::new().await?;
    d.control_plane_args = vec![
        "--max-pipelines-per-tenant".into(),
        (args.others + 10).to_string(),
    ];
    let mut client = d.start_control_plane().await?;
    d.start_worker("bench-worker").await?;
    create_generator_fleet(&d, &mut client, "other", 0..args.others, 1).await?;
    wait_fleet_ready(&d.pool, args.others, Duration::from_secs(3600)).await?;
    if args.others > 0 {
        println!("{} other pipelines READY", args.others);
    }
    let backfill = if args.backfill > 0 {
        client
            .create_pipeline(pipeline_request(
                "busy",
                generator_config(args.backfill, 1, 5000, 0),
                d.destination(&unique("busy"), true),
                DesiredStatus::Active,
            ))
            .await?;
        Some(tokio::spawn(keep_backfilling(d.client().await?)))
    } else {
        None
    };
    let table = unique("bench");
    client
        .create_pipeline(generator_pipeline(
            "bench",
            1_000,
            1,
            d.destination(&table, false),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(
        &mut client,
        "bench",
        PipelineStatus::Ready,
        Duration::from_secs(120),
    )
    .await?;

    let mut after_return = Vec::with_capacity(args.pauses);
    let mut from_request = Vec::with_capacity(args.pauses);
    for i in 0..args.pauses {
        let last_event: i64 = sqlx::query_scalar(
            "SELECT COALESCE(max(id), 0) FROM pipeline_events WHERE pipeline_id = 't1.bench'",
        )
        .fetch_one(&d.pool)
        .await?;
        let sent = SystemTime::now();
        client
            .update_pipeline(set_desired("bench", DesiredStatus::Paused))
            .await?;
        let returned = SystemTime::now();
        let persisted: SystemTime = wait_for("PAUSED event", Duration::from_secs(30), || {
            let pool = d.pool.clone();
            async move {
                let t: Option<chrono_free::Ts> = sqlx::query_scalar(
                    "SELECT (extract(epoch FROM time) * 1000000)::BIGINT FROM pipeline_events \
                     WHERE pipeline_id = 't1.bench' AND to_status = 'PAUSED' AND id > $1",
                )
                .bind(last_event)
                .fetch_optional(&pool)
                .await?;
                Ok(t.map(chrono_free::to_system_time))
            }
        })
        .await
        .with_context(|| format!("pause {i}"))?;
        after_return.push(signed_ms(persisted, returned));
        from_request.push(signed_ms(persisted, sent));
        client
            .update_pipeline(set_desired("bench", DesiredStatus::Active))
            .await?;
        wait_converged(
            &mut client,
            "bench",
            PipelineStatus::Ready,
            Duration::from_secs(30),
        )
        .await?;
    }
    if let Some(task) = backfill {
        task.abort();
        let runs: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pipeline_runs WHERE pipeline_id = 't1.busy'")
                .fetch_one(&d.pool)
                .await?;
        println!("backfill runs of the busy pipeline during the measurement: {runs}");
    }
    breakdown(&d).await?;
    report(
        "UpdatePipeline returned -> PAUSED persisted",
        &mut after_return,
    );
    report(
        "UpdatePipeline sent     -> PAUSED persisted",
        &mut from_request,
    );
    d.shutdown().await
}

/// Resets and resumes the busy pipeline whenever its backfill finished, so that one
/// backfill is always running.
async fn keep_backfilling(mut client: Client) -> Result<()> {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let p = get(&mut client, "busy").await?;
        if p.status == PipelineStatus::Ready as i32 {
            client
                .update_pipeline(set_desired("busy", DesiredStatus::Paused))
                .await?;
            wait_converged(
                &mut client,
                "busy",
                PipelineStatus::Paused,
                Duration::from_secs(60),
            )
            .await?;
            client
                .reset_pipeline(sluice_protocol::pb::ResetPipelineRequest {
                    pipeline_id: "busy".into(),
                    ..Default::default()
                })
                .await?;
            client
                .update_pipeline(set_desired("busy", DesiredStatus::Active))
                .await?;
        }
    }
}

/// Where the time goes, averaged over every pause: commit of the change (outbox row
/// written) → Kafka acknowledged the signal → worker persisted PAUSED.
async fn breakdown(d: &Deployment) -> Result<()> {
    let row: (f64, f64) = sqlx::query_as(
        "SELECT avg(extract(epoch FROM o.sent_at - o.created_at) * 1000)::FLOAT8,                 avg(extract(epoch FROM e.time - o.sent_at) * 1000)::FLOAT8          FROM signal_outbox o JOIN pipeline_events e            ON e.pipeline_id = o.pipeline_id AND e.generation = (convert_from(o.payload, 'UTF8')::jsonb->>'generation')::BIGINT          WHERE e.to_status = 'PAUSED'",
    )
    .fetch_one(&d.pool)
    .await?;
    println!(
        "mean outbox commit -> signal acknowledged by Kafka: {:.2}ms",
        row.0
    );
    println!(
        "mean signal acknowledged -> PAUSED persisted:       {:.2}ms",
        row.1
    );
    Ok(())
}

/// Microseconds since the Unix epoch, as Postgres reports them.
mod chrono_free {
    pub type Ts = i64;
    pub fn to_system_time(micros: Ts) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(micros.max(0) as u64)
    }
}

fn signed_ms(later: SystemTime, earlier: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

fn report(label: &str, samples: &mut [f64]) {
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{label}: n={} p50={:.2}ms p90={:.2}ms p99={:.2}ms max={:.2}ms",
        samples.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0)
    );
}
