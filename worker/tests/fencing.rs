//! Store code against real PostgreSQL (each test gets its own database from
//! `#[sqlx::test]`, with the migrations applied): owner-epoch fencing of every worker
//! write, the transition check of the update-status activity, and the destination's
//! newer-than guard.

use serde_json::{json, Value};
use sluice_protocol::catalog::generator_stream;
use sluice_protocol::spec::PostgresDestinationConfig;
use sluice_protocol::status::PipelineStatus;
use sluice_worker::activity::ActivityError;
use sluice_worker::connectors::postgres::{self as pg, BatchTarget, PendingRecord};
use sluice_worker::store::{self, Checkpoint, StatusWrite};
use sqlx::PgPool;

async fn insert_pipeline(pool: &PgPool, id: &str, desired: &str) {
    let spec = json!({"source": {"type": "generator", "config": {"count": 1}},
                      "destination": {"type": "postgres", "config": {"url": "postgres://x/y", "table": "t"}}});
    sqlx::query(
        "INSERT INTO pipelines (id, tenant, name, spec, desired_status, partition) \
         VALUES ($1, 't', $1, $2, $3, 0)",
    )
    .bind(id)
    .bind(spec)
    .bind(desired)
    .execute(pool)
    .await
    .expect("insert pipeline");
}

fn write(to: PipelineStatus) -> StatusWrite<'static> {
    StatusWrite {
        to,
        observed_generation: 1,
        last_error: None,
        reason: "test",
    }
}

async fn events(pool: &PgPool, id: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT to_status FROM pipeline_events WHERE pipeline_id = $1 ORDER BY id")
        .bind(id)
        .fetch_all(pool)
        .await
        .expect("events")
}

#[sqlx::test(migrations = "../migrations")]
async fn a_zombie_cannot_write_after_a_newer_claim(pool: PgPool) {
    insert_pipeline(&pool, "p", "ACTIVE").await;
    let old = store::claim(&pool, "p", "zombie")
        .await
        .expect("claim")
        .expect("row");
    let new = store::claim(&pool, "p", "successor")
        .await
        .expect("claim")
        .expect("row");
    assert!(new > old);

    let err = store::write_status(&pool, "p", old, "zombie", &write(PipelineStatus::Setup))
        .await
        .expect_err("fenced");
    assert!(matches!(err, ActivityError::Fenced));
    let err = store::save_checkpoint(&pool, "p", old, &Checkpoint::default())
        .await
        .expect_err("fenced");
    assert!(matches!(err, ActivityError::Fenced));
    // Releasing with a stale epoch does not clear the successor's ownership.
    store::release(&pool, "p", old)
        .await
        .expect("release is a no-op");
    let owner: Option<String> = sqlx::query_scalar("SELECT owner FROM pipelines WHERE id = 'p'")
        .fetch_one(&pool)
        .await
        .expect("owner");
    assert_eq!(owner.as_deref(), Some("successor"));
    assert!(
        events(&pool, "p").await.is_empty(),
        "a fenced write records nothing"
    );

    store::write_status(&pool, "p", new, "successor", &write(PipelineStatus::Setup))
        .await
        .expect("owner writes");
    assert_eq!(events(&pool, "p").await, ["SETUP"]);
}

#[sqlx::test(migrations = "../migrations")]
async fn illegal_transitions_are_refused_and_same_status_records_no_event(pool: PgPool) {
    insert_pipeline(&pool, "p", "ACTIVE").await;
    let epoch = store::claim(&pool, "p", "w")
        .await
        .expect("claim")
        .expect("row");
    let err = store::write_status(&pool, "p", epoch, "w", &write(PipelineStatus::Ready))
        .await
        .expect_err("None -> READY is illegal");
    assert!(matches!(err, ActivityError::Invariant(_)), "{err:?}");
    for to in [
        PipelineStatus::Setup,
        PipelineStatus::Backfill,
        PipelineStatus::Ready,
    ] {
        store::write_status(&pool, "p", epoch, "w", &write(to))
            .await
            .expect("legal");
    }
    // A reconcile re-writing READY (observed generation 2) records no event.
    let again = StatusWrite {
        observed_generation: 2,
        ..write(PipelineStatus::Ready)
    };
    store::write_status(&pool, "p", epoch, "w", &again)
        .await
        .expect("same status");
    let err = store::write_status(&pool, "p", epoch, "w", &write(PipelineStatus::Backfill))
        .await
        .expect_err("READY -> BACKFILL would flap");
    assert!(matches!(err, ActivityError::Invariant(_)), "{err:?}");
    assert_eq!(events(&pool, "p").await, ["SETUP", "BACKFILL", "READY"]);
    let observed: i64 =
        sqlx::query_scalar("SELECT observed_generation FROM pipelines WHERE id = 'p'")
            .fetch_one(&pool)
            .await
            .expect("observed");
    assert_eq!(observed, 2);
}

#[sqlx::test(migrations = "../migrations")]
async fn the_row_is_removed_only_after_teardown(pool: PgPool) {
    insert_pipeline(&pool, "p", "DELETED").await;
    let epoch = store::claim(&pool, "p", "w")
        .await
        .expect("claim")
        .expect("row");
    store::write_status(&pool, "p", epoch, "w", &write(PipelineStatus::Setup))
        .await
        .expect("setup");
    assert!(
        store::remove_pipeline(&pool, "p", epoch, "w", 1, "test")
            .await
            .is_err(),
        "not in TEARDOWN yet"
    );
    store::write_status(&pool, "p", epoch, "w", &write(PipelineStatus::Teardown))
        .await
        .expect("teardown");
    store::remove_pipeline(&pool, "p", epoch, "w", 1, "test")
        .await
        .expect("removed");
    assert_eq!(events(&pool, "p").await, ["SETUP", "TEARDOWN", "REMOVED"]);
}

fn destination() -> PostgresDestinationConfig {
    PostgresDestinationConfig {
        url: String::new(),
        schema: "public".into(),
        table: "dest".into(),
        drop_table_on_delete: false,
        batch_size: 500,
    }
}

fn record(offset: i64, id: i64, amount: i64) -> PendingRecord {
    let Value::Object(data) =
        json!({"id": id, "name": format!("n{id}"), "amount": amount, "score": 1.5, "active": true})
    else {
        unreachable!("a JSON object literal")
    };
    PendingRecord { offset, data }
}

async fn amount_of(pool: &PgPool, id: i64) -> i64 {
    sqlx::query_scalar("SELECT amount FROM public.dest WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("row")
}

#[sqlx::test(migrations = "../migrations")]
async fn destination_batches_are_fenced_and_never_go_back_in_time(pool: PgPool) {
    let config = destination();
    let stream = generator_stream();
    pg::setup(&pool, &config, &stream).await.expect("setup");
    pg::setup(&pool, &config, &stream)
        .await
        .expect("setup is idempotent");
    let born = std::time::SystemTime::now();
    let target = |epoch| BatchTarget {
        pipeline_id: "p",
        topic: "records",
        partition: 0,
        epoch,
        incarnation: born,
    };

    // Duplicates inside one batch keep the newest version.
    let next = pg::write_batch(
        &pool,
        &config,
        &stream,
        &target(2),
        &[record(10, 1, 100), record(11, 1, 111)],
    )
    .await
    .expect("write");
    assert_eq!(next, 12);
    assert_eq!(amount_of(&pool, 1).await, 111);
    assert_eq!(
        pg::committed_offset(&pool, &config, &target(2))
            .await
            .expect("offset"),
        Some(12)
    );

    // An older version of a row (lower offset) never overwrites a newer one; a batch
    // that would move the committed offset back is refused as a stale writer's.
    let err = pg::write_batch(&pool, &config, &stream, &target(2), &[record(5, 1, 5)])
        .await
        .expect_err("offsets never go back");
    assert!(matches!(err, ActivityError::Invariant(_)), "{err:?}");
    assert_eq!(amount_of(&pool, 1).await, 111);
    pg::write_batch(&pool, &config, &stream, &target(2), &[record(12, 2, 22)])
        .await
        .expect("next batch");

    // A new owner (epoch 3) fences the offsets before its first batch: the previous
    // owner (epoch 2) can no longer commit, even though it wrote the last batch.
    let start = pg::fence_offsets(&pool, &config, &target(3))
        .await
        .expect("fence");
    assert_eq!(start, Some(13));
    let err = pg::write_batch(
        &pool,
        &config,
        &stream,
        &target(2),
        &[record(13, 1, 999), record(14, 3, 3)],
    )
    .await
    .expect_err("fenced");
    assert!(matches!(err, ActivityError::Fenced));
    assert_eq!(amount_of(&pool, 1).await, 111);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM public.dest")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, 2, "the fenced batch rolled back entirely");
    assert!(matches!(
        pg::fence_offsets(&pool, &config, &target(2)).await,
        Err(ActivityError::Fenced)
    ));
    pg::write_batch(&pool, &config, &stream, &target(3), &[record(13, 1, 131)])
        .await
        .expect("the new owner writes");
    assert_eq!(amount_of(&pool, 1).await, 131);

    pg::teardown(&pool, &config, "p").await.expect("teardown");

    assert_eq!(
        pg::committed_offset(&pool, &config, &target(2))
            .await
            .expect("offset"),
        None
    );
    let kept: bool = sqlx::query_scalar("SELECT to_regclass('public.dest') IS NOT NULL")
        .fetch_one(&pool)
        .await
        .expect("regclass");
    assert!(kept, "the table is kept unless drop_table_on_delete");

    // The pipeline is created again over the kept table: its topic offsets restart at
    // zero, yet its rows replace the old incarnation's.
    let reborn = BatchTarget {
        incarnation: born + std::time::Duration::from_secs(1),
        ..target(1)
    };
    pg::fence_offsets(&pool, &config, &reborn)
        .await
        .expect("fence");
    pg::write_batch(&pool, &config, &stream, &reborn, &[record(0, 1, 7)])
        .await
        .expect("new incarnation writes");
    assert_eq!(amount_of(&pool, 1).await, 7);

    // An offsets row left by an older incarnation (its destination cleanup failed) is
    // taken over and restarted, whatever epoch it carries.
    let stale = BatchTarget {
        epoch: 50,
        ..target(1)
    };
    pg::fence_offsets(&pool, &config, &stale)
        .await
        .expect_err("older incarnation, fenced");
    sqlx::query("UPDATE public._sluice_offsets SET owner_epoch = 50, next_offset = 900")
        .execute(&pool)
        .await
        .expect("simulate leftovers");
    let third = BatchTarget {
        incarnation: born + std::time::Duration::from_secs(2),
        ..target(1)
    };
    assert_eq!(
        pg::fence_offsets(&pool, &config, &third)
            .await
            .expect("taken over"),
        None
    );
    pg::write_batch(&pool, &config, &stream, &third, &[record(0, 2, 8)])
        .await
        .expect("third incarnation writes from offset 0");
    assert_eq!(amount_of(&pool, 2).await, 8);
}
