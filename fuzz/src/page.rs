//! The page-token codec (`keygate_core::page`).
//!
//! - Decoding anything returns, and a token it accepts re-encodes to itself.
//! - A position or sequence round-trips (a position to the microsecond).
//! - A token opens only with its own key, its own filter and as its own
//!   kind.
//! - A token edited in any byte (replaced, removed, added, or cut short) is
//!   refused.

use arbitrary::Arbitrary;
use chrono::DateTime;
use keygate_core::page::{BadPageToken, PageTokens};
use uuid::Uuid;

#[derive(Debug, Clone, Arbitrary)]
pub enum ByteEdit {
    Replace { at: usize, with: u8 },
    Delete { at: usize },
    Insert { at: usize, with: u8 },
    Truncate { to: usize },
}

impl ByteEdit {
    /// `token` edited at a byte position taken modulo its length, or `None`
    /// when the edit leaves it as it was or makes it no string (a page
    /// token arrives in a protobuf string, which is UTF-8).
    pub fn apply(&self, token: &str) -> Option<String> {
        let mut bytes = token.as_bytes().to_vec();
        if bytes.is_empty() {
            return None;
        }
        match *self {
            ByteEdit::Replace { at, with } => {
                let at = at % bytes.len();
                if bytes[at] == with {
                    return None;
                }
                bytes[at] = with;
            }
            ByteEdit::Delete { at } => {
                bytes.remove(at % bytes.len());
            }
            ByteEdit::Insert { at, with } => bytes.insert(at % (bytes.len() + 1), with),
            ByteEdit::Truncate { to } => bytes.truncate(to % bytes.len()),
        }
        String::from_utf8(bytes).ok()
    }
}

#[derive(Debug, Arbitrary)]
pub struct Input {
    pub key: [u8; 32],
    pub other_key: [u8; 32],
    pub filter: String,
    pub other_filter: String,
    pub micros: i64,
    pub id: u128,
    pub sequence: i64,
    pub edit: ByteEdit,
}

/// The target: `text` is decoded as a page token of either kind.
pub fn run(data: &[u8]) {
    super::run(data, check);
}

pub fn check(input: &Input, text: &str) {
    let pages = PageTokens::new(input.key);
    let filter = input.filter.as_str();
    check_decode(&pages, text, filter);
    if let Some(at) = DateTime::from_timestamp_micros(input.micros) {
        let after = (at, Uuid::from_u128(input.id));
        let token = pages.encode(after, filter);
        assert_eq!(pages.decode(&token, filter), Ok(after));
        assert_eq!(pages.decode_sequence(&token, filter), Err(BadPageToken));
        check_bound(input, &token);
        check_edit(&pages, &token, filter, &input.edit);
    }
    let token = pages.encode_sequence(input.sequence, filter);
    assert_eq!(pages.decode_sequence(&token, filter), Ok(input.sequence));
    assert_eq!(pages.decode(&token, filter), Err(BadPageToken));
    check_bound(input, &token);
    check_edit(&pages, &token, filter, &input.edit);
}

/// Decoding `raw` returns; what it accepts re-encodes to itself.
pub fn check_decode(pages: &PageTokens, raw: &str, filter: &str) {
    if let Ok(after) = pages.decode(raw, filter) {
        assert_eq!(pages.encode(after, filter), raw);
    }
    if let Ok(sequence) = pages.decode_sequence(raw, filter) {
        assert_eq!(pages.encode_sequence(sequence, filter), raw);
    }
}

/// `token`, made with `input.key` for `input.filter`, opens with neither
/// another key nor another filter.
fn check_bound(input: &Input, token: &str) {
    let refused = |pages: &PageTokens, filter: &str| {
        pages.decode(token, filter).is_err() && pages.decode_sequence(token, filter).is_err()
    };
    if input.other_filter != input.filter {
        assert!(
            refused(&PageTokens::new(input.key), &input.other_filter),
            "bound to its filter"
        );
    }
    if input.other_key != input.key {
        assert!(
            refused(&PageTokens::new(input.other_key), &input.filter),
            "bound to its key"
        );
    }
}

/// `token` edited in one byte is refused, as either kind.
pub fn check_edit(pages: &PageTokens, token: &str, filter: &str, edit: &ByteEdit) {
    if let Some(edited) = edit.apply(token) {
        assert_eq!(pages.decode(&edited, filter), Err(BadPageToken), "{edit:?}");
        assert_eq!(
            pages.decode_sequence(&edited, filter),
            Err(BadPageToken),
            "{edit:?}"
        );
    }
}
