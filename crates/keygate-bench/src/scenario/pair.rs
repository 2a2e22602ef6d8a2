//! Two keygate processes that differ in one setting, started side by side
//! and loaded in turn with the same cached Authorize calls: what scenarios 8
//! (limits on Redis) and 10 (usage analytics) compare.

use keygate_proto::v1 as pb;

use super::{authorize_call, cached_tokens};
use crate::Ctx;
use crate::load::{self, Stats};
use crate::outcome::{Table, thousands};
use crate::server::{Database, Keygate, bootstrap};

/// Keys the load spreads over: each counted (a limit of its own, not
/// unlimited), none near its limit at peak.
pub const KEYS: usize = 16;

/// One side of the comparison.
pub struct Side<'a> {
    /// How the tables name it.
    pub name: &'a str,
    /// `keygate serve` flags beyond the benchmark's own.
    pub args: &'a [&'a str],
}

/// What the alternating runs measured.
pub struct Compared {
    pub peak: Table,
    pub open: Table,
    /// Closed-loop throughput, variant ÷ baseline, all rounds.
    pub throughput: f64,
    /// p99 at a quarter of the baseline's peak, variant ÷ baseline; `None`
    /// when a run was overloaded (the ratio would measure the queue).
    pub p99: Option<f64>,
    /// Both servers, still running, for the scenario's own checks.
    pub baseline: Keygate,
    pub variant: Keygate,
}

/// Starts both servers (SQLite each), caches [`KEYS`] keys on each, then
/// alternates closed-loop runs for `ctx.rounds` rounds (made even), and
/// open-loop runs at a quarter of the baseline's peak the same way.
///
/// The order turns every round (baseline first, then variant first, …): on
/// this machine throughput drifts down over minutes of load (by a fifth from
/// the first round to the third, seen here), and a fixed order charged that
/// drift to whichever case always ran second.
pub async fn compare(ctx: &Ctx, baseline: Side<'_>, variant: Side<'_>) -> Result<Compared, String> {
    let (base_db, variant_db) = (Database::sqlite()?, Database::sqlite()?);
    let (base_admin, variant_admin) = (bootstrap(&base_db).await?, bootstrap(&variant_db).await?);
    let base_server = Keygate::start(&base_db, baseline.args).await?;
    let variant_server = Keygate::start(&variant_db, variant.args).await?;

    let mut calls = Vec::new();
    for (server, admin) in [
        (&base_server, &base_admin),
        (&variant_server, &variant_admin),
    ] {
        let channels = server.channels(ctx.connections).await?;
        let tokens = cached_tokens(&channels, admin, KEYS).await?;
        calls.push(authorize_call(&channels, &tokens, pb::Decision::Allow));
    }
    let (base_call, variant_call) = (&calls[0], &calls[1]);
    let rounds = ctx.rounds.div_ceil(2) * 2;
    // Round r's cases in order: (is the variant, its call).
    let order = |round: usize| {
        let pair = [(false, base_call), (true, variant_call)];
        if round % 2 == 1 {
            pair
        } else {
            [pair[1], pair[0]]
        }
    };
    let name = |is_variant: bool| {
        if is_variant {
            variant.name
        } else {
            baseline.name
        }
    };

    let mut peak = Table::latency(&format!(
        "Peak, closed loop: {} connections × {} streams, alternating",
        ctx.connections, ctx.streams
    ));
    let (mut base_rps, mut variant_rps) = (0.0, 0.0);
    for round in 1..=rounds {
        for (is_variant, call) in order(round) {
            let stats = load::closed(call, ctx.callers(), ctx.phases).await;
            stats.expect_no_errors(&format!("authorize, {}", name(is_variant)))?;
            peak.stats(&format!("{} #{round}", name(is_variant)), &stats);
            *(if is_variant {
                &mut variant_rps
            } else {
                &mut base_rps
            }) += stats.rps();
        }
    }
    // A quarter, not a half: at half the peak of one server, the two servers,
    // what they use and the load generator on two cores overloaded in every
    // round, the baseline as much as the variant, which measures the machine.
    let rate = base_rps / rounds as f64 / 4.0;

    let mut open = Table::latency(&format!(
        "Open loop at a quarter of the {} peak ({} calls/s), alternating",
        baseline.name,
        thousands(rate)
    ));
    let empty = || Stats::new(std::time::Duration::ZERO, None);
    let (mut base_all, mut variant_all) = (empty(), empty());
    for round in 1..=rounds {
        for (is_variant, call) in order(round) {
            let stats = load::open(call, rate, ctx.phases, super::limit::MAX_IN_FLIGHT).await;
            stats.expect_no_errors(&format!(
                "authorize at a quarter of peak, {}",
                name(is_variant)
            ))?;
            open.stats(&format!("{} #{round}", name(is_variant)), &stats);
            let all = if is_variant {
                &mut variant_all
            } else {
                &mut base_all
            };
            add(all, &stats);
        }
    }
    open.stats(&format!("{}, all rounds", baseline.name), &base_all);
    open.stats(&format!("{}, all rounds", variant.name), &variant_all);
    let p99 = (!(variant_all.overloaded || base_all.overloaded))
        .then(|| variant_all.ms(0.99) / base_all.ms(0.99).max(1e-9));

    Ok(Compared {
        peak,
        open,
        throughput: variant_rps / base_rps,
        p99,
        baseline: base_server,
        variant: variant_server,
    })
}

/// The method text both scenarios share.
pub fn method(ctx: &Ctx, servers: &str) -> String {
    format!(
        "Two keygate processes (SQLite each), {servers}, started side by side; {KEYS} cached \
         keys on each, every one counted (a limit of its own, far above the load). Closed \
         loop: {} callers over {} HTTP/2 connections, {:.1} s warm-up then {:.1} s measured \
         per case, the two servers alternating for {} rounds, the first one first in odd \
         rounds and second in even ones (so a drift of the machine's speed over the run \
         falls on both alike). Open loop at a quarter of the first one's peak, latency from \
         each call's intended send time, alternating the same way.",
        ctx.callers(),
        ctx.connections,
        ctx.phases.warmup.as_secs_f64(),
        ctx.phases.measure.as_secs_f64(),
        ctx.rounds.div_ceil(2) * 2
    )
}

/// Adds one round's calls to `total`, and its measured window.
fn add(total: &mut Stats, round: &Stats) {
    total.merge(round);
    total.elapsed += round.elapsed;
}
