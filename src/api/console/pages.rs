//! The console's HTML, as maud templates: every value is escaped by maud,
//! so a key named `<script>` shows as text. No inline script or style.

use chrono::{DateTime, Utc};
use keygate_core::analytics::{UsageBucket, UsageRange};
use keygate_core::decision::DenyReason;
use keygate_proto::v1 as pb;
use maud::{DOCTYPE, Markup, html};

use super::SignedIn;
use super::chart::usage_chart;

/// An HTML page, ready to send.
pub struct Page(pub Markup);

impl axum::response::IntoResponse for Page {
    fn into_response(self) -> axum::response::Response {
        axum::response::Html(self.0.into_string()).into_response()
    }
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · keygate" }
            link rel="stylesheet" href="/assets/console.css";
            script src="/assets/console.js" defer {}
        }
    }
}

/// A page without the signed-in navigation (sign-in, refusals).
pub fn bare(title: &str, message: &str) -> Page {
    Page(html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                main class="narrow" {
                    h1 { (title) }
                    p class="message" { (message) }
                    p { a href="/keys" { "Back to the console" } }
                }
            }
        }
    })
}

/// The signed-in layout around `content`.
pub fn layout(s: &SignedIn, title: &str, content: Markup) -> Page {
    let me = s.caller.key();
    Page(html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header {
                    a class="brand" href="/keys" { "keygate" }
                    nav {
                        a href="/keys" { "Keys" }
                        a href="/keys/new" { "New key" }
                        a href="/audit" { "Audit log" }
                        a href="/replicas" { "Replicas" }
                        @if s.caller.is_system() { a href="/limits" { "Organization limits" } }
                    }
                    div class="me" {
                        span id="signed-in-as" { (me.name) " · " (me.prefix) }
                        @if let Some(org) = &me.organization_id { " · " (org) }
                        form method="post" action="/sign-out" class="inline" {
                            (csrf(s))
                            button type="submit" id="sign-out" { "Sign out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (content)
                }
            }
        }
    })
}

/// An error inside the layout.
pub fn error(s: &SignedIn, title: &str, message: &str) -> Page {
    layout(
        s,
        title,
        html! { p class="message error" id="error" { (message) } },
    )
}

/// The hidden CSRF field every form carries.
pub fn csrf(s: &SignedIn) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

/// `2026-12-01 14:36:29 UTC`, or `never`.
pub fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, 0))
        .map_or_else(
            || "never".into(),
            |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        )
}

/// `active`, `revoked`, …
pub fn status(k: &pb::ApiKey) -> String {
    k.status().as_str_name().to_lowercase()
}

fn mode(k: &pb::ApiKey) -> String {
    k.mode().as_str_name().to_lowercase()
}

fn rate_limit(k: &pb::ApiKey) -> String {
    match (k.unlimited, k.rate_limit_per_minute) {
        (true, _) => "unlimited".into(),
        (false, 0) => "server default".into(),
        (false, n) => format!("{n} per minute"),
    }
}

pub fn sign_in(message: Option<&str>) -> Page {
    Page(html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in"))
            body {
                main class="narrow" {
                    h1 { "Sign in to keygate" }
                    @if let Some(m) = message { p class="message error" id="error" { (m) } }
                    form method="post" action="/sign-in" autocomplete="off" {
                        label for="token" { "Admin API key" }
                        input type="password" id="token" name="token" required autocomplete="off" spellcheck="false";
                        p class="hint" { "Paste a key with api_key:read. It is checked and kept only on the server: the browser holds a session id, never the key." }
                        button type="submit" id="sign-in" { "Sign in" }
                    }
                }
            }
        }
    })
}

/// The filters the keys page was asked for.
#[derive(Debug, Default, serde::Deserialize)]
pub struct KeyFilters {
    #[serde(default)]
    pub organization_id: String,
    #[serde(default)]
    pub mode: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub page: String,
}

pub fn keys(
    s: &SignedIn,
    filters: &KeyFilters,
    keys: &[pb::ApiKey],
    next: Option<&str>,
    message: Option<&str>,
) -> Page {
    let option = |value: &str, label: &str, current: &str| {
        html! { option value=(value) selected[value == current] { (label) } }
    };
    layout(
        s,
        "API keys",
        html! {
            @if let Some(m) = message { p class="message" id="message" { (m) } }
            div class="toolbar" {
                form method="get" action="/keys" class="filters" {
                    @if s.caller.is_system() {
                        input type="text" name="organization_id" placeholder="organization" value=(filters.organization_id);
                    }
                    select name="mode" {
                        (option("", "any mode", &filters.mode))
                        (option("live", "live", &filters.mode))
                        (option("test", "test", &filters.mode))
                    }
                    select name="status" {
                        (option("", "any status", &filters.status))
                        (option("active", "active", &filters.status))
                        (option("disabled", "disabled", &filters.status))
                        (option("revoked", "revoked", &filters.status))
                        (option("expired", "expired", &filters.status))
                    }
                    button type="submit" { "Filter" }
                }
                form method="post" action="/keys/search" class="search" autocomplete="off" {
                    (csrf(s))
                    input type="password" name="q" id="search" placeholder="prefix, key id, name or a whole leaked token" autocomplete="off" spellcheck="false";
                    button type="submit" id="search-button" { "Find key" }
                }
            }
            (key_table(keys))
            @if let Some(next) = next {
                p { a id="next-page" href={ "/keys?organization_id=" (filters.organization_id) "&mode=" (filters.mode) "&status=" (filters.status) "&page=" (next) } { "Next page" } }
            }
        },
    )
}

pub fn key_table(keys: &[pb::ApiKey]) -> Markup {
    html! {
        table id="keys" {
            thead { tr { th { "Name" } th { "Prefix" } th { "Mode" } th { "Scopes" } th { "Last used" } th { "Created" } th { "Status" } } }
            tbody {
                @for k in keys {
                    tr data-key-id=(k.key_id) {
                        td { a href={ "/keys/" (k.key_id) } { (k.name) } }
                        td { code { (k.prefix) } }
                        td { (mode(k)) }
                        td { (k.scopes.join(" ")) }
                        td { (time(k.last_used_at.as_ref())) }
                        td { (time(k.created_at.as_ref())) }
                        td class={ "status " (status(k)) } { (status(k)) }
                    }
                }
                @if keys.is_empty() { tr { td colspan="7" { "No keys." } } }
            }
        }
    }
}

pub fn new_key(s: &SignedIn, message: Option<&str>) -> Page {
    layout(
        s,
        "New API key",
        html! {
            @if let Some(m) = message { p class="message error" id="error" { (m) } }
            form method="post" action="/keys" class="stacked" {
                (csrf(s))
                label { "Name" input type="text" name="name" required maxlength="200"; }
                @if s.caller.is_system() {
                    label { "Organization (empty with SYSTEM)" input type="text" name="organization_id"; }
                    label class="check" { input type="checkbox" name="system" value="1"; " SYSTEM key (acts on every organization)" }
                }
                label { "Mode" select name="mode" { option value="test" { "test" } option value="live" { "live" } } }
                label { "Scopes (space-separated, e.g. checkout:create)" input type="text" name="scopes" required; }
                label { "Allowed addresses (CIDRs, space-separated; empty: any)" input type="text" name="allowed_cidrs"; }
                label { "Rate limit per minute (0: the server default)" input type="number" name="rate_limit" value="0" min="0"; }
                label { "Expires at (UTC, e.g. 2027-01-31T00:00; empty: never)" input type="text" name="expires_at"; }
                button type="submit" id="create" { "Create key" }
            }
        },
    )
}

/// The page that shows a new token, once.
pub fn token(s: &SignedIn, key: &pb::ApiKey, token: Option<&str>) -> Page {
    layout(
        s,
        "Your new token",
        html! {
            @match token {
                Some(t) => {
                    p class="warning" { "This is the only time the token is shown. Copy it now into a secret manager: it cannot be shown again." }
                    div class="token" {
                        input type="text" id="token" readonly value=(t) spellcheck="false";
                        button type="button" id="copy" data-copy="token" { "Copy" }
                    }
                }
                None => {
                    p class="message" id="token-gone" { "The token was shown once and cannot be shown again. Rotate the key for a new one." }
                }
            }
            p { a id="to-key" href={ "/keys/" (key.key_id) } { "Go to " (key.name) } }
        },
    )
}

/// How far back the key page's chart looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChartRange {
    Hour,
    Day,
    Week,
    Quarter,
}

impl ChartRange {
    pub const ALL: [ChartRange; 4] = [Self::Hour, Self::Day, Self::Week, Self::Quarter];

    pub fn parse(s: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .unwrap_or(Self::Day)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hour => "1h",
            Self::Day => "24h",
            Self::Week => "7d",
            Self::Quarter => "90d",
        }
    }

    pub fn span(self) -> chrono::Duration {
        match self {
            Self::Hour => chrono::Duration::hours(1),
            Self::Day => chrono::Duration::hours(24),
            Self::Week => chrono::Duration::days(7),
            Self::Quarter => chrono::Duration::days(90),
        }
    }

    pub fn granularity(self) -> keygate_core::analytics::Granularity {
        match self {
            Self::Hour => keygate_core::analytics::Granularity::Minute,
            _ => keygate_core::analytics::Granularity::Hour,
        }
    }
}

/// Everything the key page shows.
pub struct KeyView<'a> {
    pub key: &'a pb::ApiKey,
    pub chart: ChartRange,
    pub range: UsageRange,
    pub buckets: &'a [UsageBucket],
    pub events: &'a [pb::KeyEvent],
    pub message: Option<&'a str>,
}

fn totals(buckets: &[UsageBucket]) -> String {
    let allowed: u64 = buckets.iter().map(UsageBucket::allowed).sum();
    let mut denied = vec![0u64; DenyReason::ALL.len()];
    for b in buckets {
        for (i, n) in b.counts[1..].iter().enumerate() {
            denied[i] += n;
        }
    }
    let total_denied: u64 = denied.iter().sum();
    let reasons: Vec<String> = DenyReason::ALL
        .iter()
        .zip(&denied)
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| format!("{} {n}", r.code()))
        .collect();
    if reasons.is_empty() {
        format!("{allowed} allowed, {total_denied} denied")
    } else {
        format!(
            "{allowed} allowed, {total_denied} denied ({})",
            reasons.join(", ")
        )
    }
}

pub fn key(s: &SignedIn, v: KeyView<'_>) -> Page {
    let k = v.key;
    let row = |label: &str, id: &str, value: Markup| html! { tr { th { (label) } td id=(id) { (value) } } };
    let rotating = k.previous_secret_expires_at.is_some();
    let status_text = match (k.status(), k.revoked_at.as_ref()) {
        (pb::KeyStatus::Revoked, Some(at)) => format!("revoked {}", time(Some(at))),
        _ => status(k),
    };
    layout(
        s,
        &k.name,
        html! {
            @if let Some(m) = v.message { p class="message" id="message" { (m) } }
            table class="fields" {
                (row("Key id", "key-id", html! { code { (k.key_id) } }))
                (row("Name", "name", html! { (k.name) }))
                (row("Organization", "organization", html! { @if k.organization_id.is_empty() { "— (SYSTEM)" } @else { (k.organization_id) } }))
                (row("Tier", "tier", html! { (k.tier().as_str_name().to_lowercase()) }))
                (row("Mode", "mode", html! { (mode(k)) }))
                (row("Prefix", "prefix", html! { code { (k.prefix) } }))
                (row("Masked key", "masked", html! { code { (k.masked_key) } }))
                (row("Scopes", "scopes", html! { (k.scopes.join(" ")) }))
                (row("Allowed addresses", "cidrs", html! { @if k.allowed_cidrs.is_empty() { "any" } @else { (k.allowed_cidrs.join(" ")) } }))
                (row("Rate limit", "rate-limit", html! { (rate_limit(k)) }))
                (row("Status", "status", html! { span class={ "status " (status(k)) } { (status_text) } }))
                @if !k.revoked_reason.is_empty() { (row("Revoked because", "revoked-reason", html! { (k.revoked_reason) })) }
                (row("Created", "created", html! { (time(k.created_at.as_ref())) " by " (k.created_by) }))
                (row("Last used", "last-used", html! { (time(k.last_used_at.as_ref())) }))
                (row("Expires", "expires", html! { (time(k.expires_at.as_ref())) }))
                (row("Rotated", "rotated", html! { (time(k.rotated_at.as_ref())) }))
                @if rotating {
                    (row("Previous secret works until", "previous-expires", html! { (time(k.previous_secret_expires_at.as_ref())) }))
                    (row("Previous secret last used", "previous-last-used", html! { (time(k.previous_secret_last_used_at.as_ref())) }))
                    (row("Previous secret uses", "previous-uses", html! { (k.previous_secret_uses) }))
                }
            }

            h2 { "Usage" }
            p class="ranges" {
                @for r in ChartRange::ALL {
                    @if r == v.chart { strong { (r.as_str()) } } @else { a href={ "/keys/" (k.key_id) "?range=" (r.as_str()) } { (r.as_str()) } }
                    " "
                }
            }
            p id="usage-totals" { (totals(v.buckets)) }
            (usage_chart(&v.range, v.buckets))
            p class="hint" { "Counts arrive with each replica's usage flush. Green: allowed; red: denied." }

            h2 { "Actions" }
            div class="actions" {
                form method="post" action={ "/keys/" (k.key_id) "/rotate" } {
                    (csrf(s))
                    label { "Grace period for the old secret " select name="grace" {
                        option value="0s" { "none" } option value="1h" selected { "1 hour" } option value="24h" { "24 hours" } option value="168h" { "7 days" }
                    } }
                    button type="submit" id="rotate" { "Rotate" }
                }
                @if rotating {
                    form method="post" action={ "/keys/" (k.key_id) "/expire-previous" } {
                        (csrf(s))
                        button type="submit" id="expire-previous" { "Expire previous secret now" }
                    }
                }
                form method="post" action={ "/keys/" (k.key_id) "/revoke" } class="danger" {
                    (csrf(s))
                    label { "Reason " input type="text" name="reason" id="revoke-reason" required maxlength="500"; }
                    label class="check" { input type="checkbox" name="confirm" value="yes" id="revoke-confirm" required; " Revoking is final" }
                    button type="submit" id="revoke" { "Revoke" }
                }
                @if k.status() == pb::KeyStatus::Disabled {
                    form method="post" action={ "/keys/" (k.key_id) "/enable" } { (csrf(s)) button type="submit" id="enable" { "Enable" } }
                } @else if k.status() != pb::KeyStatus::Revoked {
                    form method="post" action={ "/keys/" (k.key_id) "/disable" } { (csrf(s)) button type="submit" id="disable" { "Disable" } }
                }
                form method="post" action={ "/keys/" (k.key_id) "/delete" } class="danger" {
                    (csrf(s))
                    label class="check" { input type="checkbox" name="confirm" value="yes" id="delete-confirm" required; " Delete for good (its events stay)" }
                    button type="submit" id="delete" { "Delete" }
                }
            }
            details {
                summary { "Update settings" }
                form method="post" action={ "/keys/" (k.key_id) "/update" } class="stacked" {
                    (csrf(s))
                    label { "Name" input type="text" name="name" value=(k.name) required maxlength="200"; }
                    label { "Scopes" input type="text" name="scopes" value=(k.scopes.join(" ")); }
                    label { "Allowed addresses" input type="text" name="allowed_cidrs" value=(k.allowed_cidrs.join(" ")); }
                    label { "Rate limit per minute" input type="number" name="rate_limit" min="0" value=(k.rate_limit_per_minute); }
                    label { "Expires at (UTC; empty: never)" input type="text" name="expires_at"
                        value=(k.expires_at.as_ref().and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, 0)).map(|t| t.format("%Y-%m-%dT%H:%M:%S").to_string()).unwrap_or_default()); }
                    button type="submit" id="update" { "Save" }
                }
            }

            h2 { "Audit events" }
            (events_table(v.events))
            p { a href={ "/audit?key_id=" (k.key_id) } { "All of this key's events" } }
        },
    )
}

pub fn events_table(events: &[pb::KeyEvent]) -> Markup {
    html! {
        table id="events" {
            thead { tr { th { "Seq" } th { "At" } th { "Event" } th { "Key" } th { "Organization" } th { "Actor" } th { "Reason" } th { "Details" } } }
            tbody {
                @for e in events {
                    tr {
                        td { (e.sequence) }
                        td { (time(e.at.as_ref())) }
                        td class="kind" { (e.kind().as_str_name().to_lowercase()) }
                        td { a href={ "/keys/" (e.key_id) } { code { (e.key_id) } } }
                        td { (e.organization_id) }
                        td { code { (e.actor) } }
                        td { (e.reason) }
                        td { (e.details) }
                    }
                }
                @if events.is_empty() { tr { td colspan="8" { "No events." } } }
            }
        }
    }
}

/// The audit page's filters.
#[derive(Debug, Default, serde::Deserialize)]
pub struct AuditFilters {
    #[serde(default)]
    pub key_id: String,
    #[serde(default)]
    pub organization_id: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub page: String,
}

pub fn audit(s: &SignedIn, f: &AuditFilters, events: &[pb::KeyEvent], next: Option<&str>) -> Page {
    use pb::key_event::Kind;
    let kinds = [
        Kind::Created,
        Kind::Updated,
        Kind::Rotated,
        Kind::Revoked,
        Kind::Disabled,
        Kind::Enabled,
        Kind::Deleted,
        Kind::SecretExpired,
    ];
    layout(
        s,
        "Audit log",
        html! {
            form method="get" action="/audit" class="filters" {
                input type="text" name="key_id" placeholder="key id" value=(f.key_id);
                @if s.caller.is_system() { input type="text" name="organization_id" placeholder="organization" value=(f.organization_id); }
                select name="kind" {
                    option value="" { "any event" }
                    @for k in kinds {
                        @let name = k.as_str_name().to_lowercase();
                        option value=(name) selected[name == f.kind] { (name) }
                    }
                }
                button type="submit" { "Filter" }
            }
            (events_table(events))
            @if let Some(next) = next {
                p { a id="next-page" href={ "/audit?key_id=" (f.key_id) "&organization_id=" (f.organization_id) "&kind=" (f.kind) "&page=" (next) } { "Older events" } }
            }
        },
    )
}

pub fn replicas(
    s: &SignedIn,
    replicas: &[crate::service::replicas::ReplicaView],
    head: i64,
) -> Page {
    layout(
        s,
        "Replicas",
        html! {
            p { "Event log head: " strong id="head" { (head) } }
            table id="replicas" {
                thead { tr { th { "Name" } th { "Replica id" } th { "Applied sequence" } th { "Lag (events)" } th { "Heartbeat" } th { "Live" } } }
                tbody {
                    @for r in replicas {
                        tr {
                            td { (r.status.name) }
                            td { code { (r.status.replica_id) } }
                            td { (r.status.applied_sequence) }
                            td { (r.lag) }
                            td { (r.status.heartbeat_at.format("%Y-%m-%d %H:%M:%S UTC")) }
                            td { @if r.live { "live" } @else { "not live" } }
                        }
                    }
                }
            }
        },
    )
}

pub fn limits(
    s: &SignedIn,
    organization_id: &str,
    limit: Option<&pb::OrganizationLimits>,
    message: Option<&str>,
) -> Page {
    layout(
        s,
        "Organization limits",
        html! {
            @if let Some(m) = message { p class="message" id="message" { (m) } }
            form method="get" action="/limits" class="filters" {
                input type="text" name="organization_id" placeholder="organization" value=(organization_id) required;
                button type="submit" { "Show" }
            }
            @if let Some(l) = limit {
                table class="fields" {
                    tr { th { "Organization" } td { (l.organization_id) } }
                    tr { th { "Shared rate limit" } td id="org-limit" { @if l.rate_limit_per_minute == 0 { "none" } @else { (l.rate_limit_per_minute) " per minute" } } }
                    tr { th { "Last set" } td { (time(l.updated_at.as_ref())) " " (l.updated_by) } }
                }
                form method="post" action="/limits" class="stacked" {
                    (csrf(s))
                    input type="hidden" name="organization_id" value=(l.organization_id);
                    label { "Requests per minute for all its keys together (0 clears it)" input type="number" name="rate_limit" min="0" value=(l.rate_limit_per_minute); }
                    button type="submit" id="set-limit" { "Set" }
                }
            }
        },
    )
}
