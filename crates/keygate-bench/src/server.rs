//! keygate as its own process (`keygate serve`, the built binary), so the
//! load generator and the server do not share a runtime; and the databases
//! it runs on.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use keygate_proto::v1 as pb;
use sqlx::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

/// The route policy every bench server loads.
pub const POLICY: &str = r#"
[[route]]
route = "POST /v1/checkouts"
scope = "checkout:create"
[[route]]
route = "GET /v1/checkouts"
scope = "checkout:read"
"#;

/// The route benchmarks authorize (and Envoy's requests match).
pub const ROUTE: &str = "POST /v1/checkouts";

/// The keygate binary: `KEYGATE_BIN`, else `keygate` beside this executable
/// (cargo puts both in the same target directory).
pub fn keygate_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KEYGATE_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let beside = me.with_file_name("keygate");
    if beside.is_file() {
        Ok(beside)
    } else {
        Err(format!(
            "no keygate binary at {} (run `cargo build --release --bin keygate` or set KEYGATE_BIN)",
            beside.display()
        ))
    }
}

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> Result<SocketAddr, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    l.local_addr().map_err(|e| format!("addr: {e}"))
}

/// The PostgreSQL server benchmarks create their databases on.
pub fn postgres_server() -> String {
    ["KEYGATE_BENCH_POSTGRES_URL", "KEYGATE_TEST_POSTGRES_URL"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database for one benchmark: a SQLite file in a temporary directory, or
/// a PostgreSQL database created for it and dropped by [`Database::drop_now`].
pub struct Database {
    pub url: String,
    pub dir: tempfile::TempDir,
    postgres: Option<(String, String)>,
}

impl Database {
    pub fn sqlite() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        Ok(Self {
            url,
            dir,
            postgres: None,
        })
    }

    pub async fn postgres() -> Result<Self, String> {
        let server = postgres_server();
        let name = format!("keygate_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&server)
            .await
            .map_err(|e| format!("connect to PostgreSQL: {e}"))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .map_err(|e| format!("create database: {e}"))?;
        let url = with_database(&server, &name);
        Ok(Self {
            url,
            dir: tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?,
            postgres: Some((server, name)),
        })
    }

    pub fn is_postgres(&self) -> bool {
        self.postgres.is_some()
    }

    /// Drops a PostgreSQL database (servers on it must be stopped first).
    pub async fn drop_now(mut self) {
        if let Some((server, name)) = self.postgres.take()
            && let Ok(mut admin) = sqlx::PgConnection::connect(&server).await
        {
            let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await;
        }
    }
}

fn with_database(server_url: &str, name: &str) -> String {
    let (base, query) = server_url
        .split_once('?')
        .map_or((server_url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let root = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    }
}

/// Runs a keygate subcommand to completion; its stdout.
async fn keygate_command(args: &[&str]) -> Result<String, String> {
    let bin = keygate_bin()?;
    let out = Command::new(&bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "keygate {}: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies the migrations (so keys can be bulk-loaded before the first start).
pub async fn migrate(db: &Database) -> Result<(), String> {
    keygate_command(&["migrate", "--database-url", &db.url]).await?;
    Ok(())
}

/// Bootstraps the SYSTEM admin key; its token.
pub async fn bootstrap(db: &Database) -> Result<String, String> {
    let out = keygate_command(&[
        "bootstrap",
        "--name",
        "bench admin",
        "--database-url",
        &db.url,
    ])
    .await?;
    out.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| "bootstrap printed no token".to_owned())
}

/// A running `keygate serve`; killed when dropped.
pub struct Keygate {
    child: Child,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    /// From spawn until grpc.health.v1 answered SERVING.
    pub startup: Duration,
    log: PathBuf,
}

impl Keygate {
    /// Starts `keygate serve` on `db` with the bench policy and `extra` flags,
    /// and waits (at most 30 s) until it answers SERVING.
    pub async fn start(db: &Database, extra: &[&str]) -> Result<Self, String> {
        Self::start_under(db, extra, &[]).await
    }

    /// Like [`Keygate::start`], run under `wrapper` (a command and its
    /// arguments, such as valgrind's) when it is not empty; the process id
    /// is then the wrapper's, which for valgrind is the server's own.
    pub async fn start_under(
        db: &Database,
        extra: &[&str],
        wrapper: &[String],
    ) -> Result<Self, String> {
        let bin = keygate_bin()?;
        let policy = db.dir.path().join("policy.toml");
        std::fs::write(&policy, POLICY).map_err(|e| format!("policy: {e}"))?;
        let addr = free_port()?;
        let metrics = free_port()?;
        let log = db.dir.path().join(format!("keygate-{}.log", addr.port()));
        let log_file = std::fs::File::create(&log).map_err(|e| format!("log: {e}"))?;
        let policy_arg = policy.display().to_string();
        let (listen, metrics_arg) = (addr.to_string(), metrics.to_string());
        let mut args = vec![
            "serve",
            "--listen",
            &listen,
            "--metrics-addr",
            &metrics_arg,
            "--policy",
            &policy_arg,
            "--database-url",
            &db.url,
        ];
        args.extend_from_slice(extra);
        let started = Instant::now();
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut c = Command::new(program);
                c.args(wrapper_args).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = command
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let mut server = Self {
            child,
            addr,
            metrics,
            startup: Duration::ZERO,
            log,
        };
        // Under valgrind, start-up is tens of times slower.
        let patience = Duration::from_secs(if wrapper.is_empty() { 30 } else { 300 });
        server.startup = server.wait_serving(started, patience).await?;
        Ok(server)
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    async fn wait_serving(
        &mut self,
        started: Instant,
        patience: Duration,
    ) -> Result<Duration, String> {
        use tonic_health::pb::health_client::HealthClient;
        let deadline = started + patience;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("keygate exited ({status}): {}", self.log_tail()));
            }
            if let Ok(channel) = Channel::from_shared(self.url())
                .map_err(|e| e.to_string())?
                .connect()
                .await
            {
                let answer = HealthClient::new(channel)
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await;
                if answer.is_ok_and(|a| {
                    a.into_inner().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                }) {
                    return Ok(started.elapsed());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "keygate not SERVING in {} s: {}",
                    patience.as_secs(),
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A new HTTP/2 connection to the server.
    pub async fn channel(&self) -> Result<Channel, String> {
        connect(&self.url()).await
    }

    /// `connections` HTTP/2 connections.
    pub async fn channels(&self, connections: usize) -> Result<Vec<Channel>, String> {
        let mut out = Vec::with_capacity(connections);
        for _ in 0..connections {
            out.push(self.channel().await?);
        }
        Ok(out)
    }

    /// The process's resident memory, in bytes (Linux `/proc`).
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// Every sample of the Prometheus exposition, as (name{labels}, value).
    pub async fn metrics(&self) -> Result<Vec<(String, f64)>, String> {
        let text = http_get(self.metrics, "/metrics").await?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.trim().parse().ok()?))
            })
            .collect())
    }

    /// The sum of every sample whose name and labels start with `prefix` and
    /// contain each of `labels` (e.g. `operation="get"`).
    pub async fn metric_sum(&self, prefix: &str, labels: &[&str]) -> Result<f64, String> {
        Ok(self
            .metrics()
            .await?
            .iter()
            .filter(|(n, _)| {
                (n == prefix || n.starts_with(&format!("{prefix}{{")))
                    && labels.iter().all(|l| n.contains(l))
            })
            .map(|(_, v)| v)
            .sum())
    }

    /// Store queries of `operation` ("get" is a key read) so far.
    pub async fn store_queries(&self, operation: &str) -> Result<f64, String> {
        self.metric_sum(
            "keygate_store_query_duration_seconds_count",
            &[&format!("operation=\"{operation}\"")],
        )
        .await
    }

    /// Stops the server (SIGKILL: benchmarks do not need its graceful exit).
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A redis-server of the benchmark's own on a free loopback port, never the
/// shared one; killed when dropped.
pub struct Redis {
    child: Child,
    addr: SocketAddr,
}

impl Redis {
    /// Starts `redis-server` without persistence and waits (at most 10 s)
    /// until it accepts connections.
    pub async fn start() -> Result<Self, String> {
        let addr = free_port()?;
        let port = addr.port().to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("redis-server (apt-get install redis-server): {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                return Err("redis-server did not start in 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self { child, addr })
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// How many keys the server holds (`redis-cli DBSIZE`).
    pub fn key_count(&self) -> Result<u64, String> {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.addr.port().to_string(),
                "DBSIZE",
            ])
            .output()
            .map_err(|e| format!("redis-cli: {e}"))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| format!("redis-cli DBSIZE: {}", String::from_utf8_lossy(&out.stdout)))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// One HTTP/2 connection to `url`.
pub async fn connect(url: &str) -> Result<Channel, String> {
    Channel::from_shared(url.to_owned())
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("connect {url}: {e}"))
}

/// A plain HTTP/1.0 GET on loopback; the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| format!("{addr}{path}: timed out"))?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    Ok(text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned()))
}

/// A request carrying `token` as its caller's credential.
pub fn as_key<T>(token: &str, message: T) -> Result<tonic::Request<T>, String> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| "token is not ASCII".to_owned())?,
    );
    Ok(req)
}

/// Creates an ORGANIZATION key with the route's scope and the highest rate
/// limit (benchmarks measure cost, not limiting); its id and token.
pub async fn create_key(
    channel: &Channel,
    admin: &str,
    org: &str,
) -> Result<(String, String), String> {
    let mut client = pb::key_admin_client::KeyAdminClient::new(channel.clone());
    let resp = client
        .create_key(as_key(
            admin,
            pb::CreateKeyRequest {
                name: "bench".into(),
                organization_id: org.into(),
                mode: pb::Mode::Live as i32,
                scopes: vec!["checkout:create".into(), "checkout:read".into()],
                rate_limit_per_minute: keygate_core::bounds::MAX_RATE_LIMIT,
                ..Default::default()
            },
        )?)
        .await
        .map_err(|e| format!("create key: {e}"))?
        .into_inner();
    let key = resp.key.ok_or("create key: no key in the answer")?;
    Ok((key.key_id, resp.token))
}

/// An Authorize request for the bench route.
pub fn authorize_request(token: &str) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        token: token.to_owned(),
        route: ROUTE.into(),
        ip: "203.0.113.7".into(),
        ..Default::default()
    }
}

/// Checks an answer is the decision expected.
pub fn expect_decision(
    answer: Result<tonic::Response<pb::AuthorizeResponse>, tonic::Status>,
    want: pb::Decision,
) -> Result<(), String> {
    let answer = answer.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    let answer = answer.into_inner();
    if answer.decision() == want {
        Ok(())
    } else {
        Err(format!(
            "{:?} {:?}, expected {want:?}",
            answer.decision(),
            answer.reason()
        ))
    }
}

/// CPU time process `pid` has used so far, user and system, all threads:
/// fields 14 and 15 of `/proc/<pid>/stat`, in Linux's fixed 100 ticks a
/// second.
pub fn cpu_time(pid: u32) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it don't.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(std::time::Duration::from_millis((user + system) * 10))
}

/// The machine's CPU ticks so far, all cores: (stolen, all). Stolen time
/// is what the hypervisor gave other guests while this one wanted to run
/// (`steal` in the first line of `/proc/stat`). A round whose share of it
/// is high measured the host, not the processes compared.
pub fn machine_ticks() -> Option<(u64, u64)> {
    parse_machine_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    // user nice system idle iowait irq softirq steal (guest and guest_nice
    // are already counted in user and nice).
    let ticks: Vec<u64> = line
        .split_whitespace()
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    (ticks.len() == 8).then(|| (ticks[7], ticks.iter().sum()))
}

/// The share of the machine's time stolen between two readings, in %.
pub fn stolen_percent(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((s0, t0), (s1, t1)) = (before?, after?);
    let all = t1.checked_sub(t0).filter(|&t| t > 0)?;
    Some(s1.saturating_sub(s0) as f64 * 100.0 / all as f64)
}

/// Sets the CPUs every thread of process `pid` may run on (`taskset -a`,
/// from util-linux); threads it starts later inherit them.
pub fn pin(pid: u32, cpus: &str) -> Result<(), String> {
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()
        .map_err(|e| format!("taskset: {e} (apt-get install util-linux)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "taskset -a -p -c {cpus} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The CPUs process `pid` may run on, as the kernel lists them
/// (`Cpus_allowed_list` in `/proc/PID/status`, taskset's notation).
pub fn allowed_cpus(pid: u32) -> Result<String, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| format!("{path}: no Cpus_allowed_list"))
}

/// A split of the machine's cores: one for the process under test alone,
/// the rest for everything else. While it lives, this process (and so
/// every process it starts) runs on the rest; dropping it gives this
/// process back the CPUs it had before.
pub struct CoreSplit {
    /// The lone core, as taskset names it.
    pub alone: String,
    /// The other cores, as taskset names them.
    pub rest: String,
    before: String,
}

impl CoreSplit {
    /// None on a machine of one core, where there is nothing to split.
    pub fn new() -> Result<Option<Self>, String> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        if cores < 2 {
            return Ok(None);
        }
        let split = Self {
            alone: "0".into(),
            rest: if cores == 2 {
                "1".into()
            } else {
                format!("1-{}", cores - 1)
            },
            before: allowed_cpus(std::process::id())?,
        };
        pin(std::process::id(), &split.rest)?;
        Ok(Some(split))
    }
}

impl Drop for CoreSplit {
    fn drop(&mut self) {
        if let Err(e) = pin(std::process::id(), &self.before) {
            eprintln!("keygate-bench: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stolen_time_is_read_from_the_first_line_of_proc_stat() {
        let before = parse_machine_ticks("cpu  100 0 50 800 0 0 0 50 0 0\ncpu0 1 2 3\n");
        assert_eq!(before, Some((50, 1000)));
        let after = parse_machine_ticks("cpu  200 0 100 1500 0 0 0 200 0 0\n");
        // 150 of the 1,000 ticks between them were stolen.
        assert_eq!(stolen_percent(before, after), Some(15.0));
        assert_eq!(parse_machine_ticks("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(parse_machine_ticks("cpu  1 2 3\n"), None);
        assert_eq!(stolen_percent(after, after), None);
    }

    #[test]
    fn database_names_are_swapped_into_urls() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }

    #[test]
    fn a_core_split_keeps_this_process_and_its_children_off_the_lone_core_until_dropped() {
        let allowed = |pid| allowed_cpus(pid).unwrap();
        let me = std::process::id();
        let before = allowed(me);
        let Some(split) = CoreSplit::new().unwrap() else {
            return; // one core: nothing to split
        };
        assert_eq!(allowed(me), split.rest);
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert_eq!(allowed(child.id()), split.rest);
        pin(child.id(), &split.alone).unwrap();
        assert_eq!(allowed(child.id()), split.alone);
        child.kill().unwrap();
        child.wait().unwrap();
        drop(split);
        assert_eq!(allowed(me), before);
        assert!(pin(me, "no-such-cpu").unwrap_err().contains("taskset"));
    }
}
