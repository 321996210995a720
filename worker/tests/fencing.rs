//! Store code against real PostgreSQL (each test gets its own database from
//! `#[sqlx::test]`, with the migrations applied): owner-epoch fencing of every worker
//! write across claims and incarnations, the transition check of the update-status
//! activity, and the pending-activity report.

use serde_json::json;
use sluice_protocol::status::PipelineStatus;
use sluice_worker::activity::ActivityError;
use sluice_worker::claim::Claim;
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

async fn claim(pool: &PgPool, id: &str, worker: &str) -> Claim {
    store::claim(pool, id, 0, worker)
        .await
        .expect("claim")
        .expect("row")
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
    let old = claim(&pool, "p", "zombie").await;
    let new = claim(&pool, "p", "successor").await;
    assert!(new.epoch > old.epoch);
    assert_eq!(new.incarnation, old.incarnation);

    let err = store::write_status(&pool, &old, "zombie", &write(PipelineStatus::Setup))
        .await
        .expect_err("fenced");
    assert!(matches!(err, ActivityError::Fenced));
    let err = store::save_checkpoint(&pool, &old, &Checkpoint::default())
        .await
        .expect_err("fenced");
    assert!(matches!(err, ActivityError::Fenced));
    assert!(matches!(
        store::load_checkpoint(&pool, &old).await,
        Err(ActivityError::Fenced)
    ));
    // Releasing with a stale epoch does not clear the successor's ownership.
    store::release(&pool, &old)
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

    store::write_status(&pool, &new, "successor", &write(PipelineStatus::Setup))
        .await
        .expect("owner writes");
    assert_eq!(events(&pool, "p").await, ["SETUP"]);
}

/// A pipeline deleted and created again under the same id is a new incarnation whose
/// epochs never repeat an old one's: an owner of the deleted pipeline cannot pass the
/// new one's fences, however many claims either had.
#[sqlx::test(migrations = "../migrations")]
async fn epochs_never_repeat_across_incarnations(pool: PgPool) {
    insert_pipeline(&pool, "p", "ACTIVE").await;
    let first = claim(&pool, "p", "w1").await;
    sqlx::query("DELETE FROM pipelines WHERE id = 'p'")
        .execute(&pool)
        .await
        .expect("delete");
    insert_pipeline(&pool, "p", "ACTIVE").await;
    let second = claim(&pool, "p", "w2").await;
    assert!(second.incarnation > first.incarnation);
    assert!(second.epoch > first.epoch);
    for stale in [
        &first,
        &Claim {
            epoch: 1,
            ..first.clone()
        },
    ] {
        assert!(matches!(
            store::save_checkpoint(&pool, stale, &Checkpoint::default()).await,
            Err(ActivityError::Fenced)
        ));
        assert!(matches!(
            store::check_epoch(&pool, stale).await,
            Err(ActivityError::Fenced)
        ));
    }
    store::check_epoch(&pool, &second).await.expect("owner");
}

#[sqlx::test(migrations = "../migrations")]
async fn illegal_transitions_are_refused_and_same_status_records_no_event(pool: PgPool) {
    insert_pipeline(&pool, "p", "ACTIVE").await;
    let c = claim(&pool, "p", "w").await;
    let err = store::write_status(&pool, &c, "w", &write(PipelineStatus::Ready))
        .await
        .expect_err("None -> READY is illegal");
    assert!(matches!(err, ActivityError::Invariant(_)), "{err:?}");
    for to in [
        PipelineStatus::Setup,
        PipelineStatus::Backfill,
        PipelineStatus::Ready,
    ] {
        store::write_status(&pool, &c, "w", &write(to))
            .await
            .expect("legal");
    }
    // A reconcile re-writing READY (observed generation 2) records no event.
    let again = StatusWrite {
        observed_generation: 2,
        ..write(PipelineStatus::Ready)
    };
    store::write_status(&pool, &c, "w", &again)
        .await
        .expect("same status");
    let err = store::write_status(&pool, &c, "w", &write(PipelineStatus::Backfill))
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
    let c = claim(&pool, "p", "w").await;
    store::write_status(&pool, &c, "w", &write(PipelineStatus::Setup))
        .await
        .expect("setup");
    assert!(
        store::remove_pipeline(&pool, &c, "w", 1, "test")
            .await
            .is_err(),
        "not in TEARDOWN yet"
    );
    store::write_status(&pool, &c, "w", &write(PipelineStatus::Teardown))
        .await
        .expect("teardown");
    store::remove_pipeline(&pool, &c, "w", 1, "test")
        .await
        .expect("removed");
    assert_eq!(events(&pool, "p").await, ["SETUP", "TEARDOWN", "REMOVED"]);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_retrying_activity_is_shown_until_it_recovers(pool: PgPool) {
    insert_pipeline(&pool, "p", "ACTIVE").await;
    let c = claim(&pool, "p", "w").await;
    let pending = sluice_protocol::conversions::PendingActivity {
        name: "setup".into(),
        attempt: 2,
        last_failure: "connection refused".into(),
        failure_type: "transient_error".into(),
        first_failure_ms: 1,
        last_failure_ms: 2,
        next_attempt_ms: 3,
    };
    store::report_pending(&pool, &c, &pending)
        .await
        .expect("report");
    let shown = sluice_infra::store::get_pipeline(&pool, "p")
        .await
        .expect("get")
        .expect("row")
        .pending_activity;
    assert_eq!(shown.as_ref(), Some(&pending));
    // Another activity's recovery leaves it; its own clears it.
    store::clear_pending(&pool, &c, "write-batch")
        .await
        .expect("clear");
    let row = sluice_infra::store::get_pipeline(&pool, "p")
        .await
        .expect("get")
        .expect("row");
    assert!(row.pending_activity.is_some());
    store::clear_pending(&pool, &c, "setup")
        .await
        .expect("clear");
    let row = sluice_infra::store::get_pipeline(&pool, "p")
        .await
        .expect("get")
        .expect("row");
    assert!(row.pending_activity.is_none());
}

#[sqlx::test(migrations = "../migrations")]
async fn a_signal_from_the_partition_a_pipeline_left_does_not_claim_it(pool: PgPool) {
    insert_pipeline(&pool, "p", "ACTIVE").await;
    let first = claim(&pool, "p", "old-owner").await;
    // Moved to partition 3 (signals-topic --move-pipelines).
    sqlx::query("UPDATE pipelines SET partition = 3 WHERE id = 'p'")
        .execute(&pool)
        .await
        .expect("move");
    // A late signal on partition 0 finds nothing to claim ...
    let stale = store::claim(&pool, "p", 0, "old-owner")
        .await
        .expect("claim");
    assert!(stale.is_none());
    // ... and the owner of partition 3 claims it, fencing the first claim.
    let new = store::claim(&pool, "p", 3, "new-owner")
        .await
        .expect("claim")
        .expect("row");
    assert!(new.epoch > first.epoch);
    assert!(matches!(
        store::check_epoch(&pool, &first).await,
        Err(ActivityError::Fenced)
    ));
}
