//! Watch sessions as a caller holds them: a bounded number per key, each
//! ending as soon as the credential it was opened with would no longer
//! authenticate (revoked, disabled, deleted, expired, rotated away; for a
//! JWT, past its `exp` or its issuer's key gone).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use keygate_core::decision::{self, DenyReason};
use keygate_core::scope::Scope;
use keygate_core::token::{Credential, ParsedToken};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Authorizer, Caller};
use crate::error::Error;
use crate::feed::{Feed, FeedItem};
use crate::jwt::{Refused, VerifiedJwt};

/// What a session keeps of the credential it was opened with.
enum Kept {
    /// An API key: its id, prefix and secret digest.
    Key(Credential),
    /// A verified JWT.
    Jwt(Arc<VerifiedJwt>),
}

impl Kept {
    /// The id its Watch streams are counted under, and whose events make
    /// the session check the credential at once.
    fn id(&self) -> Uuid {
        match self {
            Kept::Key(c) => c.key_id,
            Kept::Jwt(jwt) => jwt.key.id,
        }
    }
}

/// Opens Watch sessions and counts them per calling key.
pub struct Watchers {
    authorizer: Arc<Authorizer>,
    feed: Arc<Feed>,
    max_per_key: usize,
    recheck_every: Duration,
    open: Arc<Mutex<HashMap<Uuid, usize>>>,
}

impl Watchers {
    /// At most `max_per_key` sessions per calling key; each re-checks its
    /// credential twice per `heartbeat`, so a lost credential ends it within one.
    pub fn new(
        authorizer: Arc<Authorizer>,
        feed: Arc<Feed>,
        max_per_key: usize,
        heartbeat: Duration,
    ) -> Self {
        Self {
            authorizer,
            feed,
            max_per_key,
            recheck_every: (heartbeat / 2).max(Duration::from_millis(10)),
            open: Arc::default(),
        }
    }

    /// Starts a session for an authenticated `caller` who presented `token`
    /// from `peer`, replaying after `after`. RESOURCE_EXHAUSTED when the
    /// caller's key already has its maximum of sessions open.
    pub fn open(
        &self,
        caller: Caller,
        token: &str,
        peer: Option<IpAddr>,
        after: i64,
        read: Scope,
        shutdown: CancellationToken,
    ) -> Result<WatchSession, Error> {
        let credential = match caller.jwt() {
            Some(jwt) => Kept::Jwt(jwt.clone()),
            None => Kept::Key(
                ParsedToken::parse(token)
                    .map_err(|_| Error::Denied(DenyReason::InvalidToken))?
                    .credential(),
            ),
        };
        let slot = self.claim(credential.id())?;
        let (tx, rx) = mpsc::channel(256);
        // Subscribe before the session reads the head, so nothing falls in between.
        let live = self.feed.subscribe();
        tokio::spawn(self.feed.clone().watch(after, live, tx, shutdown));
        let mut recheck = tokio::time::interval_at(
            tokio::time::Instant::now() + self.recheck_every,
            self.recheck_every,
        );
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(WatchSession {
            items: rx,
            authorizer: self.authorizer.clone(),
            caller,
            credential,
            peer,
            read,
            recheck,
            period: self.recheck_every,
            ended: false,
            _slot: slot,
        })
    }

    fn claim(&self, key_id: Uuid) -> Result<WatchSlot, Error> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key_id).or_insert(0);
        if *count >= self.max_per_key {
            return Err(Error::ResourceExhausted(format!(
                "this key already has {} Watch streams open, the most one key may hold; close one first",
                self.max_per_key
            )));
        }
        *count += 1;
        Ok(WatchSlot {
            key_id,
            open: self.open.clone(),
        })
    }
}

/// One of a key's Watch slots, given back when the session ends.
struct WatchSlot {
    key_id: Uuid,
    open: Arc<Mutex<HashMap<Uuid, usize>>>,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key_id) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key_id);
            }
        }
    }
}

/// A running Watch: the feed's items for one subscriber, ended by an error
/// once its credential no longer authenticates.
pub struct WatchSession {
    items: mpsc::Receiver<FeedItem>,
    authorizer: Arc<Authorizer>,
    caller: Caller,
    credential: Kept,
    peer: Option<IpAddr>,
    read: Scope,
    recheck: tokio::time::Interval,
    period: Duration,
    ended: bool,
    _slot: WatchSlot,
}

impl WatchSession {
    /// The caller as of the last check, for filtering what it may see.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The next item, or the error the session ends with; `None` after the
    /// end. An event about the caller's own key is only handed out once the
    /// credential has been checked against it, so a stream never outlives
    /// its credential by more than what it takes to read the change.
    pub async fn next(&mut self) -> Option<Result<FeedItem, Error>> {
        if self.ended {
            return None;
        }
        loop {
            tokio::select! {
                item = self.items.recv() => {
                    let item = item?;
                    if matches!(&item, FeedItem::Event(e) if e.key_id == self.credential.id())
                        && let Some(e) = self.lost().await
                    {
                        return self.end(e);
                    }
                    return Some(Ok(item));
                }
                _ = self.recheck.tick() => {
                    if let Some(e) = self.lost().await {
                        return self.end(e);
                    }
                }
            }
        }
    }

    fn end(&mut self, e: Error) -> Option<Result<FeedItem, Error>> {
        self.ended = true;
        // Dropping the receiver ends the feed's side of the session.
        self.items.close();
        Some(Err(e))
    }

    /// Why the session must end, if it must. Only a definite answer ends it:
    /// a store that fails or is slow to answer (beyond one re-check period)
    /// leaves the stream running and the question for the next check, so an
    /// outage neither ends every stream nor holds back their events.
    async fn lost(&mut self) -> Option<Error> {
        match tokio::time::timeout(self.period, self.recheck()).await {
            Ok(Ok(())) => None,
            Ok(Err(Error::Store(e))) => {
                tracing::warn!(error = %e, key_id = %self.credential.id(), "could not re-check a Watch credential; will retry");
                None
            }
            Ok(Err(e)) => Some(e),
            Err(_) => {
                tracing::warn!(key_id = %self.credential.id(), "re-checking a Watch credential timed out; will retry");
                None
            }
        }
    }

    /// What opening the stream checked, again: the credential, the key's IP
    /// allow-list against the peer, and the read scope.
    async fn recheck(&mut self) -> Result<(), Error> {
        let credential = match &self.credential {
            Kept::Key(credential) => credential,
            Kept::Jwt(jwt) => {
                return self.authorizer.jwt().still_valid(jwt).map_err(|e| match e {
                    Refused::Denied(reason) => Error::Denied(reason),
                    Refused::Unavailable(issuer) => Error::KeysUnavailable(issuer),
                });
            }
        };
        let key = self
            .authorizer
            .reauthenticate(credential)
            .await?
            .map_err(Error::Denied)?;
        if !decision::ip_allowed(&key, self.peer) {
            return Err(Error::Denied(DenyReason::IpNotAllowed));
        }
        let caller = Caller::new(key);
        caller.require(&self.read)?;
        self.caller = caller;
        Ok(())
    }
}
