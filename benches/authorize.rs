//! Warm Authorize, and Envoy's ext_authz Check, against an empty gRPC call
//! (grpc.health.v1 Check), over
//! real loopback sockets: what keygate adds to every request a gateway makes.
//!
//! `cargo bench --bench authorize` (bounded: a fixed number of calls).
//! KEYGATE_BENCH_CALLS sets the number of calls per measurement.

use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use hdrhistogram::Histogram;
use keygate::server::{Keygate, Settings};
use keygate_core::clock::SystemClock;
use keygate_core::key::Mode;
use keygate_core::policy::RouteTable;
use keygate_proto::v1 as pb;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const POLICY: &str = "[[route]]\nroute = \"POST /v1/checkouts\"\nscope = \"checkout:create\"\n";

fn report(name: &str, h: &Histogram<u64>, elapsed: Duration) {
    println!(
        "{name:<28} calls {:>7}  p50 {:>6.1} µs  p90 {:>6.1} µs  p99 {:>6.1} µs  max {:>7.1} µs  {:>8.0} calls/s",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.9) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
        h.len() as f64 / elapsed.as_secs_f64(),
    );
}

async fn sequential<F, Fut>(calls: u64, mut call: F) -> (Histogram<u64>, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
    let start = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        call().await;
        h.record(t.elapsed().as_nanos() as u64).expect("in range");
    }
    (h, start.elapsed())
}

async fn concurrent<F, Fut>(calls: u64, workers: u64, call: F) -> (Histogram<u64>, Duration)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move { sequential(calls / workers, call).await.0 })
        })
        .collect();
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
    for t in tasks {
        h.add(t.await.expect("worker")).expect("same bounds");
    }
    (h, start.elapsed())
}

/// A Check as Envoy sends it for `POST /v1/checkouts` with a typical
/// browser-less API client's headers.
fn envoy_check_request(token: &str) -> CheckRequest {
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Peer, Request,
    };
    let headers = [
        (":authority", "api.example.com"),
        (":method", "POST"),
        (":path", "/v1/checkouts?expand=items"),
        (":scheme", "https"),
        ("authorization", &format!("Bearer {token}")),
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
                    headers: headers
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

fn main() {
    let calls: u64 = std::env::var("KEYGATE_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut settings = Settings::new(format!(
            "sqlite://{}",
            dir.path().join("bench.db").display()
        ));
        settings.policy = RouteTable::from_toml(POLICY).expect("policy");
        let keygate = Keygate::open(settings, Arc::new(SystemClock))
            .await
            .expect("open");
        let (_, admin) = keygate
            .keys
            .bootstrap("bench".into(), Mode::Live)
            .await
            .expect("bootstrap");
        let authorizer = keygate.authorizer.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(keygate.serve(listener, std::future::pending()));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("url")
            .connect()
            .await
            .expect("connect");

        let mut admin_client = pb::key_admin_client::KeyAdminClient::new(channel.clone());
        let mut create = tonic::Request::new(pb::CreateKeyRequest {
            name: "bench".into(),
            organization_id: "org_bench".into(),
            mode: pb::Mode::Live as i32,
            scopes: vec!["checkout:create".into()],
            // The highest limit: the benchmark measures cost, not limiting.
            rate_limit_per_minute: 1_000_000,
            ..Default::default()
        });
        create.metadata_mut().insert(
            "authorization",
            format!("Bearer {admin}").parse().expect("ascii"),
        );
        let token = admin_client
            .create_key(create)
            .await
            .expect("create")
            .into_inner()
            .token;

        let check_request = envoy_check_request(&token);
        let authz = pb::authorizer_client::AuthorizerClient::new(channel.clone());
        let health = HealthClient::new(channel.clone());
        let request = pb::AuthorizeRequest {
            token,
            route: "POST /v1/checkouts".into(),
            ip: "203.0.113.7".into(),
            ..Default::default()
        };
        let authorize = {
            let request = request.clone();
            move || {
                let mut authz = authz.clone();
                let request = request.clone();
                async move {
                    let r = authz
                        .authorize(request)
                        .await
                        .expect("authorize")
                        .into_inner();
                    assert_eq!(r.decision(), pb::Decision::Allow);
                }
            }
        };
        let ext_authz = AuthorizationClient::new(channel.clone());
        let check = move || {
            let mut ext_authz = ext_authz.clone();
            let request = check_request.clone();
            async move {
                let r = ext_authz.check(request).await.expect("check").into_inner();
                assert_eq!(r.status.map_or(0, |s| s.code), 0, "allowed");
            }
        };
        let empty = move || {
            let mut health = health.clone();
            async move {
                health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .expect("check");
            }
        };
        // Warm up: caches, connections, allocator.
        sequential(2_000, &authorize).await;
        sequential(2_000, &empty).await;
        sequential(2_000, &check).await;

        // The decision alone, in process: what keygate itself costs per call.
        let input = keygate::service::AuthorizeInput {
            token: &request.token,
            route: &request.route,
            ip: &request.ip,
            required_scopes: &[],
        };
        let in_process = calls * 10;
        let start = Instant::now();
        for _ in 0..in_process {
            let outcome = authorizer.authorize(input).await.expect("authorize");
            assert!(outcome.deny.is_none());
        }
        let per_call = start.elapsed() / u32::try_from(in_process).expect("fits");
        println!(
            "Authorize decision in process (warm): {:.2} µs per call",
            per_call.as_nanos() as f64 / 1000.0
        );

        println!(
            "keygate Authorize (warm cache) vs grpc.health Check, loopback, one HTTP/2 connection"
        );
        for round in 1..=2 {
            let (h, t) = sequential(calls, &empty).await;
            report(&format!("empty call, sequential #{round}"), &h, t);
            let (h, t) = sequential(calls, &authorize).await;
            report(&format!("Authorize, sequential #{round}"), &h, t);
            let (h, t) = sequential(calls, &check).await;
            report(&format!("Envoy Check, sequential #{round}"), &h, t);
        }
        let (h, t) = concurrent(calls * 2, 16, empty.clone()).await;
        report("empty call, 16 concurrent", &h, t);
        let (h, t) = concurrent(calls * 2, 16, authorize.clone()).await;
        report("Authorize, 16 concurrent", &h, t);
        let (h, t) = concurrent(calls * 2, 16, check.clone()).await;
        report("Envoy Check, 16 concurrent", &h, t);
    });
}
