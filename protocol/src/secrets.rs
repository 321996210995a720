//! Secret connector settings. Each connector declares which of its config keys hold
//! secrets ([`SecretFields`]: e.g. the password of the postgres destination's `url`, in
//! its user info or as a `password` / `sslpassword` query parameter). Secrets are
//!
//! - sealed before a spec is stored: XChaCha20-Poly1305 under the deployment's secrets
//!   key, bound to the field they belong to, as `sluice-secret:v1:<key id>:<base64>`;
//! - opened when a spec is loaded by a process that holds the key;
//! - redacted in every API response (`postgres://app:********@db/x`), and a redacted
//!   value sent back in an update means "keep the current secret".

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::spec::{ConnectorSpec, PipelineSpec};

/// What a redacted secret reads as.
pub const REDACTED: &str = "********";
const SEALED_PREFIX: &str = "sluice-secret:v1:";

/// Whether a connector config value was sealed (and not opened).
pub fn is_sealed(value: &str) -> bool {
    value.starts_with(SEALED_PREFIX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    /// A connection URL whose password (user info or query parameter) is secret.
    UrlPassword,
    /// The whole value is secret (an API key).
    Whole,
}

/// One secret key of a connector's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretField {
    pub key: &'static str,
    pub kind: SecretKind,
}

/// Which side of a pipeline a connector is on: a type name may be both a source and a
/// destination (postgres), with different configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// Which config keys of each connector type hold secrets. Each connector declares its
/// own; the connectors' registry answers for all of them.
pub trait SecretFields {
    fn secret_fields(&self, side: Side, connector_type: &str) -> &'static [SecretField];
}

/// The deployment's secrets key: the current key, which seals, and during a key
/// rotation the previous keys, which only open (each sealed value names its key).
#[derive(Clone)]
pub struct SecretBox {
    /// The current key first.
    keys: Vec<(String, XChaCha20Poly1305)>,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBox(key ids {:?})", self.key_ids())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a secrets key must be 32 random bytes, base64-encoded (e.g. `head -c 32 /dev/urandom | base64`)")]
    BadKey,
    #[error("{field} is encrypted with secrets key {key_id}, which this process does not have")]
    WrongKey { field: String, key_id: String },
    #[error("{field} holds a corrupt encrypted value")]
    Corrupt { field: String },
}

impl SecretBox {
    /// Reads a key in its file form: 32 bytes, base64.
    pub fn from_base64(text: &str) -> Result<Self, SecretError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| SecretError::BadKey)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| SecretError::BadKey)?;
        let key_id = Sha256::digest(key)[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            keys: vec![(key_id, XChaCha20Poly1305::new(&key.into()))],
        })
    }

    /// Adds the keys of `previous` as keys that open values but never seal them.
    #[must_use]
    pub fn with_previous(mut self, previous: SecretBox) -> Self {
        for key in previous.keys {
            if !self.keys.iter().any(|(id, _)| *id == key.0) {
                self.keys.push(key);
            }
        }
        self
    }

    /// The id of the key that seals.
    pub fn key_id(&self) -> &str {
        &self.keys[0].0
    }

    /// Every key id, the current one first.
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// `context` binds the sealed value to its pipeline and field (AEAD associated
    /// data): copied into another pipeline's row or another field, it does not open.
    fn seal(&self, context: &str, plaintext: &str) -> String {
        let nonce_bytes: [u8; 24] = rand::random();
        let nonce = XNonce::from(nonce_bytes);
        let (key_id, cipher) = &self.keys[0];
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any message that fits in memory");
        let mut blob = nonce_bytes.to_vec();
        blob.extend_from_slice(&sealed);
        format!("{SEALED_PREFIX}{key_id}:{}", STANDARD.encode(blob))
    }

    fn open(&self, context: &str, field: &str, sealed: &str) -> Result<String, SecretError> {
        let corrupt = || SecretError::Corrupt {
            field: field.to_owned(),
        };
        let key_id = sealed_key_id(sealed).ok_or_else(corrupt)?;
        let Some((_, cipher)) = self.keys.iter().find(|(id, _)| id == key_id) else {
            return Err(SecretError::WrongKey {
                field: field.to_owned(),
                key_id: key_id.to_owned(),
            });
        };
        let blob = &sealed[SEALED_PREFIX.len() + key_id.len() + 1..];
        let blob = STANDARD.decode(blob).map_err(|_| corrupt())?;
        if blob.len() < 24 {
            return Err(corrupt());
        }
        let (nonce, ciphertext) = blob.split_at(24);
        let nonce: [u8; 24] = nonce.try_into().map_err(|_| corrupt())?;
        let plain = cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| corrupt())?;
        String::from_utf8(plain).map_err(|_| corrupt())
    }
}

/// The id of the key a sealed value was sealed with.
pub fn sealed_key_id(value: &str) -> Option<&str> {
    let rest = value.strip_prefix(SEALED_PREFIX)?;
    rest.split_once(':').map(|(id, _)| id)
}

/// Calls `f(field path, value)` for every secret-bearing string of the spec.
fn for_each_secret(
    spec: &mut PipelineSpec,
    fields: &dyn SecretFields,
    mut f: impl FnMut(&str, SecretKind, &mut String),
) {
    for (side, name, connector) in [
        (Side::Source, "source", &mut spec.source),
        (Side::Destination, "destination", &mut spec.destination),
    ] {
        for field in fields.secret_fields(side, &connector.connector_type) {
            if let Some(Value::String(value)) = connector.config.get_mut(field.key) {
                f(&format!("{name}.config.{}", field.key), field.kind, value);
            }
        }
    }
}

fn holds_secret(kind: SecretKind, value: &str) -> bool {
    match kind {
        // A URL that does not parse is treated as secret as a whole.
        SecretKind::UrlPassword => {
            is_sealed(value) || url::Url::parse(value).is_err() || redact_url(value) != value
        }
        SecretKind::Whole => !value.is_empty(),
    }
}

/// Whether storing the spec needs a secrets key.
pub fn has_plain_secrets(spec: &PipelineSpec, fields: &dyn SecretFields) -> Option<String> {
    let mut found = None;
    let mut copy = spec.clone();
    for_each_secret(&mut copy, fields, |field, kind, value| {
        if found.is_none() && !is_sealed(value) && holds_secret(kind, value) {
            found = Some(field.to_owned());
        }
    });
    found
}

fn context(pipeline_key: &str, field: &str) -> String {
    format!("sluice-secret/v1|{pipeline_key}|{field}")
}

/// The spec of pipeline `pipeline_key` as stored: every secret sealed.
pub fn seal_spec(
    spec: &PipelineSpec,
    fields: &dyn SecretFields,
    secrets: &SecretBox,
    pipeline_key: &str,
) -> PipelineSpec {
    let mut sealed = spec.clone();
    for_each_secret(&mut sealed, fields, |field, kind, value| {
        if !is_sealed(value) && holds_secret(kind, value) {
            *value = secrets.seal(&context(pipeline_key, field), value);
        }
    });
    sealed
}

/// Opens the sealed secrets of a loaded spec: every sealed string of either config (only
/// secrets are ever sealed). Values that cannot be opened stay sealed (validation then
/// reports them); the first such failure is returned.
pub fn open_spec(
    spec: &mut PipelineSpec,
    secrets: Option<&SecretBox>,
    pipeline_key: &str,
) -> Option<SecretError> {
    let mut failure = None;
    for (side, connector) in [
        ("source", &mut spec.source),
        ("destination", &mut spec.destination),
    ] {
        for (key, value) in connector.config.iter_mut() {
            let Value::String(value) = value else {
                continue;
            };
            if !is_sealed(value) {
                continue;
            }
            let Some(secrets) = secrets else {
                continue;
            };
            let field = format!("{side}.config.{key}");
            match secrets.open(&context(pipeline_key, &field), &field, value) {
                Ok(plain) => *value = plain,
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
    }
    failure
}

/// Seals again, with the current key, every sealed value of a stored spec that an
/// older key sealed (a key rotation). Returns how many values changed; a value no
/// key of `secrets` opens is an error and leaves the spec as it was.
pub fn reseal_spec(
    spec: &mut PipelineSpec,
    secrets: &SecretBox,
    pipeline_key: &str,
) -> Result<usize, SecretError> {
    let mut resealed = spec.clone();
    let mut count = 0;
    for (side, connector) in [
        ("source", &mut resealed.source),
        ("destination", &mut resealed.destination),
    ] {
        for (key, value) in connector.config.iter_mut() {
            let Value::String(value) = value else {
                continue;
            };
            match sealed_key_id(value) {
                Some(id) if id != secrets.key_id() => {}
                _ => continue,
            }
            let field = format!("{side}.config.{key}");
            let context = context(pipeline_key, &field);
            let plain = secrets.open(&context, &field, value)?;
            *value = secrets.seal(&context, &plain);
            count += 1;
        }
    }
    *spec = resealed;
    Ok(count)
}

/// The key ids of the sealed values of a stored spec, one per value.
pub fn sealed_key_ids(spec: &PipelineSpec) -> Vec<String> {
    [&spec.source, &spec.destination]
        .into_iter()
        .flat_map(|c| c.config.values())
        .filter_map(|v| v.as_str().and_then(sealed_key_id))
        .map(str::to_owned)
        .collect()
}

/// A fingerprint of the data a spec moves, secrets left out: the SHA-256 of the
/// redacted connectors and streams. Workers keep it in the checkpoint to tell whether
/// the spec changed since setup ran, without storing the spec (and its opened secrets)
/// there. A changed password, schedule or retry policy keeps the fingerprint.
pub fn spec_fingerprint(spec: &PipelineSpec, fields: &dyn SecretFields) -> String {
    let json = redact_spec(spec, fields).data_spec().to_string();
    Sha256::digest(json.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The spec as shown to clients.
pub fn redact_spec(spec: &PipelineSpec, fields: &dyn SecretFields) -> PipelineSpec {
    let mut shown = spec.clone();
    for_each_secret(&mut shown, fields, |_, kind, value| {
        *value = redact(kind, value);
    });
    shown
}

fn redact(kind: SecretKind, value: &str) -> String {
    if is_sealed(value) || url::Url::parse(value).is_err() {
        return REDACTED.to_owned();
    }
    match kind {
        SecretKind::UrlPassword => redact_url(value),
        SecretKind::Whole => REDACTED.to_owned(),
    }
}

/// A redacted secret sent back (e.g. a spec read with Get and written with Update)
/// keeps the current secret.
pub fn restore_redacted(new: &mut PipelineSpec, current: &PipelineSpec, fields: &dyn SecretFields) {
    let current_values = |c: &ConnectorSpec, key: &str| c.config.get(key).cloned();
    let mut restores = Vec::new();
    for (side, (n, c)) in [
        ("source", (&new.source, &current.source)),
        ("destination", (&new.destination, &current.destination)),
    ] {
        if n.connector_type != c.connector_type {
            continue;
        }
        let which = if side == "source" {
            Side::Source
        } else {
            Side::Destination
        };
        for field in fields.secret_fields(which, &n.connector_type) {
            if let (Some(Value::String(sent)), Some(Value::String(kept))) =
                (n.config.get(field.key), current_values(c, field.key))
            {
                if sent != &kept && *sent == redact(field.kind, &kept) {
                    restores.push((side, field.key, kept));
                }
            }
        }
    }
    for (side, key, kept) in restores {
        let connector = if side == "source" {
            &mut new.source
        } else {
            &mut new.destination
        };
        connector.config.insert(key.to_owned(), Value::String(kept));
    }
}

/// `scheme://user:secret@host/db?password=x` → `scheme://user:********@host/db?password=********`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{REDACTED}@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let (query, fragment) = query
                .split_once('#')
                .map_or((query, None), |(q, f)| (q, Some(f)));
            let query: Vec<String> = query
                .split('&')
                .map(|pair| {
                    // Keys compare decoded, as the driver reads them (pass%77ord).
                    let key = url::form_urlencoded::parse(pair.as_bytes())
                        .next()
                        .map(|(k, _)| k.into_owned())
                        .unwrap_or_default();
                    match pair.split_once('=') {
                        Some((k, _)) if key == "password" || key == "sslpassword" => {
                            format!("{k}={REDACTED}")
                        }
                        _ => pair.to_owned(),
                    }
                })
                .collect();
            let fragment = fragment.map(|f| format!("#{f}")).unwrap_or_default();
            format!("{path}?{}{fragment}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The postgres destination's url, as its connector declares it.
    struct Fields;
    impl SecretFields for Fields {
        fn secret_fields(&self, side: Side, connector_type: &str) -> &'static [SecretField] {
            match (side, connector_type) {
                (Side::Destination, "postgres") => &[SecretField {
                    key: "url",
                    kind: SecretKind::UrlPassword,
                }],
                _ => &[],
            }
        }
    }

    fn key() -> SecretBox {
        SecretBox::from_base64(&STANDARD.encode([7u8; 32])).expect("valid key")
    }

    fn spec(url: &str) -> PipelineSpec {
        PipelineSpec::from_json(json!({
            "source": {"type": "generator", "config": {"count": 1}},
            "destination": {"type": "postgres", "config": {"url": url, "table": "t"}}
        }))
        .expect("valid spec")
    }

    fn url_of(spec: &PipelineSpec) -> &str {
        spec.destination.config["url"].as_str().expect("string")
    }

    #[test]
    fn fingerprints_see_changes_but_not_passwords() {
        let a = spec_fingerprint(&spec("postgres://app:one@db/x"), &Fields);
        assert_eq!(
            a,
            spec_fingerprint(&spec("postgres://app:two@db/x"), &Fields)
        );
        assert_ne!(
            a,
            spec_fingerprint(&spec("postgres://app:one@db2/x"), &Fields)
        );
        assert_ne!(
            a,
            spec_fingerprint(&spec("postgres://other:one@db/x"), &Fields)
        );
        assert!(!a.contains("one") && a.len() == 64, "{a}");
    }

    #[test]
    fn urls_lose_their_passwords() {
        for (url, shown) in [
            (
                "postgres://app:pw@db:5432/x",
                "postgres://app:********@db:5432/x",
            ),
            ("postgres://app:p@ss@db/x", "postgres://app:********@db/x"),
            ("postgres://app@db/x", "postgres://app@db/x"),
            (
                "postgres://db/x?sslmode=require&password=pw",
                "postgres://db/x?sslmode=require&password=********",
            ),
            ("postgres://a:b@db", "postgres://a:********@db"),
            (
                "postgres://db/x?pass%77ord=pw",
                "postgres://db/x?pass%77ord=********",
            ),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn secrets_are_sealed_opened_and_redacted() {
        let plain = spec("postgres://app:hunter2@db/x");
        assert_eq!(
            has_plain_secrets(&plain, &Fields).as_deref(),
            Some("destination.config.url")
        );
        let sealed = seal_spec(&plain, &Fields, &key(), "t.p");
        assert!(is_sealed(url_of(&sealed)));
        assert!(!sealed.to_json().to_string().contains("hunter2"));
        assert_eq!(has_plain_secrets(&sealed, &Fields), None);
        // Sealing twice gives different ciphertexts of the same secret.
        assert_ne!(
            url_of(&sealed),
            url_of(&seal_spec(&plain, &Fields, &key(), "t.p"))
        );

        let mut opened = sealed.clone();
        assert_eq!(open_spec(&mut opened, Some(&key()), "t.p"), None);
        assert_eq!(opened, plain);
        assert_eq!(
            url_of(&redact_spec(&plain, &Fields)),
            "postgres://app:********@db/x"
        );
        assert_eq!(url_of(&redact_spec(&sealed, &Fields)), REDACTED);

        // Without the key, or with another key, the value stays sealed.
        // Copied into another pipeline's row, it does not open.
        let mut moved = sealed.clone();
        assert!(matches!(
            open_spec(&mut moved, Some(&key()), "other.p"),
            Some(SecretError::Corrupt { .. })
        ));
        assert_eq!(moved, sealed);

        let mut without = sealed.clone();
        assert_eq!(open_spec(&mut without, None, "t.p"), None);
        assert_eq!(without, sealed);
        let other = SecretBox::from_base64(&STANDARD.encode([8u8; 32])).expect("valid");
        let mut wrong = sealed.clone();
        assert!(matches!(
            open_spec(&mut wrong, Some(&other), "t.p"),
            Some(SecretError::WrongKey { .. })
        ));
        assert_eq!(wrong, sealed);
    }

    #[test]
    fn passwordless_specs_need_no_key() {
        let plain = spec("postgres://app@db/x");
        assert_eq!(has_plain_secrets(&plain, &Fields), None);
        assert_eq!(seal_spec(&plain, &Fields, &key(), "t.p"), plain);
    }

    #[test]
    fn a_redacted_secret_sent_back_keeps_the_current_one() {
        let current = spec("postgres://app:hunter2@db/x");
        let mut sent = redact_spec(&current, &Fields);
        restore_redacted(&mut sent, &current, &Fields);
        assert_eq!(sent, current);
        // A new secret replaces it.
        let mut changed = spec("postgres://app:new@db/x");
        restore_redacted(&mut changed, &current, &Fields);
        assert_eq!(url_of(&changed), "postgres://app:new@db/x");
        // A redacted URL pointing elsewhere is not a round trip.
        let mut elsewhere = spec("postgres://app:********@other/x");
        restore_redacted(&mut elsewhere, &current, &Fields);
        assert_eq!(url_of(&elsewhere), "postgres://app:********@other/x");
    }

    #[test]
    fn a_rotation_reseals_old_values_with_the_new_key() {
        let old = key();
        let new = SecretBox::from_base64(&STANDARD.encode([9u8; 32])).expect("valid");
        let plain = spec("postgres://app:hunter2@db/x");
        let sealed_old = seal_spec(&plain, &Fields, &old, "t.p");
        assert_eq!(sealed_key_ids(&sealed_old), [old.key_id()]);

        // The new key alone cannot open the old value; with the old key as previous it can.
        let mut attempt = sealed_old.clone();
        assert!(matches!(
            open_spec(&mut attempt, Some(&new), "t.p"),
            Some(SecretError::WrongKey { .. })
        ));
        let both = new.clone().with_previous(old.clone());
        assert_eq!(both.key_ids(), [new.key_id(), old.key_id()]);
        let mut opened = sealed_old.clone();
        assert_eq!(open_spec(&mut opened, Some(&both), "t.p"), None);
        assert_eq!(opened, plain);

        // Reseal: the old value is sealed again under the new key; a second pass does
        // nothing; the new key alone now opens it.
        let mut stored = sealed_old.clone();
        assert_eq!(reseal_spec(&mut stored, &both, "t.p"), Ok(1));
        assert_eq!(sealed_key_ids(&stored), [new.key_id()]);
        assert_eq!(reseal_spec(&mut stored, &both, "t.p"), Ok(0));
        let mut opened = stored.clone();
        assert_eq!(open_spec(&mut opened, Some(&new), "t.p"), None);
        assert_eq!(opened, plain);

        // Without the old key the reseal fails and changes nothing.
        let mut stuck = sealed_old.clone();
        assert!(matches!(
            reseal_spec(&mut stuck, &new, "t.p"),
            Err(SecretError::WrongKey { .. })
        ));
        assert_eq!(stuck, sealed_old);
        // A value bound to another pipeline does not reseal into this one.
        let mut moved = sealed_old.clone();
        assert!(matches!(
            reseal_spec(&mut moved, &both, "other.p"),
            Err(SecretError::Corrupt { .. })
        ));
    }

    #[test]
    fn keys_must_be_32_bytes() {
        assert_eq!(
            SecretBox::from_base64("c2hvcnQ=").err(),
            Some(SecretError::BadKey)
        );
        assert_eq!(
            SecretBox::from_base64("not base64!").err(),
            Some(SecretError::BadKey)
        );
        assert_eq!(key().key_id().len(), 8);
    }
}
