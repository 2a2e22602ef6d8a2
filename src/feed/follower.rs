//! Following the log: read every event after the applied position, apply it
//! to the cache and the key-id index, publish it to Watch sessions.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{BATCH, Feed};
use crate::store::StoreError;

/// Shortest time between two reads of the log that lookups asked for. It
/// bounds what a flood of tokens for unknown ids costs the store (at most
/// 200 indexed reads of the log a second, however big the flood) and what
/// each of them waits (a few ms). At 20 ms, 128 closed-loop callers got a
/// quarter of cached Authorize's throughput; at 5 ms the wait no longer
/// bounds it (BENCHMARKS.md, scenario 3).
const READ_WANTED_GAP: Duration = Duration::from_millis(5);

impl Feed {
    /// Follows the log until `shutdown`: at every wake-up of the store, every
    /// lookup's request for a fresh read, and at least every poll interval.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let changes = self.follower.changes();
        let mut read_at = tokio::time::Instant::now();
        loop {
            self.cache.report_size();
            // In touch as of when the read began: what it returns may be
            // that old, however long it took.
            let read = self.freshness.begin_read();
            let read_began = tokio::time::Instant::now();
            match self.catch_up().await {
                Ok(()) => {
                    self.freshness.read_succeeded(read);
                    read_at = tokio::time::Instant::now();
                    self.metrics.lag_seconds.set(0.0);
                    self.metrics.applied.set(self.applied() as f64);
                    self.recorder.applied(self.applied()).await;
                }
                Err(e) => {
                    self.metrics
                        .lag_seconds
                        .set(read_at.elapsed().as_secs_f64());
                    tracing::warn!(error = %e, applied = self.applied(), "cannot read the event log")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = changes.changed() => {}
                // Lookups for ids the key-id index lacks: at most one read
                // per READ_WANTED_GAP for all of them, however many.
                () = self.freshness.read_wanted() => {
                    tokio::time::sleep_until(read_began + READ_WANTED_GAP).await;
                }
                () = tokio::time::sleep(self.settings.poll_interval) => {}
            }
        }
    }

    /// Applies every event after the applied position: invalidate (and keep
    /// the key-id index current), then publish.
    async fn catch_up(&self) -> Result<(), StoreError> {
        loop {
            let batch = self.follower.events_after(self.applied(), BATCH).await?;
            let done = batch.len() < BATCH as usize;
            for event in batch {
                self.cache.apply(event.kind, event.key_id);
                // Applied and published as one step (see `publishing`): a
                // Watch starting in between would otherwise count the event
                // as sent without ever receiving it.
                let _publishing = self
                    .publishing
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                self.applied.store(event.sequence, Ordering::Release);
                let _ = self.events.send(Arc::new(event));
            }
            if done {
                return Ok(());
            }
        }
    }
}
