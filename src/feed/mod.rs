//! The revocation feed: this replica follows the event log
//! (`follower`: invalidates its cache for every event) and fans the events
//! out to its Watch subscribers (`session`).
//!
//! The log in the store is the only source of truth. The store's wake-ups
//! ([`crate::store::Changes`]) only say "read the log": the follower reads
//! the events by sequence, and also polls, so a lost wake-up or a reconnect
//! loses nothing. Every successful read marks the replica fresh; one that
//! cannot read the log for longer than max-staleness stops answering from
//! its cache (see `Freshness`). Who has applied what across replicas is
//! `service::replicas`.

mod follower;
mod session;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use keygate_core::event::Event;
use tokio::sync::broadcast;

use crate::cache::{Freshness, KeyCache};
use crate::store::{EventLog, StoreError};
use crate::telemetry::FeedMetrics;

/// How the feed follows the log and talks to subscribers.
#[derive(Debug, Clone)]
pub struct FeedSettings {
    /// Longest wait between two reads of the log, notification or not.
    pub poll_interval: Duration,
    /// How often Watch streams get a HEARTBEAT.
    pub heartbeat: Duration,
    /// How often this replica records its position in the store (see
    /// `service::replicas::Replicas::live_window`).
    pub replica_heartbeat: Duration,
    /// The furthest back a Watch can resume; older positions get RESET.
    pub max_replay: i64,
    /// This replica's name in ListReplicas, e.g. host:port.
    pub name: String,
}

impl Default for FeedSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            heartbeat: Duration::from_secs(5),
            replica_heartbeat: Duration::from_secs(2),
            max_replay: 100_000,
            name: "keygate".into(),
        }
    }
}

/// What a Watch session hands to its transport.
#[derive(Debug, Clone)]
pub enum FeedItem {
    /// The next event in sequence order.
    Event(Arc<Event>),
    /// Nothing new; everything up to this sequence has been sent.
    Heartbeat(i64),
    /// The requested position cannot be replayed; continue from this sequence.
    Reset(i64),
    /// The stream ends (shutdown, or the log became unreadable); resume after this sequence.
    Closing(i64),
}

/// A Watch subscription, taken when the RPC arrives: live events and the
/// applied position they follow, read together.
#[derive(Debug)]
pub struct Subscription {
    live: broadcast::Receiver<Arc<Event>>,
    head: i64,
}

/// Most events read from the log at once.
const BATCH: u32 = 500;

/// This replica's view of the event log: what it has applied, and the live
/// events for its Watch sessions.
pub struct Feed {
    metrics: FeedMetrics,
    /// The log for Watch replays.
    log: Arc<dyn EventLog>,
    /// The log over the feed's own connections: following it never waits
    /// behind Authorize's reads.
    follower: Arc<dyn EventLog>,
    cache: Arc<KeyCache>,
    freshness: Arc<Freshness>,
    applied: AtomicI64,
    events: broadcast::Sender<Arc<Event>>,
    /// Held around "advance `applied`, then publish" and around "subscribe,
    /// then read `applied`", so a new subscription sees each event either
    /// live or as before its start, never neither. Never held across an await.
    publishing: std::sync::Mutex<()>,
    /// Told the applied position after every successful read.
    recorder: Arc<dyn PositionRecorder>,
    settings: FeedSettings,
}

/// Where the follower reports how far it has applied the log, after every
/// successful read and before the next one begins (so a replica that cannot
/// report also stops reading, and goes stale, rather than read on unseen).
#[async_trait::async_trait]
pub trait PositionRecorder: Send + Sync + 'static {
    /// Everything up to `applied` has been applied to this replica's cache.
    async fn applied(&self, applied: i64);
}

impl Feed {
    /// A feed positioned at the log's head: the cache starts empty, so
    /// nothing before now needs applying.
    pub async fn new(
        log: Arc<dyn EventLog>,
        follower: Arc<dyn EventLog>,
        cache: Arc<KeyCache>,
        freshness: Arc<Freshness>,
        recorder: Arc<dyn PositionRecorder>,
        settings: FeedSettings,
    ) -> Result<Self, StoreError> {
        let read = freshness.begin_read();
        let head = follower.head_sequence().await?;
        freshness.touch(read);
        Ok(Self {
            metrics: FeedMetrics::default(),
            log,
            follower,
            cache,
            freshness,
            applied: AtomicI64::new(head),
            events: broadcast::channel(4096).0,
            publishing: std::sync::Mutex::new(()),
            recorder,
            settings,
        })
    }

    /// The feed's settings.
    pub fn settings(&self) -> &FeedSettings {
        &self.settings
    }

    /// The highest sequence this replica has applied.
    pub fn applied(&self) -> i64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Live events from now on, and the applied position they start after:
    /// every event above `head` arrives on `live`.
    pub fn subscribe(&self) -> Subscription {
        let _publishing = self
            .publishing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Subscription {
            live: self.events.subscribe(),
            head: self.applied(),
        }
    }
}
