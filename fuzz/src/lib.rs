//! The invariants keygate's parsers and its Authorize decision must keep on
//! any input, one module per fuzz target.
//!
//! Each module has an `Input` that `arbitrary` builds from raw bytes, a
//! `check` that panics when an invariant breaks, and a `run` that splits
//! one fuzz input into the two ([`split`]). The fuzz targets
//! (`fuzz_targets/`) feed `check` libFuzzer's bytes; the workspace's
//! `crates/keygate-core/tests/properties.rs` includes this same source with
//! `#[path]` and feeds it proptest's bytes, so `cargo test` checks the very
//! same properties on stable, without this crate's libFuzzer dependency.
//! Modules refer to each other through `super::` only, since under the test
//! they are not the crate root.
//!
//! Where an invariant needs an oracle, the module writes one from the
//! documented rules instead of calling the code under test: a token encoder,
//! the scope grammar and what a scope grants, the allow-list rule, the route
//! patterns.

use arbitrary::{Arbitrary, Unstructured};

pub mod cidr;
pub mod decision;
pub mod page;
pub mod policy;
pub mod scope;
pub mod token;

/// Up to `N` items: all `N` when the input has run out (and reads as
/// zeros), fewer by `fewer` modulo `N + 1`. A `Vec` from `arbitrary` is
/// empty half the time, which leaves a check little to work on.
#[derive(Debug, Clone, Arbitrary)]
pub struct Few<T, const N: usize> {
    fewer: u8,
    items: [T; N],
}

impl<T, const N: usize> Few<T, N> {
    pub fn items(&self) -> &[T] {
        &self.items[..N - usize::from(self.fewer) % (N + 1)]
    }
}

/// Splits one fuzz input into the bytes `arbitrary` builds the structured
/// input from and a text the target parses as it is (a token, a policy
/// file, a page token): a little-endian `u16` gives the length of the
/// structured part, and the text is the rest, up to its first byte that is
/// not UTF-8. A seed is `[0, 0]` followed by a text. Inputs under two bytes
/// are all structure.
pub fn split(data: &[u8]) -> (&[u8], &str) {
    let [a, b, rest @ ..] = data else {
        return (data, "");
    };
    let len = usize::from(u16::from_le_bytes([*a, *b]));
    let (structured, text) = rest.split_at(len.min(rest.len()));
    let text = match std::str::from_utf8(text) {
        Ok(text) => text,
        Err(e) => std::str::from_utf8(&text[..e.valid_up_to()]).unwrap_or_default(),
    };
    (structured, text)
}

/// The input [`split`] splits into `structured` and `text`; `structured`
/// past 65,535 bytes is cut.
pub fn join(structured: &[u8], text: &str) -> Vec<u8> {
    let structured = &structured[..structured.len().min(usize::from(u16::MAX))];
    let len = u16::try_from(structured.len()).unwrap_or(u16::MAX);
    let mut data = len.to_le_bytes().to_vec();
    data.extend_from_slice(structured);
    data.extend_from_slice(text.as_bytes());
    data
}

/// Builds `T` from the structured part of `data` and runs `check` on it
/// and the text.
pub fn run<T: for<'a> Arbitrary<'a>>(data: &[u8], check: impl FnOnce(&T, &str)) {
    let (structured, text) = split(data);
    if let Ok(input) = T::arbitrary_take_rest(Unstructured::new(structured)) {
        check(&input, text);
    }
}
