//! Scenario 8 (issue 14), shared rate limits: cached Authorize on a keygate
//! whose limits live in Redis (`--rate-limit-store`) against one whose
//! limits are its own, both started side by side and loaded in turn.
//! Targets: throughput ≥ 0.95 × local limits'; p99 at a quarter of the local peak
//! within 10 % of local limits'.

use keygate_proto::v1 as pb;

use super::{authorize_call, warm};
use crate::Ctx;
use crate::load::{self, Stats};
use crate::outcome::{Outcome, Table, Target, thousands};
use crate::server::{Database, Keygate, Redis, bootstrap, create_key};

/// Keys the load spreads over: each counted (a limit of its own, not
/// unlimited), none near its limit at peak.
const KEYS: usize = 16;

pub async fn run(ctx: &Ctx) -> Result<Outcome, String> {
    let redis = Redis::start().await?;
    let redis_url = redis.url();
    let (local_db, shared_db) = (Database::sqlite()?, Database::sqlite()?);
    let (local_admin, shared_admin) = (bootstrap(&local_db).await?, bootstrap(&shared_db).await?);
    let local = Keygate::start(&local_db, &[]).await?;
    let shared = Keygate::start(&shared_db, &["--rate-limit-store", &redis_url]).await?;

    let mut calls = Vec::new();
    for (server, admin) in [(&local, &local_admin), (&shared, &shared_admin)] {
        let channels = server.channels(ctx.connections).await?;
        let mut tokens = Vec::new();
        for i in 0..KEYS {
            tokens.push(
                create_key(&channels[0], admin, &format!("org_{i}"))
                    .await?
                    .1,
            );
        }
        warm(&channels, &tokens).await?;
        calls.push(authorize_call(&channels, &tokens, pb::Decision::Allow));
    }
    let (local_call, shared_call) = (&calls[0], &calls[1]);

    let mut peak = Table::latency(&format!(
        "Peak, closed loop: {} connections × {} streams, alternating",
        ctx.connections, ctx.streams
    ));
    let (mut local_rps, mut shared_rps) = (0.0, 0.0);
    for round in 1..=ctx.rounds {
        let l = load::closed(local_call, ctx.callers(), ctx.phases).await;
        l.expect_no_errors("authorize, local limits")?;
        peak.stats(&format!("local limits #{round}"), &l);
        let s = load::closed(shared_call, ctx.callers(), ctx.phases).await;
        s.expect_no_errors("authorize, limits on Redis")?;
        peak.stats(&format!("limits on Redis #{round}"), &s);
        local_rps += l.rps();
        shared_rps += s.rps();
    }
    let throughput = shared_rps / local_rps;
    // A quarter, not a half: at half the peak of one server, the two servers,
    // Redis and the load generator on two cores overloaded in every round,
    // local limits' as much as Redis's, which measures the machine.
    let rate = local_rps / ctx.rounds as f64 / 4.0;

    let mut open = Table::latency(&format!(
        "Open loop at a quarter of the local peak ({} calls/s), alternating",
        thousands(rate)
    ));
    let empty = || Stats::new(std::time::Duration::ZERO, None);
    let (mut local_all, mut shared_all) = (empty(), empty());
    for round in 1..=ctx.rounds {
        let l = load::open(local_call, rate, ctx.phases, super::limit::MAX_IN_FLIGHT).await;
        l.expect_no_errors("authorize at a quarter of peak, local limits")?;
        open.stats(&format!("local limits #{round}"), &l);
        let s = load::open(shared_call, rate, ctx.phases, super::limit::MAX_IN_FLIGHT).await;
        s.expect_no_errors("authorize at a quarter of peak, limits on Redis")?;
        open.stats(&format!("limits on Redis #{round}"), &s);
        add(&mut local_all, &l);
        add(&mut shared_all, &s);
    }
    open.stats("local limits, all rounds", &local_all);
    open.stats("limits on Redis, all rounds", &shared_all);
    let p99_measured = !(shared_all.overloaded || local_all.overloaded);
    let p99 = shared_all.ms(0.99) / local_all.ms(0.99).max(1e-9);

    // Proof the Redis-backed server counted in Redis the whole time: it saw
    // the store up, and Redis holds its windows.
    let up = shared
        .metric_sum("keygate_rate_limit_store_up", &[])
        .await?;
    let windows = redis.key_count()?;
    if up != 1.0 || windows == 0 {
        return Err(format!(
            "the Redis-backed server did not count in Redis (store up {up}, {windows} Redis keys)"
        ));
    }
    local.stop().await;
    shared.stop().await;

    Ok(Outcome {
        number: 8,
        name: "shared".into(),
        method: format!(
            "Two keygate processes (SQLite each), one with local limits and one with \
             `--rate-limit-store` on its own redis-server, started side by side; {KEYS} cached \
             keys on each, every one counted (a limit of its own, far above the load). Closed \
             loop: {} callers over {} HTTP/2 connections, {:.1} s warm-up then {:.1} s measured \
             per case, the two servers alternating for {} rounds. Open loop at a quarter of \
             the local peak, latency from each call's intended send time, alternating the same way.",
            ctx.callers(),
            ctx.connections,
            ctx.phases.warmup.as_secs_f64(),
            ctx.phases.measure.as_secs_f64(),
            ctx.rounds
        ),
        quick: ctx.quick,
        tables: vec![peak, open],
        targets: vec![
            Target::ratio_at_least(
                "Authorize throughput, limits on Redis ÷ local limits (closed loop, all rounds)",
                throughput,
                0.95,
            ),
            if p99_measured {
                Target::ratio_at_most(
                    "Authorize p99 at a quarter of the local peak, limits on Redis ÷ local limits",
                    p99,
                    1.10,
                )
            } else {
                Target::new(
                    "Authorize p99 at a quarter of the local peak, limits on Redis ÷ local limits",
                    "≤ 1.10",
                    "not measured: a run was overloaded".into(),
                    Some(false),
                )
            },
        ],
        charts: Vec::new(),
        notes: vec![format!(
            "After the run the Redis-backed server reported `keygate_rate_limit_store_up` {up} \
             and Redis held {windows} keys (its shared windows)."
        )],
    })
}

/// Adds one round's calls to `total`, and its measured window.
fn add(total: &mut Stats, round: &Stats) {
    total.merge(round);
    total.elapsed += round.elapsed;
}
