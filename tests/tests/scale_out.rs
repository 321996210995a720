//! Scale out: two workers join one that owns every pipeline. Within 30 s the pipelines
//! are spread (no worker owns more than half), none leaves READY, and the ownership
//! history shows every handover ended on the old owner before it began on the new one.
//! `SLUICE_SCALE_OUT_PIPELINES` sets the fleet size (default 200).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use sluice_e2e::*;

const CONVERGE: Duration = Duration::from_secs(600);
const SPREAD_WITHIN: Duration = Duration::from_secs(30);

/// Pipelines per worker, and how many have no owner (between a release and a claim).
async fn owners(d: &Deployment) -> Result<(BTreeMap<String, i64>, i64)> {
    let rows: Vec<(Option<String>, i64)> =
        sqlx::query_as("SELECT owner, count(*) FROM pipelines GROUP BY owner")
            .fetch_all(&d.pool)
            .await?;
    let mut per_worker = BTreeMap::new();
    let mut unowned = 0;
    for (owner, n) in rows {
        match owner {
            Some(w) => {
                per_worker.insert(w, n);
            }
            None => unowned = n,
        }
    }
    Ok((per_worker, unowned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_join_and_take_their_share_with_no_double_ownership() -> Result<()> {
    let n: usize = std::env::var("SLUICE_SCALE_OUT_PIPELINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut d = Deployment::new().await?;
    // Twelve partitions split evenly over one, two or three workers.
    d.signal_partitions = 12;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    create_generator_fleet(&d, &mut client, "out", 0..n, 5).await?;
    wait_fleet_ready(&d.pool, n, CONVERGE).await?;
    let (before, _) = owners(&d).await?;
    ensure!(
        before.get("w1") == Some(&(n as i64)),
        "w1 owns all: {before:?}"
    );
    let since: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&d.pool)
        .await?;

    let joined = Instant::now();
    d.start_worker("w2").await?;
    d.start_worker("w3").await?;
    let half = n as i64 / 2;
    let mut spread_after = None;
    let mut last = (BTreeMap::new(), 0);
    while joined.elapsed() < SPREAD_WITHIN {
        // Status, not phase: a pipeline between owners shows UNASSIGNED for a moment,
        // but what it last reached (READY) must not change.
        let not_ready: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pipelines WHERE status IS DISTINCT FROM 'READY' \
             OR observed_generation < generation",
        )
        .fetch_one(&d.pool)
        .await?;
        ensure!(
            not_ready == 0,
            "{not_ready} pipelines left READY during scale-out"
        );
        last = owners(&d).await?;
        let (per_worker, unowned) = &last;
        let spread = *unowned == 0
            && per_worker.len() == 3
            && per_worker.values().all(|&owned| owned <= half);
        if spread && spread_after.is_none() {
            spread_after = Some(joined.elapsed());
        } else if !spread {
            spread_after = None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let spread_after = spread_after.ok_or_else(|| {
        anyhow::anyhow!(
            "not spread {SPREAD_WITHIN:?} after two workers joined (owners {:?}, {} unowned)",
            last.0,
            last.1
        )
    })?;
    eprintln!(
        "{n} pipelines spread over 3 workers {spread_after:?} after the joins: {:?}",
        last.0
    );

    // No status change was recorded during the scale-out.
    let changes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pipeline_events WHERE time > $1 AND to_status <> 'READY'",
    )
    .bind(since)
    .fetch_one(&d.pool)
    .await?;
    ensure!(changes == 0, "{changes} status changes during scale-out");

    // The history: every moved pipeline's old row ended (released) before its new row
    // began; no pair of claims of one pipeline overlaps.
    let overlaps: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT a.pipeline_id, a.worker, b.worker FROM pipeline_ownership a \
         JOIN pipeline_ownership b ON b.pipeline_id = a.pipeline_id AND b.epoch > a.epoch \
         WHERE a.ended_at IS NULL OR a.ended_at > b.claimed_at",
    )
    .fetch_all(&d.pool)
    .await?;
    ensure!(
        overlaps.is_empty(),
        "double ownership in the history: {overlaps:?}"
    );
    let (moved, reasons): (i64, Vec<String>) = {
        let moved: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT pipeline_id) FROM pipeline_ownership WHERE claimed_at > $1",
        )
        .bind(since)
        .fetch_one(&d.pool)
        .await?;
        let reasons: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT coalesce(end_reason, 'open') FROM pipeline_ownership \
             WHERE ended_at > $1",
        )
        .bind(since)
        .fetch_all(&d.pool)
        .await?;
        (moved, reasons)
    };
    let taken = n as i64 - last.0.get("w1").copied().unwrap_or(0);
    ensure!(
        moved >= taken,
        "the history shows {moved} pipelines claimed after the joins; {taken} moved"
    );
    ensure!(reasons == ["released"], "ended for: {reasons:?}");
    d.shutdown().await
}
