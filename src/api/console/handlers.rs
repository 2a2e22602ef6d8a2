//! The console's routes: each checks the session (and, for a POST, origin
//! and CSRF token), validates through `api::validate`, calls the service
//! layer as the signed-in key, and renders a page or redirects.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::Form as FormBody;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use keygate_core::analytics::UsageRange;
use keygate_core::decision;
use keygate_core::scope::Scope;
use keygate_core::token::ParsedToken;
use keygate_proto::v1 as pb;
use uuid::Uuid;

use super::forms::{self, Form, field};
use super::pages::{self, AuditFilters, ChartRange, KeyFilters, KeyView};
use super::{SignedIn, State as Shared, error_response, refused};
use crate::api::{convert, validate};
use crate::error::Error;
use crate::service::ListSpec;
use crate::service::analytics::{UsageSpec, UsageTarget};
use crate::service::audit::EventListSpec;

type Peer = ConnectInfo<SocketAddr>;

/// The message for every refused sign-in, whatever the reason: a wrong
/// secret and an unknown key must look alike.
const SIGN_IN_REFUSED: &str = "Invalid or missing API key.";

macro_rules! signed_in {
    ($console:expr, $headers:expr, $peer:expr) => {
        match $console.signed_in(&$headers, $peer.0).await {
            Ok(s) => s,
            Err(response) => return response,
        }
    };
}

macro_rules! post {
    ($console:expr, $headers:expr, $peer:expr, $form:expr) => {{
        let signed = signed_in!($console, $headers, $peer);
        if let Err(response) =
            $console.check_post(&$headers, &signed, $form.get("csrf").map(String::as_str))
        {
            return response;
        }
        signed
    }};
}

macro_rules! or_error {
    ($signed:expr, $result:expr) => {
        match $result {
            Ok(v) => v,
            Err(e) => return error_response(Some(&$signed), Error::from(e)),
        }
    };
}

fn see_other(to: String) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
}

pub async fn sign_in_page(Query(q): Query<HashMap<String, String>>) -> Response {
    let message = q
        .contains_key("ended")
        .then_some("Your session has ended. Sign in again.");
    pages::sign_in(message).into_response()
}

pub async fn sign_in(
    State(console): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
    FormBody(form): FormBody<Form>,
) -> Response {
    if !console.same_origin(&headers) {
        return refused("this request came from another site");
    }
    if !console.sessions.may_try_sign_in(peer.0.ip()) {
        let page = pages::sign_in(Some(
            "Too many sign-in attempts from your address. Wait a minute and try again.",
        ));
        return (StatusCode::TOO_MANY_REQUESTS, page).into_response();
    }
    let token = field(&form, "token");
    let refused_page = || {
        (
            StatusCode::UNAUTHORIZED,
            pages::sign_in(Some(SIGN_IN_REFUSED)),
        )
            .into_response()
    };
    let key = match console.authorizer.authenticate(token).await {
        Ok(Ok(key)) if decision::ip_allowed(&key, Some(peer.0.ip())) => key,
        Ok(_) => return refused_page(),
        Err(e) => return error_response(None, e),
    };
    let Ok(parsed) = ParsedToken::parse(token) else {
        return refused_page();
    };
    let read = Scope::parse("api_key:read").expect("built-in scope parses");
    if !key.scopes.grants(&read) {
        let page = pages::sign_in(Some(
            "This key cannot read keys: the console needs a key with api_key:read.",
        ));
        return (StatusCode::FORBIDDEN, page).into_response();
    }
    let id = match console.sessions.open(parsed.credential()) {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(error = %e, "console sign-in refused");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                pages::sign_in(Some(
                    "The console cannot open a session now; try again later.",
                )),
            )
                .into_response();
        }
    };
    tracing::info!(key_id = %key.id, peer = %peer.0.ip(), "console sign-in");
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, console.session_cookie(&id)),
            (header::LOCATION, "/keys".to_owned()),
        ],
    )
        .into_response()
}

pub async fn sign_out(
    State(console): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
    FormBody(form): FormBody<Form>,
) -> Response {
    let signed = post!(console, headers, peer, form);
    console.sessions.end(&signed.id);
    (
        [(header::SET_COOKIE, console.cleared_cookie())],
        Redirect::to("/sign-in"),
    )
        .into_response()
}

fn now_api_key(console: &super::Console, key: &keygate_core::key::KeyRecord) -> pb::ApiKey {
    convert::api_key(key, console.keys.now())
}

async fn render_keys(
    console: &super::Console,
    signed: &SignedIn,
    filters: &KeyFilters,
    message: Option<&str>,
) -> Response {
    let mode = match filters.mode.as_str() {
        "live" => Some(keygate_core::key::Mode::Live),
        "test" => Some(keygate_core::key::Mode::Test),
        _ => None,
    };
    let spec = ListSpec {
        organization_id: Some(filters.organization_id.trim().to_owned()).filter(|o| !o.is_empty()),
        include_revoked: matches!(filters.status.as_str(), "" | "revoked"),
        mode,
        page_size: 100,
        page_token: Some(filters.page.clone()).filter(|p| !p.is_empty()),
    };
    let (keys, next) = or_error!(signed, console.keys.list(&signed.caller, spec).await);
    let keys: Vec<pb::ApiKey> = keys
        .iter()
        .map(|k| now_api_key(console, k))
        .filter(|k| filters.status.is_empty() || pages::status(k) == filters.status)
        .collect();
    pages::keys(signed, filters, &keys, next.as_deref(), message).into_response()
}

pub async fn keys_page(
    State(console): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
    Query(filters): Query<KeyFilters>,
) -> Response {
    let signed = signed_in!(console, headers, peer);
    render_keys(&console, &signed, &filters, None).await
}

/// Finds a key by a pasted token (parsed here, never echoed or logged), a
/// key id, or a prefix or name among the keys the caller may see.
pub async fn search(
    State(console): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
    FormBody(form): FormBody<Form>,
) -> Response {
    let signed = post!(console, headers, peer, form);
    let q = field(&form, "q");
    let none = "No key you can see matches that search.";
    let id = ParsedToken::parse(q)
        .map(|t| t.key_id)
        .ok()
        .or_else(|| keygate_core::token::key_id_of_prefix(q))
        .or_else(|| Uuid::parse_str(q).ok());
    if let Some(id) = id {
        return match console.keys.get(&signed.caller, id).await {
            Ok(key) => see_other(format!("/keys/{}", key.id)),
            Err(Error::NotFound(_)) => {
                render_keys(&console, &signed, &KeyFilters::default(), Some(none)).await
            }
            Err(e) => error_response(Some(&signed), e),
        };
    }
    if q.is_empty() {
        return see_other("/keys".into());
    }
    let spec = ListSpec {
        include_revoked: true,
        page_size: 1000,
        ..ListSpec::default()
    };
    let (keys, _) = or_error!(signed, console.keys.list(&signed.caller, spec).await);
    let needle = q.to_lowercase();
    let found: Vec<pb::ApiKey> = keys
        .iter()
        .filter(|k| k.prefix.starts_with(q) || k.name.to_lowercase().contains(&needle))
        .map(|k| now_api_key(&console, k))
        .collect();
    match found.as_slice() {
        [one] => see_other(format!("/keys/{}", one.key_id)),
        [] => render_keys(&console, &signed, &KeyFilters::default(), Some(none)).await,
        many => {
            let message = format!("{} keys match.", many.len());
            pages::keys(&signed, &KeyFilters::default(), many, None, Some(&message)).into_response()
        }
    }
}

pub async fn new_key_page(
    State(console): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
) -> Response {
    let signed = signed_in!(console, headers, peer);
    pages::new_key(&signed, None).into_response()
}

pub async fn create_key(
    State(console): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
    FormBody(form): FormBody<Form>,
) -> Response {
    let signed = post!(console, headers, peer, form);
    let created = async {
        let spec = validate::new_key(forms::create(&form)?)?;
        console.keys.create(&signed.caller, spec).await
    }
    .await;
    match created {
        Ok((key, token)) => {
            console.sessions.keep_once(&signed.id, key.id, token);
            see_other(format!("/keys/{}/token", key.id))
        }
        Err(e) => {
            let status = tonic::Status::from(e);
            (
                StatusCode::BAD_REQUEST,
                pages::new_key(&signed, Some(status.message())),
            )
                .into_response()
        }
    }
}

fn key_id(signed: &SignedIn, id: &str) -> Result<Uuid, Response> {
    validate::key_id("key_id", id).map_err(|e| error_response(Some(signed), e))
}

/// The token of a key just created or rotated in this session, once; a
/// reload shows that it is gone.
pub async fn token_page(
    State(console): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let signed = signed_in!(console, headers, peer);
    let id = match key_id(&signed, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let key = or_error!(signed, console.keys.get(&signed.caller, id).await);
    let token = console.sessions.take_once(&signed.id, id);
    pages::token(&signed, &now_api_key(&console, &key), token.as_deref()).into_response()
}

fn done_message(done: &str) -> Option<&'static str> {
    Some(match done {
        "revoke" => "Key revoked.",
        "disable" => "Key disabled.",
        "enable" => "Key enabled.",
        "update" => "Settings saved.",
        "expire-previous" => "The previous secret no longer works.",
        _ => return None,
    })
}

pub async fn key_page(
    State(console): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let signed = signed_in!(console, headers, peer);
    let id = match key_id(&signed, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let key = or_error!(signed, console.keys.get(&signed.caller, id).await);
    let chart = ChartRange::parse(q.get("range").map_or("", String::as_str));
    let now = console.keys.now();
    // Through the end of the bucket `now` falls in, so the chart always ends
    // with the current bucket, even at its first instant (a range's end is
    // exclusive).
    let granularity = chart.granularity();
    let end = granularity.bucket_start(now) + granularity.width();
    let range = or_error!(
        signed,
        UsageRange::new(end - chart.span(), end, granularity)
            .map_err(|e| Error::invalid(e.field, e.reason))
    );
    let spec = UsageSpec {
        target: UsageTarget::Key(id),
        range,
    };
    let buckets = or_error!(signed, console.keys.usage(&signed.caller, spec).await);
    let events = EventListSpec {
        key_id: Some(id),
        page_size: 20,
        ..EventListSpec::default()
    };
    let (events, _) = or_error!(
        signed,
        console.keys.list_events(&signed.caller, events).await
    );
    let events: Vec<pb::KeyEvent> = events.iter().map(convert::key_event).collect();
    let api_key = now_api_key(&console, &key);
    let view = KeyView {
        key: &api_key,
        chart,
        range,
        buckets: &buckets,
        events: &events,
        message: q.get("done").and_then(|d| done_message(d)),
    };
    pages::key(&signed, view).into_response()
}

/// Rotate, expire-previous, revoke, disable, enable, delete, update.
pub async fn key_action(
    State(console): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    FormBody(form): FormBody<Form>,
) -> Response {
    let signed = post!(console, headers, peer, form);
    let id = match key_id(&signed, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let caller = &signed.caller;
    let keys = &console.keys;
    let done: Result<(), Error> = async {
        match action.as_str() {
            "rotate" => {
                let grace = validate::grace_period(Some(&forms::grace(&form)?))?;
                let (key, token, _) = keys.rotate(caller, id, grace, None).await?;
                console.sessions.keep_once(&signed.id, key.id, token);
            }
            "expire-previous" => {
                keys.expire_previous_secret(caller, id).await?;
            }
            "revoke" => {
                let reason = validate::revoke_reason(field(&form, "reason"))?;
                if reason.is_empty() {
                    return Err(Error::invalid(
                        "reason",
                        "is required to revoke from the console",
                    ));
                }
                if !forms::confirmed(&form) {
                    return Err(Error::invalid(
                        "confirm",
                        "tick the box to confirm: revoking is final",
                    ));
                }
                keys.revoke(caller, id, reason, None).await?;
            }
            "disable" => {
                keys.disable(caller, id, None).await?;
            }
            "enable" => {
                keys.enable(caller, id).await?;
            }
            "delete" => {
                if !forms::confirmed(&form) {
                    return Err(Error::invalid(
                        "confirm",
                        "tick the box to confirm the deletion",
                    ));
                }
                keys.delete(caller, id, None).await?;
            }
            "update" => {
                let changes = validate::key_changes(forms::update(id.to_string(), &form)?)?;
                keys.update(caller, id, changes).await?;
            }
            _ => return Err(Error::NotFound("action")),
        }
        Ok(())
    }
    .await;
    if let Err(e) = done {
        return error_response(Some(&signed), e);
    }
    match action.as_str() {
        "rotate" => see_other(format!("/keys/{id}/token")),
        "delete" => see_other("/keys".into()),
        _ => see_other(format!("/keys/{id}?done={action}")),
    }
}

pub async fn audit_page(
    State(console): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
    Query(filters): Query<AuditFilters>,
) -> Response {
    let signed = signed_in!(console, headers, peer);
    let key_id = if filters.key_id.trim().is_empty() {
        None
    } else {
        match key_id(&signed, filters.key_id.trim()) {
            Ok(id) => Some(id),
            Err(r) => return r,
        }
    };
    let spec = EventListSpec {
        organization_id: Some(filters.organization_id.trim().to_owned()).filter(|o| !o.is_empty()),
        key_id,
        page_size: 100,
        page_token: Some(filters.page.clone()).filter(|p| !p.is_empty()),
    };
    let (events, next) = or_error!(signed, console.keys.list_events(&signed.caller, spec).await);
    let events: Vec<pb::KeyEvent> = events
        .iter()
        .map(convert::key_event)
        .filter(|e| {
            filters.kind.is_empty() || e.kind().as_str_name().to_lowercase() == filters.kind
        })
        .collect();
    pages::audit(&signed, &filters, &events, next.as_deref()).into_response()
}

pub async fn replicas_page(
    State(console): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
) -> Response {
    let signed = signed_in!(console, headers, peer);
    let (replicas, head) = or_error!(signed, console.replicas.list().await);
    pages::replicas(&signed, &replicas, head).into_response()
}

pub async fn limits_page(
    State(console): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let signed = signed_in!(console, headers, peer);
    let org = q.get("organization_id").map_or("", |o| o.trim());
    let message = q.contains_key("done").then_some("Limit set.");
    if org.is_empty() {
        return pages::limits(&signed, "", None, message).into_response();
    }
    let limit = or_error!(signed, console.organizations.get(&signed.caller, org).await);
    let shown = convert::organization_limits(org, limit.as_ref());
    pages::limits(&signed, org, Some(&shown), message).into_response()
}

pub async fn set_limits(
    State(console): State<Shared>,
    peer: Peer,
    headers: HeaderMap,
    FormBody(form): FormBody<Form>,
) -> Response {
    let signed = post!(console, headers, peer, form);
    let set = async {
        let per_minute = field(&form, "rate_limit")
            .parse::<u32>()
            .map_err(|_| Error::invalid("rate_limit_per_minute", "must be a whole number"))?;
        let (org, per_minute) = validate::organization_limit(&pb::SetOrganizationLimitsRequest {
            organization_id: field(&form, "organization_id").to_owned(),
            rate_limit_per_minute: per_minute,
        })?;
        console
            .organizations
            .set(&signed.caller, org, per_minute)
            .await
    }
    .await;
    match set {
        Ok(limit) => see_other(format!(
            "/limits?organization_id={}&done=1",
            limit.organization_id
        )),
        Err(e) => error_response(Some(&signed), e),
    }
}

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

pub async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        CSS,
    )
        .into_response()
}

pub async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        JS,
    )
        .into_response()
}
