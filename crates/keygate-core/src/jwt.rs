//! JWT credentials from trusted issuers: each issuer's configuration (the
//! `[[jwt_issuer]]` tables of the policy file) and the checks on a token's
//! claims, as pure functions over the claims and the time.
//!
//! keygate issues no JWTs; an identity provider does. The server verifies a
//! token's signature (with the `jsonwebtoken` crate, against the issuer's
//! JWKS) and only then hands its claims to [`check`]; everything about time
//! is decided here, against the injected clock, never the system clock.
//!
//! ```toml
//! [[jwt_issuer]]
//! issuer = "https://idp.example.com/realms/payments"
//! audience = "keygate"
//! jwks_url = "https://idp.example.com/realms/payments/protocol/openid-connect/certs"
//! usage = "both"                 # admin | authorize | both
//! organization_claim = "org_id"
//! ```

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::decision::DenyReason;
use crate::event::Actor;
use crate::key::{self, KeyRecord, KeyState, Mode, Tier};
use crate::scope::{MAX_SCOPES, Scope, ScopeSet};
use crate::token::SecretDigest;

/// Longest JWT looked at, in bytes; longer is INVALID_TOKEN before any
/// decoding. Identity providers' access tokens are well under this.
pub const MAX_JWT_BYTES: usize = 8 * 1024;
/// Longest `sub` or `jti` accepted, in bytes.
pub const MAX_CLAIM_BYTES: usize = 256;
/// Most `[[jwt_issuer]]` tables in one policy.
pub const MAX_ISSUERS: usize = 32;

/// What an issuer's tokens may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// KeyAdmin, Watch and ListReplicas only.
    Admin,
    /// Authorize and Envoy's Check only.
    Authorize,
    /// Both.
    Both,
}

impl Usage {
    /// Whether the issuer's tokens are admin credentials.
    pub fn admin(self) -> bool {
        matches!(self, Usage::Admin | Usage::Both)
    }

    /// Whether the issuer's tokens are accepted by Authorize.
    pub fn authorize(self) -> bool {
        matches!(self, Usage::Authorize | Usage::Both)
    }
}

/// The signature algorithms keygate accepts: public-key ones only, never
/// `none` and never HMAC (a public key used as an HMAC secret is the classic
/// algorithm-confusion forgery).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    Rs512,
    /// RSASSA-PSS with SHA-256.
    Ps256,
    /// RSASSA-PSS with SHA-384.
    Ps384,
    /// RSASSA-PSS with SHA-512.
    Ps512,
    /// ECDSA on P-256 with SHA-256.
    Es256,
    /// ECDSA on P-384 with SHA-384.
    Es384,
    /// Ed25519.
    EdDsa,
}

impl Algorithm {
    /// Every accepted algorithm.
    pub const ALL: [Algorithm; 9] = [
        Self::Rs256,
        Self::Rs384,
        Self::Rs512,
        Self::Ps256,
        Self::Ps384,
        Self::Ps512,
        Self::Es256,
        Self::Es384,
        Self::EdDsa,
    ];

    /// Accepted when an issuer names none.
    pub const DEFAULT: [Algorithm; 3] = [Self::Rs256, Self::Es256, Self::EdDsa];

    /// The JOSE name (`RS256`, `EdDSA`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
            Self::Ps256 => "PS256",
            Self::Ps384 => "PS384",
            Self::Ps512 => "PS512",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::EdDsa => "EdDSA",
        }
    }

    /// The algorithm a JOSE header names; `none`, `HS*` and anything else
    /// unknown is `Err` with why.
    pub fn parse(name: &str) -> Result<Self, String> {
        if let Some(a) = Self::ALL.into_iter().find(|a| a.as_str() == name) {
            return Ok(a);
        }
        if name.eq_ignore_ascii_case("none") {
            Err("\"none\" is never accepted: it means an unsigned token".into())
        } else if name.to_ascii_uppercase().starts_with("HS") {
            Err(format!(
                "{name:?} is never accepted: HMAC needs a shared secret, and an issuer's public key must not serve as one"
            ))
        } else {
            Err(format!(
                "{name:?} is not a supported algorithm (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"
            ))
        }
    }
}

/// Where an issuer's public keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// Fetched over HTTPS (HTTP only on a loopback address) and refreshed.
    Url(String),
    /// A JWKS document read once at start.
    File(PathBuf),
}

/// One trusted issuer, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerConfig {
    /// Must equal the token's `iss`.
    pub issuer: String,
    /// Must be the token's `aud`, or one of them.
    pub audience: String,
    /// The issuer's public keys.
    pub jwks: JwksSource,
    /// PEM certificates to trust for the `jwks_url`'s TLS instead of the
    /// public web roots (an internal identity provider's private CA).
    pub jwks_ca_file: Option<PathBuf>,
    /// The `alg` values accepted (never `none` or HMAC).
    pub algorithms: Vec<Algorithm>,
    /// Admin, Authorize or both.
    pub usage: Usage,
    /// The claim naming the organization the token acts in.
    pub organization_claim: String,
    /// The claim holding scopes: a space-separated string or an array.
    pub scope_claim: String,
    /// Whether a token with no organization claim is a SYSTEM credential;
    /// when false such a token is refused.
    pub system: bool,
    /// How far `exp`, `nbf` and `iat` may be off the clock.
    pub clock_skew: Duration,
    /// The longest lifetime (`exp − iat`) accepted.
    pub max_lifetime: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IssuerEntry {
    issuer: String,
    audience: Option<String>,
    jwks_url: Option<String>,
    jwks_file: Option<PathBuf>,
    jwks_ca_file: Option<PathBuf>,
    algorithms: Option<Vec<String>>,
    usage: Option<String>,
    organization_claim: Option<String>,
    scope_claim: Option<String>,
    system: Option<bool>,
    clock_skew_seconds: Option<u32>,
    max_lifetime_seconds: Option<u32>,
}

/// The longest `clock_skew_seconds` accepted: 5 minutes.
pub const MAX_CLOCK_SKEW_SECONDS: u32 = 300;
/// The longest `max_lifetime_seconds` accepted: 1 day.
pub const MAX_LIFETIME_SECONDS: u32 = 86_400;

impl IssuerEntry {
    /// The issuer as written, for error messages.
    pub(crate) fn name(&self) -> &str {
        &self.issuer
    }

    /// Validates the entry; the error names the field.
    pub(crate) fn validate(self) -> Result<IssuerConfig, String> {
        let issuer = self.issuer.trim();
        if issuer.is_empty() || issuer.len() > 512 {
            return Err("issuer: must be 1-512 bytes".into());
        }
        let audience = self
            .audience
            .ok_or("audience: is required (the token's aud must name keygate)")?;
        if audience.trim().is_empty() || audience.len() > 512 {
            return Err("audience: must be 1-512 bytes".into());
        }
        let jwks = match (self.jwks_url, self.jwks_file) {
            (Some(url), None) => {
                check_jwks_url(&url).map_err(|why| format!("jwks_url: {why}"))?;
                JwksSource::Url(url)
            }
            (None, Some(path)) => JwksSource::File(path),
            (Some(_), Some(_)) => return Err("jwks_url, jwks_file: give one, not both".into()),
            (None, None) => return Err("jwks_url: is required (or jwks_file)".into()),
        };
        if self.jwks_ca_file.is_some()
            && !matches!(&jwks, JwksSource::Url(url) if url.starts_with("https://"))
        {
            return Err("jwks_ca_file: only with an https:// jwks_url".into());
        }
        let algorithms = match self.algorithms {
            None => Algorithm::DEFAULT.to_vec(),
            Some(names) if names.is_empty() => {
                return Err("algorithms: must name at least one algorithm".into());
            }
            Some(names) => {
                let mut algs = Vec::new();
                for name in names {
                    let a = Algorithm::parse(&name).map_err(|why| format!("algorithms: {why}"))?;
                    if !algs.contains(&a) {
                        algs.push(a);
                    }
                }
                algs
            }
        };
        let usage = match self.usage.as_deref() {
            None | Some("both") => Usage::Both,
            Some("admin") => Usage::Admin,
            Some("authorize") => Usage::Authorize,
            Some(other) => {
                return Err(format!(
                    "usage: {other:?} must be \"admin\", \"authorize\" or \"both\""
                ));
            }
        };
        let claim = |field: &str, value: Option<String>, default: &str| match value {
            None => Ok(default.to_owned()),
            Some(v) if !v.is_empty() && v.len() <= 128 => Ok(v),
            Some(_) => Err(format!("{field}: must be 1-128 bytes")),
        };
        let organization_claim = claim("organization_claim", self.organization_claim, "org_id")?;
        let scope_claim = claim("scope_claim", self.scope_claim, "scope")?;
        let skew = self.clock_skew_seconds.unwrap_or(30);
        if skew > MAX_CLOCK_SKEW_SECONDS {
            return Err(format!(
                "clock_skew_seconds: {skew} is over the most allowed, {MAX_CLOCK_SKEW_SECONDS}"
            ));
        }
        let lifetime = self.max_lifetime_seconds.unwrap_or(3600);
        if lifetime == 0 || lifetime > MAX_LIFETIME_SECONDS {
            return Err(format!(
                "max_lifetime_seconds: {lifetime} must be 1-{MAX_LIFETIME_SECONDS}"
            ));
        }
        Ok(IssuerConfig {
            issuer: issuer.to_owned(),
            audience,
            jwks,
            jwks_ca_file: self.jwks_ca_file,
            algorithms,
            usage,
            organization_claim,
            scope_claim,
            system: self.system.unwrap_or(false),
            clock_skew: Duration::seconds(skew.into()),
            max_lifetime: Duration::seconds(lifetime.into()),
        })
    }
}

/// `https://host[:port]/…`, or `http://` only when the host is a loopback
/// address (`localhost`, `127.0.0.0/8`, `[::1]`); no user info.
fn check_jwks_url(url: &str) -> Result<(), String> {
    let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(format!("{url:?} must start with https://"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err("must not carry user info".into());
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !https && !loopback {
        return Err(format!(
            "{url:?} must use https:// (plain http:// only on a loopback address)"
        ));
    }
    Ok(())
}

/// Why a token's claims are refused. Every one is INVALID_TOKEN to the
/// caller but [`Refusal::Expired`], which is EXPIRED_TOKEN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `iss` is not the issuer's.
    #[error("iss is not the configured issuer")]
    WrongIssuer,
    /// `aud` does not name the configured audience.
    #[error("aud does not name the configured audience")]
    WrongAudience,
    /// `exp` has passed (beyond the clock skew).
    #[error("the token has expired")]
    Expired,
    /// `nbf` (or `iat`) is in the future (beyond the clock skew).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `exp − iat` is longer than the issuer's `max_lifetime_seconds`.
    #[error("the token's lifetime is over the issuer's maximum")]
    TooLong,
    /// A required claim is missing or of the wrong type.
    #[error("claim {0}: missing or malformed")]
    Malformed(&'static str),
    /// No organization claim, and the issuer is not `system: true`.
    #[error("no organization claim, and the issuer does not grant SYSTEM")]
    NoOrganization,
}

impl Refusal {
    /// The deny reason the caller sees.
    pub fn deny_reason(&self) -> DenyReason {
        match self {
            Refusal::Expired => DenyReason::ExpiredToken,
            _ => DenyReason::InvalidToken,
        }
    }
}

/// Who a verified JWT speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtIdentity {
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// `jti`, when the token has one.
    pub jti: Option<String>,
    /// The organization claim; `None` for a SYSTEM credential.
    pub organization_id: Option<String>,
    /// The keygate scopes of the scope claim (entries that are not
    /// `resource:action`, such as `openid`, grant nothing and are dropped).
    pub scopes: ScopeSet,
    /// `exp`: the identity is never used at or after it (plus the skew).
    pub expires_at: DateTime<Utc>,
}

impl JwtIdentity {
    /// SYSTEM exactly when there is no organization.
    pub fn tier(&self) -> Tier {
        match self.organization_id {
            None => Tier::System,
            Some(_) => Tier::Organization,
        }
    }

    /// How the audit trail names this identity: `jwt:<iss>#<sub>`, with
    /// `;jti=<jti>` when the token has one.
    pub fn actor(&self) -> Actor {
        Actor::Jwt {
            issuer: self.issuer.clone(),
            subject: self.subject.clone(),
            jti: self.jti.clone(),
        }
    }

    /// A stable id for `(iss, sub)`, to count rate limits and Watch streams
    /// per subject: the first 16 bytes of SHA-256 over `jwt:<iss>#<sub>`.
    pub fn subject_id(&self) -> Uuid {
        let digest = Sha256::digest(format!("jwt:{}#{}", self.issuer, self.subject).as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        Uuid::from_bytes(bytes)
    }

    /// The key this identity acts as under the admin API's rules, never
    /// stored: its organization (or SYSTEM), its scopes, LIVE, no
    /// allow-list, the server's default rate limit, and no expiry. A key
    /// made by a JWT does not inherit the JWT's `exp`: the key outlives the
    /// operator's session by design.
    pub fn as_caller_key(&self) -> KeyRecord {
        KeyRecord {
            id: self.subject_id(),
            name: self.actor().to_string(),
            organization_id: self.organization_id.as_deref().map(Arc::from),
            tier: self.tier(),
            mode: Mode::Live,
            prefix: String::new(),
            // Matches no token: this record is never authenticated against.
            secret_digest: SecretDigest([0; 32]),
            previous_secret: None,
            scopes: self.scopes.clone(),
            allowed_cidrs: Vec::new(),
            rate_limit_per_minute: 0,
            unlimited: false,
            state: KeyState::Active,
            created_at: DateTime::UNIX_EPOCH,
            last_used_at: None,
            expires_at: None,
            rotated_at: None,
            created_by: String::new(),
            version: 0,
        }
    }

    /// Whether the identity still holds at `now` (its `exp`, plus the skew).
    pub fn valid_at(&self, now: DateTime<Utc>, skew: Duration) -> bool {
        now < self.expires_at + skew
    }
}

/// The `iss` of an unverified payload, to pick the issuer whose keys check
/// the signature; `None` when there is none.
pub fn unverified_issuer(claims: &Map<String, Value>) -> Option<&str> {
    claims.get("iss").and_then(Value::as_str)
}

/// Checks verified claims against the issuer and the time: `iss`, `aud`,
/// `exp`, `nbf`, `iat`, the lifetime, `sub`, the organization and scopes.
pub fn check(
    issuer: &IssuerConfig,
    claims: &Map<String, Value>,
    now: DateTime<Utc>,
) -> Result<JwtIdentity, Refusal> {
    if unverified_issuer(claims) != Some(issuer.issuer.as_str()) {
        return Err(Refusal::WrongIssuer);
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => *aud == issuer.audience,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(&issuer.audience)),
        _ => false,
    };
    if !audience_ok {
        return Err(Refusal::WrongAudience);
    }
    let skew = issuer.clock_skew;
    let exp = numeric_date(claims, "exp")?.ok_or(Refusal::Malformed("exp"))?;
    if now >= exp + skew {
        return Err(Refusal::Expired);
    }
    if let Some(nbf) = numeric_date(claims, "nbf")?
        && nbf > now + skew
    {
        return Err(Refusal::NotYetValid);
    }
    let iat = numeric_date(claims, "iat")?;
    if iat.is_some_and(|iat| iat > now + skew) {
        return Err(Refusal::NotYetValid);
    }
    // Without iat, the lifetime left must itself be within the maximum.
    let start = iat.unwrap_or(now);
    if exp - start > issuer.max_lifetime {
        return Err(Refusal::TooLong);
    }
    let subject = bounded_string(claims, "sub")?.ok_or(Refusal::Malformed("sub"))?;
    let jti = bounded_string(claims, "jti")?;
    let organization_id = match claims.get(&issuer.organization_claim) {
        None | Some(Value::Null) if issuer.system => None,
        None | Some(Value::Null) => return Err(Refusal::NoOrganization),
        Some(Value::String(org)) if key::is_valid_organization_id(org) => Some(org.clone()),
        Some(_) => return Err(Refusal::Malformed("organization")),
    };
    let scopes = scopes(claims.get(&issuer.scope_claim))?;
    Ok(JwtIdentity {
        issuer: issuer.issuer.clone(),
        subject,
        jti,
        organization_id,
        scopes,
        expires_at: exp,
    })
}

/// A NumericDate claim (seconds since the epoch, maybe fractional).
fn numeric_date(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<DateTime<Utc>>, Refusal> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            let secs = n
                .as_i64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.is_finite())
                        .map(|f| f.floor() as i64)
                })
                .ok_or(Refusal::Malformed(name))?;
            DateTime::from_timestamp(secs, 0)
                .map(Some)
                .ok_or(Refusal::Malformed(name))
        }
        Some(_) => Err(Refusal::Malformed(name)),
    }
}

fn bounded_string(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<String>, Refusal> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_CLAIM_BYTES => {
            Ok(Some(s.clone()))
        }
        Some(_) => Err(Refusal::Malformed(name)),
    }
}

/// A space-separated string (RFC 8693 `scope`) or an array of strings
/// (`scp`); entries outside keygate's scope grammar grant nothing.
fn scopes(claim: Option<&Value>) -> Result<ScopeSet, Refusal> {
    let entries: Vec<&str> = match claim {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s.split_ascii_whitespace().collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().ok_or(Refusal::Malformed("scope")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(Refusal::Malformed("scope")),
    };
    let parsed: Vec<&str> = entries
        .into_iter()
        .filter(|s| Scope::parse(s).is_ok())
        .take(MAX_SCOPES)
        .collect();
    ScopeSet::parse(&parsed).map_err(|_| Refusal::Malformed("scope"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn entry(extra: &str) -> Result<IssuerConfig, String> {
        let text = format!(
            "issuer = \"https://idp.example\"\naudience = \"keygate\"\njwks_url = \"https://idp.example/certs\"\n{extra}"
        );
        let entry: IssuerEntry = toml::from_str(&text).map_err(|e| e.to_string())?;
        entry.validate()
    }

    fn issuer() -> IssuerConfig {
        entry("").unwrap()
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn claims(v: Value) -> Map<String, Value> {
        let Value::Object(map) = v else { panic!() };
        map
    }

    fn good() -> Value {
        let t = now().timestamp();
        json!({"iss": "https://idp.example", "aud": "keygate", "sub": "alice", "iat": t, "exp": t + 600,
               "org_id": "org_a", "scope": "openid api_key:create api_key:read"})
    }

    fn with(field: &str, value: Value) -> Map<String, Value> {
        let mut c = claims(good());
        if value.is_null() {
            c.remove(field);
        } else {
            c.insert(field.into(), value);
        }
        c
    }

    #[test]
    fn defaults() {
        let i = issuer();
        assert_eq!(i.algorithms, Algorithm::DEFAULT.to_vec());
        assert_eq!(i.usage, Usage::Both);
        assert_eq!(i.organization_claim, "org_id");
        assert_eq!(i.scope_claim, "scope");
        assert_eq!(i.clock_skew, Duration::seconds(30));
        assert_eq!(i.max_lifetime, Duration::hours(1));
        assert!(!i.system);
    }

    #[test]
    fn bad_entries_name_the_field() {
        for (extra, needle) in [
            ("algorithms = [\"none\"]", "algorithms: \"none\""),
            (
                "algorithms = [\"HS256\"]",
                "algorithms: \"HS256\" is never accepted",
            ),
            (
                "algorithms = [\"XS1\"]",
                "algorithms: \"XS1\" is not a supported",
            ),
            ("algorithms = []", "algorithms: must name"),
            ("usage = \"all\"", "usage:"),
            ("clock_skew_seconds = 301", "clock_skew_seconds:"),
            ("max_lifetime_seconds = 0", "max_lifetime_seconds:"),
            ("jwks_file = \"x.json\"", "give one, not both"),
            ("colour = 1", "unknown field"),
        ] {
            let msg = entry(extra).unwrap_err();
            assert!(msg.contains(needle), "{extra}: {msg}");
        }
        for (url, ok) in [
            ("https://idp.example/certs", true),
            ("http://127.0.0.1:8080/certs", true),
            ("http://localhost/certs", true),
            ("http://[::1]:9/certs", true),
            ("http://idp.example/certs", false),
            ("http://10.0.0.1/certs", false),
            ("ftp://idp.example/certs", false),
            ("https://user@idp.example/certs", false),
            ("http://127.0.0.1@evil.example/certs", false),
            ("https:///certs", false),
        ] {
            assert_eq!(check_jwks_url(url).is_ok(), ok, "{url}");
        }
        assert!(
            entry("jwks_ca_file = \"ca.pem\"")
                .unwrap()
                .jwks_ca_file
                .is_some()
        );
        let text = "issuer = \"i\"\naudience = \"k\"\njwks_url = \"http://127.0.0.1/c\"\njwks_ca_file = \"ca.pem\"";
        let e: IssuerEntry = toml::from_str(text).unwrap();
        assert!(e.validate().unwrap_err().starts_with("jwks_ca_file:"));
        let text = "issuer = \"https://idp\"\njwks_url = \"https://idp/certs\"";
        let e: IssuerEntry = toml::from_str(text).unwrap();
        assert!(e.validate().unwrap_err().starts_with("audience:"));
    }

    #[test]
    fn good_claims_give_the_identity() {
        let id = check(&issuer(), &claims(good()), now()).unwrap();
        assert_eq!(id.subject, "alice");
        assert_eq!(id.organization_id.as_deref(), Some("org_a"));
        assert_eq!(id.scopes.to_strings(), ["api_key:create", "api_key:read"]);
        assert_eq!(id.tier(), Tier::Organization);
        assert_eq!(id.actor().to_string(), "jwt:https://idp.example#alice");
        let key = id.as_caller_key();
        assert_eq!(key.expires_at, None, "a JWT's exp is not inherited");
        assert_eq!(key.mode, Mode::Live);
        let mut c = claims(good());
        c.insert("jti".into(), json!("j-1"));
        c.insert("aud".into(), json!(["other", "keygate"]));
        c.remove("scope");
        c.insert("scope".into(), json!(["transaction:read"]));
        let id = check(&issuer(), &c, now()).unwrap();
        assert_eq!(
            id.actor().to_string(),
            "jwt:https://idp.example#alice;jti=j-1"
        );
        assert_eq!(id.scopes.to_strings(), ["transaction:read"]);
    }

    #[test]
    fn each_claim_refusal() {
        let t = now().timestamp();
        let i = issuer();
        for (c, refusal) in [
            (with("iss", json!("https://evil")), Refusal::WrongIssuer),
            (with("aud", json!("other")), Refusal::WrongAudience),
            (with("aud", Value::Null), Refusal::WrongAudience),
            (with("exp", json!(t - 31)), Refusal::Expired),
            (with("exp", json!(t - 30)), Refusal::Expired),
            (
                with("exp", json!(format!("{}", t + 60))),
                Refusal::Malformed("exp"),
            ),
            (with("exp", Value::Null), Refusal::Malformed("exp")),
            (with("nbf", json!(t + 31)), Refusal::NotYetValid),
            (with("iat", json!(t + 31)), Refusal::NotYetValid),
            (with("exp", json!(t + 3601)), Refusal::TooLong),
            (with("sub", Value::Null), Refusal::Malformed("sub")),
            (
                with("sub", json!("x".repeat(257))),
                Refusal::Malformed("sub"),
            ),
            (with("org_id", Value::Null), Refusal::NoOrganization),
            (
                with("org_id", json!("bad org")),
                Refusal::Malformed("organization"),
            ),
            (with("scope", json!(7)), Refusal::Malformed("scope")),
        ] {
            assert_eq!(check(&i, &c, now()), Err(refusal.clone()), "{c:?}");
        }
        // Within the skew, still good.
        assert!(check(&i, &with("exp", json!(t - 29)), now()).is_ok());
        assert!(check(&i, &with("nbf", json!(t + 29)), now()).is_ok());
        // No iat: the lifetime left counts.
        let mut c = with("iat", Value::Null);
        c.insert("exp".into(), json!(t + 3601));
        assert_eq!(check(&i, &c, now()), Err(Refusal::TooLong));
        assert_eq!(Refusal::Expired.deny_reason(), DenyReason::ExpiredToken);
        assert_eq!(Refusal::TooLong.deny_reason(), DenyReason::InvalidToken);
    }

    #[test]
    fn a_system_issuer_grants_system_without_an_organization() {
        let i = entry("system = true").unwrap();
        let id = check(&i, &with("org_id", Value::Null), now()).unwrap();
        assert_eq!(id.tier(), Tier::System);
        assert_eq!(id.as_caller_key().tier, Tier::System);
    }
}
