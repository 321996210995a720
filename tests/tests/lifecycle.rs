//! End-to-end lifecycle tests: real control plane and worker binaries against the real
//! PostgreSQL and Kafka started by `deploy/local/up.sh`.

use std::time::Duration;

use anyhow::Result;
use sluice_e2e::audit::check_rows;
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus, PipelineStatus};

const CONVERGE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_lands_every_record_then_pause_and_resume_lose_nothing() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;

    let table = unique("orders");
    let created = client
        .create_pipeline(generator_pipeline(
            "orders",
            10_000,
            42,
            d.destination(&table, false),
            DesiredStatus::Active,
        ))
        .await?
        .into_inner();
    assert_eq!(created.desired_status, DesiredStatus::Active as i32);
    assert_eq!(created.generation, 1);

    let ready = wait_converged(&mut client, "orders", PipelineStatus::Ready, CONVERGE).await?;
    assert_eq!(ready.phase, "READY");
    assert_eq!(ready.owner, "w1");
    check_rows(&d.pool, &table, 42, 10_000).await?;

    // Kafka keeps only what the destination has not committed: the records topic's
    // log start moves up to the committed offset (only the last commit marker stays).
    let incarnation: i64 = sqlx::query_scalar("SELECT incarnation FROM pipelines WHERE id = $1")
        .bind(key("orders"))
        .fetch_one(&d.pool)
        .await?;
    let topic =
        sluice_protocol::topics::records_topic(&d.topic_namespace, &key("orders"), incarnation);
    let admin =
        sluice_infra::kafka::KafkaSettings::new(d.infra.kafka_bootstrap_servers.clone()).admin()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (low, high) = admin.watermarks(&topic, 0).await?;
        if low >= 10_000 && high - low <= 1 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{topic} still keeps committed records: log start {low}, end {high}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Pause: the worker persists PAUSED for the new generation.
    let paused = client
        .update_pipeline(set_desired("orders", DesiredStatus::Paused))
        .await?
        .into_inner();
    assert_eq!(paused.generation, 2);
    assert_eq!(paused.phase, "PAUSING");
    let p = wait_converged(&mut client, "orders", PipelineStatus::Paused, CONVERGE).await?;
    assert_eq!(p.observed_generation, p.generation);

    // Pausing again is a no-op that bumps nothing.
    let again = client
        .update_pipeline(set_desired("orders", DesiredStatus::Paused))
        .await?
        .into_inner();
    assert_eq!(again.generation, 2);

    client
        .update_pipeline(set_desired("orders", DesiredStatus::Active))
        .await?;
    let r = wait_converged(&mut client, "orders", PipelineStatus::Ready, CONVERGE).await?;
    assert_eq!(r.generation, 3);
    check_rows(&d.pool, &table, 42, 10_000).await?;

    // READY → PAUSED → READY, each exactly once, and no READY → BACKFILL flap.
    let history = client
        .list_pipeline_events(pb::ListPipelineEventsRequest {
            pipeline_id: "orders".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    let moves: Vec<String> = history
        .iter()
        .map(|e| format!("{}>{}", e.from_status, e.to_status))
        .collect();
    assert_eq!(
        moves,
        [
            ">SETUP",
            "SETUP>BACKFILL",
            "BACKFILL>READY",
            "READY>PAUSED",
            "PAUSED>READY"
        ]
    );

    // The same history two events a page; a token is good only for its pipeline.
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_pipeline_events(pb::ListPipelineEventsRequest {
                pipeline_id: "orders".into(),
                page_size: 2,
                page_token: token.clone(),
            })
            .await?
            .into_inner();
        assert!(page.events.len() <= 2);
        paged.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(paged, history);
    let first = client
        .list_pipeline_events(pb::ListPipelineEventsRequest {
            pipeline_id: "orders".into(),
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    let elsewhere = client
        .list_pipeline_events(pb::ListPipelineEventsRequest {
            pipeline_id: "other".into(),
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .expect_err("another pipeline's token");
    assert_eq!(elsewhere.code(), tonic::Code::InvalidArgument);
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_paused_never_starts_lanes_until_resumed() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;

    let table = unique("paused");
    let created = client
        .create_pipeline(generator_pipeline(
            "held",
            2_000,
            9,
            d.destination(&table, false),
            DesiredStatus::Paused,
        ))
        .await?
        .into_inner();
    assert_eq!(created.desired_status, DesiredStatus::Paused as i32);

    let p = wait_converged(&mut client, "held", PipelineStatus::Paused, CONVERGE).await?;
    assert_eq!(p.observed_generation, 1);
    // Setup ran (the table exists) but no lane did: no row, no source progress.
    assert!(d.table_exists(&table).await?);
    assert_eq!(d.row_count(&table).await?, 0);
    let checkpoint: serde_json::Value =
        sqlx::query_scalar("SELECT checkpoint FROM pipelines WHERE id = 't1.held'")
            .fetch_one(&d.pool)
            .await?;
    assert_eq!(
        checkpoint["streams"],
        serde_json::json!({}),
        "the source must not have been read: {checkpoint}"
    );

    // A resync later it is still untouched.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(d.row_count(&table).await?, 0);

    client
        .update_pipeline(set_desired("held", DesiredStatus::Active))
        .await?;
    wait_converged(&mut client, "held", PipelineStatus::Ready, CONVERGE).await?;
    check_rows(&d.pool, &table, 9, 2_000).await?;
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_during_backfill_stops_writes_and_resume_finishes_exactly() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;

    let table = unique("big");
    let count = 60_000;
    client
        .create_pipeline(generator_pipeline(
            "big",
            count,
            5,
            d.destination(&table, false),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "big", PipelineStatus::Backfill, CONVERGE).await?;
    client
        .update_pipeline(set_desired("big", DesiredStatus::Paused))
        .await?;
    wait_converged(&mut client, "big", PipelineStatus::Paused, CONVERGE).await?;

    // Lanes stopped at a safe point: nothing is written while paused.
    let at_pause = d.row_count(&table).await?;
    assert!(
        at_pause < count as i64,
        "the pause must land mid-backfill, saw {at_pause} rows"
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        d.row_count(&table).await?,
        at_pause,
        "rows written while PAUSED"
    );

    client
        .update_pipeline(set_desired("big", DesiredStatus::Active))
        .await?;
    wait_converged(&mut client, "big", PipelineStatus::Ready, CONVERGE).await?;
    check_rows(&d.pool, &table, 5, count).await?;
    let moves = history(&mut client, "big").await?;
    // Paused while backfilling: resume returns to BACKFILL, whichever it left.
    assert_eq!(moves, ["SETUP", "BACKFILL", "PAUSED", "BACKFILL", "READY"]);
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_tears_down_before_the_row_disappears() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let admin =
        sluice_infra::kafka::KafkaSettings::new(&d.infra.kafka_bootstrap_servers).admin()?;

    let kept = unique("kept");
    let dropped = unique("dropped");
    client
        .create_pipeline(generator_pipeline(
            "keep-table",
            300,
            1,
            d.destination(&kept, false),
            DesiredStatus::Active,
        ))
        .await?;
    client
        .create_pipeline(generator_pipeline(
            "drop-table",
            300,
            1,
            d.destination(&dropped, true),
            DesiredStatus::Active,
        ))
        .await?;
    let mut topics = Vec::new();
    for id in ["keep-table", "drop-table"] {
        wait_converged(&mut client, id, PipelineStatus::Ready, CONVERGE).await?;
        let topic = d.records_topic(id).await?;
        assert!(
            admin.partition_count(&topic).await?.is_some(),
            "{topic} exists while READY"
        );
        topics.push(topic);
    }

    for id in ["keep-table", "drop-table"] {
        let deleting = client
            .delete_pipeline(pb::DeletePipelineRequest {
                id: id.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        assert_eq!(deleting.phase, "DELETING");
        assert_eq!(deleting.desired_status, DesiredStatus::Deleted as i32);
    }
    for (id, topic) in ["keep-table", "drop-table"].into_iter().zip(topics) {
        wait_removed(&client, id, CONVERGE).await?;
        assert_eq!(
            admin.partition_count(&topic).await?,
            None,
            "{topic} must be deleted by teardown"
        );
        let moves: Vec<String> = client
            .list_pipeline_events(pb::ListPipelineEventsRequest {
                pipeline_id: id.into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .events
            .iter()
            .map(|e| format!("{}>{}", e.from_status, e.to_status))
            .collect();
        assert_eq!(
            moves,
            [
                ">SETUP",
                "SETUP>BACKFILL",
                "BACKFILL>READY",
                "READY>TEARDOWN",
                "TEARDOWN>REMOVED"
            ],
            "history of {id}"
        );
    }
    assert!(
        d.table_exists(&kept).await?,
        "the table is kept unless the spec asks to drop it"
    );
    assert_eq!(d.row_count(&kept).await?, 300);
    assert!(
        !d.table_exists(&dropped).await?,
        "drop_table_on_delete drops the table"
    );
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unassigned_until_a_worker_starts_then_converges() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    let table = unique("late");
    let created = client
        .create_pipeline(generator_pipeline(
            "late",
            500,
            3,
            d.destination(&table, false),
            DesiredStatus::Active,
        ))
        .await?
        .into_inner();
    assert_eq!(created.phase, "UNASSIGNED");
    assert_eq!(get(&mut client, "late").await?.phase, "UNASSIGNED");

    d.start_worker("w-late").await?;
    let ready = wait_converged(&mut client, "late", PipelineStatus::Ready, CONVERGE).await?;
    assert_eq!(ready.owner, "w-late");
    assert_eq!(d.row_count(&table).await?, 500);

    // A graceful stop releases ownership: the pipeline shows UNASSIGNED again.
    let worker = d.take_worker(0);
    assert!(worker.stop().await?.success());
    assert_eq!(get(&mut client, "late").await?.phase, "UNASSIGNED");
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_created_again_over_its_kept_table_replaces_the_rows() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let table = unique("again");
    for seed in [1, 2] {
        client
            .create_pipeline(generator_pipeline(
                "again",
                400,
                seed,
                d.destination(&table, false),
                DesiredStatus::Active,
            ))
            .await?;
        wait_converged(&mut client, "again", PipelineStatus::Ready, CONVERGE).await?;
        // The table holds seed's records, every row of them.
        check_rows(&d.pool, &table, seed, 400).await?;
        client
            .delete_pipeline(pb::DeletePipelineRequest {
                id: "again".into(),
                ..Default::default()
            })
            .await?;
        wait_removed(&client, "again", CONVERGE).await?;
    }
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_existed_before_the_pipeline_is_never_dropped() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    sqlx::query("CREATE TABLE public.precious (id BIGINT PRIMARY KEY, note TEXT)")
        .execute(&d.pool)
        .await?;
    sqlx::query("INSERT INTO public.precious VALUES (1, 'keep me')")
        .execute(&d.pool)
        .await?;
    // Aimed at someone else's table and asked to drop it on delete.
    client
        .create_pipeline(generator_pipeline(
            "intruder",
            10,
            1,
            d.destination("precious", true),
            DesiredStatus::Active,
        ))
        .await?;
    // Whatever becomes of it (the table lacks Sluice's columns), deleting it must
    // leave the table and its row alone.
    wait_for("intruder acted on", CONVERGE, || {
        let mut client = client.clone();
        async move {
            let p = get(&mut client, "intruder").await?;
            let settled = [PipelineStatus::Error as i32, PipelineStatus::Ready as i32];
            Ok(settled.contains(&p.status).then_some(()))
        }
    })
    .await?;
    client
        .delete_pipeline(pb::DeletePipelineRequest {
            id: "intruder".into(),
            ..Default::default()
        })
        .await?;
    wait_removed(&client, "intruder", CONVERGE).await?;
    assert!(
        d.table_exists("precious").await?,
        "a pre-existing table was dropped"
    );
    let note: String = sqlx::query_scalar("SELECT note FROM public.precious WHERE id = 1")
        .fetch_one(&d.pool)
        .await?;
    assert_eq!(note, "keep me");
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_naming_the_pipeline() -> Result<()> {
    // A format it does not know is a usage error that names the flag.
    let bad = tokio::process::Command::new(bin_path("sluice-worker")?)
        .env("SLUICE_LOG_FORMAT", "xml")
        .output()
        .await?;
    assert_eq!(bad.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("--log-format"), "{stderr}");

    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker_with("w1", &[("SLUICE_LOG_FORMAT", "json")])
        .await?;
    let table = unique("logged");
    client
        .create_pipeline(generator_pipeline(
            "logged",
            100,
            1,
            d.destination(&table, false),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "logged", PipelineStatus::Ready, CONVERGE).await?;

    let log = std::fs::read_to_string(d.log_dir.join("w1.log"))?;
    let mut naming = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let event: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("not one JSON object: {e}: {line}"))?;
        anyhow::ensure!(
            event["timestamp"].is_string()
                && event["level"].is_string()
                && event["fields"]["message"].is_string(),
            "{line}"
        );
        if event["fields"]["pipeline_id"]
            .as_str()
            .is_some_and(|p| p.ends_with("logged"))
        {
            naming += 1;
        }
    }
    anyhow::ensure!(naming > 0, "no line names the pipeline:\n{log}");
    d.shutdown().await
}
