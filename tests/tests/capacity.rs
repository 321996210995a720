//! A worker's capacity (--max-pipelines): at its limit it takes no more pipelines, and
//! the ones it declined show as UNASSIGNED with the reason until it has room.

use std::time::Duration;

use anyhow::Result;
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus, PipelineStatus};
use sqlx::Connection;

const CONVERGE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_at_capacity_takes_no_more_and_says_why() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker_with("w1", &[("SLUICE_MAX_PIPELINES", "2")])
        .await?;
    for id in ["cap-0", "cap-1"] {
        client
            .create_pipeline(generator_pipeline(
                id,
                500,
                1,
                d.destination(&unique(&id.replace('-', "_")), true),
                DesiredStatus::Active,
            ))
            .await?;
        wait_converged(&mut client, id, PipelineStatus::Ready, CONVERGE).await?;
    }
    let third = unique("cap_2");
    client
        .create_pipeline(generator_pipeline(
            "cap-2",
            500,
            1,
            d.destination(&third, true),
            DesiredStatus::Active,
        ))
        .await?;
    let declined = wait_for("cap-2 declined", CONVERGE, || {
        let mut client = client.clone();
        async move {
            let p = get(&mut client, "cap-2").await?;
            Ok((!p.unassigned_reason.is_empty()).then_some(p))
        }
    })
    .await?;
    assert_eq!(declined.phase, "UNASSIGNED");
    assert_eq!(
        declined.unassigned_reason,
        "w1 is at capacity (2 pipelines, --max-pipelines)"
    );
    // It stays so across the worker's resyncs (2 s here): nothing of it runs.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let still = get(&mut client, "cap-2").await?;
    assert_eq!(
        (still.phase.as_str(), still.status),
        ("UNASSIGNED", PipelineStatus::Unspecified as i32)
    );
    assert!(!d.table_exists(&third).await?, "nothing was set up");

    // Room again: the worker takes it, and the reason goes.
    client
        .delete_pipeline(pb::DeletePipelineRequest {
            id: "cap-0".into(),
            ..Default::default()
        })
        .await?;
    wait_removed(&client, "cap-0", CONVERGE).await?;
    let taken = wait_converged(&mut client, "cap-2", PipelineStatus::Ready, CONVERGE).await?;
    assert_eq!(
        (taken.owner.as_str(), taken.unassigned_reason.as_str()),
        ("w1", "")
    );
    assert_eq!(d.row_count(&third).await?, 500);
    d.shutdown().await
}

/// The worker's connections to tenants' databases stay under its cap
/// (--max-database-connections): with room for one pool (4 connections), three
/// pipelines writing to three databases take turns with it, and all their records
/// land. The test samples PostgreSQL's sessions every 50 ms: more than 4 connections
/// to the three databases, or connections to two of them at once, seen in two samples
/// in a row, fails it (a session closing as another opens can show for an instant;
/// without the cap each database keeps its idle connections for minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_tenant_databases_stay_under_the_cap() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker_with("w1", &[("SLUICE_MAX_DATABASE_CONNECTIONS", "4")])
        .await?;
    let mut admin = sqlx::PgConnection::connect(&d.infra.database_url).await?;
    let mut databases = Vec::new();
    for i in 0..3 {
        let name = unique(&format!("capdb_{i}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        databases.push(name);
    }
    let worst = std::sync::Mutex::new((0i64, 0i64));
    let run = async {
        for (i, db) in databases.iter().enumerate() {
            let mut destination = d.destination(&format!("capped_{i}"), true);
            destination["url"] = d.database_url.replace(&d.db_name, db).into();
            destination["batch_size"] = 100.into();
            client
                .create_pipeline(pipeline_request(
                    &format!("capped-{i}"),
                    generator_config(3000, i as u64, 300, 3000),
                    destination,
                    DesiredStatus::Active,
                ))
                .await?;
        }
        for i in 0..3 {
            wait_converged(
                &mut client,
                &format!("capped-{i}"),
                PipelineStatus::Ready,
                CONVERGE,
            )
            .await?;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::select! {
        failed = watch_sessions(&d.pool, &databases, &worst) => match failed? {},
        done = run => done?,
    }
    let (sessions, open) = *worst.lock().expect("not poisoned");
    println!("at most {sessions} sessions to the three databases, to {open} at once");
    anyhow::ensure!(sessions >= 1, "no session to the databases was ever seen");
    for (i, db) in databases.iter().enumerate() {
        let url = d.database_url.replace(&d.db_name, db);
        let mut conn = sqlx::PgConnection::connect(&url).await?;
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM public.capped_{i}"))
            .fetch_one(&mut conn)
            .await?;
        anyhow::ensure!(rows == 3000, "{db}: {rows} of 3000 records");
        conn.close().await?;
    }
    d.shutdown().await?;
    for db in &databases {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
    }
    Ok(())
}

/// Samples the sessions to `databases` every 50 ms until an excess shows twice in a
/// row (the error); keeps the largest counts seen in `worst`.
async fn watch_sessions(
    pool: &sqlx::PgPool,
    databases: &[String],
    worst: &std::sync::Mutex<(i64, i64)>,
) -> Result<std::convert::Infallible> {
    let mut previous_over = false;
    loop {
        let (sessions, open): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT datname) FROM pg_stat_activity \
             WHERE datname = ANY($1)",
        )
        .bind(databases)
        .fetch_one(pool)
        .await?;
        let over = sessions > 4 || open > 1;
        anyhow::ensure!(
            !(over && previous_over),
            "{sessions} sessions to {open} of the databases, twice in a row"
        );
        previous_over = over;
        {
            let mut worst = worst.lock().expect("not poisoned");
            *worst = (worst.0.max(sessions), worst.1.max(open));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
