//! Destination checks that can see a replay or a stale write, not only a row count.
//!
//! A [`WriteAudit`] puts an `AFTER INSERT OR UPDATE` trigger on a destination table that
//! logs every row the worker writes (key, values, version, and the writing session's
//! `application_name`, which names the worker). An upsert that rewrites a row, a replayed
//! batch, or an old owner's late write each leave a line there, where a `count(*)` of
//! the upserted table would look the same.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use sluice_protocol::catalog::generator_record;
use sqlx::{PgPool, Row};

/// One write the trigger saw.
#[derive(Debug, Clone)]
pub struct Write {
    pub seq: i64,
    pub id: i64,
    pub name: String,
    pub amount: i64,
    pub writer: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

pub struct WriteAudit {
    pub table: String,
    log: String,
}

impl WriteAudit {
    /// Installs the trigger on `public.<table>`, which must exist (create the pipeline
    /// PAUSED first: setup makes the table without writing a row).
    pub async fn install(pool: &PgPool, table: &str) -> Result<Self> {
        let log = format!("{table}_writes");
        let statements = [
            format!(
                "CREATE TABLE public.{log} (seq BIGSERIAL PRIMARY KEY, id BIGINT, name TEXT, \
                 amount BIGINT, writer TEXT, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(), \
                 tx BIGINT NOT NULL DEFAULT txid_current())"
            ),
            format!(
                "CREATE FUNCTION public.{log}_fn() RETURNS trigger LANGUAGE plpgsql \
                 SECURITY DEFINER AS $$ BEGIN \
                 INSERT INTO public.{log} (id, name, amount, writer) \
                 VALUES (NEW.id, NEW.name, NEW.amount, current_setting('application_name')); \
                 RETURN NULL; END $$"
            ),
            format!(
                "CREATE TRIGGER {log}_trg AFTER INSERT OR UPDATE ON public.{table} \
                 FOR EACH ROW EXECUTE FUNCTION public.{log}_fn()"
            ),
        ];
        for s in statements {
            sqlx::query(&s).execute(pool).await?;
        }
        Ok(Self {
            table: table.to_owned(),
            log,
        })
    }

    /// How many writes were logged so far.
    pub async fn count(&self, pool: &PgPool) -> Result<usize> {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM public.{}", self.log))
            .fetch_one(pool)
            .await?;
        Ok(usize::try_from(n).unwrap_or_default())
    }

    /// The most rows one destination transaction wrote.
    pub async fn largest_transaction(&self, pool: &PgPool) -> Result<i64> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT COALESCE(max(n), 0) FROM (SELECT count(*) AS n FROM public.{} GROUP BY tx) t",
            self.log
        ))
        .fetch_one(pool)
        .await?)
    }

    /// Every write logged so far, in commit order of the log.
    pub async fn writes(&self, pool: &PgPool) -> Result<Vec<Write>> {
        let rows = sqlx::query(&format!(
            "SELECT seq, id, name, amount, writer, at FROM public.{} ORDER BY seq",
            self.log
        ))
        .fetch_all(pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Write {
                    seq: r.try_get("seq")?,
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    amount: r.try_get("amount")?,
                    writer: r.try_get("writer")?,
                    at: r.try_get("at")?,
                })
            })
            .collect()
    }

    /// Checks the table against the generator's `count` records of `seed`:
    /// - the table holds exactly ids 0..count, each row equal to the generator's record;
    /// - among the writes after `since` (all writes when None), each id was written
    ///   exactly once, with the generator's values: no replay, and no write of any
    ///   other data (an old spec's or an old owner's) after `since`.
    pub async fn check_exact(
        &self,
        pool: &PgPool,
        seed: u64,
        count: u64,
        since: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<()> {
        check_rows(pool, &self.table, seed, count).await?;
        let writes = self.writes(pool).await?;
        let mut per_key: BTreeMap<i64, u32> = BTreeMap::new();
        let mut foreign = Vec::new();
        for w in writes.iter().filter(|w| since.is_none_or(|t| w.at >= t)) {
            let expected = generator_record(seed, w.id as u64);
            let same = expected["name"].as_str() == Some(w.name.as_str())
                && expected["amount"].as_i64() == Some(w.amount);
            if same {
                *per_key.entry(w.id).or_default() += 1;
            } else {
                foreign.push(w.clone());
            }
        }
        if !foreign.is_empty() {
            bail!(
                "{} writes of other data after the checkpoint, e.g. {:?}",
                foreign.len(),
                &foreign[..foreign.len().min(3)]
            );
        }
        let replayed: Vec<(i64, u32)> = per_key
            .iter()
            .filter(|(_, n)| **n != 1)
            .map(|(k, n)| (*k, *n))
            .take(5)
            .collect();
        if !replayed.is_empty() {
            bail!(
                "keys written more than once: {} (e.g. id, writes: {replayed:?})",
                per_key.values().filter(|n| **n != 1).count()
            );
        }
        if per_key.len() as u64 != count {
            bail!(
                "{} of {count} keys were written after the checkpoint",
                per_key.len()
            );
        }
        Ok(())
    }
}

/// The table holds exactly the generator's records 0..count of `seed`.
pub async fn check_rows(pool: &PgPool, table: &str, seed: u64, count: u64) -> Result<()> {
    let rows = sqlx::query(&format!(
        "SELECT id, name, amount, score, active FROM public.{table} ORDER BY id"
    ))
    .fetch_all(pool)
    .await?;
    if rows.len() as u64 != count {
        bail!("{table} holds {} rows, expected {count}", rows.len());
    }
    for (i, row) in rows.iter().enumerate() {
        let id: i64 = row.try_get("id")?;
        if id != i as i64 {
            bail!("{table}: row {i} has id {id}");
        }
        let expected = generator_record(seed, id as u64);
        let got = (
            row.try_get::<Option<String>, _>("name")?,
            row.try_get::<Option<i64>, _>("amount")?,
            row.try_get::<Option<f64>, _>("score")?,
            row.try_get::<Option<bool>, _>("active")?,
        );
        let want = (
            expected["name"].as_str().map(str::to_owned),
            expected["amount"].as_i64(),
            expected["score"].as_f64(),
            expected["active"].as_bool(),
        );
        if got != want {
            bail!("{table}: row {id} is {got:?}, the source has {want:?} (seed {seed})");
        }
    }
    Ok(())
}

/// Every place in the database's own tables (schema public) where `needle` appears: any
/// column read as text, and bytea columns searched as bytes. Returns "table.column" names.
pub async fn find_in_database(pool: &PgPool, needle: &str) -> Result<Vec<String>> {
    let columns = sqlx::query(
        "SELECT c.table_name::text, c.column_name::text, c.data_type::text \
         FROM information_schema.columns c JOIN information_schema.tables t \
           ON t.table_schema = c.table_schema AND t.table_name = c.table_name \
         WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'",
    )
    .fetch_all(pool)
    .await?;
    let mut found = Vec::new();
    for c in columns {
        let (table, column, data_type): (String, String, String) =
            (c.try_get(0)?, c.try_get(1)?, c.try_get(2)?);
        let condition = if data_type == "bytea" {
            format!("position(convert_to($1, 'UTF8') in \"{column}\") > 0")
        } else {
            format!("strpos(\"{column}\"::text, $1) > 0")
        };
        let hits: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM public.\"{table}\" WHERE {condition}"
        ))
        .bind(needle)
        .fetch_one(pool)
        .await?;
        if hits > 0 {
            found.push(format!("{table}.{column}"));
        }
    }
    Ok(found)
}
