//! Scenario 6, scale: 10k, 100k and 1M keys bulk-loaded into PostgreSQL.
//! Targets: cold Authorize p99 at 1M within 1.2 × that at 10k; RSS with
//! 100k cached keys ≤ 150 MB; start-up to SERVING independent of the key
//! count (here: within 1.2 × of the smallest); ListKeys' first page p99 ≤
//! 5 ms at 1M.

use std::time::Duration;

use keygate_proto::v1 as pb;

use super::authorize_call;
use crate::Ctx;
use crate::load::{self, call};
use crate::outcome::{Outcome, Table, Target, thousands};
use crate::scenario::cold::index_loaded;
use crate::scenario::limit::MAX_IN_FLIGHT;
use crate::server::{Database, Keygate, as_key, bootstrap, migrate};

/// The open-loop rate of the cold Authorize runs.
const RATE: f64 = 500.0;

/// Starts per size; the median start-up is reported.
const STARTS: usize = 3;

struct Size {
    keys: usize,
    load: Duration,
    startup: Duration,
    index: Duration,
    cold: load::Stats,
    list: load::Stats,
    rss_before: Option<u64>,
    /// RSS, cache entries, the cache's own estimate of its bytes.
    rss_cached: Option<(u64, f64, f64)>,
}

async fn size(ctx: &Ctx, keys: usize, cache_all: bool) -> Result<Size, String> {
    let db = Database::postgres().await?;
    let r = measure(ctx, &db, keys, cache_all).await;
    db.drop_now().await;
    r
}

async fn measure(ctx: &Ctx, db: &Database, keys: usize, cache_all: bool) -> Result<Size, String> {
    migrate(db).await?;
    let cold_calls = (RATE * (ctx.phases.warmup + ctx.phases.measure).as_secs_f64()) as usize + 100;
    let keep = if cache_all {
        keys
    } else {
        cold_calls.min(keys)
    };
    let loaded = crate::bulk::load(db, keys, keep).await?;
    let admin = bootstrap(db).await?;
    let mut startups = Vec::new();
    for _ in 1..STARTS {
        let s = Keygate::start(db, &[]).await?;
        startups.push(s.startup);
        s.stop().await;
    }
    let server = Keygate::start(db, &[]).await?;
    startups.push(server.startup);
    startups.sort();
    let index = index_loaded(&server, keys).await?;
    let channels = server.channels(ctx.connections).await?;
    let rss_before = server.rss_bytes();

    let tokens: Vec<String> = loaded.keys.iter().map(|(_, t)| t.clone()).collect();
    let cold_tokens = &tokens[..cold_calls.min(tokens.len())];
    let cold = authorize_call(&channels, cold_tokens, pb::Decision::Allow);
    // Failed calls are a finding (counted in the table), not a bench error.
    let cold = load::open(&cold, RATE, ctx.phases, MAX_IN_FLIGHT).await;

    let list = {
        let channel = channels[0].clone();
        let admin = admin.clone();
        call(move |_| {
            let channel = channel.clone();
            let request = as_key(&admin, pb::ListKeysRequest::default());
            async move {
                let page = pb::key_admin_client::KeyAdminClient::new(channel)
                    .list_keys(request?)
                    .await
                    .map_err(|s| format!("list: {:?} {}", s.code(), s.message()))?
                    .into_inner();
                if page.keys.len() == 100 {
                    Ok(())
                } else {
                    Err(format!("first page had {} keys", page.keys.len()))
                }
            }
        })
    };
    let list = load::closed(&list, 1, ctx.phases).await;
    list.expect_no_errors("list keys")?;

    let rss_cached = if cache_all {
        super::warm(&channels, &tokens).await?;
        // Let moka settle and the gauges be published.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let entries = server.metric_sum("keygate_cache_entries", &[]).await?;
        let estimate = server.metric_sum("keygate_cache_bytes", &[]).await?;
        server.rss_bytes().map(|rss| (rss, entries, estimate))
    } else {
        None
    };
    server.stop().await;
    Ok(Size {
        keys,
        load: loaded.took,
        startup: startups[startups.len() / 2],
        index,
        cold,
        list,
        rss_before,
        rss_cached,
    })
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}

pub async fn run(ctx: &Ctx) -> Result<Outcome, String> {
    let mut sizes: Vec<usize> = ctx.pick(vec![10_000, 100_000], vec![1_000, 10_000]);
    if ctx.million {
        sizes.push(1_000_000);
    }
    let rss_size = ctx.pick(100_000, 10_000);
    let mut results = Vec::new();
    for &n in &sizes {
        results.push(size(ctx, n, n == rss_size).await?);
    }
    let mut table = Table::new(
        "Per key count (PostgreSQL)",
        &[
            "keys",
            "bulk load s",
            "start-up to SERVING ms (median of 3)",
            "key-id index loaded ms",
            "RSS after start MB",
            "cold Authorize p50 µs",
            "cold Authorize p99 µs",
            "cold calls failed",
            "ListKeys first page p50 ms",
            "ListKeys first page p99 ms",
        ],
    );
    let mut latency = Table::latency(&format!(
        "Cold Authorize at {RATE} calls/s (open loop) and ListKeys' first page (1 caller)"
    ));
    for r in &results {
        table.row(vec![
            thousands(r.keys as f64),
            format!("{:.1}", r.load.as_secs_f64()),
            format!("{:.0}", r.startup.as_secs_f64() * 1000.0),
            format!("{:.0}", r.index.as_secs_f64() * 1000.0),
            r.rss_before.map_or("?".into(), |b| format!("{:.1}", mb(b))),
            format!("{:.0}", r.cold.us(0.5)),
            format!("{:.0}", r.cold.us(0.99)),
            r.cold.errors.to_string(),
            format!("{:.2}", r.list.ms(0.5)),
            format!("{:.2}", r.list.ms(0.99)),
        ]);
        latency.stats(
            &format!("{} keys: cold Authorize", thousands(r.keys as f64)),
            &r.cold,
        );
        latency.stats(
            &format!("{} keys: ListKeys", thousands(r.keys as f64)),
            &r.list,
        );
    }
    let (first, last) = (&results[0], &results[results.len() - 1]);
    let (lo, hi) = (thousands(first.keys as f64), thousands(last.keys as f64));
    let mut targets = vec![
        Target::ratio_at_most(
            &format!("cold Authorize p99 at {hi} keys ÷ at {lo}"),
            last.cold.us(0.99) / first.cold.us(0.99),
            1.2,
        ),
        Target::ratio_at_most(
            &format!("start-up to SERVING at {hi} keys ÷ at {lo}"),
            last.startup.as_secs_f64() / first.startup.as_secs_f64(),
            1.2,
        ),
        Target::ms_at_most(
            &format!("ListKeys first page p99 at {hi} keys"),
            last.list.ms(0.99),
            5.0,
        ),
    ];
    if let Some(r) = results.iter().find(|r| r.keys == rss_size) {
        match r.rss_cached {
            Some((rss, entries, estimate)) => targets.push(Target::new(
                &format!(
                    "RSS with {} keys cached ({} cache entries; the cache's own estimate of them: {:.1} MB; RSS before caching: {:.1} MB)",
                    thousands(rss_size as f64),
                    thousands(entries),
                    estimate / 1024.0 / 1024.0,
                    r.rss_before.map_or(0.0, mb)
                ),
                "≤ 150 MB",
                format!("{:.1} MB", mb(rss)),
                Some(mb(rss) <= 150.0),
            )),
            None => targets.push(Target::new(
                "RSS with keys cached",
                "≤ 150 MB",
                "not readable".into(),
                None,
            )),
        }
    }
    Ok(Outcome {
        number: 6,
        name: "scale".into(),
        method: format!(
            "For each key count a fresh PostgreSQL database, keys bulk-loaded with COPY \
             (1,000 organizations), then keygate started {STARTS} times (start-up is from \
             spawning the process until grpc.health.v1 answers SERVING; the key-id index \
             loads in the background after that). Cold Authorize: keys never asked for \
             before, at {RATE} calls/s. RSS is the server process's VmRSS after every one of \
             {} keys was authorized once.",
            thousands(rss_size as f64)
        ),
        quick: ctx.quick,
        tables: vec![table, latency],
        targets,
        charts: Vec::new(),
        notes: Vec::new(),
    })
}
