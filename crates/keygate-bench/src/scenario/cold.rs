//! Scenario 2, the cold path: every Authorize a cache miss (each call a key
//! never asked for before), on PostgreSQL and SQLite, and whether concurrent
//! misses for one key share one store read.
//! Targets: PostgreSQL p99 ≤ 1 ms at 1,000 calls/s, open loop; N concurrent
//! misses for one key cost one key read.

use std::time::{Duration, Instant};

use keygate_proto::v1 as pb;

use super::authorize_call;
use crate::Ctx;
use crate::load;
use crate::outcome::{Outcome, Table, Target};
use crate::scenario::limit::MAX_IN_FLIGHT;
use crate::server::{Database, Keygate, bootstrap, migrate};

/// The open-loop rate of the target.
const RATE: f64 = 1_000.0;

/// The diagnostic case's name (see `run`).
const DEFERRED: &str = "PostgreSQL, usage flush deferred past the run";

/// Concurrent Authorize calls for one uncached key in the coalescing test.
const CONCURRENT_MISSES: usize = 64;

/// Waits (at most 60 s) until the key-id index has read every page of `keys`.
pub async fn index_loaded(server: &Keygate, keys: usize) -> Result<Duration, String> {
    let started = Instant::now();
    let pages = (keys / 10_000 + 1) as f64;
    loop {
        if server.store_queries("key_ids_after").await? >= pages {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err("the key-id index did not load in 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Backend {
    name: &'static str,
    open: load::Stats,
    cached: load::Stats,
    coalesced_keys: usize,
    reads: f64,
    misses: f64,
}

async fn backend(
    ctx: &Ctx,
    db: &Database,
    name: &'static str,
    flags: &[&str],
) -> Result<Backend, String> {
    migrate(db).await?;
    let calls = (RATE * (ctx.phases.warmup + ctx.phases.measure).as_secs_f64()) as usize;
    let coalesce = ctx.pick(50, 10);
    let count = calls + coalesce + 1_000;
    let keys = crate::bulk::load(db, count, count).await?.keys;
    bootstrap(db).await?;
    let server = Keygate::start(db, flags).await?;
    index_loaded(&server, count).await?;
    let channels = server.channels(ctx.connections).await?;
    let tokens: Vec<String> = keys.iter().map(|(_, t)| t.clone()).collect();
    let (open_tokens, rest) = tokens.split_at(calls + 200);
    let (coalesce_tokens, cached_tokens) = rest.split_at(coalesce);

    // Each call n takes token n: never asked for before, so a miss.
    let cold = authorize_call(&channels, open_tokens, pb::Decision::Allow);
    // Failed calls (UNAVAILABLE when misses outrun the store-read cap) are
    // a finding, counted below, not an error of the benchmark.
    let open = load::open(&cold, RATE, ctx.phases, MAX_IN_FLIGHT).await;
    // The same rate on warm keys, for comparison.
    let cached_tokens = &cached_tokens[..16];
    super::warm(&channels, cached_tokens).await?;
    let warm = authorize_call(&channels, cached_tokens, pb::Decision::Allow);
    let cached = load::open(&warm, RATE, ctx.phases, MAX_IN_FLIGHT).await;

    // Coalescing: 64 concurrent misses for each fresh key.
    let before = server.store_queries("get").await?;
    let misses_before = server.metric_sum("keygate_cache_misses_total", &[]).await?;
    for token in coalesce_tokens {
        let one = authorize_call(&channels, std::slice::from_ref(token), pb::Decision::Allow);
        let calls: Vec<_> = (0..CONCURRENT_MISSES as u64).map(|n| one(n)).collect();
        for r in futures_util::future::join_all(calls).await {
            r?;
        }
    }
    let reads = server.store_queries("get").await? - before;
    let misses = server.metric_sum("keygate_cache_misses_total", &[]).await? - misses_before;
    server.stop().await;
    Ok(Backend {
        name,
        open,
        cached,
        coalesced_keys: coalesce_tokens.len(),
        reads,
        misses,
    })
}

pub async fn run(ctx: &Ctx) -> Result<Outcome, String> {
    let mut results = Vec::new();
    // The third case is a diagnosis, not a target: the same PostgreSQL run
    // with the usage flush (last-used times and analytics, every 5 s) put
    // off past the run, to show what its writes add to the cold tail when
    // they share the machine's two cores with everything else.
    for (name, flags) in [
        ("PostgreSQL", &[][..]),
        ("SQLite", &[][..]),
        (DEFERRED, &["--usage-flush-interval", "1h"][..]),
    ] {
        let db = if name == "SQLite" {
            Database::sqlite()?
        } else {
            Database::postgres().await?
        };
        let r = backend(ctx, &db, name, flags).await;
        db.drop_now().await;
        results.push(r?);
    }
    let mut open = Table::latency(&format!(
        "Open loop at {RATE} calls/s: every call a key never asked for (a cache miss), then cached keys at the same rate"
    ));
    let mut coalescing = Table::new(
        &format!("{CONCURRENT_MISSES} concurrent Authorize calls for each uncached key"),
        &[
            "backend",
            "keys",
            "calls",
            "cache misses",
            "key reads (get)",
        ],
    );
    let mut targets = Vec::new();
    for r in &results {
        open.stats(&format!("{}: cold (miss)", r.name), &r.open);
        open.stats(&format!("{}: cached", r.name), &r.cached);
        coalescing.row(vec![
            r.name.into(),
            r.coalesced_keys.to_string(),
            (r.coalesced_keys * CONCURRENT_MISSES).to_string(),
            format!("{:.0}", r.misses),
            format!("{:.0}", r.reads),
        ]);
        targets.push(Target::new(
            &format!("{}: cold calls that failed", r.name),
            "0",
            format!(
                "{}{}",
                r.open.errors,
                r.open
                    .first_error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" ({e})"))
            ),
            Some(r.open.errors == 0),
        ));
        if r.name == "PostgreSQL" {
            targets.push(Target::ms_at_most(
                "PostgreSQL: cold Authorize p99 at 1,000 calls/s",
                r.open.ms(0.99),
                1.0,
            ));
        } else {
            targets.push(Target::new(
                &format!("{}: cold Authorize p99 at 1,000 calls/s", r.name),
                "(none set)",
                format!("{:.3} ms", r.open.ms(0.99)),
                None,
            ));
        }
        targets.push(Target::new(
            &format!(
                "{}: key reads for {CONCURRENT_MISSES} concurrent misses of one key",
                r.name
            ),
            "1 a key",
            format!("{:.2} a key", r.reads / r.coalesced_keys as f64),
            Some(r.reads <= r.coalesced_keys as f64),
        ));
    }
    Ok(Outcome {
        number: 2,
        name: "cold".into(),
        method: "Keys bulk-loaded with SQL before keygate starts (its key-id index loaded \
                 before measuring); every call of the cold run uses a key never asked for \
                 before, so each is a cache miss and one key read. PostgreSQL is the machine's \
                 local server over loopback TCP; SQLite a file on local disk. The last case \
                 repeats PostgreSQL with `--usage-flush-interval 1h`: no last-used or \
                 analytics writes during the run (a diagnosis of the tail, no target)."
            .into(),
        quick: ctx.quick,
        tables: vec![open, coalescing],
        targets,
        charts: Vec::new(),
        notes: Vec::new(),
    })
}
