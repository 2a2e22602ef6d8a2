//! The revocation feed: this replica follows the event log, invalidates its
//! cache for every event, and fans the events out to its Watch subscribers.
//!
//! The log in the store is the only source of truth. On PostgreSQL a NOTIFY
//! wakes every replica, and a local write wakes this one, but a wake-up only
//! says "read the log": the follower reads the events by sequence, and also
//! polls, so a lost notification or a reconnect loses nothing. Every
//! successful read marks the replica fresh; one that cannot read the log for
//! longer than max-staleness stops answering from its cache (see `Freshness`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::Utc;
use keygate_core::event::Event;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cache::{Freshness, KeyCache};
use crate::error::Error;
use crate::store::{KeyStore, ReplicaStatus, StoreError, postgres};
use crate::telemetry::FeedMetrics;

/// Counts a Watch subscriber out however its session ends.
struct DecrementOnDrop(metrics::Gauge);

impl Drop for DecrementOnDrop {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// How the feed follows the log and talks to subscribers.
#[derive(Debug, Clone)]
pub struct FeedSettings {
    /// Longest wait between two reads of the log, notification or not.
    pub poll_interval: Duration,
    /// How often Watch streams get a HEARTBEAT.
    pub heartbeat: Duration,
    /// How often this replica records its position in the store. A replica
    /// is live (counted by `confirm`) until its last record is older than
    /// max-staleness plus one heartbeat plus one poll interval: by then it
    /// has stopped answering from its cache (see `Feed::live_window`).
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

/// A replica as ListReplicas shows it.
#[derive(Debug, Clone)]
pub struct ReplicaView {
    pub status: ReplicaStatus,
    pub lag: i64,
    pub live: bool,
}

const BATCH: u32 = 500;

/// Shortest time between two reads of the log that lookups asked for.
const READ_WANTED_GAP: Duration = Duration::from_millis(20);

pub struct Feed {
    metrics: FeedMetrics,
    store: Arc<dyn KeyStore>,
    /// The store over the feed's own connections: following the log and
    /// recording heartbeats never wait behind Authorize's reads.
    follower: Arc<dyn KeyStore>,
    cache: Arc<KeyCache>,
    freshness: Arc<Freshness>,
    applied: AtomicI64,
    events: broadcast::Sender<Arc<Event>>,
    /// Held around "advance `applied`, then publish" and around "subscribe,
    /// then read `applied`", so a new subscription sees each event either
    /// live or as before its start, never neither. Never held across an await.
    publishing: std::sync::Mutex<()>,
    wake: Arc<Notify>,
    replica_id: Uuid,
    listen_url: Option<String>,
    settings: FeedSettings,
}

impl Feed {
    /// A feed positioned at the log's head: the cache starts empty, so
    /// nothing before now needs applying.
    pub async fn new(
        store: Arc<dyn KeyStore>,
        follower: Arc<dyn KeyStore>,
        cache: Arc<KeyCache>,
        freshness: Arc<Freshness>,
        listen_url: Option<String>,
        settings: FeedSettings,
    ) -> Result<Self, StoreError> {
        let read = freshness.begin_read();
        let head = follower.head_sequence().await?;
        freshness.touch(read);
        Ok(Self {
            metrics: FeedMetrics::default(),
            store,
            follower,
            cache,
            freshness,
            applied: AtomicI64::new(head),
            events: broadcast::channel(4096).0,
            publishing: std::sync::Mutex::new(()),
            wake: Arc::new(Notify::new()),
            replica_id: Uuid::new_v4(),
            listen_url,
            settings,
        })
    }

    /// Notified after a local write, to read the log at once.
    pub fn wake_handle(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// The highest sequence this replica has applied.
    pub fn applied(&self) -> i64 {
        self.applied.load(Ordering::Acquire)
    }

    pub fn replica_id(&self) -> Uuid {
        self.replica_id
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

    /// Follows the log until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if let Some(url) = self.listen_url.clone() {
            tokio::spawn(listen(url, self.wake.clone(), shutdown.clone()));
        }
        let mut recorded_at: Option<tokio::time::Instant> = None;
        let mut recorded_seq = -1;
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
                    let due = recorded_at
                        .is_none_or(|at| at.elapsed() >= self.settings.replica_heartbeat);
                    if due || recorded_seq != self.applied() {
                        recorded_seq = self.applied();
                        match self.record().await {
                            Ok(()) => recorded_at = Some(tokio::time::Instant::now()),
                            Err(e) => {
                                tracing::warn!(error = %e, "could not record this replica's position")
                            }
                        }
                    }
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
                () = self.wake.notified() => {}
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

    async fn record(&self) -> Result<(), StoreError> {
        self.follower
            .record_replica(&ReplicaStatus {
                replica_id: self.replica_id,
                name: self.settings.name.clone(),
                applied_sequence: self.applied(),
                heartbeat_at: Utc::now(),
            })
            .await
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
        self.freshness.max_staleness()
            + self.settings.replica_heartbeat
            + self.settings.poll_interval
    }

    /// Every recorded replica with its lag behind the log's head.
    pub async fn replicas(&self) -> Result<(Vec<ReplicaView>, i64), Error> {
        let head = self.store.head_sequence().await?;
        let now = Utc::now();
        let window =
            chrono::Duration::from_std(self.live_window()).unwrap_or(chrono::Duration::MAX);
        let views = self
            .store
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
        self.wake.notify_one();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (replicas, _) = self.replicas().await?;
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

    /// One Watch session: replay after `after`, then live events, with
    /// heartbeats, until the subscriber leaves or `shutdown`. With `after` 0
    /// it starts at the subscription's head: what was applied before
    /// [`Feed::subscribe`] returned is not sent, everything after is.
    pub async fn watch(
        self: Arc<Self>,
        after: i64,
        subscription: Subscription,
        sink: mpsc::Sender<FeedItem>,
        shutdown: CancellationToken,
    ) {
        self.metrics.subscribers.increment(1.0);
        let _leave = DecrementOnDrop(self.metrics.subscribers.clone());
        let Subscription { mut live, head } = subscription;
        let mut last = head;
        let start = async {
            let store_head = self.store.head_sequence().await?;
            if after != 0
                && (after > store_head || head.saturating_sub(after) > self.settings.max_replay)
            {
                // A position from another log, or too old to replay.
                sink.send(FeedItem::Reset(head)).await.ok();
            } else if after != 0 {
                last = after;
                self.replay(&mut last, head, &sink).await?;
            }
            Ok::<_, StoreError>(())
        };
        if let Err(e) = start.await {
            tracing::warn!(error = %e, "watch could not replay");
            sink.send(FeedItem::Closing(last)).await.ok();
            return;
        }
        let mut beat = tokio::time::interval_at(
            tokio::time::Instant::now() + self.settings.heartbeat,
            self.settings.heartbeat,
        );
        loop {
            let item = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    sink.send(FeedItem::Closing(last)).await.ok();
                    return;
                }
                () = sink.closed() => return,
                received = live.recv() => match received {
                    Ok(event) if event.sequence > last => {
                        last = event.sequence;
                        FeedItem::Event(event)
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Too slow for the in-memory ring: read what was missed from the log.
                        let upto = self.applied();
                        if let Err(e) = self.replay(&mut last, upto, &sink).await {
                            tracing::warn!(error = %e, "watch could not catch up");
                            sink.send(FeedItem::Closing(last)).await.ok();
                            return;
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => FeedItem::Closing(last),
                },
                _ = beat.tick() => FeedItem::Heartbeat(last),
            };
            let closing = matches!(item, FeedItem::Closing(_));
            if sink.send(item).await.is_err() || closing {
                return;
            }
        }
    }

    /// Sends the logged events in (last, upto] and advances `last`.
    async fn replay(
        &self,
        last: &mut i64,
        upto: i64,
        sink: &mpsc::Sender<FeedItem>,
    ) -> Result<(), StoreError> {
        while *last < upto {
            let batch = self.store.events_after(*last, BATCH).await?;
            if batch.is_empty() {
                break;
            }
            for event in batch.into_iter().take_while(|e| e.sequence <= upto) {
                *last = event.sequence;
                if sink.send(FeedItem::Event(Arc::new(event))).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// LISTENs for new events on PostgreSQL and wakes the follower; reconnects
/// forever. After every (re)connect it wakes the follower too, which then
/// catches up on whatever happened while the connection was down.
async fn listen(url: String, wake: Arc<Notify>, shutdown: CancellationToken) {
    let url = with_application_name(&url, "keygate-listener");
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let connected = async {
            let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
            listener.listen(postgres::EVENTS_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = match connected.await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN for events; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        wake.notify_one();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => wake.notify_one(),
                    // The connection dropped; the next try_recv reconnects.
                    // Notifications sent meanwhile are lost, so catch up.
                    Ok(None) => wake.notify_one(),
                    Err(e) => {
                        tracing::warn!(error = %e, "event listener failed; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}

fn with_application_name(url: &str, name: &str) -> String {
    if url.contains("application_name=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&application_name={name}")
    } else {
        format!("{url}?application_name={name}")
    }
}
