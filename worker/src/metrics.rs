//! The worker's Prometheus metrics (served with `--metrics-listen`). Per-pipeline series
//! carry a `pipeline` label (the pipeline's key, `tenant.name`) and exist while this
//! worker owns the pipeline.

use std::sync::{Arc, LazyLock, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sluice_infra::metrics::{duration_buckets, latency_buckets, Labels};

#[derive(Clone)]
pub struct Buckets(fn() -> Vec<f64>);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new((self.0)())
    }
}

pub struct WorkerMetrics {
    pub registry: Arc<Registry>,
    pub pipelines_owned: Gauge,
    pub rebalances: Family<Labels, Counter>,
    pub pipeline_status: Family<Labels, Gauge>,
    pub records_read: Family<Labels, Counter>,
    pub records_written: Family<Labels, Counter>,
    pub produced_offset: Family<Labels, Gauge>,
    pub committed_offset: Family<Labels, Gauge>,
    pub lag: Family<Labels, Gauge>,
    pub activity_attempts: Family<Labels, Counter>,
    pub activity_seconds: Family<Labels, Histogram, Buckets>,
    pub runs: Family<Labels, Counter>,
    pub run_seconds: Family<Labels, Histogram, Buckets>,
    pub change_applied_seconds: Family<Labels, Histogram, Buckets>,
    pub records_reserved_bytes: Family<Labels, Gauge>,
    pub records_budget_bytes: Family<Labels, Gauge>,
    /// Serializes lag updates, which read two gauges written by different lanes.
    lag_lock: Mutex<()>,
}

pub static WORKER: LazyLock<WorkerMetrics> = LazyLock::new(WorkerMetrics::new);

fn latency() -> Vec<f64> {
    latency_buckets().collect()
}

fn durations() -> Vec<f64> {
    duration_buckets().collect()
}

impl WorkerMetrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            registry: Arc::new(Registry::default()),
            pipelines_owned: Gauge::default(),
            rebalances: Family::default(),
            pipeline_status: Family::default(),
            records_read: Family::default(),
            records_written: Family::default(),
            produced_offset: Family::default(),
            committed_offset: Family::default(),
            lag: Family::default(),
            activity_attempts: Family::default(),
            activity_seconds: Family::new_with_constructor(Buckets(latency)),
            runs: Family::default(),
            run_seconds: Family::new_with_constructor(Buckets(durations)),
            change_applied_seconds: Family::new_with_constructor(Buckets(latency)),
            records_reserved_bytes: Family::default(),
            records_budget_bytes: Family::default(),
            lag_lock: Mutex::new(()),
        };
        registry.register(
            "sluice_worker_pipelines_owned",
            "Pipelines this worker holds a claim on",
            m.pipelines_owned.clone(),
        );
        registry.register(
            "sluice_worker_rebalances",
            "Signals-topic partition changes of this worker (event: assigned, revoked)",
            m.rebalances.clone(),
        );
        registry.register(
            "sluice_pipeline_status",
            "1 for the status the owning worker last persisted",
            m.pipeline_status.clone(),
        );
        registry.register(
            "sluice_pipeline_records_read",
            "Records read from the source or pushed inputs, produced to the records topic",
            m.records_read.clone(),
        );
        registry.register(
            "sluice_pipeline_records_written",
            "Records committed at the destination (replays it dropped not counted)",
            m.records_written.clone(),
        );
        registry.register(
            "sluice_pipeline_produced_offset",
            "Records-topic offset just past the last committed produce",
            m.produced_offset.clone(),
        );
        registry.register(
            "sluice_pipeline_committed_offset",
            "Records-topic offset the destination has committed up to",
            m.committed_offset.clone(),
        );
        registry.register(
            "sluice_pipeline_lag_records",
            "Produced offset minus committed offset: records waiting for the destination",
            m.lag.clone(),
        );
        registry.register(
            "sluice_activity_attempts",
            "Activity attempts by activity and outcome (ok, or the failure class)",
            m.activity_attempts.clone(),
        );
        registry.register(
            "sluice_activity_attempt_seconds",
            "Duration of one activity attempt",
            m.activity_seconds.clone(),
        );
        registry.register(
            "sluice_runs",
            "Runs ended, by trigger and outcome",
            m.runs.clone(),
        );
        registry.register(
            "sluice_run_seconds",
            "Duration of ended runs, by trigger and outcome",
            m.run_seconds.clone(),
        );
        registry.register(
            "sluice_change_applied_seconds",
            "From a change's commit in the control plane (create, update, reset) to the first \
             status this worker persisted for it, by that status: outbox relay, Kafka, the \
             worker's stop or start work; on the database's clock",
            m.change_applied_seconds.clone(),
        );
        registry.register(
            "sluice_worker_records_reserved_bytes",
            "Records in flight as reserved from the worker's budget, by lanes (read: source \
             slices until produced; write: batches until written), in estimated bytes",
            m.records_reserved_bytes.clone(),
        );
        registry.register(
            "sluice_worker_records_budget_bytes",
            "The worker's budget for records in flight (--records-memory-mb), half for the \
             read lanes and half for the write lanes",
            m.records_budget_bytes.clone(),
        );
        Self {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// The reserved bytes of the read or write lanes' records budget changed.
    pub fn records_reserved(&self, lanes: &'static str, bytes: u64) {
        self.records_reserved_bytes
            .get_or_create(&vec![("lanes", lanes.to_owned())])
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The read or write lanes' records budget.
    pub fn records_budget(&self, lanes: &'static str, bytes: u64) {
        self.records_budget_bytes
            .get_or_create(&vec![("lanes", lanes.to_owned())])
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The destination committed up to `offset`.
    pub fn committed(&self, pipeline: &str, offset: i64) {
        let labels = pipeline_labels(pipeline);
        let _guard = self.lag_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.committed_offset.get_or_create(&labels).set(offset);
        let produced = self.produced_offset.get_or_create(&labels);
        if produced.get() < offset {
            produced.set(offset);
        }
        self.lag
            .get_or_create(&labels)
            .set((produced.get() - offset).max(0));
    }

    /// A produce of `records` records committed, ending just before `end`.
    pub fn produced(&self, pipeline: &str, records: u64, end: i64) {
        let labels = pipeline_labels(pipeline);
        self.records_read.get_or_create(&labels).inc_by(records);
        let _guard = self.lag_lock.lock().unwrap_or_else(|e| e.into_inner());
        let produced = self.produced_offset.get_or_create(&labels);
        if produced.get() < end {
            produced.set(end);
        }
        let committed = self.committed_offset.get_or_create(&labels).get();
        self.lag
            .get_or_create(&labels)
            .set((produced.get() - committed).max(0));
    }

    pub fn written(&self, pipeline: &str, records: u64) {
        self.records_written
            .get_or_create(&pipeline_labels(pipeline))
            .inc_by(records);
    }

    pub fn status(&self, pipeline: &str, status: &str) {
        for other in sluice_protocol::status::PipelineStatus::ALL {
            if other.as_str() != status {
                self.pipeline_status
                    .remove(&status_labels(pipeline, other.as_str()));
            }
        }
        self.pipeline_status
            .get_or_create(&status_labels(pipeline, status))
            .set(1);
    }

    pub fn attempt(&self, activity: &str, outcome: &str, seconds: f64) {
        let labels = vec![
            ("activity", activity.to_owned()),
            ("outcome", outcome.to_owned()),
        ];
        self.activity_attempts.get_or_create(&labels).inc();
        self.activity_seconds
            .get_or_create(&labels)
            .observe(seconds);
    }

    /// A status persisted for the current generation, `seconds` after the change.
    pub fn change_applied(&self, status: &str, seconds: f64) {
        self.change_applied_seconds
            .get_or_create(&vec![("status", status.to_owned())])
            .observe(seconds.max(0.0));
    }

    pub fn run_ended(&self, trigger: &str, outcome: &str, seconds: f64) {
        let labels = vec![
            ("trigger", trigger.to_owned()),
            ("outcome", outcome.to_owned()),
        ];
        self.runs.get_or_create(&labels).inc();
        self.run_seconds.get_or_create(&labels).observe(seconds);
    }

    /// Forgets every series of `pipeline` (this worker no longer owns it).
    fn forget(&self, pipeline: &str) {
        let labels = pipeline_labels(pipeline);
        for family in [&self.records_read, &self.records_written] {
            family.remove(&labels);
        }
        let _guard = self.lag_lock.lock().unwrap_or_else(|e| e.into_inner());
        for family in [&self.produced_offset, &self.committed_offset, &self.lag] {
            family.remove(&labels);
        }
        for status in sluice_protocol::status::PipelineStatus::ALL {
            self.pipeline_status
                .remove(&status_labels(pipeline, status.as_str()));
        }
    }
}

fn pipeline_labels(pipeline: &str) -> Labels {
    vec![("pipeline", pipeline.to_owned())]
}

fn status_labels(pipeline: &str, status: &str) -> Labels {
    vec![
        ("pipeline", pipeline.to_owned()),
        ("status", status.to_owned()),
    ]
}

/// Held while this worker owns a pipeline: counts it as owned, and forgets its series
/// when dropped.
pub struct Owned {
    pipeline: String,
}

impl Owned {
    pub fn new(pipeline: &str) -> Self {
        WORKER.pipelines_owned.inc();
        Self {
            pipeline: pipeline.to_owned(),
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        WORKER.pipelines_owned.dec();
        WORKER.forget(&self.pipeline);
    }
}
