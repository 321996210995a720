//! Connections to PostgreSQL databases named by tenants' specs (the postgres source and
//! destination), made so that nothing a spec says can use the worker's own identity or
//! files: a URL without a password gets an empty one (not the worker's PGPASSWORD or
//! ~/.pgpass), a CA comes inline or by bare name from the operator's CA directory, the
//! host must pass the operator's host lists, and every session has lock, statement and
//! idle-in-transaction timeouts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use sluice_protocol::spec::{is_bare_file_name, is_network_host};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::{ActivityError, Context};

/// Largest CA file read from the worker's CA directory.
const MAX_CA_FILE_BYTES: u64 = 1 << 20;
/// How long a session may sit idle inside a transaction before the server ends it, when
/// the worker sets no shorter bound: a worker stopped mid-transaction must not hold its
/// locks for ever.
const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a statement waits for a lock before failing (and being retried).
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections one database's pool may open.
pub const CONNECTIONS_PER_DATABASE: u32 = 4;
/// Default of the worker's cap on connections to all tenants' databases together.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;
/// How long an operation waits for room under the cap before it fails (and is retried).
const ROOM_TIMEOUT: Duration = Duration::from_secs(10);

/// Pools per database (URL and CA), shared by all pipelines of a worker so that
/// thousands of pipelines on one database do not open thousands of pools, and capped
/// together: at most `max_connections` connections are open to all databases at once.
/// Each pool opens up to [`CONNECTIONS_PER_DATABASE`], so the worker keeps at most
/// `max_connections / 4` pools; a database that needs one when that many exist takes
/// the place of the pool used least recently among those no operation holds (closing
/// its idle connections), and waits while every pool is held.
#[derive(Debug)]
pub struct Pools {
    pools: Mutex<HashMap<String, Database>>,
    max_connections: u32,
}

impl Default for Pools {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_CONNECTIONS)
    }
}

/// A database's pool, and the options it connects with. Held by an operation for as
/// long as it uses the database: a held pool is never closed to make room for another.
#[derive(Debug, Clone)]
pub struct Database {
    pool: PgPool,
    options: PgConnectOptions,
    /// Counts the holders (the pool map holds one).
    holders: std::sync::Arc<()>,
    last_used: std::sync::Arc<Mutex<std::time::Instant>>,
}

impl std::ops::Deref for Database {
    type Target = PgPool;

    fn deref(&self) -> &PgPool {
        &self.pool
    }
}

/// What a pool reports when it could not connect before its acquire timeout; the
/// reason why is lost on the way.
const POOL_TIMED_OUT: &str = "pool timed out while waiting for an open connection";

impl Database {
    /// Passes `result` through, except a pool that timed out waiting for a connection:
    /// that is replaced by the error of one direct connection attempt, so the pipeline
    /// shows why (connection refused, unknown host, bad password) and the failure is
    /// classified by it (a bad password is not retried).
    pub async fn explained<T>(&self, result: Result<T, ActivityError>) -> Result<T, ActivityError> {
        match result {
            Err(ActivityError::Failed { message, .. }) if message.ends_with(POOL_TIMED_OUT) => {
                let attempt = tokio::time::timeout(
                    Duration::from_secs(5),
                    PgConnection::connect_with(&self.options),
                )
                .await;
                Err(match attempt {
                    Ok(Err(e)) => e.into(),
                    Ok(Ok(conn)) => {
                        let _ = conn.close().await;
                        ActivityError::transient(format!("database: {POOL_TIMED_OUT}"))
                    }
                    Err(_) => ActivityError::transient("connecting to the database timed out"),
                })
            }
            other => other,
        }
    }
}

impl Pools {
    /// Pools capped at `max_connections` connections together (at least one pool).
    pub fn new(max_connections: u32) -> Self {
        Self {
            pools: Mutex::default(),
            max_connections,
        }
    }

    /// Pools the cap leaves room for.
    fn max_pools(&self) -> usize {
        (self.max_connections / CONNECTIONS_PER_DATABASE).max(1) as usize
    }

    /// The pool for `url` (with an inline CA, if any); the host lists are checked (and
    /// a CA file read) when the pool is made. Hold it only while using it.
    pub async fn get(
        &self,
        ctx: &Context,
        url: &str,
        ssl_ca_pem: Option<&str>,
    ) -> Result<Database, ActivityError> {
        let key = format!("{url}\n{}", ssl_ca_pem.unwrap_or_default());
        let mut options = None;
        let waiting = std::time::Instant::now();
        loop {
            if let Some(database) = self.lock().get(&key) {
                *database.last_used.lock().unwrap_or_else(|e| e.into_inner()) =
                    std::time::Instant::now();
                return Ok(database.clone());
            }
            if options.is_none() {
                options = Some(connect_options(ctx, url, ssl_ca_pem).await?);
            }
            let opts = options.as_ref().expect("set above");
            if let Some((database, evicted)) = self.make_room_and_insert(&key, opts) {
                // The connections given up are closed before the new pool opens any.
                if let Some(evicted) = evicted {
                    evicted.pool.close().await;
                }
                return Ok(database);
            }
            if waiting.elapsed() > ROOM_TIMEOUT {
                return Err(ActivityError::transient(format!(
                    "every one of the worker's {} connections to databases is in use \
                     (--max-database-connections); retrying",
                    self.max_connections
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Inserts a new pool for `key` if there is room, or if a pool nobody holds can
    /// give up its place (the least recently used, returned to be closed); None if
    /// every pool is held.
    fn make_room_and_insert(
        &self,
        key: &str,
        options: &PgConnectOptions,
    ) -> Option<(Database, Option<Database>)> {
        let mut pools = self.lock();
        if let Some(database) = pools.get(key) {
            return Some((database.clone(), None));
        }
        let mut evicted = None;
        if pools.len() >= self.max_pools() {
            let unheld = pools
                .iter()
                .filter(|(_, d)| std::sync::Arc::strong_count(&d.holders) == 1)
                .min_by_key(|(_, d)| *d.last_used.lock().unwrap_or_else(|e| e.into_inner()))
                .map(|(k, _)| k.clone())?;
            evicted = pools.remove(&unheld);
            tracing::debug!("database pool closed to make room under the connection cap");
        }
        let pool = PgPoolOptions::new()
            .max_connections(CONNECTIONS_PER_DATABASE)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options.clone());
        let database = Database {
            pool,
            options: options.clone(),
            holders: std::sync::Arc::new(()),
            last_used: std::sync::Arc::new(Mutex::new(std::time::Instant::now())),
        };
        pools.insert(key.to_owned(), database.clone());
        Some((database, evicted))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Database>> {
        self.pools.lock().expect("pool map lock is never poisoned")
    }
}

async fn connect_options(
    ctx: &Context,
    url: &str,
    ssl_ca_pem: Option<&str>,
) -> Result<PgConnectOptions, ActivityError> {
    let mut url = url::Url::parse(url).map_err(|_| ActivityError::config("url is not a URL"))?;
    let host = url.host_str().unwrap_or_default().to_owned();
    if !is_network_host(&host) {
        return Err(ActivityError::config(format!(
            "host {host:?} is not a DNS name or IP address"
        )));
    }
    if !ctx.hosts.is_empty() {
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = url.port().unwrap_or(5432);
        // A name that does not resolve is checked by name alone; connecting fails later.
        let addrs: Vec<IpAddr> = tokio::net::lookup_host((bare.as_str(), port))
            .await
            .map(|found| found.map(|a| a.ip()).collect())
            .unwrap_or_default();
        ctx.hosts
            .check(&host, &addrs)
            .map_err(ActivityError::config)?;
    }
    // sslrootcert would make the driver read a path of the worker's choosing; it is
    // taken out of the URL and resolved in the CA directory instead.
    let root_cert = url
        .query_pairs()
        .find(|(k, _)| k == "sslrootcert")
        .map(|(_, v)| v.into_owned());
    let has_password = url.password().is_some() || url.query_pairs().any(|(k, _)| k == "password");
    let has_application_name = url.query_pairs().any(|(k, _)| k == "application_name");
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "sslrootcert")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    let mut options = PgConnectOptions::from_str(url.as_str())
        .map_err(|e| ActivityError::config(format!("url: {e}")))?;
    if !has_password {
        options = options.password("");
    }
    if let Some(name) = root_cert {
        let dir = ctx.ca_dir.clone();
        let pem = tokio::task::spawn_blocking(move || read_ca_file(dir.as_deref(), &name))
            .await
            .expect("reading a CA file does not panic")?;
        options = options.ssl_root_cert_from_pem(pem);
    }
    if let Some(pem) = ssl_ca_pem {
        options = options.ssl_root_cert_from_pem(pem.as_bytes().to_vec());
    }
    if !has_application_name {
        options = options.application_name(&format!("sluice-worker/{}", ctx.worker_id));
    }
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    Ok(options.options([
        ("lock_timeout", ms(LOCK_TIMEOUT)),
        ("statement_timeout", ms(ctx.statement_timeout)),
        (
            "idle_in_transaction_session_timeout",
            ms(if ctx.idle_in_transaction_timeout.is_zero() {
                IDLE_IN_TRANSACTION_TIMEOUT
            } else {
                ctx.idle_in_transaction_timeout
            }),
        ),
        // Positions and cursors are read in UTC, whatever the server's default.
        ("TimeZone", "UTC".to_owned()),
    ]))
}

/// Reads CA file `name` of the worker's CA directory: a regular file directly inside
/// it (no path, no symlink out of it), of bounded size.
fn read_ca_file(dir: Option<&Path>, name: &str) -> Result<Vec<u8>, ActivityError> {
    use std::io::Read;
    let dir = dir.ok_or_else(|| {
        ActivityError::config(format!(
            "sslrootcert={name} names a CA file of the workers' CA directory, and this worker \
             has none (--destination-ca-dir); or give the certificate inline as ssl_ca_pem"
        ))
    })?;
    let missing =
        || ActivityError::config(format!("no CA file {name:?} in the workers' CA directory"));
    if !is_bare_file_name(name) {
        return Err(missing());
    }
    let dir = std::fs::canonicalize(dir).map_err(|_| missing())?;
    let path = std::fs::canonicalize(dir.join(name)).map_err(|_| missing())?;
    if path.parent() != Some(dir.as_path()) {
        return Err(missing());
    }
    let file = std::fs::File::open(&path).map_err(|_| missing())?;
    let metadata = file.metadata().map_err(|_| missing())?;
    if !metadata.is_file() {
        return Err(missing());
    }
    let mut pem = Vec::new();
    file.take(MAX_CA_FILE_BYTES + 1)
        .read_to_end(&mut pem)
        .map_err(|_| missing())?;
    if pem.len() as u64 > MAX_CA_FILE_BYTES {
        return Err(ActivityError::config(format!(
            "CA file {name:?} is larger than {MAX_CA_FILE_BYTES} bytes"
        )));
    }
    Ok(pem)
}

/// URL query parameters a spec's PostgreSQL URL may use. Everything else is refused:
/// parameters that name files or sockets on the worker (sslcert, sslkey, host=/path,
/// passfile) would let a spec use the worker's own credentials, and unknown ones are
/// logged by the driver with their values. `sslrootcert` is allowed only as a bare file
/// name, which the worker looks up in its operator-set CA directory.
const URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "application_name",
    "user",
    "password",
    "statement-cache-capacity",
];

const SSL_MODES: &[&str] = &[
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

/// Checks a spec's PostgreSQL URL (no I/O): scheme, a network host, allowed parameters.
pub fn check_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|_| "is not a valid URL".to_owned())?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err("must be a postgres:// or postgresql:// URL".into());
    }
    match parsed.host_str() {
        None | Some("") => {
            return Err("must name a host (postgres://user:password@host:port/database)".into())
        }
        Some(host) if !is_network_host(host) => {
            return Err(format!(
                "host {host:?} is not a DNS name or IP address (Unix sockets and \
                 percent-encoded hosts are not allowed)"
            ))
        }
        Some(_) => {}
    }
    for (key, value) in parsed.query_pairs() {
        if !URL_PARAMETERS.contains(&key.as_ref()) {
            return Err(format!(
                "parameter {key:?} is not allowed; allowed: {}",
                URL_PARAMETERS.join(", ")
            ));
        }
        if key == "sslrootcert" && !is_bare_file_name(&value) {
            return Err(format!(
                "sslrootcert {value:?} must be the bare name of a CA file in the workers' \
                 --destination-ca-dir (no path), or give the certificate inline as ssl_ca_pem"
            ));
        }
        if key == "sslmode" && !SSL_MODES.contains(&value.as_ref()) {
            return Err(format!(
                "sslmode {value:?} is not one of {}",
                SSL_MODES.join(", ")
            ));
        }
    }
    Ok(())
}

/// The host a PostgreSQL URL names.
pub fn url_host(url: &str) -> Vec<String> {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .into_iter()
        .collect()
}

/// Identifiers were validated as `[a-z_][a-z0-9_]*` (spec validation and catalog), so
/// quoting them is enough to splice them into SQL.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_files_come_only_from_the_ca_directory() {
        let dir = std::env::temp_dir().join(format!("sluice-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("ca.pem"), "-----BEGIN CERTIFICATE-----").expect("write");
        assert!(read_ca_file(Some(&dir), "ca.pem").is_ok());
        assert!(
            read_ca_file(None, "ca.pem").is_err(),
            "no directory configured"
        );
        assert!(read_ca_file(Some(&dir), "../ca.pem").is_err());
        assert!(read_ca_file(Some(&dir), "missing.pem").is_err());
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/dev/zero", dir.join("zero.pem")).expect("symlink");
            assert!(
                read_ca_file(Some(&dir), "zero.pem").is_err(),
                "a link out of the directory"
            );
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn urls_name_a_network_host_and_only_allowed_parameters() {
        assert!(check_url(
            "postgresql://app:pw@db:5432/x?sslmode=verify-full&sslrootcert=ca.pem&application_name=sluice"
        )
        .is_ok());
        for bad in [
            "http://x",
            "postgres:///y",
            "not a url",
            "postgres://x/y?sslcert=/etc/worker.pem",
            "postgres://x/y?sslkey=/etc/worker.key",
            "postgres://x/y?ssl%6Bey=/etc/worker.key",
            "postgres://x/y?host=/var/run/postgresql",
            "postgres://x/y?sslpassword=p",
            "postgres://x/y?sslmode=verify-ca&sslrootcert=/dev/zero",
            "postgres://x/y?sslrootcert=../ca.pem",
            "postgres://x/y?sslrootcert=.hidden",
            "postgres://x/y?sslrootcert=a%2Fb.pem",
            "postgres://x/y?sslmode=sometimes",
            "postgres://u@%2Fvar%2Frun%2Fpostgresql/db",
            "postgres://u@%2fvar%2frun%2fpostgresql:5432/db",
            "postgres://u@db,other/db",
            "postgres://u@[not-v6]/db",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }
}
