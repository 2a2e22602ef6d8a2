//! envoy.service.auth.v3.Authorization: keygate as Envoy's ext_authz service.
//!
//! The decision is exactly Authorize's; this module only translates an HTTP
//! request as Envoy describes it into an Authorize call, and the outcome into
//! what Envoy should do with the request.

use std::sync::Arc;
use std::time::Instant;

use envoy_types::ext_authz::v3::pb::{CheckResponse, HeaderAppendAction, HttpStatusCode};
use envoy_types::ext_authz::v3::{CheckResponseExt, DeniedHttpResponseBuilder};
use keygate_core::decision::DenyReason;
use keygate_core::limits::LimitedBy;
use tonic::Status;

use super::authorizer::record_outcome;
use super::check_request::CheckView;
use super::check_wire::{CheckServer, Encoded, Writer};
use crate::error::Error;
use crate::service::authorize::Principal;
use crate::service::{AuthorizeInput, Authorizer, Outcome};
use crate::telemetry::AuthorizeMetrics;

// The identity headers keygate sets for the upstream on an allowed request.
// Every other `x-keygate-*` header a client sends is removed, and an identity
// header without a value (a SYSTEM key's organization) is removed rather
// than set empty, so the upstream can trust what it sees.

/// The key's organization id; absent for a SYSTEM key.
pub const ORGANIZATION_HEADER: &str = "x-keygate-organization-id";
/// The key's id, a UUID.
pub const KEY_ID_HEADER: &str = "x-keygate-key-id";
/// The key's scopes, comma-separated.
pub const SCOPES_HEADER: &str = "x-keygate-scopes";
/// The key's mode: `live` or `test`.
pub const MODE_HEADER: &str = "x-keygate-mode";
/// The key's tier: `organization` or `system`.
pub const TIER_HEADER: &str = "x-keygate-tier";
/// For a JWT access token, its `sub`; absent for a key.
pub const SUBJECT_HEADER: &str = "x-keygate-subject";
/// What authenticated: `api_key` or `jwt`.
pub const CREDENTIAL_HEADER: &str = "x-keygate-credential";
const IDENTITY_PREFIX: &str = "x-keygate-";

/// How Check reads credentials and what it hides from the upstream.
#[derive(Debug, Clone)]
pub struct ExtAuthzSettings {
    /// Request headers that may carry the key, lower-case, in order of
    /// preference: the first one present and non-empty is used. A
    /// `Bearer ` prefix is accepted in any of them.
    pub credential_headers: Vec<String>,
    /// Remove every credential header before the request goes upstream, so
    /// the upstream never sees a secret.
    pub strip_credentials: bool,
    /// Also hand Envoy the identity as dynamic metadata, for RBAC rules and
    /// access logs that read it there. Off by default, as in other ext_authz
    /// servers: the headers carry the same identity (`%REQ(x-keygate-key-id)%`
    /// in an access log), and merging a Struct into every request's metadata
    /// costs Envoy 7–8 % of its throughput (benchmark scenario 5).
    pub dynamic_metadata: bool,
}

impl Default for ExtAuthzSettings {
    fn default() -> Self {
        Self {
            credential_headers: keygate_core::token::DEFAULT_CREDENTIAL_HEADERS
                .map(String::from)
                .to_vec(),
            strip_credentials: true,
            dynamic_metadata: false,
        }
    }
}

/// Envoy's ext_authz Check over [`Authorizer`]. An allow forwards the
/// request with the identity headers ([`KEY_ID_HEADER`] and the rest; any
/// other `x-keygate-*` header the client sent is removed) and, when
/// configured, without its credential headers; a deny answers the client
/// with the reason's HTTP status and a JSON body; a request breaking an
/// Authorize bound is a 400 (414 for an over-long method and path). Only a
/// store failure is a gRPC error, left to Envoy's `failure_mode_allow`.
pub struct ExtAuthzApi {
    authorizer: Arc<Authorizer>,
    settings: ExtAuthzSettings,
    metrics: AuthorizeMetrics,
}

impl ExtAuthzApi {
    /// Requests are decided by `authorizer`; credential header names are
    /// compared in lower case, blank ones ignored.
    pub fn new(authorizer: Arc<Authorizer>, mut settings: ExtAuthzSettings) -> Self {
        // Envoy hands over header names in lower case.
        for name in &mut settings.credential_headers {
            *name = name.trim().to_ascii_lowercase();
        }
        settings.credential_headers.retain(|n| !n.is_empty());
        Self {
            authorizer,
            settings,
            metrics: AuthorizeMetrics::default(),
        }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> CheckServer {
        CheckServer::new(self)
    }

    fn credential<'a>(&self, check: &'a CheckView) -> &'a str {
        keygate_core::token::find_credential(&self.settings.credential_headers, |name| {
            check.header(name)
        })
        .unwrap_or("")
    }
}

impl ExtAuthzApi {
    /// Decides one Check; the answer comes encoded (see [`super::check_wire`]).
    pub(super) async fn check_encoded(&self, check: &CheckView) -> Result<Encoded, Status> {
        let started = Instant::now();
        if !check.has_http() {
            return Err(Status::invalid_argument(
                "attributes.request.http: Envoy sent no HTTP request",
            ));
        }
        let route = route(check.method(), check.path());
        let input = AuthorizeInput {
            token: self.credential(check),
            route: &route,
            ip: check.source_ip().unwrap_or(""),
            required_scopes: &[],
        };
        let outcome = match self.authorizer.authorize(input).await {
            Ok(outcome) => outcome,
            // The HTTP request itself is unusable (say, a path over the
            // route bound): the client's fault, so a 4xx for the client,
            // not an error that Envoy's failure mode would decide.
            Err(Error::InvalidArgument { field, reason }) => {
                return Ok(bad_request(field, &reason).into());
            }
            // A store failure is a gRPC error: Envoy's failure_mode_allow decides.
            Err(e) => return Err(e.into()),
        };
        record_outcome(&self.metrics, &outcome, started);
        Ok(match outcome.deny {
            None => allow(&self.settings, &outcome, check),
            Some(reason) => deny(reason, &outcome).into(),
        })
    }
}

/// CheckResponse { status: OK, ok_response: { headers, headers_to_remove,
/// response_headers_to_add }, dynamic_metadata }, written by hand.
fn allow(settings: &ExtAuthzSettings, outcome: &Outcome, check: &CheckView) -> Encoded {
    let identity = outcome
        .principal
        .as_ref()
        .map(Identity::of)
        .unwrap_or_default();
    let identity_headers = identity.headers();
    let mut w = Writer::with_capacity(1024);
    w.message(CHECK_STATUS, |_| {});
    w.message(CHECK_OK_RESPONSE, |ok| {
        for (name, value) in identity_headers {
            if value.is_empty() {
                // Removing rather than setting "" leaves no doubt upstream.
                // Removed whether or not the Check shows it: Envoy's
                // `allowed_headers` can keep a forged one from keygate's
                // sight, and the upstream must never see it.
                ok.string(OK_HEADERS_TO_REMOVE, name);
            } else {
                ok.message(OK_HEADERS, |option| overwrite(option, name, value));
            }
        }
        // Whatever else the client sent under keygate's prefix is a
        // forgery; its credential headers are stripped when configured.
        // Only headers the request has are named: each removal is work
        // for Envoy too.
        // Each named once: sorted and deduplicated rather than looked up
        // one by one, as a request (bounded only by its size) can carry
        // thousands of forged names.
        let mut removed: Vec<&[u8]> = check
            .header_names()
            .filter(|name| {
                let forged = name.starts_with(IDENTITY_PREFIX.as_bytes())
                    && !identity_headers.iter().any(|(n, _)| n.as_bytes() == *name);
                let credential = settings.strip_credentials
                    && settings
                        .credential_headers
                        .iter()
                        .any(|c| c.as_bytes().eq_ignore_ascii_case(name));
                forged || credential
            })
            .collect();
        removed.sort_unstable();
        removed.dedup();
        for name in removed {
            ok.bytes(OK_HEADERS_TO_REMOVE, name);
        }
        if let Some(rate) = &outcome.rate {
            let mut digits = [0u8; 20];
            for (name, value) in [
                ("x-ratelimit-limit", u64::from(rate.limit)),
                ("x-ratelimit-remaining", u64::from(rate.remaining)),
                ("x-ratelimit-reset", whole_seconds(rate.reset)),
            ] {
                let value = decimal(value, &mut digits);
                ok.message(OK_RESPONSE_HEADERS_TO_ADD, |option| {
                    overwrite(option, name, value)
                });
            }
        }
    });
    if settings.dynamic_metadata {
        w.message(CHECK_DYNAMIC_METADATA, |metadata| {
            identity.metadata(metadata)
        });
    }
    w.finish()
}

// Field numbers of envoy.service.auth.v3.CheckResponse and OkHttpResponse,
// envoy.config.core.v3.HeaderValueOption and HeaderValue, and
// google.protobuf.Struct, Value and ListValue.
const CHECK_STATUS: u32 = 1;
const CHECK_OK_RESPONSE: u32 = 3;
const CHECK_DYNAMIC_METADATA: u32 = 4;
const OK_HEADERS: u32 = 2;
const OK_HEADERS_TO_REMOVE: u32 = 5;
const OK_RESPONSE_HEADERS_TO_ADD: u32 = 6;
const OPTION_HEADER: u32 = 1;
const OPTION_APPEND_ACTION: u32 = 3;
const HEADER_KEY: u32 = 1;
const HEADER_VALUE: u32 = 2;
const STRUCT_FIELDS: u32 = 1;
const ENTRY_KEY: u32 = 1;
const ENTRY_VALUE: u32 = 2;
const VALUE_STRING: u32 = 3;
const VALUE_LIST: u32 = 6;
const LIST_VALUES: u32 = 1;

/// A HeaderValueOption setting `name` to `value`, replacing what is there.
fn overwrite(option: &mut Writer, name: &str, value: &str) {
    option.message(OPTION_HEADER, |header| {
        header.string(HEADER_KEY, name);
        header.string(HEADER_VALUE, value);
    });
    option.uint(
        OPTION_APPEND_ACTION,
        HeaderAppendAction::OverwriteIfExistsOrAdd as u64,
    );
}

/// `v` in decimal, written into `digits`.
fn decimal(mut v: u64, digits: &mut [u8; 20]) -> &str {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    std::str::from_utf8(&digits[at..]).expect("ASCII digits")
}

/// The caller's identity as the upstream and Envoy's access log see it,
/// each value made once and borrowed by the headers and the metadata.
#[derive(Debug, Default)]
struct Identity<'a> {
    organization_id: &'a str,
    key_id: String,
    scopes: Vec<&'a str>,
    /// `scopes`, comma-separated.
    scope_header: String,
    mode: &'static str,
    tier: &'static str,
    /// A JWT's `sub`; empty for a key.
    subject: &'a str,
    credential: &'static str,
}

impl<'a> Identity<'a> {
    fn of(principal: &'a Principal) -> Self {
        let (organization_id, scopes, mode, tier, key_id, subject, credential) = match principal {
            Principal::Key(key) => (
                key.organization_id.as_deref(),
                &key.scopes,
                key.mode.as_str(),
                key.tier,
                key.id.to_string(),
                "",
                "api_key",
            ),
            Principal::Jwt(jwt) => (
                jwt.identity.organization_id.as_deref(),
                &jwt.identity.scopes,
                "",
                jwt.identity.tier(),
                String::new(),
                jwt.identity.subject.as_str(),
                "jwt",
            ),
        };
        let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
        Self {
            organization_id: organization_id.unwrap_or_default(),
            key_id,
            scope_header: scopes.join(","),
            scopes,
            mode,
            tier: tier.as_str(),
            subject,
            credential,
        }
    }

    /// Header name and value, for every identity header (empty when unknown).
    fn headers(&self) -> [(&'static str, &str); 7] {
        [
            (ORGANIZATION_HEADER, self.organization_id),
            (KEY_ID_HEADER, &self.key_id),
            (SCOPES_HEADER, &self.scope_header),
            (MODE_HEADER, self.mode),
            (TIER_HEADER, self.tier),
            (SUBJECT_HEADER, self.subject),
            (CREDENTIAL_HEADER, self.credential),
        ]
    }

    /// Dynamic metadata under the ext_authz filter's namespace, for access
    /// logs (`%DYNAMIC_METADATA(envoy.filters.http.ext_authz:key_id)%`) and
    /// RBAC: a Struct's fields, written into `w`.
    fn metadata(&self, w: &mut Writer) {
        let string = |w: &mut Writer, key: &str, value: &str| {
            w.message(STRUCT_FIELDS, |entry| {
                entry.string(ENTRY_KEY, key);
                entry.message(ENTRY_VALUE, |v| v.string(VALUE_STRING, value));
            });
        };
        string(w, "organization_id", self.organization_id);
        string(w, "key_id", &self.key_id);
        w.message(STRUCT_FIELDS, |entry| {
            entry.string(ENTRY_KEY, "scopes");
            entry.message(ENTRY_VALUE, |v| {
                v.message(VALUE_LIST, |list| {
                    for scope in &self.scopes {
                        list.message(LIST_VALUES, |v| v.string(VALUE_STRING, scope));
                    }
                });
            });
        });
        string(w, "mode", self.mode);
        string(w, "tier", self.tier);
        string(w, "subject", self.subject);
        string(w, "credential", self.credential);
    }
}

/// What the client gets instead of the upstream's answer.
fn deny(reason: DenyReason, outcome: &Outcome) -> CheckResponse {
    let mut denied = DeniedHttpResponseBuilder::new();
    denied
        .set_http_status(match reason.http_status() {
            401 => HttpStatusCode::Unauthorized,
            429 => HttpStatusCode::TooManyRequests,
            _ => HttpStatusCode::Forbidden,
        })
        .set_body(error_body(
            reason,
            outcome.required_scope.as_deref(),
            outcome.limited_by,
        ));
    let mut header = |name: &str, value: String| {
        denied.add_header(
            name,
            value,
            Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
            false,
        );
    };
    header("content-type", "application/json".into());
    header("cache-control", "no-store".into());
    if reason.http_status() == 401 {
        header("www-authenticate", "Bearer".into());
    }
    if let Some(rate) = &outcome.rate {
        for (name, value) in rate_headers(rate.limit, rate.remaining, rate.reset) {
            header(name, value);
        }
        if let Some(retry) = rate.retry_after {
            header("retry-after", whole_seconds(retry).to_string());
        }
    }
    // Envoy answers the client with `denied`; the status is for other
    // ext_authz clients and Envoy's own stats.
    let status = Status::new(keygate_proto::convert::deny_code(reason), reason.code());
    let mut response = CheckResponse::with_status(status);
    response.set_http_response(denied);
    response
}

/// What the client gets when Envoy's description of its request breaks an
/// Authorize rule: 414 for an over-long route (method and path), 400
/// otherwise, with the seeds' body shape naming the field.
fn bad_request(field: &'static str, reason: &str) -> CheckResponse {
    let (status, code) = if field == "route" {
        (HttpStatusCode::UriTooLong, "URI_TOO_LONG")
    } else {
        (HttpStatusCode::BadRequest, "INVALID_REQUEST")
    };
    let body = serde_json::json!({
        "error": true,
        "code": code,
        "message": format!("{field}: {reason}"),
    });
    let mut denied = DeniedHttpResponseBuilder::new();
    denied.set_http_status(status).set_body(body.to_string());
    for (name, value) in [
        ("content-type", "application/json"),
        ("cache-control", "no-store"),
    ] {
        denied.add_header(
            name,
            value,
            Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
            false,
        );
    }
    let mut response = CheckResponse::with_status(Status::invalid_argument(code));
    response.set_http_response(denied);
    response
}

/// The seeds' error shape: `{"error": true, "code": …, "message": …}`, plus
/// the scope that was missing on INSUFFICIENT_SCOPE and whose limit refused
/// the request (`"limited_by": "KEY"` or `"ORGANIZATION"`) on RATE_LIMITED.
fn error_body(
    reason: DenyReason,
    required_scope: Option<&str>,
    limited_by: Option<LimitedBy>,
) -> String {
    let mut body = serde_json::json!({
        "error": true,
        "code": reason.code(),
        "message": reason.message(),
    });
    if let (DenyReason::InsufficientScope, Some(scope)) = (reason, required_scope) {
        body["required_scope"] = scope.into();
    }
    if let (DenyReason::RateLimited, Some(by)) = (reason, limited_by) {
        body["limited_by"] = by.code().into();
    }
    body.to_string()
}

fn rate_headers(
    limit: u32,
    remaining: u32,
    reset: std::time::Duration,
) -> [(&'static str, String); 3] {
    [
        ("x-ratelimit-limit", limit.to_string()),
        ("x-ratelimit-remaining", remaining.to_string()),
        ("x-ratelimit-reset", whole_seconds(reset).to_string()),
    ]
}

/// Rounded up, so a client that waits this long is not refused again.
fn whole_seconds(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// "METHOD /path", without the query string or fragment: what the route
/// policy is written against.
fn route(method: &str, path: &str) -> String {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    let mut route = String::with_capacity(method.len() + 1 + end);
    route.push_str(method);
    route.push(' ');
    route.push_str(&path[..end]);
    route
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::ext_authz::v3::pb::CheckRequest;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, HeaderValueOption};
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    use envoy_types::pb::google::protobuf::{ListValue, Value, value::Kind};
    use keygate_core::key::{KeyRecord, KeyState, Mode, Tier};
    use keygate_core::limits::RateDecision;
    use keygate_core::scope::ScopeSet;
    use keygate_core::token::SecretDigest;
    use prost::Message;

    #[test]
    fn routes_drop_the_query_and_fragment() {
        assert_eq!(route("GET", "/v1/a?b=c"), "GET /v1/a");
        assert_eq!(route("GET", "/v1/a#x"), "GET /v1/a");
        assert_eq!(
            route("POST", "/payments.v1.Refunds/Create"),
            "POST /payments.v1.Refunds/Create"
        );
    }

    #[test]
    fn error_bodies_have_the_seeds_shape() {
        let body: serde_json::Value =
            serde_json::from_str(&error_body(DenyReason::InvalidToken, None, None)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": true, "code": "INVALID_TOKEN",
                               "message": "Invalid or missing API key."})
        );
        let body: serde_json::Value = serde_json::from_str(&error_body(
            DenyReason::InsufficientScope,
            Some("checkout:create"),
            None,
        ))
        .unwrap();
        assert_eq!(body["required_scope"], "checkout:create");
        let body: serde_json::Value = serde_json::from_str(&error_body(
            DenyReason::RateLimited,
            None,
            Some(LimitedBy::Organization),
        ))
        .unwrap();
        assert_eq!(body["limited_by"], "ORGANIZATION");
    }

    /// One map from a deny reason to a status: Check answers with the code
    /// an admin call refusing its caller would, and the reason's HTTP status.
    #[test]
    fn every_deny_reason_answers_as_everywhere_else() {
        use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
        let outcome = Outcome {
            deny: None,
            principal: None,
            required_scope: None,
            rate: None,
            limited_by: None,
            organization_rate_limit: None,
        };
        for reason in DenyReason::ALL {
            let checked = deny(reason, &outcome);
            let admin: Status = crate::error::Error::Denied(reason).into();
            assert_eq!(
                checked.status.as_ref().map(|s| s.code),
                Some(admin.code() as i32),
                "{reason:?}"
            );
            let Some(HttpResponse::DeniedResponse(denied)) = checked.http_response else {
                panic!("{reason:?}: no denied response");
            };
            assert_eq!(
                denied.status.map(|s| s.code),
                Some(i32::from(reason.http_status())),
                "{reason:?}"
            );
        }
        assert_eq!(
            keygate_proto::convert::deny_code(DenyReason::RateLimited),
            tonic::Code::ResourceExhausted
        );
    }

    /// An allow for an organization key with a rate limit, and its id.
    fn allowed_key() -> (Outcome, String) {
        let key = KeyRecord {
            id: uuid::Uuid::new_v4(),
            name: "checkout".into(),
            organization_id: Some("acme".into()),
            tier: Tier::Organization,
            mode: Mode::Live,
            prefix: "kg_live_abc".into(),
            secret_digest: SecretDigest([7; 32]),
            previous_secret: None,
            scopes: ScopeSet::parse(&["checkout:create", "refund:read"]).unwrap(),
            allowed_cidrs: vec![],
            rate_limit_per_minute: 0,
            unlimited: false,
            state: KeyState::Active,
            created_at: chrono::Utc::now(),
            last_used_at: None,
            expires_at: None,
            rotated_at: None,
            created_by: "bootstrap".into(),
            version: 1,
        };
        let id = key.id.to_string();
        let outcome = Outcome {
            deny: None,
            principal: Some(Principal::Key(Arc::new(key))),
            required_scope: Some("checkout:create".into()),
            rate: Some(RateDecision {
                limit: 100,
                remaining: 99,
                reset: std::time::Duration::from_millis(59_500),
                retry_after: None,
            }),
            limited_by: Some(LimitedBy::Key),
            organization_rate_limit: None,
        };
        (outcome, id)
    }

    /// A Check with `headers` in the headers map and `raw` names (again) in
    /// header_map.
    fn check_of(headers: &[(&str, &str)], raw: &[&str]) -> CheckView {
        let http = HttpRequest {
            method: "POST".into(),
            path: "/v1/checkouts".into(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            header_map: Some(HeaderMap {
                headers: raw
                    .iter()
                    .map(|key| HeaderValue {
                        key: (*key).into(),
                        raw_value: b"x".to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            ..Default::default()
        };
        let check = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(http),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        CheckView::decode(check.encode_to_vec().into()).unwrap()
    }

    /// What Envoy reads from an allow answer: the identity headers set
    /// (replacing what the client sent), an empty one and every other
    /// `x-keygate-*` or credential header removed, the rate-limit headers
    /// for the client, and, when configured, the identity as metadata.
    #[test]
    fn an_allow_answer_decodes_to_what_envoy_applies() {
        let (outcome, id) = allowed_key();
        // The same names again as raw headers, twice: each is removed once.
        let check = check_of(
            &[
                ("authorization", "Bearer kg_live_x"),
                ("x-keygate-key-id", "forged"),
                ("x-keygate-subject", "forged"),
                ("x-keygate-evil", "1"),
                ("accept", "*/*"),
            ],
            &["x-keygate-evil", "authorization", "x-keygate-evil"],
        );
        let encoded = allow(&ExtAuthzSettings::default(), &outcome, &check);
        let response = CheckResponse::decode(&encoded.0[..]).unwrap();
        // Off by default.
        assert_eq!(response.dynamic_metadata, None);
        let settings = ExtAuthzSettings {
            dynamic_metadata: true,
            ..Default::default()
        };
        let encoded = allow(&settings, &outcome, &check);
        let response = CheckResponse::decode(&encoded.0[..]).unwrap();

        assert_eq!(response.status.map(|s| s.code), Some(0));
        let Some(HttpResponse::OkResponse(ok)) = response.http_response else {
            panic!("not an ok response: {:?}", response.http_response);
        };
        let set = |options: &[HeaderValueOption]| -> Vec<(String, String)> {
            options
                .iter()
                .map(|o| {
                    assert_eq!(
                        o.append_action,
                        HeaderAppendAction::OverwriteIfExistsOrAdd as i32
                    );
                    let h = o.header.as_ref().unwrap();
                    (h.key.clone(), h.value.clone())
                })
                .collect()
        };
        let owned = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(
            set(&ok.headers),
            owned(&[
                (ORGANIZATION_HEADER, "acme"),
                (KEY_ID_HEADER, &id),
                (SCOPES_HEADER, "checkout:create,refund:read"),
                (MODE_HEADER, "live"),
                (TIER_HEADER, "organization"),
                (CREDENTIAL_HEADER, "api_key"),
            ])
        );
        let mut removed = ok.headers_to_remove.clone();
        removed.sort();
        // The forged subject goes once, though the key has none to set.
        assert_eq!(removed, ["authorization", "x-keygate-evil", SUBJECT_HEADER]);
        assert_eq!(
            set(&ok.response_headers_to_add),
            owned(&[
                ("x-ratelimit-limit", "100"),
                ("x-ratelimit-remaining", "99"),
                ("x-ratelimit-reset", "60"),
            ])
        );

        let fields = response.dynamic_metadata.unwrap().fields;
        let string = |s: &str| Value {
            kind: Some(Kind::StringValue(s.to_owned())),
        };
        assert_eq!(fields.len(), 7);
        assert_eq!(fields["organization_id"], string("acme"));
        assert_eq!(fields["key_id"], string(&id));
        assert_eq!(
            fields["scopes"],
            Value {
                kind: Some(Kind::ListValue(ListValue {
                    values: vec![string("checkout:create"), string("refund:read")],
                })),
            }
        );
        assert_eq!(fields["mode"], string("live"));
        assert_eq!(fields["tier"], string("organization"));
        assert_eq!(fields["subject"], string(""));
        assert_eq!(fields["credential"], string("api_key"));
    }

    /// An identity header keygate has no value for is removed even when the
    /// Check does not show it (Envoy's `allowed_headers` can hide a forged
    /// one); other headers are named only when the request has them.
    #[test]
    fn an_empty_identity_header_is_removed_unseen() {
        let (outcome, _) = allowed_key();
        let check = check_of(&[("x-api-key", "kg_live_x"), ("accept", "*/*")], &[]);
        let encoded = allow(&ExtAuthzSettings::default(), &outcome, &check);
        let response = CheckResponse::decode(&encoded.0[..]).unwrap();
        let Some(HttpResponse::OkResponse(ok)) = response.http_response else {
            panic!("not an ok response: {:?}", response.http_response);
        };
        let mut removed = ok.headers_to_remove.clone();
        removed.sort();
        assert_eq!(removed, ["x-api-key", SUBJECT_HEADER]);
        assert_eq!(ok.headers.len(), 6);
    }

    #[test]
    fn decimals_are_written_in_full() {
        let mut digits = [0; 20];
        assert_eq!(decimal(0, &mut digits), "0");
        assert_eq!(decimal(60, &mut digits), "60");
        assert_eq!(decimal(u64::MAX, &mut digits), u64::MAX.to_string());
    }

    #[test]
    fn waits_round_up_to_whole_seconds() {
        use std::time::Duration;
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(2)), 2);
        assert_eq!(whole_seconds(Duration::from_millis(2001)), 3);
    }
}
