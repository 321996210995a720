//! Sluice's guarantees, each tested in the sequence that once broke it:
//!
//! - every record lands exactly once at a PostgreSQL destination (a write audit on the
//!   table sees replays, not only the row count);
//! - a stale owner never writes (handover during a spec change, delete and re-create
//!   while the old owner is stopped);
//! - a connector secret is never stored or shown in clear;
//! - a bad spec or a bad record ends in ERROR with a readable reason, and delete and
//!   pause always work.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use sluice_e2e::audit::{check_rows, find_in_database, WriteAudit};
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus, PipelineStatus};
use tonic::Code;

const CONVERGE: Duration = Duration::from_secs(120);
/// How long a stopped worker is given, once resumed, to do whatever it would do.
const ZOMBIE_GRACE: Duration = Duration::from_secs(20);

/// Creates `id` PAUSED (setup makes the table without writing a row), installs the
/// write audit on its table, then resumes it.
async fn create_audited(
    d: &Deployment,
    client: &mut Client,
    id: &str,
    source: serde_json::Value,
    destination: serde_json::Value,
) -> Result<WriteAudit> {
    let table = destination["table"]
        .as_str()
        .context("destination names a table")?
        .to_owned();
    client
        .create_pipeline(pipeline_request(
            id,
            source,
            destination,
            DesiredStatus::Paused,
        ))
        .await?;
    wait_converged(client, id, PipelineStatus::Paused, CONVERGE).await?;
    let audit = WriteAudit::install(&d.pool, &table).await?;
    client
        .update_pipeline(set_desired(id, DesiredStatus::Active))
        .await?;
    Ok(audit)
}

async fn wait_rows(d: &Deployment, table: &str, at_least: i64) -> Result<()> {
    wait_for(&format!("{at_least} rows in {table}"), CONVERGE, || async {
        Ok((d.table_exists(table).await? && d.row_count(table).await? >= at_least).then_some(()))
    })
    .await
}

/// A batch larger than PostgreSQL's 65 535 bind parameters (10 000 rows × 7 columns)
/// is written like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_record_lands_once_when_a_batch_exceeds_the_bind_parameter_limit() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let table = unique("wide");
    let mut destination = d.destination(&table, false);
    destination["batch_size"] = json!(10_000);
    client
        .create_pipeline(pipeline_request(
            "wide",
            generator_config(20_000, 5, 20_000, 0),
            destination,
            DesiredStatus::Paused,
        ))
        .await?;
    wait_converged(&mut client, "wide", PipelineStatus::Paused, CONVERGE).await?;
    let audit = WriteAudit::install(&d.pool, &table).await?;
    // The first batch's transaction waits 3 s, so that the whole backfill is in the
    // records topic when the write lane takes its next (full) batch.
    for statement in [
        "CREATE TABLE public.slow_once (done BOOLEAN NOT NULL)".to_owned(),
        "INSERT INTO public.slow_once VALUES (false)".to_owned(),
        "CREATE FUNCTION public.slow_once_fn() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NOT (SELECT done FROM public.slow_once) THEN \
         UPDATE public.slow_once SET done = true; PERFORM pg_sleep(3); END IF; \
         RETURN NULL; END $$"
            .to_owned(),
        format!(
            "CREATE TRIGGER slow_once BEFORE INSERT ON public.{table} \
             FOR EACH STATEMENT EXECUTE FUNCTION public.slow_once_fn()"
        ),
    ] {
        sqlx::query(&statement).execute(&d.pool).await?;
    }
    client
        .update_pipeline(set_desired("wide", DesiredStatus::Active))
        .await?;
    wait_converged(
        &mut client,
        "wide",
        PipelineStatus::Ready,
        Duration::from_secs(60),
    )
    .await?;
    audit.check_exact(&d.pool, 5, 20_000, None).await?;
    // The full batch did happen: 10 000 rows × 7 values in one transaction.
    let largest = audit.largest_transaction(&d.pool).await?;
    ensure!(largest == 10_000, "largest batch: {largest} rows");
    d.shutdown().await
}

/// After create, pause, spec change and delete, the destination password appears in
/// no column of any table and in no log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_secrets_are_never_stored_in_clear() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let role = SecretRole::create(&d).await?;
    let secret = role.password.clone();
    let table = unique("sealed");
    let destination = json!({"url": role.url(&d), "table": table, "drop_table_on_delete": true});
    client
        .create_pipeline(pipeline_request(
            "sealed",
            generator_config(500, 1, 100, 0),
            destination,
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "sealed", PipelineStatus::Ready, CONVERGE).await?;
    let no_secret_stored = |step: &'static str| {
        let pool = d.pool.clone();
        let secret = secret.clone();
        async move {
            let found = find_in_database(&pool, &secret).await?;
            ensure!(
                found.is_empty(),
                "after {step}, the password is stored in {found:?}"
            );
            Ok::<_, anyhow::Error>(())
        }
    };
    no_secret_stored("create").await?;

    client
        .update_pipeline(set_desired("sealed", DesiredStatus::Paused))
        .await?;
    wait_converged(&mut client, "sealed", PipelineStatus::Paused, CONVERGE).await?;
    no_secret_stored("pause").await?;

    // A spec change: another table, the URL sent again in clear.
    let other = unique("sealed2");
    client
        .update_pipeline(set_destination(
            "sealed",
            json!({"url": role.url(&d), "table": other, "drop_table_on_delete": true}),
        ))
        .await?;
    client
        .update_pipeline(set_desired("sealed", DesiredStatus::Active))
        .await?;
    wait_converged(&mut client, "sealed", PipelineStatus::Ready, CONVERGE).await?;
    check_rows(&d.pool, &other, 1, 500).await?;
    no_secret_stored("spec change").await?;

    client
        .delete_pipeline(pb::DeletePipelineRequest {
            id: "sealed".into(),
            ..Default::default()
        })
        .await?;
    wait_removed(&client, "sealed", CONVERGE).await?;
    no_secret_stored("delete").await?;
    ensure!(
        !d.logs()?.contains(&secret),
        "a log line carries the password"
    );
    let infra_url = d.infra.database_url.clone();
    d.shutdown().await?;
    role.drop(&infra_url).await
}

/// The owner stops (SIGSTOP) in the middle of a backfill; another worker takes over;
/// the pipeline is deleted and created again with the same id and table but another
/// seed; then the stopped worker continues. Nothing it still had in flight may land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_never_writes_into_a_re_created_pipeline() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let table = unique("phoenix");
    let destination = d.destination(&table, false);
    let audit = create_audited(
        &d,
        &mut client,
        "phoenix",
        generator_config(150_000, 1, 1000, 10_000),
        destination.clone(),
    )
    .await?;
    wait_rows(&d, &table, 20_000).await?;
    d.worker("w1")?.suspend()?;
    d.start_worker("w2").await?;
    wait_owner(&client, "phoenix", "w2", CONVERGE).await?;

    client
        .delete_pipeline(pb::DeletePipelineRequest {
            id: "phoenix".into(),
            ..Default::default()
        })
        .await?;
    wait_removed(&client, "phoenix", CONVERGE).await?;
    let recreated_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&d.pool)
            .await?;
    client
        .create_pipeline(pipeline_request(
            "phoenix",
            generator_config(150_000, 2, 1000, 10_000),
            destination,
            DesiredStatus::Active,
        ))
        .await?;
    wait_for("the new incarnation to start writing", CONVERGE, || async {
        let written: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM public.{table}_writes WHERE at >= $1"
        ))
        .bind(recreated_at)
        .fetch_one(&d.pool)
        .await?;
        Ok((written > 0).then_some(()))
    })
    .await?;
    d.worker("w1")?.resume()?;
    wait_converged(&mut client, "phoenix", PipelineStatus::Ready, CONVERGE).await?;
    d.log_mentions("w1", "partitions revoked", ZOMBIE_GRACE)
        .await;
    audit
        .check_exact(&d.pool, 2, 150_000, Some(recreated_at))
        .await?;
    d.shutdown().await
}

/// The owner stops in the middle of a backfill, the spec changes (another seed) and
/// another worker takes over with it; then the stopped worker continues. Nothing of
/// the old spec may land after the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_stopped_during_a_spec_change_never_lands_old_records() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let table = unique("zombie");
    let audit = create_audited(
        &d,
        &mut client,
        "zombie",
        generator_config(100_000, 1, 2000, 10_000),
        d.destination(&table, false),
    )
    .await?;
    wait_rows(&d, &table, 10_000).await?;
    d.worker("w1")?.suspend()?;
    let changed = client
        .update_pipeline(set_source("zombie", generator_config(100_000, 2, 2000, 0)))
        .await?
        .into_inner();
    let changed_at = chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::try_from(
        changed.update_time.context("update_time")?,
    )?);
    d.start_worker("w2").await?;
    wait_owner(&client, "zombie", "w2", CONVERGE).await?;
    d.worker("w1")?.resume()?;
    wait_converged(&mut client, "zombie", PipelineStatus::Ready, CONVERGE).await?;
    d.log_mentions("w1", "partitions revoked", ZOMBIE_GRACE)
        .await;
    audit
        .check_exact(&d.pool, 2, 100_000, Some(changed_at))
        .await?;
    d.shutdown().await
}

/// A worker whose secrets key cannot open the stored spec can still pause and delete
/// the pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_delete_work_when_the_stored_spec_no_longer_opens() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let role = SecretRole::create(&d).await?;
    let table = unique("locked");
    client
        .create_pipeline(pipeline_request(
            "locked",
            generator_config(200, 1, 100, 0),
            json!({"url": role.url(&d), "table": table}),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "locked", PipelineStatus::Ready, CONVERGE).await?;
    d.take_worker_named("w1")?.stop().await?;
    // The replacement worker holds another deployment's key: the sealed URL stays
    // sealed and the spec does not validate there.
    let other_key = d.log_dir.join("other.key");
    std::fs::write(&other_key, "c2x1aWNlLW90aGVyLWtleS0tLS0tLS0tLS0tLS0tLS0=")?;
    d.start_worker_with(
        "w2",
        &[(
            "SLUICE_SECRETS_KEY_FILE",
            other_key.to_str().context("utf-8 path")?,
        )],
    )
    .await?;
    client
        .update_pipeline(set_desired("locked", DesiredStatus::Paused))
        .await?;
    let paused = wait_converged(&mut client, "locked", PipelineStatus::Paused, CONVERGE).await?;
    assert_eq!(paused.owner, "w2");
    client
        .delete_pipeline(pb::DeletePipelineRequest {
            id: "locked".into(),
            ..Default::default()
        })
        .await?;
    wait_removed(&client, "locked", CONVERGE).await?;
    let infra_url = d.infra.database_url.clone();
    d.shutdown().await?;
    role.drop(&infra_url).await
}

/// A spec change to a source with no records, or to another table while the old
/// spec's records are still being written, reaches READY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_change_reaches_ready_with_an_empty_source_or_a_new_table() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let table = unique("empty");
    client
        .create_pipeline(pipeline_request(
            "empty",
            generator_config(1000, 1, 100, 0),
            d.destination(&table, false),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "empty", PipelineStatus::Ready, CONVERGE).await?;
    // No records at all, into a table that has none yet.
    let empty_table = unique("empty2");
    client
        .update_pipeline(pb::UpdatePipelineRequest {
            pipeline: Some(pb::Pipeline {
                id: "empty".into(),
                spec: Some(pb::PipelineSpec {
                    source: Some(connector("generator", generator_config(0, 1, 100, 0))),
                    destination: Some(connector("postgres", d.destination(&empty_table, false))),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["spec".into()],
            }),
            ..Default::default()
        })
        .await?;
    wait_converged(
        &mut client,
        "empty",
        PipelineStatus::Ready,
        Duration::from_secs(60),
    )
    .await?;

    let moving = unique("moving");
    client
        .create_pipeline(pipeline_request(
            "moving",
            generator_config(30_000, 3, 1000, 10_000),
            d.destination(&moving, false),
            DesiredStatus::Active,
        ))
        .await?;
    wait_rows(&d, &moving, 5_000).await?;
    let moved = unique("moved");
    client
        .update_pipeline(set_destination("moving", d.destination(&moved, false)))
        .await?;
    wait_converged(
        &mut client,
        "moving",
        PipelineStatus::Ready,
        Duration::from_secs(90),
    )
    .await?;
    check_rows(&d.pool, &moved, 3, 30_000).await?;
    d.shutdown().await
}

/// Re-running setup (a spec change that adds no column) needs no lock that waits for
/// readers of the destination table or of the offsets table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_waits_for_no_reader_when_nothing_changes() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let table = unique("readers");
    client
        .create_pipeline(pipeline_request(
            "readers",
            generator_config(500, 1, 100, 0),
            d.destination(&table, false),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "readers", PipelineStatus::Ready, CONVERGE).await?;
    // A long-running report holds ACCESS SHARE locks on both tables.
    let mut reader = d.pool.begin().await?;
    sqlx::query(&format!("SELECT count(*) FROM public.{table}"))
        .execute(&mut *reader)
        .await?;
    sqlx::query("SELECT count(*) FROM public._sluice_offsets")
        .execute(&mut *reader)
        .await?;
    let mut destination = d.destination(&table, false);
    destination["batch_size"] = json!(250);
    client
        .update_pipeline(set_destination("readers", destination))
        .await?;
    wait_converged(
        &mut client,
        "readers",
        PipelineStatus::Ready,
        Duration::from_secs(45),
    )
    .await?;
    reader.rollback().await?;
    d.shutdown().await
}

/// A transaction that keeps a pipeline row locked (a stopped process, a forgotten
/// psql session) makes an update fail fast, never hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_never_waits_forever_for_a_locked_row() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    client
        .create_pipeline(generator_pipeline(
            "held",
            1,
            0,
            d.destination("held_t", false),
            DesiredStatus::Paused,
        ))
        .await?;
    let mut holder = d.pool.begin().await?;
    sqlx::query("SELECT 1 FROM pipelines WHERE name = 'held' FOR UPDATE")
        .execute(&mut *holder)
        .await?;
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        client.update_pipeline(set_desired("held", DesiredStatus::Active)),
    )
    .await
    .context("UpdatePipeline still waiting after 30 s")?;
    let err = outcome.expect_err("the row is locked");
    assert!(
        matches!(err.code(), Code::Unavailable | Code::Aborted),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    holder.rollback().await?;
    client
        .update_pipeline(set_desired("held", DesiredStatus::Active))
        .await?;
    d.shutdown().await
}

/// `drop_table_on_delete` drops only a table the pipeline created itself, and setup
/// never alters a table it did not create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_drops_and_alters_only_the_table_it_created() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let shared = unique("shared");
    client
        .create_pipeline(pipeline_request(
            "owner",
            generator_config(300, 1, 100, 0),
            d.destination(&shared, false),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "owner", PipelineStatus::Ready, CONVERGE).await?;

    // A user's table that even carries the comment Sluice once used as its mark.
    let users = unique("users");
    for statement in [
        format!("CREATE TABLE public.{users} (id BIGINT PRIMARY KEY, email TEXT)"),
        format!("COMMENT ON TABLE public.{users} IS 'created by Sluice'"),
        format!("INSERT INTO public.{users} VALUES (1, 'a@example.com')"),
    ] {
        sqlx::query(&statement).execute(&d.pool).await?;
    }
    for (id, table) in [("intruder", &shared), ("squatter", &users)] {
        client
            .create_pipeline(pipeline_request(
                id,
                generator_config(50, 9, 50, 0),
                d.destination(table, true),
                DesiredStatus::Active,
            ))
            .await?;
    }
    for id in ["intruder", "squatter"] {
        let failed = wait_converged(&mut client, id, PipelineStatus::Error, CONVERGE).await?;
        assert!(!failed.last_error.is_empty(), "{id}: {failed:?}");
    }
    for id in ["intruder", "squatter"] {
        client
            .delete_pipeline(pb::DeletePipelineRequest {
                id: id.into(),
                ..Default::default()
            })
            .await?;
        wait_removed(&client, id, CONVERGE).await?;
    }
    check_rows(&d.pool, &shared, 1, 300).await?;
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
    )
    .bind(&users)
    .fetch_all(&d.pool)
    .await?;
    assert_eq!(columns, ["id", "email"], "the user's table was altered");
    assert_eq!(d.row_count(&users).await?, 1);
    d.shutdown().await
}

/// A record the destination refuses (a CHECK constraint) moves the pipeline to ERROR
/// with the record's key, instead of retrying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_destination_refuses_ends_in_error_naming_its_key() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let table = unique("poison");
    client
        .create_pipeline(pipeline_request(
            "poison",
            generator_config(1000, 4, 100, 0),
            d.destination(&table, false),
            DesiredStatus::Paused,
        ))
        .await?;
    wait_converged(&mut client, "poison", PipelineStatus::Paused, CONVERGE).await?;
    // Exactly one record (the largest amount) breaks the constraint.
    let (poison_id, max_amount) = (0..1000u64)
        .map(|id| {
            let r = sluice_protocol::catalog::generator_record(4, id);
            (id, r["amount"].as_i64().unwrap_or_default())
        })
        .max_by_key(|(_, amount)| *amount)
        .context("records")?;
    sqlx::query(&format!(
        "ALTER TABLE public.{table} ADD CONSTRAINT amount_cap CHECK (amount < {max_amount})"
    ))
    .execute(&d.pool)
    .await?;
    client
        .update_pipeline(set_desired("poison", DesiredStatus::Active))
        .await?;
    let failed = wait_converged(
        &mut client,
        "poison",
        PipelineStatus::Error,
        Duration::from_secs(60),
    )
    .await?;
    assert!(
        failed.last_error.contains(&format!("id={poison_id}"))
            && failed.last_error.contains("amount_cap"),
        "last_error: {}",
        failed.last_error
    );
    d.shutdown().await
}

/// A request_id reused for a request with another body is refused, not answered
/// with the first request's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_request_id_with_another_body_is_refused() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    let rid = uuid::Uuid::new_v4().to_string();
    let mut first = generator_pipeline(
        "twice",
        5,
        1,
        d.destination("t", false),
        DesiredStatus::Paused,
    );
    first.request_id = rid.clone();
    client.create_pipeline(first.clone()).await?;
    // The same request again is a retry.
    client.create_pipeline(first).await?;
    let mut other = generator_pipeline(
        "twice",
        500,
        1,
        d.destination("t", false),
        DesiredStatus::Paused,
    );
    other.request_id = rid;
    let err = client
        .create_pipeline(other)
        .await
        .expect_err("another body under the same request_id");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    d.shutdown().await
}

/// Signals that cannot be sent (here: to a partition the topic does not have) do not
/// hold back the signals queued behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_signals_never_block_the_ones_behind_them() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    sqlx::query(
        "INSERT INTO signal_outbox (pipeline_id, partition, payload) \
         SELECT 't1.ghost-' || n, 9999, '\\x00'::bytea FROM generate_series(1, 300) n",
    )
    .execute(&d.pool)
    .await?;
    client
        .create_pipeline(generator_pipeline(
            "behind",
            1,
            0,
            d.destination("behind_t", false),
            DesiredStatus::Paused,
        ))
        .await?;
    wait_for(
        "the new signal to be sent",
        Duration::from_secs(20),
        || async {
            let sent: Option<bool> = sqlx::query_scalar(
                "SELECT sent_at IS NOT NULL FROM signal_outbox WHERE pipeline_id = $1",
            )
            .bind(key("behind"))
            .fetch_optional(&d.pool)
            .await?;
            Ok(sent.filter(|s| *s))
        },
    )
    .await?;
    d.shutdown().await
}

/// A destination URL may name neither a file on the worker (sslrootcert) nor the
/// worker's Unix socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_cannot_name_a_file_or_socket_of_the_worker() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    for url in [
        "postgres://u:p@db.example/x?sslmode=verify-ca&sslrootcert=/dev/zero",
        "postgres://u:p@db.example/x?sslrootcert=../../etc/ssl/private/key.pem",
        "postgres://u@%2Fvar%2Frun%2Fpostgresql/x",
        "postgres://u@%2fvar%2frun%2fpostgresql:5432/x",
    ] {
        let err = client
            .create_pipeline(pipeline_request(
                "bad-url",
                generator_config(1, 0, 1, 0),
                json!({"url": url, "table": "t"}),
                DesiredStatus::Paused,
            ))
            .await
            .expect_err(url);
        assert_eq!(err.code(), Code::InvalidArgument, "{url}: {err:?}");
    }
    d.shutdown().await
}

/// The operator's host lists: the control plane refuses a spec naming a denied host,
/// and a worker refuses to connect to one (checked on the addresses a name resolves
/// to as well), ending the pipeline in ERROR with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_reach_only_hosts_the_operator_allows() -> Result<()> {
    let mut d = Deployment::new().await?;
    d.control_plane_args = vec![
        "--destination-hosts-deny".into(),
        "10.0.0.0/8,*.internal".into(),
    ];
    let mut client = d.start_control_plane().await?;
    for url in ["postgres://u@db.internal/x", "postgres://u@10.1.2.3/x"] {
        let err = client
            .create_pipeline(pipeline_request(
                "denied",
                generator_config(1, 0, 1, 0),
                json!({"url": url, "table": "t"}),
                DesiredStatus::Paused,
            ))
            .await
            .expect_err(url);
        assert_eq!(err.code(), Code::InvalidArgument, "{url}: {err:?}");
        assert!(err.message().contains("deny-list"), "{err:?}");
    }
    // The worker's own list: "localhost" passes the control plane but resolves to a
    // loopback address the worker refuses.
    d.start_worker_with(
        "w1",
        &[("SLUICE_DESTINATION_HOSTS_DENY", "127.0.0.0/8,::1/128")],
    )
    .await?;
    let url = d.database_url.replace("127.0.0.1", "localhost");
    client
        .create_pipeline(pipeline_request(
            "loopback",
            generator_config(1, 0, 1, 0),
            json!({"url": url, "table": "t"}),
            DesiredStatus::Active,
        ))
        .await?;
    let failed = wait_converged(&mut client, "loopback", PipelineStatus::Error, CONVERGE).await?;
    assert!(
        failed.last_error.contains("deny-list"),
        "{}",
        failed.last_error
    );
    assert!(!d.table_exists("t").await?);
    d.shutdown().await
}

/// A worker stopped (SIGSTOP) in the middle of a destination transaction holds its
/// locks only until the destination ends its idle session; its successor then takes
/// over and the result is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_stopped_inside_a_transaction_does_not_block_its_successor() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let table = unique("stalled");
    let mut destination = d.destination(&table, false);
    destination["batch_size"] = json!(200);
    let audit = create_audited(
        &d,
        &mut client,
        "stalled",
        generator_config(2000, 6, 500, 0),
        destination,
    )
    .await?;
    // Every batch's transaction takes a second, so the worker is caught inside one.
    for statement in [
        "CREATE FUNCTION public.slow_fn() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         PERFORM pg_sleep(1); RETURN NULL; END $$"
            .to_owned(),
        format!(
            "CREATE TRIGGER slow BEFORE INSERT ON public.{table} \
             FOR EACH STATEMENT EXECUTE FUNCTION public.slow_fn()"
        ),
    ] {
        sqlx::query(&statement).execute(&d.pool).await?;
    }
    wait_for("w1 inside a batch transaction", CONVERGE, || async {
        let inside: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sluice-worker/w1' \
             AND xact_start IS NOT NULL AND query LIKE 'INSERT INTO%'",
        )
        .fetch_one(&d.pool)
        .await?;
        Ok((inside > 0).then_some(()))
    })
    .await?;
    let w1 = d.take_worker_named("w1")?;
    w1.suspend()?;
    d.start_worker("w2").await?;
    wait_converged(&mut client, "stalled", PipelineStatus::Ready, CONVERGE).await?;
    audit.check_exact(&d.pool, 6, 2000, None).await?;
    let p = get(&mut client, "stalled").await?;
    assert_eq!(p.owner, "w2");
    w1.kill().await?;
    d.shutdown().await
}

/// A spec change completes promptly on a worker busy with other backfills (nothing
/// waits for the worker's other pipelines' records to drain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_change_completes_on_a_busy_worker() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    for i in 0..3 {
        client
            .create_pipeline(pipeline_request(
                &format!("busy-{i}"),
                generator_config(300_000, i, 20_000, 0),
                d.destination(&unique("busy"), false),
                DesiredStatus::Active,
            ))
            .await?;
    }
    let table = unique("changed");
    client
        .create_pipeline(pipeline_request(
            "changed",
            generator_config(500, 1, 100, 0),
            d.destination(&table, false),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "changed", PipelineStatus::Ready, CONVERGE).await?;
    wait_rows(&d, &table, 500).await?;
    client
        .update_pipeline(set_source("changed", generator_config(800, 2, 100, 0)))
        .await?;
    wait_converged(
        &mut client,
        "changed",
        PipelineStatus::Ready,
        Duration::from_secs(45),
    )
    .await?;
    check_rows(&d.pool, &table, 2, 800).await?;
    d.shutdown().await
}
