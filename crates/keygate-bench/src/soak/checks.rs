//! The soak's checks and figures, as Markdown (soak.md) and a list of what
//! failed.

use std::fmt::Write as _;
use std::time::Duration;

use super::sample::Sample;
use super::workload::{OTHER_REPLICA_BOUND, Revocation, WatchSummary};
use super::{Opts, WARMUP_SHARE};
use crate::load::{Stats, histogram};
use crate::outcome::thousands;

/// RSS after warm-up may grow by at most this share.
const MEMORY_GROWTH: f64 = 0.10;
/// Open files other than database connections: the same share (at least 3).
const FD_GROWTH: f64 = 0.10;
/// Per replica: the main pool's 16, the feed pool's 2 and the LISTEN connection.
const MAX_CONNECTIONS: u64 = 16 + 2 + 1;

pub struct Inputs<'a> {
    pub opts: &'a Opts,
    pub duration: Duration,
    pub samples: &'a [Sample],
    pub revocations: &'a [Revocation],
    pub watch: &'a WatchSummary,
    /// Each replica's log (RUST_LOG=warn).
    pub logs: &'a [(String, String)],
}

pub struct Report {
    pub markdown: String,
    pub failed: Vec<String>,
}

struct Check {
    what: String,
    bound: String,
    measured: String,
    ok: bool,
}

fn mib(b: u64) -> f64 {
    b as f64 / 1_048_576.0
}

/// Every interval's stats of one kind on one replica, merged.
fn merged(samples: &[Sample], replica: usize, pick: fn(&super::IntervalLoad) -> &Stats) -> Stats {
    let mut iter = samples
        .iter()
        .filter_map(|s| s.replicas.get(replica)?.load.as_ref())
        .map(pick);
    let mut total = match iter.next() {
        Some(first) => first.clone(),
        None => return empty(),
    };
    for s in iter {
        // Same bounds everywhere: adding cannot fail.
        let _ = total.hist.add(&s.hist);
        total.errors += s.errors;
        if total.first_error.is_none() {
            total.first_error.clone_from(&s.first_error);
        }
        total.overloaded |= s.overloaded;
    }
    total
}

fn empty() -> Stats {
    Stats {
        hist: histogram(),
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        offered: None,
        overloaded: false,
    }
}

fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let i = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[i.min(values.len() - 1)]
}

impl Report {
    pub fn new(i: &Inputs<'_>) -> Self {
        let mut checks = Vec::new();
        let mut md = String::new();
        let warmup = i.duration.as_secs_f64() * WARMUP_SHARE;
        let names: Vec<&str> = i
            .samples
            .first()
            .map(|s| s.replicas.iter().map(|r| r.name).collect())
            .unwrap_or_default();
        let last = i.samples.last();
        // The first sample at or after the end of warm-up.
        let base = i.samples.iter().find(|s| s.t >= warmup).or(last);
        let after: Vec<&Sample> = match base {
            Some(b) => i.samples.iter().filter(|s| s.t > b.t).collect(),
            None => Vec::new(),
        };
        let _ = writeln!(
            md,
            "Soak: {:.0} minutes, two replicas on one PostgreSQL database, a sample every {:.0} s. \
             Per replica: {} cached Authorize/s over {} keys, {} uncached/s over {} keys (one in \
             five a token of no key), {} admin writes/s (CreateKey and UpdateKey in turn), {} Watch \
             subscribers; a key revoked every {:.0} s, on each replica in turn. Warm-up: the first \
             {:.0} % of the run (until the sample at {:.0} s).\n",
            i.duration.as_secs_f64() / 60.0,
            i.opts.interval,
            i.opts.cached_rate,
            super::CACHED_KEYS,
            i.opts.uncached_rate,
            thousands(super::UNCACHED_KEYS as f64),
            i.opts.admin_rate,
            i.opts.subscribers,
            i.opts.revoke_every,
            WARMUP_SHARE * 100.0,
            base.map_or(0.0, |b| b.t),
        );

        let _ = writeln!(
            md,
            "| replica | RSS start | RSS after warm-up | RSS max after | RSS end | fds start / end (max) | DB connections min–max | Authorize cached p99 | uncached p99 | admin write p99 | store read p99 (worst interval) | calls | errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        let mut errors_total = 0u64;
        let mut overloaded = false;
        for (r, name) in names.iter().enumerate() {
            let at = |s: Option<&Sample>| s.and_then(|s| s.replicas.get(r)).cloned();
            let (Some(start), Some(b), Some(end)) = (at(i.samples.first()), at(base), at(last))
            else {
                continue;
            };
            let rss_max = after
                .iter()
                .filter_map(|s| s.replicas.get(r))
                .map(|x| x.rss_bytes)
                .max()
                .unwrap_or(b.rss_bytes);
            let ceiling = b.rss_bytes as f64 * (1.0 + MEMORY_GROWTH);
            checks.push(Check {
                what: format!("{name}: RSS after warm-up"),
                bound: format!(
                    "≤ {:.1} MiB (+{:.0} %)",
                    ceiling / 1_048_576.0,
                    MEMORY_GROWTH * 100.0
                ),
                measured: format!(
                    "max {:.1} MiB (+{:.1} %)",
                    mib(rss_max),
                    (rss_max as f64 / b.rss_bytes as f64 - 1.0) * 100.0
                ),
                ok: rss_max as f64 <= ceiling,
            });
            let other_fds = |x: &super::sample::ReplicaSample| x.fds.saturating_sub(x.connections);
            let fd_base = other_fds(&b);
            let fd_max = after
                .iter()
                .filter_map(|s| s.replicas.get(r))
                .map(other_fds)
                .max()
                .unwrap_or(fd_base);
            let fd_ceiling = fd_base + ((fd_base as f64 * FD_GROWTH).ceil() as u64).max(3);
            checks.push(Check {
                what: format!("{name}: open files other than DB connections, after warm-up"),
                bound: format!("≤ {fd_ceiling}"),
                measured: format!("max {fd_max} (warm-up {fd_base})"),
                ok: fd_max <= fd_ceiling,
            });
            let conns: Vec<u64> = i
                .samples
                .iter()
                .filter_map(|s| s.replicas.get(r))
                .map(|x| x.connections)
                .collect();
            let conn_max = conns.iter().copied().max().unwrap_or(0);
            checks.push(Check {
                what: format!("{name}: PostgreSQL connections"),
                bound: format!("≤ {MAX_CONNECTIONS}"),
                measured: format!("max {conn_max}"),
                ok: conn_max <= MAX_CONNECTIONS,
            });
            let fds_max = i
                .samples
                .iter()
                .filter_map(|s| s.replicas.get(r))
                .map(|x| x.fds)
                .max()
                .unwrap_or(0);
            let cached = merged(i.samples, r, |l| &l.cached);
            let uncached = merged(i.samples, r, |l| &l.uncached);
            let admin = merged(i.samples, r, |l| &l.admin);
            let mut store: Vec<f64> = i
                .samples
                .iter()
                .filter_map(|s| s.replicas.get(r)?.store_get_p99_ms)
                .collect();
            let store_worst = quantile(&mut store, 1.0);
            let store_errors: f64 = i
                .samples
                .iter()
                .filter_map(|s| s.replicas.get(r))
                .map(|x| x.store_errors)
                .sum();
            let errors = cached.errors + uncached.errors + admin.errors;
            errors_total += errors;
            overloaded |= cached.overloaded || uncached.overloaded || admin.overloaded;
            let _ = writeln!(
                md,
                "| {name} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} / {} ({fds_max}) | {}–{conn_max} | {:.2} ms | {:.2} ms | {:.2} ms | ≤ {store_worst} ms | {} | {errors} |",
                mib(start.rss_bytes),
                mib(b.rss_bytes),
                mib(rss_max),
                mib(end.rss_bytes),
                start.fds,
                end.fds,
                conns.iter().copied().min().unwrap_or(0),
                cached.ms(0.99),
                uncached.ms(0.99),
                admin.ms(0.99),
                thousands((cached.calls() + uncached.calls() + admin.calls()) as f64),
            );
            for (what, s) in [
                ("cached", &cached),
                ("uncached", &uncached),
                ("admin", &admin),
            ] {
                checks.push(Check {
                    what: format!("{name}: {what} calls with an unexpected answer"),
                    bound: "0".into(),
                    measured: match &s.first_error {
                        Some(e) if s.errors > 0 => format!("{} (first: {e})", s.errors),
                        _ => format!("0 of {}", thousands(s.calls() as f64)),
                    },
                    ok: s.errors == 0 && !s.overloaded,
                });
            }
            checks.push(Check {
                what: format!("{name}: store errors (keygate_store_errors_total)"),
                bound: "0".into(),
                measured: format!("{store_errors}"),
                ok: store_errors == 0.0,
            });
        }
        let denials: u64 = i
            .samples
            .iter()
            .flat_map(|s| s.replicas.iter())
            .filter_map(|r| r.load.as_ref())
            .map(|l| l.expected_denials)
            .sum();
        let _ = writeln!(
            md,
            "\nExpected denials (tokens of no key): {}; unexpected answers: {errors_total}{}.",
            thousands(denials as f64),
            if overloaded {
                " (an interval was overloaded)"
            } else {
                ""
            }
        );

        for (name, log) in i.logs {
            let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
            let warns = log.lines().filter(|l| l.contains("WARN")).count();
            checks.push(Check {
                what: format!("{name}: ERROR lines in its log ({warns} WARN)"),
                bound: "0".into(),
                measured: match errors.first() {
                    Some(first) => format!("{} (first: {})", errors.len(), first.trim()),
                    None => "0".into(),
                },
                ok: errors.is_empty(),
            });
        }
        checks.push(Check {
            what: format!(
                "Watch: {} subscribers stay open and in order",
                i.watch.subscribers
            ),
            bound: "no problem".into(),
            measured: match i.watch.problems.first() {
                Some(p) => format!("{} (first: {p})", i.watch.problems.len()),
                None => format!(
                    "{} events, {} heartbeats",
                    thousands(i.watch.events as f64),
                    thousands(i.watch.heartbeats as f64)
                ),
            },
            ok: i.watch.problems.is_empty(),
        });

        Self::revocation_checks(i.revocations, &mut checks, &mut md);

        let _ = writeln!(md, "\n| check | bound | measured | |\n|---|---|---|---|");
        let mut failed = Vec::new();
        for c in &checks {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                c.what,
                c.bound,
                c.measured.replace('|', "/"),
                if c.ok { "ok" } else { "FAILED" }
            );
            if !c.ok {
                failed.push(format!("{}: {} (bound {})", c.what, c.measured, c.bound));
            }
        }
        Self {
            markdown: md,
            failed,
        }
    }

    fn revocation_checks(revs: &[Revocation], checks: &mut Vec<Check>, md: &mut String) {
        let bound_ms = OTHER_REPLICA_BOUND.as_secs_f64() * 1e3;
        let problems: Vec<&Revocation> = revs.iter().filter(|r| r.problem.is_some()).collect();
        let local_late = revs.iter().filter(|r| !r.local_denied).count();
        let mut other: Vec<f64> = revs.iter().filter_map(|r| r.other_ms).collect();
        let other_late = revs
            .iter()
            .filter(|r| r.other_ms.is_none_or(|ms| ms > bound_ms))
            .count();
        let mut watch: Vec<f64> = revs.iter().filter_map(|r| r.watch_ms).collect();
        let watch_late = revs
            .iter()
            .filter(|r| r.watch_ms.is_none_or(|ms| ms > bound_ms))
            .count();
        let _ = writeln!(
            md,
            "\nRevocations: {} (each key cached on both replicas first). From RevokeKey's return \
             until the other replica denied the key: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
             until every Watch subscriber on both replicas had the event: p50 {:.2} ms, p99 \
             {:.2} ms, max {:.2} ms.",
            revs.len(),
            quantile(&mut other, 0.5),
            quantile(&mut other, 0.99),
            quantile(&mut other, 1.0),
            quantile(&mut watch, 0.5),
            quantile(&mut watch, 0.99),
            quantile(&mut watch, 1.0),
        );
        checks.push(Check {
            what: "revocations made".into(),
            bound: "≥ 1, none failing".into(),
            measured: match problems.first().and_then(|r| r.problem.as_ref()) {
                Some(p) => format!("{} failed (first: {p})", problems.len()),
                None => revs.len().to_string(),
            },
            ok: !revs.is_empty() && problems.is_empty(),
        });
        checks.push(Check {
            what: "revoked key allowed by the revoking replica after RevokeKey returned".into(),
            bound: "never (README: before RevokeKey returns)".into(),
            measured: format!("{local_late} of {}", revs.len()),
            ok: local_late == 0,
        });
        checks.push(Check {
            what: "revoked key still allowed by the other replica".into(),
            bound: format!("≤ {bound_ms:.0} ms (README: at worst one poll interval)"),
            measured: format!("{other_late} late, max {:.2} ms", quantile(&mut other, 1.0)),
            ok: other_late == 0,
        });
        checks.push(Check {
            what: "REVOKED event at every Watch subscriber".into(),
            bound: format!("≤ {bound_ms:.0} ms"),
            measured: format!("{watch_late} late, max {:.2} ms", quantile(&mut watch, 1.0)),
            ok: watch_late == 0,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::IntervalLoad;
    use super::super::sample::ReplicaSample;
    use super::*;

    fn opts() -> Opts {
        Opts {
            minutes: 1.0,
            interval: 10.0,
            out: "unused".into(),
            cached_rate: 1.0,
            uncached_rate: 1.0,
            admin_rate: 1.0,
            revoke_every: 1.0,
            subscribers: 1,
        }
    }

    fn load() -> IntervalLoad {
        IntervalLoad {
            cached: empty(),
            uncached: empty(),
            admin: empty(),
            expected_denials: 0,
        }
    }

    /// A sample every 10 s over a minute; replica a's RSS is `rss(t)` MiB.
    fn samples(rss: impl Fn(f64) -> f64) -> Vec<Sample> {
        (0..=6)
            .map(|i| {
                let t = f64::from(i) * 10.0;
                let replica = |name, mib: f64| ReplicaSample {
                    name,
                    rss_bytes: (mib * 1_048_576.0) as u64,
                    fds: 30,
                    connections: 10,
                    load: (i > 0).then(load),
                    store_get_p99_ms: None,
                    store_write_p99_ms: None,
                    store_errors: 0.0,
                    cache_entries: 0.0,
                };
                Sample {
                    t,
                    replicas: vec![replica("a", rss(t)), replica("b", 20.0)],
                }
            })
            .collect()
    }

    fn revocation(other_ms: f64, local_denied: bool) -> Revocation {
        Revocation {
            t: 1.0,
            revoker: "a",
            local_denied,
            other_ms: Some(other_ms),
            watch_ms: Some(other_ms),
            watch_missing: 0,
            problem: None,
        }
    }

    fn failed(samples: &[Sample], revocations: &[Revocation], log: &str) -> Vec<String> {
        let opts = opts();
        let watch = WatchSummary {
            subscribers: 2,
            events: 1,
            heartbeats: 1,
            problems: Vec::new(),
        };
        let logs = [("a".to_owned(), log.to_owned())];
        Report::new(&Inputs {
            opts: &opts,
            duration: Duration::from_secs(60),
            samples,
            revocations,
            watch: &watch,
            logs: &logs,
        })
        .failed
    }

    #[test]
    fn a_steady_run_passes() {
        // Growth during warm-up (until the 20 s sample) does not count.
        let s = samples(|t| if t < 20.0 { 10.0 } else { 20.0 + t / 100.0 });
        assert_eq!(
            failed(&s, &[revocation(5.0, true)], "INFO fine"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn memory_growing_past_ten_percent_after_warm_up_fails() {
        let s = samples(|t| if t < 60.0 { 20.0 } else { 22.2 });
        let f = failed(&s, &[revocation(5.0, true)], "");
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].starts_with("a: RSS after warm-up"), "{f:?}");
    }

    #[test]
    fn a_revoked_key_working_too_long_fails() {
        let s = samples(|_| 20.0);
        let f = failed(&s, &[revocation(1_500.0, true)], "");
        assert!(
            f.iter()
                .any(|f| f.contains("still allowed by the other replica")),
            "{f:?}"
        );
        let f = failed(&s, &[revocation(5.0, false)], "");
        assert!(
            f.iter().any(|f| f.contains("by the revoking replica")),
            "{f:?}"
        );
        assert!(
            !failed(&s, &[], "").is_empty(),
            "a soak without revocations proves nothing"
        );
    }

    #[test]
    fn an_error_in_a_replica_log_fails() {
        let s = samples(|_| 20.0);
        let f = failed(
            &s,
            &[revocation(5.0, true)],
            "2026-01-01T00:00:00Z ERROR keygate: boom",
        );
        assert!(f.iter().any(|f| f.contains("ERROR lines")), "{f:?}");
    }
}
