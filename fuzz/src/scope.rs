//! Scope parsing and matching (`keygate_core::scope`).
//!
//! - `Scope::parse` accepts exactly the documented grammar, keeps the text
//!   it was given, and names a refused scope in its error.
//! - What a scope grants is its resource (or every resource but keygate's
//!   own, for `*` with a narrower action than `*`) times its actions, with
//!   `write` being create, update and delete. `covers` and `ScopeSet::grants`
//!   agree with that model exactly, so a key never matches a scope it does
//!   not hold; `covers` is reflexive and transitive.
//! - `ScopeSet::parse` keeps each distinct scope once, in order, and fails on
//!   the first bad one.

use super::Few;
use arbitrary::{Arbitrary, Unstructured};
use keygate_core::scope::{ADMIN_RESOURCES, MAX_SCOPE_LEN, Scope, ScopeSet};

/// The atomic actions; `write` and `*` are sets of them.
const ACTIONS: [&str; 5] = ["create", "read", "update", "delete", "execute"];
/// keygate's own resources, written out again so a new one is a decision
/// here too.
const ADMIN: [&str; 2] = ["api_key", "revocation"];
const RESOURCES: [&str; 8] = [
    "links",
    "checkout",
    "transaction",
    "api_keys",
    "payments.v1",
    "data_io",
    "a-b",
    "0",
];

/// A scope's text: a resource and an action from vocabularies that make
/// overlaps likely (`*`, keygate's own resources, a few others, every
/// action), or, for 15 modulo 16, `raw` in their place.
#[derive(Debug, Clone)]
pub struct ScopeText {
    resource: u8,
    action: ActionText,
    raw: String,
}

/// An action: `write`, `*`, an atomic one, or (15 modulo 16) `raw`.
#[derive(Debug, Clone)]
pub struct ActionText {
    action: u8,
    raw: String,
}

/// `raw` is read only when `selector` asks for it, so the bytes a text
/// would take are left for the fields that follow.
fn raw_if<'a>(u: &mut Unstructured<'a>, selector: u8) -> arbitrary::Result<String> {
    if selector % 16 == 15 {
        String::arbitrary(u)
    } else {
        Ok(String::new())
    }
}

impl<'a> Arbitrary<'a> for ActionText {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let action = u8::arbitrary(u)?;
        Ok(Self {
            action,
            raw: raw_if(u, action)?,
        })
    }
}

impl<'a> Arbitrary<'a> for ScopeText {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let resource = u8::arbitrary(u)?;
        Ok(Self {
            resource,
            action: ActionText::arbitrary(u)?,
            raw: raw_if(u, resource)?,
        })
    }
}

impl ActionText {
    pub fn text(&self) -> String {
        match self.action % 16 {
            15 => self.raw.clone(),
            0 => "write".to_owned(),
            1 => "*".to_owned(),
            i => ACTIONS[usize::from(i) % ACTIONS.len()].to_owned(),
        }
    }
}

impl ScopeText {
    pub fn text(&self) -> String {
        let resource = match self.resource % 16 {
            15 => self.raw.as_str(),
            0 | 1 => "*",
            2 | 3 => ADMIN[usize::from(self.resource / 16) % ADMIN.len()],
            i => RESOURCES[usize::from(i) % RESOURCES.len()],
        };
        format!("{resource}:{}", self.action.text())
    }
}

/// A scope as the documented grammar reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    /// `None` is `*`.
    pub resource: Option<String>,
    /// Indexed like [`ACTIONS`].
    pub actions: [bool; 5],
}

/// The grammar of the `keygate_core::scope` module doc: at most 100 bytes,
/// `resource:action`, the resource `*` or lowercase letters, digits, `_`,
/// `-`, `.`; the action one of [`ACTIONS`], `write` or `*`.
pub fn model(text: &str) -> Option<Model> {
    if text.len() > 100 {
        return None;
    }
    let (resource, action) = text.split_once(':')?;
    let resource = match resource {
        "*" => None,
        r if !r.is_empty()
            && r.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' || c == '.'
            }) =>
        {
            Some(r.to_owned())
        }
        _ => return None,
    };
    let actions = match action {
        "write" => [true, false, true, true, false],
        "*" => [true; 5],
        atomic => {
            let i = ACTIONS.iter().position(|a| *a == atomic)?;
            let mut actions = [false; 5];
            actions[i] = true;
            actions
        }
    };
    Some(Model { resource, actions })
}

/// Whether holding `held` grants `action` (an index into [`ACTIONS`]) on
/// `resource` (`None`: on every resource, as a required `*:…` asks).
pub fn grants(held: &Model, resource: Option<&str>, action: usize) -> bool {
    let resource_ok = match (held.resource.as_deref(), resource) {
        (None, None) => true,
        // A wildcard reaches keygate's own resources only as `*:*`.
        (None, Some(r)) => !ADMIN.contains(&r) || held.actions == [true; 5],
        (Some(mine), Some(r)) => mine == r,
        (Some(_), None) => false,
    };
    resource_ok && held.actions[action]
}

/// Whether holding `held` grants every action of `needed` on its resource.
pub fn covers(held: &Model, needed: &Model) -> bool {
    (0..ACTIONS.len())
        .filter(|&a| needed.actions[a])
        .all(|a| grants(held, needed.resource.as_deref(), a))
}

#[derive(Debug, Arbitrary)]
pub struct Input {
    pub held: Few<ScopeText, 6>,
    pub needed: ScopeText,
    /// When set, `needed` is the held scope at this index (modulo) with
    /// this action instead, so it is often granted.
    pub from_held: Option<(u8, ActionText)>,
    pub third: ScopeText,
}

impl Input {
    fn needed(&self, held: &[String]) -> String {
        let from_held = self.from_held.as_ref().and_then(|(i, action)| {
            let text = held.get(usize::from(*i) % held.len().max(1))?;
            let (resource, _) = text.split_once(':')?;
            Some(format!("{resource}:{}", action.text()))
        });
        from_held.unwrap_or_else(|| self.needed.text())
    }
}

/// The target: `text` is parsed as one scope, and each of its lines as a
/// set.
pub fn run(data: &[u8]) {
    super::run(data, check);
}

pub fn check(input: &Input, text: &str) {
    assert_eq!(
        ADMIN_RESOURCES, ADMIN,
        "the model knows every admin resource"
    );
    check_parse(text);
    check_set(&text.lines().take(16).map(str::to_owned).collect::<Vec<_>>());
    let held: Vec<String> = input.held.items().iter().map(ScopeText::text).collect();
    for text in &held {
        check_parse(text);
    }
    check_set(&held);
    let valid: Vec<&String> = held.iter().filter(|t| model(t).is_some()).collect();
    let set = ScopeSet::parse(&valid).expect("valid scopes parse as a set");
    let models = models_of(&set);
    let needed = input.needed(&held);
    check_parse(&needed);
    if let (Ok(scope), Some(wanted)) = (Scope::parse(&needed), model(&needed)) {
        check_grants(&set, &models, &scope, &wanted);
        assert!(scope.covers(&scope), "covers is reflexive");
        let third = input.third.text();
        if let Ok(third) = Scope::parse(&third) {
            for held in set.iter() {
                if held.covers(&scope) && scope.covers(&third) {
                    assert!(held.covers(&third), "covers is transitive");
                }
            }
        }
    }
}

/// The model of each scope of `set`, in its order.
pub fn models_of(set: &ScopeSet) -> Vec<Model> {
    set.iter()
        .map(|s| model(s.as_str()).expect("a parsed scope is in the grammar"))
        .collect()
}

/// `Scope::parse` accepts exactly what the grammar does, keeping the text.
pub fn check_parse(text: &str) {
    match (Scope::parse(text), model(text)) {
        (Ok(scope), Some(_)) => {
            assert_eq!(scope.as_str(), text);
            assert_eq!(scope.to_string(), text);
            assert_eq!(Scope::parse(scope.as_str()).as_ref(), Ok(&scope));
        }
        (Err(e), None) => {
            let shown: String = text.chars().take(MAX_SCOPE_LEN).collect();
            assert_eq!(e.scope, shown, "the error names the scope");
        }
        (parsed, wanted) => panic!("{text:?}: parsed {parsed:?}, the grammar says {wanted:?}"),
    }
}

/// `ScopeSet::parse` keeps each distinct scope once, in order, and fails on
/// the first bad one.
pub fn check_set(texts: &[String]) {
    match (
        ScopeSet::parse(texts),
        texts.iter().find(|t| model(t).is_none()),
    ) {
        (Ok(set), None) => {
            let mut distinct: Vec<&String> = Vec::new();
            for text in texts {
                if !distinct.contains(&text) {
                    distinct.push(text);
                }
            }
            assert_eq!(set.to_strings().iter().collect::<Vec<_>>(), distinct);
            assert_eq!(set.len(), distinct.len());
            assert_eq!(ScopeSet::parse(&set.to_strings()).as_ref(), Ok(&set));
        }
        (Err(e), Some(bad)) => {
            assert_eq!(e.scope, bad.chars().take(MAX_SCOPE_LEN).collect::<String>());
        }
        (set, bad) => panic!("{texts:?}: parsed {set:?}, first bad scope {bad:?}"),
    }
}

/// A set grants `needed` exactly when one held scope covers it in the
/// model, so never when the key does not hold every action of it.
pub fn check_grants(set: &ScopeSet, models: &[Model], needed: &Scope, wanted: &Model) {
    let granted = set.grants(needed);
    assert_eq!(
        granted,
        models.iter().any(|held| covers(held, wanted)),
        "{:?} grants {needed}",
        set.to_strings()
    );
    if granted {
        for action in (0..ACTIONS.len()).filter(|&a| wanted.actions[a]) {
            assert!(
                models
                    .iter()
                    .any(|held| grants(held, wanted.resource.as_deref(), action)),
                "{:?} matched {needed} without holding {}",
                set.to_strings(),
                ACTIONS[action]
            );
        }
    }
    assert_eq!(set.first_missing([needed]).is_none(), granted);
    for (held, model) in set.iter().zip(models) {
        assert_eq!(
            held.covers(needed),
            covers(model, wanted),
            "{held} covers {needed}"
        );
    }
}
