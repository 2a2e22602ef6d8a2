//! What keygate measures, and where it goes: Prometheus metrics on their own
//! port (`--metrics-addr`), and the names of every metric in one place.
//!
//! Handles are registered once and kept, so the Authorize path only does
//! atomic adds. Without an installed exporter (tests, benchmarks) every
//! handle is a no-op.

use std::net::SocketAddr;
use std::time::Duration;

use keygate_core::decision::DenyReason;
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Authorize latency buckets, in seconds: 50 µs to 1 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// Serves `/metrics` on `addr` from a background task. Call once, inside the runtime.
pub fn install_prometheus(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("--metrics-addr {addr}: {e}"))?;
    describe();
    Ok(())
}

fn describe() {
    metrics::describe_counter!(
        "keygate_authorize_decisions_total",
        "Authorize answers by decision and deny reason"
    );
    metrics::describe_histogram!(
        "keygate_authorize_duration_seconds",
        "Time to answer Authorize"
    );
    metrics::describe_counter!(
        "keygate_rate_limited_total",
        "Requests denied with RATE_LIMITED"
    );
    metrics::describe_counter!(
        "keygate_cache_hits_total",
        "Key lookups answered from memory"
    );
    metrics::describe_counter!(
        "keygate_cache_misses_total",
        "Key lookups that went to the store"
    );
    metrics::describe_gauge!("keygate_cache_entries", "Key records in memory");
    metrics::describe_gauge!(
        "keygate_rate_limit_store_up",
        "1 while the Redis rate-limit store answers, 0 while limits fall back to each replica"
    );
    metrics::describe_gauge!(
        "keygate_cache_bytes",
        "Estimated bytes of key records in memory"
    );
    metrics::describe_counter!(
        "keygate_cache_refused_total",
        "Key lookups refused by the key-id index without a store read"
    );
    metrics::describe_counter!(
        "keygate_cache_busy_total",
        "Key lookups refused because too many store reads were in flight"
    );
    metrics::describe_histogram!(
        "keygate_store_query_duration_seconds",
        "Store query latency by operation"
    );
    metrics::describe_counter!(
        "keygate_store_errors_total",
        "Failed store queries by operation"
    );
    metrics::describe_gauge!(
        "keygate_feed_subscribers",
        "Open RevocationFeed/Watch streams"
    );
    metrics::describe_gauge!(
        "keygate_feed_applied_sequence",
        "Highest event sequence applied by this replica"
    );
    metrics::describe_counter!(
        "keygate_jwt_verifications_total",
        "JWTs presented, by result: cached, verified (signature checked) or refused"
    );
    metrics::describe_counter!(
        "keygate_jwks_fetches_total",
        "JWKS fetches by issuer and result (ok, error)"
    );
    metrics::describe_gauge!(
        "keygate_jwks_keys",
        "Signing keys loaded from each issuer's last good JWKS"
    );
    metrics::describe_gauge!(
        "keygate_feed_lag_seconds",
        "Time since this replica last read the event log (0 when in touch)"
    );
}

/// Per-answer Authorize metrics, registered once.
pub struct AuthorizeMetrics {
    allow: Counter,
    deny: [Counter; 7],
    latency: Histogram,
    rate_limited: Counter,
}

const REASONS: [DenyReason; 7] = [
    DenyReason::MissingToken,
    DenyReason::InvalidToken,
    DenyReason::ExpiredToken,
    DenyReason::InsufficientScope,
    DenyReason::IpNotAllowed,
    DenyReason::RateLimited,
    DenyReason::RouteNotFound,
];

impl Default for AuthorizeMetrics {
    fn default() -> Self {
        let name = "keygate_authorize_decisions_total";
        Self {
            allow: metrics::counter!(name, "decision" => "ALLOW", "reason" => ""),
            deny: REASONS
                .map(|r| metrics::counter!(name, "decision" => "DENY", "reason" => r.code())),
            latency: metrics::histogram!("keygate_authorize_duration_seconds"),
            rate_limited: metrics::counter!("keygate_rate_limited_total"),
        }
    }
}

impl AuthorizeMetrics {
    /// Counts one Authorize answer: an allow when `deny` is `None`, else a
    /// deny for that reason (and a rate-limited request when it is
    /// RATE_LIMITED); `elapsed` goes to the latency histogram, in seconds.
    pub fn record(&self, deny: Option<DenyReason>, elapsed: Duration) {
        match deny {
            None => self.allow.increment(1),
            Some(reason) => {
                if let Some(i) = REASONS.iter().position(|r| *r == reason) {
                    self.deny[i].increment(1);
                }
                if reason == DenyReason::RateLimited {
                    self.rate_limited.increment(1);
                }
            }
        }
        self.latency.record(elapsed.as_secs_f64());
    }
}

/// Cache metrics, registered once.
pub struct CacheMetrics {
    /// `keygate_cache_hits_total`: key lookups answered from memory,
    /// including remembered unknown ids.
    pub hits: Counter,
    /// `keygate_cache_misses_total`: key lookups that went to the store.
    pub misses: Counter,
    /// `keygate_cache_refused_total`: key lookups refused by the key-id
    /// index without a store read.
    pub refused: Counter,
    /// `keygate_cache_busy_total`: key lookups refused because too many
    /// store reads were in flight.
    pub busy: Counter,
    /// `keygate_cache_entries`: key records in memory.
    pub entries: Gauge,
    /// `keygate_cache_bytes`: estimated bytes of key records in memory.
    pub bytes: Gauge,
}

impl Default for CacheMetrics {
    fn default() -> Self {
        Self {
            hits: metrics::counter!("keygate_cache_hits_total"),
            misses: metrics::counter!("keygate_cache_misses_total"),
            refused: metrics::counter!("keygate_cache_refused_total"),
            busy: metrics::counter!("keygate_cache_busy_total"),
            entries: metrics::gauge!("keygate_cache_entries"),
            bytes: metrics::gauge!("keygate_cache_bytes"),
        }
    }
}

/// Records one store query.
pub fn store_query(operation: &'static str, elapsed: Duration, ok: bool) {
    metrics::histogram!("keygate_store_query_duration_seconds", "operation" => operation)
        .record(elapsed.as_secs_f64());
    if !ok {
        metrics::counter!("keygate_store_errors_total", "operation" => operation).increment(1);
    }
}

/// Feed metrics, registered once.
pub struct FeedMetrics {
    /// `keygate_feed_subscribers`: open RevocationFeed/Watch streams.
    pub subscribers: Gauge,
    /// `keygate_feed_applied_sequence`: highest event sequence applied by
    /// this replica.
    pub applied: Gauge,
    /// `keygate_feed_lag_seconds`: seconds since this replica last read the
    /// event log, 0 when in touch.
    pub lag_seconds: Gauge,
}

impl Default for FeedMetrics {
    fn default() -> Self {
        Self {
            subscribers: metrics::gauge!("keygate_feed_subscribers"),
            applied: metrics::gauge!("keygate_feed_applied_sequence"),
            lag_seconds: metrics::gauge!("keygate_feed_lag_seconds"),
        }
    }
}

/// Logging, and OpenTelemetry traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is
/// set (the standard `OTEL_*` variables configure the exporter). Keep the
/// returned guard alive; dropping it flushes and stops the exporter.
pub struct TracingGuard(Option<opentelemetry_sdk::trace::SdkTracerProvider>);

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("keygate: flushing traces failed: {e}");
        }
    }
}

/// Logs as JSON or text to stderr, level from `RUST_LOG` (default info).
pub fn init_tracing(json: bool) -> TracingGuard {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let provider = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .and_then(|_| {
            match opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
            {
                Ok(exporter) => Some(
                    opentelemetry_sdk::trace::SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(
                            opentelemetry_sdk::Resource::builder()
                                .with_service_name("keygate")
                                .build(),
                        )
                        .build(),
                ),
                Err(e) => {
                    eprintln!("keygate: OTLP exporter not started: {e}");
                    None
                }
            }
        });
    let otel = provider.as_ref().map(|p| {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        tracing_opentelemetry::layer().with_tracer(p.tracer("keygate"))
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    TracingGuard(provider)
}

/// The span of one gRPC call: method, and for Authorize the decision, reason
/// and key id (never a token). A W3C `traceparent` continues the caller's trace.
pub fn rpc_span(request: &http::Request<()>) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let span = tracing::info_span!(
        "rpc",
        otel.kind = "server",
        rpc.method = %request.uri().path(),
        decision = tracing::field::Empty,
        reason = tracing::field::Empty,
        key_id = tracing::field::Empty,
    );
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(request.headers())));
    let _ = span.set_parent(parent);
    span
}

struct Headers<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
