//! Page tokens for the list calls: the last item's position, bound to the
//! query's filters and MAC'd with a secret every replica shares, so an edited
//! or replayed-elsewhere token is refused rather than misread.
//!
//! A token is `base64url(payload ‖ tag)` without padding, where `tag` is the
//! first 16 bytes of HMAC-SHA256(key, `payload | filter`). The payload is
//! `<created_at µs>.<key id>` for ListKeys and `seq.<sequence>` for
//! ListKeyEvents, so a token of one kind never opens as the other.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use uuid::Uuid;

const MAC_LEN: usize = 16;

/// A page token that is malformed, was edited, was made with another key or
/// for another query's filters, or is of the other kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed, tampered with, or from a different query")]
pub struct BadPageToken;

/// Seals and opens page tokens with one 32-byte key.
pub struct PageTokens {
    key: [u8; 32],
}

impl PageTokens {
    /// Tokens sealed with `key`, which every replica shares (a token one
    /// replica issued opens on any other).
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    fn mac(&self, payload: &[u8], filter: &str) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .expect("HMAC takes any key length");
        mac.update(payload);
        mac.update(b"|");
        mac.update(filter.as_bytes());
        mac
    }

    fn seal(&self, payload: String, filter: &str) -> String {
        let mut bytes = payload.into_bytes();
        let tag = self.mac(&bytes, filter).finalize().into_bytes();
        bytes.extend_from_slice(&tag[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn open(&self, token: &str, filter: &str) -> Result<String, BadPageToken> {
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| BadPageToken)?;
        if bytes.len() <= MAC_LEN {
            return Err(BadPageToken);
        }
        let (payload, tag) = bytes.split_at(bytes.len() - MAC_LEN);
        self.mac(payload, filter)
            .verify_truncated_left(tag)
            .map_err(|_| BadPageToken)?;
        String::from_utf8(payload.to_vec()).map_err(|_| BadPageToken)
    }

    /// A ListKeys position: the last key's (created_at, id). `created_at`
    /// is kept to the microsecond, as the store keeps it.
    pub fn encode(&self, after: (DateTime<Utc>, Uuid), filter: &str) -> String {
        self.seal(
            format!("{}.{}", after.0.timestamp_micros(), after.1),
            filter,
        )
    }

    /// The position a token from [`encode`](Self::encode) with the same key
    /// and `filter` holds.
    pub fn decode(&self, token: &str, filter: &str) -> Result<(DateTime<Utc>, Uuid), BadPageToken> {
        let text = self.open(token, filter)?;
        let (micros, id) = text.split_once('.').ok_or(BadPageToken)?;
        let at = micros
            .parse()
            .ok()
            .and_then(DateTime::from_timestamp_micros)
            .ok_or(BadPageToken)?;
        Ok((at, Uuid::parse_str(id).map_err(|_| BadPageToken)?))
    }

    /// A ListKeyEvents position: the last event's sequence.
    pub fn encode_sequence(&self, before: i64, filter: &str) -> String {
        self.seal(format!("seq.{before}"), filter)
    }

    /// The sequence a token from [`encode_sequence`](Self::encode_sequence)
    /// with the same key and `filter` holds.
    pub fn decode_sequence(&self, token: &str, filter: &str) -> Result<i64, BadPageToken> {
        let text = self.open(token, filter)?;
        text.strip_prefix("seq.")
            .and_then(|s| s.parse().ok())
            .ok_or(BadPageToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_edits() {
        let pages = PageTokens::new([7; 32]);
        let after = (
            DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            Uuid::new_v4(),
        );
        let token = pages.encode(after, "org_1");
        assert_eq!(pages.decode(&token, "org_1").unwrap(), after);
        assert!(
            pages.decode(&token, "org_2").is_err(),
            "bound to the filter"
        );
        assert!(
            PageTokens::new([8; 32]).decode(&token, "org_1").is_err(),
            "bound to the key"
        );
        let mut edited = token.clone().into_bytes();
        edited[3] = if edited[3] == b'A' { b'B' } else { b'A' };
        assert!(
            pages
                .decode(std::str::from_utf8(&edited).unwrap(), "org_1")
                .is_err()
        );
        for junk in ["", "!!!", "AAAA"] {
            assert_eq!(pages.decode(junk, "org_1"), Err(BadPageToken));
        }
    }

    #[test]
    fn one_kind_never_opens_as_the_other() {
        let pages = PageTokens::new([7; 32]);
        let seq = pages.encode_sequence(42, "f");
        assert_eq!(pages.decode_sequence(&seq, "f"), Ok(42));
        assert_eq!(pages.decode(&seq, "f"), Err(BadPageToken));
        let at = DateTime::from_timestamp_micros(1).unwrap();
        let pos = pages.encode((at, Uuid::nil()), "f");
        assert_eq!(pages.decode_sequence(&pos, "f"), Err(BadPageToken));
    }
}
