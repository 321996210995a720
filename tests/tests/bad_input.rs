//! Bad input gets the right gRPC code, names the field, and changes nothing: no row,
//! no generation bump, no signal in the outbox.

use anyhow::Result;
use serde_json::json;
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus, PipelineStatus};
use tonic::Code;
use tonic_types::StatusExt;

async fn outbox_len(d: &Deployment) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM signal_outbox")
        .fetch_one(&d.pool)
        .await?)
}

fn field_of(status: &tonic::Status) -> String {
    status
        .get_details_bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .unwrap_or_default()
}

fn reason_of(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_has_its_code_and_changes_nothing() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    let dest = d.destination("bad_input_t", false);

    client
        .create_pipeline(generator_pipeline(
            "exists",
            10,
            0,
            dest.clone(),
            DesiredStatus::Paused,
        ))
        .await?;
    let before = get(&mut client, "exists").await?;
    let outbox_before = outbox_len(&d).await?;

    // Creates that must fail, with the field each must name.
    let mut cases: Vec<(pb::CreatePipelineRequest, Code, &str)> = Vec::new();
    let mut req = generator_pipeline("x1", 10, 0, dest.clone(), DesiredStatus::Active);
    req.pipeline
        .as_mut()
        .and_then(|p| p.spec.as_mut())
        .expect("spec")
        .source = Some(connector("mysql", json!({})));
    cases.push((req, Code::InvalidArgument, "pipeline.spec.source.type"));
    let mut req = generator_pipeline("x2", 10, 0, dest.clone(), DesiredStatus::Active);
    req.pipeline
        .as_mut()
        .and_then(|p| p.spec.as_mut())
        .expect("spec")
        .destination = Some(connector("mysql", json!({})));
    cases.push((req, Code::InvalidArgument, "pipeline.spec.destination.type"));
    let mut req = generator_pipeline("x3", 10, 0, dest.clone(), DesiredStatus::Active);
    req.pipeline
        .as_mut()
        .and_then(|p| p.spec.as_mut())
        .expect("spec")
        .source = Some(connector("generator", json!({"seed": 1})));
    cases.push((
        req,
        Code::InvalidArgument,
        "pipeline.spec.source.config.count",
    ));
    let req = generator_pipeline("x4", 10, 0, json!({"table": "t"}), DesiredStatus::Active);
    cases.push((
        req,
        Code::InvalidArgument,
        "pipeline.spec.destination.config.url",
    ));
    let req = generator_pipeline("Bad_Id!", 10, 0, dest.clone(), DesiredStatus::Active);
    cases.push((req, Code::InvalidArgument, "pipeline_id"));
    let huge = json!({"url": format!("postgres://x/{}", "y".repeat(70_000)), "table": "t"});
    let req = generator_pipeline("x7", 10, 0, huge, DesiredStatus::Active);
    cases.push((req, Code::InvalidArgument, "pipeline.spec"));
    let req = generator_pipeline("x5", 10, 0, dest.clone(), DesiredStatus::Deleted);
    cases.push((req, Code::InvalidArgument, "pipeline.desired_status"));
    cases.push((
        pb::CreatePipelineRequest {
            pipeline_id: "x6".into(),
            pipeline: None,
            ..Default::default()
        },
        Code::InvalidArgument,
        "pipeline",
    ));
    let req = generator_pipeline("exists", 10, 0, dest.clone(), DesiredStatus::Active);
    cases.push((req, Code::AlreadyExists, ""));

    for (req, code, field) in cases {
        let id = req.pipeline_id.clone();
        let err = client
            .create_pipeline(req)
            .await
            .expect_err("must be rejected");
        assert_eq!(err.code(), code, "create {id}: {err:?}");
        assert_eq!(field_of(&err), field, "create {id}: {err:?}");
        if code == Code::InvalidArgument && id != "Bad_Id!" {
            assert_eq!(
                get(&mut client, &id).await.expect_err("no row").code(),
                Code::NotFound
            );
        }
    }

    // Unknown and malformed ids.
    let err = get(&mut client, "nope").await.expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason_of(&err), "PIPELINE_NOT_FOUND");
    assert_eq!(
        get(&mut client, "NOT VALID")
            .await
            .expect_err("malformed")
            .code(),
        Code::InvalidArgument
    );
    let err = client
        .update_pipeline(set_desired("nope", DesiredStatus::Paused))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .delete_pipeline(pb::DeletePipelineRequest {
            id: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .list_pipelines(pb::ListPipelinesRequest {
            page_size: 10,
            page_token: "%%%".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(
        (err.code(), field_of(&err).as_str()),
        (Code::InvalidArgument, "page_token")
    );

    // Update is exactly as strict as create.
    let bad_spec_update = pb::UpdatePipelineRequest {
        pipeline: Some(pb::Pipeline {
            id: "exists".into(),
            spec: Some(pb::PipelineSpec {
                source: Some(connector("generator", json!({"count": "many"}))),
                destination: None,
                ..Default::default()
            }),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["spec.source".into()],
        }),
        ..Default::default()
    };
    let err = client
        .update_pipeline(bad_spec_update)
        .await
        .expect_err("invalid spec");
    assert_eq!(
        (err.code(), field_of(&err).as_str()),
        (Code::InvalidArgument, "pipeline.spec.source.config.count")
    );
    for path in ["status", "generation", "bogus"] {
        let mut req = set_desired("exists", DesiredStatus::Active);
        req.update_mask = Some(prost_types::FieldMask {
            paths: vec![path.into()],
        });
        let err = client.update_pipeline(req).await.expect_err("bad mask");
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, "update_mask"),
            "{path}"
        );
    }
    let err = client
        .update_pipeline(set_desired("exists", DesiredStatus::Deleted))
        .await
        .expect_err("DELETED via update");
    assert_eq!(err.code(), Code::InvalidArgument);

    // None of that changed the pipeline or queued a signal.
    let after = get(&mut client, "exists").await?;
    assert_eq!(after.generation, before.generation);
    assert_eq!(after.spec, before.spec);
    assert_eq!(after.etag, before.etag);
    assert_eq!(outbox_len(&d).await?, outbox_before);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM pipelines")
        .fetch_one(&d.pool)
        .await?;
    assert_eq!(rows, 1);

    // Deleted is terminal: any later change is FAILED_PRECONDITION (no worker runs, so
    // the pipeline stays DELETING); deleting again is a no-op.
    client
        .delete_pipeline(pb::DeletePipelineRequest {
            id: "exists".into(),
            ..Default::default()
        })
        .await?;
    let deleted_outbox = outbox_len(&d).await?;
    let err = client
        .update_pipeline(set_desired("exists", DesiredStatus::Active))
        .await
        .expect_err("deleted is terminal");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason_of(&err), "PIPELINE_DELETED");
    let again = client
        .delete_pipeline(pb::DeletePipelineRequest {
            id: "exists".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(again.phase, "DELETING");
    assert_eq!(outbox_len(&d).await?, deleted_outbox);
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_through_every_pipeline_once() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    let dest = d.destination("list_t", false);
    for i in 0..7 {
        client
            .create_pipeline(generator_pipeline(
                &format!("p-{i}"),
                1,
                0,
                dest.clone(),
                DesiredStatus::Paused,
            ))
            .await?;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_pipelines(pb::ListPipelinesRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        assert!(page.pipelines.len() <= 3);
        seen.extend(page.pipelines.into_iter().map(|p| p.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, (0..7).map(|i| format!("p-{i}")).collect::<Vec<_>>());

    // Filters: two of them active; no worker runs, so none has a reported status.
    for id in ["p-2", "p-5"] {
        client
            .update_pipeline(set_desired(id, DesiredStatus::Active))
            .await?;
    }
    let ids = |page: pb::ListPipelinesResponse| -> Vec<String> {
        page.pipelines.into_iter().map(|p| p.id).collect()
    };
    let list =
        |status: Vec<PipelineStatus>, desired: Vec<DesiredStatus>| pb::ListPipelinesRequest {
            page_size: 2,
            status: status.into_iter().map(|s| s as i32).collect(),
            desired_status: desired.into_iter().map(|s| s as i32).collect(),
            ..Default::default()
        };
    let active = client
        .list_pipelines(list(vec![], vec![DesiredStatus::Active]))
        .await?
        .into_inner();
    assert!(active.next_page_token.is_empty(), "{active:?}");
    assert_eq!(ids(active), ["p-2", "p-5"]);
    let first = client
        .list_pipelines(list(
            vec![PipelineStatus::Unspecified],
            vec![DesiredStatus::Paused],
        ))
        .await?
        .into_inner();
    let second = client
        .list_pipelines(pb::ListPipelinesRequest {
            page_token: first.next_page_token.clone(),
            ..list(
                vec![PipelineStatus::Unspecified],
                vec![DesiredStatus::Paused],
            )
        })
        .await?
        .into_inner();
    assert_eq!(ids(first), ["p-0", "p-1"]);
    assert_eq!(ids(second), ["p-3", "p-4"]);
    let ready = client
        .list_pipelines(list(
            vec![PipelineStatus::Ready, PipelineStatus::Error],
            vec![],
        ))
        .await?
        .into_inner();
    assert!(ready.pipelines.is_empty(), "{ready:?}");
    for (bad, field) in [
        (
            list(vec![], vec![DesiredStatus::Unspecified]),
            "desired_status",
        ),
        (
            pb::ListPipelinesRequest {
                status: vec![99],
                ..Default::default()
            },
            "status",
        ),
    ] {
        let err = client.list_pipelines(bad).await.expect_err("refused");
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, field)
        );
    }
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() -> Result<()> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let mut d = Deployment::new().await?;
    d.start_control_plane().await?;
    let url = format!(
        "http://{}",
        d.control_plane_addr.clone().unwrap_or_default()
    );

    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await?;
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(HealthCheckRequest {
            service: "sluice.v1.PipelineService".into(),
        })
        .await?
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response = responses.message().await?.expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"sluice.v1.PipelineService".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );

    // The older version, which many clients still ask, serves the same descriptors.
    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "sluice.v1.PipelineService".into(),
            )),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter([request]))
            .await?
            .into_inner();
        let response = responses.message().await?.expect("one response");
        let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
            panic!("unexpected v1alpha reflection response: {response:?}");
        };
        let set: Vec<prost_types::FileDescriptorProto> = files
            .file_descriptor_proto
            .iter()
            .map(|bytes| prost::Message::decode(bytes.as_slice()))
            .collect::<Result<_, _>>()?;
        assert!(
            set.iter().any(|f| f
                .service
                .iter()
                .any(|s| s.name.as_deref() == Some("PipelineService"))),
            "{:?}",
            set.iter().map(|f| f.name.clone()).collect::<Vec<_>>()
        );
    }
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_only_checks_like_the_real_call_and_stores_nothing() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    let dest = d.destination("dry_run_t", false);
    client
        .create_pipeline(generator_pipeline(
            "exists",
            10,
            0,
            dest.clone(),
            DesiredStatus::Active,
        ))
        .await?;
    let before = get(&mut client, "exists").await?;
    let outbox_before = outbox_len(&d).await?;
    let dry = |mut req: pb::CreatePipelineRequest| {
        req.validate_only = true;
        req
    };

    // A valid create answers with the pipeline it would make, and makes none.
    let rid = uuid::Uuid::new_v4().to_string();
    let would = client
        .create_pipeline(pb::CreatePipelineRequest {
            request_id: rid.clone(),
            ..dry(generator_pipeline(
                "fresh",
                10,
                0,
                dest.clone(),
                DesiredStatus::Paused,
            ))
        })
        .await?
        .into_inner();
    assert_eq!(
        (would.id.as_str(), would.generation, would.desired_status),
        ("fresh", 1, DesiredStatus::Paused as i32)
    );
    assert_eq!(
        get(&mut client, "fresh").await.expect_err("no row").code(),
        Code::NotFound
    );
    // Every check of the real call runs: the id taken, a bad spec.
    let taken = client
        .create_pipeline(dry(generator_pipeline(
            "exists",
            10,
            0,
            dest.clone(),
            DesiredStatus::Active,
        )))
        .await
        .expect_err("taken");
    assert_eq!(taken.code(), Code::AlreadyExists);
    let mut bad = dry(generator_pipeline(
        "bad",
        10,
        0,
        dest.clone(),
        DesiredStatus::Active,
    ));
    bad.pipeline
        .as_mut()
        .and_then(|p| p.spec.as_mut())
        .expect("spec")
        .source = Some(connector("generator", json!({"count": -1})));
    let err = client.create_pipeline(bad).await.expect_err("bad spec");
    assert_eq!(
        (err.code(), field_of(&err).as_str()),
        (Code::InvalidArgument, "pipeline.spec.source.config.count")
    );
    // The dry run's request_id was not remembered: the real call with it creates.
    let real = client
        .create_pipeline(pb::CreatePipelineRequest {
            request_id: rid,
            ..generator_pipeline("fresh", 10, 0, dest.clone(), DesiredStatus::Paused)
        })
        .await?
        .into_inner();
    assert_eq!(real.id, "fresh");
    assert_eq!(get(&mut client, "fresh").await?.generation, 1);
    let outbox_after_real = outbox_len(&d).await?;
    assert!(outbox_after_real > outbox_before, "the real create signals");

    // An update answers with the pipeline as it would be, bumped, and changes nothing.
    let would = client
        .update_pipeline(pb::UpdatePipelineRequest {
            validate_only: true,
            ..set_desired("exists", DesiredStatus::Paused)
        })
        .await?
        .into_inner();
    assert_eq!(
        (would.desired_status, would.generation),
        (DesiredStatus::Paused as i32, before.generation + 1)
    );
    let after = get(&mut client, "exists").await?;
    assert_eq!(
        (after.desired_status, after.generation, after.etag.as_str()),
        (
            before.desired_status,
            before.generation,
            before.etag.as_str()
        )
    );
    let stale = client
        .update_pipeline(pb::UpdatePipelineRequest {
            validate_only: true,
            pipeline: Some(pb::Pipeline {
                id: "exists".into(),
                desired_status: DesiredStatus::Paused as i32,
                etag: "\"stale\"".into(),
                ..Default::default()
            }),
            ..set_desired("exists", DesiredStatus::Paused)
        })
        .await
        .expect_err("stale etag");
    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(
        outbox_len(&d).await?,
        outbox_after_real,
        "no dry run signals"
    );
    d.shutdown().await
}
