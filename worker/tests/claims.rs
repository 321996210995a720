//! A workflow claims its pipeline only while the worker is assigned the pipeline's
//! signals-topic partition: a revocation queued behind a resync tick (or a start racing
//! a rebalance) must not let a worker take a pipeline from its new owner.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sluice_infra::kafka::KafkaSettings;
use sluice_protocol::retry::RetryPolicy;
use sluice_worker::membership::Assignment;
use sluice_worker::{workflow, WorkerContext};
use sqlx::PgPool;
use tokio::sync::mpsc;

fn context(pool: PgPool, assignment: Arc<Assignment>) -> Arc<WorkerContext> {
    // Nothing listens on port 1: the workflow never gets as far as Kafka here.
    let kafka = KafkaSettings::new("127.0.0.1:1");
    Arc::new(WorkerContext {
        worker_id: "w".into(),
        pool,
        admin: kafka
            .admin()
            .expect("an admin client needs no broker to be made"),
        kafka,
        connectors: sluice_connectors::Context::default(),
        assignment,
        topic_namespace: "sluice-test".into(),
        retry: RetryPolicy::default(),
        attempt_timeout: Duration::from_secs(5),
        resync_interval: Duration::from_secs(60),
        replication_factor: 1,
        max_pipelines: None,
        feeds: sluice_worker::feeds::shared_consumer(&KafkaSettings::new("127.0.0.1:1"), "w", 2048)
            .expect("a consumer needs no broker to be made"),
        setup_slots: Arc::new(tokio::sync::Semaphore::new(1)),
        read_slots: Arc::new(tokio::sync::Semaphore::new(1)),
        read_records: sluice_worker::budget::RecordsBudget::new("read", 32 << 20),
        write_records: sluice_worker::budget::RecordsBudget::new("write", 32 << 20),
        trimmer: Default::default(),
    })
}

async fn owner(pool: &PgPool) -> (Option<String>, i64) {
    sqlx::query_as("SELECT owner, owner_epoch FROM pipelines WHERE id = 'p'")
        .fetch_one(pool)
        .await
        .expect("row")
}

#[sqlx::test(migrations = "../migrations")]
async fn a_workflow_never_claims_a_pipeline_of_a_revoked_partition(pool: PgPool) {
    let spec = json!({"source": {"type": "generator", "config": {"count": 1}},
                      "destination": {"type": "postgres", "config": {"url": "postgres://x/y", "table": "t"}}});
    sqlx::query(
        "INSERT INTO pipelines (id, tenant, name, spec, desired_status, partition) \
         VALUES ('p', 't', 'p', $1, 'PAUSED', 3)",
    )
    .bind(spec)
    .execute(&pool)
    .await
    .expect("insert");

    // Partition 3 was revoked before the workflow got to claim.
    let assignment = Arc::new(Assignment::default());
    assignment.add(&[1, 2]);
    let (exited_tx, mut exited) = mpsc::unbounded_channel();
    let handle = workflow::spawn(
        context(pool.clone(), Arc::clone(&assignment)),
        "p".into(),
        3,
        1,
        exited_tx.clone(),
    );
    tokio::time::timeout(Duration::from_secs(10), exited.recv())
        .await
        .expect("the workflow gives up at once")
        .expect("exit notice");
    let _ = handle.task.await;
    assert_eq!(owner(&pool).await, (None, 0), "nothing was claimed");

    // While the partition is assigned, the same start claims it.
    assignment.add(&[3]);
    let handle = workflow::spawn(
        context(pool.clone(), assignment),
        "p".into(),
        3,
        2,
        exited_tx,
    );
    tokio::time::timeout(Duration::from_secs(10), async {
        while owner(&pool).await.0.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("claimed");
    handle.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), handle.task).await;
}
