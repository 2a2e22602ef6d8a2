//! Scenario 9, cost in instructions: the server's own work per call,
//! counted by valgrind's callgrind, so the figures repeat on a noisy machine
//! where throughput ratios do not. keygate and the no-op Check server run
//! under callgrind; each case is a fixed number of calls, one at a time,
//! between a zero and a dump of the counters, less an idle run of the same
//! length (the background work: feed polls, usage flushes), divided by the
//! calls. One at a time: with concurrent callers, how many calls one wake-up
//! or one write happened to carry moved the count per call by a few percent
//! from one server to the next, more than the differences measured here.
//! Ratios: cached Authorize ÷ the empty call (scenario 1's pair); keygate's
//! Check ÷ the no-op's (scenario 5's pair, without Envoy); cached Authorize
//! with limits on Redis ÷ local limits (scenario 8's pair) and with usage
//! analytics ÷ without (scenario 10's), each on a server of its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use keygate_proto::v1 as pb;
use tonic::transport::Channel;

use super::{authorize_call, cached_tokens, health_call};
use crate::Ctx;
use crate::load::{Call, call};
use crate::outcome::{Outcome, Table, Target, thousands};
use crate::scenario::envoy::noop_server;
use crate::server::{Database, Keygate, Redis, bootstrap, connect};

/// Keys the cached calls spread over.
const KEYS: usize = 4;

/// Calls per case (quick mode: a tenth), after [`WARM_CALLS`] uncounted.
const CALLS: u64 = 3_000;
const WARM_CALLS: u64 = 100;

/// A keygate (SQLite) under callgrind with [`KEYS`] cached keys.
struct Cached {
    server: Keygate,
    pid: u32,
    channels: Vec<Channel>,
    tokens: Vec<String>,
    _db: Database,
}

impl Cached {
    async fn start(dir: &Path, name: &str, extra: &[&str]) -> Result<Self, String> {
        let db = Database::sqlite()?;
        let admin = bootstrap(&db).await?;
        let server = Keygate::start_under(&db, extra, &callgrind(dir, name)).await?;
        let pid = server.pid().ok_or("keygate has no pid")?;
        let channels = server.channels(2).await?;
        let tokens = cached_tokens(&channels, &admin, KEYS).await?;
        Ok(Self {
            server,
            pid,
            channels,
            tokens,
            _db: db,
        })
    }

    fn authorize(&self) -> Call {
        authorize_call(&self.channels, &self.tokens, pb::Decision::Allow)
    }
}

pub async fn run(ctx: &Ctx) -> Result<Outcome, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let main = Cached::start(dir.path(), "keygate", &[]).await?;
    let redis = Redis::start().await?;
    let redis_url = redis.url();
    let on_redis = Cached::start(dir.path(), "redis", &["--rate-limit-store", &redis_url]).await?;
    let no_analytics =
        Cached::start(dir.path(), "no-analytics", &["--usage-analytics", "off"]).await?;
    let (pid, channels, tokens) = (main.pid, &main.channels, &main.tokens);
    let (noop, noop_addr) = noop_server(&callgrind(dir.path(), "noop"), None).await?;
    let noop_pid = noop.id().ok_or("no-op server has no pid")?;
    let noop_channel = connect(&format!("http://{noop_addr}")).await?;

    let calls = ctx.pick(CALLS, CALLS / 10);
    let unknown = crate::scenario::flood::unknown_key_tokens(20_000)?;
    let cases: Vec<(&str, u32, Call)> = vec![
        (
            "grpc.health.v1 Check (the empty call)",
            pid,
            health_call(channels),
        ),
        ("Authorize, cached key (ALLOW)", pid, main.authorize()),
        (
            "Authorize, token of no key (DENY)",
            pid,
            authorize_call(channels, &unknown, pb::Decision::Deny),
        ),
        (
            "ext_authz Check → keygate (ALLOW)",
            pid,
            check_call(channels, tokens),
        ),
        (
            "ext_authz Check → no-op server (OK)",
            noop_pid,
            check_call(&[noop_channel], tokens),
        ),
        (
            "Authorize, cached key, limits on Redis (ALLOW)",
            on_redis.pid,
            on_redis.authorize(),
        ),
        (
            "Authorize, cached key, analytics off (ALLOW)",
            no_analytics.pid,
            no_analytics.authorize(),
        ),
    ];

    let mut table = Table::new(
        &format!(
            "Server instructions per call under callgrind ({} calls a case, one at a time, less an idle run as long)",
            thousands(calls as f64)
        ),
        &[
            "case",
            "calls",
            "instructions",
            "idle instructions",
            "per call",
        ],
    );
    let mut per_call = Vec::new();
    for (name, pid, call) in &cases {
        one_by_one(call, 0..WARM_CALLS)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        let (busy, (took, result)) = instructions(*pid, dir.path(), || async {
            let started = std::time::Instant::now();
            let result = one_by_one(call, WARM_CALLS..WARM_CALLS + calls).await;
            (started.elapsed(), result)
        })
        .await?;
        keep_dump(dir.path(), name);
        result.map_err(|e| format!("{name}: {e}"))?;
        let (idle, ()) = instructions(*pid, dir.path(), || tokio::time::sleep(took)).await?;
        let cost = busy.saturating_sub(idle) as f64 / calls as f64;
        table.row(vec![
            (*name).to_owned(),
            thousands(calls as f64),
            thousands(busy as f64),
            thousands(idle as f64),
            thousands(cost),
        ]);
        per_call.push(cost);
    }
    for cached in [main, on_redis, no_analytics] {
        cached.server.stop().await;
    }
    drop(noop);
    drop(redis);

    let [
        health,
        authorize,
        unknown,
        check,
        noop_check,
        redis_authorize,
        plain_authorize,
    ] = per_call[..]
    else {
        return Err("a case is missing".into());
    };
    Ok(Outcome {
        number: 9,
        name: "cost".into(),
        method: format!(
            "keygate (SQLite) and the no-op Check server (scenario 5's) each run under \
             `valgrind --tool=callgrind`; {KEYS} cached keys. Two more keygate processes \
             run the same way for the last two cases, one with `--rate-limit-store` on \
             its own redis-server (its background syncs are counted: they run during the \
             case, not in the idle run), one with `--usage-analytics off`. For each case, \
             after {WARM_CALLS} uncounted calls, the server's counters are zeroed, {} calls \
             are made one at a time, the counters are dumped; an idle run as long, just \
             after, is subtracted, and the rest divided by the calls. The Check request is \
             an Envoy-shaped one for `POST /v1/checkouts` with twelve headers. Instruction \
             counts do not depend on the machine's other load, so these ratios repeat where \
             throughput ratios do not; they leave out what callgrind does not see (the \
             kernel's network stack, waiting, cache misses).",
            thousands(calls as f64)
        ),
        quick: ctx.quick,
        tables: vec![table],
        targets: vec![
            Target::new(
                "server instructions per cached Authorize ÷ per empty call",
                "(none set)",
                format!(
                    "{:.2} ({} ÷ {})",
                    authorize / health,
                    thousands(authorize),
                    thousands(health)
                ),
                None,
            ),
            Target::new(
                "server instructions per refused token of no key ÷ per cached Authorize",
                "(none set)",
                format!("{:.2}", unknown / authorize),
                None,
            ),
            Target::new(
                "server instructions per cached Authorize, limits on Redis ÷ local limits",
                "(none set)",
                format!(
                    "{:.3} ({} ÷ {})",
                    redis_authorize / authorize,
                    thousands(redis_authorize),
                    thousands(authorize)
                ),
                None,
            ),
            // Instructions without ÷ with is the throughput ratio a
            // CPU-bound server would show: scenario 10's target.
            Target::ratio_at_least(
                "server instructions per cached Authorize, analytics off ÷ on",
                plain_authorize / authorize,
                0.98,
            ),
            Target::new(
                "server instructions per Check, keygate ÷ the no-op server",
                "(none set)",
                format!(
                    "{:.2} ({} ÷ {})",
                    check / noop_check,
                    thousands(check),
                    thousands(noop_check)
                ),
                None,
            ),
        ],
        charts: Vec::new(),
        notes: Vec::new(),
    })
}

/// Calls `call(n)` for each `n`, one after the other; the first error.
async fn one_by_one(call: &Call, ns: std::ops::Range<u64>) -> Result<(), String> {
    for n in ns {
        call(n).await?;
    }
    Ok(())
}

/// valgrind's command line for a server named `name`, writing into `dir`.
/// Names are written out in every dump (not once per process), so each
/// kept dump can be read by `callgrind_annotate` on its own.
fn callgrind(dir: &Path, name: &str) -> Vec<String> {
    vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        "--quiet".into(),
        "--compress-strings=no".into(),
        format!(
            "--callgrind-out-file={}",
            dir.join(format!("{name}.out")).display()
        ),
    ]
}

/// Runs `work` between a zero and a dump of `pid`'s callgrind counters;
/// the instructions (Ir) the dump holds, and what `work` returned.
async fn instructions<F, Fut, T>(pid: u32, dir: &Path, work: F) -> Result<(u64, T), String>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    callgrind_control(&["--zero", &pid.to_string()])?;
    let out = work().await;
    let before = dumps(dir)?;
    callgrind_control(&["--dump", &pid.to_string()])?;
    let dump = dumps(dir)?
        .into_iter()
        .find(|p| !before.contains(p))
        .ok_or("callgrind wrote no dump")?;
    let text = std::fs::read_to_string(&dump).map_err(|e| format!("{}: {e}", dump.display()))?;
    let total = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("{}: no totals", dump.display()))?;
    Ok((total, out))
}

fn callgrind_control(args: &[&str]) -> Result<(), String> {
    let status = std::process::Command::new("callgrind_control")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("callgrind_control (apt-get install valgrind): {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("callgrind_control {args:?}: {status}"))
    }
}

/// Keeps the newest dump as `target/callgrind/<case>.out`, for
/// `callgrind_annotate` (where the instructions went).
fn keep_dump(dir: &Path, case: &str) {
    let newest = dumps(dir).ok().and_then(|d| {
        d.into_iter()
            .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
    });
    let slug: String = case
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let keep = Path::new("target/callgrind");
    if let Some(newest) = newest
        && std::fs::create_dir_all(keep).is_ok()
    {
        let _ = std::fs::copy(newest, keep.join(format!("{slug}.out")));
    }
}

fn dumps(dir: &Path) -> Result<Vec<PathBuf>, String> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".out"))
        })
        .collect())
}

/// Envoy's Check for the bench route with `tokens[n % len]` in `x-api-key`.
fn check_call(channels: &[Channel], tokens: &[String]) -> Call {
    let channels: Arc<[Channel]> = channels.into();
    let requests: Arc<[CheckRequest]> = tokens.iter().map(|t| check_request(t)).collect();
    call(move |n| {
        let channel = channels[n as usize % channels.len()].clone();
        let request = requests[n as usize % requests.len()].clone();
        async move {
            let answer = AuthorizationClient::new(channel)
                .check(request)
                .await
                .map_err(|s| format!("check: {:?} {}", s.code(), s.message()))?
                .into_inner();
            match answer.status.map(|s| s.code) {
                Some(0) | None => Ok(()),
                Some(code) => Err(format!("check answered code {code}")),
            }
        }
    })
}

/// A Check as Envoy sends it for `POST /v1/checkouts` with a typical API
/// client's headers, as raw header bytes (`encode_raw_headers: true`, the
/// setting keygate's Envoy configuration uses).
pub fn check_request(token: &str) -> CheckRequest {
    use envoy_types::pb::envoy::config::core::v3::{
        Address, HeaderMap, HeaderValue, SocketAddress, address,
    };
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Peer, Request,
    };
    let headers = [
        (":authority", "api.example.com"),
        (":method", "POST"),
        (":path", "/v1/checkouts?expand=items"),
        (":scheme", "https"),
        ("x-api-key", token),
        ("content-type", "application/json"),
        ("content-length", "128"),
        ("user-agent", "checkout-backend/2.3"),
        ("accept", "application/json"),
        ("x-request-id", "8c3f4e4e-5b1f-4a43-9b7a-7f0e3c2f1d11"),
        ("x-forwarded-proto", "https"),
        ("idempotency-key", "b7a9c1d2-0e4f-4a5b-8c6d-1e2f3a4b5c6d"),
    ];
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "203.0.113.7".into(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: "/v1/checkouts?expand=items".into(),
                    host: "api.example.com".into(),
                    header_map: Some(HeaderMap {
                        headers: headers
                            .iter()
                            .map(|(k, v)| HeaderValue {
                                key: (*k).to_owned(),
                                raw_value: v.as_bytes().to_vec(),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}
