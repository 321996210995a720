//! The `jsonl` source and destination: JSON Lines files in the worker's files
//! directory (`--files-dir`). A config names files relative to it; nothing outside it
//! is ever read or written.
//!
//! - **Source**: one file is one stream. The backfill reads it line by line; a line's
//!   position is the byte offset just past it, so a sync reads what was appended
//!   since. Fields and their types are inferred from the first lines.
//! - **Destination**: each stream is appended to `<prefix><stream>.jsonl`, one object
//!   per line, and a state file (`<prefix>_sluice_state.json`) records, in one atomic
//!   rename after the lines are synced to disk, the next records-topic offset, the
//!   positions written and every file's committed length. Taking the write lane over
//!   (a new owner, or the same after a crash) cuts each file back to its committed
//!   length, so a batch is in the files whole or not at all. The state file holds the
//!   owner's epoch and is locked while written: a stale owner's write is refused.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sluice_protocol::catalog::{Field, FieldType, StreamSchema};
use sluice_protocol::message::FailureType;
use sluice_protocol::spec::{check_identifier, ConfigReader};
use sluice_protocol::FieldViolation;

use crate::records::{select, PendingRecord, Refusal, WriteState};
use crate::registry::{DestinationKind, SourceKind};
use crate::{
    ActivityError, Claim, Context, Destination, Position, ReadMode, Slice, Source, SourceRecord,
    WriteTarget, Written,
};

/// Lines read to infer a file's fields.
const SAMPLE_LINES: usize = 1000;

/// Checks a path a config names: relative, inside the files directory.
fn check_relative(path: &str) -> Result<(), &'static str> {
    let p = Path::new(path);
    if path.is_empty() {
        return Err("must not be empty");
    }
    if p.is_absolute() {
        return Err("must be relative to the worker's --files-dir");
    }
    if !p
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err("must stay inside the worker's --files-dir (no \"..\")");
    }
    Ok(())
}

/// The absolute path of `relative` inside the files directory.
fn resolve(ctx: &Context, relative: &str) -> Result<PathBuf, ActivityError> {
    let dir = ctx.files_dir.as_ref().ok_or_else(|| {
        ActivityError::config("this worker has no files directory: start it with --files-dir")
    })?;
    check_relative(relative).map_err(|why| ActivityError::config(format!("{relative:?} {why}")))?;
    Ok(dir.join(relative))
}

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> ActivityError {
    let failure_type = match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
            FailureType::ConfigError
        }
        _ => FailureType::TransientError,
    };
    ActivityError::Failed {
        failure_type,
        message: format!("{what} {}: {e}", path.display()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ActivityError> + Send + 'static,
) -> Result<T, ActivityError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ActivityError::transient(format!("file task failed: {e}")))?
}

// ---------------------------------------------------------------------------------
// Source

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonlSourceConfig {
    /// The file, relative to the files directory.
    pub path: String,
    /// The stream's name (default: the file's name without `.jsonl`).
    pub stream: String,
    pub primary_key: Vec<String>,
    pub slice_size: u64,
}

pub struct JsonlSourceKind;

impl SourceKind for JsonlSourceKind {
    fn name(&self) -> &'static str {
        "jsonl"
    }

    fn summary(&self) -> &'static str {
        "a JSON Lines file in the worker's --files-dir: one stream, appended lines synced"
    }

    fn config_schema(&self) -> Value {
        json!({
            "type": "object",
            "required": ["path", "primary_key"],
            "additionalProperties": false,
            "properties": {
                "path": {"type": "string", "description": "the file, relative to the worker's --files-dir"},
                "stream": {"type": "string", "description": "the stream's name; default: the file name without .jsonl"},
                "primary_key": {"type": "array", "items": {"type": "string"}, "description": "the fields that identify a record"},
                "slice_size": {"type": "integer", "minimum": 1, "maximum": 100000, "default": 5000}
            }
        })
    }

    fn build(
        &self,
        config: &Map<String, Value>,
        path: &str,
    ) -> Result<Box<dyn Source>, FieldViolation> {
        let mut reader = ConfigReader::new(config, path.to_owned());
        let file = reader.string("path", None)?;
        check_relative(&file).map_err(|d| reader.violation("path", d))?;
        let default_stream = Path::new(&file)
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| n.trim_end_matches(".jsonl").to_owned())
            .unwrap_or_default();
        let stream = reader.string("stream", Some(&default_stream))?;
        check_identifier(&stream).map_err(|d| {
            reader.violation(
                "stream",
                &format!("{stream:?} {d} (name the stream with `stream`)"),
            )
        })?;
        let primary_key = reader.string_list("primary_key")?.unwrap_or_default();
        if primary_key.is_empty() {
            return Err(reader.violation("primary_key", "must name at least one field"));
        }
        let slice_size = reader.u64("slice_size", Some(5000))?;
        if !(1..=100_000).contains(&slice_size) {
            return Err(reader.violation("slice_size", "must be between 1 and 100000"));
        }
        reader.reject_unknown()?;
        Ok(Box::new(JsonlSource {
            config: JsonlSourceConfig {
                path: file,
                stream,
                primary_key,
                slice_size,
            },
        }))
    }
}

#[derive(Debug)]
pub struct JsonlSource {
    pub config: JsonlSourceConfig,
}

/// The type of a field as the values seen so far say.
fn merge_type(seen: Option<FieldType>, value: &Value) -> Option<FieldType> {
    let t = match value {
        Value::Null => return seen,
        Value::Bool(_) => FieldType::Boolean,
        Value::Number(n) if n.is_i64() || n.is_u64() => FieldType::Integer,
        Value::Number(_) => FieldType::Number,
        Value::String(_) => FieldType::String,
        Value::Array(_) | Value::Object(_) => FieldType::Json,
    };
    Some(match (seen, t) {
        (None, t) => t,
        (Some(a), b) if a == b => a,
        (Some(FieldType::Integer), FieldType::Number)
        | (Some(FieldType::Number), FieldType::Integer) => FieldType::Number,
        _ => FieldType::Json,
    })
}

/// A line's object and the byte offset just past it.
type Line = (Map<String, Value>, u64);

/// Reads up to `limit` lines of `path` from byte `start`: each line's object and the
/// offset just past it. A last line without its newline is not read yet (it may be
/// half written).
fn read_lines(path: &Path, start: u64, limit: usize) -> Result<Vec<Line>, ActivityError> {
    let mut file = std::fs::File::open(path).map_err(|e| io_error("cannot open", path, &e))?;
    file.seek(SeekFrom::Start(start))
        .map_err(|e| io_error("cannot seek in", path, &e))?;
    let mut reader = std::io::BufReader::new(file);
    let mut out = Vec::new();
    let mut at = start;
    let mut line = Vec::new();
    while out.len() < limit {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| io_error("cannot read", path, &e))?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        at += n as u64;
        let text = &line[..n - 1];
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Value>(text) {
            Ok(Value::Object(map)) => out.push((map, at)),
            Ok(_) | Err(_) => {
                return Err(ActivityError::Failed {
                    failure_type: FailureType::DataError,
                    message: format!(
                        "{}: the line ending at byte {at} is not a JSON object",
                        path.display()
                    ),
                })
            }
        }
    }
    Ok(out)
}

#[async_trait]
impl Source for JsonlSource {
    async fn discover(&self, ctx: &Context) -> Result<Vec<StreamSchema>, ActivityError> {
        let path = resolve(ctx, &self.config.path)?;
        let config = self.config.clone();
        blocking(move || {
            let lines = read_lines(&path, 0, SAMPLE_LINES)?;
            let mut types: BTreeMap<String, Option<FieldType>> = BTreeMap::new();
            let mut order: Vec<String> = Vec::new();
            for (record, _) in &lines {
                for (k, v) in record {
                    if !types.contains_key(k) {
                        order.push(k.clone());
                    }
                    let seen = types.get(k).copied().flatten();
                    types.insert(k.clone(), merge_type(seen, v));
                }
            }
            for key in &config.primary_key {
                if !types.contains_key(key) {
                    order.push(key.clone());
                    types.insert(key.clone(), Some(FieldType::String));
                }
            }
            Ok(vec![StreamSchema {
                name: config.stream.clone(),
                fields: order
                    .iter()
                    .map(|name| Field {
                        name: name.clone(),
                        field_type: types[name].unwrap_or(FieldType::String),
                    })
                    .collect(),
                primary_key: config.primary_key.clone(),
                cursor_field: None,
            }])
        })
        .await
    }

    async fn read(
        &self,
        ctx: &Context,
        _stream: &StreamSchema,
        mode: ReadMode,
        after: Option<&Position>,
        limit: usize,
    ) -> Result<Slice, ActivityError> {
        let path = resolve(ctx, &self.config.path)?;
        let start = after
            .and_then(|p| p.0.first())
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let lines = blocking(move || read_lines(&path, start, limit)).await?;
        let done = lines.len() < limit;
        let records = lines
            .into_iter()
            .map(|(data, end)| SourceRecord {
                data,
                position: Position::int(i64::try_from(end).unwrap_or(i64::MAX)),
            })
            .collect();
        // A backfill ends at the end of the file; a sync reads what was appended since.
        let _ = mode;
        Ok(Slice { records, done })
    }

    fn sync_follows_backfill(&self) -> bool {
        // Syncs read the lines appended after the backfill's last one.
        true
    }

    fn slice_size(&self) -> usize {
        self.config.slice_size as usize
    }
}

// ---------------------------------------------------------------------------------
// Destination

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonlDestinationConfig {
    /// The directory, relative to the files directory.
    pub directory: String,
    pub prefix: String,
    pub delete_files_on_delete: bool,
    pub batch_size: u64,
}

pub struct JsonlDestinationKind;

impl DestinationKind for JsonlDestinationKind {
    fn name(&self) -> &'static str {
        "jsonl"
    }

    fn summary(&self) -> &'static str {
        "JSON Lines files in the worker's --files-dir, one per stream, each record exactly once"
    }

    fn config_schema(&self) -> Value {
        json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "directory": {"type": "string", "default": ".", "description": "relative to the worker's --files-dir; created if missing"},
                "prefix": {"type": "string", "default": "", "description": "files are <prefix><stream>.jsonl"},
                "delete_files_on_delete": {"type": "boolean", "default": false},
                "batch_size": {"type": "integer", "minimum": 1, "maximum": 100000, "default": 5000}
            }
        })
    }

    fn build(
        &self,
        config: &Map<String, Value>,
        path: &str,
    ) -> Result<Box<dyn Destination>, FieldViolation> {
        let mut reader = ConfigReader::new(config, path.to_owned());
        let directory = reader.string("directory", Some("."))?;
        check_relative(&directory).map_err(|d| reader.violation("directory", d))?;
        let prefix = reader.optional_string("prefix")?.unwrap_or_default();
        if !prefix.is_empty() {
            check_identifier(&prefix).map_err(|d| reader.violation("prefix", d))?;
        }
        let delete_files_on_delete = reader.bool("delete_files_on_delete", Some(false))?;
        let batch_size = reader.u64("batch_size", Some(5000))?;
        if !(1..=100_000).contains(&batch_size) {
            return Err(reader.violation("batch_size", "must be between 1 and 100000"));
        }
        reader.reject_unknown()?;
        Ok(Box::new(JsonlDestination {
            config: JsonlDestinationConfig {
                directory,
                prefix,
                delete_files_on_delete,
                batch_size,
            },
        }))
    }
}

#[derive(Debug)]
pub struct JsonlDestination {
    pub config: JsonlDestinationConfig,
}

/// The state file: the write lane's bookkeeping.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    pipeline_id: String,
    incarnation: i64,
    owner_epoch: i64,
    topic: String,
    next_offset: i64,
    spec_version: i64,
    positions: BTreeMap<String, Position>,
    /// Each data file's committed length, in bytes.
    lengths: BTreeMap<String, u64>,
}

impl JsonlDestination {
    fn dir(&self, ctx: &Context) -> Result<PathBuf, ActivityError> {
        resolve(ctx, &self.config.directory)
    }

    fn file_name(&self, stream: &str) -> Result<String, ActivityError> {
        let name = format!("{}{stream}.jsonl", self.config.prefix);
        check_relative(&name)
            .ok()
            .filter(|_| !stream.contains('/'))
            .ok_or_else(|| {
                ActivityError::config(format!("stream {stream:?} makes no file name"))
            })?;
        Ok(name)
    }

    fn state_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}_sluice_state.json", self.config.prefix))
    }
}

/// Opens (creating) the state file and locks it for this process.
fn lock_state(path: &Path) -> Result<std::fs::File, ActivityError> {
    let lock_path = path.with_extension("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io_error("cannot open", &lock_path, &e))?;
    file.lock()
        .map_err(|e| io_error("cannot lock", &lock_path, &e))?;
    Ok(file)
}

fn read_state(path: &Path) -> Result<Option<State>, ActivityError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            ActivityError::Invariant(format!(
                "{} is not a Sluice state file: {e}",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("cannot read", path, &e)),
    }
}

/// Writes the state atomically: a synced temporary file renamed over the old one.
fn write_state(path: &Path, state: &State) -> Result<(), ActivityError> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(state).expect("the state is plain JSON");
    let mut file = std::fs::File::create(&tmp).map_err(|e| io_error("cannot create", &tmp, &e))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error("cannot write", &tmp, &e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_error("cannot rename", &tmp, &e))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The state of `claim`'s write lane, refused when a newer owner (or another
/// pipeline) holds the files.
fn owned_state(path: &Path, target: &WriteTarget<'_>) -> Result<State, ActivityError> {
    let claim = target.claim;
    match read_state(path)? {
        Some(s) if s.pipeline_id != claim.key => Err(ActivityError::config(format!(
            "{} belongs to pipeline {}: give this one another directory or prefix",
            path.display(),
            s.pipeline_id
        ))),
        Some(s) if s.incarnation > claim.incarnation => Err(ActivityError::Fenced),
        Some(s) if s.incarnation == claim.incarnation && s.owner_epoch > claim.epoch => {
            Err(ActivityError::Fenced)
        }
        Some(s) if s.incarnation == claim.incarnation && s.topic == target.topic => Ok(s),
        // None yet, or an older incarnation's (the pipeline was deleted and created
        // again while its files were kept): this one appends to those files.
        other => Ok(State {
            pipeline_id: claim.key.clone(),
            incarnation: claim.incarnation,
            owner_epoch: claim.epoch,
            topic: target.topic.to_owned(),
            spec_version: target.spec_version,
            lengths: other.map(|s| s.lengths).unwrap_or_default(),
            ..State::default()
        }),
    }
}

/// Cuts every data file back to its committed length (a batch cut short by a crash).
fn truncate_to_committed(dir: &Path, state: &State) -> Result<(), ActivityError> {
    for (name, len) in &state.lengths {
        let path = dir.join(name);
        match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(f) => {
                let actual = f.metadata().map(|m| m.len()).unwrap_or(0);
                if actual > *len {
                    f.set_len(*len)
                        .map_err(|e| io_error("cannot truncate", &path, &e))?;
                    f.sync_all()
                        .map_err(|e| io_error("cannot sync", &path, &e))?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("cannot open", &path, &e)),
        }
    }
    Ok(())
}

#[async_trait]
impl Destination for JsonlDestination {
    async fn setup(
        &self,
        ctx: &Context,
        streams: &[StreamSchema],
        _claim: &Claim,
    ) -> Result<(), ActivityError> {
        let dir = self.dir(ctx)?;
        for s in streams {
            self.file_name(&s.name)?;
        }
        blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| io_error("cannot create", &dir, &e))
        })
        .await
    }

    async fn fence(
        &self,
        ctx: &Context,
        target: &WriteTarget<'_>,
        start: i64,
    ) -> Result<WriteState, ActivityError> {
        let dir = self.dir(ctx)?;
        let path = self.state_path(&dir);
        let target = (
            target.claim.clone(),
            target.topic.to_owned(),
            target.partition,
            target.spec_version,
        );
        blocking(move || {
            let (claim, topic, partition, spec_version) = target;
            let target = WriteTarget {
                claim: &claim,
                topic: &topic,
                partition,
                spec_version,
            };
            let _lock = lock_state(&path)?;
            let mut state = owned_state(&path, &target)?;
            truncate_to_committed(&dir, &state)?;
            state.owner_epoch = claim.epoch;
            state.next_offset = state.next_offset.max(start.max(0));
            write_state(&path, &state)?;
            Ok(WriteState {
                next_offset: state.next_offset,
                spec_version: state.spec_version,
                positions: state.positions,
            })
        })
        .await
    }

    async fn committed(
        &self,
        ctx: &Context,
        target: &WriteTarget<'_>,
    ) -> Result<Option<i64>, ActivityError> {
        let path = self.state_path(&self.dir(ctx)?);
        let (key, incarnation, topic) = (
            target.claim.key.clone(),
            target.claim.incarnation,
            target.topic.to_owned(),
        );
        blocking(move || {
            Ok(read_state(&path)?
                .filter(|s| {
                    s.pipeline_id == key && s.incarnation == incarnation && s.topic == topic
                })
                .map(|s| s.next_offset))
        })
        .await
    }

    async fn write(
        &self,
        ctx: &Context,
        target: &WriteTarget<'_>,
        streams: &[StreamSchema],
        batch: &[PendingRecord],
    ) -> Result<Written, ActivityError> {
        let dir = self.dir(ctx)?;
        let path = self.state_path(&dir);
        let mut names = BTreeMap::new();
        for s in streams {
            names.insert(s.name.clone(), self.file_name(&s.name)?);
        }
        let batch = batch.to_vec();
        let target = (
            target.claim.clone(),
            target.topic.to_owned(),
            target.partition,
            target.spec_version,
        );
        blocking(move || {
            let (claim, topic, partition, spec_version) = target;
            let target = WriteTarget {
                claim: &claim,
                topic: &topic,
                partition,
                spec_version,
            };
            let _lock = lock_state(&path)?;
            let state = match read_state(&path)? {
                Some(s)
                    if s.pipeline_id == claim.key
                        && s.incarnation == claim.incarnation
                        && s.owner_epoch == claim.epoch =>
                {
                    s
                }
                _ => return Err(ActivityError::Fenced),
            };
            let committed = WriteState {
                next_offset: state.next_offset,
                spec_version: state.spec_version,
                positions: state.positions.clone(),
            };
            let (picked, next) = select(committed, claim.incarnation, target.spec_version, &batch)
                .map_err(|refusal| match refusal {
                    Refusal::Superseded { .. } => ActivityError::Fenced,
                    other => ActivityError::Invariant(other.to_string()),
                })?;
            // Lines per file, in offset order.
            let mut lines: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
            for record in picked.iter().map(|i| &batch[*i]) {
                let name = names.get(&record.stream).ok_or_else(|| {
                    ActivityError::transient(format!(
                        "record of stream {:?} (records-topic offset {}) is not in the catalog yet",
                        record.stream, record.offset
                    ))
                })?;
                let out = lines.entry(name.as_str()).or_default();
                serde_json::to_writer(&mut *out, &record.data).expect("records are plain JSON");
                out.push(b'\n');
            }
            // A file this pipeline has not written yet is claimed (recorded at length 0)
            // before any line goes in: a batch cut short then leaves a tail the next
            // write cuts, never a file that looks foreign. A non-empty file it never
            // claimed is someone else's, never cut or appended to.
            let mut state = state;
            let new_files: Vec<&str> = lines
                .keys()
                .copied()
                .filter(|name| !state.lengths.contains_key(*name))
                .collect();
            for name in &new_files {
                let file_path = dir.join(name);
                if std::fs::metadata(&file_path).is_ok_and(|m| m.len() > 0) {
                    return Err(ActivityError::config(format!(
                        "{} exists and was not written by this pipeline: \
                         give it another directory or prefix",
                        file_path.display()
                    )));
                }
            }
            if !new_files.is_empty() {
                for name in &new_files {
                    state.lengths.insert((*name).to_owned(), 0);
                }
                write_state(&path, &state)?;
            }
            let mut new_state = State {
                next_offset: next.next_offset,
                spec_version: next.spec_version,
                positions: next.positions,
                ..state.clone()
            };
            for (name, bytes) in lines {
                let file_path = dir.join(name);
                let committed_len = state.lengths.get(name).copied().unwrap_or(0);
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&file_path)
                    .map_err(|e| io_error("cannot open", &file_path, &e))?;
                // Whatever follows the committed length is a batch that never committed.
                file.set_len(committed_len)
                    .and_then(|()| file.seek(SeekFrom::Start(committed_len)).map(|_| ()))
                    .and_then(|()| file.write_all(&bytes))
                    .and_then(|()| file.sync_data())
                    .map_err(|e| io_error("cannot write", &file_path, &e))?;
                new_state
                    .lengths
                    .insert(name.to_owned(), committed_len + bytes.len() as u64);
            }
            write_state(&path, &new_state)?;
            Ok(Written {
                next_offset: new_state.next_offset,
                records: picked,
            })
        })
        .await
    }

    async fn teardown(
        &self,
        ctx: &Context,
        streams: &[StreamSchema],
        claim: &Claim,
    ) -> Result<(), ActivityError> {
        let dir = self.dir(ctx)?;
        let path = self.state_path(&dir);
        let mut files = Vec::new();
        for s in streams {
            files.push(dir.join(self.file_name(&s.name)?));
        }
        let delete = self.config.delete_files_on_delete;
        let (key, incarnation) = (claim.key.clone(), claim.incarnation);
        blocking(move || {
            let _lock = lock_state(&path)?;
            let ours = read_state(&path)?
                .is_some_and(|s| s.pipeline_id == key && s.incarnation <= incarnation);
            if !ours {
                return Ok(());
            }
            if delete {
                for f in files {
                    match std::fs::remove_file(&f) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_error("cannot delete", &f, &e)),
                    }
                }
            }
            for p in [path.clone(), path.with_extension("lock")] {
                let _ = std::fs::remove_file(p);
            }
            Ok(())
        })
        .await
    }

    fn batch_size(&self) -> usize {
        self.config.batch_size as usize
    }
}

/// Reads a whole file as JSON lines (for tests and tools).
pub fn read_all(path: &Path) -> std::io::Result<Vec<Value>> {
    let mut text = String::new();
    std::fs::File::open(path)?.read_to_string(&mut text)?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_files_directory() {
        for ok in ["a.jsonl", "dir/a.jsonl", "./a.jsonl"] {
            assert!(check_relative(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../a", "dir/../../a"] {
            assert!(check_relative(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn types_are_inferred_from_values() {
        let mut t = None;
        for v in [json!(null), json!(1), json!(2.5)] {
            t = merge_type(t, &v);
        }
        assert_eq!(t, Some(FieldType::Number));
        assert_eq!(
            merge_type(Some(FieldType::String), &json!(1)),
            Some(FieldType::Json)
        );
        assert_eq!(merge_type(None, &json!({"a": 1})), Some(FieldType::Json));
    }
}
