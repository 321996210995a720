//! Connector secrets: stored only encrypted, opened by the worker that needs them,
//! redacted in every response, and absent from every log line.

use anyhow::{Context, Result};
use prost::Message;
use serde_json::json;
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus, PipelineStatus};
use tonic::Code;
use tonic_types::StatusExt;

const CONVERGE: std::time::Duration = std::time::Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_encrypted_redacted_and_never_logged() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let role = SecretRole::create(&d).await?;
    let secret = role.password.clone();
    let destination = json!({"url": role.url(&d), "table": "secret_t"});

    let mut create = generator_pipeline("vault", 300, 3, destination, DesiredStatus::Active);
    create.request_id = uuid::Uuid::new_v4().to_string();
    let created = client.create_pipeline(create).await?.into_inner();
    let converged = wait_converged(&mut client, "vault", PipelineStatus::Ready, CONVERGE).await?;
    // The worker opened the secret: the rows arrived through the secret role.
    assert_eq!(d.row_count("secret_t").await?, 300);
    let owner: String =
        sqlx::query_scalar("SELECT tableowner::text FROM pg_tables WHERE tablename = 'secret_t'")
            .fetch_one(&d.pool)
            .await?;
    assert_eq!(owner, role.name);

    // Every response shows the URL with its password masked.
    let listed = client
        .list_pipelines(pb::ListPipelinesRequest::default())
        .await?
        .into_inner();
    let shown_url = |p: &pb::Pipeline| -> String {
        let config = p
            .spec
            .as_ref()
            .and_then(|s| s.destination.as_ref())
            .and_then(|c| c.config.as_ref())
            .map(sluice_protocol::conversions::struct_to_json)
            .unwrap_or_default();
        config["url"].as_str().unwrap_or_default().to_owned()
    };
    for p in [&created, &converged, &listed.pipelines[0]] {
        assert!(
            !format!("{p:?}").contains(&secret),
            "a response carries the secret"
        );
        assert!(
            shown_url(p).contains(&format!("{}:********@", role.name)),
            "{}",
            shown_url(p)
        );
    }

    // At rest: sealed in the row, absent from the replayable response.
    let stored: String = sqlx::query_scalar("SELECT spec::text FROM pipelines")
        .fetch_one(&d.pool)
        .await?;
    assert!(!stored.contains(&secret), "stored in clear: {stored}");
    assert!(stored.contains("sluice-secret:v1:"), "{stored}");
    let responses: Vec<Vec<u8>> = sqlx::query_scalar("SELECT response FROM request_log")
        .fetch_all(&d.pool)
        .await?;
    assert_eq!(responses.len(), 1);
    let replay = pb::Pipeline::decode(responses[0].as_slice())?;
    assert!(!format!("{replay:?}").contains(&secret));

    // Get → Update with the redacted spec changes nothing (the secret is kept)...
    let mut round_trip = converged.clone();
    round_trip.etag = String::new();
    let updated = client
        .update_pipeline(pb::UpdatePipelineRequest {
            pipeline: Some(round_trip),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["spec".into()],
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(updated.generation, converged.generation);
    // ... and the pipeline still works with it after a pause and a resume.
    client
        .update_pipeline(set_desired("vault", DesiredStatus::Paused))
        .await?;
    wait_converged(&mut client, "vault", PipelineStatus::Paused, CONVERGE).await?;
    client
        .update_pipeline(set_desired("vault", DesiredStatus::Active))
        .await?;
    wait_converged(&mut client, "vault", PipelineStatus::Ready, CONVERGE).await?;
    assert_eq!(d.row_count("secret_t").await?, 300);

    // No process logged it.
    let logs = d.logs()?;
    assert!(!logs.is_empty(), "the processes log something");
    assert!(!logs.contains(&secret), "a log line carries the secret");

    let infra_url = d.infra.database_url.clone();
    d.shutdown().await?;
    role.drop(&infra_url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secrets_key_secrets_are_refused_not_stored_in_clear() -> Result<()> {
    let mut d = Deployment::new().await?;
    d.secrets_key_file = None;
    let mut client = d.start_control_plane().await?;
    let err = client
        .create_pipeline(generator_pipeline(
            "clear",
            5,
            1,
            json!({"url": "postgres://app:e2e-secret-nokey@127.0.0.1/x", "table": "t"}),
            DesiredStatus::Paused,
        ))
        .await
        .expect_err("no key to seal with");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let info = err.get_details_error_info().context("ErrorInfo")?;
    assert_eq!(info.reason, "SECRETS_KEY_MISSING");
    assert!(!err.message().contains("e2e-secret-nokey"));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM pipelines")
        .fetch_one(&d.pool)
        .await?;
    assert_eq!(rows, 0);
    // A URL without a password needs no key.
    client
        .create_pipeline(generator_pipeline(
            "plain",
            5,
            1,
            json!({"url": "postgres://app@127.0.0.1/x", "table": "t"}),
            DesiredStatus::Paused,
        ))
        .await?;
    d.shutdown().await
}
