//! The Authorize decision (`keygate_core::decision`), driven as the server
//! drives it: parse the presented token, find the key by its id,
//! `authenticate`, then `authorize` against the key's allow-list, the
//! required scopes or the route policy.
//!
//! - For arbitrary key records (state, expiry, a previous secret in or out
//!   of its grace period, scopes, allow-list) and requests (token, address,
//!   required scopes or route), the verdict is the one the documented rules
//!   give, reason and required scope included. Those rules are written here
//!   again: the token by its text, the scopes by `super::scope`'s model, the
//!   allow-list by `super::cidr`'s.
//! - ALLOW only for the key's current secret, or its previous one inside
//!   the grace period, on an active unexpired key, from an admitted
//!   address, holding every action of every scope needed.
//! - Any one-character change to a token that would be allowed is never
//!   ALLOW.

use std::net::IpAddr;
use std::sync::LazyLock;

use arbitrary::Arbitrary;
use chrono::{DateTime, Duration, Utc};
use keygate_core::decision::{self, DenyReason, Requirement, Verdict};
use keygate_core::key::{KeyRecord, KeyState, PreviousSecret, Tier};
use keygate_core::policy::RouteTable;
use keygate_core::scope::{Scope, ScopeSet};
use keygate_core::token::{self, MAX_TOKEN_INPUT, ParsedToken, SecretDigest, TokenError};
use uuid::Uuid;

use super::Few;
use super::cidr::{self, Client, Entry};
use super::scope::{self, ActionText, ScopeText};
use super::token::{Edit, Parts, Presentation};

/// The policy routes resolve against, built once: parsing it is the
/// policy target's business, and per input it would halve the rate.
static POLICY: LazyLock<RouteTable> =
    LazyLock::new(|| RouteTable::from_toml(POLICY_TOML).expect("the fuzz policy parses"));
const POLICY_TOML: &str = r#"
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
route = "GET /v1/keys"
scope = "api_key:read"
"#;
const ROUTES: [&str; 8] = [
    "GET /v1/transactions/tx_1",
    "get /v1/transactions/tx_1?expand=x",
    "POST /v1/checkouts",
    "/payments.v1.Refunds/Create",
    "GET /v1/keys",
    "DELETE /v1/transactions/tx_1",
    "/payments.v1.Refunds/../admin",
    "GET /v1/transactions/%2e%2e",
];

/// The time of the request.
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
}

/// A time around [`now`]: within 16 seconds either way, so that a deadline
/// often falls on the request's very second.
fn at(offset: i8) -> DateTime<Utc> {
    now() + Duration::seconds(i64::from(offset / 8))
}

/// Mostly active (also when the input runs out, as zeros): `1` is
/// disabled, `2` revoked, modulo 8.
#[derive(Debug, Clone, Arbitrary)]
pub struct State(u8);

impl State {
    fn state(&self) -> KeyState {
        match self.0 % 8 {
            1 => KeyState::Disabled,
            2 => KeyState::Revoked {
                at: at(0),
                reason: "leaked".into(),
            },
            _ => KeyState::Active,
        }
    }
}

#[derive(Debug, Clone, Arbitrary)]
pub struct KeySpec {
    pub parts: Parts,
    /// A previous secret and when its grace period ends.
    pub previous: Option<([u8; 43], i8)>,
    pub scopes: Few<ScopeText, 4>,
    pub cidrs: Vec<Entry>,
    pub state: State,
    pub expires_at: Option<i8>,
}

impl KeySpec {
    /// The record, keeping only the scopes and entries the admin API would
    /// accept.
    pub fn record(&self) -> KeyRecord {
        let scopes = self.scopes();
        let mut key = plain_key();
        key.id = self.parts.key_id();
        key.mode = self.parts.mode();
        key.prefix = token::prefix_for(&self.parts.brand(), key.mode, key.id);
        key.secret_digest = SecretDigest::of(&self.parts.secret());
        key.previous_secret = self.previous.as_ref().map(|(secret, expires)| {
            Box::new(PreviousSecret {
                digest: SecretDigest::of(&super::token::secret_from(secret)),
                expires_at: at(*expires),
                announced: false,
                last_used_at: None,
                uses: 0,
            })
        });
        key.scopes = ScopeSet::parse(&scopes).expect("valid scopes parse");
        key.allowed_cidrs = self
            .written_cidrs()
            .iter()
            .filter_map(|n| keygate_core::cidr::normalize(*n).ok())
            .collect();
        key.state = self.state.state();
        key.expires_at = self.expires_at.map(at);
        key
    }

    /// The allow-list as written, less what the admin API refuses.
    pub fn written_cidrs(&self) -> Vec<ipnet::IpNet> {
        self.cidrs
            .iter()
            .take(8)
            .filter_map(|e| cidr::parse_entry(&e.text()))
            .filter(|n| keygate_core::cidr::normalize(*n).is_ok())
            .collect()
    }

    /// The scopes the admin API would accept, as written.
    pub fn scopes(&self) -> Vec<String> {
        self.scopes
            .items()
            .iter()
            .map(ScopeText::text)
            .filter(|t| scope::model(t).is_some())
            .collect()
    }

    pub fn token(&self) -> String {
        self.parts.token()
    }

    pub fn previous_token(&self) -> Option<String> {
        self.previous
            .as_ref()
            .map(|(secret, _)| self.parts.with_secret(*secret).token())
    }
}

/// An active organization key with no scopes and no allow-list.
pub fn plain_key() -> KeyRecord {
    KeyRecord {
        id: Uuid::nil(),
        name: "fuzz".into(),
        organization_id: Some("org_1".into()),
        tier: Tier::Organization,
        mode: keygate_core::key::Mode::Live,
        prefix: String::new(),
        secret_digest: SecretDigest([0; 32]),
        previous_secret: None,
        scopes: ScopeSet::default(),
        allowed_cidrs: Vec::new(),
        rate_limit_per_minute: 0,
        unlimited: false,
        state: KeyState::Active,
        created_at: at(0),
        last_used_at: None,
        expires_at: None,
        rotated_at: None,
        created_by: "bootstrap".into(),
        version: 1,
    }
}

/// What the request presents as its token, by `which`: mostly the key's
/// current token, else its previous one, its prefix with another secret,
/// another key's token, or the fuzz input's text.
#[derive(Debug, Clone, Arbitrary)]
pub struct Presented {
    which: u8,
    presentation: Presentation,
    other_secret: [u8; 43],
    other: Parts,
}

impl Presented {
    fn text(&self, key: &KeySpec, text: &str) -> String {
        match self.which % 8 {
            0..=3 => self.presentation.present(&key.token()),
            4 => self
                .presentation
                .present(&key.previous_token().unwrap_or_default()),
            5 => key.parts.with_secret(self.other_secret).token(),
            6 => self.other.token(),
            _ => text.to_owned(),
        }
    }
}

/// What the request needs, by `which`: some of the key's own scopes with
/// their action swapped for `actions`, other scopes, a route of [`ROUTES`],
/// or the fuzz input's text as the route. Without scopes, a route of
/// [`ROUTES`].
#[derive(Debug, Clone, Arbitrary)]
pub struct Need {
    which: u8,
    held: Few<(u8, Option<ActionText>), 3>,
    scopes: Few<ScopeText, 3>,
    route: u8,
}

impl Need {
    fn scopes(&self, key: &KeySpec) -> Vec<String> {
        let scopes: Vec<String> = match self.which % 4 {
            0 => {
                let held = key.scopes();
                self.held
                    .items()
                    .iter()
                    .filter_map(|(i, action)| {
                        let text = held.get(usize::from(*i) % held.len().max(1))?;
                        Some(match action {
                            None => text.clone(),
                            Some(action) => {
                                let (resource, _) = text.split_once(':')?;
                                format!("{resource}:{}", action.text())
                            }
                        })
                    })
                    .collect()
            }
            1 => self.scopes.items().iter().map(ScopeText::text).collect(),
            _ => Vec::new(),
        };
        scopes
            .into_iter()
            .filter(|t| scope::model(t).is_some())
            .collect()
    }

    fn route<'a>(&self, text: &'a str) -> &'a str {
        match self.which % 4 {
            3 => text,
            _ => ROUTES[usize::from(self.route) % ROUTES.len()],
        }
    }
}

#[derive(Debug, Arbitrary)]
pub struct Input {
    pub key: KeySpec,
    pub presented: Presented,
    pub client: Client,
    pub need: Need,
    pub edit: Edit,
}

/// A verdict in plain values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allow {
        required_scope: Option<String>,
    },
    Deny {
        reason: DenyReason,
        required_scope: Option<String>,
    },
}

impl Outcome {
    fn deny(reason: DenyReason) -> Self {
        Outcome::Deny {
            reason,
            required_scope: None,
        }
    }
}

/// The decision as the server makes it, with a store that holds only `key`.
pub fn decide(
    key: &KeyRecord,
    presented: &str,
    now: DateTime<Utc>,
    ip: Option<IpAddr>,
    requirement: Requirement<'_>,
    policy: &RouteTable,
) -> Outcome {
    let parsed = match ParsedToken::parse(presented) {
        Ok(parsed) => parsed,
        Err(TokenError::Missing) => return Outcome::deny(DenyReason::MissingToken),
        Err(TokenError::Malformed) => return Outcome::deny(DenyReason::InvalidToken),
    };
    if parsed.key_id != key.id {
        return Outcome::deny(DenyReason::InvalidToken);
    }
    if let Err(reason) = decision::authenticate(key, &parsed, now) {
        return Outcome::deny(reason);
    }
    let text = |s: Option<&Scope>| s.map(|s| s.as_str().to_owned());
    match decision::authorize(key, ip, requirement, policy) {
        Verdict::Allow { required_scope } => Outcome::Allow {
            required_scope: text(required_scope),
        },
        Verdict::Deny {
            reason,
            required_scope,
        } => Outcome::Deny {
            reason,
            required_scope: text(required_scope),
        },
    }
}

/// What the request needs, in the model's terms.
pub enum Needed<'a> {
    Scopes(&'a [String]),
    Route(&'a str),
}

/// The decision by the documented rules, from the key as specified.
pub fn expected(
    spec: &KeySpec,
    presented: &str,
    now: DateTime<Utc>,
    ip: Option<IpAddr>,
    needed: &Needed<'_>,
    policy: &RouteTable,
) -> Outcome {
    use DenyReason::*;
    if presented.len() > MAX_TOKEN_INPUT {
        return Outcome::deny(InvalidToken);
    }
    let bare = match presented.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => &presented[7..],
        _ => presented,
    }
    .trim();
    if bare.is_empty() {
        return Outcome::deny(MissingToken);
    }
    // The secret is checked before anything about the key.
    if bare == spec.token() {
    } else if Some(bare) == spec.previous_token().as_deref() {
        if spec
            .previous
            .as_ref()
            .is_some_and(|(_, end)| at(*end) <= now)
        {
            return Outcome::deny(ExpiredToken);
        }
    } else {
        return Outcome::deny(InvalidToken);
    }
    if spec.state.state() != KeyState::Active {
        return Outcome::deny(InvalidToken);
    }
    if spec.expires_at.is_some_and(|end| at(end) <= now) {
        return Outcome::deny(ExpiredToken);
    }
    let written = spec.written_cidrs();
    let admitted =
        written.is_empty() || ip.is_some_and(|ip| written.iter().any(|n| cidr::admits(*n, ip)));
    if !admitted {
        return Outcome::deny(IpNotAllowed);
    }
    let held: Vec<scope::Model> = spec
        .scopes()
        .iter()
        .filter_map(|s| scope::model(s))
        .collect();
    let holds = |needed: &str| {
        let wanted = scope::model(needed).expect("a needed scope is in the grammar");
        held.iter().any(|h| scope::covers(h, &wanted))
    };
    match needed {
        Needed::Scopes(scopes) => match scopes.iter().find(|s| !holds(s)) {
            None => Outcome::Allow {
                required_scope: None,
            },
            Some(missing) => Outcome::Deny {
                reason: InsufficientScope,
                required_scope: Some(missing.clone()),
            },
        },
        // Which scope a route needs is the policy target's to check.
        Needed::Route(route) => match policy.required_scope(route) {
            None => Outcome::deny(RouteNotFound),
            Some(s) if holds(s.as_str()) => Outcome::Allow {
                required_scope: Some(s.as_str().to_owned()),
            },
            Some(s) => Outcome::Deny {
                reason: InsufficientScope,
                required_scope: Some(s.as_str().to_owned()),
            },
        },
    }
}

/// The target: `text` is the presented token or the route when the input
/// says so.
pub fn run(data: &[u8]) {
    super::run(data, check);
}

pub fn check(input: &Input, text: &str) {
    let policy = &*POLICY;
    let key = input.key.record();
    let now = now();
    let ip = input.client.address(&input.key.written_cidrs());
    let needed_scopes = input.need.scopes(&input.key);
    let parsed_scopes: Vec<Scope> = needed_scopes
        .iter()
        .map(|s| Scope::parse(s).expect("a scope in the grammar parses"))
        .collect();
    let route = input.need.route(text);
    // As the server chooses: the scopes asked for, else the route; with
    // neither, the request is refused before any decision.
    let (requirement, needed) = if !needed_scopes.is_empty() {
        (
            Requirement::Scopes(&parsed_scopes),
            Needed::Scopes(&needed_scopes),
        )
    } else if !route.trim().is_empty() {
        (Requirement::Route(route), Needed::Route(route))
    } else {
        return;
    };
    let presented = input.presented.text(&input.key, text);
    let outcome = decide(&key, &presented, now, ip, requirement, policy);
    assert_eq!(
        outcome,
        expected(&input.key, &presented, now, ip, &needed, policy),
        "{key:#?}"
    );
    if let Outcome::Allow { .. } = outcome {
        check_allowed(&key, &needed, policy);
    }
    for token in [Some(input.key.token()), input.key.previous_token()]
        .into_iter()
        .flatten()
    {
        let Some(edited) = input.edit.apply(&token) else {
            continue;
        };
        if edited.trim() == token {
            continue;
        }
        assert!(
            !matches!(
                decide(&key, &edited, now, ip, requirement, policy),
                Outcome::Allow { .. }
            ),
            "a one-character change to a token is never ALLOW: {:?}",
            input.edit
        );
    }
}

/// What an ALLOW implies about the key, checked on the record itself.
fn check_allowed(key: &KeyRecord, needed: &Needed<'_>, policy: &RouteTable) {
    assert_eq!(key.state, KeyState::Active);
    let held = scope::models_of(&key.scopes);
    let needed: Vec<String> = match needed {
        Needed::Scopes(scopes) => scopes.to_vec(),
        Needed::Route(route) => vec![
            policy
                .required_scope(route)
                .expect("an allowed route has a scope")
                .as_str()
                .to_owned(),
        ],
    };
    for needed in &needed {
        let wanted = scope::model(needed).expect("a needed scope is in the grammar");
        for action in (0..5).filter(|&a| wanted.actions[a]) {
            assert!(
                held.iter()
                    .any(|h| scope::grants(h, wanted.resource.as_deref(), action)),
                "allowed {needed} without holding it"
            );
        }
    }
}
