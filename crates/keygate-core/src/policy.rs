//! Route policy: which scope each route needs.
//!
//! Loaded from TOML:
//! ```toml
//! [[route]]
//! route = "GET /v1/transactions/{id}"
//! scope = "transaction:read"
//! [[route]]
//! route = "/payments.v1.Refunds/*"
//! scope = "transaction:update"
//! ```
//! `{name}` matches one path segment and a trailing `*` the rest. A pattern
//! without a method matches every method (and gRPC full method names). A
//! route may name the credentials it accepts (`credentials = ["api_key"]`,
//! `["jwt"]`; both when unset). The same file holds the trusted JWT issuers
//! (`[[jwt_issuer]]`, see [`crate::jwt`]).

use serde::Deserialize;

use super::decision::CredentialKind;
use super::jwt::{IssuerConfig, IssuerEntry, MAX_ISSUERS};
use super::scope::Scope;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    route: Vec<RouteEntry>,
    #[serde(default)]
    jwt_issuer: Vec<IssuerEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    route: String,
    scope: String,
    credentials: Option<Vec<String>>,
}

/// What a route needs: a scope, and one of the credential kinds it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    /// The scope the credential must hold.
    pub scope: Scope,
    /// Whether API keys are accepted.
    pub api_key: bool,
    /// Whether JWT access tokens are accepted.
    pub jwt: bool,
}

impl RouteRule {
    /// Whether a credential of `kind` may be used on the route at all.
    pub fn accepts(&self, kind: CredentialKind) -> bool {
        match kind {
            CredentialKind::ApiKey => self.api_key,
            CredentialKind::Jwt => self.jwt,
        }
    }
}

/// A whole policy file: the route table and the trusted JWT issuers.
#[derive(Debug, Default)]
pub struct Policy {
    /// Route patterns to what they need.
    pub routes: RouteTable,
    /// The `[[jwt_issuer]]` tables, validated, in file order.
    pub jwt_issuers: Vec<IssuerConfig>,
}

impl Policy {
    /// Reads a policy file; every route and issuer is checked, the first bad
    /// one is the error, naming it.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text)?;
        let routes = RouteTable::from_entries(file.route)?;
        if file.jwt_issuer.len() > MAX_ISSUERS {
            return Err(PolicyError::Issuer {
                index: MAX_ISSUERS + 1,
                issuer: file.jwt_issuer[MAX_ISSUERS].name().to_owned(),
                why: format!("at most {MAX_ISSUERS} issuers"),
            });
        }
        let mut jwt_issuers: Vec<IssuerConfig> = Vec::new();
        for (i, entry) in file.jwt_issuer.into_iter().enumerate() {
            let issuer = entry.name().to_owned();
            let fail = |why: String| PolicyError::Issuer {
                index: i + 1,
                issuer: issuer.clone(),
                why,
            };
            let config = entry.validate().map_err(fail)?;
            if jwt_issuers.iter().any(|c| c.issuer == config.issuer) {
                return Err(fail("issuer: configured twice".into()));
            }
            jwt_issuers.push(config);
        }
        Ok(Self {
            routes,
            jwt_issuers,
        })
    }
}

/// What is wrong with a policy, naming the entry (1-based) when it is one entry.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not TOML, or not the `[[route]]` shape (unknown fields are refused).
    #[error("policy is not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    /// One entry's route pattern or scope is invalid, or its pattern
    /// conflicts with an earlier entry's.
    #[error("policy route #{index} ({route:?}): {why}")]
    Entry {
        /// The entry's position in the file, from 1.
        index: usize,
        /// The entry's route pattern, as written.
        route: String,
        /// What is wrong with it.
        why: String,
    },
    /// One `[[jwt_issuer]]` table is invalid; `why` names the field.
    #[error("policy jwt_issuer #{index} ({issuer:?}): {why}")]
    Issuer {
        /// The table's position among the issuers, from 1.
        index: usize,
        /// Its `issuer`, as written.
        issuer: String,
        /// What is wrong with it, starting with the field's name.
        why: String,
    },
}

/// Route patterns to required scopes.
#[derive(Default)]
pub struct RouteTable {
    /// Per upper-case method; few enough that a linear scan beats hashing.
    by_method: Vec<(String, matchit::Router<RouteRule>)>,
    any_method: matchit::Router<RouteRule>,
    len: usize,
}

impl std::fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTable")
            .field("routes", &self.len)
            .finish()
    }
}

impl RouteTable {
    /// Reads a policy file (the format in the module docs) for its routes;
    /// its issuers are checked too, but only [`Policy::from_toml`] keeps
    /// them. Every entry is checked; the first bad one is the error, and no
    /// table is returned.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        Ok(Policy::from_toml(text)?.routes)
    }

    fn from_entries(entries: Vec<RouteEntry>) -> Result<Self, PolicyError> {
        let mut table = RouteTable::default();
        for (i, entry) in entries.into_iter().enumerate() {
            let fail = |why: String| PolicyError::Entry {
                index: i + 1,
                route: entry.route.clone(),
                why,
            };
            let scope = Scope::parse(&entry.scope).map_err(|e| fail(e.to_string()))?;
            let (api_key, jwt) = match &entry.credentials {
                None => (true, true),
                Some(kinds) => {
                    let (mut api_key, mut jwt) = (false, false);
                    for kind in kinds {
                        match kind.as_str() {
                            "api_key" => api_key = true,
                            "jwt" => jwt = true,
                            other => {
                                return Err(fail(format!(
                                    "credentials: {other:?} must be \"api_key\" or \"jwt\""
                                )));
                            }
                        }
                    }
                    if !api_key && !jwt {
                        return Err(fail("credentials: must name at least one kind".into()));
                    }
                    (api_key, jwt)
                }
            };
            let rule = RouteRule {
                scope,
                api_key,
                jwt,
            };
            table.insert(&entry.route, rule).map_err(fail)?;
        }
        Ok(table)
    }

    /// How many route patterns the table holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table holds no pattern (then every route is unmatched).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn insert(&mut self, pattern: &str, rule: RouteRule) -> Result<(), String> {
        let (method, path) = split_route(pattern.trim());
        if !path.starts_with('/') {
            return Err("path must start with '/'".into());
        }
        let path = match path.strip_suffix('*') {
            Some(head) if head.ends_with('/') => format!("{head}{{*rest}}"),
            Some(_) => return Err("'*' is only allowed as the whole last segment".into()),
            None => path.to_owned(),
        };
        if path.contains('*') && !path.ends_with("{*rest}") {
            return Err("'*' is only allowed as the whole last segment".into());
        }
        let router = match method {
            None => &mut self.any_method,
            Some(m) if !m.is_empty() && m.bytes().all(|c| c.is_ascii_uppercase()) => {
                match self.by_method.iter().position(|(name, _)| name == m) {
                    Some(i) => &mut self.by_method[i].1,
                    None => {
                        self.by_method.push((m.to_owned(), matchit::Router::new()));
                        &mut self.by_method.last_mut().expect("just pushed").1
                    }
                }
            }
            Some(m) => return Err(format!("method {m:?} must be upper-case letters")),
        };
        router.insert(path, rule).map_err(|e| e.to_string())?;
        self.len += 1;
        Ok(())
    }

    /// The scope `route` needs, or `None` when no entry matches or the path
    /// could mean something else upstream (dot segments, encoded dots or slashes).
    pub fn required_scope(&self, route: &str) -> Option<&Scope> {
        self.rule(route).map(|r| &r.scope)
    }

    /// What `route` needs (scope and accepted credentials), or `None` as
    /// for [`required_scope`](Self::required_scope).
    pub fn rule(&self, route: &str) -> Option<&RouteRule> {
        let (method, path) = split_route(route.trim());
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        if !path.starts_with('/') || is_ambiguous(path) {
            return None;
        }
        let by_method = method.and_then(|m| {
            self.by_method
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(m))
                .map(|(_, r)| r)
        });
        by_method
            .and_then(|r| r.at(path).ok())
            .or_else(|| self.any_method.at(path).ok())
            .map(|m| m.value)
    }
}

/// "GET /x" → (Some("GET"), "/x"); "/pkg.Svc/Method" → (None, "/pkg.Svc/Method").
fn split_route(route: &str) -> (Option<&str>, &str) {
    match route.split_once(' ') {
        Some((method, path)) => (Some(method), path.trim_start()),
        None => (None, route),
    }
}

/// A path a proxy or upstream may normalise into a different route: matching
/// it literally could grant one route's scope to another, so it matches nothing.
fn is_ambiguous(path: &str) -> bool {
    let lower_has = |needle: &str| {
        path.as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
    };
    path.split('/').any(|seg| seg == "." || seg == "..")
        || path.contains("//")
        || path.contains('\\')
        || lower_has("%2e")
        || lower_has("%2f")
        || lower_has("%5c")
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        [[route]]
        route = "GET /v1/transactions/{id}"
        scope = "transaction:read"
        [[route]]
        route = "POST /v1/checkouts"
        scope = "checkout:create"
        [[route]]
        route = "/payments.v1.Refunds/*"
        scope = "transaction:update"
        [[route]]
        route = "/v1/health"
        scope = "health:read"
    "#;

    fn scope_for(table: &RouteTable, route: &str) -> Option<String> {
        table.required_scope(route).map(|s| s.as_str().to_owned())
    }

    #[test]
    fn matches_segments_methods_and_grpc() {
        let t = RouteTable::from_toml(EXAMPLE).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(
            scope_for(&t, "GET /v1/transactions/tx_1").as_deref(),
            Some("transaction:read")
        );
        assert_eq!(
            scope_for(&t, "get /v1/transactions/tx_1?expand=x").as_deref(),
            Some("transaction:read")
        );
        assert_eq!(scope_for(&t, "GET /v1/transactions/tx_1/refunds"), None);
        assert_eq!(scope_for(&t, "DELETE /v1/transactions/tx_1"), None);
        assert_eq!(
            scope_for(&t, "POST /v1/checkouts").as_deref(),
            Some("checkout:create")
        );
        assert_eq!(
            scope_for(&t, "/payments.v1.Refunds/Create").as_deref(),
            Some("transaction:update")
        );
        assert_eq!(scope_for(&t, "/payments.v1.Refunds/"), None);
        assert_eq!(
            scope_for(&t, "HEAD /v1/health").as_deref(),
            Some("health:read")
        );
        assert_eq!(scope_for(&t, "nonsense"), None);
        assert_eq!(scope_for(&t, ""), None);
    }

    #[test]
    fn dot_segments_and_encoded_separators_match_nothing() {
        let t = RouteTable::from_toml(EXAMPLE).unwrap();
        for sneaky in [
            "/payments.v1.Refunds/../admin",
            "/payments.v1.Refunds/./x",
            "/payments.v1.Refunds/%2E%2e/admin",
            "/payments.v1.Refunds/a%2Fb",
            "/payments.v1.Refunds//x",
            "GET /v1/transactions/%2e%2e",
        ] {
            assert_eq!(scope_for(&t, sneaky), None, "{sneaky}");
        }
    }

    #[test]
    fn routes_name_the_credentials_they_accept() {
        let text = r#"
            [[route]]
            route = "POST /v1/payments"
            scope = "payment:create"
            credentials = ["api_key"]
            [[route]]
            route = "GET /v1/keys"
            scope = "key:read"
            credentials = ["jwt", "api_key"]
            [[route]]
            route = "GET /v1/profile"
            scope = "profile:read"
            credentials = ["jwt"]
            [[jwt_issuer]]
            issuer = "https://idp.example"
            audience = "keygate"
            jwks_url = "https://idp.example/certs"
        "#;
        let p = Policy::from_toml(text).unwrap();
        assert_eq!(p.jwt_issuers.len(), 1);
        let rule = |r| p.routes.rule(r).unwrap();
        assert!(rule("POST /v1/payments").accepts(CredentialKind::ApiKey));
        assert!(!rule("POST /v1/payments").accepts(CredentialKind::Jwt));
        assert!(rule("GET /v1/keys").accepts(CredentialKind::Jwt));
        assert!(!rule("GET /v1/profile").accepts(CredentialKind::ApiKey));
        assert!(RouteTable::from_toml(text).is_ok());
        for (bad, needle) in [
            ("credentials = []", "credentials: must name"),
            (
                "credentials = [\"jwt\", \"cookie\"]",
                "credentials: \"cookie\"",
            ),
        ] {
            let text = format!("[[route]]\nroute = \"GET /a\"\nscope = \"a:read\"\n{bad}");
            let msg = Policy::from_toml(&text).unwrap_err().to_string();
            assert!(msg.contains("route #1") && msg.contains(needle), "{msg}");
        }
        let twice = "[[jwt_issuer]]\nissuer = \"https://i\"\naudience = \"k\"\njwks_url = \"https://i/c\"\n";
        let msg = Policy::from_toml(&twice.repeat(2)).unwrap_err().to_string();
        assert!(
            msg.contains("jwt_issuer #2") && msg.contains("configured twice"),
            "{msg}"
        );
        let msg = Policy::from_toml(&twice.replace("https://i/c", "http://i/c"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("jwt_issuer #1 (\"https://i\"): jwks_url:"),
            "{msg}"
        );
    }

    #[test]
    fn errors_name_the_entry() {
        let cases = [
            (
                "[[route]]\nroute = \"GET /a\"\nscope = \"bad\"",
                "#1",
                "invalid scope",
            ),
            (
                "[[route]]\nroute = \"GET a\"\nscope = \"a:read\"",
                "#1",
                "must start with",
            ),
            (
                "[[route]]\nroute = \"GET /a/*/b\"\nscope = \"a:read\"",
                "#1",
                "'*'",
            ),
            (
                "[[route]]\nroute = \"get /a\"\nscope = \"a:read\"",
                "#1",
                "upper-case",
            ),
            (
                "[[route]]\nroute = \"GET /a/{id}\"\nscope = \"a:read\"\n[[route]]\nroute = \"GET /a/{name}\"\nscope = \"a:read\"",
                "#2",
                "GET /a/{name}",
            ),
            (
                "[[route]]\nroute = \"GET /a\"\nscope = \"a:read\"\nextra = 1",
                "",
                "unknown field",
            ),
        ];
        for (text, entry, needle) in cases {
            let msg = RouteTable::from_toml(text).unwrap_err().to_string();
            assert!(msg.contains(entry) && msg.contains(needle), "{msg}");
        }
    }
}
