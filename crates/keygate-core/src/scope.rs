//! Scopes: `resource:action`.
//!
//! Actions are `create`, `read`, `update`, `delete`, `execute` and `*` (all of
//! them); `write` grants create, update and delete. A resource is lowercase
//! letters, digits, `_`, `-` and `.`, or `*` for every resource: `*:*` is
//! everything.
//!
//! keygate's own resources ([`ADMIN_RESOURCES`]) are the exception to `*`: a
//! wildcard resource with a narrower action (`*:read`, `*:write`) is meant
//! for the customer's own routes, and must not turn a read-only integration
//! key into one that lists every key of its organization, or an `*:update`
//! key into one that revokes them. Only a scope naming the resource
//! (`api_key:read`, `api_key:*`) or `*:*` grants them.

use std::fmt;
use std::sync::Arc;

use crate::intern::Interner;

const CREATE: u8 = 1;
const READ: u8 = 2;
const UPDATE: u8 = 4;
const DELETE: u8 = 8;
const EXECUTE: u8 = 16;
const WRITE: u8 = CREATE | UPDATE | DELETE;
const ALL: u8 = CREATE | READ | UPDATE | DELETE | EXECUTE;

/// Longest scope accepted.
pub const MAX_SCOPE_LEN: usize = 100;

/// The resources keygate itself guards: its admin API and its revocation
/// feed. Granted only by a scope naming them, or by `*:*`.
pub const ADMIN_RESOURCES: &[&str] = &["api_key", "revocation"];

/// One parsed scope. Keeps the text it was written as, for display.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    text: String,
    /// `None` is `*`, every resource.
    resource_len: Option<usize>,
    actions: u8,
}

/// Why a scope does not parse; the message names the scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid scope {scope:?}: {why}")]
pub struct ScopeError {
    /// The scope as given, cut to [`MAX_SCOPE_LEN`] characters.
    pub scope: String,
    /// Which rule of the grammar it breaks.
    pub why: &'static str,
}

impl Scope {
    /// Parses `resource:action` by the grammar in the module docs; at most
    /// [`MAX_SCOPE_LEN`] bytes.
    pub fn parse(text: &str) -> Result<Self, ScopeError> {
        let err = |why| ScopeError {
            scope: text.chars().take(MAX_SCOPE_LEN).collect(),
            why,
        };
        if text.len() > MAX_SCOPE_LEN {
            return Err(err("longer than 100 characters"));
        }
        let (resource, action) = text
            .split_once(':')
            .ok_or_else(|| err("expected resource:action"))?;
        let resource_len = match resource {
            "*" => None,
            "" => return Err(err("empty resource")),
            r if r
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-.".contains(&c)) =>
            {
                Some(r.len())
            }
            _ => {
                return Err(err(
                    "resource must be lowercase letters, digits, '_', '-', '.' or '*'",
                ));
            }
        };
        let actions = match action {
            "create" => CREATE,
            "read" => READ,
            "update" => UPDATE,
            "delete" => DELETE,
            "execute" => EXECUTE,
            "write" => WRITE,
            "*" => ALL,
            _ => {
                return Err(err(
                    "action must be create, read, update, delete, execute, write or *",
                ));
            }
        };
        Ok(Self {
            text: text.to_owned(),
            resource_len,
            actions,
        })
    }

    /// The scope exactly as it was written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn resource(&self) -> Option<&str> {
        self.resource_len.map(|len| &self.text[..len])
    }

    /// Whether holding `self` grants everything `other` grants.
    pub fn covers(&self, other: &Scope) -> bool {
        let resource_ok = match (self.resource(), other.resource()) {
            (None, Some(theirs)) if ADMIN_RESOURCES.contains(&theirs) => self.actions == ALL,
            (None, _) => true,
            (Some(mine), Some(theirs)) => mine == theirs,
            (Some(_), None) => false,
        };
        resource_ok && other.actions & !self.actions == 0
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The scopes a key holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet(Arc<[Scope]>);

/// Most scopes one key may hold.
pub const MAX_SCOPES: usize = 100;

impl ScopeSet {
    /// Parses and de-duplicates; fails on the first bad scope.
    pub fn parse<S: AsRef<str>>(scopes: &[S]) -> Result<Self, ScopeError> {
        let mut set: Vec<Scope> = Vec::with_capacity(scopes.len());
        for s in scopes {
            let scope = Scope::parse(s.as_ref())?;
            if !set.contains(&scope) {
                set.push(scope);
            }
        }
        Ok(Self(set.into()))
    }

    /// The same set, sharing its scopes with every equal set `interner` has
    /// handed out (what the key cache keeps, so keys with the same scopes
    /// cost one set between them).
    pub fn interned(&self, interner: &Interner<[Scope]>) -> Self {
        Self(interner.intern(&self.0))
    }

    /// Whether both hold the very same scopes in memory (an interned pair).
    pub fn shares_with(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The scopes, in the order first given, each once.
    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    /// How many distinct scopes the set holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set holds no scope (it then grants nothing).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether some held scope grants `needed`.
    pub fn grants(&self, needed: &Scope) -> bool {
        self.0.iter().any(|held| held.covers(needed))
    }

    /// The first scope of `other` that this set does not grant.
    pub fn first_missing<'a>(
        &self,
        other: impl IntoIterator<Item = &'a Scope>,
    ) -> Option<&'a Scope> {
        other.into_iter().find(|s| !self.grants(s))
    }

    /// The scopes as written, in [`iter`](Self::iter)'s order.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|s| s.text.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Scope {
        Scope::parse(text).unwrap()
    }

    #[test]
    fn write_grants_create_update_delete_but_not_read() {
        let write = s("links:write");
        for a in ["create", "update", "delete", "write"] {
            assert!(write.covers(&s(&format!("links:{a}"))), "{a}");
        }
        assert!(!write.covers(&s("links:read")));
        assert!(!write.covers(&s("links:execute")));
        assert!(!write.covers(&s("sessions:create")));
    }

    #[test]
    fn interned_sets_are_equal_and_share_their_scopes() {
        let interner = Interner::default();
        let a = ScopeSet::parse(&["checkout:create", "checkout:read"]).unwrap();
        let b = ScopeSet::parse(&["checkout:create", "checkout:read"]).unwrap();
        let (a, b) = (a.interned(&interner), b.interned(&interner));
        assert_eq!(a, b);
        assert!(a.shares_with(&b));
        assert!(a.grants(&s("checkout:read")));
        let other = ScopeSet::parse(&["checkout:read"])
            .unwrap()
            .interned(&interner);
        assert_ne!(a, other);
    }

    #[test]
    fn wildcards() {
        assert!(s("*:*").covers(&s("checkout:create")));
        assert!(s("*:*").covers(&s("*:*")));
        assert!(s("invoice:*").covers(&s("invoice:execute")));
        assert!(!s("invoice:*").covers(&s("*:read")));
        assert!(s("*:read").covers(&s("client:read")));
        assert!(!s("*:read").covers(&s("client:update")));
        assert!(!s("invoice:read").covers(&s("invoice:*")));
    }

    #[test]
    fn wildcard_resources_do_not_reach_keygates_own() {
        for admin in [
            "api_key:read",
            "api_key:create",
            "api_key:update",
            "api_key:delete",
            "revocation:read",
        ] {
            let needed = s(admin);
            for wildcard in ["*:read", "*:write", "*:update", "*:create", "*:delete"] {
                assert!(
                    !s(wildcard).covers(&needed),
                    "{wildcard} must not grant {admin}"
                );
            }
            assert!(s("*:*").covers(&needed), "*:*");
            let (resource, _) = admin.split_once(':').unwrap();
            assert!(s(&format!("{resource}:*")).covers(&needed));
        }
        // The customer's own resources keep their wildcards.
        assert!(s("*:read").covers(&s("transaction:read")));
        assert!(s("*:update").covers(&s("transaction:update")));
        assert!(s("*:write").covers(&s("links:delete")));
        // A resource that merely starts like an admin one is the customer's.
        assert!(s("*:read").covers(&s("api_keys:read")));
    }

    #[test]
    fn malformed_scopes_name_themselves() {
        for bad in [
            "links",
            "links:",
            ":read",
            "Links:read",
            "links:view",
            "links:read:x",
            "a b:read",
            "",
        ] {
            let err = Scope::parse(bad).unwrap_err();
            assert_eq!(err.scope, bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert!(Scope::parse(&format!("{}:read", "a".repeat(100))).is_err());
    }

    #[test]
    fn seed_scopes_parse() {
        for ok in [
            "checkout:create",
            "data_io:execute",
            "portal:create",
            "links:write",
            "api_key:*",
            "payments.v1:read",
        ] {
            assert_eq!(s(ok).as_str(), ok);
        }
    }

    #[test]
    fn set_reports_first_missing() {
        let set = ScopeSet::parse(&["links:read", "links:read", "sessions:write"]).unwrap();
        assert_eq!(set.len(), 2);
        let needed = [s("links:read"), s("sessions:create"), s("events:read")];
        assert_eq!(
            set.first_missing(&needed).map(Scope::as_str),
            Some("events:read")
        );
    }
}
