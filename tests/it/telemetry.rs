//! Telemetry from the real binary: Prometheus counters that move, and OTLP
//! traces that continue the caller's trace.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keygate_proto::v1 as pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::binary::{bootstrap, free_port, keygate, wait_serving};
use crate::harness::{AuthorizerClient, eventually};

/// GET http://addr/metrics, the plain way.
async fn scrape(port: u16) -> Option<String> {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await.ok()?;
    body.starts_with("HTTP/1.1 200").then_some(body)
}

fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

struct Server {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// keygate serve on SQLite with a bootstrap key; returns the server and the key's token.
async fn serve(extra: &[&str], env: &[(&str, String)]) -> (Server, String) {
    let dir = tempfile::tempdir().unwrap();
    let token = bootstrap(dir.path(), |c| c);
    let port = free_port();
    let mut cmd = keygate(dir.path());
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_serving(port).await;
    (
        Server {
            child,
            port,
            _dir: dir,
        },
        token,
    )
}

fn ask(token: &str) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        token: token.into(),
        required_scopes: vec!["api_key:read".into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn prometheus_counters_move() {
    let metrics_port = free_port();
    let (server, token) = serve(
        &[
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
            "--default-rate-limit",
            "3",
        ],
        &[],
    )
    .await;
    let before = scrape(metrics_port).await.expect("metrics served");
    let limited = "keygate_authorize_decisions_total{decision=\"DENY\",reason=\"RATE_LIMITED\"}";
    let allow = "keygate_authorize_decisions_total{decision=\"ALLOW\",reason=\"\"}";
    let invalid = "keygate_authorize_decisions_total{decision=\"DENY\",reason=\"INVALID_TOKEN\"}";
    let mut client = AuthorizerClient::connect(format!("http://127.0.0.1:{}", server.port))
        .await
        .unwrap();
    // The bootstrap key has the default limit, 3 here: 3 ALLOWs, then 2 over.
    for _ in 0..5 {
        client.authorize(ask(&token)).await.unwrap();
    }
    client.authorize(ask("kg_live_nope")).await.unwrap();
    let _watch = crate::feed::watch(&format!("http://127.0.0.1:{}", server.port), &token, 0).await;
    let after = eventually(Duration::from_secs(10), "counters to move", || async {
        let m = scrape(metrics_port).await?;
        (value(&m, allow) >= value(&before, allow) + 3.0
            && value(&m, "keygate_feed_subscribers") >= 1.0)
            .then_some(m)
    })
    .await;
    assert_eq!(
        value(&after, limited),
        value(&before, limited) + 2.0,
        "{after}"
    );
    assert_eq!(value(&after, "keygate_rate_limited_total"), 2.0, "{after}");
    assert_eq!(value(&after, invalid), value(&before, invalid) + 1.0);
    assert!(value(&after, "keygate_cache_hits_total") >= 2.0, "{after}");
    assert!(value(&after, "keygate_cache_misses_total") >= 1.0);
    assert!(after.contains("keygate_authorize_duration_seconds_bucket"));
    assert!(after.contains("keygate_store_query_duration_seconds"));
    assert!(after.contains("keygate_feed_applied_sequence"));
    assert!(!after.contains(&token[30..73]), "no secret in metrics");
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

impl Collector {
    /// The first exported span matching `is`, waiting up to 15 s for it.
    async fn exported(&self, what: &str, is: impl Fn(&Span) -> bool) -> Span {
        eventually(Duration::from_secs(15), what, || {
            let found = self.0.lock().unwrap().iter().find(|s| is(s)).cloned();
            async move { found }
        })
        .await
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.0.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test]
async fn traces_go_to_otlp_and_continue_the_callers_trace() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}")),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ];
    let (server, token) = serve(&[], &env).await;
    let mut client = AuthorizerClient::connect(format!("http://127.0.0.1:{}", server.port))
        .await
        .unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(ask(&token));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01").parse().unwrap(),
    );
    let answer = client.authorize(req).await.unwrap().into_inner();

    let span = collector
        .exported("the Authorize span", |s| {
            hex(&s.trace_id) == trace_id && s.name == "rpc"
        })
        .await;
    assert_eq!(
        hex(&span.parent_span_id),
        parent_id,
        "continues the caller's span"
    );
    let attrs: Vec<(String, String)> = span
        .attributes
        .iter()
        .map(|kv| (kv.key.clone(), format!("{:?}", kv.value)))
        .collect();
    let has = |key: &str, needle: &str| attrs.iter().any(|(k, v)| k == key && v.contains(needle));
    assert!(
        has("rpc.method", "/keygate.v1.Authorizer/Authorize"),
        "{attrs:?}"
    );
    assert!(
        has("decision", "ALLOW") && has("key_id", &answer.key_id),
        "{attrs:?}"
    );

    // An admin call's span names the calling key.
    let mut admin =
        crate::harness::KeyAdminClient::connect(format!("http://127.0.0.1:{}", server.port))
            .await
            .unwrap();
    admin
        .list_keys(crate::harness::as_key(
            &token,
            pb::ListKeysRequest::default(),
        ))
        .await
        .unwrap();
    let listed = collector
        .exported("the ListKeys span", |s| {
            format!("{:?}", s.attributes).contains("/keygate.v1.KeyAdmin/ListKeys")
        })
        .await;
    assert!(
        format!("{:?}", listed.attributes).contains(&answer.key_id),
        "{:?}",
        listed.attributes
    );

    let all = format!("{:?}", collector.0.lock().unwrap());
    assert!(!all.contains(&token[30..73]), "no secret in traces");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn jwt_metrics_count_fetches_and_verifications() {
    use crate::jwt_support::{JwksServer, SigningKey};
    let key = SigningKey::ec("ec-1");
    let jwks = JwksServer::start(&[&key]).await;
    let policy_dir = tempfile::tempdir().unwrap();
    let policy = policy_dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[jwt_issuer]]\nissuer = \"https://idp.example\"\naudience = \"keygate\"\njwks_url = \"{}\"\n",
            jwks.url
        ),
    )
    .unwrap();
    let metrics_port = free_port();
    let (server, _) = serve(
        &[
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
            "--policy",
            policy.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let now = chrono::Utc::now().timestamp();
    let token = key.mint(
        &serde_json::json!({"iss": "https://idp.example", "aud": "keygate",
        "sub": "alice", "org_id": "org_a", "scope": "api_key:read", "iat": now, "exp": now + 300}),
    );
    let mut client = AuthorizerClient::connect(format!("http://127.0.0.1:{}", server.port))
        .await
        .unwrap();
    for _ in 0..3 {
        let r = client.authorize(ask(&token)).await.unwrap().into_inner();
        assert_eq!(r.decision(), pb::Decision::Allow, "{r:?}");
    }
    client
        .authorize(ask("eyJhbGciOiJFUzI1NiJ9.e30.x"))
        .await
        .unwrap();
    let m = eventually(Duration::from_secs(10), "the JWT counters", || async {
        let m = scrape(metrics_port).await?;
        (value(&m, "keygate_jwt_verifications_total{result=\"refused\"}") >= 1.0).then_some(m)
    })
    .await;
    assert_eq!(
        value(&m, "keygate_jwt_verifications_total{result=\"verified\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        value(&m, "keygate_jwt_verifications_total{result=\"cached\"}"),
        2.0,
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            "keygate_jwks_fetches_total{issuer=\"https://idp.example\",result=\"ok\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        value(&m, "keygate_jwks_keys{issuer=\"https://idp.example\"}"),
        1.0,
        "{m}"
    );
    assert!(
        !m.contains(&token[token.len() - 20..]),
        "no token in metrics"
    );
}
