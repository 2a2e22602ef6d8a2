//! Scenario 8 (issue 14), shared rate limits: cached Authorize on a keygate
//! whose limits live in Redis (`--rate-limit-store`) against one whose
//! limits are its own, both started side by side and loaded in turn.
//! Targets: throughput ≥ 0.95 × local limits'; p99 at a quarter of the local peak
//! within 10 % of local limits'.

use super::pair::{self, Side};
use crate::Ctx;
use crate::outcome::{Outcome, Target};
use crate::server::Redis;

pub async fn run(ctx: &Ctx) -> Result<Outcome, String> {
    let redis = Redis::start().await?;
    let redis_url = redis.url();
    let compared = pair::compare(
        ctx,
        Side {
            name: "local limits",
            args: &[],
        },
        Side {
            name: "limits on Redis",
            args: &["--rate-limit-store", &redis_url],
        },
    )
    .await?;

    // Proof the Redis-backed server counted in Redis the whole time: it saw
    // the store up, and Redis holds its windows.
    let up = compared
        .variant
        .metric_sum("keygate_rate_limit_store_up", &[])
        .await?;
    let windows = redis.key_count()?;
    if up != 1.0 || windows == 0 {
        return Err(format!(
            "the Redis-backed server did not count in Redis (store up {up}, {windows} Redis keys)"
        ));
    }
    compared.baseline.stop().await;
    compared.variant.stop().await;

    Ok(Outcome {
        number: 8,
        name: "shared".into(),
        method: pair::method(
            ctx,
            "one with local limits and one with `--rate-limit-store` on its own redis-server",
        ),
        quick: ctx.quick,
        tables: vec![compared.peak, compared.open],
        targets: vec![
            Target::ratio_at_least(
                "Authorize throughput, limits on Redis ÷ local limits (closed loop, all rounds)",
                compared.throughput,
                0.95,
            ),
            p99_target(
                "Authorize p99 at a quarter of the local peak, limits on Redis ÷ local limits",
                compared.p99,
            ),
        ],
        charts: Vec::new(),
        notes: vec![format!(
            "After the run the Redis-backed server reported `keygate_rate_limit_store_up` {up} \
             and Redis held {windows} keys (its shared windows)."
        )],
    })
}

/// p99 within 10 %, or "not measured" when a run was overloaded.
pub fn p99_target(name: &str, p99: Option<f64>) -> Target {
    match p99 {
        Some(p99) => Target::ratio_at_most(name, p99, 1.10),
        None => Target::new(
            name,
            "≤ 1.10",
            "not measured: a run was overloaded".into(),
            Some(false),
        ),
    }
}
