//! A gateway-side client: Authorize with a short cache of ALLOW decisions,
//! kept honest by the revocation feed.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use keygate_client::{CachedAuthorizer, ClientSettings};
//! use keygate_proto::v1::AuthorizeRequest;
//!
//! let channel = tonic::transport::Channel::from_static("http://127.0.0.1:50051").connect().await?;
//! // The feed credential needs revocation:read.
//! let authz = CachedAuthorizer::new(channel, "kg_live_…".into(), ClientSettings::default())?;
//! let answer = authz
//!     .authorize(AuthorizeRequest { token: "kg_live_…".into(), route: "POST /v1/checkouts".into(), ..Default::default() })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Only ALLOW answers are cached, for `ttl` at most, and only while the feed
//! is known to be alive (a message, heartbeats included, within
//! `feed_timeout`); otherwise every call goes to keygate. An event for a key
//! drops its entries at once; RESET drops everything.
//!
//! Only keys whose events the feed credential can see are cached: with an
//! ORGANIZATION credential, that organization's keys (the client asks
//! keygate once which one that is); with a SYSTEM credential, every key.
//!
//! Answers for keys whose organization has a shared rate limit are never
//! cached (`organization_rate_limit` set): only keygate counts an
//! organization's requests. Answers for JWT access tokens
//! (`credential_kind: JWT`) are never cached either: no feed event tells of a
//! JWT, and keygate alone holds its `exp` and its issuer's keys.
//!
//! Cached answers still honour the key's rate limit: the client counts every
//! ALLOW it hands out per key (on a rolling 60 s window, at the limit keygate
//! reported) and answers RATE_LIMITED itself when the key is over, so a
//! gateway lets through at most the key's limit per minute, as one keygate
//! replica would. Last-used
//! times are refreshed whenever an entry is fetched again (at least every
//! `ttl` for a key in use).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use keygate_core::clock::SystemClock;
use keygate_core::freshness::{Contact, Epoch};
use keygate_core::limits::RateLimits;
use keygate_proto::convert::std_duration;
use keygate_proto::v1::authorize_response::CredentialKind;
use keygate_proto::v1::authorizer_client::AuthorizerClient;
use keygate_proto::v1::revocation_event::Kind;
use keygate_proto::v1::revocation_feed_client::RevocationFeedClient;
use keygate_proto::v1::{
    AuthorizeRequest, AuthorizeResponse, Decision, DenyReason, KeyTier, WatchRequest,
};
use moka::sync::Cache;
use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::transport::Channel;

use crate::connection::{Credential, InvalidToken};

/// How long and how much [`CachedAuthorizer`] caches, and how long it trusts
/// a quiet feed.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Longest an ALLOW is reused.
    pub ttl: Duration,
    /// Most decisions kept.
    pub capacity: u64,
    /// Without any feed message for this long, the cache is not used.
    pub feed_timeout: Duration,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(5),
            capacity: 100_000,
            feed_timeout: Duration::from_secs(15),
        }
    }
}

#[derive(Debug)]
struct Cached {
    key_id: String,
    response: AuthorizeResponse,
}

struct Shared {
    decisions: Cache<[u8; 32], Arc<Cached>>,
    /// Bumped by every invalidation: an answer fetched across one is not cached.
    epoch: Epoch,
    /// The feed position: everything up to here has been applied.
    sequence: AtomicI64,
    /// The last feed message (heartbeats included); lost when the stream breaks.
    contact: Contact,
    /// Whose events the feed shows; unknown until keygate said.
    scope: std::sync::OnceLock<FeedScope>,
    /// Every ALLOW this client hands out, per key.
    limits: RateLimits,
}

/// The keys a feed credential hears about.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FeedScope {
    /// A SYSTEM credential: every key.
    All,
    /// An ORGANIZATION credential: that organization's keys.
    Organization(String),
}

impl FeedScope {
    fn covers(&self, answer: &AuthorizeResponse) -> bool {
        match self {
            FeedScope::All => true,
            FeedScope::Organization(org) => {
                answer.tier() == KeyTier::Organization && answer.organization_id == *org
            }
        }
    }
}

impl Shared {
    fn feed_alive(&self) -> bool {
        self.contact.is_fresh()
    }

    fn invalidate_key(&self, key_id: &str) {
        self.epoch.bump();
        let key_id = key_id.to_owned();
        // Registered before it returns: `get` never yields a matching entry afterwards.
        let _ = self
            .decisions
            .invalidate_entries_if(move |_, cached| cached.key_id == key_id);
    }

    /// Whether an ALLOW for this key may be cached: the feed is alive and
    /// would tell us if the key changed.
    fn may_cache(&self, answer: &AuthorizeResponse) -> bool {
        // An organization's shared limit is counted by keygate alone: a
        // cached answer would let the organization's keys past it.
        answer.organization_rate_limit == 0
            && answer.credential_kind() != CredentialKind::Jwt
            && self.feed_alive()
            && self.scope.get().is_some_and(|s| s.covers(answer))
    }

    /// Counts an ALLOW against the key's limit on this client; over it, the
    /// answer becomes RATE_LIMITED.
    fn count(&self, mut answer: AuthorizeResponse) -> AuthorizeResponse {
        let Ok(key_id) = uuid::Uuid::parse_str(&answer.key_id) else {
            return answer;
        };
        // 0: an unlimited key, never counted.
        let Some(limit) = std::num::NonZeroU32::new(answer.rate_limit) else {
            return answer;
        };
        let rate = self.limits.check(&key_id, limit);
        answer.rate_limit_remaining = rate.remaining.min(answer.rate_limit_remaining);
        answer.rate_limit_reset = Some(std_duration(rate.reset));
        if let Some(wait) = rate.retry_after {
            answer.set_decision(Decision::Deny);
            answer.set_reason(DenyReason::RateLimited);
            let reason = keygate_core::decision::DenyReason::RateLimited;
            answer.http_status = u32::from(reason.http_status());
            answer.message = reason.message().to_owned();
            answer.retry_after = Some(std_duration(wait));
        }
        answer
    }

    fn invalidate_all(&self) {
        self.epoch.bump();
        self.decisions.invalidate_all();
    }
}

/// Authorize with a feed-invalidated cache. Cloning shares the cache; the
/// feed follower stops when the last clone is dropped.
#[derive(Clone)]
pub struct CachedAuthorizer {
    client: AuthorizerClient<Channel>,
    shared: Arc<Shared>,
    _follower: Arc<AbortOnDrop>,
    _sweeper: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl CachedAuthorizer {
    /// Starts following the feed on `channel` with `feed_token` (which needs
    /// `revocation:read`). Must be called inside a tokio runtime.
    pub fn new(
        channel: Channel,
        feed_token: String,
        settings: ClientSettings,
    ) -> Result<Self, InvalidToken> {
        let auth = Credential::bearer(&feed_token)?;
        let shared = Arc::new(Shared {
            decisions: Cache::builder()
                .max_capacity(settings.capacity)
                .time_to_live(settings.ttl)
                .support_invalidation_closures()
                .build(),
            epoch: Epoch::default(),
            sequence: AtomicI64::new(0),
            contact: Contact::out_of_touch(settings.feed_timeout, Arc::new(SystemClock)),
            scope: std::sync::OnceLock::new(),
            // Every answer names its key's own limit; the default is unused.
            limits: RateLimits::new(Arc::new(SystemClock)),
        });
        let follower = tokio::spawn(follow(
            RevocationFeedClient::new(channel.clone()),
            AuthorizerClient::new(channel.clone()),
            feed_token,
            auth,
            shared.clone(),
        ));
        // Windows idle for a minute hold nothing: once a minute, drop them.
        let sweeping = Arc::downgrade(&shared);
        let sweeper = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                let Some(shared) = sweeping.upgrade() else {
                    return;
                };
                shared.limits.sweep();
            }
        });
        Ok(Self {
            client: AuthorizerClient::new(channel),
            shared,
            _follower: Arc::new(AbortOnDrop(follower)),
            _sweeper: Arc::new(AbortOnDrop(sweeper)),
        })
    }

    /// Whether the feed is alive, so cached answers are being used.
    pub fn feed_alive(&self) -> bool {
        self.shared.feed_alive()
    }

    /// The feed position applied so far.
    pub fn sequence(&self) -> i64 {
        self.shared.sequence.load(Ordering::Acquire)
    }

    /// Keygate's answer, from the cache when a fresh ALLOW for exactly this
    /// request is there.
    pub async fn authorize(&self, request: AuthorizeRequest) -> Result<AuthorizeResponse, Status> {
        let fingerprint = fingerprint(&request);
        if self.shared.feed_alive()
            && let Some(hit) = self.shared.decisions.get(&fingerprint)
        {
            return Ok(self.shared.count(hit.response.clone()));
        }
        let epoch = self.shared.epoch.current();
        let response = self.client.clone().authorize(request).await?.into_inner();
        if response.decision() != Decision::Allow {
            return Ok(response);
        }
        let unchanged = self.shared.epoch.unchanged_since(epoch);
        if unchanged && self.shared.may_cache(&response) {
            let cached = Cached {
                key_id: response.key_id.clone(),
                response: response.clone(),
            };
            self.shared.decisions.insert(fingerprint, Arc::new(cached));
        }
        Ok(self.shared.count(response))
    }
}

/// A digest of everything the answer depends on; the token itself is not kept.
fn fingerprint(r: &AuthorizeRequest) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [&r.token, &r.route, &r.ip] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    for scope in &r.required_scopes {
        h.update((scope.len() as u64).to_le_bytes());
        h.update(scope.as_bytes());
    }
    h.finalize().into()
}

/// Asks keygate whose events `feed_token` will be shown: the credential's
/// own organization, or every key for a SYSTEM credential.
async fn feed_scope(
    authorizer: &mut AuthorizerClient<Channel>,
    feed_token: &str,
) -> Result<FeedScope, String> {
    let answer = authorizer
        .authorize(AuthorizeRequest {
            token: feed_token.to_owned(),
            required_scopes: vec!["revocation:read".into()],
            ..Default::default()
        })
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    match (answer.decision(), answer.tier()) {
        (Decision::Allow, KeyTier::System) => Ok(FeedScope::All),
        (Decision::Allow, _) => Ok(FeedScope::Organization(answer.organization_id)),
        _ => Err(format!("the feed token is refused: {}", answer.message)),
    }
}

/// Follows Watch forever, resuming after the last applied sequence.
async fn follow(
    mut feed: RevocationFeedClient<Channel>,
    mut authorizer: AuthorizerClient<Channel>,
    feed_token: String,
    auth: Credential,
    shared: Arc<Shared>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if shared.scope.get().is_none() {
            match feed_scope(&mut authorizer, &feed_token).await {
                Ok(scope) => {
                    let _ = shared.scope.set(scope);
                }
                Err(why) => {
                    tracing::warn!(error = %why, "cannot tell which keys the revocation feed covers; not caching");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let mut request = tonic::Request::new(WatchRequest {
            after_sequence: shared.sequence.load(Ordering::Acquire),
        });
        auth.attach(&mut request);
        match feed.watch(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(event)) => {
                            backoff = Duration::from_millis(100);
                            match event.kind() {
                                Kind::Reset => shared.invalidate_all(),
                                Kind::Heartbeat | Kind::Unspecified => {}
                                _ => shared.invalidate_key(&event.key_id),
                            }
                            shared.sequence.fetch_max(event.sequence, Ordering::AcqRel);
                            shared.contact.heard_now();
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(code = ?status.code(), "revocation feed ended; reconnecting");
                            break;
                        }
                    }
                }
                // Out of touch from here on: answer from keygate only, and
                // start over rather than trust what was cached before the gap.
                shared.contact.lost();
                shared.invalidate_all();
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "cannot watch the revocation feed")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_separate_fields() {
        let a = AuthorizeRequest {
            token: "ab".into(),
            route: "c".into(),
            ..Default::default()
        };
        let b = AuthorizeRequest {
            token: "a".into(),
            route: "bc".into(),
            ..Default::default()
        };
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
    }
}
