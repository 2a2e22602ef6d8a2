//! Who has applied what: every replica records its position in the store,
//! ListReplicas shows them, and a write that asks to wait is confirmed once
//! every live replica has applied its event.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;

use crate::error::Error;
use crate::feed::{FeedSettings, PositionRecorder};
use crate::store::{EventLog, ReplicaRegistry, ReplicaStatus};

/// A replica as ListReplicas shows it.
#[derive(Debug, Clone)]
pub struct ReplicaView {
    /// Its row in the store.
    pub status: ReplicaStatus,
    /// Events behind the log's head (0 when caught up).
    pub lag: i64,
    /// Whether its heartbeat is within [`Replicas::live_window`]: it may be
    /// answering from its cache, so confirmations wait for it.
    pub live: bool,
}

/// This replica's entry in the registry, and everyone's.
pub struct Replicas {
    /// For ListReplicas and confirmations.
    registry: Arc<dyn ReplicaRegistry>,
    /// For this replica's own heartbeats, on the feed's connections, so they
    /// never wait behind Authorize's reads.
    recorder: Arc<dyn ReplicaRegistry>,
    log: Arc<dyn EventLog>,
    replica_id: Uuid,
    name: String,
    heartbeat: Duration,
    live_window: Duration,
    /// When this replica last recorded itself, and at which position.
    recorded: Mutex<Option<(tokio::time::Instant, i64)>>,
}

impl Replicas {
    /// A new replica (every start is one) named `settings.name`, answering
    /// from its cache while it is at most `max_staleness` out of touch.
    pub fn new(
        registry: Arc<dyn ReplicaRegistry>,
        recorder: Arc<dyn ReplicaRegistry>,
        log: Arc<dyn EventLog>,
        max_staleness: Duration,
        settings: &FeedSettings,
    ) -> Self {
        Self {
            registry,
            recorder,
            log,
            replica_id: Uuid::new_v4(),
            name: settings.name.clone(),
            heartbeat: settings.replica_heartbeat,
            live_window: max_staleness + settings.replica_heartbeat + settings.poll_interval,
            recorded: Mutex::new(None),
        }
    }

    /// This replica's id in the registry.
    pub fn replica_id(&self) -> Uuid {
        self.replica_id
    }

    /// How long after its last heartbeat a replica still counts as live.
    ///
    /// A replica answers from its cache until max-staleness has passed since
    /// the start of its last successful read of the log. It records a
    /// heartbeat after a successful read once `replica_heartbeat` has passed
    /// since the previous one, and reads at least every poll interval; so
    /// that last read began at most one heartbeat plus one poll interval
    /// after its last recorded heartbeat. A replica whose heartbeat is older
    /// than this window has failed closed, and one that is younger may still
    /// allow what it has not applied: confirmation must wait for it.
    /// Replicas are assumed to share these three settings, and their clocks
    /// to agree (the heartbeat is the replica's own wall-clock time).
    pub fn live_window(&self) -> Duration {
        self.live_window
    }

    /// Every recorded replica with its lag behind the log's head.
    pub async fn list(&self) -> Result<(Vec<ReplicaView>, i64), Error> {
        let head = self.log.head_sequence().await?;
        let now = Utc::now();
        let window =
            chrono::Duration::from_std(self.live_window()).unwrap_or(chrono::Duration::MAX);
        let views = self
            .registry
            .list_replicas()
            .await?
            .into_iter()
            .map(|status| ReplicaView {
                lag: (head - status.applied_sequence).max(0),
                live: now - status.heartbeat_at <= window,
                status,
            })
            .collect();
        Ok((views, head))
    }

    /// Waits until every live replica has applied `sequence`; returns how many
    /// confirmed, or names the laggards once `timeout` has passed.
    pub async fn confirm(&self, sequence: i64, timeout: Duration) -> Result<u32, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (replicas, _) = self.list().await?;
            let live: Vec<_> = replicas.iter().filter(|r| r.live).collect();
            let lagging: Vec<_> = live
                .iter()
                .filter(|r| r.status.applied_sequence < sequence)
                .collect();
            if lagging.is_empty() {
                return Ok(u32::try_from(live.len()).unwrap_or(u32::MAX));
            }
            if tokio::time::Instant::now() >= deadline {
                let names = lagging
                    .iter()
                    .map(|r| {
                        format!(
                            "{} ({}) at {}",
                            r.status.name, r.status.replica_id, r.status.applied_sequence
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(Error::ReplicasLagging(format!(
                    "{} of {} live replicas did not apply event {sequence} within {timeout:?}: {names}; the change itself is in force",
                    lagging.len(),
                    live.len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[async_trait::async_trait]
impl PositionRecorder for Replicas {
    /// Records this replica's position when it moved, or when a heartbeat is
    /// due; a failure is logged and retried after the next read.
    async fn applied(&self, applied: i64) {
        let last = *self.recorded.lock().unwrap_or_else(PoisonError::into_inner);
        let due =
            last.is_none_or(|(at, position)| position != applied || at.elapsed() >= self.heartbeat);
        if !due {
            return;
        }
        let status = ReplicaStatus {
            replica_id: self.replica_id,
            name: self.name.clone(),
            applied_sequence: applied,
            heartbeat_at: Utc::now(),
        };
        match self.recorder.record_replica(&status).await {
            Ok(()) => {
                *self.recorded.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some((tokio::time::Instant::now(), applied));
            }
            Err(e) => tracing::warn!(error = %e, "could not record this replica's position"),
        }
    }
}
