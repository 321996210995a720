//! The `stripe` source: Stripe's list endpoints as streams (customers, products,
//! prices, invoices, charges), and Stripe events through the live lane.
//!
//! - **Backfill** pages through a list with `starting_after` (Stripe lists newest
//!   first). A record's position is `[ordinal, id]`: the ordinal keeps positions
//!   growing in read order (ids do not sort by it), the id is where the next page
//!   starts.
//! - **Sync** reads the objects created after the last sync (`created[gt]`), taken as
//!   "now" before the backfill. Changes to existing objects arrive as events.
//! - **Events** (`customer.updated`, `price.deleted`, ...) pushed to the pipeline
//!   (PushSourceInput, e.g. from a webhook relay) carry the whole object; a `.deleted`
//!   event's row gets `deleted = true`. Events for objects no stream holds are ignored.
//!
//! Objects land projected onto each stream's typed fields: unix times as timestamps,
//! nested objects as JSON.

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use sluice_protocol::catalog::{Field, FieldType, StreamSchema};
use sluice_protocol::secrets::{SecretField, SecretKind};
use sluice_protocol::spec::ConfigReader;
use sluice_protocol::FieldViolation;

use crate::http::{get_json, status_failure};
use crate::registry::SourceKind;
use crate::{ActivityError, Context, InputRecord, Position, ReadMode, Slice, Source, SourceRecord};

const DEFAULT_BASE_URL: &str = "https://api.stripe.com";

/// A stream: its name, the object type its records are, and its typed fields.
type StreamDef = (
    &'static str,
    &'static str,
    &'static [(&'static str, FieldType)],
);

const STREAMS: &[StreamDef] = {
    use FieldType::*;
    &[
        (
            "customers",
            "customer",
            &[
                ("id", String),
                ("email", String),
                ("name", String),
                ("description", String),
                ("phone", String),
                ("currency", String),
                ("balance", Integer),
                ("delinquent", Boolean),
                ("livemode", Boolean),
                ("created", Timestamp),
                ("address", Json),
                ("metadata", Json),
                ("deleted", Boolean),
            ],
        ),
        (
            "products",
            "product",
            &[
                ("id", String),
                ("name", String),
                ("description", String),
                ("active", Boolean),
                ("default_price", String),
                ("unit_label", String),
                ("url", String),
                ("livemode", Boolean),
                ("created", Timestamp),
                ("updated", Timestamp),
                ("metadata", Json),
                ("deleted", Boolean),
            ],
        ),
        (
            "prices",
            "price",
            &[
                ("id", String),
                ("product", String),
                ("active", Boolean),
                ("currency", String),
                ("unit_amount", Integer),
                ("unit_amount_decimal", Decimal),
                ("nickname", String),
                ("type", String),
                ("billing_scheme", String),
                ("lookup_key", String),
                ("recurring", Json),
                ("livemode", Boolean),
                ("created", Timestamp),
                ("metadata", Json),
                ("deleted", Boolean),
            ],
        ),
        (
            "invoices",
            "invoice",
            &[
                ("id", String),
                ("customer", String),
                ("subscription", String),
                ("number", String),
                ("status", String),
                ("currency", String),
                ("amount_due", Integer),
                ("amount_paid", Integer),
                ("amount_remaining", Integer),
                ("total", Integer),
                ("livemode", Boolean),
                ("created", Timestamp),
                ("metadata", Json),
                ("deleted", Boolean),
            ],
        ),
        (
            "charges",
            "charge",
            &[
                ("id", String),
                ("customer", String),
                ("invoice", String),
                ("amount", Integer),
                ("amount_refunded", Integer),
                ("currency", String),
                ("status", String),
                ("paid", Boolean),
                ("refunded", Boolean),
                ("description", String),
                ("livemode", Boolean),
                ("created", Timestamp),
                ("metadata", Json),
            ],
        ),
    ]
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeSourceConfig {
    pub api_key: String,
    pub base_url: url::Url,
    /// Objects per list request (Stripe's `limit`, at most 100).
    pub page_size: u64,
}

pub struct StripeSourceKind;

impl SourceKind for StripeSourceKind {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn summary(&self) -> &'static str {
        "Stripe: customers, products, prices, invoices, charges; events through the live lane"
    }

    fn config_schema(&self) -> Value {
        json!({
            "type": "object",
            "required": ["api_key"],
            "additionalProperties": false,
            "properties": {
                "api_key": {"type": "string", "description": "a secret or restricted key, sk_... or rk_... (secret)"},
                "base_url": {"type": "string", "default": DEFAULT_BASE_URL, "description": "the API's address (another one for a mock or a proxy)"},
                "page_size": {"type": "integer", "minimum": 1, "maximum": 100, "default": 100}
            }
        })
    }

    fn secret_fields(&self) -> &'static [SecretField] {
        &[SecretField {
            key: "api_key",
            kind: SecretKind::Whole,
        }]
    }

    fn build(
        &self,
        config: &Map<String, Value>,
        path: &str,
    ) -> Result<Box<dyn Source>, FieldViolation> {
        Ok(Box::new(StripeSource {
            config: parse(config, path)?,
        }))
    }
}

pub fn parse(
    config: &Map<String, Value>,
    path: &str,
) -> Result<StripeSourceConfig, FieldViolation> {
    let mut reader = ConfigReader::new(config, path.to_owned());
    let api_key = reader.string("api_key", None)?;
    if sluice_protocol::secrets::is_sealed(&api_key) {
        return Err(reader.violation(
            "api_key",
            "is encrypted and this process has no (or another) secrets key; \
             start it with --secrets-key-file",
        ));
    }
    if api_key.is_empty() || api_key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(reader.violation("api_key", "must be a key without spaces"));
    }
    let base = reader.string("base_url", Some(DEFAULT_BASE_URL))?;
    let base_url = url::Url::parse(&base)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        .filter(|u| u.username().is_empty() && u.password().is_none() && u.query().is_none())
        .ok_or_else(|| {
            reader.violation(
                "base_url",
                "must be an http(s) URL with a host and no credentials or query",
            )
        })?;
    let page_size = reader.u64("page_size", Some(100))?;
    if !(1..=100).contains(&page_size) {
        return Err(reader.violation("page_size", "must be between 1 and 100"));
    }
    reader.reject_unknown()?;
    Ok(StripeSourceConfig {
        api_key,
        base_url,
        page_size,
    })
}

#[derive(Debug)]
pub struct StripeSource {
    pub config: StripeSourceConfig,
}

fn schema_of(name: &str) -> Option<StreamSchema> {
    STREAMS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(n, _, fields)| StreamSchema {
            name: (*n).to_owned(),
            fields: fields
                .iter()
                .map(|(f, t)| Field {
                    name: (*f).to_owned(),
                    field_type: *t,
                })
                .collect(),
            primary_key: vec!["id".to_owned()],
            cursor_field: Some("created".to_owned()),
        })
}

/// The stream whose records are objects of `object_type`.
fn stream_of_object(object_type: &str) -> Option<&'static str> {
    STREAMS
        .iter()
        .find(|(_, o, _)| *o == object_type)
        .map(|(n, _, _)| *n)
}

/// An API object projected onto the stream's fields.
fn project(stream: &StreamSchema, object: &Map<String, Value>) -> Map<String, Value> {
    stream
        .fields
        .iter()
        .map(|f| {
            let v = object.get(&f.name).cloned().unwrap_or(Value::Null);
            let v = match (f.field_type, v) {
                (_, Value::Null) => Value::Null,
                (FieldType::Timestamp, Value::Number(n)) => n
                    .as_i64()
                    .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
                    .map_or(Value::Null, |t| Value::String(t.to_rfc3339())),
                (FieldType::String, Value::Object(o)) => {
                    // An expanded reference: keep its id.
                    o.get("id").cloned().unwrap_or(Value::Null)
                }
                (FieldType::String, v @ Value::String(_)) => v,
                (FieldType::String, other) => Value::String(other.to_string()),
                (FieldType::Decimal, Value::Number(n)) => Value::String(n.to_string()),
                (_, v) => v,
            };
            (f.name.clone(), v)
        })
        .collect()
}

impl StripeSource {
    /// One list request: the page's objects and whether more follow.
    async fn list(
        &self,
        ctx: &Context,
        stream: &str,
        query: &[(&str, String)],
    ) -> Result<(Vec<Map<String, Value>>, bool), ActivityError> {
        let mut url = self
            .config
            .base_url
            .join(&format!("v1/{stream}"))
            .map_err(|e| ActivityError::config(format!("base_url: {e}")))?;
        url.query_pairs_mut()
            .append_pair("limit", &self.config.page_size.to_string());
        for (k, v) in query {
            url.query_pairs_mut().append_pair(k, v);
        }
        let response = get_json(
            ctx,
            &url,
            &[
                ("authorization", format!("Bearer {}", self.config.api_key)),
                ("stripe-version", "2024-06-20".to_owned()),
            ],
        )
        .await?;
        if response.status != 200 {
            // Stripe explains: {"error": {"type": ..., "message": ...}}; never echo the key.
            let message = response.body["error"]["message"]
                .as_str()
                .unwrap_or("no error message")
                .replace(&self.config.api_key, "<api_key>");
            return Err(ActivityError::Failed {
                failure_type: status_failure(response.status),
                message: format!(
                    "stripe answered {} for {stream}: {message}",
                    response.status
                ),
            });
        }
        let data = response.body["data"]
            .as_array()
            .ok_or_else(|| ActivityError::transient(format!("stripe's {stream} list has no data")))?
            .iter()
            .filter_map(|o| o.as_object().cloned())
            .collect();
        Ok((data, response.body["has_more"].as_bool().unwrap_or(false)))
    }
}

#[async_trait]
impl Source for StripeSource {
    async fn discover(&self, ctx: &Context) -> Result<Vec<StreamSchema>, ActivityError> {
        // One request proves the key and the address before anything is set up.
        self.list(ctx, "customers", &[]).await?;
        Ok(STREAMS
            .iter()
            .filter_map(|(n, _, _)| schema_of(n))
            .collect())
    }

    async fn read(
        &self,
        ctx: &Context,
        stream: &StreamSchema,
        mode: ReadMode,
        after: Option<&Position>,
        _limit: usize,
    ) -> Result<Slice, ActivityError> {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let int = |v: Option<&Value>| v.and_then(Value::as_i64);
        match mode {
            ReadMode::Backfill => {
                // [ordinal, id]
                let (ordinal, last_id) = match after {
                    Some(p) => (int(p.0.first()).unwrap_or(0), text(p.0.get(1))),
                    None => (0, None),
                };
                let mut query = Vec::new();
                if let Some(id) = &last_id {
                    query.push(("starting_after", id.clone()));
                }
                let (objects, more) = self.list(ctx, &stream.name, &query).await?;
                let records = objects
                    .iter()
                    .enumerate()
                    .map(|(i, o)| SourceRecord {
                        data: project(stream, o),
                        position: Position::of([
                            Value::from(ordinal + 1 + i as i64),
                            o.get("id").cloned().unwrap_or(Value::Null),
                        ]),
                    })
                    .collect::<Vec<_>>();
                Ok(Slice {
                    done: !more || records.is_empty(),
                    records,
                })
            }
            ReadMode::Sync => {
                // [since] at the start of a sync; [since, ordinal, id, newest] within.
                let Some(p) = after else {
                    return Ok(Slice {
                        records: Vec::new(),
                        done: true,
                    });
                };
                let since = int(p.0.first()).unwrap_or(0);
                let (ordinal, last_id, newest) = match p.0.len() {
                    4 => (
                        int(p.0.get(1)).unwrap_or(0),
                        text(p.0.get(2)),
                        int(p.0.get(3)).unwrap_or(since),
                    ),
                    _ => (0, None, since),
                };
                let mut query = vec![("created[gt]", since.to_string())];
                if let Some(id) = &last_id {
                    query.push(("starting_after", id.clone()));
                }
                let (objects, more) = self.list(ctx, &stream.name, &query).await?;
                // A server that ignores the filter must not make old objects new.
                let objects: Vec<_> = objects
                    .into_iter()
                    .filter(|o| int(o.get("created")).is_some_and(|c| c > since))
                    .collect();
                let newest = objects
                    .iter()
                    .filter_map(|o| int(o.get("created")))
                    .fold(newest, i64::max);
                let count = objects.len();
                let records = objects
                    .iter()
                    .enumerate()
                    .map(|(i, o)| {
                        let position = if !more && i + 1 == count {
                            // The sync is complete: the next starts after the newest.
                            Position::int(newest)
                        } else {
                            Position::of([
                                Value::from(since),
                                Value::from(ordinal + 1 + i as i64),
                                o.get("id").cloned().unwrap_or(Value::Null),
                                Value::from(newest),
                            ])
                        };
                        SourceRecord {
                            data: project(stream, o),
                            position,
                        }
                    })
                    .collect::<Vec<_>>();
                Ok(Slice {
                    done: !more || records.is_empty(),
                    records,
                })
            }
        }
    }

    async fn sync_start(
        &self,
        _ctx: &Context,
        _stream: &StreamSchema,
    ) -> Result<Option<Position>, ActivityError> {
        Ok(Some(Position::int(chrono::Utc::now().timestamp())))
    }

    fn input_records(&self, input: &Value) -> Result<Vec<InputRecord>, String> {
        let kind = input["type"]
            .as_str()
            .ok_or("a Stripe event has a type, e.g. \"customer.updated\"")?;
        let object = input["data"]["object"]
            .as_object()
            .ok_or("a Stripe event carries its object in data.object")?;
        let object_type = object
            .get("object")
            .and_then(Value::as_str)
            .ok_or("the event's data.object has no \"object\" type")?;
        let Some(stream) = stream_of_object(object_type) else {
            // Events about objects no stream holds (payment intents, ...) change nothing.
            return Ok(Vec::new());
        };
        if object.get("id").and_then(Value::as_str).is_none() {
            return Err("the event's data.object has no id".into());
        }
        let schema = schema_of(stream).expect("every stream has a schema");
        let mut record = project(&schema, object);
        if schema.field("deleted").is_some() {
            record.insert("deleted".into(), Value::Bool(kind.ends_with(".deleted")));
        }
        Ok(vec![(stream.to_owned(), record)])
    }

    fn slice_size(&self) -> usize {
        self.config.page_size as usize
    }

    fn hosts(&self) -> Vec<String> {
        self.config
            .base_url
            .host_str()
            .map(str::to_owned)
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> StripeSource {
        StripeSource {
            config: parse(
                json!({"api_key": "sk_test_1"}).as_object().expect("object"),
                "s",
            )
            .expect("valid"),
        }
    }

    #[test]
    fn configs_are_checked() {
        for (bad, field) in [
            (json!({}), "s.api_key"),
            (json!({"api_key": "sk 1"}), "s.api_key"),
            (json!({"api_key": "k", "base_url": "ftp://x"}), "s.base_url"),
            (
                json!({"api_key": "k", "base_url": "https://u:p@x"}),
                "s.base_url",
            ),
            (json!({"api_key": "k", "page_size": 101}), "s.page_size"),
            (json!({"api_key": "k", "pagesize": 1}), "s.pagesize"),
        ] {
            let err = parse(bad.as_object().expect("object"), "s").expect_err("invalid");
            assert_eq!(err.field, field, "{bad}");
        }
    }

    #[test]
    fn events_become_typed_records_of_their_stream() {
        let s = source();
        let event = json!({"type": "customer.updated", "data": {"object": {
            "id": "cus_1", "object": "customer", "email": "a@b.c", "created": 1_700_000_000,
            "balance": 5, "metadata": {"k": "v"}, "discount": {"id": "d"}
        }}});
        let records = s.input_records(&event).expect("an event");
        assert_eq!(records.len(), 1);
        let (stream, record) = &records[0];
        assert_eq!(stream, "customers");
        assert_eq!(record["created"], json!("2023-11-14T22:13:20+00:00"));
        assert_eq!(record["deleted"], json!(false));
        assert!(!record.contains_key("discount"));
        let deleted =
            json!({"type": "price.deleted", "data": {"object": {"id": "p", "object": "price"}}});
        assert_eq!(
            s.input_records(&deleted).expect("event")[0].1["deleted"],
            json!(true)
        );
        let other = json!({"type": "payment_intent.created", "data": {"object": {"id": "pi", "object": "payment_intent"}}});
        assert!(s.input_records(&other).expect("ignored").is_empty());
        assert!(s.input_records(&json!({"stream": "x"})).is_err());
    }
}
