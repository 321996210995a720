//! Sluice's connectors: sources and destinations as peers behind two traits, and the
//! registry that knows them all.
//!
//! Each connector is one file. It owns its config (a JSON schema for clients, parsing
//! and validation that name the offending field), its secret fields, its catalog (the
//! streams it reads or the tables it writes) and the classification of its errors.
//! Parsing is pure, so the control plane validates a spec through the same registry the
//! workers build connectors with; I/O happens only in the trait methods, given a
//! [`Context`] of the worker's settings. Adding a connector is one new file, its `mod`
//! line here and one line in [`registry`].

#![forbid(unsafe_code)]

pub mod error;
pub mod generator;
pub mod http;
pub mod jsonl;
pub mod kafka_topic;
pub mod pg;
pub mod position;
pub mod postgres_destination;
pub mod postgres_source;
pub mod records;
pub mod registry;
pub mod stripe_source;

use std::fmt::Debug;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value};
use sluice_protocol::catalog::StreamSchema;
use sluice_protocol::hosts::HostPolicy;

pub use crate::error::ActivityError;
pub use crate::position::Position;
pub use crate::records::{Lane, PendingRecord, WriteState};
pub use crate::registry::{registry, ValidatedSpec};

/// Who holds a pipeline: its key, the incarnation of that key (a pipeline deleted and
/// created again is a new one) and the owner epoch the claim drew. Epochs come from
/// one sequence for all pipelines, so an epoch alone already tells claims apart; the
/// incarnation names what belongs to this life of the key (topics, offsets, tables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub key: String,
    pub incarnation: i64,
    pub epoch: i64,
}

/// What a worker's operator decides for every connector, and what connectors share.
#[derive(Debug, Default)]
pub struct Context {
    /// Names the worker's database sessions (`application_name`).
    pub worker_id: String,
    /// Where a destination's `sslrootcert=<name>` CA files are looked up.
    pub ca_dir: Option<PathBuf>,
    /// The directory file connectors (jsonl) read and write in; None: none allowed.
    pub files_dir: Option<PathBuf>,
    /// Which hosts connectors may connect to.
    pub hosts: HostPolicy,
    /// Longest statement (the activity attempt timeout).
    pub statement_timeout: Duration,
    /// How long a destination session may sit idle inside a transaction before the
    /// server ends it (zero: 30 s). The worker keeps it below its group session
    /// timeout, so that a worker stopped in the middle of a write transaction loses
    /// that transaction before another worker can take its pipelines over: a stale
    /// owner cannot commit a batch after the handover.
    pub idle_in_transaction_timeout: Duration,
    /// PostgreSQL pools, shared by the pipelines that read or write one database.
    pub pg_pools: pg::Pools,
}

/// How a source reads a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// Everything, in key order, once.
    Backfill,
    /// What changed since the position a sync last reached (a cursor column).
    Sync,
}

/// A record a pushed input stands for: its stream and its data.
pub type InputRecord = (String, Map<String, Value>);

/// A record as a source read it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRecord {
    pub data: Map<String, Value>,
    /// Where it is in its stream: the next read after it starts past this.
    pub position: Position,
}

/// One read of a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    pub records: Vec<SourceRecord>,
    /// Whether the read reached the end of the stream (for now: a sync reads again
    /// on the next run).
    pub done: bool,
}

/// A source connector, built from a validated config.
#[async_trait]
pub trait Source: Send + Sync + Debug {
    /// The streams this source offers, with their schemas and primary keys.
    async fn discover(&self, ctx: &Context) -> Result<Vec<StreamSchema>, ActivityError>;

    /// Reads up to `limit` records of `stream` that come after `after` (None: from the
    /// start) in position order.
    async fn read(
        &self,
        ctx: &Context,
        stream: &StreamSchema,
        mode: ReadMode,
        after: Option<&Position>,
        limit: usize,
    ) -> Result<Slice, ActivityError>;

    /// Where a sync of `stream` starts, taken before its backfill starts (so changes
    /// made during the backfill are read by the first sync); None: the stream has no
    /// sync (a static source).
    async fn sync_start(
        &self,
        _ctx: &Context,
        _stream: &StreamSchema,
    ) -> Result<Option<Position>, ActivityError> {
        Ok(None)
    }

    /// Whether a stream's syncs start where its backfill ended (a file read on as it
    /// grows), rather than at [`Source::sync_start`].
    fn sync_follows_backfill(&self) -> bool {
        false
    }

    /// The records a pushed input (`PushSourceInput`) stands for, as (stream, record).
    /// The default reads `{"stream": "...", "record": {...}}`.
    fn input_records(&self, input: &Value) -> Result<Vec<InputRecord>, String> {
        let stream = input
            .get("stream")
            .and_then(Value::as_str)
            .ok_or("an input names its stream: {\"stream\": \"...\", \"record\": {...}}")?;
        let record = input.get("record").and_then(Value::as_object).ok_or(
            "an input carries one record object: {\"stream\": \"...\", \"record\": {...}}",
        )?;
        Ok(vec![(stream.to_owned(), record.clone())])
    }

    /// How long reading `records` records should take at least (a rate limit).
    fn pace(&self, _records: usize) -> Duration {
        Duration::ZERO
    }

    /// Records per read.
    fn slice_size(&self) -> usize;

    /// The hosts this source connects to, as its config names them (the control plane
    /// checks them against the operator's host lists).
    fn hosts(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Where a write lane writes: its claim, records topic and spec version.
#[derive(Debug, Clone, Copy)]
pub struct WriteTarget<'a> {
    pub claim: &'a Claim,
    pub topic: &'a str,
    pub partition: i32,
    pub spec_version: i64,
}

/// What a batch write committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The next records-topic offset to consume.
    pub next_offset: i64,
    /// Indices (in the batch) of the records written; the others were replays or of an
    /// older spec.
    pub records: Vec<usize>,
}

/// A destination connector, built from a validated config.
#[async_trait]
pub trait Destination: Send + Sync + Debug {
    /// Creates (or adds to, never otherwise changes) what the streams need.
    async fn setup(
        &self,
        ctx: &Context,
        streams: &[StreamSchema],
        claim: &Claim,
    ) -> Result<(), ActivityError>;

    /// Takes the write lane's bookkeeping over for the claim (fencing any earlier
    /// owner's write lane) and returns what was committed, the offset moved up to
    /// `start` if below.
    async fn fence(
        &self,
        ctx: &Context,
        target: &WriteTarget<'_>,
        start: i64,
    ) -> Result<WriteState, ActivityError>;

    /// The next records-topic offset committed for the target, if any.
    async fn committed(
        &self,
        ctx: &Context,
        target: &WriteTarget<'_>,
    ) -> Result<Option<i64>, ActivityError>;

    /// Writes a batch (dropping what [`records::select`] drops) together with the
    /// offsets.
    async fn write(
        &self,
        ctx: &Context,
        target: &WriteTarget<'_>,
        streams: &[StreamSchema],
        batch: &[PendingRecord],
    ) -> Result<Written, ActivityError>;

    /// Removes what this incarnation keeps at the destination (its bookkeeping; its
    /// tables only when its config asks for that and it created them).
    async fn teardown(
        &self,
        ctx: &Context,
        streams: &[StreamSchema],
        claim: &Claim,
    ) -> Result<(), ActivityError>;

    /// Records per write transaction.
    fn batch_size(&self) -> usize;

    /// The hosts this destination connects to, as its config names them.
    fn hosts(&self) -> Vec<String> {
        Vec::new()
    }
}
