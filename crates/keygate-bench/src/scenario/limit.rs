//! Scenario 1, the limit: grpc.health.v1 Check (an empty unary call) against
//! Authorize with cached valid keys, same server, same client settings.
//! Targets: Authorize throughput ≥ 0.95 × the empty call's; Authorize p99
//! at half its peak ≤ 0.5 ms.

use keygate_proto::v1 as pb;

use super::{authorize_call, cached_tokens, health_call};
use crate::Ctx;
use crate::load::{self, Stats};
use crate::outcome::{Chart, Outcome, Series, Table, Target, thousands};
use crate::quiet::{self, Peak, STOLEN_AT_MOST_PERCENT, quiet_ratio_at_least};
use crate::server::{Database, Keygate, bootstrap, machine_ticks, stolen_percent};

/// Keys the load spreads over, so no key reaches its rate limit (at most
/// 1,000,000 a minute each) at peak.
pub const KEYS: usize = 16;

/// Open-loop calls in flight beyond which a run counts as overloaded.
pub const MAX_IN_FLIGHT: usize = 20_000;

pub async fn run(ctx: &Ctx) -> Result<Outcome, String> {
    let db = Database::sqlite()?;
    let admin = bootstrap(&db).await?;
    let server = Keygate::start(&db, &[]).await?;
    let channels = server.channels(ctx.connections).await?;
    let tokens = cached_tokens(&channels, &admin, KEYS).await?;
    let health = health_call(&channels);
    let authorize = authorize_call(&channels, &tokens, pb::Decision::Allow);

    let mut peak = Table::latency(&format!(
        "Peak, closed loop: {} connections × {} streams, alternating",
        ctx.connections, ctx.streams
    ));
    // Each round's (Authorize, health) peaks, with what the host stole in each.
    let mut pairs: Vec<(Peak, Peak)> = Vec::new();
    // The order turns every round, over an even number of rounds: this
    // machine's throughput drifts over a run, and a fixed order charged the
    // drift to the case that always ran second.
    let rounds = ctx.rounds.div_ceil(2) * 2;
    for round in 1..=rounds {
        let health_first = round % 2 == 1;
        let mut pair = (Peak::default(), Peak::default());
        for is_health in [health_first, !health_first] {
            let before = machine_ticks();
            if is_health {
                let h = load::closed(&health, ctx.callers(), ctx.phases).await;
                h.expect_no_errors("health")?;
                peak.stats(&format!("health Check #{round}"), &h);
                pair.1 = Peak {
                    rps: h.rps(),
                    stolen: stolen_percent(before, machine_ticks()),
                };
            } else {
                let a = load::closed(&authorize, ctx.callers(), ctx.phases).await;
                a.expect_no_errors("authorize")?;
                peak.stats(&format!("Authorize (cached) #{round}"), &a);
                pair.0 = Peak {
                    rps: a.rps(),
                    stolen: stolen_percent(before, machine_ticks()),
                };
            }
        }
        pairs.push(pair);
    }
    let ratio = quiet::ratio(pairs.iter().copied());
    // The open-loop rates are fractions of the mean peak over every round:
    // a rate, unlike a ratio, is not skewed by which run the host slowed.
    let authorize_rps = pairs.iter().map(|(a, _)| a.rps).sum::<f64>() / rounds as f64;

    // Latency against offered load, from the intended send time.
    let fractions: &[f64] = ctx.pick(&[0.1, 0.25, 0.5, 0.75, 0.9], &[0.25, 0.5]);
    let mut open = Table::latency("Open loop at fractions of Authorize's peak, alternating");
    let mut series: Vec<Series> = [
        "Authorize p99",
        "health Check p99",
        "Authorize p50",
        "health Check p50",
    ]
    .iter()
    .map(|n| Series {
        name: (*n).to_owned(),
        points: Vec::new(),
    })
    .collect();
    let mut at_half: Option<Stats> = None;
    for &f in fractions {
        let rate = authorize_rps * f;
        let h = load::open(&health, rate, ctx.phases, MAX_IN_FLIGHT).await;
        open.stats(&format!("health Check ({:.0} % of peak)", f * 100.0), &h);
        let a = load::open(&authorize, rate, ctx.phases, MAX_IN_FLIGHT).await;
        open.stats(&format!("Authorize ({:.0} % of peak)", f * 100.0), &a);
        series[0].points.push((rate, a.ms(0.99)));
        series[1].points.push((rate, h.ms(0.99)));
        series[2].points.push((rate, a.ms(0.5)));
        series[3].points.push((rate, h.ms(0.5)));
        if (f - 0.5).abs() < 1e-9 {
            at_half = Some(a);
        }
    }
    let half = at_half.ok_or("no run at half of peak")?;
    half.expect_no_errors("authorize at half of peak")?;

    Ok(Outcome {
        number: 1,
        name: "limit".into(),
        method: format!(
            "keygate (SQLite) as its own process; the load generator in another, on the same \
             machine. {KEYS} cached keys, each with the highest rate limit. Closed loop: {} \
             callers over {} HTTP/2 connections, {:.1} s warm-up then {:.1} s measured per case, \
             health and Authorize alternating for {} rounds, health first in odd rounds and \
             second in even ones (so a drift of the machine's speed falls on both alike). Open \
             loop: calls sent at a fixed rate, latency from each call's intended send time.",
            ctx.callers(),
            ctx.connections,
            ctx.phases.warmup.as_secs_f64(),
            ctx.phases.measure.as_secs_f64(),
            rounds
        ),
        quick: ctx.quick,
        tables: vec![peak, open],
        targets: vec![
            quiet_ratio_at_least(
                &format!(
                    "Authorize throughput ÷ empty call throughput (closed loop, rounds where the host stole ≤ {STOLEN_AT_MOST_PERCENT} % in both)"
                ),
                &ratio,
                rounds,
                0.95,
            ),
            Target::new(
                "The machine's time stolen by its host in a peak run, the worst run",
                "(none set)",
                quiet::most_stolen(pairs.iter().flat_map(|(a, h)| [*a, *h]))
                    .map_or_else(|| "unreadable".into(), |p| format!("{p:.0} %")),
                None,
            ),
            Target::latency_at_most(
                &format!(
                    "Authorize p99 at half its peak ({} calls/s, open loop)",
                    thousands(authorize_rps / 2.0)
                ),
                &half,
                0.99,
                0.5,
            ),
        ],
        charts: vec![Chart {
            file: "limit-latency.png".into(),
            title: "Scenario 1: latency against offered load (open loop)".into(),
            x_label: "offered load, calls/s (log)".into(),
            y_label: "latency, ms (log)".into(),
            log: true,
            series,
        }],
        notes: vec![format!(
            "Authorize peak per round: {}. The host stole, per round (Authorize / health, % of the machine's time): {}.",
            pairs
                .iter()
                .map(|(a, _)| thousands(a.rps))
                .collect::<Vec<_>>()
                .join(", "),
            pairs
                .iter()
                .map(|(a, h)| format!("{} / {}", stolen(a), stolen(h)))
                .collect::<Vec<_>>()
                .join(", ")
        )],
    })
}

/// A run's stolen share as the notes show it.
fn stolen(p: &Peak) -> String {
    p.stolen.map_or_else(|| "-".into(), |s| format!("{s:.0}"))
}
