//! Benchmark: end-to-end rows/s of one postgres → postgres pipeline on one worker,
//! beside two ceilings measured in the same run on the same database:
//!
//! - server side: one `INSERT … SELECT … ON CONFLICT DO UPDATE` of the same rows;
//! - client side: the rows read by key in pages and upserted in multi-row batches
//!   (UNNEST of one array per column) by one client, one statement at a time.
//!
//! The pipeline's time runs from CreatePipeline until it is READY (every row committed
//! at the destination); the worker's log gives where the time went, per stage.
//!
//! Run (release build, the local stack up):
//! `cargo build --release --bins && cargo run --release -p sluice-e2e --bin throughput -- --rows 1000000`

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use serde_json::json;
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus, PipelineStatus};
use sqlx::Row;

#[derive(Debug, Parser)]
#[command(
    about = "Measure postgres → postgres rows/s against a server-side and a client-side ceiling"
)]
struct Args {
    /// Rows of five columns to copy.
    #[arg(long, default_value_t = 1_000_000)]
    rows: i64,
    /// The destination's batch_size (rows per write transaction).
    #[arg(long, default_value_t = 5000)]
    batch_size: u64,
    /// The source's slice_size (rows per read and per Kafka transaction).
    #[arg(long, default_value_t = 10_000)]
    slice_size: u64,
    /// Rows per page and per upsert of the client-side ceiling.
    #[arg(long, default_value_t = 5000)]
    client_batch: i64,
}

const COLUMNS: &str = "id, name, amount, score, created_at";

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    for s in [
        "CREATE SCHEMA bench_src".to_owned(),
        "CREATE TABLE bench_src.rows (id bigint PRIMARY KEY, name text NOT NULL, \
         amount numeric(12,2) NOT NULL, score double precision, created_at timestamptz NOT NULL)"
            .to_owned(),
        format!(
            "INSERT INTO bench_src.rows SELECT g, 'name-' || g, (g % 100000) / 100.0, g * 0.5, \
             timestamptz '2024-01-01' + g * interval '1 second' FROM generate_series(1, {}) g",
            args.rows
        ),
        "ANALYZE bench_src.rows".to_owned(),
    ] {
        sqlx::query(&s).execute(&d.pool).await?;
    }
    let target = |name: &str| {
        format!(
            "CREATE TABLE public.{name} (id bigint PRIMARY KEY, name text, amount numeric, \
             score double precision, created_at timestamptz)"
        )
    };
    println!(
        "{} rows of five columns (bigint key, text, numeric, double, timestamptz); \
         batch_size {}, slice_size {}",
        args.rows, args.batch_size, args.slice_size
    );

    // Server-side ceiling.
    sqlx::query(&target("ceiling_server"))
        .execute(&d.pool)
        .await?;
    let started = Instant::now();
    sqlx::query(&format!(
        "INSERT INTO public.ceiling_server ({COLUMNS}) SELECT {COLUMNS} FROM bench_src.rows \
         ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, amount = EXCLUDED.amount, \
         score = EXCLUDED.score, created_at = EXCLUDED.created_at"
    ))
    .execute(&d.pool)
    .await?;
    let server = rate(args.rows, started.elapsed());
    println!("server-side INSERT … SELECT … ON CONFLICT: {server:>9.0} rows/s");

    // Client-side ceiling.
    sqlx::query(&target("ceiling_client"))
        .execute(&d.pool)
        .await?;
    let started = Instant::now();
    let mut after = 0i64;
    loop {
        let rows = sqlx::query(
            "SELECT id, name, amount::text, score, created_at FROM bench_src.rows \
             WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(args.client_batch)
        .fetch_all(&d.pool)
        .await?;
        if rows.is_empty() {
            break;
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut names = Vec::with_capacity(rows.len());
        let mut amounts = Vec::with_capacity(rows.len());
        let mut scores = Vec::with_capacity(rows.len());
        let mut created = Vec::with_capacity(rows.len());
        for r in &rows {
            ids.push(r.try_get::<i64, _>(0)?);
            names.push(r.try_get::<String, _>(1)?);
            amounts.push(r.try_get::<String, _>(2)?);
            scores.push(r.try_get::<Option<f64>, _>(3)?);
            created.push(r.try_get::<chrono::DateTime<chrono::Utc>, _>(4)?);
        }
        after = *ids.last().context("a row")?;
        sqlx::query(&format!(
            "INSERT INTO public.ceiling_client ({COLUMNS}) \
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[]::numeric[], $4::float8[], $5::timestamptz[]) \
             ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, amount = EXCLUDED.amount, \
             score = EXCLUDED.score, created_at = EXCLUDED.created_at"
        ))
        .bind(&ids)
        .bind(&names)
        .bind(&amounts)
        .bind(&scores)
        .bind(&created)
        .execute(&d.pool)
        .await?;
    }
    let client_side = rate(args.rows, started.elapsed());
    println!(
        "client-side upsert in batches of {}: {client_side:>9.0} rows/s",
        args.client_batch
    );

    // Sluice.
    let worker_pid = d.worker("w1")?.pid().context("the worker runs")?;
    let (worker_cpu0, busy0) = (process_cpu(worker_pid)?, machine_busy()?);
    let started = Instant::now();
    client
        .create_pipeline(pb::CreatePipelineRequest {
            pipeline_id: "bench".into(),
            pipeline: Some(pb::Pipeline {
                spec: Some(pb::PipelineSpec {
                    source: Some(connector(
                        "postgres",
                        json!({"url": d.database_url, "schema": "bench_src", "tables": ["rows"],
                               "slice_size": args.slice_size}),
                    )),
                    destination: Some(connector(
                        "postgres",
                        json!({"url": d.database_url, "table": "sluice_rows",
                               "batch_size": args.batch_size}),
                    )),
                    ..Default::default()
                }),
                desired_status: DesiredStatus::Active as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    wait_converged(
        &mut client,
        "bench",
        PipelineStatus::Ready,
        Duration::from_secs(3600),
    )
    .await?;
    let took = started.elapsed();
    let (worker_cpu, busy) = (
        process_cpu(worker_pid)? - worker_cpu0,
        machine_busy()? - busy0,
    );
    let copied = d.row_count("sluice_rows").await?;
    ensure!(
        copied == args.rows,
        "{copied} of {} rows arrived",
        args.rows
    );
    let sluice = rate(args.rows, took);
    println!(
        "sluice postgres → postgres, create to READY: {sluice:>9.0} rows/s ({:.1} s)",
        took.as_secs_f64()
    );
    println!(
        "ratios: {:.0} % of the server-side ceiling, {:.0} % of the client-side ceiling",
        100.0 * sluice / server,
        100.0 * sluice / client_side
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "cpu during the pipeline's run: worker {worker_cpu:.1} s, whole machine {busy:.1} s \
         of {:.1} s ({cores} cores × {:.1} s)",
        cores as f64 * took.as_secs_f64(),
        took.as_secs_f64()
    );
    let log = d.logs()?;
    if let Some(line) = log
        .lines()
        .find(|l| l.contains("run succeeded") && l.contains("read_s"))
    {
        println!("where the time went (worker log): {line}");
    }
    d.shutdown().await
}

/// CPU seconds (user + system) process `pid` has used.
fn process_cpu(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("a stat line")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// CPU seconds the whole machine has been busy (all cores, not idle or iowait).
fn machine_busy() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("/proc/stat")?;
    let v: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let total: f64 = v.iter().take(8).sum();
    Ok((total - v[3] - v[4]) / 100.0)
}

fn rate(rows: i64, took: Duration) -> f64 {
    rows as f64 / took.as_secs_f64()
}
