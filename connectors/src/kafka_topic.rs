//! The `kafka` source and destination: topics of an outside Kafka cluster (or of
//! Sluice's own, under names Sluice does not use), not a pipeline's records topic.
//!
//! - **Source**: each topic is a stream of its messages: `partition`, `offset`, `key`,
//!   `timestamp` and `value` (JSON when the payload is JSON, else its text), keyed by
//!   (partition, offset). Reads are `read_committed`. A record's position is
//!   `[n, "p:next,p:next,..."]`: a count that grows in read order across partitions,
//!   then where each partition's next read starts. Syncs go on from where the
//!   backfill ended, reading what was produced since.
//! - **Destination**: each stream goes to `<topic_prefix><stream>` (or `topic` for a
//!   one-stream source), the record as a JSON value keyed by its primary key. Every
//!   batch is one Kafka transaction that also writes the write lane's bookkeeping (next
//!   records-topic offset, positions) to the pipeline's state topic; the transactional
//!   id names the pipeline's incarnation, so a new owner's producer fences its
//!   predecessor, whose later commits fail. Consumers reading `read_committed` see each
//!   record exactly once.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sluice_infra::kafka::KafkaSettings;
use sluice_protocol::catalog::{Field, FieldType, StreamSchema};
use sluice_protocol::message::FailureType;
use sluice_protocol::secrets::{SecretField, SecretKind};
use sluice_protocol::spec::ConfigReader;
use sluice_protocol::FieldViolation;

use crate::records::{select, PendingRecord, Refusal, WriteState};
use crate::registry::{DestinationKind, SourceKind};
use crate::{
    ActivityError, Claim, Context, Destination, Position, ReadMode, Slice, Source, SourceRecord,
    WriteTarget, Written,
};

const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a read waits for a message that does not come before it ends.
const IDLE_END: Duration = Duration::from_secs(2);

/// How a connector reaches its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub bootstrap_servers: String,
    pub security_protocol: String,
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<String>,
    pub ssl_ca_pem: Option<String>,
}

fn cluster_schema() -> Map<String, Value> {
    let Value::Object(m) = json!({
        "bootstrap_servers": {"type": "string", "description": "host:port[,host:port...]"},
        "security_protocol": {"type": "string", "enum": ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"], "default": "plaintext"},
        "sasl_mechanism": {"type": "string", "enum": ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]},
        "sasl_username": {"type": "string"},
        "sasl_password": {"type": "string", "description": "(secret)"},
        "ssl_ca_pem": {"type": "string", "description": "the brokers' CA certificate(s), PEM"}
    }) else {
        unreachable!("an object literal")
    };
    m
}

const CLUSTER_SECRETS: &[SecretField] = &[SecretField {
    key: "sasl_password",
    kind: SecretKind::Whole,
}];

fn parse_cluster(reader: &mut ConfigReader<'_>) -> Result<ClusterConfig, FieldViolation> {
    let bootstrap_servers = reader.string("bootstrap_servers", None)?;
    let hosts_ok = bootstrap_servers.split(',').all(|hp| {
        hp.trim()
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    });
    if !hosts_ok {
        return Err(reader.violation("bootstrap_servers", "must be host:port[,host:port...]"));
    }
    let security_protocol = reader.string("security_protocol", Some("plaintext"))?;
    if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&security_protocol.as_str()) {
        return Err(reader.violation(
            "security_protocol",
            "must be plaintext, ssl, sasl_plaintext or sasl_ssl",
        ));
    }
    let sasl_mechanism = reader.optional_string("sasl_mechanism")?;
    if let Some(m) = &sasl_mechanism {
        if !["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&m.as_str()) {
            return Err(reader.violation(
                "sasl_mechanism",
                "must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
            ));
        }
    }
    let sasl_username = reader.optional_string("sasl_username")?;
    let sasl_password = reader.optional_string("sasl_password")?;
    if let Some(p) = &sasl_password {
        if sluice_protocol::secrets::is_sealed(p) {
            return Err(reader.violation(
                "sasl_password",
                "is encrypted and this process has no (or another) secrets key; \
                 start it with --secrets-key-file",
            ));
        }
    }
    if security_protocol.starts_with("sasl") != sasl_username.is_some() {
        return Err(reader.violation(
            "sasl_username",
            "is required with a sasl_* security_protocol, and only then",
        ));
    }
    let ssl_ca_pem = reader.optional_string("ssl_ca_pem")?;
    Ok(ClusterConfig {
        bootstrap_servers,
        security_protocol,
        sasl_mechanism,
        sasl_username,
        sasl_password,
        ssl_ca_pem,
    })
}

impl ClusterConfig {
    fn hosts(&self) -> Vec<String> {
        self.bootstrap_servers
            .split(',')
            .filter_map(|hp| hp.trim().rsplit_once(':').map(|(h, _)| h.to_owned()))
            .collect()
    }

    /// The client settings, after checking every bootstrap host against the worker's
    /// host lists.
    async fn settings(&self, ctx: &Context) -> Result<KafkaSettings, ActivityError> {
        if !ctx.hosts.is_empty() {
            for hp in self.bootstrap_servers.split(',') {
                let (host, port) = hp.trim().rsplit_once(':').unwrap_or((hp, "9092"));
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                let addrs: Vec<std::net::IpAddr> =
                    tokio::net::lookup_host((bare, port.parse::<u16>().unwrap_or(9092)))
                        .await
                        .map(|a| a.map(|s| s.ip()).collect())
                        .unwrap_or_default();
                ctx.hosts
                    .check(host, &addrs)
                    .map_err(ActivityError::config)?;
            }
        }
        let mut settings = KafkaSettings::new(self.bootstrap_servers.clone());
        settings
            .properties
            .push(("security.protocol".into(), self.security_protocol.clone()));
        let optional = [
            ("sasl.mechanism", &self.sasl_mechanism),
            ("sasl.username", &self.sasl_username),
            ("sasl.password", &self.sasl_password),
            ("ssl.ca.pem", &self.ssl_ca_pem),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                settings.properties.push((k.into(), v.clone()));
            }
        }
        Ok(settings)
    }
}

fn kafka_error(e: KafkaError) -> ActivityError {
    let code = match &e {
        KafkaError::Transaction(t) => Some(t.code()),
        other => other.rdkafka_error_code(),
    };
    match code {
        Some(
            RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch,
        ) => ActivityError::Fenced,
        Some(
            RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => ActivityError::Failed {
            failure_type: FailureType::AuthError,
            message: format!("kafka: {e}"),
        },
        _ => ActivityError::transient(format!("kafka: {e}")),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ActivityError> + Send + 'static,
) -> Result<T, ActivityError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ActivityError::transient(format!("kafka task failed: {e}")))?
}

/// "p:next,p:next" ⇄ partition → next offset.
fn encode_offsets(offsets: &BTreeMap<i32, i64>) -> String {
    offsets
        .iter()
        .map(|(p, o)| format!("{p}:{o}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn decode_offsets(text: &str) -> Option<BTreeMap<i32, i64>> {
    if text.is_empty() {
        return Some(BTreeMap::new());
    }
    text.split(',')
        .map(|po| {
            let (p, o) = po.split_once(':')?;
            Some((p.parse().ok()?, o.parse().ok()?))
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// Source

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSourceConfig {
    pub cluster: ClusterConfig,
    pub topics: Vec<String>,
    pub slice_size: u64,
}

pub struct KafkaSourceKind;

impl SourceKind for KafkaSourceKind {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn summary(&self) -> &'static str {
        "topics of a Kafka cluster: each message with its partition, offset, key and value"
    }

    fn config_schema(&self) -> Value {
        let mut properties = cluster_schema();
        properties.insert("topics".into(), json!({"type": "array", "items": {"type": "string"}, "description": "the topics to read, each a stream"}));
        properties.insert(
            "slice_size".into(),
            json!({"type": "integer", "minimum": 1, "maximum": 100000, "default": 5000}),
        );
        json!({"type": "object", "required": ["bootstrap_servers", "topics"], "additionalProperties": false, "properties": properties})
    }

    fn secret_fields(&self) -> &'static [SecretField] {
        CLUSTER_SECRETS
    }

    fn build(
        &self,
        config: &Map<String, Value>,
        path: &str,
    ) -> Result<Box<dyn Source>, FieldViolation> {
        let mut reader = ConfigReader::new(config, path.to_owned());
        let cluster = parse_cluster(&mut reader)?;
        let topics = reader.string_list("topics")?.unwrap_or_default();
        if topics.is_empty() {
            return Err(reader.violation("topics", "must name at least one topic"));
        }
        if let Some(bad) = topics.iter().find(|t| !valid_topic(t)) {
            return Err(reader.violation("topics", &format!("{bad:?} is not a topic name")));
        }
        let slice_size = reader.u64("slice_size", Some(5000))?;
        if !(1..=100_000).contains(&slice_size) {
            return Err(reader.violation("slice_size", "must be between 1 and 100000"));
        }
        reader.reject_unknown()?;
        Ok(Box::new(KafkaSource {
            config: KafkaSourceConfig {
                cluster,
                topics,
                slice_size,
            },
        }))
    }
}

fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[derive(Debug)]
pub struct KafkaSource {
    pub config: KafkaSourceConfig,
}

fn message_stream(topic: &str) -> StreamSchema {
    let field = |name: &str, field_type| Field {
        name: name.into(),
        field_type,
    };
    StreamSchema {
        name: topic.to_owned(),
        fields: vec![
            field("partition", FieldType::Integer),
            field("offset", FieldType::Integer),
            field("key", FieldType::String),
            field("timestamp", FieldType::Timestamp),
            field("value", FieldType::Json),
        ],
        primary_key: vec!["partition".into(), "offset".into()],
        cursor_field: None,
    }
}

/// Reads up to `limit` committed messages of `topic` after `offsets` (partitions not
/// named start at their beginning), until every partition has reached the end it had
/// when the read began (or nothing more arrives); done unless it stopped at `limit`.
fn read_topic(
    settings: &KafkaSettings,
    topic: &str,
    mut offsets: BTreeMap<i32, i64>,
    count: i64,
    limit: usize,
) -> Result<Slice, ActivityError> {
    let consumer: BaseConsumer = settings
        .client_config()
        .set("group.id", "sluice-kafka-source")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(kafka_error)?;
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(kafka_error)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(ActivityError::config(format!(
            "topic {topic} does not exist"
        )));
    }
    // Where each partition ends now: the read is done once all get there.
    let mut ends = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, TIMEOUT)
            .map_err(kafka_error)?;
        let next = offsets.get(p).copied().unwrap_or(low).max(low);
        offsets.insert(*p, next);
        ends.insert(*p, high);
        if next < high {
            assignment
                .add_partition_offset(topic, *p, Offset::Offset(next))
                .map_err(kafka_error)?;
        }
    }
    let behind = |offsets: &BTreeMap<i32, i64>, ends: &BTreeMap<i32, i64>| {
        ends.iter()
            .any(|(p, end)| offsets.get(p).copied().unwrap_or(0) < *end)
    };
    let mut records = Vec::new();
    if assignment.count() > 0 {
        consumer.assign(&assignment).map_err(kafka_error)?;
        let mut idle = std::time::Instant::now();
        while records.len() < limit && behind(&offsets, &ends) {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    idle = std::time::Instant::now();
                    let p = m.partition();
                    let next = m.offset() + 1;
                    // Transaction markers take offsets too: the end is reached past them.
                    offsets.insert(p, next);
                    let value = match m.payload() {
                        None => Value::Null,
                        Some(bytes) => serde_json::from_slice(bytes).unwrap_or_else(|_| {
                            Value::String(String::from_utf8_lossy(bytes).into_owned())
                        }),
                    };
                    let mut data = Map::new();
                    data.insert("partition".into(), json!(p));
                    data.insert("offset".into(), json!(m.offset()));
                    data.insert(
                        "key".into(),
                        m.key().map_or(Value::Null, |k| {
                            Value::String(String::from_utf8_lossy(k).into_owned())
                        }),
                    );
                    data.insert(
                        "timestamp".into(),
                        m.timestamp()
                            .to_millis()
                            .and_then(chrono::DateTime::from_timestamp_millis)
                            .map_or(Value::Null, |t| Value::String(t.to_rfc3339())),
                    );
                    data.insert("value".into(), value);
                    let n = count + records.len() as i64 + 1;
                    records.push(SourceRecord {
                        data,
                        position: Position::of([json!(n), json!(encode_offsets(&offsets))]),
                    });
                }
                Some(Err(e)) => return Err(kafka_error(e)),
                None => {
                    // The last records of a partition may be markers of aborted or
                    // committed transactions, which are never delivered: ask where
                    // the consumer stands.
                    if let Ok(positions) = consumer.position() {
                        for e in positions.elements() {
                            if let Offset::Offset(o) = e.offset() {
                                let at = offsets.entry(e.partition()).or_insert(o);
                                *at = (*at).max(o);
                            }
                        }
                    }
                    // What stays unreadable (a transaction still open) is read by
                    // the next sync: this read ends here.
                    if idle.elapsed() > IDLE_END {
                        break;
                    }
                }
            }
        }
    }
    let done = records.len() < limit;
    Ok(Slice { records, done })
}

#[async_trait]
impl Source for KafkaSource {
    async fn discover(&self, ctx: &Context) -> Result<Vec<StreamSchema>, ActivityError> {
        let settings = self.config.cluster.settings(ctx).await?;
        let topics = self.config.topics.clone();
        blocking(move || {
            let consumer: BaseConsumer = settings
                .client_config()
                .set("group.id", "sluice-kafka-source")
                .create()
                .map_err(kafka_error)?;
            for topic in &topics {
                let metadata = consumer
                    .fetch_metadata(Some(topic), TIMEOUT)
                    .map_err(kafka_error)?;
                let exists = metadata
                    .topics()
                    .first()
                    .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
                if !exists {
                    return Err(ActivityError::config(format!(
                        "topic {topic} does not exist"
                    )));
                }
            }
            Ok(topics.iter().map(|t| message_stream(t)).collect())
        })
        .await
    }

    async fn read(
        &self,
        ctx: &Context,
        stream: &StreamSchema,
        _mode: ReadMode,
        after: Option<&Position>,
        limit: usize,
    ) -> Result<Slice, ActivityError> {
        let settings = self.config.cluster.settings(ctx).await?;
        let (count, offsets) = match after {
            Some(p) => (
                p.0.first().and_then(Value::as_i64).unwrap_or(0),
                p.0.get(1)
                    .and_then(Value::as_str)
                    .and_then(decode_offsets)
                    .ok_or_else(|| {
                        ActivityError::Invariant(format!(
                            "kafka source position {p:?} is malformed"
                        ))
                    })?,
            ),
            None => (0, BTreeMap::new()),
        };
        let topic = stream.name.clone();
        blocking(move || read_topic(&settings, &topic, offsets, count, limit)).await
    }

    fn sync_follows_backfill(&self) -> bool {
        true
    }

    fn slice_size(&self) -> usize {
        self.config.slice_size as usize
    }

    fn hosts(&self) -> Vec<String> {
        self.config.cluster.hosts()
    }
}

// ---------------------------------------------------------------------------------
// Destination

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaDestinationConfig {
    pub cluster: ClusterConfig,
    /// The topic of a one-stream source; None: `topic_prefix` + each stream's name.
    pub topic: Option<String>,
    pub topic_prefix: String,
    pub delete_topics_on_delete: bool,
    pub batch_size: u64,
}

pub struct KafkaDestinationKind;

impl DestinationKind for KafkaDestinationKind {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn summary(&self) -> &'static str {
        "topics of a Kafka cluster: each record once, in transactions read_committed consumers see whole"
    }

    fn config_schema(&self) -> Value {
        let mut properties = cluster_schema();
        properties.insert(
            "topic".into(),
            json!({"type": "string", "description": "the topic of a one-stream source"}),
        );
        properties.insert("topic_prefix".into(), json!({"type": "string", "default": "", "description": "topics are <prefix><stream> when topic is not given"}));
        properties.insert(
            "delete_topics_on_delete".into(),
            json!({"type": "boolean", "default": false}),
        );
        properties.insert(
            "batch_size".into(),
            json!({"type": "integer", "minimum": 1, "maximum": 100000, "default": 5000}),
        );
        json!({"type": "object", "required": ["bootstrap_servers"], "additionalProperties": false, "properties": properties})
    }

    fn secret_fields(&self) -> &'static [SecretField] {
        CLUSTER_SECRETS
    }

    fn build(
        &self,
        config: &Map<String, Value>,
        path: &str,
    ) -> Result<Box<dyn Destination>, FieldViolation> {
        let mut reader = ConfigReader::new(config, path.to_owned());
        let cluster = parse_cluster(&mut reader)?;
        let topic = reader.optional_string("topic")?;
        if let Some(t) = &topic {
            if !valid_topic(t) {
                return Err(reader.violation("topic", "is not a topic name"));
            }
        }
        let topic_prefix = reader.string("topic_prefix", Some(""))?;
        if !topic_prefix.is_empty() && !valid_topic(&topic_prefix) {
            return Err(reader.violation("topic_prefix", "is not the start of a topic name"));
        }
        let delete_topics_on_delete = reader.bool("delete_topics_on_delete", Some(false))?;
        let batch_size = reader.u64("batch_size", Some(5000))?;
        if !(1..=100_000).contains(&batch_size) {
            return Err(reader.violation("batch_size", "must be between 1 and 100000"));
        }
        reader.reject_unknown()?;
        Ok(Box::new(KafkaDestination {
            config: KafkaDestinationConfig {
                cluster,
                topic,
                topic_prefix,
                delete_topics_on_delete,
                batch_size,
            },
            lane: Mutex::new(None),
        }))
    }
}

/// The transactional producer of a write lane and what it has committed.
struct LaneState {
    producer: FutureProducer,
    committed: WriteState,
}

pub struct KafkaDestination {
    pub config: KafkaDestinationConfig,
    lane: Mutex<Option<LaneState>>,
}

impl std::fmt::Debug for KafkaDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDestination")
            .field("topic", &self.config.topic)
            .field("topic_prefix", &self.config.topic_prefix)
            .finish_non_exhaustive()
    }
}

/// The state record: the write lane's bookkeeping, in the state topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateRecord {
    records_topic: String,
    next_offset: i64,
    spec_version: i64,
    positions: BTreeMap<String, Position>,
}

fn identifier_of(stream: &str) -> String {
    stream
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl KafkaDestination {
    fn topic_for(&self, stream: &str, streams: usize) -> Result<String, ActivityError> {
        match &self.config.topic {
            Some(t) if streams <= 1 => Ok(t.clone()),
            Some(t) => Err(ActivityError::config(format!(
                "topic {t:?} names one topic, but the source has {streams} streams; give topic_prefix instead"
            ))),
            None => Ok(format!("{}{}", self.config.topic_prefix, identifier_of(stream))),
        }
    }

    fn state_topic(claim: &Claim) -> String {
        format!(
            "_sluice-state.{}.i{}",
            identifier_of(&claim.key),
            claim.incarnation
        )
    }

    fn transactional_id(claim: &Claim) -> String {
        format!("sluice-destination.{}.i{}", claim.key, claim.incarnation)
    }
}

/// The last state record of the state topic (committed transactions only).
fn read_state(settings: &KafkaSettings, topic: &str) -> Result<Option<StateRecord>, ActivityError> {
    let consumer: BaseConsumer = settings
        .client_config()
        .set("group.id", "sluice-kafka-destination")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(kafka_error)?;
    let (low, high) = match consumer.fetch_watermarks(topic, 0, TIMEOUT) {
        Ok(w) => w,
        Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
            return Ok(None)
        }
        Err(e) => return Err(kafka_error(e)),
    };
    if high <= low {
        return Ok(None);
    }
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Offset(low))
        .map_err(kafka_error)?;
    consumer.assign(&assignment).map_err(kafka_error)?;
    let mut last = None;
    let deadline = std::time::Instant::now() + TIMEOUT * 3;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if let Some(bytes) = m.payload() {
                    last = Some(serde_json::from_slice::<StateRecord>(bytes).map_err(|e| {
                        ActivityError::Invariant(format!(
                            "{topic} holds a record that is not Sluice state: {e}"
                        ))
                    })?);
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(last),
            Some(Err(e)) => return Err(kafka_error(e)),
            None if std::time::Instant::now() > deadline => {
                return Err(ActivityError::transient(format!(
                    "reading {topic} timed out"
                )))
            }
            None => {}
        }
    }
}

#[async_trait]
impl Destination for KafkaDestination {
    async fn setup(
        &self,
        ctx: &Context,
        streams: &[StreamSchema],
        claim: &Claim,
    ) -> Result<(), ActivityError> {
        let settings = self.config.cluster.settings(ctx).await?;
        let admin = settings
            .admin()
            .map_err(|e| ActivityError::transient(format!("kafka: {e}")))?;
        let mut topics = Vec::new();
        for s in streams {
            topics.push((self.topic_for(&s.name, streams.len())?, Vec::new()));
        }
        topics.push((
            Self::state_topic(claim),
            vec![("cleanup.policy", "compact")],
        ));
        for (topic, configs) in topics {
            // -1: the broker's default partitions and replication factor.
            let created = admin.ensure_topic(&topic, -1, -1, &configs).await;
            if let Err(e) = created {
                return Err(ActivityError::transient(format!(
                    "kafka: creating {topic}: {e}"
                )));
            }
        }
        Ok(())
    }

    async fn fence(
        &self,
        ctx: &Context,
        target: &WriteTarget<'_>,
        start: i64,
    ) -> Result<WriteState, ActivityError> {
        let settings = self.config.cluster.settings(ctx).await?;
        let claim = target.claim.clone();
        let records_topic = target.topic.to_owned();
        let spec_version = target.spec_version;
        let (producer, committed) = blocking(move || {
            let producer: FutureProducer = settings
                .client_config()
                .set("transactional.id", Self::transactional_id(&claim))
                .set("enable.idempotence", "true")
                .set("transaction.timeout.ms", "60000")
                .set("message.timeout.ms", "30000")
                .set("linger.ms", "5")
                .create()
                .map_err(kafka_error)?;
            // Fences every earlier producer of this incarnation (and aborts its open
            // transaction) before the state is read.
            producer
                .init_transactions(TIMEOUT * 3)
                .map_err(kafka_error)?;
            let state = read_state(&settings, &Self::state_topic(&claim))?
                .filter(|s| s.records_topic == records_topic);
            let committed = match state {
                Some(s) => WriteState {
                    next_offset: s.next_offset.max(start.max(0)),
                    spec_version: s.spec_version,
                    positions: s.positions,
                },
                None => WriteState {
                    next_offset: start.max(0),
                    spec_version,
                    positions: BTreeMap::new(),
                },
            };
            Ok((producer, committed))
        })
        .await?;
        *self.lane.lock().expect("lane lock is never poisoned") = Some(LaneState {
            producer,
            committed: committed.clone(),
        });
        Ok(committed)
    }

    async fn committed(
        &self,
        ctx: &Context,
        target: &WriteTarget<'_>,
    ) -> Result<Option<i64>, ActivityError> {
        let settings = self.config.cluster.settings(ctx).await?;
        let topic = Self::state_topic(target.claim);
        let records_topic = target.topic.to_owned();
        blocking(move || {
            Ok(read_state(&settings, &topic)?
                .filter(|s| s.records_topic == records_topic)
                .map(|s| s.next_offset))
        })
        .await
    }

    async fn write(
        &self,
        _ctx: &Context,
        target: &WriteTarget<'_>,
        streams: &[StreamSchema],
        batch: &[PendingRecord],
    ) -> Result<Written, ActivityError> {
        let (producer, committed) = {
            let lane = self.lane.lock().expect("lane lock is never poisoned");
            let lane = lane
                .as_ref()
                .ok_or_else(|| ActivityError::Invariant("write before fence".into()))?;
            (lane.producer.clone(), lane.committed.clone())
        };
        let claim = target.claim;
        let (picked, next) = select(committed, claim.incarnation, target.spec_version, batch)
            .map_err(|refusal| match refusal {
                Refusal::Superseded { .. } => ActivityError::Fenced,
                other => ActivityError::Invariant(other.to_string()),
            })?;
        let mut messages = Vec::with_capacity(picked.len() + 1);
        for record in picked.iter().map(|i| &batch[*i]) {
            let stream = streams
                .iter()
                .find(|s| s.name == record.stream)
                .ok_or_else(|| {
                    ActivityError::transient(format!(
                        "record of stream {:?} (records-topic offset {}) is not in the catalog yet",
                        record.stream, record.offset
                    ))
                })?;
            let key = stream
                .primary_key
                .iter()
                .map(|k| match record.data.get(k) {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => String::new(),
                })
                .collect::<Vec<_>>()
                .join("\u{1f}");
            let payload = serde_json::to_vec(&record.data).expect("records are plain JSON");
            messages.push((self.topic_for(&stream.name, streams.len())?, key, payload));
        }
        let state = StateRecord {
            records_topic: target.topic.to_owned(),
            next_offset: next.next_offset,
            spec_version: next.spec_version,
            positions: next.positions.clone(),
        };
        messages.push((
            Self::state_topic(claim),
            "state".to_owned(),
            serde_json::to_vec(&state).expect("the state is plain JSON"),
        ));
        let p = producer.clone();
        blocking(move || p.begin_transaction().map_err(kafka_error)).await?;
        let produced: Result<(), ActivityError> = async {
            let mut deliveries = Vec::with_capacity(messages.len());
            for (topic, key, payload) in &messages {
                let record = FutureRecord::to(topic).key(key).payload(payload);
                deliveries.push(
                    producer
                        .send_result(record)
                        .map_err(|(e, _)| kafka_error(e))?,
                );
            }
            for d in deliveries {
                match d.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => return Err(kafka_error(e)),
                    Err(_) => return Err(ActivityError::transient("kafka: delivery cancelled")),
                }
            }
            let p = producer.clone();
            blocking(move || p.commit_transaction(TIMEOUT * 3).map_err(kafka_error)).await
        }
        .await;
        if let Err(e) = produced {
            let p = producer.clone();
            let aborted = blocking(move || p.abort_transaction(TIMEOUT).map_err(kafka_error)).await;
            if aborted.is_err() || matches!(e, ActivityError::Fenced) {
                // The producer cannot go on: the next attempt fences again.
                *self.lane.lock().expect("lane lock is never poisoned") = None;
            }
            return Err(e);
        }
        if let Some(lane) = self
            .lane
            .lock()
            .expect("lane lock is never poisoned")
            .as_mut()
        {
            lane.committed = next.clone();
        }
        Ok(Written {
            next_offset: next.next_offset,
            records: picked,
        })
    }

    async fn teardown(
        &self,
        ctx: &Context,
        streams: &[StreamSchema],
        claim: &Claim,
    ) -> Result<(), ActivityError> {
        let settings = self.config.cluster.settings(ctx).await?;
        let admin = settings
            .admin()
            .map_err(|e| ActivityError::transient(format!("kafka: {e}")))?;
        let mut topics = vec![Self::state_topic(claim)];
        if self.config.delete_topics_on_delete {
            for s in streams {
                topics.push(self.topic_for(&s.name, streams.len())?);
            }
        }
        for topic in topics {
            admin
                .delete_topic(&topic)
                .await
                .map_err(|e| ActivityError::transient(format!("kafka: deleting {topic}: {e}")))?;
        }
        Ok(())
    }

    fn batch_size(&self) -> usize {
        self.config.batch_size as usize
    }

    fn hosts(&self) -> Vec<String> {
        self.config.cluster.hosts()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_round_trip() {
        let offsets: BTreeMap<i32, i64> = [(0, 5), (2, 17)].into_iter().collect();
        assert_eq!(decode_offsets(&encode_offsets(&offsets)), Some(offsets));
        assert_eq!(decode_offsets(""), Some(BTreeMap::new()));
        assert_eq!(decode_offsets("0:x"), None);
    }

    #[test]
    fn configs_are_checked() {
        let build = |v: Value| {
            let Value::Object(m) = v else { unreachable!() };
            KafkaSourceKind.build(&m, "s").map(|_| ())
        };
        assert!(build(json!({"bootstrap_servers": "k:9092", "topics": ["a"]})).is_ok());
        for (bad, field) in [
            (
                json!({"bootstrap_servers": "k", "topics": ["a"]}),
                "s.bootstrap_servers",
            ),
            (
                json!({"bootstrap_servers": "k:1", "topics": []}),
                "s.topics",
            ),
            (
                json!({"bootstrap_servers": "k:1", "topics": ["a b"]}),
                "s.topics",
            ),
            (
                json!({"bootstrap_servers": "k:1", "topics": ["a"], "security_protocol": "tls"}),
                "s.security_protocol",
            ),
            (
                json!({"bootstrap_servers": "k:1", "topics": ["a"], "security_protocol": "sasl_ssl"}),
                "s.sasl_username",
            ),
        ] {
            assert_eq!(
                build(bad.clone()).expect_err("invalid").field,
                field,
                "{bad}"
            );
        }
    }
}
