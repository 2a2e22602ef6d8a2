//! Key ids that say whether keygate made them: a UUIDv8 (RFC 9562's custom
//! layout) of 74 random bits from the OS CSPRNG followed by a 48-bit tag,
//! the first six bytes of HMAC-SHA256 of the id's first ten bytes under a
//! 32-byte key every replica shares.
//!
//! The token format and its checksum are public, so anyone can make a
//! well-formed token. A token whose id is in no replica's key-id index may
//! still be a key another replica created a moment ago, which is why such a
//! lookup waits for the feed's next read of the event log; an id without a
//! valid tag was never made by this cluster, so it is refused at once, with
//! no wait, no log read and no store read. Guessing a tag takes 2^47 tries
//! on average, and one that passes buys only that wait.
//!
//! Ids made before tags existed (UUIDv4) carry none. They are all in the
//! index once it is loaded, so the tag is only ever asked of an id the index
//! lacks.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use uuid::Uuid;

/// Bytes of the id covered by the tag: the random bits, version and variant.
const TAGGED: usize = 10;
/// Bytes of the tag, at the end of the id.
const TAG_LEN: usize = 16 - TAGGED;
const VERSION: u8 = 8;

/// Makes key ids and recognises the ones made with the same key.
#[derive(Clone)]
pub struct KeyIds {
    /// Keyed once; cloned per id, which costs no key schedule.
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for KeyIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyIds(..)")
    }
}

impl KeyIds {
    /// Ids tagged with `key`, which every replica of a cluster must share.
    pub fn new(key: [u8; 32]) -> Self {
        Self {
            mac: <Hmac<Sha256> as KeyInit>::new_from_slice(&key)
                .expect("HMAC takes any key length"),
        }
    }

    fn tag(&self, tagged: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = self.mac.clone();
        mac.update(tagged);
        let full = mac.finalize().into_bytes();
        let mut tag = [0; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    /// A new id: random, versioned 8, tagged.
    pub fn mint(&self) -> Result<Uuid, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes[..TAGGED])?;
        bytes[6] = (bytes[6] & 0x0f) | (VERSION << 4);
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        let tag = self.tag(&bytes[..TAGGED]);
        bytes[TAGGED..].copy_from_slice(&tag);
        Ok(Uuid::from_bytes(bytes))
    }

    /// Whether `id` was made by [`mint`](Self::mint) with this key. No I/O,
    /// no allocation; the tag is compared in constant time.
    pub fn minted(&self, id: Uuid) -> bool {
        let bytes = id.as_bytes();
        if id.get_version_num() != usize::from(VERSION) || bytes[8] & 0xc0 != 0x80 {
            return false;
        }
        let mut mac = self.mac.clone();
        mac.update(&bytes[..TAGGED]);
        mac.verify_truncated_left(&bytes[TAGGED..]).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_are_recognised_and_are_rfc_9562_version_8() {
        let ids = KeyIds::new([7; 32]);
        for _ in 0..1000 {
            let id = ids.mint().unwrap();
            assert!(ids.minted(id), "{id}");
            assert_eq!(id.get_version_num(), 8);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        }
    }

    #[test]
    fn minted_ids_differ() {
        let ids = KeyIds::new([7; 32]);
        let made: std::collections::HashSet<Uuid> =
            (0..10_000).map(|_| ids.mint().unwrap()).collect();
        assert_eq!(made.len(), 10_000);
    }

    #[test]
    fn random_ids_ids_of_another_key_and_edited_ids_are_not_recognised() {
        let ids = KeyIds::new([7; 32]);
        for _ in 0..1000 {
            assert!(!ids.minted(Uuid::new_v4()));
        }
        let other = KeyIds::new([8; 32]).mint().unwrap();
        assert!(!ids.minted(other));

        let id = ids.mint().unwrap();
        for bit in 0..128 {
            let edited = Uuid::from_u128(id.as_u128() ^ (1 << bit));
            assert!(
                !ids.minted(edited),
                "bit {bit} flipped and still recognised"
            );
        }
        // A random id dressed as version 8 still lacks the tag.
        let mut bytes = *Uuid::new_v4().as_bytes();
        bytes[6] = (bytes[6] & 0x0f) | 0x80;
        assert!(!ids.minted(Uuid::from_bytes(bytes)));
    }

    #[test]
    fn debug_does_not_show_the_key() {
        assert_eq!(format!("{:?}", KeyIds::new([7; 32])), "KeyIds(..)");
    }
}
