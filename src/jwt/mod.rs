//! JWT credentials: verifies a token's signature against its issuer's JWKS
//! (with `jsonwebtoken`), then its claims (`keygate_core::jwt::check`,
//! against the injected clock), and remembers the verified ones by digest
//! until they expire, so a token's signature is checked once per replica.
//!
//! A forged token costs at most one signature check and never a store
//! read: nothing here touches the store.

pub mod jwks;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm as JoseAlgorithm, Validation};
use keygate_core::clock::Clock;
use keygate_core::decision::DenyReason;
use keygate_core::jwt::{self, Algorithm, IssuerConfig, JwtIdentity, MAX_JWT_BYTES};
use keygate_core::key::KeyRecord;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use self::jwks::IssuerKeys;
pub use self::jwks::JwksSettings;

/// What a JWT is presented for: each issuer is trusted for one or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// A KeyAdmin call, Watch or ListReplicas.
    Admin,
    /// Authorize or Envoy's Check.
    Authorize,
}

/// A verified JWT: who it speaks for, and the key it acts as under the
/// admin API's and the rate limiter's rules (never stored).
#[derive(Debug)]
pub struct VerifiedJwt {
    /// The claims keygate uses.
    pub identity: JwtIdentity,
    /// [`JwtIdentity::as_caller_key`], made once.
    pub key: Arc<KeyRecord>,
    issuer: usize,
    generation: u64,
}

/// Why a JWT is not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The token is refused for this reason (INVALID_TOKEN or EXPIRED_TOKEN).
    Denied(DenyReason),
    /// The issuer's keys cannot be had (never fetched, or too old): the
    /// token can't be checked, so it is not accepted. Names the issuer.
    Unavailable(String),
}

/// Whether a presented credential looks like a JWT rather than a keygate
/// key (which never holds a `.`).
pub fn looks_like_jwt(token: &str) -> bool {
    token.contains('.')
}

/// The trusted issuers and the verified-token cache.
pub struct Verifier {
    issuers: Vec<Arc<IssuerKeys>>,
    verified: moka::sync::Cache<[u8; 32], Arc<VerifiedJwt>>,
    clock: Arc<dyn Clock>,
    settings: JwksSettings,
}

/// Most verified JWTs remembered per replica.
const MAX_CACHED: u64 = 100_000;

struct UntilExpiry;

impl moka::Expiry<[u8; 32], Arc<VerifiedJwt>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<VerifiedJwt>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        // An upper bound on the real clock; every use checks `exp` against
        // the injected one as well.
        let left = value.identity.expires_at - chrono::Utc::now();
        Some(left.to_std().unwrap_or(Duration::ZERO) + Duration::from_secs(300))
    }
}

impl Verifier {
    /// One entry per issuer; no keys are fetched until [`Verifier::fetch_all`].
    /// Fails, naming the issuer, when its `jwks_ca_file` cannot be read or
    /// holds no certificate.
    pub fn new(
        issuers: Vec<IssuerConfig>,
        clock: Arc<dyn Clock>,
        settings: JwksSettings,
    ) -> Result<Self, String> {
        let issuers = issuers
            .into_iter()
            .map(|config| {
                let http = http_client(&config, &settings)
                    .map_err(|e| format!("jwt issuer {:?}: {e}", config.issuer))?;
                Ok(Arc::new(IssuerKeys::new(
                    config,
                    http,
                    clock.clone(),
                    settings.clone(),
                )))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self::with_issuers(issuers, clock, settings))
    }

    /// No trusted issuer: every JWT is refused.
    pub fn none(clock: Arc<dyn Clock>) -> Self {
        Self::with_issuers(Vec::new(), clock, JwksSettings::default())
    }

    fn with_issuers(
        issuers: Vec<Arc<IssuerKeys>>,
        clock: Arc<dyn Clock>,
        settings: JwksSettings,
    ) -> Self {
        Self {
            issuers,
            verified: moka::sync::Cache::builder()
                .max_capacity(MAX_CACHED)
                .expire_after(UntilExpiry)
                .build(),
            clock,
            settings,
        }
    }

    /// Whether any issuer is configured.
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Fetches every issuer's keys once (at start); failures are logged and
    /// retried by [`Verifier::run`], and meanwhile that issuer's tokens are
    /// refused.
    pub async fn fetch_all(&self) {
        let fetches = self.issuers.iter().map(|i| i.fetch());
        futures_util::future::join_all(fetches).await;
    }

    /// Refreshes the issuers' keys when due, until `stopping`.
    pub async fn run(self: Arc<Self>, stopping: CancellationToken) {
        if self.issuers.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stopping.cancelled() => return,
                _ = tick.tick() => {}
            }
            for issuer in self.issuers.iter().filter(|i| i.due()) {
                let _ = issuer.fetch().await;
            }
        }
    }

    /// Verifies `token` for `usage`: signature, issuer, audience, times,
    /// lifetime, subject, organization. Remembered by digest until `exp`.
    /// Counted in `keygate_jwt_verifications_total{result}`: `cached`,
    /// `verified` (the signature was checked) or `refused`.
    pub async fn verify(&self, token: &str, usage: Use) -> Result<Arc<VerifiedJwt>, Refused> {
        let (answer, cached) = self.check(token, usage).await;
        let result = match (&answer, cached) {
            (Err(_), _) => "refused",
            (Ok(_), true) => "cached",
            (Ok(_), false) => "verified",
        };
        metrics::counter!("keygate_jwt_verifications_total", "result" => result).increment(1);
        answer
    }

    /// `verify`, and whether the answer came from the cache.
    async fn check(&self, token: &str, usage: Use) -> (Result<Arc<VerifiedJwt>, Refused>, bool) {
        match self.cached(token, usage) {
            Some(answer) => (answer, true),
            None => (self.verify_signature(token, usage).await, false),
        }
    }

    /// The cached answer for `token`, if it is cached and still holds.
    fn cached(&self, token: &str, usage: Use) -> Option<Result<Arc<VerifiedJwt>, Refused>> {
        if token.len() > MAX_JWT_BYTES {
            return None;
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let hit = self.verified.get(&digest)?;
        let issuer = &self.issuers[hit.issuer];
        if !usable_for(&issuer.config, usage) {
            return Some(Err(Refused::Denied(DenyReason::InvalidToken)));
        }
        if !hit
            .identity
            .valid_at(self.clock.now(), issuer.config.clock_skew)
        {
            self.verified.invalidate(&digest);
            return Some(Err(Refused::Denied(DenyReason::ExpiredToken)));
        }
        match issuer.generation() {
            Some(g) if g == hit.generation => Some(Ok(hit)),
            None => Some(Err(Refused::Unavailable(issuer.config.issuer.clone()))),
            // The keys changed since: check again, with the keys in force.
            Some(_) => {
                self.verified.invalidate(&digest);
                None
            }
        }
    }

    async fn verify_signature(&self, token: &str, usage: Use) -> Result<Arc<VerifiedJwt>, Refused> {
        const INVALID: Refused = Refused::Denied(DenyReason::InvalidToken);
        if token.len() > MAX_JWT_BYTES {
            return Err(INVALID);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = self.clock.now();
        let header = jsonwebtoken::decode_header(token).map_err(|_| INVALID)?;
        let claims = unverified_claims(token).ok_or(INVALID)?;
        let iss = jwt::unverified_issuer(&claims).ok_or(INVALID)?;
        let (index, issuer) = self
            .issuers
            .iter()
            .enumerate()
            .find(|(_, i)| i.config.issuer == iss && usable_for(&i.config, usage))
            .ok_or(INVALID)?;
        let alg = algorithm(header.alg).ok_or(INVALID)?;
        if !issuer.config.algorithms.contains(&alg) {
            return Err(INVALID);
        }
        let Some((mut set, mut generation)) = issuer.current() else {
            return Err(Refused::Unavailable(issuer.config.issuer.clone()));
        };
        let kid = header.kid.as_deref();
        let key = match set.find(kid) {
            Some(key) => key,
            None if kid.is_some() && issuer.refetch_for_unknown_kid().await => {
                (set, generation) = issuer
                    .current()
                    .ok_or_else(|| Refused::Unavailable(issuer.config.issuer.clone()))?;
                set.find(kid).ok_or(INVALID)?
            }
            None => return Err(INVALID),
        };
        if key.alg.is_some_and(|a| a != header.alg) {
            return Err(INVALID);
        }
        let mut validation = Validation::new(header.alg);
        // Times, audience and issuer are keygate-core's to check, against
        // the injected clock; the crate checks the signature only.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let verified = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|_| INVALID)?;
        let identity = jwt::check(&issuer.config, &verified.claims, now)
            .map_err(|refusal| Refused::Denied(refusal.deny_reason()))?;
        let entry = Arc::new(VerifiedJwt {
            key: Arc::new(identity.as_caller_key()),
            identity,
            issuer: index,
            generation,
        });
        self.verified.insert(digest, entry.clone());
        Ok(entry)
    }

    /// Whether `verified` would still be accepted now: not expired, and
    /// its issuer's keys are those it was verified with. For Watch.
    pub fn still_valid(&self, verified: &VerifiedJwt) -> Result<(), Refused> {
        let issuer = &self.issuers[verified.issuer];
        if !verified
            .identity
            .valid_at(self.clock.now(), issuer.config.clock_skew)
        {
            return Err(Refused::Denied(DenyReason::ExpiredToken));
        }
        match issuer.generation() {
            Some(g) if g == verified.generation => Ok(()),
            Some(_) => Err(Refused::Denied(DenyReason::InvalidToken)),
            None => Err(Refused::Unavailable(issuer.config.issuer.clone())),
        }
    }
}

/// The client that fetches one issuer's JWKS: no redirects (the URL is the
/// reviewed one), the web's roots or the issuer's own CA.
fn http_client(config: &IssuerConfig, settings: &JwksSettings) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(settings.fetch_timeout)
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = &config.jwks_ca_file {
        let pem =
            std::fs::read(path).map_err(|e| format!("jwks_ca_file {}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("jwks_ca_file {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("jwks_ca_file {}: no certificate", path.display()));
        }
        builder = builder.tls_built_in_root_certs(false);
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| format!("http client: {e}"))
}

fn usable_for(config: &IssuerConfig, usage: Use) -> bool {
    match usage {
        Use::Admin => config.usage.admin(),
        Use::Authorize => config.usage.authorize(),
    }
}

/// The payload of a compact JWS, not yet verified: only to find the issuer.
fn unverified_claims(token: &str) -> Option<Map<String, Value>> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// keygate's name for a header's `alg`; `None` for HMAC (never accepted).
fn algorithm(alg: JoseAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        JoseAlgorithm::RS256 => Algorithm::Rs256,
        JoseAlgorithm::RS384 => Algorithm::Rs384,
        JoseAlgorithm::RS512 => Algorithm::Rs512,
        JoseAlgorithm::PS256 => Algorithm::Ps256,
        JoseAlgorithm::PS384 => Algorithm::Ps384,
        JoseAlgorithm::PS512 => Algorithm::Ps512,
        JoseAlgorithm::ES256 => Algorithm::Es256,
        JoseAlgorithm::ES384 => Algorithm::Es384,
        JoseAlgorithm::EdDSA => Algorithm::EdDsa,
        JoseAlgorithm::HS256 | JoseAlgorithm::HS384 | JoseAlgorithm::HS512 => return None,
    })
}
