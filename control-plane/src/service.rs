//! The `sluice.v1.PipelineService` implementation. Handlers convert requests to domain
//! types (reporting the offending field), apply the desired-status rules and write
//! through the store; every change wakes the outbox relay.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use prost::Message;
use sluice_connectors::registry;
use sluice_infra::store::list_events;
use sluice_protocol::conversions::{
    desired_status_from_pb, patch_from_pb, record_to_pb, spec_from_pb, status_from_pb,
    PipelineRecord,
};
use sluice_protocol::hosts::HostPolicy;
use sluice_protocol::ids::{generate_pipeline_id, validate_pipeline_id, validate_tenant};
use sluice_protocol::mask::{apply_patch, parse_mask};
use sluice_protocol::partition::partition_for;
use sluice_protocol::pb;
use sluice_protocol::pb::pipeline_service_server::PipelineService;
use sluice_protocol::spec::PipelineSpec;
use sluice_protocol::status::{DesiredStatus, PipelineStatus};
use sluice_protocol::FieldViolation;
use sqlx::PgPool;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use sluice_infra::secrets::stored_spec_json;
use sluice_protocol::secrets::restore_redacted;

use crate::auth::{authenticate, Access, Caller, PipelineRef};
use crate::error::ApiError;
use crate::store;

pub const DEFAULT_PAGE_SIZE: i32 = 50;
pub const MAX_PAGE_SIZE: i32 = 1000;
/// Events per ListPipelineEvents page, by default and at most.
pub const MAX_EVENTS_PAGE_SIZE: i32 = 1000;

/// Configurable limits (AIP-193: reaching one is RESOURCE_EXHAUSTED naming it).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_pipelines_per_tenant: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pipelines_per_tenant: 1000,
        }
    }
}

pub struct PipelineApi {
    pool: PgPool,
    watches: WatchSignals,
    signal_partitions: u32,
    /// Wakes the outbox relay after a committed change.
    outbox_wakeup: Arc<Notify>,
    limits: Limits,
    destination_hosts: HostPolicy,
    inputs: Inputs,
    /// Tokens recently found valid.
    tokens: Arc<crate::auth::TokenCache>,
}

/// What WatchPipelines streams listen to.
pub struct WatchSignals {
    /// Counts the change notifications of the pipelines table.
    pub changes: tokio::sync::watch::Receiver<u64>,
    /// Turns true when the server begins to shut down.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

/// Where pushed inputs are kept: each pipeline incarnation's inputs topic, made on
/// first use.
pub struct Inputs {
    pub producer: rdkafka::producer::FutureProducer,
    pub admin: sluice_infra::kafka::Admin,
    pub namespace: String,
    pub replication_factor: i32,
    /// Topics known to exist (a push does not ask Kafka's metadata every time).
    pub ready: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Inputs {
    /// Stores `input` in the incarnation's inputs topic and returns its offset once
    /// Kafka has acknowledged it. The first input of an incarnation makes the topic and
    /// then tells the owner (through the outbox) to start reading it.
    async fn store(
        &self,
        pool: &PgPool,
        outbox_wakeup: &Notify,
        record: &PipelineRecord,
        input: serde_json::Value,
    ) -> Result<i64, ApiError> {
        let topic =
            sluice_protocol::topics::inputs_topic(&self.namespace, &record.id, record.incarnation);
        let known = self
            .ready
            .lock()
            .expect("topic set lock is never poisoned")
            .contains(&topic);
        if !known {
            // Inputs are kept until the pipeline is deleted, like its records: a long
            // pause must not let unapplied inputs expire.
            self.admin
                .ensure_topic(
                    &topic,
                    1,
                    self.replication_factor,
                    &[("retention.ms", "-1")],
                )
                .await
                .map_err(|e| ApiError::KafkaUnavailable(e.to_string()))?;
            if !record.inputs_open && store::open_inputs(pool, record).await? {
                outbox_wakeup.notify_one();
            }
            self.ready
                .lock()
                .expect("topic set lock is never poisoned")
                .insert(topic.clone());
        }
        let payload = sluice_protocol::message::ConnectorMessage::SourceInput {
            source_input: input,
        }
        .to_bytes();
        let delivery = self
            .producer
            .send(
                rdkafka::producer::FutureRecord::to(&topic)
                    .partition(0)
                    .key(&record.id)
                    .payload(&payload),
                rdkafka::util::Timeout::After(std::time::Duration::from_secs(10)),
            )
            .await
            .map_err(|(e, _)| ApiError::KafkaUnavailable(e.to_string()))?;
        Ok(delivery.offset)
    }
}

impl PipelineApi {
    pub fn new(
        pool: PgPool,
        signal_partitions: u32,
        outbox_wakeup: Arc<Notify>,
        limits: Limits,
        destination_hosts: HostPolicy,
        inputs: Inputs,
        watches: WatchSignals,
    ) -> Self {
        Self {
            pool,
            tokens: Arc::new(crate::auth::TokenCache::new(std::time::Duration::ZERO)),
            watches,
            signal_partitions,
            outbox_wakeup,
            limits,
            destination_hosts,
            inputs,
        }
    }

    /// Authenticates with `tokens` (the default looks every call's token up).
    pub fn with_token_cache(mut self, tokens: Arc<crate::auth::TokenCache>) -> Self {
        self.tokens = tokens;
        self
    }

    /// The pipeline, locked, unless it is deleted.
    async fn lock_live(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        target: &PipelineRef,
        raw_id: &str,
    ) -> Result<PipelineRecord, ApiError> {
        let current = store::lock_pipeline(tx, target)
            .await?
            .ok_or_else(|| ApiError::NotFound(raw_id.to_owned()))?;
        if current.desired_status == DesiredStatus::Deleted {
            return Err(ApiError::Deleted(raw_id.to_owned()));
        }
        Ok(current)
    }

    async fn trigger_sync(
        &self,
        caller: &Caller,
        req: pb::TriggerSyncRequest,
    ) -> Result<pb::Pipeline, ApiError> {
        let target = caller.resolve(&req.pipeline_id, "pipeline_id")?;
        let request_id = parse_request_id(&req.request_id)?;
        let request_hash = request_digest(&req);
        let mut tx = self.pool.begin().await?;
        if let Some(rid) = request_id {
            let request_target = format!("{}/{}", target.tenant, target.name);
            if let Some(replayed) = replay(
                &mut tx,
                &caller.tenant,
                rid,
                ("TriggerSync", &request_target, &request_hash),
            )
            .await?
            {
                return Ok(replayed);
            }
        }
        let current = self.lock_live(&mut tx, &target, &req.pipeline_id).await?;
        store::request_sync(&mut tx, &current).await?;
        let response = record_to_pb(&current, registry());
        if let Some(rid) = request_id {
            store::save_response(&mut tx, &caller.tenant, rid, response.encode_to_vec()).await?;
        }
        tx.commit().await?;
        self.outbox_wakeup.notify_one();
        tracing::info!(tenant = %current.tenant, pipeline = %current.name, token = %caller.token_id, "sync requested");
        Ok(response)
    }

    async fn list_runs(
        &self,
        caller: &Caller,
        req: pb::ListRunsRequest,
    ) -> Result<pb::ListRunsResponse, ApiError> {
        let target = caller.resolve(&req.pipeline_id, "pipeline_id")?;
        let page_size = match req.page_size {
            n if n < 0 => {
                return Err(FieldViolation::new("page_size", "must not be negative").into())
            }
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let before = if req.page_token.is_empty() {
            None
        } else {
            let invalid =
                || FieldViolation::new("page_token", "is not a token returned by ListRuns");
            let bytes = URL_SAFE_NO_PAD
                .decode(&req.page_token)
                .map_err(|_| invalid())?;
            let text = String::from_utf8(bytes).map_err(|_| invalid())?;
            Some(text.parse::<i64>().map_err(|_| invalid())?)
        };
        let record = store::fetch_pipeline(&self.pool, &target)
            .await?
            .ok_or_else(|| ApiError::NotFound(req.pipeline_id.clone()))?;
        let mut runs = store::list_runs(
            &self.pool,
            &record.id,
            record.incarnation,
            before,
            i64::from(page_size) + 1,
        )
        .await?;
        let next_page_token = if runs.len() > page_size as usize {
            runs.truncate(page_size as usize);
            runs.last()
                .map(|r| URL_SAFE_NO_PAD.encode(r.number.to_string()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let timestamp = |t: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: t.timestamp_subsec_nanos() as i32,
        };
        Ok(pb::ListRunsResponse {
            runs: runs
                .into_iter()
                .map(|r| pb::Run {
                    number: r.number,
                    trigger: r.trigger,
                    start_time: Some(timestamp(r.start_time)),
                    end_time: r.end_time.map(timestamp),
                    records_read: r.records_read,
                    records_written: r.records_written,
                    outcome: r.outcome,
                    error: r.error.unwrap_or_default(),
                })
                .collect(),
            next_page_token,
        })
    }

    async fn push_source_input(
        &self,
        caller: &Caller,
        req: pb::PushSourceInputRequest,
    ) -> Result<pb::PushSourceInputResponse, ApiError> {
        let target = caller.resolve(&req.pipeline_id, "pipeline_id")?;
        let input = req
            .input
            .as_ref()
            .map(sluice_protocol::conversions::value_to_json)
            .filter(|v| !v.is_null())
            .ok_or_else(|| FieldViolation::new("input", "is required"))?;
        let record = store::fetch_pipeline(&self.pool, &target)
            .await?
            .ok_or_else(|| ApiError::NotFound(req.pipeline_id.clone()))?;
        if record.desired_status == DesiredStatus::Deleted {
            return Err(ApiError::Deleted(req.pipeline_id));
        }
        // The source says whether it can take the input, before anything is stored.
        let spec = registry().validate(&record.spec, "pipeline.spec")?;
        // An input that stands for no record (a webhook's event about an object no
        // stream holds) is stored all the same: the relay need not know what matters.
        spec.source
            .input_records(&input)
            .map_err(|why| FieldViolation::new("input", why))?;
        let sequence = self
            .inputs
            .store(&self.pool, &self.outbox_wakeup, &record, input)
            .await?;
        tracing::debug!(tenant = %record.tenant, pipeline = %record.name, sequence, "input stored");
        Ok(pb::PushSourceInputResponse { sequence })
    }

    async fn reset(
        &self,
        caller: &Caller,
        req: pb::ResetPipelineRequest,
    ) -> Result<pb::Pipeline, ApiError> {
        let target = caller.resolve(&req.pipeline_id, "pipeline_id")?;
        if req.streams.iter().any(String::is_empty) {
            return Err(FieldViolation::new("streams", "names must not be empty").into());
        }
        let mut tx = self.pool.begin().await?;
        let current = self.lock_live(&mut tx, &target, &req.pipeline_id).await?;
        check_etag(&current, &req.pipeline_id, &req.etag)?;
        if current.desired_status != DesiredStatus::Paused {
            return Err(ApiError::Precondition {
                reason: "PIPELINE_NOT_PAUSED",
                why: format!(
                    "pipeline {:?} is not paused: pause it first (a reset takes effect on the next resume)",
                    req.pipeline_id
                ),
            });
        }
        if !req.streams.is_empty() {
            // Names the worker would not find are refused here, not ignored there.
            let read = store::catalog_streams(&mut tx, &current.id).await?;
            if let Some(unknown) = req.streams.iter().find(|s| !read.contains(s)) {
                let why = if read.is_empty() {
                    format!("{unknown:?}: the pipeline has not discovered its streams yet; reset all of them (name none)")
                } else {
                    format!(
                        "{unknown:?} is not a stream this pipeline reads (it reads: {})",
                        read.join(", ")
                    )
                };
                return Err(FieldViolation::new("streams", &why).into());
            }
        }
        let streams = (!req.streams.is_empty()).then_some(req.streams.as_slice());
        let record = store::request_reset(&mut tx, &current.id, streams).await?;
        tx.commit().await?;
        self.outbox_wakeup.notify_one();
        tracing::info!(tenant = %record.tenant, pipeline = %record.name, token = %caller.token_id, streams = ?req.streams, "reset requested");
        Ok(record_to_pb(&record, registry()))
    }

    fn connectors(&self) -> pb::ListConnectorsResponse {
        let as_struct = |v: serde_json::Value| match v {
            serde_json::Value::Object(map) => {
                Some(sluice_protocol::conversions::json_to_struct(&map))
            }
            _ => None,
        };
        let mut connectors = Vec::new();
        for k in registry().sources() {
            connectors.push(pb::Connector {
                side: "source".into(),
                r#type: k.name().into(),
                summary: k.summary().into(),
                config_schema: as_struct(k.config_schema()),
                secret_fields: k.secret_fields().iter().map(|f| f.key.to_owned()).collect(),
            });
        }
        for k in registry().destinations() {
            connectors.push(pb::Connector {
                side: "destination".into(),
                r#type: k.name().into(),
                summary: k.summary().into(),
                config_schema: as_struct(k.config_schema()),
                secret_fields: k.secret_fields().iter().map(|f| f.key.to_owned()).collect(),
            });
        }
        pb::ListConnectorsResponse { connectors }
    }

    /// Validates a whole spec as stored, through the connectors' registry (the same
    /// one workers build connectors with), then the hosts each side connects to
    /// against the deployment's host lists (by name and IP literal; workers check
    /// resolved addresses too when they connect).
    fn validate(&self, spec: &PipelineSpec) -> Result<(), FieldViolation> {
        let valid = registry().validate(spec, "pipeline.spec")?;
        for (side, hosts) in [
            ("source", valid.source.hosts()),
            ("destination", valid.destination.hosts()),
        ] {
            for host in hosts {
                self.destination_hosts.check(&host, &[]).map_err(|why| {
                    FieldViolation::new(format!("pipeline.spec.{side}.config.url"), why)
                })?;
            }
        }
        Ok(())
    }

    /// Authenticates the call and checks that the caller's role may do `access`.
    async fn caller<T>(
        &self,
        request: &Request<T>,
        method: &'static str,
        access: Access,
    ) -> Result<Caller, ApiError> {
        let caller = authenticate(&self.pool, &self.tokens, request.metadata(), method).await?;
        caller.authorize(access, method)?;
        Ok(caller)
    }

    async fn create(
        &self,
        caller: &Caller,
        req: pb::CreatePipelineRequest,
    ) -> Result<pb::Pipeline, ApiError> {
        let request_hash = request_digest(&req);
        let pipeline = req
            .pipeline
            .ok_or_else(|| FieldViolation::new("pipeline", "is required"))?;
        let target = if req.pipeline_id.is_empty() {
            PipelineRef {
                tenant: caller.tenant.clone(),
                name: generate_pipeline_id(&uuid::Uuid::now_v7().to_string()),
            }
        } else {
            match caller.resolve(&req.pipeline_id, "pipeline_id") {
                Err(ApiError::NotFound(_)) => Err(ApiError::PermissionDenied {
                    method: "CreatePipeline",
                    role: caller.role,
                    why: "only admins create pipelines in another tenant",
                }),
                other => other,
            }?
        };
        let spec = spec_from_pb(pipeline.spec.as_ref(), "pipeline.spec")?;
        self.validate(&spec)?;
        let desired =
            match desired_status_from_pb(pipeline.desired_status, "pipeline.desired_status")? {
                None => DesiredStatus::Active,
                Some(DesiredStatus::Deleted) => {
                    return Err(FieldViolation::new(
                        "pipeline.desired_status",
                        "a pipeline is created ACTIVE or PAUSED",
                    )
                    .into())
                }
                Some(d) => d,
            };
        let request_id = parse_request_id(&req.request_id)?;
        let stored_spec = stored_spec_json(&spec, registry(), &target.key())?;
        let new = store::NewPipeline {
            pipeline: &target,
            spec: &stored_spec,
            desired_status: desired,
            partition: partition_for(&target.key(), self.signal_partitions),
        };
        let mut tx = self.pool.begin().await?;
        let request_target = format!("{}/{}", caller.tenant, req.pipeline_id);
        // A dry run is never remembered, so it never replays an earlier answer either.
        let request_id = request_id.filter(|_| !req.validate_only);
        if let Some(rid) = request_id {
            if let Some(replayed) = replay(
                &mut tx,
                &caller.tenant,
                rid,
                ("CreatePipeline", &request_target, &request_hash),
            )
            .await?
            {
                return Ok(replayed);
            }
        }
        let existing = store::lock_tenant_and_count(&mut tx, &target.tenant).await?;
        if existing >= self.limits.max_pipelines_per_tenant as i64 {
            return Err(ApiError::LimitExceeded {
                limit: "max-pipelines-per-tenant",
                max: self.limits.max_pipelines_per_tenant,
                what: format!("tenant {:?} has {existing} pipelines", target.tenant),
            });
        }
        let record = store::insert_pipeline(&mut tx, &new)
            .await?
            .ok_or_else(|| ApiError::AlreadyExists(display_id(caller, &target)))?;
        if req.validate_only {
            // Everything was checked by doing it; undoing it stores and signals nothing.
            tx.rollback().await?;
            return Ok(record_to_pb(&record, registry()));
        }
        if let Some(rid) = request_id {
            store::save_response(
                &mut tx,
                &caller.tenant,
                rid,
                record_to_pb(&record, registry()).encode_to_vec(),
            )
            .await?;
        }
        tx.commit().await?;
        self.outbox_wakeup.notify_one();
        tracing::info!(
            tenant = %record.tenant,
            pipeline = %record.name,
            token = %caller.token_id,
            desired_status = %desired,
            "pipeline created"
        );
        Ok(record_to_pb(&record, registry()))
    }

    async fn get(&self, caller: &Caller, raw_id: &str) -> Result<pb::Pipeline, ApiError> {
        let target = caller.resolve(raw_id, "id")?;
        let record = store::fetch_pipeline(&self.pool, &target)
            .await?
            .ok_or_else(|| ApiError::NotFound(raw_id.to_owned()))?;
        Ok(record_to_pb(&record, registry()))
    }

    async fn update(
        &self,
        caller: &Caller,
        req: pb::UpdatePipelineRequest,
    ) -> Result<PipelineRecord, ApiError> {
        let pipeline = req
            .pipeline
            .ok_or_else(|| FieldViolation::new("pipeline", "is required"))?;
        let target = caller.resolve(&pipeline.id, "pipeline.id")?;
        let patch = patch_from_pb(&pipeline)?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let mask = parse_mask(&paths, &patch)?;

        // Optimistic first: read the row, work the change out, and write it in one
        // statement only if the row is still at the generation read (two round trips, no
        // transaction held across them). Should another change have come in between, the
        // row is read again under its lock, where nothing can.
        if !req.validate_only {
            let current = store::fetch_pipeline(&self.pool, &target)
                .await?
                .ok_or_else(|| ApiError::NotFound(pipeline.id.clone()))?;
            let change = match self.plan_update(&current, &pipeline, &patch, &mask)? {
                Some(change) => change,
                None => return Ok(current),
            };
            if let Some(record) =
                store::write_desired_at(&self.pool, &current, change.0, &change.1).await?
            {
                return Ok(self.updated(caller, record));
            }
        }
        let mut tx = self.pool.begin().await?;
        let current = store::lock_pipeline(&mut tx, &target)
            .await?
            .ok_or_else(|| ApiError::NotFound(pipeline.id.clone()))?;
        let Some((desired, spec)) = self.plan_update(&current, &pipeline, &patch, &mask)? else {
            return Ok(current);
        };
        let record = store::write_desired_at(&mut *tx, &current, desired, &spec)
            .await?
            .ok_or_else(changed_under_lock)?;
        if req.validate_only {
            tx.rollback().await?;
            return Ok(record);
        }
        tx.commit().await?;
        Ok(self.updated(caller, record))
    }

    /// What an update makes of `current`: the desired status and the spec to store, or
    /// None when it changes nothing.
    fn plan_update(
        &self,
        current: &PipelineRecord,
        pipeline: &pb::Pipeline,
        patch: &sluice_protocol::mask::PipelinePatch,
        mask: &[sluice_protocol::mask::MaskPath],
    ) -> Result<Option<(DesiredStatus, serde_json::Value)>, ApiError> {
        if current.desired_status == DesiredStatus::Deleted {
            return Err(ApiError::Deleted(pipeline.id.clone()));
        }
        check_etag(current, &pipeline.id, &pipeline.etag)?;
        let (desired, mut spec) = apply_patch(current.desired_status, &current.spec, patch, mask)?;
        restore_redacted(&mut spec, &current.spec, registry());
        // A pipeline's destination keeps its bookkeeping (offsets, table ownership) in
        // a place of its type: another type would start over somewhere else while the
        // old one is never torn down. Delete and create instead.
        if spec.destination.connector_type != current.spec.destination.connector_type {
            return Err(FieldViolation::new(
                "pipeline.spec.destination.type",
                format!(
                    "cannot change from {:?}: a pipeline keeps its destination type (delete it and create a new one)",
                    current.spec.destination.connector_type
                ),
            )
            .into());
        }
        // Exactly as strict as create: the merged spec must validate as a whole.
        self.validate(&spec)?;

        // Setting what is already there bumps nothing — except for a pipeline in ERROR,
        // where re-stating the desired status is how an operator asks for a retry.
        let unchanged = desired == current.desired_status && spec == current.spec;
        let retry_requested = current.status == Some(PipelineStatus::Error)
            && mask.contains(&sluice_protocol::mask::MaskPath::DesiredStatus);
        if unchanged && !retry_requested {
            return Ok(None);
        }
        Ok(Some((
            desired,
            stored_spec_json(&spec, registry(), &current.id)?,
        )))
    }

    /// After an update committed: the outbox relay is woken, the change logged.
    fn updated(&self, caller: &Caller, record: PipelineRecord) -> PipelineRecord {
        self.outbox_wakeup.notify_one();
        tracing::info!(
            tenant = %record.tenant,
            pipeline = %record.name,
            token = %caller.token_id,
            desired_status = %record.desired_status,
            generation = record.generation,
            "pipeline updated"
        );
        record
    }

    async fn delete(
        &self,
        caller: &Caller,
        req: pb::DeletePipelineRequest,
    ) -> Result<pb::Pipeline, ApiError> {
        let target = caller.resolve(&req.id, "id")?;
        let request_id = parse_request_id(&req.request_id)?;
        let request_hash = request_digest(&req);
        let mut tx = self.pool.begin().await?;
        if let Some(rid) = request_id {
            let request_target = format!("{}/{}", target.tenant, target.name);
            if let Some(replayed) = replay(
                &mut tx,
                &caller.tenant,
                rid,
                ("DeletePipeline", &request_target, &request_hash),
            )
            .await?
            {
                return Ok(replayed);
            }
        }
        let current = store::lock_pipeline(&mut tx, &target)
            .await?
            .ok_or_else(|| ApiError::NotFound(req.id.clone()))?;
        check_etag(&current, &req.id, &req.etag)?;
        let record = if current.desired_status == DesiredStatus::Deleted {
            // Deleting twice changes nothing; the teardown is already on its way.
            current
        } else {
            let stored = stored_spec_json(&current.spec, registry(), &current.id)?;
            store::write_desired_at(&mut *tx, &current, DesiredStatus::Deleted, &stored)
                .await?
                .ok_or_else(changed_under_lock)?
        };
        let response = record_to_pb(&record, registry());
        if let Some(rid) = request_id {
            store::save_response(&mut tx, &caller.tenant, rid, response.encode_to_vec()).await?;
        }
        tx.commit().await?;
        self.outbox_wakeup.notify_one();
        tracing::info!(
            tenant = %record.tenant,
            pipeline = %record.name,
            token = %caller.token_id,
            generation = record.generation,
            "pipeline deletion requested"
        );
        Ok(response)
    }

    async fn list(
        &self,
        caller: &Caller,
        req: pb::ListPipelinesRequest,
    ) -> Result<pb::ListPipelinesResponse, ApiError> {
        let page_size = match req.page_size {
            n if n < 0 => {
                return Err(FieldViolation::new("page_size", "must not be negative").into())
            }
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(decode_page_token(&req.page_token)?)
        };
        let filter = list_filter(&req)?;
        // One extra row tells whether another page exists.
        let mut records = store::list_pipelines(
            &self.pool,
            caller.list_scope(),
            &filter,
            after.as_ref(),
            i64::from(page_size) + 1,
        )
        .await?;
        let next_page_token = if records.len() > page_size as usize {
            records.truncate(page_size as usize);
            records
                .last()
                .map(|r| encode_page_token(&r.tenant, &r.name))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListPipelinesResponse {
            pipelines: records
                .iter()
                .map(|r| record_to_pb(r, registry()))
                .collect(),
            next_page_token,
        })
    }

    async fn events(
        &self,
        caller: &Caller,
        req: pb::ListPipelineEventsRequest,
    ) -> Result<pb::ListPipelineEventsResponse, ApiError> {
        let raw_id = req.pipeline_id;
        let target = caller.resolve(&raw_id, "pipeline_id")?;
        let page_size = match req.page_size {
            n if n < 0 => {
                return Err(FieldViolation::new("page_size", "must not be negative").into())
            }
            0 => MAX_EVENTS_PAGE_SIZE,
            n => n.min(MAX_EVENTS_PAGE_SIZE),
        };
        let key = store::key_of(&self.pool, &target).await?;
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(decode_events_token(&req.page_token, &key)?)
        };
        // One extra event tells whether another page exists.
        let mut events = list_events(&self.pool, &key, after, i64::from(page_size) + 1).await?;
        if events.is_empty()
            && after.is_none()
            && !store::pipeline_has_history(&self.pool, &key).await?
        {
            return Err(ApiError::NotFound(raw_id));
        }
        let next_page_token = if events.len() > page_size as usize {
            events.truncate(page_size as usize);
            events
                .last()
                .map(|e| encode_events_token(&key, e.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListPipelineEventsResponse {
            next_page_token,
            events: events
                .into_iter()
                .map(|e| pb::PipelineEvent {
                    pipeline_id: target.name.clone(),
                    time: Some(e.time.into()),
                    actor: e.actor,
                    from_status: e.from_status.unwrap_or_default(),
                    to_status: e.to_status,
                    generation: e.generation,
                    reason: e.reason,
                })
                .collect(),
        })
    }
}

/// How a pipeline is named back to the caller: its id, qualified when it lives in
/// another tenant than the caller's.
fn display_id(caller: &Caller, target: &PipelineRef) -> String {
    if target.tenant == caller.tenant {
        target.name.clone()
    } else {
        format!("{}/{}", target.tenant, target.name)
    }
}

/// Conditional writes (AIP-154): an empty etag means unconditional.
/// A conditional write of a row locked by the same transaction found it changed.
fn changed_under_lock() -> ApiError {
    ApiError::Internal(sluice_infra::store::StoreError::Corrupt(
        "a locked row changed under its lock".into(),
    ))
}

fn check_etag(current: &PipelineRecord, raw_id: &str, sent: &str) -> Result<(), ApiError> {
    let current_etag = current.etag();
    if sent.is_empty() || sent == current_etag {
        return Ok(());
    }
    Err(ApiError::EtagMismatch {
        id: raw_id.to_owned(),
        sent: sent.to_owned(),
        current: current_etag,
    })
}

fn parse_request_id(raw: &str) -> Result<Option<uuid::Uuid>, FieldViolation> {
    if raw.is_empty() {
        return Ok(None);
    }
    uuid::Uuid::parse_str(raw)
        .map(Some)
        .map_err(|_| FieldViolation::new("request_id", "must be a UUID"))
}

/// SHA-256 of a request as prost encodes it (deterministically: Struct fields are a
/// sorted map), so a retry of the same request has the same digest.
fn request_digest(request: &impl Message) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(request.encode_to_vec()).to_vec()
}

/// Registers an idempotency key for `(method, target, digest)`; Some(response) when
/// this is a retry of a request that already completed.
async fn replay(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    tenant: &str,
    request_id: uuid::Uuid,
    (method, target, digest): (&str, &str, &[u8]),
) -> Result<Option<pb::Pipeline>, ApiError> {
    match store::claim_request(tx, tenant, request_id, method, target, digest).await? {
        store::RequestClaim::New => Ok(None),
        store::RequestClaim::Replay(bytes) => {
            let response = pb::Pipeline::decode(bytes.as_slice()).map_err(|e| {
                ApiError::Internal(sluice_infra::store::StoreError::Corrupt(format!(
                    "stored response: {e}"
                )))
            })?;
            Ok(Some(response))
        }
        store::RequestClaim::Mismatch => Err(FieldViolation::new(
            "request_id",
            "was already used for a different request (another method, pipeline or body)",
        )
        .into()),
    }
}

/// The status filters of a ListPipelines request; an unknown number, or an unspecified
/// desired status, is INVALID_ARGUMENT.
fn list_filter(req: &pb::ListPipelinesRequest) -> Result<store::ListFilter, FieldViolation> {
    let status = req
        .status
        .iter()
        .map(|&v| match pb::PipelineStatus::try_from(v) {
            Ok(s) => Ok(status_from_pb(s)
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default()),
            Err(_) => Err(FieldViolation::new("status", format!("unknown value {v}"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let desired_status = req
        .desired_status
        .iter()
        .map(|&v| match desired_status_from_pb(v, "desired_status")? {
            Some(d) => Ok(d.as_str().to_owned()),
            None => Err(FieldViolation::new(
                "desired_status",
                "DESIRED_STATUS_UNSPECIFIED matches no pipeline; leave the filter empty for any",
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(store::ListFilter {
        status: (!status.is_empty()).then_some(status),
        desired_status: (!desired_status.is_empty()).then_some(desired_status),
    })
}

/// Events pages: the id of the last event given, bound to the pipeline's key so that a
/// token is refused for another pipeline.
fn encode_events_token(key: &str, last_id: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{last_id}/{key}"))
}

fn decode_events_token(token: &str, key: &str) -> Result<i64, FieldViolation> {
    let invalid = || FieldViolation::new("page_token", "is not a token this server issued");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let (id, for_key) = text.split_once('/').ok_or_else(invalid)?;
    if for_key != key {
        return Err(FieldViolation::new(
            "page_token",
            "was issued for another pipeline",
        ));
    }
    id.parse().map_err(|_| invalid())
}

fn encode_page_token(tenant: &str, name: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{tenant}/{name}"))
}

fn decode_page_token(token: &str) -> Result<PipelineRef, FieldViolation> {
    let invalid = || FieldViolation::new("page_token", "is not a token returned by ListPipelines");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let (tenant, name) = text.split_once('/').ok_or_else(invalid)?;
    validate_tenant(tenant, "page_token").map_err(|_| invalid())?;
    validate_pipeline_id(name, "page_token").map_err(|_| invalid())?;
    Ok(PipelineRef {
        tenant: tenant.to_owned(),
        name: name.to_owned(),
    })
}

/// How long a watch resume token stays good.
pub const WATCH_TOKEN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// How often a watcher polls without a change notification.
const WATCH_POLL: std::time::Duration = std::time::Duration::from_secs(1);
/// How often a running watch checks that its token is still good (revocation bound).
const WATCH_REAUTH: std::time::Duration = std::time::Duration::from_secs(30);

type WatchStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<pb::WatchPipelinesResponse, Status>> + Send>,
>;

fn encode_watch_token(xid: u64) -> String {
    let issued = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    URL_SAFE_NO_PAD.encode(format!("w1.{xid}.{issued}"))
}

fn decode_watch_token(token: &str) -> Result<u64, ApiError> {
    let invalid = || FieldViolation::new("resume_token", "is not a token this server issued");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let mut parts = text.split('.');
    let (Some("w1"), Some(xid), Some(issued), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid().into());
    };
    let xid: u64 = xid.parse().map_err(|_| invalid())?;
    let issued: u64 = issued.parse().map_err(|_| invalid())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    if now.saturating_sub(issued) > WATCH_TOKEN_LIFETIME.as_secs() {
        return Err(ApiError::Precondition {
            reason: "RESUME_TOKEN_EXPIRED",
            why: "the resume token is older than 24 hours: watch again without it".into(),
        });
    }
    Ok(xid)
}

/// A removed pipeline as events name pipelines: its id and its tenant, like
/// `record_to_pb` does.
fn removed_pipeline(tenant: String, name: String) -> pb::Pipeline {
    pb::Pipeline {
        id: name,
        tenant,
        ..Default::default()
    }
}

impl PipelineApi {
    async fn watch(
        &self,
        caller: Caller,
        metadata: tonic::metadata::MetadataMap,
        req: pb::WatchPipelinesRequest,
    ) -> Result<WatchStream, ApiError> {
        let from = if req.resume_token.is_empty() {
            None
        } else {
            Some(decode_watch_token(&req.resume_token)?)
        };
        let keys = if req.pipeline_ids.is_empty() {
            None
        } else {
            let mut keys = Vec::with_capacity(req.pipeline_ids.len());
            for raw in &req.pipeline_ids {
                let target = caller.resolve(raw, "pipeline_ids")?;
                keys.push(store::key_of(&self.pool, &target).await?);
            }
            Some(keys)
        };
        let scope = store::WatchScope {
            tenant: caller.list_scope().map(str::to_owned),
            keys,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let watcher = Watcher {
            pool: self.pool.clone(),
            tokens: Arc::clone(&self.tokens),
            changes: self.watches.changes.clone(),
            closing: self.watches.closing.clone(),
            metadata,
            scope,
            tx,
        };
        tokio::spawn(watcher.run(from));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

/// One WatchPipelines stream: a snapshot (unless resumed), then the changes.
struct Watcher {
    pool: PgPool,
    tokens: Arc<crate::auth::TokenCache>,
    changes: tokio::sync::watch::Receiver<u64>,
    closing: tokio::sync::watch::Receiver<bool>,
    metadata: tonic::metadata::MetadataMap,
    scope: store::WatchScope,
    tx: tokio::sync::mpsc::Sender<Result<pb::WatchPipelinesResponse, Status>>,
}

impl Watcher {
    async fn send(
        &self,
        kind: pb::WatchEventType,
        pipeline: Option<pb::Pipeline>,
        xid: Option<u64>,
    ) -> bool {
        let event = pb::WatchPipelinesResponse {
            r#type: kind as i32,
            pipeline,
            resume_token: xid.map(encode_watch_token).unwrap_or_default(),
        };
        self.tx.send(Ok(event)).await.is_ok()
    }

    async fn fail(&self, err: ApiError) {
        let _ = self.tx.send(Err(err.into())).await;
    }

    async fn run(mut self, from: Option<u64>) {
        let mut from = match from {
            Some(from) => from,
            None => match store::watch_snapshot(&self.pool, &self.scope).await {
                Ok((records, horizon)) => {
                    for record in &records {
                        let p = record_to_pb(record, registry());
                        // No token until the snapshot is whole: resuming from the middle
                        // of it would skip the rest.
                        if !self.send(pb::WatchEventType::Existing, Some(p), None).await {
                            return;
                        }
                    }
                    if !self
                        .send(pb::WatchEventType::Synced, None, Some(horizon))
                        .await
                    {
                        return;
                    }
                    horizon
                }
                Err(e) => return self.fail(e.into()).await,
            },
        };
        enum Woke {
            Gone,
            Closing,
            Look,
            Reauth,
        }
        let mut notified = true;
        let mut reauth = tokio::time::interval(WATCH_REAUTH);
        reauth.tick().await;
        loop {
            let woke = tokio::select! {
                _ = self.tx.closed() => Woke::Gone,
                _ = self.closing.wait_for(|closing| *closing) => Woke::Closing,
                r = self.changes.changed(), if notified => {
                    notified = r.is_ok();
                    Woke::Look
                }
                _ = tokio::time::sleep(WATCH_POLL) => Woke::Look,
                _ = reauth.tick() => Woke::Reauth,
            };
            match woke {
                Woke::Gone => return,
                Woke::Closing => {
                    return self
                        .fail(ApiError::Unavailable {
                            reason: "SHUTTING_DOWN",
                            why: "the control plane is shutting down: watch again with the last resume_token",
                        })
                        .await;
                }
                Woke::Reauth => {
                    let still =
                        authenticate(&self.pool, &self.tokens, &self.metadata, "WatchPipelines")
                            .await
                            .and_then(|c| c.authorize(Access::Read, "WatchPipelines"));
                    if let Err(e) = still {
                        return self.fail(e).await;
                    }
                    continue;
                }
                Woke::Look => {}
            }
            match store::watch_changes(&self.pool, &self.scope, from).await {
                Ok((changes, horizon)) => {
                    for (xid, change) in changes {
                        let (kind, pipeline) = match change {
                            store::WatchChange::Changed(record) => (
                                pb::WatchEventType::Changed,
                                record_to_pb(&record, registry()),
                            ),
                            store::WatchChange::Removed { tenant, name } => {
                                (pb::WatchEventType::Removed, removed_pipeline(tenant, name))
                            }
                        };
                        if !self.send(kind, Some(pipeline), Some(xid)).await {
                            return;
                        }
                    }
                    from = horizon;
                }
                Err(e) => tracing::warn!(error = %e, "watch: reading changes failed; retrying"),
            }
        }
    }
}

#[tonic::async_trait]
impl PipelineService for PipelineApi {
    type WatchPipelinesStream = WatchStream;

    async fn watch_pipelines(
        &self,
        request: Request<pb::WatchPipelinesRequest>,
    ) -> Result<Response<Self::WatchPipelinesStream>, Status> {
        let caller = self
            .caller(&request, "WatchPipelines", Access::Read)
            .await?;
        let metadata = request.metadata().clone();
        let stream = self.watch(caller, metadata, request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn create_pipeline(
        &self,
        request: Request<pb::CreatePipelineRequest>,
    ) -> Result<Response<pb::Pipeline>, Status> {
        let caller = self
            .caller(&request, "CreatePipeline", Access::Write)
            .await?;
        Ok(Response::new(
            self.create(&caller, request.into_inner()).await?,
        ))
    }

    async fn get_pipeline(
        &self,
        request: Request<pb::GetPipelineRequest>,
    ) -> Result<Response<pb::Pipeline>, Status> {
        let caller = self.caller(&request, "GetPipeline", Access::Read).await?;
        Ok(Response::new(
            self.get(&caller, &request.into_inner().id).await?,
        ))
    }

    async fn list_pipelines(
        &self,
        request: Request<pb::ListPipelinesRequest>,
    ) -> Result<Response<pb::ListPipelinesResponse>, Status> {
        let caller = self.caller(&request, "ListPipelines", Access::Read).await?;
        Ok(Response::new(
            self.list(&caller, request.into_inner()).await?,
        ))
    }

    async fn update_pipeline(
        &self,
        request: Request<pb::UpdatePipelineRequest>,
    ) -> Result<Response<pb::Pipeline>, Status> {
        let caller = self
            .caller(&request, "UpdatePipeline", Access::Write)
            .await?;
        let record = self.update(&caller, request.into_inner()).await?;
        Ok(Response::new(record_to_pb(&record, registry())))
    }

    async fn delete_pipeline(
        &self,
        request: Request<pb::DeletePipelineRequest>,
    ) -> Result<Response<pb::Pipeline>, Status> {
        let caller = self
            .caller(&request, "DeletePipeline", Access::Write)
            .await?;
        Ok(Response::new(
            self.delete(&caller, request.into_inner()).await?,
        ))
    }

    async fn list_pipeline_events(
        &self,
        request: Request<pb::ListPipelineEventsRequest>,
    ) -> Result<Response<pb::ListPipelineEventsResponse>, Status> {
        let caller = self
            .caller(&request, "ListPipelineEvents", Access::Read)
            .await?;
        Ok(Response::new(
            self.events(&caller, request.into_inner()).await?,
        ))
    }

    async fn trigger_sync(
        &self,
        request: Request<pb::TriggerSyncRequest>,
    ) -> Result<Response<pb::Pipeline>, Status> {
        let caller = self.caller(&request, "TriggerSync", Access::Write).await?;
        Ok(Response::new(
            self.trigger_sync(&caller, request.into_inner()).await?,
        ))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let caller = self.caller(&request, "ListRuns", Access::Read).await?;
        Ok(Response::new(
            self.list_runs(&caller, request.into_inner()).await?,
        ))
    }

    async fn push_source_input(
        &self,
        request: Request<pb::PushSourceInputRequest>,
    ) -> Result<Response<pb::PushSourceInputResponse>, Status> {
        let caller = self
            .caller(&request, "PushSourceInput", Access::Write)
            .await?;
        Ok(Response::new(
            self.push_source_input(&caller, request.into_inner())
                .await?,
        ))
    }

    async fn reset_pipeline(
        &self,
        request: Request<pb::ResetPipelineRequest>,
    ) -> Result<Response<pb::Pipeline>, Status> {
        let caller = self
            .caller(&request, "ResetPipeline", Access::Write)
            .await?;
        Ok(Response::new(
            self.reset(&caller, request.into_inner()).await?,
        ))
    }

    async fn list_connectors(
        &self,
        request: Request<pb::ListConnectorsRequest>,
    ) -> Result<Response<pb::ListConnectorsResponse>, Status> {
        self.caller(&request, "ListConnectors", Access::Read)
            .await?;
        Ok(Response::new(self.connectors()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let token = encode_page_token("acme", "orders-1");
        let decoded = decode_page_token(&token).expect("valid");
        assert_eq!(
            (decoded.tenant.as_str(), decoded.name.as_str()),
            ("acme", "orders-1")
        );
        for bad in [
            "!!!",
            "",
            &URL_SAFE_NO_PAD.encode(b"Not An Id"),
            &URL_SAFE_NO_PAD.encode(b"orders-1"),
        ] {
            assert_eq!(decode_page_token(bad).expect_err("bad").field, "page_token");
        }
    }
}
