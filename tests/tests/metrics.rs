//! Prometheus metrics of the real binaries: scraped over HTTP while a pipeline runs,
//! the values move with what happened (calls by code, records, lag, runs, ownership).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus, PipelineStatus};

const CONVERGE: Duration = Duration::from_secs(90);

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// GET /metrics: the body, after checking the answer is OpenMetrics text.
async fn scrape(port: u16) -> Result<String> {
    let (head, body) = http_get(port, "/metrics").await?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    anyhow::ensure!(head.contains("openmetrics-text"), "{head}");
    Ok(body)
}

/// The value of the series `name{labels}` (labels as rendered, in order), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_calls_records_runs_and_ownership() -> Result<()> {
    let mut d = Deployment::new().await?;
    let cp_port = free_port()?;
    d.control_plane_args = vec!["--metrics-listen".into(), format!("127.0.0.1:{cp_port}")];
    let mut client = d.start_control_plane().await?;
    let w_port = free_port()?;
    let w_addr = format!("127.0.0.1:{w_port}");
    d.start_worker_with("w1", &[("SLUICE_METRICS_LISTEN", &w_addr)])
        .await?;

    let before = scrape(w_port).await?;
    assert_eq!(
        value(&before, "sluice_worker_pipelines_owned"),
        Some(0.0),
        "{before}"
    );

    let table = unique("metered");
    client
        .create_pipeline(generator_pipeline(
            "metered",
            3000,
            7,
            d.destination(&table, false),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "metered", PipelineStatus::Ready, CONVERGE).await?;
    let missing = get(&mut client, "no-such").await.expect_err("not found");
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // The worker: what it owns, read, wrote, how far behind it is, its runs. The run
    // ends once the read lane sees the destination has it all, right after READY.
    let pipeline = format!("{{pipeline=\"{}\"}}", key("metered"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let w = loop {
        let w = scrape(w_port).await?;
        let ended = value(
            &w,
            "sluice_runs_total{trigger=\"initial\",outcome=\"succeeded\"}",
        );
        if ended.is_some() || tokio::time::Instant::now() > deadline {
            break w;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(value(&w, "sluice_worker_pipelines_owned"), Some(1.0), "{w}");
    assert_eq!(
        value(&w, &format!("sluice_pipeline_records_read_total{pipeline}")),
        Some(3000.0),
        "{w}"
    );
    assert_eq!(
        value(
            &w,
            &format!("sluice_pipeline_records_written_total{pipeline}")
        ),
        Some(3000.0),
        "{w}"
    );
    assert_eq!(
        value(&w, &format!("sluice_pipeline_lag_records{pipeline}")),
        Some(0.0),
        "{w}"
    );
    let committed = value(&w, &format!("sluice_pipeline_committed_offset{pipeline}"))
        .context("committed offset")?;
    assert!(committed >= 3000.0, "{w}");
    assert_eq!(
        value(
            &w,
            &format!(
                "sluice_pipeline_status{{pipeline=\"{}\",status=\"READY\"}}",
                key("metered")
            )
        ),
        Some(1.0),
        "{w}"
    );
    assert_eq!(
        value(
            &w,
            "sluice_runs_total{trigger=\"initial\",outcome=\"succeeded\"}"
        ),
        Some(1.0),
        "{w}"
    );
    assert!(
        value(
            &w,
            "sluice_activity_attempts_total{activity=\"write-batch\",outcome=\"ok\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{w}"
    );
    assert!(
        value(&w, "sluice_worker_rebalances_total{event=\"assigned\"}").is_some_and(|n| n >= 1.0),
        "{w}"
    );

    // The control plane: calls by method and code, signals relayed.
    let cp = scrape(cp_port).await?;
    assert_eq!(
        value(
            &cp,
            "sluice_grpc_requests_total{method=\"PipelineService/CreatePipeline\",code=\"Ok\"}"
        ),
        Some(1.0),
        "{cp}"
    );
    assert_eq!(
        value(
            &cp,
            "sluice_grpc_requests_total{method=\"PipelineService/GetPipeline\",code=\"NotFound\"}"
        ),
        Some(1.0),
        "{cp}"
    );
    assert!(
        value(&cp, "sluice_signals_sent_total").is_some_and(|n| n >= 1.0),
        "{cp}"
    );
    assert!(
        value(&cp, "sluice_signal_relay_seconds_count").is_some_and(|n| n >= 1.0),
        "{cp}"
    );

    // A pause: the time from the change's commit to PAUSED persisted is measured once.
    client
        .update_pipeline(set_desired("metered", DesiredStatus::Paused))
        .await?;
    wait_converged(&mut client, "metered", PipelineStatus::Paused, CONVERGE).await?;
    let w = scrape(w_port).await?;
    assert_eq!(
        value(&w, "sluice_change_applied_seconds_count{status=\"PAUSED\"}"),
        Some(1.0),
        "{w}"
    );
    let took = value(&w, "sluice_change_applied_seconds_sum{status=\"PAUSED\"}")
        .context("pause latency")?;
    assert!(took > 0.0 && took < CONVERGE.as_secs_f64(), "{took}");

    // Deleted: the worker owns nothing and has forgotten the pipeline's series.
    client
        .delete_pipeline(pb::DeletePipelineRequest {
            id: "metered".into(),
            ..Default::default()
        })
        .await?;
    wait_removed(&client, "metered", CONVERGE).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let w = scrape(w_port).await?;
        if value(&w, "sluice_worker_pipelines_owned") == Some(0.0) && !w.contains(&key("metered")) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the deleted pipeline is still in the worker's metrics:\n{w}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    d.shutdown().await
}
