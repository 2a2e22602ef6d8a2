//! Watch sessions: each subscriber gets a replay from its position, then the
//! live events, with heartbeats; one that falls behind the in-memory ring is
//! caught up from the log.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::{BATCH, Feed, FeedItem, Subscription};
use crate::store::StoreError;

/// Counts a Watch subscriber out however its session ends.
struct DecrementOnDrop(metrics::Gauge);

impl Drop for DecrementOnDrop {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl Feed {
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
        // A Watch from now (`after` 0) reads nothing from the store: its
        // first event must not wait behind a query (nor a new pool
        // connection), which once held the first revocation after 100
        // streams opened for ~100 ms.
        let start = async {
            if after == 0 {
                return Ok(());
            }
            let store_head = self.log.head_sequence().await?;
            if after > store_head || head.saturating_sub(after) > self.settings.max_replay {
                // A position from another log, or too old to replay.
                sink.send(FeedItem::Reset(head)).await.ok();
            } else {
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
            let batch = self.log.events_after(*last, BATCH).await?;
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
