//! What one sample of the soak reads of each replica: resident memory and
//! open files from `/proc`, its database connections from
//! `pg_stat_activity`, and its store latency from the Prometheus histogram
//! on its metrics port (the buckets' growth since the last sample).

use std::collections::HashMap;
use std::net::SocketAddr;

use sqlx::Connection;

use super::{IntervalLoad, Replica};

/// The store query histogram, cumulative per (operation, bucket bound).
type Buckets = HashMap<(String, String), f64>;

const STORE_HISTOGRAM: &str = "keygate_store_query_duration_seconds_bucket";

/// Store operations that are admin writes (RevokeKey and UpdateKey are `update`).
const WRITE_OPERATIONS: &[&str] = &["insert", "update", "delete"];

/// One replica at one sample.
#[derive(Debug, Clone)]
pub struct ReplicaSample {
    pub name: &'static str,
    pub rss_bytes: u64,
    pub fds: u64,
    /// Its connections in `pg_stat_activity` (pool, feed pool and LISTEN).
    pub connections: u64,
    /// The load it answered since the last sample (none at the first).
    pub load: Option<IntervalLoad>,
    /// Upper bound of the bucket holding the p99 of key reads since the last sample, ms.
    pub store_get_p99_ms: Option<f64>,
    /// The same for admin writes (insert, update, delete).
    pub store_write_p99_ms: Option<f64>,
    /// `keygate_store_errors_total` since the last sample.
    pub store_errors: f64,
    pub cache_entries: f64,
}

/// Every replica at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds since the load started.
    pub t: f64,
    pub replicas: Vec<ReplicaSample>,
}

impl Sample {
    /// One line for the console while the soak runs.
    pub fn line(&self) -> String {
        let mut out = format!("t={:>6.0}s", self.t);
        for r in &self.replicas {
            let p99 = |s: Option<&crate::load::Stats>| s.map_or(0.0, |s| s.ms(0.99));
            let errors = r
                .load
                .as_ref()
                .map_or(0, |l| l.cached.errors + l.uncached.errors + l.admin.errors);
            out.push_str(&format!(
                "  {}: rss {:.1} MiB, fds {}, conns {}, p99 cached {:.2} ms, uncached {:.2} ms, admin {:.2} ms, errors {}",
                r.name,
                r.rss_bytes as f64 / 1_048_576.0,
                r.fds,
                r.connections,
                p99(r.load.as_ref().map(|l| &l.cached)),
                p99(r.load.as_ref().map(|l| &l.uncached)),
                p99(r.load.as_ref().map(|l| &l.admin)),
                errors,
            ));
        }
        out
    }
}

/// Reads samples; keeps the last histogram of each replica.
pub struct Sampler {
    conn: sqlx::PgConnection,
    database: String,
    previous: HashMap<&'static str, (Buckets, f64)>,
}

impl Sampler {
    /// Connects to the server's maintenance database (so the sampler is not
    /// one of the soak database's connections); `db_url` names the soak's.
    pub async fn connect(db_url: &str) -> Result<Self, String> {
        let conn = sqlx::PgConnection::connect(&crate::server::postgres_server())
            .await
            .map_err(|e| format!("sampler: connect to PostgreSQL: {e}"))?;
        let database = db_url
            .split('?')
            .next()
            .and_then(|u| u.rsplit('/').next())
            .unwrap_or_default()
            .to_owned();
        Ok(Self {
            conn,
            database,
            previous: HashMap::new(),
        })
    }

    /// Samples every replica; `loads` (in replica order) is what each
    /// answered since the last sample.
    pub async fn sample(
        &mut self,
        replicas: &[Replica],
        t: f64,
        loads: Option<Vec<IntervalLoad>>,
    ) -> Result<Sample, String> {
        let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
            "SELECT application_name, count(*)::int8 FROM pg_stat_activity \
             WHERE datname = $1 GROUP BY application_name",
        )
        .bind(&self.database)
        .fetch_all(&mut self.conn)
        .await
        .map_err(|e| format!("pg_stat_activity: {e}"))?;
        let mut loads = loads.map(Vec::into_iter);
        let mut out = Vec::with_capacity(replicas.len());
        for r in replicas {
            let app = format!("keygate-soak-{}", r.name);
            let connections = rows
                .iter()
                .filter(|(name, _)| name.as_deref() == Some(app.as_str()))
                .map(|(_, n)| u64::try_from(*n).unwrap_or(0))
                .sum();
            let fds = std::fs::read_dir(format!("/proc/{}/fd", r.pid))
                .map_err(|e| format!("{} fds: {e}", r.name))?
                .count() as u64;
            let rss_bytes = r
                .server
                .rss_bytes()
                .ok_or_else(|| format!("{}: no RSS (has it exited?)", r.name))?;
            let metrics = r.server.metrics().await?;
            let buckets = store_buckets(&metrics);
            let errors = metrics
                .iter()
                .filter(|(n, _)| n.starts_with("keygate_store_errors_total"))
                .map(|(_, v)| v)
                .sum::<f64>();
            let cache_entries = metrics
                .iter()
                .find(|(n, _)| n == "keygate_cache_entries")
                .map_or(0.0, |(_, v)| *v);
            let (store_get_p99_ms, store_write_p99_ms, store_errors) =
                match self.previous.get(r.name) {
                    Some((before, errors_before)) => (
                        p99_ms(&buckets, before, &["get"]),
                        p99_ms(&buckets, before, WRITE_OPERATIONS),
                        errors - errors_before,
                    ),
                    None => (None, None, 0.0),
                };
            self.previous.insert(r.name, (buckets, errors));
            out.push(ReplicaSample {
                name: r.name,
                rss_bytes,
                fds,
                connections,
                load: loads.as_mut().and_then(Iterator::next),
                store_get_p99_ms,
                store_write_p99_ms,
                store_errors,
                cache_entries,
            });
        }
        Ok(Sample { t, replicas: out })
    }
}

/// The store histogram's buckets: `name{operation="get",le="0.001"} 12`.
fn store_buckets(metrics: &[(String, f64)]) -> Buckets {
    metrics
        .iter()
        .filter(|(n, _)| n.starts_with(STORE_HISTOGRAM))
        .filter_map(|(n, v)| Some(((label(n, "operation")?, label(n, "le")?), *v)))
        .collect()
}

fn label(sample: &str, name: &str) -> Option<String> {
    let start = sample.find(&format!("{name}=\""))? + name.len() + 2;
    let len = sample[start..].find('"')?;
    Some(sample[start..start + len].to_owned())
}

/// The upper bound (ms) of the bucket where the 99th percentile of
/// `operations`' queries between two snapshots falls; `None` without any.
/// Past the last finite bound (1 s) it is infinite.
fn p99_ms(now: &Buckets, before: &Buckets, operations: &[&str]) -> Option<f64> {
    let mut by_bound: HashMap<String, f64> = HashMap::new();
    for ((op, le), v) in now {
        if operations.contains(&op.as_str()) {
            let prior = before
                .get(&(op.clone(), le.clone()))
                .copied()
                .unwrap_or(0.0);
            *by_bound.entry(le.clone()).or_default() += v - prior;
        }
    }
    let mut bounds: Vec<(f64, f64)> = by_bound
        .into_iter()
        .map(|(le, n)| (le.parse::<f64>().unwrap_or(f64::INFINITY), n))
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = bounds.last().map_or(0.0, |b| b.1);
    if total <= 0.0 {
        return None;
    }
    // Buckets are cumulative: the first whose count reaches 99 % of all.
    bounds
        .iter()
        .find(|(_, n)| *n >= 0.99 * total)
        .map(|(le, _)| le * 1000.0)
}

/// The pid of the `keygate serve` listening on `addr` (the bench's server
/// handle keeps its child to itself; each replica's address is unique).
pub fn pid_listening(addr: SocketAddr) -> Result<u32, String> {
    let want = addr.to_string();
    let dir = std::fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))?;
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let serves = args.iter().any(|a| *a == b"serve");
        let listens = args
            .windows(2)
            .any(|w| w[0] == b"--listen" && w[1] == want.as_bytes());
        if serves && listens {
            return Ok(pid);
        }
    }
    Err(format!("no keygate serve process listening on {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(op: &str, counts: &[(&str, f64)]) -> Buckets {
        counts
            .iter()
            .map(|(le, n)| ((op.to_owned(), (*le).to_owned()), *n))
            .collect()
    }

    #[test]
    fn p99_is_the_bucket_where_the_growth_reaches_99_percent() {
        let before = buckets("get", &[("0.001", 10.0), ("0.005", 10.0), ("+Inf", 10.0)]);
        let now = buckets(
            "get",
            &[("0.001", 100.0), ("0.005", 110.0), ("+Inf", 110.0)],
        );
        // 100 new queries: 90 under 1 ms, 10 between 1 and 5 ms.
        assert_eq!(p99_ms(&now, &before, &["get"]), Some(5.0));
        assert_eq!(p99_ms(&now, &now, &["get"]), None);
        assert_eq!(p99_ms(&now, &before, &["update"]), None);
    }

    #[test]
    fn labels_are_read_from_a_sample_name() {
        let n = r#"keygate_store_query_duration_seconds_bucket{operation="get",le="0.001"}"#;
        assert_eq!(label(n, "operation").as_deref(), Some("get"));
        assert_eq!(label(n, "le").as_deref(), Some("0.001"));
        assert_eq!(label(n, "kind"), None);
    }
}
