//! Optimistic concurrency (AIP-154 etags) and idempotent retries (AIP-155 request ids)
//! against the real control plane and PostgreSQL.

use anyhow::Result;
use serde_json::json;
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus};
use tonic::Code;
use tonic_types::StatusExt;

fn set_count(id: &str, count: u64, etag: &str) -> pb::UpdatePipelineRequest {
    pb::UpdatePipelineRequest {
        pipeline: Some(pb::Pipeline {
            id: id.into(),
            etag: etag.into(),
            spec: Some(pb::PipelineSpec {
                source: Some(connector("generator", json!({"count": count}))),
                destination: None,
                ..Default::default()
            }),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["spec.source".into()],
        }),
        ..Default::default()
    }
}

async fn signals(d: &Deployment, id: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM signal_outbox WHERE pipeline_id = $1")
            .bind(key(id))
            .fetch_one(&d.pool)
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_conditional_updates_have_exactly_one_winner_per_version() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    let dest = d.destination("etag_t", false);
    client
        .create_pipeline(generator_pipeline(
            "race",
            1,
            0,
            dest,
            DesiredStatus::Paused,
        ))
        .await?;

    for round in 0..2u64 {
        let before = get(&mut client, "race").await?;
        let mut tasks = Vec::new();
        for i in 0..50u64 {
            let mut client = client.clone();
            let etag = before.etag.clone();
            let count = 1000 * (round + 1) + i;
            tasks.push(tokio::spawn(async move {
                (
                    count,
                    client
                        .update_pipeline(set_count("race", count, &etag))
                        .await,
                )
            }));
        }
        let mut winners = Vec::new();
        for task in tasks {
            match task.await? {
                (count, Ok(_)) => winners.push(count),
                (_, Err(e)) => {
                    assert_eq!(e.code(), Code::Aborted, "{e:?}");
                    let reason = e.get_details_error_info().map(|i| i.reason);
                    assert_eq!(reason.as_deref(), Some("ETAG_MISMATCH"));
                }
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let after = get(&mut client, "race").await?;
        assert_eq!(
            after.generation,
            before.generation + 1,
            "no lost or extra update"
        );
        let stored = after
            .spec
            .and_then(|s| s.source)
            .and_then(|s| s.config)
            .map(|c| sluice_protocol::conversions::struct_to_json(&c));
        assert_eq!(stored.map(|c| c["count"].clone()), Some(json!(winners[0])));
        assert_ne!(after.etag, before.etag);
    }

    // Without an etag the write is unconditional: 50 at once all land, one generation
    // and one signal each (an update that lost a race with another is read again and
    // applied on top, never dropped nor signalled twice).
    let before = get(&mut client, "race").await?;
    let signalled_before = signals(&d, "race").await?;
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .update_pipeline(set_count("race", 5000 + i, ""))
                .await
        }));
    }
    let mut generations = Vec::new();
    for task in tasks {
        generations.push(task.await??.into_inner().generation);
    }
    generations.sort_unstable();
    let expected: Vec<i64> = (before.generation + 1..=before.generation + 50).collect();
    assert_eq!(generations, expected, "each update its own generation");
    assert_eq!(
        get(&mut client, "race").await?.generation,
        before.generation + 50
    );
    let payloads: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT payload FROM signal_outbox WHERE pipeline_id = $1 ORDER BY id")
            .bind(key("race"))
            .fetch_all(&d.pool)
            .await?;
    let mut signalled: Vec<i64> = payloads
        .iter()
        .map(|p| sluice_protocol::signal::Signal::from_bytes(p).map(|s| s.generation))
        .collect::<Result<_, _>>()?;
    signalled.sort_unstable();
    signalled.retain(|g| *g > before.generation);
    assert_eq!(signalled, expected, "one signal per generation");
    assert_eq!(signals(&d, "race").await?, signalled_before + 50);
    client.update_pipeline(set_count("race", 7, "")).await?;
    // A stale etag on delete is refused and deletes nothing.
    let err = client
        .delete_pipeline(pb::DeletePipelineRequest {
            id: "race".into(),
            etag: "\"g1\"".into(),
            ..Default::default()
        })
        .await
        .expect_err("stale etag");
    assert_eq!(err.code(), Code::Aborted);
    assert_eq!(
        get(&mut client, "race").await?.desired_status,
        DesiredStatus::Paused as i32
    );
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_requests_with_a_request_id_do_nothing_twice() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    let dest = d.destination("idem_t", false);

    let rid = uuid::Uuid::new_v4().to_string();
    let mut req = generator_pipeline("", 1, 0, dest.clone(), DesiredStatus::Paused);
    req.request_id = rid.clone();
    let first = client.create_pipeline(req.clone()).await?.into_inner();
    let retry = client.create_pipeline(req.clone()).await?.into_inner();
    assert_eq!(first, retry, "a retry returns the first result");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM pipelines")
        .fetch_one(&d.pool)
        .await?;
    assert_eq!(rows, 1, "the generated-id pipeline is created once");
    assert_eq!(signals(&d, &first.id).await?, 1);

    // Concurrent duplicates: still one pipeline.
    let rid2 = uuid::Uuid::new_v4().to_string();
    let mut req2 = generator_pipeline("twin", 1, 0, dest.clone(), DesiredStatus::Paused);
    req2.request_id = rid2.clone();
    let (mut c1, mut c2) = (client.clone(), client.clone());
    let (a, b) = tokio::join!(
        c1.create_pipeline(req2.clone()),
        c2.create_pipeline(req2.clone())
    );
    assert_eq!(a?.into_inner(), b?.into_inner());
    assert_eq!(signals(&d, "twin").await?, 1);

    // The same key for a different request is refused.
    let mut other = generator_pipeline("other", 1, 0, dest.clone(), DesiredStatus::Paused);
    other.request_id = rid2;
    let err = client.create_pipeline(other).await.expect_err("key reuse");
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut malformed = generator_pipeline("other", 1, 0, dest, DesiredStatus::Paused);
    malformed.request_id = "not-a-uuid".into();
    let err = client
        .create_pipeline(malformed)
        .await
        .expect_err("malformed key");
    assert_eq!(err.code(), Code::InvalidArgument);

    // Delete retried with the same key bumps the generation once.
    let delete = pb::DeletePipelineRequest {
        id: "twin".into(),
        request_id: uuid::Uuid::new_v4().to_string(),
        ..Default::default()
    };
    let d1 = client.delete_pipeline(delete.clone()).await?.into_inner();
    let d2 = client.delete_pipeline(delete).await?.into_inner();
    assert_eq!(d1, d2);
    assert_eq!(d1.generation, 2);
    assert_eq!(signals(&d, "twin").await?, 2);
    d.shutdown().await
}
