//! Which key ids exist, in memory: a well-formed token whose key id is not a
//! key is refused without a store read, so made-up tokens (the format and
//! its checksum are public) cannot set the store's load.
//!
//! The index starts empty and not loaded; until it is loaded, and whenever
//! the replica is out of touch with the event log, the cache ignores it and
//! asks the store as before. Three writers keep it current:
//!
//! - the revocation feed applies every CREATED (insert) and DELETED (remove)
//!   event it reads, from the position it took at start on;
//! - `KeyService` inserts a key it creates before the token is returned, and
//!   removes one it deletes, so this replica knows its own changes at once;
//! - the bulk load pages through every key id in the store, once, after start.
//!
//! Why a loaded index has no false negatives (an existing key missing), given
//! that ids are random and never reused, and the feed took its position (the
//! log's head) before the load began. Take a key that exists once the load is
//! done:
//!
//! - created at or before that head: its row was committed before the load
//!   began (sequences are assigned in commit order), so the page covering its
//!   id saw it unless it was deleted meanwhile, and then it does not exist;
//! - created after that head: its CREATED event is after the feed's
//!   position, so the feed inserts it when it reads the event, wherever the
//!   load's cursor was. Until then the id is missing here, as on any replica
//!   for a key created elsewhere a moment ago: that is why a lookup for a
//!   missing id first waits for one read of the log that began after it
//!   arrived (`Freshness::read_since_now`) before it is refused, unless the
//!   id lacks the tag every id keygate makes carries
//!   ([`KeyIds`](keygate_core::key_id::KeyIds)): keys created after the
//!   load were all made with a tag, so such an id is forged.
//!
//! Removals only follow DELETED events (or a local delete), after which the
//! key does not exist. A page read before a deletion and inserted after the
//! feed removed the id leaves a false positive: that id costs one store read
//! (then the negative cache), which is acceptable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dashmap::DashSet;
use keygate_core::event::EventKind;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::{KeyStore, StoreError};

/// Key ids read per query by the bulk load.
pub const LOAD_PAGE: u32 = 10_000;

/// Every existing key id, once loaded (see the module documentation).
#[derive(Debug, Default)]
pub struct KeyIndex {
    ids: DashSet<Uuid>,
    loaded: AtomicBool,
}

impl KeyIndex {
    /// Empty and not loaded: it refuses nothing until [`KeyIndex::load`] ends.
    pub fn new() -> Self {
        Self::default()
    }

    /// True only when the index is loaded and `id` is certainly no key.
    /// No I/O, no allocation.
    pub fn refuses(&self, id: Uuid) -> bool {
        self.loaded.load(Ordering::Acquire) && !self.ids.contains(&id)
    }

    /// Whether the bulk load has finished.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// How many ids are held.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no ids are held (true before the load, or with no keys).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// A key with this id now exists.
    pub fn insert(&self, id: Uuid) {
        self.ids.insert(id);
    }

    /// The key with this id no longer exists.
    pub fn remove(&self, id: Uuid) {
        self.ids.remove(&id);
    }

    /// Applies one event of the log: CREATED inserts, DELETED removes, the
    /// rest change no key's existence.
    pub fn apply(&self, kind: EventKind, id: Uuid) {
        match kind {
            EventKind::Created => self.insert(id),
            EventKind::Deleted => self.remove(id),
            _ => {}
        }
    }

    /// Reads every key id from `store` in pages of `page` and marks the
    /// index loaded; returns how many ids were read. Must start after the
    /// feed has taken its position in the log (see the module documentation).
    pub async fn load(&self, store: &dyn KeyStore, page: u32) -> Result<usize, StoreError> {
        let mut after = None;
        let mut read = 0;
        loop {
            let ids = store.key_ids_after(after, page.max(1)).await?;
            read += ids.len();
            let done = ids.len() < page.max(1) as usize;
            after = ids.last().copied().or(after);
            for id in ids {
                self.ids.insert(id);
            }
            if done {
                break;
            }
        }
        self.loaded.store(true, Ordering::Release);
        Ok(read)
    }

    /// Loads the index, retrying with backoff until it succeeds or `shutdown`.
    /// Meanwhile the replica serves as if there were no index.
    pub async fn load_until_done(
        &self,
        store: &dyn KeyStore,
        page: u32,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            let started = std::time::Instant::now();
            match self.load(store, page).await {
                Ok(read) => {
                    tracing::info!(keys = read, elapsed = ?started.elapsed(), "key-id index loaded");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot load the key-id index; retrying")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_only_once_loaded_and_only_unknown_ids() {
        let index = KeyIndex::new();
        let (known, unknown) = (Uuid::new_v4(), Uuid::new_v4());
        index.apply(EventKind::Created, known);
        assert!(!index.refuses(unknown), "not loaded: refuses nothing");
        index.loaded.store(true, Ordering::Release);
        assert!(index.refuses(unknown));
        assert!(!index.refuses(known));
        index.apply(EventKind::Revoked, known);
        assert!(!index.refuses(known), "a revoked key still exists");
        index.apply(EventKind::Deleted, known);
        assert!(index.refuses(known));
    }

    /// Resident memory for 1,000,000 ids (quoted in the README). Run alone:
    /// `cargo test --release --lib index::tests::memory -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement; prints the index's memory at 1M keys"]
    fn memory_at_one_million_ids() {
        fn rss_bytes() -> u64 {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
            let pages: u64 = statm
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            pages * 4096
        }
        let before = rss_bytes();
        let index = KeyIndex::new();
        for _ in 0..1_000_000 {
            index.insert(Uuid::new_v4());
        }
        let after = rss_bytes();
        let table = index.ids.capacity() * (std::mem::size_of::<Uuid>() + 1);
        println!(
            "1M ids: resident +{:.1} MiB, table {:.1} MiB ({} slots)",
            (after - before) as f64 / 1_048_576.0,
            table as f64 / 1_048_576.0,
            index.ids.capacity()
        );
        assert_eq!(index.len(), 1_000_000);
    }
}
