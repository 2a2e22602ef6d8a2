//! The route policy file parser and the route matcher
//! (`keygate_core::policy::RouteTable`).
//!
//! - Parsing any text returns; a table it accepts has one route per
//!   `[[route]]` entry, and each entry without parameters, wildcard or
//!   query is found by its own route, with its own scope.
//! - A path with a dot segment (`..`, `.`), `//`, a backslash, or `%2e`,
//!   `%2f`, `%5c` in any case (before the query) matches nothing.
//! - On generated policies (literal segments, `{name}` parameters, a
//!   trailing `*`) the matcher agrees with the documented pattern rules:
//!   a route it matches is matched by an entry with that scope for that
//!   method or for every method, an entry for the method wins over one for
//!   every method, the most specific entry wins (a literal segment over a
//!   parameter over the wildcard, first difference first), and a route some
//!   entry matches is never left unmatched.

use arbitrary::{Arbitrary, Unstructured};
use keygate_core::policy::{PolicyError, RouteTable};

use super::Few;

const METHODS: [&str; 4] = ["GET", "POST", "DELETE", "PATCH"];
const LITERALS: [&str; 7] = [
    "v1",
    "a",
    "b",
    "transactions",
    "payments.v1.Refunds",
    "x-y",
    "Create",
];
const SCOPES: [&str; 5] = [
    "transaction:read",
    "transaction:update",
    "checkout:create",
    "a:read",
    "b:write",
];
/// What may make a path mean another upstream.
const SNEAKS: [&str; 12] = [
    "..", ".", "", "%2e", "%2E", "%2f", "%2F", "\\", "%5c", "%5C", "%2e%2E", "..%2f",
];

#[derive(Debug, Clone, Arbitrary)]
pub enum PatternSegment {
    Literal(u8),
    Param,
}

/// One `[[route]]` entry.
#[derive(Debug, Clone, Arbitrary)]
pub struct EntrySpec {
    method: Option<u8>,
    segments: Vec<PatternSegment>,
    wildcard: bool,
    scope: u8,
}

/// A segment of a generated pattern or of a path, as the model compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Literal,
    Param,
    Wildcard,
}

impl EntrySpec {
    fn method(&self) -> Option<&'static str> {
        self.method.map(|m| METHODS[usize::from(m) % METHODS.len()])
    }

    fn segments(&self) -> impl Iterator<Item = &PatternSegment> {
        self.segments.iter().take(4)
    }

    fn scope(&self) -> &'static str {
        SCOPES[usize::from(self.scope) % SCOPES.len()]
    }

    /// The entry's `route` as a policy file writes it.
    fn route(&self) -> String {
        let mut path = String::new();
        for (i, segment) in self.segments().enumerate() {
            path.push('/');
            match segment {
                PatternSegment::Literal(l) => {
                    path.push_str(LITERALS[usize::from(*l) % LITERALS.len()])
                }
                PatternSegment::Param => path.push_str(&format!("{{p{i}}}")),
            }
        }
        if self.wildcard {
            path.push_str("/*");
        }
        if path.is_empty() {
            path.push('/');
        }
        match self.method() {
            Some(m) => format!("{m} {path}"),
            None => path,
        }
    }

    /// Whether the documented rules match `path` (no query) with this
    /// entry: a literal is itself, `{name}` one non-empty segment, a
    /// trailing `*` the non-empty rest.
    fn matches(&self, path: &str) -> bool {
        if self.segments().next().is_none() && !self.wildcard {
            return path == "/";
        }
        let mut rest = path;
        for segment in self.segments() {
            let Some(after) = rest.strip_prefix('/') else {
                return false;
            };
            let end = after.find('/').unwrap_or(after.len());
            let (head, tail) = after.split_at(end);
            let ok = match segment {
                PatternSegment::Literal(l) => head == LITERALS[usize::from(*l) % LITERALS.len()],
                PatternSegment::Param => !head.is_empty(),
            };
            if !ok {
                return false;
            }
            rest = tail;
        }
        if self.wildcard {
            rest.strip_prefix('/').is_some_and(|r| !r.is_empty())
        } else {
            rest.is_empty()
        }
    }

    fn kinds(&self) -> Vec<Kind> {
        let mut kinds: Vec<Kind> = self
            .segments()
            .map(|s| match s {
                PatternSegment::Literal(_) => Kind::Literal,
                PatternSegment::Param => Kind::Param,
            })
            .collect();
        if self.wildcard {
            kinds.push(Kind::Wildcard);
        }
        kinds
    }
}

/// A path segment: one of [`LITERALS`], or (`literal` 1 modulo 4) any text.
#[derive(Debug, Clone)]
pub struct PathSegment {
    literal: u8,
    raw: String,
}

impl<'a> Arbitrary<'a> for PathSegment {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let literal = u8::arbitrary(u)?;
        // Read only when used, leaving the bytes to the fields that follow.
        let raw = if literal % 4 == 1 {
            String::arbitrary(u)?
        } else {
            String::new()
        };
        Ok(Self { literal, raw })
    }
}

impl PathSegment {
    fn text(&self) -> String {
        if self.literal % 4 != 1 {
            return LITERALS[usize::from(self.literal) % LITERALS.len()].to_owned();
        }
        // What the model reads as one segment: no separator, no query, no
        // blank (a route is trimmed and split at a space).
        self.raw
            .chars()
            .filter(|c| !matches!(c, '/' | '?') && !c.is_whitespace())
            .take(12)
            .collect()
    }
}

#[derive(Debug, Clone, Arbitrary)]
pub struct RequestSpec {
    /// A method, and whether to write it in lower case.
    method: Option<(u8, bool)>,
    /// When set, the path is made to fit the entry at this index (modulo),
    /// its parameters and wildcard filled from `segments`.
    from_entry: Option<u8>,
    segments: Vec<PathSegment>,
    trailing_slash: bool,
    /// When the first number is 1 modulo 4, one of [`SNEAKS`], as a whole
    /// segment or inside one, at a segment.
    sneak: (u8, u8, bool, u8),
    query: Option<String>,
}

impl RequestSpec {
    fn method(&self) -> Option<String> {
        self.method.map(|(m, lower)| {
            let m = METHODS
                .get(usize::from(m))
                .copied()
                .unwrap_or(if m % 2 == 0 { "PUT" } else { "HEAD" });
            if lower {
                m.to_lowercase()
            } else {
                m.to_owned()
            }
        })
    }

    /// The path, before any query.
    fn path(&self, entries: &[EntrySpec]) -> String {
        let mut fill = self.segments.iter().take(5).map(PathSegment::text);
        let entry = self
            .from_entry
            .and_then(|i| entries.get(usize::from(i) % entries.len().max(1)));
        let mut segments: Vec<String> = match entry {
            None => fill.collect(),
            Some(entry) => {
                let mut segments: Vec<String> = entry
                    .segments()
                    .map(|s| match s {
                        PatternSegment::Literal(l) => {
                            LITERALS[usize::from(*l) % LITERALS.len()].to_owned()
                        }
                        PatternSegment::Param => fill.next().unwrap_or_else(|| "p".to_owned()),
                    })
                    .collect();
                if entry.wildcard {
                    segments.extend(fill);
                }
                segments
            }
        };
        let (when, sneak, whole, at) = self.sneak;
        if when % 4 == 1 {
            let sneak = SNEAKS[usize::from(sneak) % SNEAKS.len()];
            let at = usize::from(at) % (segments.len() + 1);
            if whole || at == segments.len() {
                segments.insert(at, sneak.to_owned());
            } else {
                segments[at].push_str(sneak);
            }
        }
        let mut path = format!("/{}", segments.join("/"));
        if self.trailing_slash && !path.ends_with('/') {
            path.push('/');
        }
        path
    }

    fn route(&self, path: &str) -> String {
        let query = self
            .query
            .as_ref()
            .map(|q| {
                format!(
                    "?{}",
                    q.chars().filter(|c| !c.is_whitespace()).collect::<String>()
                )
            })
            .unwrap_or_default();
        match self.method() {
            Some(m) => format!("{m} {path}{query}"),
            None => format!("{path}{query}"),
        }
    }
}

/// Whether a path may mean another route once a proxy or upstream
/// normalises it.
pub fn ambiguous(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    path.split('/').any(|s| s == "." || s == "..")
        || path.contains("//")
        || path.contains('\\')
        || ["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e))
}

#[derive(Debug, Arbitrary)]
pub struct Input {
    pub entries: Few<EntrySpec, 6>,
    pub requests: Few<RequestSpec, 4>,
}

/// The target: `text` is parsed as a policy file; the generated routes are
/// looked up in it and in the generated policy.
pub fn run(data: &[u8]) {
    super::run(data, check);
}

pub fn check(input: &Input, text: &str) {
    let requests = input.requests.items();
    if let Ok(table) = check_file(text) {
        for request in requests {
            let path = request.path(&[]);
            let route = request.route(&path);
            let found = table.required_scope(&route);
            if ambiguous(&path) {
                assert_eq!(found, None, "{route:?} matches nothing");
            }
        }
    }
    let (table, entries) = build(input.entries.items().to_vec());
    for request in requests {
        check_request(&table, &entries, request);
    }
}

/// Parsing `text` returns; an accepted table holds every entry and finds
/// each literal one by its route.
pub fn check_file(text: &str) -> Result<RouteTable, PolicyError> {
    let table = RouteTable::from_toml(text)?;
    let file: toml::Table = text.parse().expect("an accepted policy is TOML");
    let entries = match file.get("route") {
        Some(toml::Value::Array(entries)) => entries.clone(),
        None => Vec::new(),
        Some(other) => panic!("an accepted policy's route is an array, not {other:?}"),
    };
    assert_eq!(table.len(), entries.len());
    for entry in &entries {
        let (Some(route), Some(scope)) = (
            entry.get("route").and_then(toml::Value::as_str),
            entry.get("scope").and_then(toml::Value::as_str),
        ) else {
            panic!("an accepted entry has a route and a scope: {entry:?}");
        };
        let trimmed = route.trim();
        let path = trimmed
            .split_once(' ')
            .map_or(trimmed, |(_, p)| p.trim_start());
        let literal = !path.contains(['{', '}', '*', '?']);
        let found = table.required_scope(route).map(|s| s.as_str());
        if ambiguous(path) {
            assert_eq!(found, None, "{route:?} matches nothing");
        } else if literal {
            assert_eq!(found, Some(scope), "{route:?} finds its own entry");
        }
    }
    Ok(table)
}

/// The table of `entries`, less those it refuses (a conflict with an
/// earlier one), and the entries it kept.
fn build(mut entries: Vec<EntrySpec>) -> (RouteTable, Vec<EntrySpec>) {
    loop {
        let text: String = entries
            .iter()
            .map(|e| {
                format!(
                    "[[route]]\nroute = \"{}\"\nscope = \"{}\"\n",
                    e.route(),
                    e.scope()
                )
            })
            .collect();
        match RouteTable::from_toml(&text) {
            Ok(table) => {
                assert_eq!(table.len(), entries.len());
                return (table, entries);
            }
            Err(PolicyError::Entry { index, .. }) if (1..=entries.len()).contains(&index) => {
                entries.remove(index - 1);
            }
            Err(e) => panic!("a generated policy is refused as a whole: {e}\n{text}"),
        }
    }
}

/// The matcher agrees with the pattern rules for one request.
fn check_request(table: &RouteTable, entries: &[EntrySpec], request: &RequestSpec) {
    let path = request.path(entries);
    let route = request.route(&path);
    let found = table.required_scope(&route).map(|s| s.as_str());
    if ambiguous(&path) {
        assert_eq!(found, None, "{route:?} matches nothing");
        return;
    }
    let method = request.method();
    let for_method: Vec<&EntrySpec> = entries
        .iter()
        .filter(|e| {
            e.method()
                .zip(method.as_deref())
                .is_some_and(|(e, r)| e.eq_ignore_ascii_case(r))
        })
        .filter(|e| e.matches(&path))
        .collect();
    let for_any: Vec<&EntrySpec> = entries
        .iter()
        .filter(|e| e.method().is_none() && e.matches(&path))
        .collect();
    let candidates = if for_method.is_empty() {
        for_any
    } else {
        for_method
    };
    let Some(best) = candidates.iter().min_by_key(|e| e.kinds()) else {
        assert_eq!(found, None, "{route:?}: no entry matches, in {entries:#?}");
        return;
    };
    assert_eq!(
        found,
        Some(best.scope()),
        "{route:?}: the most specific entry is {}, in {entries:#?}",
        best.route()
    );
}
