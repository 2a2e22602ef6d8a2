//! The soak (issue 12): two `keygate serve` replicas on one fresh PostgreSQL
//! database under a steady mixed load for `--minutes`, sampled every
//! `--interval` seconds, then checked. It writes `soak.csv` (one row per
//! sample and replica), `soak-revocations.csv` (one row per revocation),
//! `soak.png` (RSS and p99 over time) and `soak.md` (the checks and
//! figures), and fails when a check fails:
//!
//! - memory: after warm-up (the first 20 % of the run), every sample's RSS
//!   stays within 10 % of the first sample after it;
//! - errors: every call got the answer it expects (ALLOW for live keys, DENY
//!   for unknown and revoked ones), no Watch stream broke or went out of
//!   order, the store counted no error and neither replica logged an ERROR;
//! - revocation: every revoked key is denied by the replica that revoked it
//!   as soon as RevokeKey returns, and by the other replica and every Watch
//!   subscriber within the README's bound for a healthy replica (one
//!   `--feed-poll-interval`, 1 s);
//! - resources: database connections per replica within the pools' size,
//!   and open files other than those connections within 10 % of warm-up.

mod checks;
mod sample;
mod workload;
mod write;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::load::{self, Phases, Stats};
use crate::server::{Database, Keygate, bootstrap, create_key, migrate};

/// What `keygate-bench soak` takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// How long the load runs, in minutes (setup and checks come on top).
    #[arg(long, default_value_t = 5.0)]
    minutes: f64,
    /// Seconds between two samples of each replica.
    #[arg(long, default_value_t = 10.0)]
    interval: f64,
    /// Where soak.csv, soak-revocations.csv, soak.png and soak.md go.
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
    /// Authorize calls per second and replica on cached keys.
    #[arg(long, default_value_t = 200.0)]
    cached_rate: f64,
    /// Authorize calls per second and replica on keys not in the cache (one
    /// in five with a well-formed token of no key).
    #[arg(long, default_value_t = 10.0)]
    uncached_rate: f64,
    /// Admin writes (CreateKey and UpdateKey, alternating) per second and replica.
    #[arg(long, default_value_t = 1.0)]
    admin_rate: f64,
    /// Seconds between two revocations (each on the other replica than the last).
    #[arg(long, default_value_t = 3.0)]
    revoke_every: f64,
    /// Watch subscribers per replica.
    #[arg(long, default_value_t = 2)]
    subscribers: usize,
}

/// Keys the cached load cycles through (all warm on both replicas).
const CACHED_KEYS: usize = 100;
/// Keys written with SQL before start for the uncached load: at 10 calls a
/// second and replica, a key comes round again after ~5 minutes, long after
/// its cached record expired (`--cache-ttl`, 60 s).
const UNCACHED_KEYS: usize = 5_000;
/// Keys each replica's UpdateKey calls change in turn.
const UPDATED_KEYS: usize = 10;
/// Calls in flight beyond which an interval counts as overloaded (failed).
const MAX_IN_FLIGHT: usize = 2_000;

/// The share of the run that is warm-up.
pub const WARMUP_SHARE: f64 = 0.2;

/// One replica of the soak and what is measured of it.
pub struct Replica {
    pub name: &'static str,
    pub server: Keygate,
    pub pid: u32,
    pub log: PathBuf,
}

/// The load's outcome in one interval on one replica.
#[derive(Debug, Clone)]
pub struct IntervalLoad {
    pub cached: Stats,
    pub uncached: Stats,
    pub admin: Stats,
    /// DENY answers to tokens of no key (expected).
    pub expected_denials: u64,
}

pub async fn run(opts: &Opts) -> Result<(), String> {
    let mut db = Database::postgres().await?;
    let result = soak(opts, &mut db).await;
    db.drop_now().await;
    let report = result?;
    println!("{}", report.markdown);
    println!(
        "wrote {}",
        ["soak.csv", "soak-revocations.csv", "soak.png", "soak.md"]
            .map(|f| opts.out.join(f).display().to_string())
            .join(", ")
    );
    if report.failed.is_empty() {
        Ok(())
    } else {
        Err(format!("soak failed: {}", report.failed.join("; ")))
    }
}

async fn soak(opts: &Opts, db: &mut Database) -> Result<checks::Report, String> {
    let duration = Duration::from_secs_f64((opts.minutes * 60.0).max(1.0));
    let interval = Duration::from_secs_f64(opts.interval.max(1.0));
    migrate(db).await?;
    let uncached_tokens: Vec<String> = crate::bulk::load(db, UNCACHED_KEYS, UNCACHED_KEYS)
        .await?
        .keys
        .into_iter()
        .map(|(_, token)| token)
        .collect();
    let admin = bootstrap(db).await?;

    // Each replica connects under its own application_name, so
    // pg_stat_activity tells their connections apart.
    let base_url = db.url.clone();
    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        db.url = format!("{base_url}?application_name=keygate-soak-{name}");
        let replica_name = format!("soak-{name}");
        let started = Keygate::start(db, &["--replica-name", &replica_name]).await;
        db.url.clone_from(&base_url);
        let server = started?;
        let pid = sample::pid_listening(server.addr)?;
        let log = db
            .dir
            .path()
            .join(format!("keygate-{}.log", server.addr.port()));
        replicas.push(Replica {
            name,
            server,
            pid,
            log,
        });
    }
    let replicas = Arc::new(replicas);

    let mut setup = Vec::new();
    for r in replicas.iter() {
        setup.push(r.server.channel().await?);
    }
    let mut cached_tokens = Vec::with_capacity(CACHED_KEYS);
    for i in 0..CACHED_KEYS {
        cached_tokens.push(
            create_key(&setup[0], &admin, &format!("org_soak{}", i % 10))
                .await?
                .1,
        );
    }
    let mut updated = [Vec::new(), Vec::new()];
    for (i, ids) in updated.iter_mut().enumerate() {
        for _ in 0..UPDATED_KEYS {
            ids.push(create_key(&setup[i], &admin, "org_soak_updated").await?.0);
        }
    }
    for channel in &setup {
        crate::scenario::warm(std::slice::from_ref(channel), &cached_tokens).await?;
    }

    let watch = workload::Watchers::open(&replicas, &admin, opts.subscribers).await?;
    let mut sampler = sample::Sampler::connect(&db.url).await?;
    let loads =
        workload::Loads::new(&replicas, &admin, cached_tokens, uncached_tokens, updated).await?;

    let t0 = Instant::now();
    let mut samples = vec![sampler.sample(&replicas, 0.0, None).await?];
    let probe = tokio::spawn(workload::revocations(
        Arc::clone(&replicas),
        admin.clone(),
        watch.arrivals(),
        t0,
        t0 + duration,
        Duration::from_secs_f64(opts.revoke_every.max(0.5)),
    ));
    let intervals = (duration.as_secs_f64() / interval.as_secs_f64()).ceil() as usize;
    for i in 1..=intervals {
        let measure = (t0 + interval * i as u32).saturating_duration_since(Instant::now());
        let phases = Phases {
            warmup: Duration::ZERO,
            measure,
        };
        let per_replica = futures_util::future::join_all((0..replicas.len()).map(|r| {
            let loads = &loads;
            async move {
                let (cached, uncached, admin) = tokio::join!(
                    load::open(&loads.cached[r], opts.cached_rate, phases, MAX_IN_FLIGHT),
                    load::open(
                        &loads.uncached[r],
                        opts.uncached_rate,
                        phases,
                        MAX_IN_FLIGHT
                    ),
                    load::open(&loads.admin[r], opts.admin_rate, phases, MAX_IN_FLIGHT),
                );
                IntervalLoad {
                    cached,
                    uncached,
                    admin,
                    expected_denials: loads.denials[r].swap(0, Ordering::Relaxed),
                }
            }
        }))
        .await;
        let t = t0.elapsed().as_secs_f64();
        let s = sampler.sample(&replicas, t, Some(per_replica)).await?;
        println!("{}", s.line());
        samples.push(s);
    }
    let revocations = probe.await.map_err(|e| format!("revocation task: {e}"))??;
    let watch = watch.finish();
    let logs: Vec<(String, String)> = replicas
        .iter()
        .map(|r| {
            (
                r.name.to_owned(),
                std::fs::read_to_string(&r.log).unwrap_or_default(),
            )
        })
        .collect();
    drop(loads);
    if let Ok(replicas) = Arc::try_unwrap(replicas) {
        for r in replicas {
            r.server.stop().await;
        }
    }

    let report = checks::Report::new(&checks::Inputs {
        opts,
        duration,
        samples: &samples,
        revocations: &revocations,
        watch: &watch,
        logs: &logs,
    });
    std::fs::create_dir_all(&opts.out).map_err(|e| format!("{}: {e}", opts.out.display()))?;
    write::csv(&opts.out.join("soak.csv"), &samples)?;
    write::revocations_csv(&opts.out.join("soak-revocations.csv"), &revocations)?;
    write::chart(&opts.out.join("soak.png"), &samples, duration)?;
    std::fs::write(opts.out.join("soak.md"), &report.markdown)
        .map_err(|e| format!("soak.md: {e}"))?;
    Ok(report)
}
