//! Page tokens for ListKeys: the last key's (created_at, id), bound to the
//! query's filters and MAC'd with a secret every replica shares, so an edited
//! or replayed-elsewhere token is refused rather than misread.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use uuid::Uuid;

use crate::error::Error;

const MAC_LEN: usize = 16;

pub struct PageTokens {
    key: [u8; 32],
}

/// The page size asked for, 0 meaning the default of 100. Callers query one
/// more than this, to know whether another page follows.
pub fn page_size(asked: u32) -> u32 {
    if asked == 0 { 100 } else { asked }
}

/// Cuts a result fetched with `limit + 1` rows down to the page, and returns
/// the page's last item when another page follows.
pub fn last_of_page<T>(items: &mut Vec<T>, limit: u32) -> Option<&T> {
    if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last()
    } else {
        None
    }
}

fn bad() -> Error {
    Error::invalid(
        "page_token",
        "malformed, tampered with, or from a different query",
    )
}

impl PageTokens {
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

    fn open(&self, token: &str, filter: &str) -> Result<String, Error> {
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
        if bytes.len() <= MAC_LEN {
            return Err(bad());
        }
        let (payload, tag) = bytes.split_at(bytes.len() - MAC_LEN);
        self.mac(payload, filter)
            .verify_truncated_left(tag)
            .map_err(|_| bad())?;
        String::from_utf8(payload.to_vec()).map_err(|_| bad())
    }

    /// A ListKeys position: the last key's (created_at, id).
    pub fn encode(&self, after: (DateTime<Utc>, Uuid), filter: &str) -> String {
        self.seal(
            format!("{}.{}", after.0.timestamp_micros(), after.1),
            filter,
        )
    }

    /// A ListKeyEvents position: the last event's sequence.
    pub fn encode_sequence(&self, before: i64, filter: &str) -> String {
        self.seal(format!("seq.{before}"), filter)
    }

    pub fn decode_sequence(&self, token: &str, filter: &str) -> Result<i64, Error> {
        let text = self.open(token, filter)?;
        text.strip_prefix("seq.")
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)
    }

    pub fn decode(&self, token: &str, filter: &str) -> Result<(DateTime<Utc>, Uuid), Error> {
        let text = self.open(token, filter)?;
        let (micros, id) = text.split_once('.').ok_or_else(bad)?;
        let at = micros
            .parse()
            .ok()
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(bad)?;
        Ok((at, Uuid::parse_str(id).map_err(|_| bad())?))
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
            let err = pages.decode(junk, "org_1").unwrap_err().to_string();
            assert!(err.starts_with("page_token:"), "{err}");
        }
    }
}
