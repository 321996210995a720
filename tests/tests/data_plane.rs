//! The data plane against real PostgreSQL and Kafka: a PostgreSQL source copied table
//! by table and kept in sync by runs, inputs pushed to the live lane, a destination that
//! refuses writes, and a reset.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use sluice_e2e::audit::WriteAudit;
use sluice_e2e::*;
use sluice_protocol::pb::{self, DesiredStatus, PipelineStatus};
use sqlx::{Connection, PgConnection, PgPool, Row};
use tonic::Code;

const CONVERGE: Duration = Duration::from_secs(120);

/// A database of its own on the test server, for a source to read.
struct SourceDb {
    name: String,
    url: String,
    pool: PgPool,
    admin_url: String,
}

impl SourceDb {
    async fn create(d: &Deployment) -> Result<Self> {
        let name = unique("src");
        let admin_url = d.infra.database_url.clone();
        let mut admin = PgConnection::connect(&admin_url).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        let url = d.database_url.replace(&d.db_name, &name);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await?;
        Ok(Self {
            name,
            url,
            pool,
            admin_url,
        })
    }

    async fn run(&self, statements: &[&str]) -> Result<()> {
        for s in statements {
            sqlx::query(s)
                .execute(&self.pool)
                .await
                .with_context(|| s.to_string())?;
        }
        Ok(())
    }

    async fn drop(self) -> Result<()> {
        self.pool.close().await;
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

fn request(
    id: &str,
    source: pb::ConnectorSpec,
    destination: Value,
    desired: DesiredStatus,
) -> pb::CreatePipelineRequest {
    pb::CreatePipelineRequest {
        pipeline_id: id.to_owned(),
        pipeline: Some(pb::Pipeline {
            spec: Some(pb::PipelineSpec {
                source: Some(source),
                destination: Some(connector("postgres", destination)),
                ..Default::default()
            }),
            desired_status: desired as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The row count and an md5 over every row of `table` (the listed columns as text,
/// in key order): equal checksums mean equal tables.
async fn checksum(pool: &PgPool, table: &str, columns: &str, key: &str) -> Result<(i64, String)> {
    let row = sqlx::query(&format!(
        "SELECT count(*), coalesce(md5(string_agg(concat_ws('|', {columns}), E'\\n' ORDER BY {key})), '') \
         FROM {table} t"
    ))
    .fetch_one(pool)
    .await
    .with_context(|| format!("checksum of {table}"))?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// The three tables of the PostgreSQL test: (source table, columns as text, key).
const TABLES: [(&str, &str, &str); 3] = [
    (
        "orders",
        "t.id::text, t.customer_id::text, t.amount::text, t.status, t.placed_at::text, t.updated_at::text",
        "t.id",
    ),
    (
        "customers",
        "t.id, t.name, t.email, t.attrs::text, t.vip::text, t.updated_at::text",
        "t.id COLLATE \"C\"",
    ),
    (
        "order_lines",
        "t.order_id::text, t.line::text, t.sku, t.qty::text, t.price::text, t.updated_at::text",
        "t.order_id, t.line",
    ),
];

async fn tables_match(d: &Deployment, src: &SourceDb, prefix: &str) -> Result<()> {
    for (table, columns, key) in TABLES {
        let want = checksum(&src.pool, &format!("public.{table}"), columns, key).await?;
        let got = checksum(&d.pool, &format!("public.{prefix}{table}"), columns, key).await?;
        ensure!(
            got == want,
            "{table}: destination has {} rows (md5 {}), the source {} rows (md5 {})",
            got.0,
            got.1,
            want.0,
            want.1
        );
    }
    Ok(())
}

async fn runs(client: &mut Client, id: &str) -> Result<Vec<pb::Run>> {
    Ok(client
        .list_runs(pb::ListRunsRequest {
            pipeline_id: id.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .runs)
}

/// Waits for run `number` to end and returns it; a failed run is an error.
async fn wait_run(client: &Client, id: &str, number: i64, timeout: Duration) -> Result<pb::Run> {
    let run = wait_for(&format!("run {number} of {id} to end"), timeout, || {
        let mut client = client.clone();
        async move {
            Ok(runs(&mut client, id)
                .await?
                .into_iter()
                .find(|r| r.number == number && r.outcome != "running"))
        }
    })
    .await?;
    ensure!(run.outcome == "succeeded", "run {number} of {id}: {run:?}");
    Ok(run)
}

/// postgres → postgres: three tables (`SLUICE_DP_ROWS` rows in all, 1 000 000 by
/// default) arrive identical; then 10 000 updates and 1 000 inserts arrive after one
/// TriggerSync (and only they are read); then a column added at the source appears at
/// the destination with its values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tables_copy_exactly_then_sync_changes_and_new_columns() -> Result<()> {
    let rows: i64 = std::env::var("SLUICE_DP_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let (orders, customers) = (rows / 2, rows * 3 / 10);
    let lines = rows - orders - customers;
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let src = SourceDb::create(&d).await?;
    src.run(&[
        "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint NOT NULL, \
         amount numeric(12,2) NOT NULL, status text, placed_at timestamptz NOT NULL, \
         updated_at timestamptz NOT NULL)",
        "CREATE TABLE customers (id text PRIMARY KEY, name text NOT NULL, email text, \
         attrs jsonb, vip boolean, updated_at timestamptz NOT NULL)",
        "CREATE TABLE order_lines (order_id bigint, line int, sku text NOT NULL, qty int, \
         price double precision, updated_at timestamptz NOT NULL, PRIMARY KEY (order_id, line))",
        // A table without a primary key cannot be read exactly once: it is skipped.
        "CREATE TABLE scratch (note text)",
    ])
    .await?;
    src.run(&[
        &format!(
            "INSERT INTO orders SELECT g, g % 9973, (g % 100000) / 100.0 + 0.01, \
             (ARRAY['new','paid','shipped',NULL])[1 + g % 4], \
             timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second', \
             timestamptz '2024-06-01 00:00:00+00' + (g % 1000) * interval '1 millisecond' \
             FROM generate_series(1, {orders}) g"
        ),
        &format!(
            "INSERT INTO customers SELECT 'c' || lpad(g::text, 7, '0'), 'Customer ' || g, \
             CASE WHEN g % 10 = 0 THEN NULL ELSE 'c' || g || '@example.com' END, \
             jsonb_build_object('tier', g % 3, 'tags', jsonb_build_array('a', g % 7)), \
             g % 5 = 0, timestamptz '2024-06-01 00:00:00+00' FROM generate_series(1, {customers}) g"
        ),
        &format!(
            "INSERT INTO order_lines SELECT 1 + (g - 1) / 4, 1 + (g - 1) % 4, 'SKU-' || (g % 5000), \
             1 + g % 9, (g % 1000) * 0.25, timestamptz '2024-06-01 00:00:00+00' \
             FROM generate_series(1, {lines}) g"
        ),
        // A name that sorts differently by collation than by bytes.
        "INSERT INTO customers VALUES ('C-upper', 'Upper', NULL, NULL, NULL, '2024-06-01')",
    ])
    .await?;
    let source = connector(
        "postgres",
        json!({"url": src.url, "cursor_column": "updated_at", "slice_size": 10000}),
    );
    let destination = json!({"url": d.database_url, "table_prefix": "src_", "batch_size": 5000});
    let started = std::time::Instant::now();
    client
        .create_pipeline(request("pg", source, destination, DesiredStatus::Active))
        .await?;
    wait_converged(
        &mut client,
        "pg",
        PipelineStatus::Ready,
        Duration::from_secs(900),
    )
    .await?;
    let took = started.elapsed();
    eprintln!(
        "{} rows copied in {:.1} s ({:.0} rows/s)",
        rows + 1,
        took.as_secs_f64(),
        (rows + 1) as f64 / took.as_secs_f64()
    );
    tables_match(&d, &src, "src_").await?;
    ensure!(
        !d.table_exists("src_scratch").await?,
        "a table without a primary key was copied"
    );
    // Typed columns, from the source's catalog.
    let types: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns \
         WHERE table_name = 'src_orders' ORDER BY ordinal_position",
    )
    .fetch_all(&d.pool)
    .await?;
    for (column, ty) in [
        ("id", "bigint"),
        ("amount", "numeric"),
        ("status", "text"),
        ("placed_at", "timestamp with time zone"),
    ] {
        ensure!(
            types.iter().any(|(c, t)| c == column && t == ty),
            "src_orders.{column} is not {ty}: {types:?}"
        );
    }
    let initial = runs(&mut client, "pg").await?;
    ensure!(
        initial.len() == 1
            && initial[0].trigger == "initial"
            && initial[0].outcome == "succeeded"
            && initial[0].records_read == rows + 1
            && initial[0].records_written == rows + 1,
        "the backfill run: {initial:?}"
    );

    // 10 000 updates and 1 000 inserts, then one TriggerSync (sent twice with the same
    // request id: one run).
    let updated = (orders / 10_000).max(1);
    src.run(&[
        &format!(
            "UPDATE orders SET amount = amount + 1, status = 'refunded', updated_at = clock_timestamp() \
             WHERE id % {updated} = 0 AND id <= {updated} * 10000"
        ),
        "INSERT INTO customers SELECT 'n' || lpad(g::text, 5, '0'), 'New ' || g, NULL, '{}', true, \
         clock_timestamp() FROM generate_series(1, 1000) g",
    ])
    .await?;
    let changed: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'refunded'")
        .fetch_one(&src.pool)
        .await?;
    let request_id = uuid::Uuid::new_v4().to_string();
    for _ in 0..2 {
        client
            .trigger_sync(pb::TriggerSyncRequest {
                pipeline_id: "pg".into(),
                request_id: request_id.clone(),
            })
            .await?;
    }
    let sync = wait_run(&client, "pg", 2, CONVERGE).await?;
    ensure!(
        sync.trigger == "manual"
            && sync.records_read == changed + 1000
            && sync.records_written == changed + 1000,
        "the sync read or wrote more than what changed ({changed} updates + 1000 inserts): {sync:?}"
    );
    tables_match(&d, &src, "src_").await?;
    let p = get(&mut client, "pg").await?;
    ensure!(
        p.status == PipelineStatus::Ready as i32,
        "a sync flipped the pipeline: {p:?}"
    );

    // A new column at the source.
    src.run(&[
        "ALTER TABLE orders ADD COLUMN note text",
        "UPDATE orders SET note = 'note ' || id, updated_at = clock_timestamp() WHERE id <= 100",
    ])
    .await?;
    client
        .trigger_sync(pb::TriggerSyncRequest {
            pipeline_id: "pg".into(),
            request_id: String::new(),
        })
        .await?;
    let sync = wait_run(&client, "pg", 3, CONVERGE).await?;
    ensure!(sync.records_read == 100, "{sync:?}");
    let notes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM public.src_orders WHERE note = 'note ' || id")
            .fetch_one(&d.pool)
            .await
            .context("the new column at the destination")?;
    ensure!(notes == 100, "{notes} of 100 notes arrived");
    let want = checksum(&src.pool, "public.orders", "t.id::text, t.note", "t.id").await?;
    let got = checksum(&d.pool, "public.src_orders", "t.id::text, t.note", "t.id").await?;
    ensure!(got == want, "orders.note differs: {got:?} vs {want:?}");
    ensure!(
        runs(&mut client, "pg").await?.len() == 3,
        "a run started that nobody asked for"
    );
    d.shutdown().await?;
    src.drop().await
}

fn pushed_input(i: i64) -> Value {
    json!({"stream": "records", "record": {
        "id": 1_000_000 + i, "name": format!("pushed-{i}"), "amount": i, "score": 0.5, "active": true
    }})
}

/// 1 000 inputs pushed while the pipeline is PAUSED are applied exactly once after it
/// resumes, while its backfill runs at the same time; the worker is killed (-9) midway
/// and another takes over. The write audit sees every write, so a replay would show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_pushed_while_paused_apply_exactly_once_beside_a_backfill() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let table = unique("live");
    let count = 6_000;
    client
        .create_pipeline(pipeline_request(
            "live",
            generator_config(count, 3, 200, 1_000),
            d.destination(&table, false),
            DesiredStatus::Paused,
        ))
        .await?;
    wait_converged(&mut client, "live", PipelineStatus::Paused, CONVERGE).await?;
    let audit = WriteAudit::install(&d.pool, &table).await?;
    let mut sequences = Vec::new();
    for i in 0..1000 {
        let stored = client
            .push_source_input(pb::PushSourceInputRequest {
                pipeline_id: "live".into(),
                input: Some(sluice_protocol::conversions::json_to_value(&pushed_input(
                    i,
                ))),
            })
            .await?
            .into_inner();
        sequences.push(stored.sequence);
    }
    ensure!(
        sequences == (0..1000).collect::<Vec<i64>>(),
        "sequences: {:?}...",
        &sequences[..5]
    );
    // Nothing is applied while paused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(d.row_count(&table).await? == 0, "applied while paused");
    // A bad input is refused and stores nothing.
    let bad = client
        .push_source_input(pb::PushSourceInputRequest {
            pipeline_id: "live".into(),
            input: Some(sluice_protocol::conversions::json_to_value(
                &json!({"record": {}}),
            )),
        })
        .await
        .expect_err("an input without a stream");
    ensure!(bad.code() == Code::InvalidArgument, "{bad:?}");

    client
        .update_pipeline(set_desired("live", DesiredStatus::Active))
        .await?;
    // The pushed inputs arrive while the backfill (1 000 records/s) is still running.
    wait_for("the first pushed rows", CONVERGE, || async {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM public.{table} WHERE id >= 1000000"
        ))
        .fetch_one(&d.pool)
        .await?;
        Ok((n > 0).then_some(()))
    })
    .await?;
    let during = get(&mut client, "live").await?;
    let generated: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM public.{table} WHERE id < 1000000"
    ))
    .fetch_one(&d.pool)
    .await?;
    ensure!(
        during.status == PipelineStatus::Backfill as i32 && generated < count as i64,
        "the live lane waited for the backfill ({generated} backfilled, {during:?})"
    );
    // kill -9 the owner midway, then another worker takes over.
    d.take_worker_named("w1")?.kill().await?;
    d.start_worker("w2").await?;
    wait_converged(&mut client, "live", PipelineStatus::Ready, CONVERGE).await?;
    // One more input after the takeover is applied too.
    client
        .push_source_input(pb::PushSourceInputRequest {
            pipeline_id: "live".into(),
            input: Some(sluice_protocol::conversions::json_to_value(&pushed_input(
                1000,
            ))),
        })
        .await?;
    wait_for("the input pushed after the takeover", CONVERGE, || async {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM public.{table} WHERE id = 1001000"
        ))
        .fetch_one(&d.pool)
        .await?;
        Ok((n == 1).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let writes = audit.writes(&d.pool).await?;
    let mut per_id = std::collections::BTreeMap::<i64, Vec<&str>>::new();
    for w in &writes {
        per_id.entry(w.id).or_default().push(w.name.as_str());
    }
    for i in 0..=1000 {
        let id = 1_000_000 + i;
        let names = per_id.get(&id).cloned().unwrap_or_default();
        let want = format!("pushed-{i}");
        ensure!(
            names == [want.as_str()],
            "pushed input {i} was written {} times: {names:?}",
            names.len()
        );
    }
    for id in 0..count as i64 {
        let n = per_id.get(&id).map_or(0, Vec::len);
        ensure!(n == 1, "backfilled record {id} was written {n} times");
    }
    ensure!(
        per_id.len() == count as usize + 1001,
        "{} ids written",
        per_id.len()
    );
    d.shutdown().await
}

/// A destination that refuses writes (privileges revoked) sends the pipeline to ERROR
/// with a readable last_error; once they are granted again, setting it ACTIVE recovers
/// with every record written exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_privileges_end_in_error_and_a_grant_plus_resume_recovers() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let role = SecretRole::create(&d).await?;
    let table = unique("refused");
    let count = 4_000;
    let mut destination = d.destination(&table, false);
    destination["url"] = json!(role.url(&d));
    destination["batch_size"] = json!(100);
    client
        .create_pipeline(pipeline_request(
            "refused",
            generator_config(count, 8, 100, 500),
            destination,
            DesiredStatus::Paused,
        ))
        .await?;
    wait_converged(&mut client, "refused", PipelineStatus::Paused, CONVERGE).await?;
    let audit = WriteAudit::install(&d.pool, &table).await?;
    client
        .update_pipeline(set_desired("refused", DesiredStatus::Active))
        .await?;
    wait_for("some rows", CONVERGE, || async {
        Ok((d.row_count(&table).await? >= 500).then_some(()))
    })
    .await?;
    sqlx::query(&format!(
        "REVOKE INSERT, UPDATE ON public.{table} FROM {}",
        role.name
    ))
    .execute(&d.pool)
    .await?;
    let failed = wait_converged(&mut client, "refused", PipelineStatus::Error, CONVERGE).await?;
    ensure!(
        failed.last_error.contains("permission denied for table")
            && failed.last_error.contains(&table),
        "last_error does not say what was refused: {:?}",
        failed.last_error
    );
    ensure!(
        !failed.last_error.contains(&role.password),
        "last_error shows the password"
    );
    // No retry while in ERROR: the row count stays.
    let stuck = d.row_count(&table).await?;
    ensure!(
        stuck < count as i64,
        "everything was written before the revoke"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        d.row_count(&table).await? == stuck,
        "written while in ERROR"
    );

    sqlx::query(&format!(
        "GRANT INSERT, UPDATE ON public.{table} TO {}",
        role.name
    ))
    .execute(&d.pool)
    .await?;
    client
        .update_pipeline(set_desired("refused", DesiredStatus::Active))
        .await?;
    wait_converged(&mut client, "refused", PipelineStatus::Ready, CONVERGE).await?;
    audit.check_exact(&d.pool, 8, count, None).await?;
    // The backfill run failed with the pipeline; the recovery is a run of its own.
    let all = runs(&mut client, "refused").await?;
    ensure!(
        all.len() == 2
            && all[1].outcome == "failed"
            && all[1].error.contains("permission denied")
            && all[0].trigger == "retry"
            && all[0].outcome == "succeeded",
        "runs: {all:?}"
    );
    let events = history(&mut client, "refused").await?;
    ensure!(
        events.iter().filter(|e| *e == "ERROR").count() == 1,
        "history: {events:?}"
    );
    let admin_url = d.infra.database_url.clone();
    d.shutdown().await?;
    role.drop(&admin_url).await
}

/// ResetPipeline (only while paused, only for streams the pipeline reads) makes the
/// next resume backfill again: a row deleted at the destination by hand comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_then_resume_backfills_again() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let table = unique("reset");
    let count = 3_000;
    client
        .create_pipeline(pipeline_request(
            "reset",
            generator_config(count, 4, 500, 0),
            d.destination(&table, false),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "reset", PipelineStatus::Ready, CONVERGE).await?;
    let reset = |streams: Vec<String>| pb::ResetPipelineRequest {
        pipeline_id: "reset".into(),
        streams,
        etag: String::new(),
    };
    let refused = client
        .reset_pipeline(reset(vec![]))
        .await
        .expect_err("reset while active");
    ensure!(refused.code() == Code::FailedPrecondition, "{refused:?}");
    sqlx::query(&format!("DELETE FROM public.{table} WHERE id IN (7, 2999)"))
        .execute(&d.pool)
        .await?;
    client
        .update_pipeline(set_desired("reset", DesiredStatus::Paused))
        .await?;
    wait_converged(&mut client, "reset", PipelineStatus::Paused, CONVERGE).await?;
    let unknown = client
        .reset_pipeline(reset(vec!["nope".into()]))
        .await
        .expect_err("an unknown stream");
    ensure!(
        unknown.code() == Code::InvalidArgument && unknown.message().contains("records"),
        "{unknown:?}"
    );
    let before = get(&mut client, "reset").await?;
    let after = client
        .reset_pipeline(reset(vec!["records".into()]))
        .await?
        .into_inner();
    ensure!(after.generation > before.generation, "{after:?}");
    // The worker applies the reset while paused, and nothing is read until resumed.
    wait_converged(&mut client, "reset", PipelineStatus::Paused, CONVERGE).await?;
    ensure!(d.row_count(&table).await? == count as i64 - 2);
    client
        .update_pipeline(set_desired("reset", DesiredStatus::Active))
        .await?;
    wait_run(&client, "reset", 2, CONVERGE).await?;
    let all = runs(&mut client, "reset").await?;
    ensure!(
        all[0].trigger == "reset" && all[0].records_read == count as i64,
        "{all:?}"
    );
    sluice_e2e::audit::check_rows(&d.pool, &table, 4, count).await?;
    let p = wait_converged(&mut client, "reset", PipelineStatus::Ready, CONVERGE).await?;
    ensure!(p.last_error.is_empty(), "{p:?}");
    d.shutdown().await
}

/// TriggerSync, ListRuns and ListConnectors answer bad input with the right code and
/// change nothing; a deleted pipeline takes no input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_and_input_calls_refuse_bad_input() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    let connectors = client
        .list_connectors(pb::ListConnectorsRequest {})
        .await?
        .into_inner()
        .connectors;
    for (side, kind) in [
        ("source", "generator"),
        ("source", "postgres"),
        ("destination", "postgres"),
    ] {
        let c = connectors
            .iter()
            .find(|c| c.side == side && c.r#type == kind)
            .with_context(|| format!("{side} {kind} is not listed"))?;
        ensure!(c.config_schema.is_some(), "{kind} has no config schema");
    }
    let code = |r: Result<tonic::Response<pb::Pipeline>, tonic::Status>| match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    };
    let missing = client
        .trigger_sync(pb::TriggerSyncRequest {
            pipeline_id: "missing".into(),
            request_id: String::new(),
        })
        .await;
    ensure!(code(missing) == Code::NotFound);
    let table = unique("calls");
    client
        .create_pipeline(generator_pipeline(
            "calls",
            10,
            1,
            d.destination(&table, false),
            DesiredStatus::Paused,
        ))
        .await?;
    let bad_id = client
        .trigger_sync(pb::TriggerSyncRequest {
            pipeline_id: "calls".into(),
            request_id: "not-a-uuid".into(),
        })
        .await;
    ensure!(code(bad_id) == Code::InvalidArgument);
    let page = client
        .list_runs(pb::ListRunsRequest {
            pipeline_id: "calls".into(),
            page_size: -1,
            page_token: String::new(),
        })
        .await
        .expect_err("negative page size");
    ensure!(page.code() == Code::InvalidArgument, "{page:?}");
    let token = client
        .list_runs(pb::ListRunsRequest {
            pipeline_id: "calls".into(),
            page_size: 0,
            page_token: "@@".into(),
        })
        .await
        .expect_err("bad page token");
    ensure!(token.code() == Code::InvalidArgument, "{token:?}");
    client
        .delete_pipeline(pb::DeletePipelineRequest {
            id: "calls".into(),
            ..Default::default()
        })
        .await?;
    let pushed = client
        .push_source_input(pb::PushSourceInputRequest {
            pipeline_id: "calls".into(),
            input: Some(sluice_protocol::conversions::json_to_value(&pushed_input(
                1,
            ))),
        })
        .await;
    match pushed {
        Err(s) if s.code() == Code::FailedPrecondition => {}
        other => bail!("push to a deleted pipeline: {other:?}"),
    }
    d.shutdown().await
}

/// stripe-mock → postgres, the seeds' own scenario: customers, products and prices
/// land in typed columns; a `customer.updated` event pushed through the live lane
/// updates its row, a `product.deleted` marks its row, an event about an object no
/// stream holds changes nothing; a sync finds no object created since the backfill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_objects_land_typed_and_events_update_them() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let stripe = StripeMock::start(&d).await?;
    let key = "sk_test_e2e-secret-stripe";
    let mut create = request(
        "stripe",
        connector("stripe", json!({"api_key": key, "base_url": stripe.url})),
        json!({"url": d.database_url, "table_prefix": "stripe_"}),
        DesiredStatus::Active,
    );
    create
        .pipeline
        .as_mut()
        .and_then(|p| p.spec.as_mut())
        .context("a spec")?
        .streams = vec!["customers".into(), "products".into(), "prices".into()];
    let created = client.create_pipeline(create).await?.into_inner();
    let shown = serde_json::to_string(&format!("{:?}", created.spec))?;
    ensure!(!shown.contains(key), "the API key is shown");
    wait_converged(&mut client, "stripe", PipelineStatus::Ready, CONVERGE).await?;

    for (stream, table) in [
        ("customers", "stripe_customers"),
        ("products", "stripe_products"),
        ("prices", "stripe_prices"),
    ] {
        let listed = stripe.get(&format!("/v1/{stream}")).await?;
        let objects = listed["data"].as_array().context("a list")?;
        ensure!(!objects.is_empty(), "stripe-mock lists no {stream}");
        for o in objects {
            let id = o["id"].as_str().context("an id")?;
            let row = sqlx::query(&format!(
                "SELECT extract(epoch FROM created)::bigint AS created, livemode, metadata \
                 FROM public.{table} WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(&d.pool)
            .await?
            .with_context(|| format!("{stream} {id} did not land in {table}"))?;
            ensure!(row.try_get::<i64, _>("created")? == o["created"].as_i64().context("created")?);
            ensure!(
                row.try_get::<bool, _>("livemode")?
                    == o["livemode"].as_bool().context("livemode")?
            );
            ensure!(row.try_get::<Value, _>("metadata")? == o["metadata"]);
        }
    }
    let price = stripe.get("/v1/prices").await?["data"][0].clone();
    let (amount, active): (i64, bool) =
        sqlx::query_as("SELECT unit_amount, active FROM public.stripe_prices WHERE id = $1")
            .bind(price["id"].as_str())
            .fetch_one(&d.pool)
            .await?;
    ensure!(
        Some(amount) == price["unit_amount"].as_i64() && Some(active) == price["active"].as_bool()
    );
    let types: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns \
         WHERE table_name = 'stripe_customers'",
    )
    .fetch_all(&d.pool)
    .await?;
    for (column, ty) in [
        ("created", "timestamp with time zone"),
        ("balance", "bigint"),
        ("delinquent", "boolean"),
        ("metadata", "jsonb"),
    ] {
        ensure!(
            types.iter().any(|(c, t)| c == column && t == ty),
            "stripe_customers.{column} is not {ty}: {types:?}"
        );
    }
    ensure!(
        !d.table_exists("stripe_invoices").await?,
        "a stream the spec does not select was read"
    );

    // Events through the live lane, which a READY pipeline starts on its first input:
    // until then it has no inputs topic.
    let incarnation: i64 = sqlx::query_scalar("SELECT incarnation FROM pipelines WHERE id = $1")
        .bind(sluice_e2e::key("stripe"))
        .fetch_one(&d.pool)
        .await?;
    let inputs = sluice_protocol::topics::inputs_topic(
        &d.topic_namespace,
        &sluice_e2e::key("stripe"),
        incarnation,
    );
    let admin =
        sluice_infra::kafka::KafkaSettings::new(d.infra.kafka_bootstrap_servers.clone()).admin()?;
    ensure!(
        admin.partition_count(&inputs).await?.is_none(),
        "inputs topic {inputs} made before any input was pushed"
    );
    let mut customer = stripe.get("/v1/customers").await?["data"][0].clone();
    let id = customer["id"].as_str().context("an id")?.to_owned();
    customer["email"] = json!("updated@example.com");
    customer["name"] = json!("Updated Name");
    let product = stripe.get("/v1/products").await?["data"][0].clone();
    for event in [
        json!({"object": "event", "type": "payment_intent.created",
               "data": {"object": {"id": "pi_1", "object": "payment_intent"}}}),
        json!({"object": "event", "type": "customer.updated", "data": {"object": customer}}),
        json!({"object": "event", "type": "product.deleted",
               "data": {"object": {"id": product["id"], "object": "product", "deleted": true}}}),
    ] {
        client
            .push_source_input(pb::PushSourceInputRequest {
                pipeline_id: "stripe".into(),
                input: Some(sluice_protocol::conversions::json_to_value(&event)),
            })
            .await?;
    }
    let not_an_event = client
        .push_source_input(pb::PushSourceInputRequest {
            pipeline_id: "stripe".into(),
            input: Some(sluice_protocol::conversions::json_to_value(
                &json!({"type": "customer.updated"}),
            )),
        })
        .await
        .expect_err("an event without data.object");
    ensure!(
        not_an_event.code() == Code::InvalidArgument,
        "{not_an_event:?}"
    );
    wait_for("the updated customer", CONVERGE, || async {
        let row: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT email, name FROM public.stripe_customers WHERE id = $1")
                .bind(&id)
                .fetch_optional(&d.pool)
                .await?;
        Ok((row
            == Some((
                Some("updated@example.com".into()),
                Some("Updated Name".into()),
            )))
        .then_some(()))
    })
    .await?;
    wait_for("the deleted product", CONVERGE, || async {
        let deleted: Option<bool> =
            sqlx::query_scalar("SELECT deleted FROM public.stripe_products WHERE id = $1")
                .bind(product["id"].as_str())
                .fetch_one(&d.pool)
                .await?;
        Ok((deleted == Some(true)).then_some(()))
    })
    .await?;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM public.stripe_customers")
        .fetch_one(&d.pool)
        .await?;
    ensure!(count == 1, "{count} customers");
    // Applied inputs are deleted from the inputs topic: its log start reaches them.
    wait_for("applied inputs deleted from Kafka", CONVERGE, || async {
        let (low, high) = admin.watermarks(&inputs, 0).await?;
        Ok((low == high && low >= 3).then_some(()))
    })
    .await?;

    // A sync: stripe-mock's objects are all older than the backfill.
    client
        .trigger_sync(pb::TriggerSyncRequest {
            pipeline_id: "stripe".into(),
            request_id: String::new(),
        })
        .await?;
    let sync = wait_run(&client, "stripe", 2, CONVERGE).await?;
    ensure!(sync.records_read == 0, "{sync:?}");
    let p = get(&mut client, "stripe").await?;
    ensure!(p.status == PipelineStatus::Ready as i32, "{p:?}");
    d.shutdown().await
}

/// A key Stripe refuses ends in ERROR at setup, saying so, and never shows the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripe_key_refused_ends_in_error() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let stripe = StripeMock::start(&d).await?;
    // stripe-mock refuses a key that does not look like one.
    let key = "e2e-secret-not-a-key";
    client
        .create_pipeline(request(
            "badkey",
            connector("stripe", json!({"api_key": key, "base_url": stripe.url})),
            json!({"url": d.database_url, "table_prefix": "bad_"}),
            DesiredStatus::Active,
        ))
        .await?;
    let p = wait_converged(&mut client, "badkey", PipelineStatus::Error, CONVERGE).await?;
    ensure!(
        p.last_error.contains("stripe answered 401") && !p.last_error.contains(key),
        "{:?}",
        p.last_error
    );
    d.shutdown().await
}

/// A worker whose file connectors work in `dir`.
async fn start_file_worker(d: &mut Deployment, name: &str, dir: &std::path::Path) -> Result<()> {
    let dir = dir.to_str().context("a UTF-8 path")?;
    d.start_worker_with(name, &[("SLUICE_FILES_DIR", dir)])
        .await?;
    Ok(())
}

fn file_request(
    id: &str,
    source: pb::ConnectorSpec,
    destination: pb::ConnectorSpec,
) -> pb::CreatePipelineRequest {
    pb::CreatePipelineRequest {
        pipeline_id: id.to_owned(),
        pipeline: Some(pb::Pipeline {
            spec: Some(pb::PipelineSpec {
                source: Some(source),
                destination: Some(destination),
                ..Default::default()
            }),
            desired_status: DesiredStatus::Active as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn lines_of(path: &std::path::Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("line {l:?}")))
        .collect()
}

/// jsonl → jsonl: a file is copied line for line; lines appended later follow after a
/// TriggerSync; a path outside the worker's files directory is refused at create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_files_copy_exactly_and_appended_lines_follow() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    let files = d.log_dir.join("files");
    std::fs::create_dir_all(files.join("in"))?;
    start_file_worker(&mut d, "w1", &files).await?;
    let line =
        |i: i64| json!({"id": i, "name": format!("event {i}"), "tags": [i % 3], "ok": i % 2 == 0});
    let mut text = String::new();
    for i in 0..5000 {
        text.push_str(&format!("{}\n", line(i)));
    }
    std::fs::write(files.join("in/events.jsonl"), &text)?;
    let source = connector(
        "jsonl",
        json!({"path": "in/events.jsonl", "primary_key": ["id"], "slice_size": 700}),
    );
    let destination = connector(
        "jsonl",
        json!({"directory": "out", "prefix": "copy_", "batch_size": 300}),
    );
    for (bad, field) in [
        (
            json!({"path": "../events.jsonl", "primary_key": ["id"]}),
            "path",
        ),
        (
            json!({"path": "/etc/passwd", "primary_key": ["id"]}),
            "path",
        ),
        (json!({"path": "in/events.jsonl"}), "primary_key"),
    ] {
        let refused = client
            .create_pipeline(file_request(
                "bad",
                connector("jsonl", bad),
                destination.clone(),
            ))
            .await
            .expect_err("an invalid jsonl source");
        ensure!(
            refused.code() == Code::InvalidArgument && refused.message().contains(field),
            "{refused:?}"
        );
    }
    client
        .create_pipeline(file_request("files", source, destination))
        .await?;
    wait_converged(&mut client, "files", PipelineStatus::Ready, CONVERGE).await?;
    let out = files.join("out/copy_events.jsonl");
    let want: Vec<Value> = (0..5000).map(line).collect();
    ensure!(lines_of(&out)? == want, "the copy differs from the file");

    let mut more = String::new();
    for i in 5000..5100 {
        more.push_str(&format!("{}\n", line(i)));
    }
    // A half-written last line is not read until its newline arrives.
    more.push_str("{\"id\": 51");
    std::fs::OpenOptions::new()
        .append(true)
        .open(files.join("in/events.jsonl"))?
        .write_all(more.as_bytes())?;
    client
        .trigger_sync(pb::TriggerSyncRequest {
            pipeline_id: "files".into(),
            request_id: String::new(),
        })
        .await?;
    let sync = wait_run(&client, "files", 2, CONVERGE).await?;
    ensure!(sync.records_read == 100, "{sync:?}");
    let want: Vec<Value> = (0..5100).map(line).collect();
    ensure!(
        lines_of(&out)? == want,
        "the appended lines did not follow exactly"
    );
    d.shutdown().await
}

/// generator → jsonl with the worker killed (-9) midway: the file holds each record
/// exactly once, in order (a batch cut short by the crash is cut from the file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jsonl_destination_holds_each_record_once_across_a_kill() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    let files = d.log_dir.join("files");
    std::fs::create_dir_all(&files)?;
    start_file_worker(&mut d, "w1", &files).await?;
    let count = 6000;
    client
        .create_pipeline(file_request(
            "gen",
            connector("generator", generator_config(count, 9, 200, 1500)),
            connector("jsonl", json!({"batch_size": 50})),
        ))
        .await?;
    let out = files.join("records.jsonl");
    wait_for("some lines", CONVERGE, || async {
        Ok((std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .count()
            > 1500)
            .then_some(()))
    })
    .await?;
    d.take_worker_named("w1")?.kill().await?;
    start_file_worker(&mut d, "w2", &files).await?;
    wait_converged(&mut client, "gen", PipelineStatus::Ready, CONVERGE).await?;
    let lines = lines_of(&out)?;
    let ids: Vec<u64> = lines.iter().filter_map(|l| l["id"].as_u64()).collect();
    ensure!(
        ids == (0..count).collect::<Vec<u64>>(),
        "{} lines; first out of place at {:?}",
        ids.len(),
        ids.iter().enumerate().find(|(i, id)| *i as u64 != **id)
    );
    for l in &lines {
        let id = l["id"].as_u64().context("an id")?;
        ensure!(
            Value::Object(sluice_protocol::catalog::generator_record(9, id)) == *l,
            "line {id} is not the generator's record: {l}"
        );
    }
    d.shutdown().await
}

/// Messages of `topic` as committed transactions show them, from the beginning, until
/// `count` arrived (or nothing more does).
fn consume_committed(
    bootstrap: &str,
    topic: &str,
    count: usize,
) -> Result<Vec<(Option<String>, Value)>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("e2e-reader"))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut quiet_since = std::time::Instant::now();
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                quiet_since = std::time::Instant::now();
                let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
                let value = serde_json::from_slice(m.payload().unwrap_or_default())?;
                out.push((key, value));
            }
            Some(Err(e)) => bail!("consuming {topic}: {e}"),
            None if out.len() >= count && quiet_since.elapsed() > Duration::from_secs(3) => break,
            None => {}
        }
    }
    Ok(out)
}

/// kafka → postgres: the messages of a three-partition topic arrive once each, those
/// produced later after a TriggerSync. generator → kafka with the worker killed (-9)
/// midway: a read_committed consumer of the destination topic sees each record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_topics_in_and_out_exactly_once() -> Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let bootstrap = d.infra.kafka_bootstrap_servers.clone();
    let admin = sluice_infra::kafka::KafkaSettings::new(&bootstrap).admin()?;
    let input = unique("kin");
    admin.ensure_topic(&input, 3, 1, &[]).await?;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let produce = |from: i64, to: i64| {
        let producer = producer.clone();
        let input = input.clone();
        async move {
            for i in from..to {
                let payload = json!({"id": i, "name": format!("m{i}")}).to_string();
                producer
                    .send(
                        FutureRecord::to(&input)
                            .key(&i.to_string())
                            .payload(&payload),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(e, _)| e)?;
            }
            anyhow::Ok(())
        }
    };
    produce(0, 3000).await?;
    client
        .create_pipeline(request(
            "kin",
            connector(
                "kafka",
                json!({"bootstrap_servers": bootstrap, "topics": [input], "slice_size": 700}),
            ),
            json!({"url": d.database_url, "table_prefix": "k_"}),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "kin", PipelineStatus::Ready, CONVERGE).await?;
    let table = format!("k_{input}");
    let check = |n: i64| {
        let pool = d.pool.clone();
        let table = table.clone();
        async move {
            let (rows, ids, places): (i64, i64, i64) = sqlx::query_as(&format!(
                "SELECT count(*), count(DISTINCT (value->>'id')::bigint), count(DISTINCT (partition, \"offset\")) \
                 FROM public.{table} WHERE value->>'name' = 'm' || (value->>'id') AND key = value->>'id'"
            ))
            .fetch_one(&pool)
            .await?;
            ensure!(
                (rows, ids, places) == (n, n, n),
                "{table}: {rows} rows, {ids} ids, {places} places; want {n}"
            );
            anyhow::Ok(())
        }
    };
    check(3000).await?;
    produce(3000, 3150).await?;
    client
        .trigger_sync(pb::TriggerSyncRequest {
            pipeline_id: "kin".into(),
            request_id: String::new(),
        })
        .await?;
    let sync = wait_run(&client, "kin", 2, CONVERGE).await?;
    ensure!(sync.records_read == 150, "{sync:?}");
    check(3150).await?;

    let output = unique("kout");
    let count = 5000u64;
    client
        .create_pipeline(pb::CreatePipelineRequest {
            pipeline_id: "kout".into(),
            pipeline: Some(pb::Pipeline {
                spec: Some(pb::PipelineSpec {
                    source: Some(connector(
                        "generator",
                        generator_config(count, 6, 250, 1500),
                    )),
                    destination: Some(connector(
                        "kafka",
                        json!({"bootstrap_servers": bootstrap, "topic": output, "batch_size": 100}),
                    )),
                    ..Default::default()
                }),
                desired_status: DesiredStatus::Active as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    wait_converged(&mut client, "kout", PipelineStatus::Backfill, CONVERGE).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.take_worker_named("w1")?.kill().await?;
    d.start_worker("w2").await?;
    wait_converged(&mut client, "kout", PipelineStatus::Ready, CONVERGE).await?;
    let messages = tokio::task::spawn_blocking({
        let bootstrap = bootstrap.clone();
        let output = output.clone();
        move || consume_committed(&bootstrap, &output, count as usize)
    })
    .await??;
    let mut ids: Vec<u64> = messages
        .iter()
        .filter_map(|(_, v)| v["id"].as_u64())
        .collect();
    ids.sort_unstable();
    ensure!(
        ids == (0..count).collect::<Vec<_>>(),
        "{} messages for {count} records (duplicates or gaps)",
        messages.len()
    );
    for (key, value) in &messages {
        let id = value["id"].as_u64().context("an id")?;
        ensure!(
            key.as_deref() == Some(id.to_string().as_str()),
            "key {key:?} for id {id}"
        );
        ensure!(Value::Object(sluice_protocol::catalog::generator_record(6, id)) == *value);
    }
    for t in [&input, &output] {
        admin.delete_topic(t).await?;
    }
    d.shutdown().await
}
