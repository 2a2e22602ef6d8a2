//! One issuer's public keys: the JWKS document, fetched (or read from a
//! file), parsed into verification keys, and refreshed.
//!
//! Verification never waits on the network in the steady state: it reads
//! the last good set. A fetch happens at start, in the background when the
//! set is due (Cache-Control `max-age`, between [`JwksSettings::min_refresh`]
//! and [`JwksSettings::max_refresh`]), and once for a token naming an
//! unknown `kid`, at most once per [`JwksSettings::kid_refetch_gap`]. A set
//! older than [`JwksSettings::max_age`] (the issuer unreachable for that
//! long) is no set: its tokens are refused until a fetch succeeds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::Jwk;
use keygate_core::clock::Clock;
use keygate_core::jwt::{IssuerConfig, JwksSource};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Largest JWKS document read, in bytes.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Most keys kept from one JWKS.
pub const MAX_KEYS: usize = 100;

/// When JWKS are fetched again, and how old a set may get.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// Shortest time between background refreshes, whatever Cache-Control says.
    pub min_refresh: Duration,
    /// Longest time between background refreshes (also without Cache-Control).
    pub max_refresh: Duration,
    /// After a failed fetch, how long until the next try.
    pub retry: Duration,
    /// Shortest time between two fetches for an unknown `kid`.
    pub kid_refetch_gap: Duration,
    /// A set not refreshed for this long is no longer trusted.
    pub max_age: Duration,
    /// How long one fetch may take.
    pub fetch_timeout: Duration,
    /// How often the background task looks for sets that are due; the
    /// clock decides whether one is, so tests move it instead of sleeping.
    pub tick: Duration,
}

impl Default for JwksSettings {
    fn default() -> Self {
        Self {
            min_refresh: Duration::from_secs(30),
            max_refresh: Duration::from_secs(300),
            retry: Duration::from_secs(5),
            kid_refetch_gap: Duration::from_secs(30),
            max_age: Duration::from_secs(900),
            fetch_timeout: Duration::from_secs(5),
            tick: Duration::from_secs(1),
        }
    }
}

/// A usable key of the set.
pub struct VerifyingKey {
    /// The key, ready for `jsonwebtoken::decode`.
    pub key: DecodingKey,
    /// The `alg` the JWK names, when it names one: then only that one.
    pub alg: Option<jsonwebtoken::Algorithm>,
}

/// A parsed JWKS.
pub struct KeySet {
    /// By `kid`.
    pub by_kid: HashMap<String, Arc<VerifyingKey>>,
    /// Keys without a `kid`; used only when it is the set's one key.
    pub without_kid: Vec<Arc<VerifyingKey>>,
    /// Changes exactly when the keys do (a hash of them), so cached
    /// verifications are dropped when a key goes.
    pub fingerprint: [u8; 32],
}

impl KeySet {
    /// The key a token's header names; without a `kid`, only a set's one key.
    pub fn find(&self, kid: Option<&str>) -> Option<Arc<VerifyingKey>> {
        match kid {
            Some(kid) => self.by_kid.get(kid).cloned(),
            None if self.by_kid.len() + self.without_kid.len() == 1 => self
                .without_kid
                .first()
                .or_else(|| self.by_kid.values().next())
                .cloned(),
            None => None,
        }
    }
}

/// Parses a JWKS document. Keys that are not for signatures (`use: enc`, or
/// an `alg` that is not a signature algorithm),
/// of a type `jsonwebtoken` cannot verify with, or symmetric (`kty: oct`:
/// never, see `keygate_core::jwt::Algorithm`) are skipped; a document with
/// no usable key is an error.
pub fn parse(body: &[u8]) -> Result<KeySet, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("no \"keys\" array")?;
    let mut by_kid = HashMap::new();
    let mut without_kid = Vec::new();
    let mut hasher = Sha256::new();
    for raw in keys.iter().take(MAX_KEYS) {
        if raw
            .get("use")
            .and_then(Value::as_str)
            .is_some_and(|u| u != "sig")
            || raw.get("kty").and_then(Value::as_str) == Some("oct")
        {
            continue;
        }
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw.clone()) else {
            continue;
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        // A key naming an algorithm that signs nothing (RSA-OAEP, …) is not
        // a signing key.
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(a) => match a.to_string().parse::<jsonwebtoken::Algorithm>() {
                Ok(alg) => Some(alg),
                Err(_) => continue,
            },
        };
        hasher.update(raw.to_string().as_bytes());
        let key = Arc::new(VerifyingKey { key, alg });
        match jwk.common.key_id {
            Some(kid) => {
                by_kid.insert(kid, key);
            }
            None => without_kid.push(key),
        }
    }
    if by_kid.is_empty() && without_kid.is_empty() {
        return Err("no usable signing key".into());
    }
    Ok(KeySet {
        by_kid,
        without_kid,
        fingerprint: hasher.finalize().into(),
    })
}

/// `max-age` of a Cache-Control value, in seconds.
pub fn max_age(cache_control: &str) -> Option<u64> {
    cache_control.split(',').find_map(|d| {
        let (name, value) = d.trim().split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("max-age")
            .then(|| value.trim().trim_matches('"').parse().ok())?
    })
}

/// The state of one issuer's keys.
struct Loaded {
    set: Option<Arc<KeySet>>,
    /// Bumped whenever the keys change.
    generation: u64,
    /// When the set was last fetched successfully (monotonic).
    fetched_at: Duration,
    /// When the background task should fetch next (monotonic).
    next_fetch: Duration,
    /// When the last fetch for an unknown kid started (monotonic).
    last_kid_fetch: Option<Duration>,
}

/// One trusted issuer and its keys.
pub struct IssuerKeys {
    /// The issuer's configuration.
    pub config: IssuerConfig,
    loaded: RwLock<Loaded>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
    last_error: Mutex<Option<String>>,
    http: reqwest::Client,
    clock: Arc<dyn Clock>,
    settings: JwksSettings,
}

/// A usable set with its generation; `None` from [`IssuerKeys::current`]
/// when there is none (never fetched, or too old).
pub type Current = (Arc<KeySet>, u64);

impl IssuerKeys {
    /// No keys yet: see [`IssuerKeys::fetch`].
    pub fn new(
        config: IssuerConfig,
        http: reqwest::Client,
        clock: Arc<dyn Clock>,
        settings: JwksSettings,
    ) -> Self {
        Self {
            config,
            loaded: RwLock::new(Loaded {
                set: None,
                generation: 0,
                fetched_at: Duration::ZERO,
                next_fetch: Duration::ZERO,
                last_kid_fetch: None,
            }),
            fetching: tokio::sync::Mutex::new(()),
            last_error: Mutex::new(None),
            http,
            clock,
            settings,
        }
    }

    /// The keys to verify with now, unless there are none or they are
    /// older than `max_age` (fail closed).
    pub fn current(&self) -> Option<Current> {
        let loaded = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
        let set = loaded.set.clone()?;
        let age = self.clock.monotonic().saturating_sub(loaded.fetched_at);
        (age <= self.settings.max_age).then_some((set, loaded.generation))
    }

    /// The generation of the keys in force, to tell a cached verification
    /// is still good; `None` when there are no usable keys.
    pub fn generation(&self) -> Option<u64> {
        self.current().map(|(_, g)| g)
    }

    /// Whether the background task should fetch now.
    pub fn due(&self) -> bool {
        matches!(self.config.jwks, JwksSource::Url(_))
            && self
                .loaded
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .next_fetch
                <= self.clock.monotonic()
    }

    /// A token named a `kid` the set lacks: fetch again, unless a fetch for
    /// that reason started less than `kid_refetch_gap` ago. Returns whether
    /// it fetched (and got a set).
    pub async fn refetch_for_unknown_kid(&self) -> bool {
        if !matches!(self.config.jwks, JwksSource::Url(_)) {
            return false;
        }
        {
            let now = self.clock.monotonic();
            let mut loaded = self.loaded.write().unwrap_or_else(PoisonError::into_inner);
            if loaded
                .last_kid_fetch
                .is_some_and(|at| now.saturating_sub(at) < self.settings.kid_refetch_gap)
            {
                return false;
            }
            loaded.last_kid_fetch = Some(now);
        }
        self.fetch().await.is_ok()
    }

    /// Fetches (or reads) the JWKS and installs it; on failure the old set
    /// stays (until `max_age`) and the next try is `retry` away.
    pub async fn fetch(&self) -> Result<(), String> {
        let _one = self.fetching.lock().await;
        let started = self.clock.monotonic();
        let result = match &self.config.jwks {
            JwksSource::Url(url) => self.download(url).await,
            JwksSource::File(path) => std::fs::read(path)
                .map_err(|e| format!("{}: {e}", path.display()))
                .and_then(|body| parse(&body).map(|set| (set, None))),
        };
        let mut loaded = self.loaded.write().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok((set, max_age)) => {
                let every = max_age
                    .map(Duration::from_secs)
                    .unwrap_or(self.settings.max_refresh)
                    .clamp(self.settings.min_refresh, self.settings.max_refresh);
                let changed = loaded
                    .set
                    .as_ref()
                    .is_none_or(|old| old.fingerprint != set.fingerprint);
                if changed {
                    loaded.generation += 1;
                    tracing::info!(issuer = %self.config.issuer, keys = set.by_kid.len() + set.without_kid.len(), "jwt issuer keys loaded");
                }
                let keys = set.by_kid.len() + set.without_kid.len();
                metrics::gauge!("keygate_jwks_keys", "issuer" => self.config.issuer.clone())
                    .set(keys as f64);
                metrics::counter!("keygate_jwks_fetches_total", "issuer" => self.config.issuer.clone(), "result" => "ok")
                    .increment(1);
                loaded.set = Some(Arc::new(set));
                loaded.fetched_at = started;
                loaded.next_fetch = started + every;
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                Ok(())
            }
            Err(e) => {
                metrics::counter!("keygate_jwks_fetches_total", "issuer" => self.config.issuer.clone(), "result" => "error")
                    .increment(1);
                loaded.next_fetch = started + self.settings.retry;
                let mut last = self
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                // One warning per distinct failure, not one per retry.
                if last.as_deref() != Some(e.as_str()) {
                    tracing::warn!(issuer = %self.config.issuer, error = %e, "could not fetch jwt issuer keys; its tokens are refused while there are no fresh keys");
                    *last = Some(e.clone());
                }
                Err(e)
            }
        }
    }

    async fn download(&self, url: &str) -> Result<(KeySet, Option<u64>), String> {
        let mut response = self
            .http
            .get(url)
            .timeout(self.settings.fetch_timeout)
            .send()
            .await
            .map_err(|e| format!("fetch failed: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("fetch answered {}", response.status()));
        }
        let max_age = response
            .headers()
            .get(reqwest::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(max_age);
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("reading failed: {e}"))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("document over {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((parse(&body)?, max_age))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_max_age() {
        assert_eq!(max_age("public, max-age=600"), Some(600));
        assert_eq!(max_age("MAX-AGE = 5"), Some(5));
        assert_eq!(max_age("no-cache"), None);
        assert_eq!(max_age("max-age=soon"), None);
    }

    #[test]
    fn symmetric_and_encryption_keys_are_skipped() {
        let doc = br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"},
            {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"e","use":"enc"}]}"#;
        assert!(parse(doc).is_err());
        let doc = br#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"e"}]}"#;
        let set = parse(doc).unwrap();
        assert!(set.find(Some("e")).is_some());
        assert!(set.find(None).is_some(), "the one key of a set");
        assert!(set.find(Some("x")).is_none());
        assert!(parse(b"[]").is_err());
        let doc = br#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"e","alg":"RSA-OAEP"}]}"#;
        assert!(parse(doc).is_err(), "an encryption algorithm signs nothing");
    }
}
