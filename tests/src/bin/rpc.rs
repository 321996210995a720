//! Benchmark: control-plane RPC throughput, measured with ghz
//! (`go install github.com/bojand/ghz/cmd/ghz@v0.93.0`) on the same machine. Two control
//! planes of one deployment (no worker): one with the token cache (the default, 2 s)
//! and one with it off (`--token-cache-ms 0`, every call looks its token up), each
//! driven in turn with authenticated GetPipeline and UpdatePipeline calls (each update
//! pauses or resumes a pipeline, round-robin over `--pipelines` pipelines, so every one
//! is a change: a new generation and a signal in the outbox); the gRPC health check of
//! the same server, which touches neither the token nor the database, is the ceiling
//! of the stack on this machine, measured in the same run.
//!
//! Run (release build): `cargo build --release --bins && cargo run --release -p
//! sluice-e2e --bin rpc -- --seconds 20`

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use sluice_e2e::*;
use sluice_protocol::pb::DesiredStatus;

#[derive(Debug, Parser)]
#[command(about = "Measure control-plane RPC throughput and latency with ghz")]
struct Args {
    /// Seconds each ghz run lasts.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Concurrent GetPipeline calls.
    #[arg(long, default_value_t = 50)]
    get_concurrency: u32,
    /// Concurrent UpdatePipeline calls.
    #[arg(long, default_value_t = 20)]
    update_concurrency: u32,
    /// Pipelines the calls go round over.
    #[arg(long, default_value_t = 20)]
    pipelines: usize,
    /// The ghz binary (default: ghz on PATH, else ~/go/bin/ghz).
    #[arg(long)]
    ghz: Option<PathBuf>,
}

struct Outcome {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    ok: u64,
    errors: u64,
}

fn ghz_path(args: &Args) -> Result<PathBuf> {
    if let Some(p) = &args.ghz {
        return Ok(p.clone());
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("ghz").is_file() {
                return Ok(dir.join("ghz"));
            }
        }
    }
    let home = std::env::var_os("HOME").context("HOME")?;
    let go_bin = PathBuf::from(home).join("go/bin/ghz");
    if go_bin.is_file() {
        return Ok(go_bin);
    }
    bail!("ghz not found: go install github.com/bojand/ghz/cmd/ghz@v0.93.0")
}

async fn ghz(
    bin: &PathBuf,
    addr: &str,
    call: &str,
    data: &str,
    token: Option<&str>,
    concurrency: u32,
    seconds: u64,
) -> Result<Outcome> {
    let mut command = tokio::process::Command::new(bin);
    command
        .args(["--insecure", "--format", "json", "--call", call])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--duration", &format!("{seconds}s")])
        .args(["--data", data]);
    if let Some(token) = token {
        command.args([
            "--metadata",
            &json!({ "authorization": format!("Bearer {token}") }).to_string(),
        ]);
    }
    let out = command.arg(addr).stderr(Stdio::piped()).output().await?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "ghz {call} ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let latency = |pct: u64| -> f64 {
        report["latencyDistribution"]
            .as_array()
            .and_then(|d| d.iter().find(|l| l["percentage"].as_u64() == Some(pct)))
            .and_then(|l| l["latency"].as_f64())
            .unwrap_or(f64::NAN)
            / 1e6
    };
    let codes = report["statusCodeDistribution"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let ok = codes.get("OK").and_then(Value::as_u64).unwrap_or(0);
    let errors = codes
        .iter()
        .filter(|(code, _)| *code != "OK")
        .filter_map(|(_, n)| n.as_u64())
        .sum();
    if errors > 0 {
        eprintln!("{call}: errors {:?}", report["errorDistribution"]);
    }
    Ok(Outcome {
        rps: report["rps"].as_f64().unwrap_or(0.0),
        p50_ms: latency(50),
        p99_ms: latency(99),
        ok,
        errors,
    })
}

fn print(label: &str, o: &Outcome, ceiling: f64) {
    println!(
        "{label:<44} {:>8.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  {:>5.1} % of ceiling  ({} ok, {} errors)",
        o.rps,
        o.p50_ms,
        o.p99_ms,
        100.0 * o.rps / ceiling,
        o.ok,
        o.errors
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin = ghz_path(&args)?;
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    let cached = d.control_plane_addr.clone().context("address")?;
    d.control_plane_args = vec!["--token-cache-ms".into(), "0".into()];
    let (uncached, _uncached_process) = d.start_control_plane_replica("uncached").await?;
    let token = d.token.clone().context("token")?;
    for i in 0..args.pipelines {
        client
            .create_pipeline(generator_pipeline(
                &format!("bench-{i}"),
                10,
                1,
                d.destination(&unique(&format!("bench_{i}")), true),
                DesiredStatus::Paused,
            ))
            .await?;
    }
    let gets: Value = (0..args.pipelines)
        .map(|i| json!({ "id": format!("bench-{i}") }))
        .collect();
    // Each update changes its pipeline: ghz goes round the array, pausing every
    // pipeline, then resuming every one, and so on.
    let updates: Value = ["DESIRED_STATUS_ACTIVE", "DESIRED_STATUS_PAUSED"]
        .iter()
        .flat_map(|desired| {
            (0..args.pipelines).map(move |i| {
                json!({
                    "pipeline": {"id": format!("bench-{i}"), "desired_status": desired},
                    "update_mask": {"paths": ["desired_status"]}
                })
            })
        })
        .collect();
    let gets = gets.to_string();
    let updates = updates.to_string();
    let s = args.seconds;
    let ceiling = ghz(
        &bin,
        &cached,
        "grpc.health.v1.Health.Check",
        "{}",
        None,
        args.get_concurrency,
        s,
    )
    .await?;
    println!(
        "ghz on the same 2 cores, {s} s a run; pipelines: {}",
        args.pipelines
    );
    print(
        "health check (ceiling: no token, no database)",
        &ceiling,
        ceiling.rps,
    );
    for (label, addr) in [("token cache 2 s", &cached), ("token cache off", &uncached)] {
        let get = ghz(
            &bin,
            addr,
            "sluice.v1.PipelineService.GetPipeline",
            &gets,
            Some(&token),
            args.get_concurrency,
            s,
        )
        .await?;
        print(
            &format!("GetPipeline, {} concurrent, {label}", args.get_concurrency),
            &get,
            ceiling.rps,
        );
        let update = ghz(
            &bin,
            addr,
            "sluice.v1.PipelineService.UpdatePipeline",
            &updates,
            Some(&token),
            args.update_concurrency,
            s,
        )
        .await?;
        print(
            &format!(
                "UpdatePipeline, {} concurrent, {label}",
                args.update_concurrency
            ),
            &update,
            ceiling.rps,
        );
    }
    let (changes, pipelines): (i64, i64) =
        sqlx::query_as("SELECT coalesce(sum(generation - 1), 0)::BIGINT, count(*) FROM pipelines")
            .fetch_one(&d.pool)
            .await?;
    println!("changes stored: {changes} over {pipelines} pipelines");
    d.shutdown().await
}
