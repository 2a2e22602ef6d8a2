//! Scenario 4, revocation propagation: the time from RevokeKey's return
//! until every Watch subscriber has the REVOKED event, for 1 to 10,000
//! subscribers on one replica and 100 across two replicas on PostgreSQL, and
//! until a CachedAuthorizer (crates/keygate-client) denies the key.
//! Targets (p99): ≤ 2 ms at 100 subscribers, ≤ 10 ms at 1,000, ≤ 5 ms
//! across replicas at 100.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use keygate_client::{CachedAuthorizer, ClientSettings};
use keygate_proto::v1 as pb;
use pb::revocation_event::Kind;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::Ctx;
use crate::load::histogram;
use crate::outcome::{Chart, Outcome, Series, Table, Target};
use crate::server::{Database, Keygate, as_key, authorize_request, bootstrap, create_key};

/// Watch streams per HTTP/2 connection (the server is started allowing more).
const STREAMS_PER_CONNECTION: usize = 500;

/// Flags that let one SYSTEM key hold every subscriber's stream.
const SERVER_FLAGS: &[&str] = &[
    "--watch-max-streams-per-key",
    "20000",
    "--max-concurrent-streams",
    "1000",
];

/// N open Watch streams; each REVOKED event's arrival is sent back with the
/// time it was read.
struct Subscribers {
    arrivals: mpsc::UnboundedReceiver<(String, Instant)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    count: usize,
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Subscribers {
    async fn open(server: &Keygate, admin: &str, count: usize) -> Result<Self, String> {
        let (tx, arrivals) = mpsc::unbounded_channel();
        let connections = count.div_ceil(STREAMS_PER_CONNECTION);
        let channels = server.channels(connections).await?;
        let mut tasks = Vec::with_capacity(count);
        // Opened in batches, so openings stay under the server's cap on
        // calls in progress.
        for batch in (0..count).collect::<Vec<_>>().chunks(200) {
            let mut opening = Vec::new();
            for &i in batch {
                let channel = channels[i % connections].clone();
                let request = as_key(admin, pb::WatchRequest { after_sequence: 0 })?;
                opening.push(tokio::spawn(async move {
                    pb::revocation_feed_client::RevocationFeedClient::new(channel)
                        .watch(request)
                        .await
                        .map(tonic::Response::into_inner)
                        .map_err(|s| format!("watch: {:?} {}", s.code(), s.message()))
                }));
            }
            for o in opening {
                let mut stream = o.await.map_err(|e| e.to_string())??;
                let tx = tx.clone();
                tasks.push(tokio::spawn(async move {
                    while let Ok(Some(event)) = stream.message().await {
                        if event.kind() == Kind::Revoked
                            && tx.send((event.key_id, Instant::now())).is_err()
                        {
                            return;
                        }
                    }
                }));
            }
        }
        Ok(Self {
            arrivals,
            tasks,
            count,
        })
    }

    /// Waits (at most 10 s) until every subscriber has `key_id`'s event;
    /// each one's arrival time. Arrivals for other keys are dropped.
    async fn all_have(&mut self, key_id: &str) -> Result<Vec<Instant>, String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut got = Vec::with_capacity(self.count);
        while got.len() < self.count {
            match tokio::time::timeout_at(deadline, self.arrivals.recv()).await {
                Ok(Some((id, at))) if id == key_id => got.push(at),
                Ok(Some(_)) => {}
                Ok(None) => return Err("every Watch stream ended".into()),
                Err(_) => {
                    return Err(format!(
                        "{} of {} subscribers had the revocation after 10 s",
                        got.len(),
                        self.count
                    ));
                }
            }
        }
        Ok(got)
    }
}

async fn revoke(channel: &Channel, admin: &str, key_id: &str) -> Result<Instant, String> {
    pb::key_admin_client::KeyAdminClient::new(channel.clone())
        .revoke_key(as_key(
            admin,
            pb::RevokeKeyRequest {
                key_id: key_id.into(),
                reason: "bench".into(),
                ..Default::default()
            },
        )?)
        .await
        .map_err(|s| format!("revoke: {:?} {}", s.code(), s.message()))?;
    Ok(Instant::now())
}

/// Times for one subscriber count: per revocation, until the last subscriber
/// had it; and every single delivery. The first revocation after the
/// streams opened is kept apart, reported but not counted in the
/// percentiles: it is the streams' first event, not the steady state.
struct Fanout {
    all: hdrhistogram::Histogram<u64>,
    each: hdrhistogram::Histogram<u64>,
    early: u64,
    first: Duration,
}

async fn fanout(
    revoker: &Channel,
    admin: &str,
    keys: &[String],
    subs: &mut Subscribers,
) -> Result<Fanout, String> {
    let mut out = Fanout {
        all: histogram(),
        each: histogram(),
        early: 0,
        first: Duration::ZERO,
    };
    for (i, key) in keys.iter().enumerate() {
        let returned = revoke(revoker, admin, key).await?;
        let arrivals = subs.all_have(key).await?;
        if i == 0 {
            out.first = arrivals
                .iter()
                .map(|at| at.saturating_duration_since(returned))
                .max()
                .unwrap_or_default();
            continue;
        }
        let mut last = Duration::ZERO;
        for at in arrivals {
            // An event can reach a subscriber before RevokeKey's answer
            // reaches its caller: that counts as 0.
            let d = at.saturating_duration_since(returned);
            if at < returned {
                out.early += 1;
            }
            out.each.saturating_record(nanos(d));
            last = last.max(d);
        }
        out.all.saturating_record(nanos(last));
    }
    Ok(out)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

fn ms(h: &hdrhistogram::Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e6
}

async fn keys(channel: &Channel, admin: &str, n: usize) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(create_key(channel, admin, &format!("org_r{i}")).await?);
    }
    Ok(out)
}

/// Until `authz` denies the key after RevokeKey returned, per revocation.
async fn cached_authorizer_times(
    authz: &CachedAuthorizer,
    revoker: &Channel,
    admin: &str,
    keys: &[(String, String)],
) -> Result<hdrhistogram::Histogram<u64>, String> {
    let mut h = histogram();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !authz.feed_alive() {
        if Instant::now() > deadline {
            return Err("CachedAuthorizer's feed did not come alive in 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (id, token) in keys {
        let request = authorize_request(token);
        // The first call fetches the ALLOW and caches it; the second is a hit.
        for _ in 0..2 {
            let a = authz
                .authorize(request.clone())
                .await
                .map_err(|s| format!("authorize: {s}"))?;
            if a.decision() != pb::Decision::Allow {
                return Err(format!("fresh key answered {:?}", a.reason()));
            }
        }
        let returned = revoke(revoker, admin, id).await?;
        // Probed from an OS thread every ~20 µs: a task spinning on the
        // runtime would starve the client's own feed follower instead.
        let (handle, authz, request) = (
            tokio::runtime::Handle::current(),
            authz.clone(),
            request.clone(),
        );
        let probe = std::thread::spawn(move || -> Result<Duration, String> {
            loop {
                let a = handle
                    .block_on(authz.authorize(request.clone()))
                    .map_err(|s| format!("authorize: {s}"))?;
                if a.decision() == pb::Decision::Deny {
                    return Ok(returned.elapsed());
                }
                if returned.elapsed() > Duration::from_secs(10) {
                    return Err("CachedAuthorizer still allowed a revoked key after 10 s".into());
                }
                std::thread::sleep(Duration::from_micros(20));
            }
        });
        let took = tokio::task::spawn_blocking(move || probe.join())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|_| "probe thread panicked".to_owned())??;
        h.saturating_record(nanos(took));
    }
    Ok(h)
}

pub async fn run(ctx: &Ctx) -> Result<Outcome, String> {
    let db = Database::postgres().await?;
    let result = measure(ctx, &db).await;
    db.drop_now().await;
    result
}

async fn measure(ctx: &Ctx, db: &Database) -> Result<Outcome, String> {
    let admin = bootstrap(db).await?;
    let a = Keygate::start(db, SERVER_FLAGS).await?;
    let revoker = a.channel().await?;
    let levels: &[usize] = ctx.pick(&[1, 10, 100, 1_000, 10_000], &[1, 10, 100, 1_000]);
    let per_level = |n: usize| ctx.pick(if n >= 10_000 { 20 } else { 50 }, 5);

    let mut table = Table::new(
        "One replica: from RevokeKey's return until every subscriber has the event",
        &[
            "subscribers",
            "revocations",
            "all have it p50 ms",
            "all have it p99 ms",
            "all have it max ms",
            "one delivery p50 ms",
            "one delivery p99 ms",
            "arrived before the return",
            "first revocation ms (not counted)",
        ],
    );
    let mut series = vec![
        Series {
            name: "all subscribers have it, p99".into(),
            points: Vec::new(),
        },
        Series {
            name: "all subscribers have it, p50".into(),
            points: Vec::new(),
        },
        Series {
            name: "one delivery, p50".into(),
            points: Vec::new(),
        },
    ];
    let mut targets = Vec::new();
    let mut p99_at = HashMap::new();
    for &n in levels {
        let level_keys: Vec<String> = keys(&revoker, &admin, per_level(n) + 1)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let mut subs = Subscribers::open(&a, &admin, n).await?;
        let f = fanout(&revoker, &admin, &level_keys, &mut subs).await?;
        drop(subs);
        table.row(vec![
            n.to_string(),
            (level_keys.len() - 1).to_string(),
            format!("{:.3}", ms(&f.all, 0.5)),
            format!("{:.3}", ms(&f.all, 0.99)),
            format!("{:.3}", f.all.max() as f64 / 1e6),
            format!("{:.3}", ms(&f.each, 0.5)),
            format!("{:.3}", ms(&f.each, 0.99)),
            f.early.to_string(),
            format!("{:.3}", f.first.as_secs_f64() * 1e3),
        ]);
        series[0].points.push((n as f64, ms(&f.all, 0.99)));
        series[1].points.push((n as f64, ms(&f.all, 0.5)));
        series[2].points.push((n as f64, ms(&f.each, 0.5)));
        p99_at.insert(n, ms(&f.all, 0.99));
    }
    for (n, bound) in [(100, 2.0), (1_000, 10.0)] {
        if let Some(p99) = p99_at.get(&n) {
            targets.push(Target::ms_at_most(
                &format!("p99 until all {n} subscribers on one replica have it"),
                *p99,
                bound,
            ));
        }
    }

    // Across replicas: RevokeKey on A, subscribers on B.
    let b = Keygate::start(db, SERVER_FLAGS).await?;
    let cross_keys: Vec<String> = keys(&revoker, &admin, ctx.pick(50, 5) + 1)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let mut subs = Subscribers::open(&b, &admin, 100).await?;
    let cross = fanout(&revoker, &admin, &cross_keys, &mut subs).await?;
    drop(subs);
    let mut cross_table = Table::new(
        "Two replicas on PostgreSQL: RevokeKey on A, 100 subscribers on B",
        &[
            "revocations",
            "all have it p50 ms",
            "all have it p99 ms",
            "max ms",
            "one delivery p50 ms",
            "first revocation ms (not counted)",
        ],
    );
    cross_table.row(vec![
        (cross_keys.len() - 1).to_string(),
        format!("{:.3}", ms(&cross.all, 0.5)),
        format!("{:.3}", ms(&cross.all, 0.99)),
        format!("{:.3}", cross.all.max() as f64 / 1e6),
        format!("{:.3}", ms(&cross.each, 0.5)),
        format!("{:.3}", cross.first.as_secs_f64() * 1e3),
    ]);
    targets.push(Target::ms_at_most(
        "p99 until all 100 subscribers on the other replica have it",
        ms(&cross.all, 0.99),
        5.0,
    ));

    // CachedAuthorizer: on the revoking replica, and on the other one.
    let mut client_table = Table::new(
        "From RevokeKey's return until a CachedAuthorizer with the key cached denies it",
        &[
            "CachedAuthorizer on",
            "revocations",
            "p50 ms",
            "p99 ms",
            "max ms",
        ],
    );
    for (name, server) in [
        ("the revoking replica (A)", &a),
        ("the other replica (B)", &b),
    ] {
        let authz = CachedAuthorizer::new(
            server.channel().await?,
            admin.clone(),
            ClientSettings::default(),
        )
        .map_err(|e| format!("CachedAuthorizer: {e}"))?;
        let ks = keys(&revoker, &admin, ctx.pick(50, 5)).await?;
        let h = cached_authorizer_times(&authz, &revoker, &admin, &ks).await?;
        client_table.row(vec![
            name.into(),
            ks.len().to_string(),
            format!("{:.3}", ms(&h, 0.5)),
            format!("{:.3}", ms(&h, 0.99)),
            format!("{:.3}", h.max() as f64 / 1e6),
        ]);
        targets.push(Target::new(
            &format!("CachedAuthorizer on {name} denies, p99"),
            "(none set)",
            format!("{:.3} ms", ms(&h, 0.99)),
            None,
        ));
    }
    a.stop().await;
    b.stop().await;

    Ok(Outcome {
        number: 4,
        name: "revocation".into(),
        method: "Two keygate processes on one PostgreSQL database, every Watch subscriber in \
                 the bench process (500 streams per HTTP/2 connection, all with the SYSTEM \
                 admin key). Each revocation is one RevokeKey on replica A, sequentially; the \
                 clock starts when its answer arrives and stops when the last subscriber has \
                 read the REVOKED event. The first revocation after a level's streams opened \
                 is reported apart and not counted. With tens of revocations per level, p99 is \
                 close to the maximum. The subscribers run on the same two cores as both servers."
            .into(),
        quick: ctx.quick,
        tables: vec![table, cross_table, client_table],
        targets,
        charts: vec![Chart {
            file: "revocation-fanout.png".into(),
            title: "Scenario 4: RevokeKey's return → event at every Watch subscriber".into(),
            x_label: "subscribers on one replica (log)".into(),
            y_label: "ms (log)".into(),
            log: true,
            series,
        }],
        notes: Vec::new(),
    })
}
