//! The tamper-evident audit chain: each event's hash covers the previous
//! event's hash and the event's own content, so editing, deleting or
//! reordering any row breaks the chain from that row on.

use sha2::{Digest, Sha256};

use super::event::Event;

/// The "previous hash" of the first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// SHA-256 over the previous hash and a length-prefixed encoding of every field.
pub fn chain_hash(previous: &[u8; 32], e: &Event) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"keygate-audit-v1");
    h.update(previous);
    h.update(e.sequence.to_be_bytes());
    let org = e.organization_id.as_deref();
    let key_id = e.key_id.to_string();
    for field in [
        e.kind.as_str(),
        key_id.as_str(),
        org.unwrap_or(""),
        e.actor.as_str(),
        e.reason.as_str(),
    ] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    h.update([u8::from(org.is_some())]);
    h.update(e.at.timestamp_micros().to_be_bytes());
    // Added after the chain existed: hashed only when present, so events
    // written before (all without details) keep their hashes.
    if !e.details.is_empty() {
        h.update((e.details.len() as u64).to_be_bytes());
        h.update(e.details.as_bytes());
    }
    h.finalize().into()
}

/// Where the chain breaks, by the first bad sequence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    /// No event with this sequence, though later ones exist.
    #[error("event {0} is missing: a row was deleted")]
    Missing(i64),
    /// This event's stored hash is not the hash of its content and its
    /// predecessor's hash, or it came out of sequence order.
    #[error("event {0} does not match its hash: a row was edited, or rows were reordered")]
    Mismatch(i64),
    /// This event was stored without a hash.
    #[error("event {0} has no hash")]
    Unhashed(i64),
}

impl ChainBreak {
    /// The sequence of the first event that breaks the chain.
    pub fn sequence(&self) -> i64 {
        match self {
            ChainBreak::Missing(s) | ChainBreak::Mismatch(s) | ChainBreak::Unhashed(s) => *s,
        }
    }
}

/// Checks events in sequence order, batch by batch; `feed` is called once per
/// stored event.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    previous: [u8; 32],
    next_sequence: i64,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            previous: GENESIS,
            next_sequence: 1,
        }
    }
}

impl ChainVerifier {
    /// Checks the next event and the hash stored with it. Events must come
    /// in sequence order starting at 1; the first one that is missing, out
    /// of order, unhashed or mismatched is the error, and after an error the
    /// verifier's state is unchanged (it still expects the same sequence).
    pub fn feed(
        &mut self,
        event: &Event,
        stored_hash: Option<&[u8; 32]>,
    ) -> Result<(), ChainBreak> {
        if event.sequence != self.next_sequence {
            return Err(if event.sequence > self.next_sequence {
                ChainBreak::Missing(self.next_sequence)
            } else {
                ChainBreak::Mismatch(event.sequence)
            });
        }
        let stored = stored_hash.ok_or(ChainBreak::Unhashed(event.sequence))?;
        let expected = chain_hash(&self.previous, event);
        if &expected != stored {
            return Err(ChainBreak::Mismatch(event.sequence));
        }
        self.previous = expected;
        self.next_sequence += 1;
        Ok(())
    }

    /// How many events have been verified.
    pub fn verified(&self) -> i64 {
        self.next_sequence - 1
    }
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;
    use uuid::Uuid;

    use super::*;
    use crate::event::EventKind;

    fn chain(n: i64) -> Vec<(Event, [u8; 32])> {
        let mut previous = GENESIS;
        (1..=n)
            .map(|sequence| {
                let e = Event {
                    sequence,
                    kind: EventKind::Created,
                    key_id: Uuid::new_v4(),
                    organization_id: Some("org_1".into()),
                    actor: "bootstrap".into(),
                    at: DateTime::from_timestamp(1_800_000_000 + sequence, 0).unwrap(),
                    reason: String::new(),
                    details: if sequence % 2 == 0 {
                        format!("name=\"k{sequence}\"")
                    } else {
                        String::new()
                    },
                    hash: None,
                };
                previous = chain_hash(&previous, &e);
                (e, previous)
            })
            .collect()
    }

    fn verify(events: &[(Event, [u8; 32])]) -> Result<i64, ChainBreak> {
        let mut v = ChainVerifier::default();
        for (e, h) in events {
            v.feed(e, Some(h))?;
        }
        Ok(v.verified())
    }

    /// Events from before details existed keep the hash they were given.
    #[test]
    fn an_event_without_details_hashes_as_it_did_before_details() {
        let e = Event {
            sequence: 7,
            kind: EventKind::Revoked,
            key_id: Uuid::parse_str("6f1c1a52-1f0b-4f5e-9a51-2d1b6d0c8e11").unwrap(),
            organization_id: Some("org_1".into()),
            actor: "bootstrap".into(),
            at: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            reason: "leaked".into(),
            details: String::new(),
            hash: None,
        };
        // Computed with the v1 encoding, before the details field was added.
        let mut h = Sha256::new();
        h.update(b"keygate-audit-v1");
        h.update(GENESIS);
        h.update(7i64.to_be_bytes());
        for field in [
            "revoked",
            "6f1c1a52-1f0b-4f5e-9a51-2d1b6d0c8e11",
            "org_1",
            "bootstrap",
            "leaked",
        ] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field.as_bytes());
        }
        h.update([1u8]);
        h.update(e.at.timestamp_micros().to_be_bytes());
        let before: [u8; 32] = h.finalize().into();
        assert_eq!(chain_hash(&GENESIS, &e), before);
    }

    #[test]
    fn an_untouched_chain_verifies() {
        assert_eq!(verify(&chain(5)), Ok(5));
    }

    #[test]
    fn edits_deletions_and_reorderings_name_the_first_bad_row() {
        let mut edited = chain(5);
        edited[2].0.reason = "tampered".into();
        assert_eq!(verify(&edited), Err(ChainBreak::Mismatch(3)));

        let mut edited = chain(5);
        edited[1].0.details = "name=\"other\"".into();
        assert_eq!(verify(&edited), Err(ChainBreak::Mismatch(2)));
        let mut added = chain(5);
        added[2].0.details = "scopes=*:*".into();
        assert_eq!(verify(&added), Err(ChainBreak::Mismatch(3)));

        let mut deleted = chain(5);
        deleted.remove(1);
        assert_eq!(verify(&deleted), Err(ChainBreak::Missing(2)));

        let mut swapped = chain(5);
        let (a, b) = (swapped[3].0.sequence, swapped[4].0.sequence);
        swapped[3].0.sequence = b;
        swapped[4].0.sequence = a;
        swapped.swap(3, 4);
        assert_eq!(verify(&swapped), Err(ChainBreak::Mismatch(4)));
    }
}
