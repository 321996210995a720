//! The `postgres` source: tables of one schema, each a stream.
//!
//! - **Discover** reads the catalog: the schema's tables (or the listed ones) with a
//!   primary key, their columns as typed fields, and the cursor column if the table
//!   has it.
//! - **Backfill** pages through a table by its primary key (keyset pagination: `WHERE
//!   (key) > (last) ORDER BY key LIMIT n`, text keys in byte order), so a slice read
//!   again after a crash starts from the same place and its records keep their
//!   positions (the key).
//! - **Sync** reads the rows whose cursor column moved past where the last sync got to,
//!   in (cursor, key) order; the first sync starts from the cursor's maximum taken
//!   before the backfill, so what changes during the backfill is read too. Rows deleted
//!   at the source are not seen (there is no cursor to see them by).
//!
//! Values are read as JSON (`to_jsonb`), exact decimals and other types without a JSON
//! form as text, instants in UTC.

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use sluice_protocol::catalog::{Field, FieldType, StreamSchema};
use sluice_protocol::secrets::{SecretField, SecretKind};
use sluice_protocol::spec::{check_identifier, url_parameter, ConfigReader};
use sluice_protocol::FieldViolation;
use sqlx::Row;

use crate::pg::{check_url, ident};
use crate::registry::SourceKind;
use crate::{ActivityError, Context, Position, ReadMode, Slice, Source, SourceRecord};

/// The column a sync read's cursor value travels in (removed from the record).
const CURSOR_ALIAS: &str = "__sluice_cursor";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSourceConfig {
    pub url: String,
    pub schema: String,
    /// The tables to read; None: every table of the schema that has a primary key.
    pub tables: Option<Vec<String>>,
    /// The column syncs read changes by (e.g. `updated_at`), in the tables that have it.
    pub cursor_column: Option<String>,
    pub slice_size: u64,
    pub ssl_ca_pem: Option<String>,
}

pub struct PostgresSourceKind;

impl SourceKind for PostgresSourceKind {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn summary(&self) -> &'static str {
        "PostgreSQL tables: a keyset backfill, then syncs by a cursor column"
    }

    fn config_schema(&self) -> Value {
        json!({
            "type": "object",
            "required": ["url"],
            "additionalProperties": false,
            "properties": {
                "url": {"type": "string", "description": "postgres://user:password@host:port/database (secret)"},
                "schema": {"type": "string", "default": "public"},
                "tables": {"type": "array", "items": {"type": "string"}, "description": "tables to read; default: every table with a primary key"},
                "cursor_column": {"type": "string", "description": "a column that grows when a row changes (timestamp or integer), e.g. updated_at"},
                "slice_size": {"type": "integer", "minimum": 1, "maximum": 100000, "default": 5000},
                "ssl_ca_pem": {"type": "string", "description": "the server's CA certificate(s), PEM"}
            }
        })
    }

    fn secret_fields(&self) -> &'static [SecretField] {
        &[SecretField {
            key: "url",
            kind: SecretKind::UrlPassword,
        }]
    }

    fn build(
        &self,
        config: &Map<String, Value>,
        path: &str,
    ) -> Result<Box<dyn Source>, FieldViolation> {
        Ok(Box::new(PostgresSource {
            config: parse(config, path)?,
        }))
    }
}

pub fn parse(
    config: &Map<String, Value>,
    path: &str,
) -> Result<PostgresSourceConfig, FieldViolation> {
    let mut reader = ConfigReader::new(config, path.to_owned());
    let url = reader.string("url", None)?;
    if sluice_protocol::secrets::is_sealed(&url) {
        return Err(reader.violation(
            "url",
            "is encrypted and this process has no (or another) secrets key; \
             start it with --secrets-key-file",
        ));
    }
    check_url(&url).map_err(|d| reader.violation("url", &d))?;
    let schema = reader.string("schema", Some("public"))?;
    check_identifier(&schema).map_err(|d| reader.violation("schema", d))?;
    let tables = reader.string_list("tables")?;
    if let Some(tables) = &tables {
        if tables.is_empty() {
            return Err(reader.violation(
                "tables",
                "must name at least one table (or be left out for all)",
            ));
        }
        for t in tables {
            check_identifier(t).map_err(|d| reader.violation("tables", &format!("{t:?} {d}")))?;
        }
    }
    let cursor_column = reader.optional_string("cursor_column")?;
    if let Some(c) = &cursor_column {
        check_identifier(c).map_err(|d| reader.violation("cursor_column", d))?;
    }
    let slice_size = reader.u64("slice_size", Some(5000))?;
    if !(1..=100_000).contains(&slice_size) {
        return Err(reader.violation("slice_size", "must be between 1 and 100000"));
    }
    let ssl_ca_pem = reader.optional_string("ssl_ca_pem")?;
    if ssl_ca_pem.is_some() && url_parameter(&url, "sslrootcert").is_some() {
        return Err(reader.violation(
            "ssl_ca_pem",
            "and sslrootcert in the url both name a CA; give one",
        ));
    }
    reader.reject_unknown()?;
    Ok(PostgresSourceConfig {
        url,
        schema,
        tables,
        cursor_column,
        slice_size,
        ssl_ca_pem,
    })
}

#[derive(Debug)]
pub struct PostgresSource {
    pub config: PostgresSourceConfig,
}

/// A column as the catalog describes it.
struct Column {
    name: String,
    pg_type: String,
    field_type: FieldType,
}

fn field_type(pg_type: &str) -> FieldType {
    match pg_type {
        "int2" | "int4" | "int8" => FieldType::Integer,
        "float4" | "float8" => FieldType::Number,
        "numeric" => FieldType::Decimal,
        "bool" => FieldType::Boolean,
        "timestamptz" | "timestamp" => FieldType::Timestamp,
        "date" => FieldType::Date,
        "json" | "jsonb" => FieldType::Json,
        _ => FieldType::String,
    }
}

/// Whether a key column of this type orders by collation (and is compared in byte
/// order, `COLLATE "C"`, as positions are).
fn collated(pg_type: &str) -> bool {
    matches!(pg_type, "text" | "varchar" | "bpchar" | "name")
}

impl PostgresSource {
    async fn database(&self, ctx: &Context) -> Result<crate::pg::Database, ActivityError> {
        ctx.pg_pools
            .get(ctx, &self.config.url, self.config.ssl_ca_pem.as_deref())
            .await
    }

    fn table(&self, name: &str) -> String {
        format!("{}.{}", ident(&self.config.schema), ident(name))
    }

    /// The columns of `table` with their PostgreSQL type names.
    async fn columns(
        &self,
        pool: &sqlx::PgPool,
        table: &str,
    ) -> Result<Vec<Column>, ActivityError> {
        let rows = sqlx::query(
            "SELECT a.attname::text, t.typname::text FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_type t ON t.oid = a.atttypid \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
        )
        .bind(&self.config.schema)
        .bind(table)
        .fetch_all(pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let pg_type: String = r.get(1);
                Column {
                    name: r.get(0),
                    field_type: field_type(&pg_type),
                    pg_type,
                }
            })
            .collect())
    }

    /// The select list that reads every field as JSON-friendly values.
    fn select_list(stream: &StreamSchema, columns: &[Column]) -> String {
        stream
            .fields
            .iter()
            .map(|f| {
                let col = ident(&f.name);
                let pg_type = columns
                    .iter()
                    .find(|c| c.name == f.name)
                    .map_or("text", |c| c.pg_type.as_str());
                match f.field_type {
                    // No digit of a numeric is lost on the way; types without a JSON
                    // form travel as their text.
                    FieldType::Decimal => format!("{col}::text AS {col}"),
                    FieldType::String if pg_type != "text" => format!("{col}::text AS {col}"),
                    _ => col,
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The expression a sync compares by: timestamps as microseconds since the epoch,
    /// dates as days, integers as they are.
    fn cursor_expr(stream: &StreamSchema) -> Option<String> {
        let field = stream.field(stream.cursor_field.as_deref()?)?;
        let col = ident(&field.name);
        Some(match field.field_type {
            FieldType::Timestamp => format!("(extract(epoch FROM {col}) * 1000000)::bigint"),
            FieldType::Date => format!("({col} - date '1970-01-01')"),
            _ => col,
        })
    }
}

#[async_trait]
impl Source for PostgresSource {
    async fn discover(&self, ctx: &Context) -> Result<Vec<StreamSchema>, ActivityError> {
        let db = self.database(ctx).await?;
        let result: Result<Vec<StreamSchema>, ActivityError> = async {
            let present: Vec<String> = sqlx::query_scalar(
                "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') ORDER BY 1",
            )
            .bind(&self.config.schema)
            .fetch_all(&*db)
            .await?;
            let wanted: Vec<String> = match &self.config.tables {
                Some(tables) => {
                    if let Some(missing) = tables.iter().find(|t| !present.contains(t)) {
                        return Err(ActivityError::config(format!(
                            "table {}.{missing} does not exist",
                            self.config.schema
                        )));
                    }
                    tables.clone()
                }
                None => present,
            };
            let mut streams = Vec::new();
            for table in wanted {
                let key: Vec<String> = sqlx::query_scalar(
                    "SELECT a.attname::text FROM pg_index i \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                     WHERE i.indrelid = to_regclass($1) AND i.indisprimary \
                     ORDER BY array_position(i.indkey::int2[], a.attnum)",
                )
                .bind(self.table(&table))
                .fetch_all(&*db)
                .await?;
                if key.is_empty() {
                    if self.config.tables.is_some() {
                        return Err(ActivityError::config(format!(
                            "table {}.{table} has no primary key: it cannot be read exactly once",
                            self.config.schema
                        )));
                    }
                    tracing::warn!(table = %table, "skipping a table without a primary key");
                    continue;
                }
                let columns = self.columns(&db, &table).await?;
                let cursor_field = self.config.cursor_column.clone().filter(|c| {
                    columns.iter().any(|col| {
                        &col.name == c
                            && matches!(
                                col.field_type,
                                FieldType::Timestamp | FieldType::Date | FieldType::Integer
                            )
                    })
                });
                streams.push(StreamSchema {
                    name: table,
                    fields: columns
                        .iter()
                        .map(|c| Field {
                            name: c.name.clone(),
                            field_type: c.field_type,
                        })
                        .collect(),
                    primary_key: key,
                    cursor_field,
                });
            }
            Ok(streams)
        }
        .await;
        db.explained(result).await
    }

    async fn read(
        &self,
        ctx: &Context,
        stream: &StreamSchema,
        mode: ReadMode,
        after: Option<&Position>,
        limit: usize,
    ) -> Result<Slice, ActivityError> {
        let db = self.database(ctx).await?;
        let result = async {
            let columns = self.columns(&db, &stream.name).await?;
            let key_types: Vec<&str> = stream
                .primary_key
                .iter()
                .map(|k| {
                    columns
                        .iter()
                        .find(|c| &c.name == k)
                        .map_or("text", |c| c.pg_type.as_str())
                })
                .collect();
            let key_exprs: Vec<String> = stream
                .primary_key
                .iter()
                .zip(&key_types)
                .map(|(k, t)| {
                    if collated(t) {
                        format!("{} COLLATE \"C\"", ident(k))
                    } else {
                        ident(k)
                    }
                })
                .collect();
            let mut params: Vec<Option<String>> = Vec::new();
            let mut bind = |v: &Value, pg_type: &str| {
                params.push(match v {
                    Value::Null => None,
                    Value::String(s) => Some(s.clone()),
                    other => Some(other.to_string()),
                });
                format!("${}::text::{}", params.len() + 1, pg_type)
            };
            let (select, condition, order) = match mode {
                ReadMode::Backfill => {
                    let condition = match after {
                        Some(p) if p.0.len() == key_exprs.len() => {
                            let values: Vec<String> = p
                                .0
                                .iter()
                                .zip(&key_types)
                                .map(|(v, t)| bind(v, t))
                                .collect();
                            format!(
                                "WHERE ({}) > ({})",
                                key_exprs.join(", "),
                                values.join(", ")
                            )
                        }
                        _ => String::new(),
                    };
                    (
                        Self::select_list(stream, &columns),
                        condition,
                        key_exprs.join(", "),
                    )
                }
                ReadMode::Sync => {
                    let Some(cursor) = Self::cursor_expr(stream) else {
                        return Ok(Slice {
                            records: Vec::new(),
                            done: true,
                        });
                    };
                    let mut condition = format!("WHERE {cursor} IS NOT NULL");
                    match after {
                        Some(p) if p.0.len() == key_exprs.len() + 1 => {
                            let c = bind(&p.0[0], "bigint");
                            let values: Vec<String> = p.0[1..]
                                .iter()
                                .zip(&key_types)
                                .map(|(v, t)| bind(v, t))
                                .collect();
                            condition.push_str(&format!(
                                " AND ({cursor}, {}) > ({c}, {})",
                                key_exprs.join(", "),
                                values.join(", ")
                            ));
                        }
                        Some(p) if p.0.first().is_some_and(|v| !v.is_null()) => {
                            let c = bind(&p.0[0], "bigint");
                            condition.push_str(&format!(" AND {cursor} > {c}"));
                        }
                        _ => {}
                    }
                    (
                        format!(
                            "{}, {cursor} AS {}",
                            Self::select_list(stream, &columns),
                            ident(CURSOR_ALIAS)
                        ),
                        condition,
                        format!("{cursor}, {}", key_exprs.join(", ")),
                    )
                }
            };
            let sql = format!(
                "SELECT to_jsonb(s) FROM (SELECT {select} FROM {} {condition} ORDER BY {order} LIMIT $1) s",
                self.table(&stream.name)
            );
            let mut query = sqlx::query_scalar::<_, Value>(&sql).bind(limit as i64);
            for p in &params {
                query = query.bind(p);
            }
            let rows = query.fetch_all(&*db).await?;
            let done = rows.len() < limit;
            let records = rows
                .into_iter()
                .map(|row| {
                    let Value::Object(mut data) = row else {
                        return Err(ActivityError::Invariant("a row did not read as a JSON object".into()));
                    };
                    let mut position: Vec<Value> = Vec::new();
                    if mode == ReadMode::Sync {
                        position.push(data.remove(CURSOR_ALIAS).unwrap_or(Value::Null));
                    }
                    position.extend(
                        stream
                            .primary_key
                            .iter()
                            .map(|k| data.get(k).cloned().unwrap_or(Value::Null)),
                    );
                    Ok(SourceRecord {
                        data,
                        position: Position(position),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Slice { records, done })
        }
        .await;
        db.explained(result).await
    }

    async fn sync_start(
        &self,
        ctx: &Context,
        stream: &StreamSchema,
    ) -> Result<Option<Position>, ActivityError> {
        let Some(cursor) = Self::cursor_expr(stream) else {
            return Ok(None);
        };
        let db = self.database(ctx).await?;
        let result = async {
            let max: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT max({cursor})::bigint FROM {}",
                self.table(&stream.name)
            ))
            .fetch_one(&*db)
            .await?;
            Ok(Some(Position(vec![max.map_or(Value::Null, Value::from)])))
        }
        .await;
        db.explained(result).await
    }

    fn slice_size(&self) -> usize {
        self.config.slice_size as usize
    }

    fn hosts(&self) -> Vec<String> {
        crate::pg::url_host(&self.config.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_validated_naming_the_field() {
        let parse_json = |v: Value| {
            let config: Map<String, Value> = serde_json::from_value(v).expect("test config");
            parse(&config, "s")
        };
        let ok = parse_json(
            json!({"url": "postgres://db/x", "tables": ["orders"], "cursor_column": "updated_at"}),
        )
        .expect("valid");
        assert_eq!(ok.tables.as_deref(), Some(&["orders".to_owned()][..]));
        assert_eq!(ok.slice_size, 5000);
        for (bad, field) in [
            (json!({}), "s.url"),
            (json!({"url": "postgres://u@%2Fvar%2Frun/x"}), "s.url"),
            (json!({"url": "postgres://db/x", "tables": []}), "s.tables"),
            (
                json!({"url": "postgres://db/x", "tables": ["Bad Name"]}),
                "s.tables",
            ),
            (
                json!({"url": "postgres://db/x", "tables": "orders"}),
                "s.tables",
            ),
            (
                json!({"url": "postgres://db/x", "cursor_column": "x;drop"}),
                "s.cursor_column",
            ),
            (
                json!({"url": "postgres://db/x", "slice_size": 0}),
                "s.slice_size",
            ),
            (json!({"url": "postgres://db/x", "extra": 1}), "s.extra"),
        ] {
            assert_eq!(
                parse_json(bad.clone()).expect_err("invalid").field,
                field,
                "{bad}"
            );
        }
    }

    #[test]
    fn types_map_to_fields_and_text_keys_compare_in_byte_order() {
        assert_eq!(field_type("int8"), FieldType::Integer);
        assert_eq!(field_type("numeric"), FieldType::Decimal);
        assert_eq!(field_type("timestamptz"), FieldType::Timestamp);
        assert_eq!(field_type("uuid"), FieldType::String);
        assert!(collated("varchar") && !collated("uuid") && !collated("int8"));
    }
}
