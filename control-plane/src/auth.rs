//! Authentication and authorization. Every PipelineService call carries a bearer token;
//! the token decides the caller's tenant and role. The tenant is never read from the
//! request: a request names pipelines by their id within the caller's tenant, and only
//! an admin may reach into another tenant by writing "<tenant>/<id>".

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};
use sluice_protocol::auth::{bearer_token, AUTHORIZATION};
use sluice_protocol::ids::{pipeline_key, validate_pipeline_id, validate_tenant};
use sqlx::{PgPool, Row};

use crate::error::ApiError;

/// Prefix of every token, so a leaked one is recognisable (secret scanners, logs).
pub const TOKEN_PREFIX: &str = "sluice_";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything, on every tenant.
    Admin,
    /// Everything, on its own tenant.
    Operator,
    /// Reads only, on its own tenant.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "viewer" => Ok(Role::Viewer),
            other => Err(format!(
                "unknown role {other:?} (expected admin, operator or viewer)"
            )),
        }
    }
}

/// What a call does: reads are open to every role, writes to operators and admins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: uuid::Uuid,
    pub tenant: String,
    pub role: Role,
}

/// A pipeline as addressed by a request, resolved against the caller's tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineRef {
    pub tenant: String,
    pub name: String,
}

impl PipelineRef {
    pub fn key(&self) -> String {
        pipeline_key(&self.tenant, &self.name)
    }
}

impl Caller {
    pub fn authorize(&self, access: Access, method: &'static str) -> Result<(), ApiError> {
        if access == Access::Write && self.role == Role::Viewer {
            return Err(ApiError::PermissionDenied {
                method,
                role: self.role,
                why: "viewer tokens may only read",
            });
        }
        Ok(())
    }

    /// Resolves a pipeline id from a request. "<tenant>/<id>" names another tenant's
    /// pipeline, which only admins reach; for anyone else it does not exist (NOT_FOUND,
    /// exactly like a missing pipeline, so nothing about other tenants leaks).
    pub fn resolve(&self, raw: &str, field: &str) -> Result<PipelineRef, ApiError> {
        match raw.split_once('/') {
            None => {
                validate_pipeline_id(raw, field)?;
                Ok(PipelineRef {
                    tenant: self.tenant.clone(),
                    name: raw.to_owned(),
                })
            }
            Some((tenant, name)) => {
                validate_tenant(tenant, field)?;
                validate_pipeline_id(name, field)?;
                if tenant != self.tenant && self.role != Role::Admin {
                    return Err(ApiError::NotFound(raw.to_owned()));
                }
                Ok(PipelineRef {
                    tenant: tenant.to_owned(),
                    name: name.to_owned(),
                })
            }
        }
    }

    /// The tenants a list covers: admins see every tenant.
    pub fn list_scope(&self) -> Option<&str> {
        (self.role != Role::Admin).then_some(self.tenant.as_str())
    }
}

fn missing_token() -> ApiError {
    ApiError::Unauthenticated {
        reason: "TOKEN_MISSING",
        why: "this call needs an \"authorization: Bearer <token>\" header",
    }
}

/// Runs before a request's message is decoded: a call without any authorization header
/// is refused without reading its body. The token itself is checked by [`authenticate`].
pub fn require_authorization_header(
    request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    if request.metadata().get(AUTHORIZATION).is_some() {
        Ok(request)
    } else {
        tracing::info!("request without a token refused");
        Err(missing_token().into())
    }
}

pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// The channel a revocation is announced on (its payload: the token's id).
pub const REVOKED_CHANNEL: &str = "sluice_token_revoked";

/// Tokens recently found valid, so that most calls need no database round trip for
/// their token. A revocation reaches every control plane as a notification on
/// [`REVOKED_CHANNEL`] and evicts the token at once. The cache is used only while its
/// listener is subscribed (from the moment it notices its connection gone until it has
/// subscribed again, every call looks its token up), and an entry expires after the
/// cache's time to live, which bounds how long a revoked token can still be accepted
/// by a control plane whose connection dropped before it noticed. Unknown and revoked
/// tokens are never cached.
#[derive(Debug)]
pub struct TokenCache {
    ttl: std::time::Duration,
    entries: std::sync::Mutex<std::collections::HashMap<Vec<u8>, (Caller, std::time::Instant)>>,
    /// Whether revocations are being heard: only then are tokens cached or served
    /// from the cache (otherwise every call looks its token up).
    listening: std::sync::atomic::AtomicBool,
    /// Counts evictions: a lookup that raced one does not cache what it read.
    evictions: std::sync::atomic::AtomicU64,
}

/// Entries at most; a full cache is emptied (tokens are few; this bounds a flood of
/// distinct valid tokens, not the usual case).
const TOKEN_CACHE_ENTRIES: usize = 10_000;

impl TokenCache {
    /// A cache whose entries live `ttl` (zero: nothing is cached).
    pub fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl,
            entries: Default::default(),
            listening: Default::default(),
            evictions: Default::default(),
        }
    }

    /// Revocations are heard from now on (the listener subscribed): caching starts,
    /// from an empty cache.
    pub fn listening(&self) {
        self.clear();
        self.listening
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Revocations may be missed (the listener lost its connection): the cache is
    /// emptied and not used until [`TokenCache::listening`] again.
    pub fn deaf(&self) {
        self.listening
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.clear();
    }

    fn in_use(&self) -> bool {
        !self.ttl.is_zero() && self.listening.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn evictions(&self) -> u64 {
        self.evictions.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn ttl(&self) -> std::time::Duration {
        self.ttl
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<Vec<u8>, (Caller, std::time::Instant)>>
    {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, hash: &[u8]) -> Option<Caller> {
        if !self.in_use() {
            return None;
        }
        let mut entries = self.lock();
        match entries.get(hash) {
            Some((caller, at)) if at.elapsed() < self.ttl => Some(caller.clone()),
            Some(_) => {
                entries.remove(hash);
                None
            }
            None => None,
        }
    }

    /// Caches a token read as valid, unless an eviction happened since `seen` (the
    /// read may predate a revocation).
    fn put(&self, hash: Vec<u8>, caller: Caller, seen: u64) {
        if !self.in_use() {
            return;
        }
        let mut entries = self.lock();
        if self.evictions() != seen {
            return;
        }
        if entries.len() >= TOKEN_CACHE_ENTRIES {
            entries.clear();
        }
        entries.insert(hash, (caller, std::time::Instant::now()));
    }

    /// Forgets the token with this id (it was revoked).
    pub fn evict(&self, token_id: uuid::Uuid) {
        let mut entries = self.lock();
        self.evictions
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        entries.retain(|_, (caller, _)| caller.token_id != token_id);
    }

    /// Forgets every token.
    pub fn clear(&self) {
        let mut entries = self.lock();
        self.evictions
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        entries.clear();
    }
}

/// Checks the request's bearer token against the stored hashes, or the cache of tokens
/// recently found valid (see [`TokenCache`] for how soon a revocation takes effect).
pub async fn authenticate(
    pool: &PgPool,
    cache: &TokenCache,
    metadata: &tonic::metadata::MetadataMap,
    method: &'static str,
) -> Result<Caller, ApiError> {
    let Some(header) = metadata.get(AUTHORIZATION) else {
        tracing::info!(method, "request without a token refused");
        return Err(missing_token());
    };
    let invalid = || ApiError::Unauthenticated {
        reason: "TOKEN_INVALID",
        why: "the token is unknown or revoked",
    };
    let token = header
        .to_str()
        .ok()
        .and_then(bearer_token)
        .ok_or(ApiError::Unauthenticated {
            reason: "TOKEN_INVALID",
            why: "the authorization header is not a bearer token",
        })?;
    let hash = hash_token(token);
    if let Some(caller) = cache.get(&hash) {
        return Ok(caller);
    }
    let seen = cache.evictions();
    let row = sqlx::query(
        "SELECT id, tenant, role FROM api_tokens WHERE token_hash = $1 AND revoke_time IS NULL",
    )
    .bind(&hash)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        tracing::info!(method, "request with an unknown or revoked token refused");
        return Err(invalid());
    };
    let role: String = row.try_get("role")?;
    let caller = Caller {
        token_id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        role: role
            .parse()
            .map_err(|e: String| ApiError::Internal(sluice_infra::store::StoreError::Corrupt(e)))?,
    };
    cache.put(hash, caller.clone(), seen);
    Ok(caller)
}

/// A token as listed (the secret itself is never stored).
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub id: uuid::Uuid,
    pub name: String,
    pub tenant: String,
    pub role: Role,
    pub create_time: chrono::DateTime<chrono::Utc>,
    pub revoke_time: Option<chrono::DateTime<chrono::Utc>>,
}

/// Creates a token; returns its id and the token, which exists nowhere else afterwards.
pub async fn create_token(
    pool: &PgPool,
    name: &str,
    tenant: &str,
    role: Role,
) -> Result<(uuid::Uuid, String), sqlx::Error> {
    let secret: [u8; 32] = rand::random();
    let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let id = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO api_tokens (id, name, tenant, role, token_hash) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(name)
    .bind(tenant)
    .bind(role.as_str())
    .bind(hash_token(&token))
    .execute(pool)
    .await?;
    Ok((id, token))
}

pub async fn list_tokens(pool: &PgPool) -> Result<Vec<TokenInfo>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, name, tenant, role, create_time, revoke_time FROM api_tokens \
         ORDER BY create_time, id",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let role: String = r.try_get("role")?;
            Ok(TokenInfo {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                tenant: r.try_get("tenant")?,
                role: role
                    .parse()
                    .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
                create_time: r.try_get("create_time")?,
                revoke_time: r.try_get("revoke_time")?,
            })
        })
        .collect()
}

/// Revokes a token and announces it to every control plane (delivered when the
/// revocation commits); false when no such (unrevoked) token exists.
pub async fn revoke_token(pool: &PgPool, id: uuid::Uuid) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "UPDATE api_tokens SET revoke_time = now() WHERE id = $1 AND revoke_time IS NULL",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(REVOKED_CHANNEL)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(tenant: &str, role: Role) -> Caller {
        Caller {
            token_id: uuid::Uuid::nil(),
            tenant: tenant.into(),
            role,
        }
    }

    #[test]
    fn the_token_cache_expires_evicts_and_can_be_off() {
        let hash = hash_token("sluice_x");
        let viewer = || caller("t1", Role::Viewer);
        let cache = TokenCache::new(std::time::Duration::from_millis(50));
        cache.put(hash.clone(), viewer(), cache.evictions());
        assert!(
            cache.get(&hash).is_none(),
            "nothing cached until revocations are heard"
        );
        cache.listening();
        cache.put(hash.clone(), viewer(), cache.evictions());
        assert_eq!(cache.get(&hash).map(|c| c.tenant), Some("t1".into()));
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert!(cache.get(&hash).is_none(), "expired");
        cache.put(hash.clone(), viewer(), cache.evictions());
        cache.evict(uuid::Uuid::nil());
        assert!(cache.get(&hash).is_none(), "evicted by token id");
        // A lookup that started before an eviction does not cache what it read.
        let before = cache.evictions();
        cache.evict(uuid::Uuid::nil());
        cache.put(hash.clone(), viewer(), before);
        assert!(cache.get(&hash).is_none(), "a read that raced a revocation");
        cache.put(hash.clone(), viewer(), cache.evictions());
        cache.deaf();
        assert!(
            cache.get(&hash).is_none(),
            "unused while revocations may be missed"
        );
        let off = TokenCache::new(std::time::Duration::ZERO);
        off.listening();
        off.put(hash.clone(), viewer(), off.evictions());
        assert!(
            off.get(&hash).is_none(),
            "a zero time to live caches nothing"
        );
    }

    #[test]
    fn roles_round_trip() {
        for role in [Role::Admin, Role::Operator, Role::Viewer] {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn viewers_cannot_write() {
        assert!(caller("a", Role::Viewer)
            .authorize(Access::Write, "X")
            .is_err());
        assert!(caller("a", Role::Viewer)
            .authorize(Access::Read, "X")
            .is_ok());
        assert!(caller("a", Role::Operator)
            .authorize(Access::Write, "X")
            .is_ok());
    }

    #[test]
    fn ids_resolve_in_the_callers_tenant() {
        let op = caller("acme", Role::Operator);
        assert_eq!(op.resolve("orders", "id").expect("ok").key(), "acme.orders");
        assert_eq!(
            op.resolve("acme/orders", "id").expect("own tenant").key(),
            "acme.orders"
        );
        assert!(matches!(
            op.resolve("other/orders", "id"),
            Err(ApiError::NotFound(_))
        ));
        assert!(matches!(
            op.resolve("Bad/orders", "id"),
            Err(ApiError::InvalidArgument(_))
        ));
        let admin = caller("ops", Role::Admin);
        assert_eq!(
            admin.resolve("other/orders", "id").expect("admin").key(),
            "other.orders"
        );
        assert_eq!(admin.list_scope(), None);
        assert_eq!(op.list_scope(), Some("acme"));
    }

    #[test]
    fn tokens_hash_deterministically() {
        assert_eq!(hash_token("sluice_x"), hash_token("sluice_x"));
        assert_ne!(hash_token("sluice_x"), hash_token("sluice_y"));
        assert_eq!(hash_token("x").len(), 32);
    }
}
