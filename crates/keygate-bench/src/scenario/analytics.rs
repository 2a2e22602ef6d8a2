//! Scenario 10 (issue 16), the cost of usage analytics: cached Authorize on
//! a keygate that counts every outcome per key (the default) against one
//! started with `--usage-analytics off`, side by side, loaded in turn.
//! Target: throughput ≥ 0.98 × without analytics; p99 at a quarter of the
//! peak within 10 %.

use super::pair::{self, Side};
use super::shared::p99_target;
use crate::Ctx;
use crate::outcome::{Outcome, Target};

pub async fn run(ctx: &Ctx) -> Result<Outcome, String> {
    let compared = pair::compare(
        ctx,
        Side {
            name: "analytics off",
            args: &["--usage-analytics", "off"],
        },
        Side {
            name: "analytics on",
            args: &[],
        },
    )
    .await?;
    compared.baseline.stop().await;
    compared.variant.stop().await;

    Ok(Outcome {
        number: 10,
        name: "analytics".into(),
        method: pair::method(
            ctx,
            "one with `--usage-analytics off` and one with usage analytics on (the default)",
        ),
        quick: ctx.quick,
        tables: vec![compared.peak, compared.open],
        targets: vec![
            Target::ratio_at_least(
                "Authorize throughput, analytics on ÷ off (closed loop, all rounds)",
                compared.throughput,
                0.98,
            ),
            p99_target(
                "Authorize p99 at a quarter of the peak without analytics, on ÷ off",
                compared.p99,
            ),
        ],
        charts: Vec::new(),
        notes: vec!["Scenario 9 counts the same difference in instructions (noise-free).".into()],
    })
}
