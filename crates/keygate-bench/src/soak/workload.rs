//! The soak's load: cached and uncached Authorize, admin writes, Watch
//! subscribers, and the revocation probe that times how long a revoked key
//! keeps working on each replica.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use keygate_core::key::Mode;
use keygate_core::token::{Brand, generate};
use keygate_proto::v1 as pb;
use pb::revocation_event::Kind;
use tonic::transport::Channel;

use super::Replica;
use crate::load::{Call, call};
use crate::scenario::authorize_call;
use crate::server::{as_key, authorize_request, create_key, expect_decision};

/// The README's bound for a healthy replica that did not make the change:
/// "at worst one poll interval (1 s) if a notification is lost".
pub const OTHER_REPLICA_BOUND: Duration = Duration::from_secs(1);

/// How long the probe keeps looking past the bound, so a late answer is
/// timed rather than only failed.
const GIVE_UP: Duration = Duration::from_secs(5);

/// Each replica's calls, in replica order.
pub struct Loads {
    pub cached: Vec<Call>,
    pub uncached: Vec<Call>,
    pub admin: Vec<Call>,
    /// DENY answers to unknown tokens (expected), per replica, since last taken.
    pub denials: Vec<Arc<AtomicU64>>,
}

impl Loads {
    pub async fn new(
        replicas: &[Replica],
        admin: &str,
        cached: Vec<String>,
        uncached: Vec<String>,
        updated: [Vec<String>; 2],
    ) -> Result<Self, String> {
        let uncached: Arc<[String]> = uncached.into();
        // One cursor for both replicas: each uncached key comes round once
        // per pass over all of them.
        let cursor = Arc::new(AtomicUsize::new(0));
        let mut out = Self {
            cached: Vec::new(),
            uncached: Vec::new(),
            admin: Vec::new(),
            denials: Vec::new(),
        };
        for (r, ids) in replicas.iter().zip(updated) {
            out.cached.push(authorize_call(
                &[r.server.channel().await?],
                &cached,
                pb::Decision::Allow,
            ));
            let denials = Arc::new(AtomicU64::new(0));
            out.uncached.push(uncached_call(
                r.server.channel().await?,
                Arc::clone(&uncached),
                Arc::clone(&cursor),
                Arc::clone(&denials),
            ));
            out.denials.push(denials);
            out.admin
                .push(admin_call(r.server.channel().await?, admin, ids.into()));
        }
        Ok(out)
    }
}

/// Authorize on a key not in the cache; one call in five carries a
/// well-formed token of a key that does not exist and must be denied.
fn uncached_call(
    channel: Channel,
    tokens: Arc<[String]>,
    cursor: Arc<AtomicUsize>,
    denials: Arc<AtomicU64>,
) -> Call {
    let brand = Brand::default();
    call(move |n| {
        let mut client = pb::authorizer_client::AuthorizerClient::new(channel.clone());
        let denials = Arc::clone(&denials);
        let unknown = n % 5 == 0;
        let token = if unknown {
            generate(&brand, Mode::Live, uuid::Uuid::new_v4()).map(|t| t.token)
        } else {
            Ok(tokens[cursor.fetch_add(1, Ordering::Relaxed) % tokens.len()].clone())
        };
        async move {
            let token = token.map_err(|e| format!("token: {e}"))?;
            let answer = client.authorize(authorize_request(&token)).await;
            if unknown {
                expect_decision(answer, pb::Decision::Deny)
                    .map_err(|e| format!("unknown key: {e}"))?;
                denials.fetch_add(1, Ordering::Relaxed);
                Ok(())
            } else {
                expect_decision(answer, pb::Decision::Allow).map_err(|e| format!("uncached: {e}"))
            }
        }
    })
}

/// CreateKey and UpdateKey in turn; each update sets another rate limit on
/// the next of `ids`, so every replica's feed and cache see UPDATED events.
fn admin_call(channel: Channel, admin: &str, ids: Arc<[String]>) -> Call {
    let admin = admin.to_owned();
    call(move |n| {
        let channel = channel.clone();
        let admin = admin.clone();
        let id = ids[(n / 2) as usize % ids.len()].clone();
        async move {
            if n % 2 == 0 {
                return create_key(&channel, &admin, "org_soak_created")
                    .await
                    .map(drop);
            }
            let limit = keygate_core::bounds::MAX_RATE_LIMIT - (n / 2 % 2) as u32;
            pb::key_admin_client::KeyAdminClient::new(channel)
                .update_key(as_key(
                    &admin,
                    pb::UpdateKeyRequest {
                        key_id: id,
                        rate_limit_per_minute: limit,
                        ..Default::default()
                    },
                )?)
                .await
                .map(drop)
                .map_err(|s| format!("update key: {:?} {}", s.code(), s.message()))
        }
    })
}

/// What the Watch subscribers saw.
#[derive(Debug, Default)]
struct WatchState {
    /// REVOKED arrivals by key id: (subscriber, when).
    arrivals: HashMap<String, Vec<(usize, Instant)>>,
    events: u64,
    heartbeats: u64,
    problems: Vec<String>,
}

/// Watch streams on every replica (with the SYSTEM key), each checking its
/// stream stays in order and never ends while the soak runs.
pub struct Watchers {
    state: Arc<Mutex<WatchState>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    count: usize,
}

/// A handle the revocation probe waits on.
#[derive(Clone)]
pub struct Arrivals {
    state: Arc<Mutex<WatchState>>,
    count: usize,
}

/// The subscribers' record at the end.
#[derive(Debug, Clone)]
pub struct WatchSummary {
    pub subscribers: usize,
    pub events: u64,
    pub heartbeats: u64,
    pub problems: Vec<String>,
}

fn lock(state: &Mutex<WatchState>) -> std::sync::MutexGuard<'_, WatchState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Watchers {
    pub async fn open(
        replicas: &[Replica],
        admin: &str,
        per_replica: usize,
    ) -> Result<Self, String> {
        let state = Arc::new(Mutex::new(WatchState::default()));
        let mut tasks = Vec::new();
        for r in replicas {
            for _ in 0..per_replica {
                let index = tasks.len();
                let name = format!("subscriber {index} on {}", r.name);
                let mut stream = pb::revocation_feed_client::RevocationFeedClient::new(
                    r.server.channel().await?,
                )
                .watch(as_key(admin, pb::WatchRequest { after_sequence: 0 })?)
                .await
                .map_err(|s| format!("{name}: watch: {:?} {}", s.code(), s.message()))?
                .into_inner();
                let state = Arc::clone(&state);
                tasks.push(tokio::spawn(async move {
                    let mut position = 0i64;
                    loop {
                        let problem = match stream.message().await {
                            Ok(Some(e)) => {
                                let now = Instant::now();
                                let mut s = lock(&state);
                                match e.kind() {
                                    Kind::Heartbeat if e.sequence >= position => {
                                        s.heartbeats += 1;
                                        position = e.sequence;
                                        continue;
                                    }
                                    Kind::Reset => format!("{name}: RESET at {}", e.sequence),
                                    kind if e.sequence > position => {
                                        s.events += 1;
                                        position = e.sequence;
                                        if kind == Kind::Revoked {
                                            s.arrivals
                                                .entry(e.key_id)
                                                .or_default()
                                                .push((index, now));
                                        }
                                        continue;
                                    }
                                    kind => format!(
                                        "{name}: {kind:?} at sequence {} after {position}",
                                        e.sequence
                                    ),
                                }
                            }
                            Ok(None) => format!("{name}: stream ended"),
                            Err(s) => format!("{name}: {:?} {}", s.code(), s.message()),
                        };
                        lock(&state).problems.push(problem);
                        return;
                    }
                }));
            }
        }
        let count = tasks.len();
        Ok(Self {
            state,
            tasks,
            count,
        })
    }

    pub fn arrivals(&self) -> Arrivals {
        Arrivals {
            state: Arc::clone(&self.state),
            count: self.count,
        }
    }

    /// Closes every stream; what they saw.
    pub fn finish(self) -> WatchSummary {
        for t in &self.tasks {
            t.abort();
        }
        let s = lock(&self.state);
        WatchSummary {
            subscribers: self.count,
            events: s.events,
            heartbeats: s.heartbeats,
            problems: s.problems.clone(),
        }
    }
}

impl Arrivals {
    /// Waits until every subscriber has `key_id`'s REVOKED event, or
    /// `deadline`; the arrivals there were.
    async fn wait_all(&self, key_id: &str, deadline: Instant) -> Vec<Instant> {
        loop {
            {
                let mut s = lock(&self.state);
                let have = s.arrivals.get(key_id).map_or(0, Vec::len);
                if have >= self.count || Instant::now() >= deadline {
                    return s
                        .arrivals
                        .remove(key_id)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(_, at)| at)
                        .collect();
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// One revocation: a fresh key, cached on both replicas, revoked on one.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// Seconds since the load started, at RevokeKey's return.
    pub t: f64,
    pub revoker: &'static str,
    /// The revoking replica's first Authorize after the return denied it.
    pub local_denied: bool,
    /// From RevokeKey's return until the other replica denied it, ms.
    pub other_ms: Option<f64>,
    /// Until the last Watch subscriber (both replicas) had the event, ms.
    pub watch_ms: Option<f64>,
    /// Subscribers without the event after the probe gave up.
    pub watch_missing: usize,
    /// What went wrong, when something did.
    pub problem: Option<String>,
}

/// Revokes a key every `every` until `end`, alternating the replicas.
pub async fn revocations(
    replicas: Arc<Vec<Replica>>,
    admin: String,
    arrivals: Arrivals,
    t0: Instant,
    end: Instant,
    every: Duration,
) -> Result<Vec<Revocation>, String> {
    let mut channels = Vec::new();
    for r in replicas.iter() {
        channels.push(r.server.channel().await?);
    }
    let mut out = Vec::new();
    let mut next = Instant::now();
    while next < end {
        tokio::time::sleep_until(next.into()).await;
        next += every;
        let (by, other) = (out.len() % 2, (out.len() + 1) % 2);
        let mut record = Revocation {
            t: t0.elapsed().as_secs_f64(),
            revoker: replicas[by].name,
            local_denied: false,
            other_ms: None,
            watch_ms: None,
            watch_missing: arrivals.count,
            problem: None,
        };
        if let Err(e) = revoke_one(&channels, by, other, &admin, &arrivals, t0, &mut record).await {
            record.problem = Some(e);
        }
        out.push(record);
    }
    Ok(out)
}

async fn authorize(channel: &Channel, token: &str) -> Result<pb::AuthorizeResponse, String> {
    pb::authorizer_client::AuthorizerClient::new(channel.clone())
        .authorize(authorize_request(token))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("authorize: {:?} {}", s.code(), s.message()))
}

async fn revoke_one(
    channels: &[Channel],
    by: usize,
    other: usize,
    admin: &str,
    arrivals: &Arrivals,
    t0: Instant,
    record: &mut Revocation,
) -> Result<(), String> {
    let (id, token) = create_key(&channels[by], admin, "org_soak_revoked").await?;
    // Twice on each replica: the first call caches the record, the second
    // is answered from the cache, as the revoked key's last ALLOW must be.
    for channel in [&channels[by], &channels[other]] {
        for _ in 0..2 {
            let a = authorize(channel, &token).await?;
            if a.decision() != pb::Decision::Allow {
                return Err(format!(
                    "a new key answered {:?} {:?}",
                    a.decision(),
                    a.reason()
                ));
            }
        }
    }
    pb::key_admin_client::KeyAdminClient::new(channels[by].clone())
        .revoke_key(as_key(
            admin,
            pb::RevokeKeyRequest {
                key_id: id.clone(),
                reason: "soak".into(),
                ..Default::default()
            },
        )?)
        .await
        .map_err(|s| format!("revoke: {:?} {}", s.code(), s.message()))?;
    let returned = Instant::now();
    record.t = returned.duration_since(t0).as_secs_f64();
    record.local_denied = authorize(&channels[by], &token).await?.decision() == pb::Decision::Deny;
    loop {
        if authorize(&channels[other], &token).await?.decision() == pb::Decision::Deny {
            record.other_ms = Some(returned.elapsed().as_secs_f64() * 1e3);
            break;
        }
        if returned.elapsed() > GIVE_UP {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let got = arrivals.wait_all(&id, returned + GIVE_UP).await;
    record.watch_missing = arrivals.count.saturating_sub(got.len());
    if record.watch_missing == 0 {
        // An event can reach a subscriber before RevokeKey's answer reaches
        // the probe: that counts as 0.
        let last = got.iter().max().copied().unwrap_or(returned);
        record.watch_ms = Some(last.saturating_duration_since(returned).as_secs_f64() * 1e3);
    }
    Ok(())
}
