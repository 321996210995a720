//! Authentication, roles and tenant isolation: every RPC × every kind of caller, against
//! the real control plane with tokens made by `sluice-control-plane tokens create`.
//! Also the limits that answer RESOURCE_EXHAUSTED.

use anyhow::{Context, Result};
use serde_json::json;
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus};
use tonic::Code;
use tonic_types::StatusExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Create,
    Get,
    List,
    Update,
    Events,
    Delete,
}

const RPCS: [Rpc; 6] = [
    Rpc::Create,
    Rpc::Get,
    Rpc::List,
    Rpc::Update,
    Rpc::Events,
    // Last: it changes the target pipeline for the callers after it.
    Rpc::Delete,
];

/// Calls `rpc` on the pipeline `target` (as the caller spells it); returns the code and,
/// for List, the pipelines seen.
async fn call(
    client: &mut Client,
    rpc: Rpc,
    target: &str,
    create_id: &str,
    destination: &serde_json::Value,
) -> (Code, Vec<pb::Pipeline>) {
    let result = match rpc {
        Rpc::Create => client
            .create_pipeline(generator_pipeline(
                create_id,
                5,
                1,
                destination.clone(),
                DesiredStatus::Paused,
            ))
            .await
            .map(|_| Vec::new()),
        Rpc::Get => client
            .get_pipeline(pb::GetPipelineRequest {
                id: target.to_owned(),
            })
            .await
            .map(|_| Vec::new()),
        Rpc::List => client
            .list_pipelines(pb::ListPipelinesRequest::default())
            .await
            .map(|r| r.into_inner().pipelines),
        Rpc::Update => client
            .update_pipeline(set_desired(target, DesiredStatus::Paused))
            .await
            .map(|_| Vec::new()),
        Rpc::Events => client
            .list_pipeline_events(pb::ListPipelineEventsRequest {
                pipeline_id: target.to_owned(),
                ..Default::default()
            })
            .await
            .map(|_| Vec::new()),
        Rpc::Delete => client
            .delete_pipeline(pb::DeletePipelineRequest {
                id: target.to_owned(),
                ..Default::default()
            })
            .await
            .map(|_| Vec::new()),
    };
    match result {
        Ok(seen) => (Code::Ok, seen),
        Err(status) => (status.code(), Vec::new()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_checks_token_role_and_tenant() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut operator = d.start_control_plane().await?;
    let dest = d.destination("auth_t", false);
    // The pipeline everybody aims at, in tenant t1 (no worker runs: nothing moves).
    operator
        .create_pipeline(generator_pipeline(
            "target",
            5,
            1,
            dest.clone(),
            DesiredStatus::Paused,
        ))
        .await?;

    let viewer = d.create_token(TEST_TENANT, "viewer").await?;
    let other = d.create_token("t2", "operator").await?;
    let admin = d.create_token("ops", "admin").await?;
    let operator_token = d.token.clone().context("operator token")?;

    use Code::*;
    // caller, token, how it names t1's pipeline, expected codes in RPCS order.
    let matrix: [(&str, Option<String>, &str, [Code; 6]); 6] = [
        ("no token", None, "target", [Unauthenticated; 6]),
        (
            "bad token",
            Some("sluice_not-a-real-token".into()),
            "target",
            [Unauthenticated; 6],
        ),
        (
            "viewer",
            Some(viewer),
            "target",
            [
                PermissionDenied,
                Ok,
                Ok,
                PermissionDenied,
                Ok,
                PermissionDenied,
            ],
        ),
        (
            "operator of another tenant",
            Some(other.clone()),
            "target",
            // Create makes its own pipeline in t2; t1's is out of sight.
            [Ok, NotFound, Ok, NotFound, NotFound, NotFound],
        ),
        (
            "operator",
            Some(operator_token),
            "target",
            [Ok, Ok, Ok, Ok, Ok, Ok],
        ),
        ("admin", Some(admin), "t1/target", [Ok, Ok, Ok, Ok, Ok, Ok]),
    ];

    let mut failures = Vec::new();
    let mut lists = Vec::new();
    for rpc in RPCS {
        for (who, token, target, expected) in &matrix {
            let mut client = d.client_with(token.as_deref()).await?;
            let create_id = if *who == "admin" {
                "t1/by-admin".to_owned()
            } else {
                format!("by-{}", who.replace(' ', "-"))
            };
            let (code, seen) = call(&mut client, rpc, target, &create_id, &dest).await;
            let want = expected[RPCS.iter().position(|r| *r == rpc).unwrap_or(0)];
            if code != want {
                failures.push(format!("{rpc:?} as {who}: got {code:?}, want {want:?}"));
            }
            if rpc == Rpc::List && code == Ok {
                lists.push((*who, seen));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "matrix mismatches:\n{}",
        failures.join("\n")
    );

    // What each list showed: its own tenant only, except the admin's.
    for (who, seen) in &lists {
        let tenants: std::collections::BTreeSet<&str> =
            seen.iter().map(|p| p.tenant.as_str()).collect();
        let ids: Vec<String> = seen
            .iter()
            .map(|p| format!("{}/{}", p.tenant, p.id))
            .collect();
        match *who {
            "operator of another tenant" => {
                assert_eq!(tenants, ["t2"].into(), "{who} saw {ids:?}")
            }
            "admin" => assert!(
                tenants.contains("t1") && tenants.contains("t2"),
                "{who} saw {ids:?}"
            ),
            _ => {
                assert_eq!(tenants, [TEST_TENANT].into(), "{who} saw {ids:?}");
                assert!(ids.contains(&"t1/target".to_owned()), "{who} saw {ids:?}");
            }
        }
    }

    // The admin's create landed in t1, the other operator's in t2.
    let by_admin = get(&mut d.client().await?, "by-admin").await?;
    assert_eq!(by_admin.tenant, TEST_TENANT);
    let mut other_client = d.client_with(Some(&other)).await?;
    let by_other = get(&mut other_client, "by-operator-of-another-tenant").await?;
    assert_eq!(by_other.tenant, "t2");
    assert_eq!(
        get(&mut d.client().await?, "by-operator-of-another-tenant")
            .await
            .map_err(|s| s.code()),
        Err(NotFound)
    );

    // Qualified names do not let an operator into another tenant either.
    for rpc in [Rpc::Get, Rpc::Update, Rpc::Events, Rpc::Delete] {
        let (code, _) = call(&mut other_client, rpc, "t1/by-admin", "unused", &dest).await;
        assert_eq!(code, NotFound, "{rpc:?} of t1/by-admin as t2's operator");
    }
    let (code, _) = call(&mut other_client, Rpc::Create, "", "t1/sneaky", &dest).await;
    assert_eq!(code, PermissionDenied, "create in t1 by t2's operator");
    // None of that touched t1's pipeline.
    let untouched = get(&mut d.client().await?, "by-admin").await?;
    assert_eq!(untouched.generation, 1);
    assert_eq!(untouched.desired_status, DesiredStatus::Paused as i32);

    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_share_ids_without_seeing_each_other() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut t1 = d.start_control_plane().await?;
    let mut t2 = d
        .client_with(Some(&d.create_token("t2", "operator").await?))
        .await?;
    let dest = d.destination("shared_ids_t", false);
    for client in [&mut t1, &mut t2] {
        client
            .create_pipeline(generator_pipeline(
                "orders",
                5,
                1,
                dest.clone(),
                DesiredStatus::Paused,
            ))
            .await?;
    }
    // Changing one leaves the other alone.
    t2.update_pipeline(set_desired("orders", DesiredStatus::Active))
        .await?;
    let mine = get(&mut t1, "orders").await?;
    assert_eq!(mine.tenant, TEST_TENANT);
    assert_eq!(mine.generation, 1);
    assert_eq!(mine.desired_status, DesiredStatus::Paused as i32);
    assert_eq!(get(&mut t2, "orders").await?.generation, 2);
    // Deleting one leaves the other's history and row alone.
    t2.delete_pipeline(pb::DeletePipelineRequest {
        id: "orders".into(),
        ..Default::default()
    })
    .await?;
    assert_eq!(
        get(&mut t1, "orders").await?.desired_status,
        DesiredStatus::Paused as i32
    );
    // request_ids belong to their tenant: the same one used by another tenant is a
    // request of its own, never a replay of the first tenant's response.
    let request_id = uuid::Uuid::new_v4().to_string();
    let mut create = generator_pipeline("keyed", 5, 1, dest.clone(), DesiredStatus::Paused);
    create.request_id = request_id.clone();
    let first = t1.create_pipeline(create.clone()).await?.into_inner();
    let other = t2.create_pipeline(create.clone()).await?.into_inner();
    assert_eq!((first.tenant.as_str(), other.tenant.as_str()), ("t1", "t2"));
    // A retry within a tenant still replays.
    let retried = t1.create_pipeline(create).await?.into_inner();
    assert_eq!(retried, first);
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_refused_at_once() -> Result<()> {
    let mut d = Deployment::new().await?;
    d.start_control_plane().await?;
    let token = d.create_token("t9", "viewer").await?;
    let mut client = d.client_with(Some(&token)).await?;
    client
        .list_pipelines(pb::ListPipelinesRequest::default())
        .await?;

    let list = tokio::process::Command::new(bin_path("sluice-control-plane")?)
        .args(["tokens", "list"])
        .env("DATABASE_URL", &d.database_url)
        .output()
        .await?;
    assert!(list.status.success());
    let listing = String::from_utf8(list.stdout)?;
    assert!(
        !listing.contains(&token),
        "tokens list must never show a token"
    );
    let id = listing
        .lines()
        .find(|l| l.contains("viewer-t9"))
        .and_then(|l| l.split_whitespace().next())
        .context("the token is listed")?
        .to_owned();
    // Only hashes are stored.
    let (hashed, in_clear): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE token_hash = sha256(convert_to($1, 'UTF8'))), \
                count(*) FILTER (WHERE position(convert_to($1, 'UTF8') IN token_hash) > 0 \
                                    OR name LIKE '%' || $1 || '%') \
         FROM api_tokens",
    )
    .bind(&token)
    .fetch_one(&d.pool)
    .await?;
    assert_eq!(
        (hashed, in_clear),
        (1, 0),
        "tokens are stored as SHA-256 only"
    );

    let revoke = tokio::process::Command::new(bin_path("sluice-control-plane")?)
        .args(["tokens", "revoke", &id])
        .env("DATABASE_URL", &d.database_url)
        .output()
        .await?;
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    let err = client
        .list_pipelines(pb::ListPipelinesRequest::default())
        .await
        .expect_err("revoked");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        err.get_details_error_info().map(|i| i.reason),
        Some("TOKEN_INVALID".into())
    );
    // Revoking twice is an error that names the id.
    let again = tokio::process::Command::new(bin_path("sluice-control-plane")?)
        .args(["tokens", "revoke", &id])
        .env("DATABASE_URL", &d.database_url)
        .output()
        .await?;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains(&id));
    d.shutdown().await
}

/// A token id from `tokens list`, by the token's name.
async fn token_id(d: &Deployment, name: &str) -> Result<String> {
    let list = tokio::process::Command::new(bin_path("sluice-control-plane")?)
        .args(["tokens", "list"])
        .env("DATABASE_URL", &d.database_url)
        .output()
        .await?;
    String::from_utf8(list.stdout)?
        .lines()
        .find(|l| l.contains(name))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .context("the token is listed")
}

/// Whether `client`'s token is refused, polling until it is or `within` passes; returns
/// how long it took.
async fn refused_within(
    client: &mut Client,
    within: std::time::Duration,
) -> Result<Option<std::time::Duration>> {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        match client
            .list_pipelines(pb::ListPipelinesRequest::default())
            .await
        {
            Err(e) if e.code() == Code::Unauthenticated => return Ok(Some(start.elapsed())),
            Err(e) => return Err(e.into()),
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    Ok(None)
}

/// Control planes trust a token found valid for `--token-cache-ms` without a lookup.
/// A revocation is announced to every replica and evicts the token at once; one that
/// missed the announcement (here: a revocation written to the database behind the
/// control planes' back) refuses the token once its cache entry expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_tokens_are_evicted_on_revocation_and_expire_otherwise() -> Result<()> {
    let ttl = std::time::Duration::from_secs(3);
    let mut d = Deployment::new().await?;
    d.control_plane_args = vec!["--token-cache-ms".into(), ttl.as_millis().to_string()];
    d.start_control_plane().await?;
    let (replica_addr, _replica) = d.start_control_plane_replica("replica").await?;
    let first_addr = d.control_plane_addr.clone().context("address")?;

    // Announced: both replicas refuse at once, long before the cache would expire.
    let token = d.create_token("t7", "viewer").await?;
    let mut clients = vec![
        d.client_at_with(&first_addr, Some(&token)).await?,
        d.client_at_with(&replica_addr, Some(&token)).await?,
    ];
    for c in &mut clients {
        c.list_pipelines(pb::ListPipelinesRequest::default())
            .await?;
    }
    let id = token_id(&d, "viewer-t7").await?;
    let revoke = tokio::process::Command::new(bin_path("sluice-control-plane")?)
        .args(["tokens", "revoke", &id])
        .env("DATABASE_URL", &d.database_url)
        .output()
        .await?;
    assert!(revoke.status.success());
    for c in &mut clients {
        let took = refused_within(c, std::time::Duration::from_secs(1)).await?;
        assert!(
            took.is_some(),
            "a replica still accepts a revoked token after 1 s"
        );
    }

    // Not announced: the cached token is still accepted, until its entry expires.
    let token = d.create_token("t8", "viewer").await?;
    let mut client = d.client_at_with(&replica_addr, Some(&token)).await?;
    client
        .list_pipelines(pb::ListPipelinesRequest::default())
        .await?;
    sqlx::query("UPDATE api_tokens SET revoke_time = now() WHERE name = 'viewer-t8'")
        .execute(&d.pool)
        .await?;
    client
        .list_pipelines(pb::ListPipelinesRequest::default())
        .await
        .context("a cached token is trusted until its entry expires")?;
    let took = refused_within(&mut client, ttl + std::time::Duration::from_secs(2))
        .await?
        .context("a missed revocation takes effect once the cache entry expires")?;
    assert!(took <= ttl + std::time::Duration::from_secs(1), "{took:?}");
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_resource_exhausted_naming_the_limit() -> Result<()> {
    let mut d = Deployment::new().await?;
    d.control_plane_args = vec!["--max-pipelines-per-tenant".into(), "2".into()];
    let mut client = d.start_control_plane().await?;
    let dest = d.destination("limits_t", false);
    for id in ["one", "two"] {
        client
            .create_pipeline(generator_pipeline(
                id,
                5,
                1,
                dest.clone(),
                DesiredStatus::Paused,
            ))
            .await?;
    }
    let err = client
        .create_pipeline(generator_pipeline(
            "three",
            5,
            1,
            dest.clone(),
            DesiredStatus::Paused,
        ))
        .await
        .expect_err("over the tenant's limit");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("max-pipelines-per-tenant"),
        "{err:?}"
    );
    let info = err.get_details_error_info().context("ErrorInfo")?;
    assert_eq!(info.reason, "LIMIT_EXCEEDED");
    assert_eq!(
        info.metadata.get("limit").map(String::as_str),
        Some("max-pipelines-per-tenant")
    );
    assert_eq!(
        get(&mut client, "three").await.map_err(|s| s.code()),
        Err(Code::NotFound)
    );
    // The limit is per tenant.
    let mut t2 = d
        .client_with(Some(&d.create_token("t2", "operator").await?))
        .await?;
    t2.create_pipeline(generator_pipeline(
        "three",
        5,
        1,
        dest.clone(),
        DesiredStatus::Paused,
    ))
    .await?;

    // A request larger than max-request-bytes (default 1 MiB).
    let mut huge = generator_pipeline("huge", 5, 1, dest.clone(), DesiredStatus::Paused);
    if let Some(spec) = huge.pipeline.as_mut().and_then(|p| p.spec.as_mut()) {
        spec.destination = Some(connector(
            "postgres",
            json!({"url": d.database_url, "table": "x", "padding": "x".repeat(2 << 20)}),
        ));
    }
    let err = t2
        .create_pipeline(huge.clone())
        .await
        .expect_err("too large");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("max-request-bytes"), "{err:?}");
    // Without a token the body is not even read: the answer is UNAUTHENTICATED.
    let mut anonymous = d.client_with(None).await?;
    let err = anonymous.create_pipeline(huge).await.expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    d.shutdown().await
}
