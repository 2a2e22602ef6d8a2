//! A bounded, mixed load on keygate while a fault happens, and a record of
//! every call it made: Authorize on cached, revoked and uncached keys (some
//! with a short grpc-timeout), admin writes, and Watch subscribers that
//! reconnect from their last sequence.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keygate_proto::v1 as pb;
use keygate_proto::v1::revocation_event::Kind;
use keygate_proto::v1::revocation_feed_client::RevocationFeedClient;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::{AuthorizerClient, KeyAdminClient, as_key};

/// The organization every key of the load belongs to.
pub const ORG: &str = "org_load";
/// The grpc-timeout of the deadline worker's calls.
pub const SHORT_DEADLINE: Duration = Duration::from_millis(200);
/// A call that has not answered after this is recorded as hung.
const HUNG: Duration = Duration::from_secs(15);

/// Where the load goes.
#[derive(Debug, Clone)]
pub struct Target {
    /// Authorize and Watch.
    pub url: String,
    /// Admin writes.
    pub admin_url: String,
    pub admin_token: String,
}

/// The keys the load uses, made before it starts.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    /// Allowed once on the target, so in its cache.
    pub cached: Vec<String>,
    /// Revoked, and denied once on the target (cached as revoked).
    pub revoked: Vec<String>,
    /// Never used: each stays uncached until its first ALLOW. Key id, token.
    pub cold: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Cached,
    Revoked,
    /// `uncached`: no call on this key had been allowed when this one started.
    Cold {
        uncached: bool,
    },
    /// Like `Cold`, with a grpc-timeout of [`SHORT_DEADLINE`].
    Deadline {
        uncached: bool,
    },
    Create,
    Update,
    Revoke,
}

impl Call {
    pub fn is_admin(self) -> bool {
        matches!(self, Call::Create | Call::Update | Call::Revoke)
    }

    pub fn is_uncached(self) -> bool {
        matches!(
            self,
            Call::Cold { uncached: true } | Call::Deadline { uncached: true }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allow,
    Deny(String),
    /// An admin call that succeeded.
    Done,
    Failed(Code, String),
    Hung,
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub call: Call,
    /// The key id (a create: its unique name).
    pub key: String,
    pub started: Instant,
    pub took: Duration,
    pub outcome: Outcome,
}

/// What one Watch subscriber saw.
#[derive(Debug, Clone, Default)]
pub struct Subscriber {
    /// Sequences of the events received, in order, across reconnects.
    pub events: Vec<i64>,
    /// The last sequence received (events and heartbeats).
    pub last: i64,
    /// Times the stream ended or could not be opened, and it reconnected.
    pub reconnects: u32,
    pub resets: u32,
    /// The position each reconnect resumed after.
    pub resumed_after: Vec<i64>,
    /// Why each stream ended or could not open (code and message).
    pub ended: Vec<String>,
}

/// What an admin create asked for and got.
#[derive(Debug, Clone)]
pub struct Created {
    pub name: String,
    pub key_id: String,
    pub token: String,
}

#[derive(Default)]
struct Shared {
    samples: Mutex<Vec<Sample>>,
    allowed: Mutex<HashSet<String>>,
    created: Mutex<Vec<Created>>,
    next_cold: AtomicUsize,
    /// Subscribers whose current stream has delivered a message.
    streaming: AtomicUsize,
}

/// A running load; `stop` ends the calls, `finish` waits for the subscribers.
pub struct Load {
    shared: Arc<Shared>,
    stopping: Arc<AtomicBool>,
    /// The subscribers stop once they have reached this sequence.
    until: tokio::sync::watch::Sender<Option<i64>>,
    workers: Vec<JoinHandle<()>>,
    subscribers: Vec<JoinHandle<Subscriber>>,
    pub started: Instant,
}

/// Everything the load saw.
pub struct Report {
    pub samples: Vec<Sample>,
    pub subscribers: Vec<Subscriber>,
    pub created: Vec<Created>,
}

impl Load {
    /// Starts the load on `target`: 2 workers on cached keys, 1 on revoked
    /// ones, 2 on uncached ones, 1 on uncached ones with a short deadline, 1
    /// making admin writes, and `watchers` Watch subscribers from `after`.
    pub async fn start(target: &Target, keys: &Keys, watchers: usize, after: i64) -> Self {
        let shared = Arc::new(Shared::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let until = tokio::sync::watch::Sender::new(None);
        let keys = Arc::new(keys.clone());
        let mut workers = Vec::new();
        for w in 0..2 {
            let (target, keys) = (target.clone(), keys.clone());
            let (shared, stopping) = (shared.clone(), stopping.clone());
            workers.push(tokio::spawn(async move {
                let mut client = AuthorizerClient::new(channel(&target.url));
                let mut i = w;
                while !stopping.load(Ordering::SeqCst) {
                    let token = &keys.cached[i % keys.cached.len()];
                    let sample = authorize(&mut client, Call::Cached, token, None).await;
                    shared.samples.lock().unwrap().push(sample);
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        {
            let (target, keys) = (target.clone(), keys.clone());
            let (shared, stopping) = (shared.clone(), stopping.clone());
            workers.push(tokio::spawn(async move {
                let mut client = AuthorizerClient::new(channel(&target.url));
                let mut i = 0;
                while !stopping.load(Ordering::SeqCst) && !keys.revoked.is_empty() {
                    let token = &keys.revoked[i % keys.revoked.len()];
                    let sample = authorize(&mut client, Call::Revoked, token, None).await;
                    shared.samples.lock().unwrap().push(sample);
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        for deadline in [None, None, Some(SHORT_DEADLINE)] {
            let (target, keys) = (target.clone(), keys.clone());
            let (shared, stopping) = (shared.clone(), stopping.clone());
            workers.push(tokio::spawn(async move {
                let mut client = AuthorizerClient::new(channel(&target.url));
                // Each worker stays on one key until it is allowed, then takes
                // the next: a key is uncached until its first ALLOW.
                let mut current = shared.next_cold.fetch_add(1, Ordering::SeqCst);
                while !stopping.load(Ordering::SeqCst) {
                    let (key_id, token) = &keys.cold[current % keys.cold.len()];
                    let uncached = !shared.allowed.lock().unwrap().contains(key_id);
                    let call = match deadline {
                        None => Call::Cold { uncached },
                        Some(_) => Call::Deadline { uncached },
                    };
                    let mut sample = authorize(&mut client, call, token, deadline).await;
                    sample.key = key_id.clone();
                    if sample.outcome == Outcome::Allow {
                        shared.allowed.lock().unwrap().insert(key_id.clone());
                        current = shared.next_cold.fetch_add(1, Ordering::SeqCst);
                    }
                    shared.samples.lock().unwrap().push(sample);
                    // Slow enough that the pool of uncached keys lasts.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }
        {
            let target = target.clone();
            let (shared, stopping) = (shared.clone(), stopping.clone());
            workers.push(tokio::spawn(async move {
                admin_writes(&target, &shared, &stopping).await;
            }));
        }
        let mut subscribers = Vec::new();
        for _ in 0..watchers {
            let target = target.clone();
            let until = until.subscribe();
            let shared = shared.clone();
            subscribers.push(tokio::spawn(async move {
                subscribe(target, after, until, &shared.streaming).await
            }));
        }
        Self {
            shared,
            stopping,
            until,
            workers,
            subscribers,
            started: Instant::now(),
        }
    }

    /// How many Watch subscribers the load runs.
    pub fn watchers(&self) -> usize {
        self.subscribers.len()
    }

    /// How many subscribers have a stream open that delivered a message.
    pub fn streaming(&self) -> usize {
        self.shared.streaming.load(Ordering::SeqCst)
    }

    /// Calls made so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.shared.samples.lock().unwrap().clone()
    }

    /// Ends the calls (each worker finishes the call it is in).
    pub async fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        for w in self.workers.drain(..) {
            w.await.unwrap();
        }
    }

    /// Stops the load, reads the database as the load left it, and waits for
    /// every subscriber to reach its head: what each test checks afterwards.
    pub async fn conclude(mut self, database_url: &str) -> (super::ledger::Ledger, Report) {
        self.stop().await;
        let ledger = super::ledger::Ledger::read(database_url).await;
        let report = self.finish(ledger.head()).await;
        (ledger, report)
    }

    /// Waits (at most 20 s) until every subscriber has received everything up
    /// to `head`, and reports.
    pub async fn finish(mut self, head: i64) -> Report {
        self.stop().await;
        self.until.send_replace(Some(head));
        let mut subscribers = Vec::new();
        for s in self.subscribers.drain(..) {
            let seen = tokio::time::timeout(Duration::from_secs(20), s)
                .await
                .expect("every Watch subscriber reaches the log's head within 20 s")
                .unwrap();
            subscribers.push(seen);
        }
        Report {
            samples: self.shared.samples.lock().unwrap().clone(),
            subscribers,
            created: self.shared.created.lock().unwrap().clone(),
        }
    }
}

fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned()).unwrap().connect_lazy()
}

async fn authorize(
    client: &mut AuthorizerClient<Channel>,
    call: Call,
    token: &str,
    deadline: Option<Duration>,
) -> Sample {
    let mut req = tonic::Request::new(pb::AuthorizeRequest {
        token: token.into(),
        route: "POST /v1/checkouts".into(),
        ..Default::default()
    });
    if let Some(d) = deadline {
        req.set_timeout(d);
    }
    let started = Instant::now();
    let outcome = match tokio::time::timeout(HUNG, client.authorize(req)).await {
        Err(_) => Outcome::Hung,
        Ok(Err(status)) => Outcome::Failed(status.code(), status.message().to_owned()),
        Ok(Ok(r)) => {
            let r = r.into_inner();
            if r.decision() == pb::Decision::Allow {
                Outcome::Allow
            } else {
                Outcome::Deny(r.reason().as_str_name().to_owned())
            }
        }
    };
    Sample {
        call,
        key: token_key_id(token),
        started,
        took: started.elapsed(),
        outcome,
    }
}

/// The key id inside a token (kg_live_<id>…): only to name keys in reports.
fn token_key_id(token: &str) -> String {
    keygate_core::token::ParsedToken::parse(token)
        .map(|t| t.credential().key_id.to_string())
        .unwrap_or_default()
}

/// Creates, renames and revokes keys in turn, one call at a time.
async fn admin_writes(target: &Target, shared: &Shared, stopping: &AtomicBool) {
    let mut admin = KeyAdminClient::new(channel(&target.admin_url));
    let token = &target.admin_token;
    let mut n = 0usize;
    // Keys created by this worker and not yet revoked, oldest first.
    let mut live: std::collections::VecDeque<String> = Default::default();
    while !stopping.load(Ordering::SeqCst) {
        n += 1;
        let started = Instant::now();
        let (call, key, result) = match (n % 3, live.back().cloned()) {
            (1, _) | (_, None) => {
                let name = format!("load-{n}");
                let req = pb::CreateKeyRequest {
                    name: name.clone(),
                    organization_id: ORG.into(),
                    mode: pb::Mode::Live as i32,
                    scopes: vec!["checkout:create".into()],
                    ..Default::default()
                };
                let result = admin.create_key(as_key(token, req));
                let result = tokio::time::timeout(HUNG, result).await;
                if let Ok(Ok(r)) = &result {
                    let r = r.get_ref();
                    let key_id = r.key.as_ref().unwrap().key_id.clone();
                    live.push_back(key_id.clone());
                    shared.created.lock().unwrap().push(Created {
                        name: name.clone(),
                        key_id,
                        token: r.token.clone(),
                    });
                }
                (Call::Create, name, result.map(|r| r.map(|_| ())))
            }
            (2, Some(key_id)) => {
                let req = pb::UpdateKeyRequest {
                    key_id: key_id.clone(),
                    name: format!("load-{n}-renamed"),
                    ..Default::default()
                };
                let result = tokio::time::timeout(HUNG, admin.update_key(as_key(token, req))).await;
                (Call::Update, key_id, result.map(|r| r.map(|_| ())))
            }
            (_, Some(_)) => {
                let key_id = live.pop_front().unwrap();
                let req = pb::RevokeKeyRequest {
                    key_id: key_id.clone(),
                    reason: "load".into(),
                    ..Default::default()
                };
                let result = tokio::time::timeout(HUNG, admin.revoke_key(as_key(token, req))).await;
                if !matches!(result, Ok(Ok(_))) {
                    // Not known to be revoked: try it again later.
                    live.push_back(key_id.clone());
                }
                (Call::Revoke, key_id, result.map(|r| r.map(|_| ())))
            }
        };
        let outcome = match result {
            Err(_) => Outcome::Hung,
            Ok(Err(status)) => Outcome::Failed(status.code(), status.message().to_owned()),
            Ok(Ok(())) => Outcome::Done,
        };
        shared.samples.lock().unwrap().push(Sample {
            call,
            key,
            started,
            took: started.elapsed(),
            outcome,
        });
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// One Watch subscriber: from `after`, reconnecting with its last sequence
/// whenever the stream ends, until it has reached the sequence `until` names.
async fn subscribe(
    target: Target,
    after: i64,
    mut until: tokio::sync::watch::Receiver<Option<i64>>,
    streaming: &AtomicUsize,
) -> Subscriber {
    let mut seen = Subscriber {
        last: after,
        ..Default::default()
    };
    let reached = |seen: &Subscriber, until: &tokio::sync::watch::Receiver<Option<i64>>| {
        until.borrow().is_some_and(|head| seen.last >= head)
    };
    let mut feed = RevocationFeedClient::new(channel(&target.url));
    let mut first = true;
    let begun = Instant::now();
    loop {
        if !first {
            seen.reconnects += 1;
            seen.resumed_after.push(seen.last);
            // A short pause between attempts while the server cannot answer.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        first = false;
        if reached(&seen, &until) {
            return seen;
        }
        let opened = feed
            .watch(as_key(
                &target.admin_token,
                pb::WatchRequest {
                    after_sequence: seen.last,
                },
            ))
            .await;
        let stream = match opened {
            Ok(stream) => stream,
            Err(status) => {
                seen.ended.push(format!(
                    "{} ms: {:?}: {}",
                    begun.elapsed().as_millis(),
                    status.code(),
                    status.message()
                ));
                continue;
            }
        };
        let mut stream = stream.into_inner();
        // Counted in `streaming` from its first message until it ends.
        let mut delivered = false;
        let leave = |delivered: bool| {
            if delivered {
                streaming.fetch_sub(1, Ordering::SeqCst);
            }
        };
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                _ = until.changed() => {
                    if reached(&seen, &until) {
                        leave(delivered);
                        return seen;
                    }
                    continue;
                }
            };
            let m = match message {
                Ok(Some(m)) => m,
                Ok(None) => {
                    seen.ended.push("end of stream".into());
                    leave(delivered);
                    break;
                }
                Err(status) => {
                    seen.ended.push(format!(
                        "{} ms: {:?}: {}",
                        begun.elapsed().as_millis(),
                        status.code(),
                        status.message()
                    ));
                    leave(delivered);
                    break;
                }
            };
            match m.kind() {
                Kind::Heartbeat => {}
                Kind::Reset => seen.resets += 1,
                _ => seen.events.push(m.sequence),
            }
            seen.last = m.sequence;
            if !delivered {
                delivered = true;
                streaming.fetch_add(1, Ordering::SeqCst);
            }
            if reached(&seen, &until) {
                leave(delivered);
                return seen;
            }
        }
    }
}

impl Report {
    /// The calls of the kinds `keep` selects.
    pub fn calls(&self, keep: impl Fn(&Sample) -> bool) -> Vec<&Sample> {
        self.samples.iter().filter(|s| keep(s)).collect()
    }

    /// The longest call among those `keep` selects.
    pub fn longest(&self, keep: impl Fn(&Sample) -> bool) -> Duration {
        self.calls(keep)
            .iter()
            .map(|s| s.took)
            .max()
            .unwrap_or_default()
    }

    /// How many calls of each kind got each outcome, for failure messages
    /// and the record.
    pub fn summary(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for s in &self.samples {
            let outcome = match &s.outcome {
                Outcome::Failed(code, _) => format!("{code:?}"),
                other => format!("{other:?}"),
            };
            *counts.entry(format!("{:?} {outcome}", s.call)).or_default() += 1;
        }
        counts
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
