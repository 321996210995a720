//! The postgres destination against real PostgreSQL (each test gets its own database
//! from `#[sqlx::test]`): fenced, replay-proof batches; table ownership per
//! incarnation; setup that waits for no reader; batches without a bind-parameter limit
//! and refused records named by key.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_connectors::postgres_destination::{self as pg, PostgresDestinationConfig};
use sluice_connectors::records::{Lane, PendingRecord, RecordTags};
use sluice_connectors::{ActivityError, Claim, Position, WriteTarget};
use sluice_protocol::catalog::{generator_stream, StreamSchema};
use sluice_protocol::message::FailureType;
use sqlx::PgPool;

fn streams() -> Vec<StreamSchema> {
    vec![generator_stream()]
}

fn destination(table: &str) -> PostgresDestinationConfig {
    PostgresDestinationConfig {
        url: String::new(),
        schema: "public".into(),
        table: Some(table.into()),
        table_prefix: String::new(),
        drop_table_on_delete: true,
        batch_size: 500,
        ssl_ca_pem: None,
    }
}

fn owner(key: &str, incarnation: i64, epoch: i64) -> Claim {
    Claim {
        key: key.into(),
        incarnation,
        epoch,
    }
}

fn record(offset: i64, id: i64, amount: i64, spec_version: i64, claim: &Claim) -> PendingRecord {
    let Value::Object(data) =
        json!({"id": id, "name": format!("n{id}"), "amount": amount, "score": 1.5, "active": true})
    else {
        unreachable!("a JSON object literal")
    };
    PendingRecord {
        offset,
        stream: "records".into(),
        tags: Some(RecordTags {
            incarnation: claim.incarnation,
            epoch: claim.epoch,
            spec_version,
            lane: Lane::Backfill,
            position: Some(Position::int(id)),
            run: None,
        }),
        data,
    }
}

async fn amount_of(pool: &PgPool, table: &str, id: i64) -> Option<i64> {
    sqlx::query_scalar(&format!("SELECT amount FROM public.{table} WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
        .expect("row")
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM public.{table}"))
        .fetch_one(pool)
        .await
        .expect("count")
}

fn target<'a>(claim: &'a Claim, spec_version: i64) -> WriteTarget<'a> {
    WriteTarget {
        claim,
        topic: "records",
        partition: 0,
        spec_version,
    }
}

#[sqlx::test]
async fn destination_batches_are_fenced_replay_proof_and_never_go_back(pool: PgPool) {
    let config = destination("dest");
    let a = owner("p", 1, 10);
    pg::setup(&pool, &config, &streams(), &a)
        .await
        .expect("setup");
    pg::setup(&pool, &config, &streams(), &a)
        .await
        .expect("setup is idempotent");
    assert_eq!(
        pg::fence_offsets(&pool, &config, &target(&a, 1), 0)
            .await
            .expect("fence")
            .next_offset,
        0
    );
    // Duplicates inside one batch keep the newest version.
    let next = pg::write_batch(
        &pool,
        &config,
        &streams(),
        &target(&a, 1),
        &[record(0, 1, 100, 1, &a), record(1, 2, 200, 1, &a)],
    )
    .await
    .expect("write");
    assert_eq!(next.next_offset, 2);
    // A slice produced again (a crash after Kafka committed it, before the cursor was
    // saved) is consumed but not written: its positions are not new.
    pg::write_batch(
        &pool,
        &config,
        &streams(),
        &target(&a, 1),
        &[
            record(2, 1, 999, 1, &a),
            record(3, 2, 999, 1, &a),
            record(4, 3, 300, 1, &a),
        ],
    )
    .await
    .expect("write");
    assert_eq!(amount_of(&pool, "dest", 1).await, Some(100));
    assert_eq!(amount_of(&pool, "dest", 3).await, Some(300));

    // A batch that would move the committed offset back is refused.
    let err = pg::write_batch(
        &pool,
        &config,
        &streams(),
        &target(&a, 1),
        &[record(1, 9, 9, 1, &a)],
    )
    .await
    .expect_err("offsets never go back");
    assert!(matches!(err, ActivityError::Invariant(_)), "{err:?}");

    // A new owner fences the offsets before its first batch: the previous owner can no
    // longer commit, even though it wrote the last batch.
    let b = owner("p", 1, 11);
    let state = pg::fence_offsets(&pool, &config, &target(&b, 1), 0)
        .await
        .expect("fence");
    assert_eq!(state.next_offset, 5);
    assert_eq!(
        state.positions.get("records/backfill"),
        Some(&Position::int(3))
    );
    let err = pg::write_batch(
        &pool,
        &config,
        &streams(),
        &target(&a, 1),
        &[record(5, 4, 4, 1, &a)],
    )
    .await
    .expect_err("fenced");
    assert!(matches!(err, ActivityError::Fenced));
    assert_eq!(
        count(&pool, "dest").await,
        3,
        "the fenced batch rolled back"
    );
    assert!(matches!(
        pg::fence_offsets(&pool, &config, &target(&a, 1), 0).await,
        Err(ActivityError::Fenced)
    ));

    // A spec change (version 2) starts at the topic's end; the old spec's records still
    // in flight are consumed and dropped, and positions start afresh.
    let state = pg::fence_offsets(&pool, &config, &target(&b, 2), 8)
        .await
        .expect("fence");
    assert_eq!(state.next_offset, 8, "moved up to the new spec's start");
    pg::write_batch(
        &pool,
        &config,
        &streams(),
        &target(&b, 2),
        &[record(8, 4, 444, 1, &b), record(9, 1, 111, 2, &b)],
    )
    .await
    .expect("write");
    assert_eq!(
        amount_of(&pool, "dest", 4).await,
        None,
        "old-spec record dropped"
    );
    assert_eq!(amount_of(&pool, "dest", 1).await, Some(111));
    // A lane still on version 1 meets version-2 records: it is stale, not a writer.
    let err = pg::write_batch(
        &pool,
        &config,
        &streams(),
        &target(&b, 1),
        &[record(10, 5, 5, 2, &b)],
    )
    .await
    .expect_err("superseded");
    assert!(matches!(err, ActivityError::Fenced), "{err:?}");
}

#[sqlx::test]
async fn a_new_incarnation_fences_the_old_one_and_replaces_its_rows(pool: PgPool) {
    let config = PostgresDestinationConfig {
        drop_table_on_delete: false,
        ..destination("kept")
    };
    let old = owner("p", 1, 5);
    pg::setup(&pool, &config, &streams(), &old)
        .await
        .expect("setup");
    pg::fence_offsets(&pool, &config, &target(&old, 1), 0)
        .await
        .expect("fence");
    pg::write_batch(
        &pool,
        &config,
        &streams(),
        &target(&old, 1),
        &[record(0, 1, 1, 1, &old)],
    )
    .await
    .expect("write");

    // The pipeline is deleted (its teardown keeps the table) and created again: the new
    // incarnation's offsets restart at zero in its own topic, yet its rows win.
    pg::teardown(&pool, &config, &streams(), &old)
        .await
        .expect("teardown");
    let new = owner("p", 2, 6);
    pg::setup(&pool, &config, &streams(), &new)
        .await
        .expect("a kept table of the same pipeline is reused");
    let new_target = WriteTarget {
        topic: "records-2",
        ..target(&new, 1)
    };
    pg::fence_offsets(&pool, &config, &new_target, 0)
        .await
        .expect("fence");
    pg::write_batch(
        &pool,
        &config,
        &streams(),
        &new_target,
        &[record(0, 1, 7, 1, &new)],
    )
    .await
    .expect("new incarnation writes");
    assert_eq!(amount_of(&pool, "kept", 1).await, Some(7));

    // A stale teardown of the old incarnation (its owner was stopped mid-delete) leaves
    // the new incarnation's offsets, table and registration alone.
    pg::teardown(&pool, &config, &streams(), &old)
        .await
        .expect("stale teardown");
    let drop_config = PostgresDestinationConfig {
        drop_table_on_delete: true,
        ..config.clone()
    };
    pg::teardown(&pool, &drop_config, &streams(), &old)
        .await
        .expect("stale teardown asking for the drop");
    assert_eq!(amount_of(&pool, "kept", 1).await, Some(7));
    assert_eq!(
        pg::committed_offset(&pool, &config, &new_target)
            .await
            .expect("offsets"),
        Some(1)
    );

    // The old incarnation's write lane, were it still running, has no row to commit
    // against (teardown removed it, and the new incarnation removes any left).
    let err = pg::write_batch(
        &pool,
        &config,
        &streams(),
        &target(&old, 1),
        &[record(1, 2, 2, 1, &old)],
    )
    .await
    .expect_err("old incarnation fenced");
    assert!(matches!(err, ActivityError::Fenced), "{err:?}");
    assert_eq!(amount_of(&pool, "kept", 2).await, None);
}

#[sqlx::test]
async fn a_pipeline_drops_and_alters_only_its_own_table(pool: PgPool) {
    let a = owner("a", 1, 1);
    let b = owner("b", 2, 2);
    let shared = destination("shared");
    pg::setup(&pool, &shared, &streams(), &a)
        .await
        .expect("setup");
    let err = pg::setup(&pool, &shared, &streams(), &b)
        .await
        .expect_err("another pipeline's table");
    assert!(
        matches!(&err, ActivityError::Failed { failure_type: FailureType::ConfigError, message } if message.contains("another Sluice pipeline")),
        "{err:?}"
    );
    // b's teardown (drop_table_on_delete) leaves a's table alone.
    pg::teardown(&pool, &shared, &streams(), &b)
        .await
        .expect("teardown");
    assert!(amount_of(&pool, "shared", 1).await.is_none());
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('public.shared') IS NOT NULL")
        .fetch_one(&pool)
        .await
        .expect("regclass");
    assert!(exists, "b dropped a's table");

    // A user's table, even one carrying Sluice's old comment, is neither altered nor
    // dropped.
    sqlx::query("CREATE TABLE public.users (id BIGINT PRIMARY KEY, email TEXT)")
        .execute(&pool)
        .await
        .expect("create");
    sqlx::query("COMMENT ON TABLE public.users IS 'created by Sluice'")
        .execute(&pool)
        .await
        .expect("comment");
    let users = destination("users");
    let c = owner("c", 3, 3);
    let err = pg::setup(&pool, &users, &streams(), &c)
        .await
        .expect_err("lacks columns");
    assert!(format!("{err}").contains("never alters"), "{err}");
    pg::teardown(&pool, &users, &streams(), &c)
        .await
        .expect("teardown");
    let columns: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'users'",
    )
    .fetch_one(&pool)
    .await
    .expect("columns");
    assert_eq!(columns, 2);

    // a's own table is dropped by a's teardown.
    pg::teardown(&pool, &shared, &streams(), &a)
        .await
        .expect("teardown");
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('public.shared') IS NOT NULL")
        .fetch_one(&pool)
        .await
        .expect("regclass");
    assert!(!exists, "a's own table is dropped");
}

#[sqlx::test]
async fn setup_of_an_unchanged_table_waits_for_no_reader(pool: PgPool) {
    let config = destination("busy");
    let a = owner("p", 1, 1);
    pg::setup(&pool, &config, &streams(), &a)
        .await
        .expect("setup");
    let mut reader = pool.begin().await.expect("begin");
    sqlx::query("SELECT count(*) FROM public.busy")
        .execute(&mut *reader)
        .await
        .expect("read");
    sqlx::query("SELECT count(*) FROM public._sluice_offsets")
        .execute(&mut *reader)
        .await
        .expect("read");
    tokio::time::timeout(
        Duration::from_secs(5),
        pg::setup(&pool, &config, &streams(), &a),
    )
    .await
    .expect("setup must not wait for the reader's locks")
    .expect("setup");
    reader.rollback().await.expect("rollback");
}

#[sqlx::test]
async fn batches_have_no_bind_parameter_limit_and_refused_records_are_named(pool: PgPool) {
    let config = destination("wide");
    let a = owner("p", 1, 1);
    pg::setup(&pool, &config, &streams(), &a)
        .await
        .expect("setup");
    pg::fence_offsets(&pool, &config, &target(&a, 1), 0)
        .await
        .expect("fence");
    // 20 000 rows × 7 values is far beyond PostgreSQL's 65 535 bind parameters.
    let batch: Vec<PendingRecord> = (0..20_000).map(|i| record(i, i, i, 1, &a)).collect();
    pg::write_batch(&pool, &config, &streams(), &target(&a, 1), &batch)
        .await
        .expect("one batch");
    assert_eq!(count(&pool, "wide").await, 20_000);

    sqlx::query("ALTER TABLE public.wide ADD CONSTRAINT cap CHECK (amount < 20005)")
        .execute(&pool)
        .await
        .expect("constraint");
    let batch: Vec<PendingRecord> = (20_000..20_010).map(|i| record(i, i, i, 1, &a)).collect();
    let err = pg::write_batch(&pool, &config, &streams(), &target(&a, 1), &batch)
        .await
        .expect_err("refused");
    let ActivityError::Failed {
        failure_type: FailureType::DataError,
        message,
    } = &err
    else {
        panic!("a data error: {err:?}");
    };
    assert!(
        message.contains("id=20005") && message.contains("offset 20005") && message.contains("cap"),
        "{message}"
    );
    assert_eq!(
        count(&pool, "wide").await,
        20_000,
        "nothing of the batch landed"
    );
}
