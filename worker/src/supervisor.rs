//! The supervisor keeps one workflow running for every pipeline on the partitions this
//! worker owns: it starts them on assignment, on a signal for a pipeline it does not
//! run yet, and on a periodic resync; it stops them (at a safe point, releasing
//! ownership) on revocation and shutdown.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store;
use crate::workflow::{self, WorkflowHandle};
use crate::WorkerContext;

#[derive(Debug)]
pub enum SupervisorEvent {
    Assigned(Vec<i32>),
    /// Partitions taken away; the sender is told once their workflows have stopped.
    Revoked(Vec<i32>, Option<std::sync::mpsc::Sender<()>>),
    Signal {
        pipeline_id: String,
        partition: i32,
        /// The W3C trace context of the change the signal announces, if traced.
        trace: Option<String>,
    },
}

/// How long stopping the workflows may take on revocation or shutdown.
const STOP_GRACE: Duration = Duration::from_secs(15);

pub struct Supervisor {
    ctx: Arc<WorkerContext>,
    owned: BTreeSet<i32>,
    workflows: HashMap<String, WorkflowHandle>,
    next_seq: u64,
    exited_tx: mpsc::UnboundedSender<(String, u64)>,
    exited_rx: mpsc::UnboundedReceiver<(String, u64)>,
}

impl Supervisor {
    pub fn new(ctx: Arc<WorkerContext>) -> Self {
        let (exited_tx, exited_rx) = mpsc::unbounded_channel();
        Self {
            ctx,
            owned: BTreeSet::new(),
            workflows: HashMap::new(),
            next_seq: 0,
            exited_tx,
            exited_rx,
        }
    }

    pub async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<SupervisorEvent>,
        shutdown: CancellationToken,
    ) {
        let mut resync = tokio::time::interval(self.ctx.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Biased: a queued revocation is handled before a resync tick could start
            // workflows for the partitions it takes away.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(event) = events.recv() => self.handle(event).await,
                Some((id, seq)) = self.exited_rx.recv() => {
                    if self.workflows.get(&id).is_some_and(|h| h.seq == seq) {
                        self.workflows.remove(&id);
                    }
                }
                _ = resync.tick() => self.resync().await,
            }
        }
        let all: Vec<String> = self.workflows.keys().cloned().collect();
        self.stop_workflows(all).await;
        tracing::info!("all workflows stopped");
    }

    async fn handle(&mut self, event: SupervisorEvent) {
        match event {
            SupervisorEvent::Assigned(partitions) => {
                tracing::info!(?partitions, "partitions assigned");
                crate::metrics::WORKER
                    .rebalances
                    .get_or_create(&vec![("event", "assigned".to_owned())])
                    .inc();
                self.owned.extend(&partitions);
                self.start_missing(&partitions).await;
            }
            SupervisorEvent::Revoked(partitions, done) => {
                tracing::info!(?partitions, "partitions revoked");
                crate::metrics::WORKER
                    .rebalances
                    .get_or_create(&vec![("event", "revoked".to_owned())])
                    .inc();
                for p in &partitions {
                    self.owned.remove(p);
                }
                let ids = self
                    .workflows
                    .iter()
                    .filter(|(_, h)| partitions.contains(&h.partition.load(Ordering::Relaxed)))
                    .map(|(id, _)| id.clone())
                    .collect();
                self.stop_workflows(ids).await;
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            SupervisorEvent::Signal {
                pipeline_id,
                partition,
                trace,
            } => {
                match self.workflows.get(&pipeline_id) {
                    Some(handle) if !handle.task.is_finished() => {
                        if trace.is_some() {
                            *handle.trace.lock().unwrap_or_else(|e| e.into_inner()) = trace;
                        }
                        handle.wake.notify_one()
                    }
                    // Not running (or just exited, e.g. fenced): start it afresh.
                    _ if self.owned.contains(&partition) => {
                        self.start_traced(pipeline_id, partition, trace)
                    }
                    _ => {}
                }
            }
        }
    }

    fn start(&mut self, pipeline_id: String, partition: i32) {
        self.start_traced(pipeline_id, partition, None)
    }

    fn start_traced(&mut self, pipeline_id: String, partition: i32, trace: Option<String>) {
        if let Some(max) = self.ctx.max_pipelines {
            let running = self
                .workflows
                .values()
                .filter(|h| !h.task.is_finished())
                .count();
            if running >= max {
                // Recorded off the supervisor's loop: it must keep serving rebalances.
                let ctx = Arc::clone(&self.ctx);
                let reason = format!(
                    "{} is at capacity ({max} pipelines, --max-pipelines)",
                    ctx.worker_id
                );
                tokio::spawn(async move {
                    if let Err(e) =
                        store::decline(&ctx.pool, &pipeline_id, partition, &reason).await
                    {
                        tracing::warn!(pipeline_id, error = %e, "could not record a declined pipeline");
                    }
                });
                return;
            }
        }
        self.next_seq += 1;
        let handle = workflow::spawn(
            Arc::clone(&self.ctx),
            pipeline_id.clone(),
            partition,
            self.next_seq,
            self.exited_tx.clone(),
        );
        *handle.trace.lock().unwrap_or_else(|e| e.into_inner()) = trace;
        self.workflows.insert(pipeline_id, handle);
    }

    /// Starts a workflow for every stored pipeline on `partitions` that has none.
    async fn start_missing(&mut self, partitions: &[i32]) {
        if let Some(stored) = self.stored(partitions).await {
            self.start_listed(&stored);
        }
    }

    /// The periodic resync, which covers a lost signal for every pipeline at once: one
    /// query lists the pipelines on the owned partitions; a workflow whose row changed
    /// since it last read it (or is gone) is woken, and a pipeline with no workflow
    /// gets one. Workflows keep no timer of their own: an idle pipeline costs nothing
    /// between resyncs.
    async fn resync(&mut self) {
        let partitions: Vec<i32> = self.owned.iter().copied().collect();
        let Some(stored) = self.stored(&partitions).await else {
            return;
        };
        let listed: HashMap<&str, store::RowVersion> =
            stored.iter().map(|(id, v)| (id.as_str(), *v)).collect();
        for (id, handle) in &self.workflows {
            let seen = *handle.seen.lock().unwrap_or_else(|e| e.into_inner());
            match (seen, listed.get(id.as_str())) {
                // Not read yet: its first pass is still to come.
                (None, _) => {}
                (Some(seen), Some(now)) if seen == *now => {}
                _ => handle.wake.notify_one(),
            }
        }
        self.start_listed(&stored);
    }

    /// The pipelines stored on `partitions`, with their row versions; None (logged) if
    /// the store did not answer.
    async fn stored(&self, partitions: &[i32]) -> Option<Vec<(String, store::RowVersion)>> {
        if partitions.is_empty() {
            return None;
        }
        // One attempt: while Postgres is unreachable the supervisor must keep serving
        // revocations; the next resync tries again.
        let stored = tokio::time::timeout(
            self.ctx.attempt_timeout,
            store::pipelines_on_partitions(&self.ctx.pool, partitions),
        )
        .await
        .unwrap_or_else(|_| Err(crate::activity::ActivityError::transient("timed out")));
        match stored {
            Ok(stored) => Some(stored),
            Err(e) => {
                tracing::warn!(error = %e, "could not load owned pipelines");
                None
            }
        }
    }

    fn start_listed(&mut self, stored: &[(String, store::RowVersion)]) {
        for (id, version) in stored {
            let partition = version.partition;
            // The assignment may have changed while the query ran.
            if !self.workflows.contains_key(id)
                && self.owned.contains(&partition)
                && self.ctx.assignment.contains(partition)
            {
                self.start(id.clone(), partition);
            }
        }
    }

    async fn stop_workflows(&mut self, ids: Vec<String>) {
        let handles: Vec<WorkflowHandle> = ids
            .iter()
            .filter_map(|id| self.workflows.remove(id))
            .collect();
        for h in &handles {
            h.stop.cancel();
        }
        let joined = tokio::time::timeout(
            STOP_GRACE,
            futures::future::join_all(handles.into_iter().map(|h| h.task)),
        )
        .await;
        if joined.is_err() {
            tracing::warn!("workflows did not stop within the grace period");
        }
    }
}
