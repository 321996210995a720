//! Kafka client configuration and topic administration shared by the control plane
//! (signals topic) and the workers (signals and per-pipeline topics).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum KafkaAdminError {
    #[error("kafka error: {0}")]
    Kafka(#[from] KafkaError),
    #[error("topic {topic}: {code}")]
    Topic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("topic {0} did not appear in the cluster metadata in time")]
    NotVisible(String),
}

/// Connection settings for every Kafka client a process makes.
#[derive(Clone)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    /// Extra librdkafka properties passed through as they are (security.protocol,
    /// sasl.*, ssl.* ...).
    pub properties: Vec<(String, String)>,
}

/// Values of properties that hold credentials (sasl.password, ssl.key.password, ...)
/// are never printed.
impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<(&str, &str)> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let secret = is_secret_property(k);
                (k.as_str(), if secret { "********" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("properties", &shown)
            .finish()
    }
}

/// Whether a librdkafka property holds a credential: passwords and secrets, JAAS and
/// OAUTHBEARER configurations (which carry client secrets), and inline PEM keys.
pub fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "sasl.oauthbearer.config",
        "key.pem",
        "ssl_key",
    ]
    .iter()
    .any(|w| key.contains(w))
}

impl KafkaSettings {
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            properties: Vec::new(),
        }
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        for (k, v) in &self.properties {
            config.set(k, v);
        }
        config
    }

    pub fn admin(&self) -> Result<Admin, KafkaAdminError> {
        let client: AdminClient<DefaultClientContext> = self.client_config().create()?;
        Ok(Admin {
            client: Arc::new(client),
        })
    }
}

/// Topic administration. Cheap to clone.
#[derive(Clone)]
pub struct Admin {
    client: Arc<AdminClient<DefaultClientContext>>,
}

impl Admin {
    fn options() -> AdminOptions {
        AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))
    }

    /// Creates `topic` unless it exists and returns its partition count once the topic
    /// is visible in the metadata.
    pub async fn ensure_topic(
        &self,
        topic: &str,
        partitions: i32,
        replication: i32,
        configs: &[(&str, &str)],
    ) -> Result<i32, KafkaAdminError> {
        if let Some(n) = self.partition_count(topic).await? {
            return Ok(n);
        }
        let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
        for (key, value) in configs {
            new_topic = new_topic.set(key, value);
        }
        for result in self
            .client
            .create_topics([&new_topic], &Self::options())
            .await?
        {
            match result {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(KafkaAdminError::Topic { topic, code }),
            }
        }
        // Creation is acknowledged by the controller before every broker's metadata
        // cache has it; wait until it is visible so producers do not race it.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(n) = self.partition_count(topic).await? {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(KafkaAdminError::NotVisible(topic.to_owned()))
    }

    /// Deletes `topic`; a topic that is already gone is not an error.
    pub async fn delete_topic(&self, topic: &str) -> Result<(), KafkaAdminError> {
        for result in self
            .client
            .delete_topics(&[topic], &Self::options())
            .await?
        {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((topic, code)) => return Err(KafkaAdminError::Topic { topic, code }),
            }
        }
        Ok(())
    }

    /// The offset just past the last record of `topic`'s `partition`.
    pub async fn end_offset(&self, topic: &str, partition: i32) -> Result<i64, KafkaAdminError> {
        let client = Arc::clone(&self.client);
        let topic = topic.to_owned();
        // fetch_watermarks blocks the calling thread.
        let (_, high) = tokio::task::spawn_blocking(move || {
            client
                .inner()
                .fetch_watermarks(&topic, partition, Duration::from_secs(10))
        })
        .await
        .expect("watermark task does not panic")?;
        Ok(high)
    }

    /// Deletes, in one request, the records of each `(topic, partition)` below its
    /// offset (Kafka's DeleteRecords: the log start moves up; later records keep their
    /// offsets). Returns the ones that failed, with why.
    pub async fn delete_records_before(
        &self,
        below: &[(String, i32, i64)],
    ) -> Result<Vec<(String, i32, RDKafkaErrorCode)>, KafkaAdminError> {
        let mut list = rdkafka::TopicPartitionList::new();
        for (topic, partition, offset) in below {
            list.add_partition_offset(topic, *partition, rdkafka::Offset::Offset(*offset))?;
        }
        let done = self.client.delete_records(&list, &Self::options()).await?;
        Ok(done
            .elements()
            .iter()
            .filter_map(|e| {
                let code = e.error().err()?.rdkafka_error_code()?;
                Some((e.topic().to_owned(), e.partition(), code))
            })
            .collect())
    }

    /// The low and high watermarks of `topic`'s `partition`: the first offset still
    /// kept and the offset just past the last record.
    pub async fn watermarks(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<(i64, i64), KafkaAdminError> {
        let client = Arc::clone(&self.client);
        let topic = topic.to_owned();
        // fetch_watermarks blocks the calling thread.
        Ok(tokio::task::spawn_blocking(move || {
            client
                .inner()
                .fetch_watermarks(&topic, partition, Duration::from_secs(10))
        })
        .await
        .expect("watermark task does not panic")?)
    }

    /// The partition count of `topic`, or None if the cluster does not know it.
    /// Grows `topic` to `partitions` partitions (Kafka cannot shrink a topic) and waits
    /// until the cluster metadata shows them. Returns the count before.
    pub async fn grow_partitions(
        &self,
        topic: &str,
        partitions: i32,
    ) -> Result<i32, KafkaAdminError> {
        let before = self
            .partition_count(topic)
            .await?
            .ok_or_else(|| KafkaAdminError::NotVisible(topic.to_owned()))?;
        if partitions <= before {
            return Ok(before);
        }
        let grow = NewPartitions::new(topic, partitions as usize);
        for result in self
            .client
            .create_partitions([&grow], &Self::options())
            .await?
        {
            if let Err((topic, code)) = result {
                return Err(KafkaAdminError::Topic { topic, code });
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.partition_count(topic).await? == Some(partitions) {
                return Ok(before);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(KafkaAdminError::NotVisible(topic.to_owned()))
    }

    /// Topics whose names start with `prefix`, and their partitions all told.
    pub async fn topics_under(&self, prefix: &str) -> Result<(usize, usize), KafkaAdminError> {
        let client = Arc::clone(&self.client);
        // fetch_metadata blocks the calling thread.
        let metadata = tokio::task::spawn_blocking(move || {
            client.inner().fetch_metadata(None, Duration::from_secs(30))
        })
        .await
        .expect("metadata task does not panic")?;
        let topics: Vec<_> = metadata
            .topics()
            .iter()
            .filter(|t| t.name().starts_with(prefix))
            .collect();
        Ok((
            topics.len(),
            topics.iter().map(|t| t.partitions().len()).sum(),
        ))
    }

    pub async fn partition_count(&self, topic: &str) -> Result<Option<i32>, KafkaAdminError> {
        let client = Arc::clone(&self.client);
        let topic = topic.to_owned();
        // fetch_metadata blocks the calling thread.
        let metadata = tokio::task::spawn_blocking(move || {
            client
                .inner()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
        })
        .await
        .expect("metadata task does not panic")?;
        Ok(metadata.topics().first().and_then(|t| {
            (t.error().is_none() && !t.partitions().is_empty()).then(|| t.partitions().len() as i32)
        }))
    }
}
