//! `keygate serve`.

use std::net::{Ipv4Addr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use keygate_core::analytics::UsageRetention;
use keygate_core::clock::SystemClock;
use keygate_core::limits::Allowance;
use keygate_core::policy::Policy;
use keygate_core::token::{Brand, DEFAULT_BRAND};
use tokio::net::TcpListener;

use super::{
    DEFAULT_PORT, LogFormat, StoreArgs, duration_text, init_logging, parse_bytes, parse_duration,
    size_text,
};
use crate::api::console::ConsoleSettings;
use crate::api::ext_authz::ExtAuthzSettings;
use crate::cache::CacheSettings;
use crate::feed::FeedSettings;
use crate::jwt::JwksSettings;
use crate::server::{Keygate, RateLimitStore, ServerLimits, Settings, TlsSettings};
use crate::service::shared_limits::StoreFailure;
use crate::store::{StoreSettings, sql_redact};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to serve gRPC on.
    #[arg(
        long,
        env = "KEYGATE_LISTEN",
        default_value_t = SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT))
    )]
    listen: SocketAddr,
    /// Also serve grpc.health.v1 alone, in plaintext, on this address: for
    /// Kubernetes' gRPC probes when the main port serves TLS (off when unset).
    #[arg(long, env = "KEYGATE_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,
    #[command(flatten)]
    store: StoreArgs,
    /// Route policy (TOML): which scope each route needs. Without one, only
    /// Authorize calls that name required_scopes can be allowed.
    #[arg(long, env = "KEYGATE_POLICY")]
    policy: Option<PathBuf>,
    /// Token brand: new tokens look like <brand>_live_… (e.g. ck, op).
    #[arg(long, env = "KEYGATE_BRAND", default_value = DEFAULT_BRAND)]
    brand: String,
    /// How long a key record stays cached.
    #[arg(
        long,
        env = "KEYGATE_CACHE_TTL",
        default_value = duration_text(CacheSettings::default().ttl),
        value_parser = parse_duration
    )]
    cache_ttl: Duration,
    /// How long an unknown key id is remembered as unknown.
    #[arg(
        long,
        env = "KEYGATE_NEGATIVE_CACHE_TTL",
        default_value = duration_text(CacheSettings::default().negative_ttl),
        value_parser = parse_duration
    )]
    negative_cache_ttl: Duration,
    /// Most memory for cached key records, in bytes (suffixes KiB, MiB,
    /// GiB): a key with many scopes or CIDRs weighs more. 1/8 of it holds
    /// remembered unknown ids.
    #[arg(
        long,
        env = "KEYGATE_CACHE_MAX_BYTES",
        default_value = size_text(CacheSettings::default().max_bytes),
        value_parser = parse_bytes
    )]
    cache_max_bytes: u64,
    /// Most store reads Authorize runs at once for keys not in memory; over
    /// it, calls wait up to --store-read-wait, then answer UNAVAILABLE
    /// (cached keys never wait).
    #[arg(
        long,
        env = "KEYGATE_STORE_READ_LIMIT",
        default_value = CacheSettings::default().store_reads.to_string()
    )]
    store_read_limit: std::num::NonZeroU32,
    /// How long an Authorize call waits for one of --store-read-limit's reads.
    #[arg(
        long,
        env = "KEYGATE_STORE_READ_WAIT",
        default_value = duration_text(CacheSettings::default().store_read_wait),
        value_parser = parse_duration
    )]
    store_read_wait: Duration,
    /// Longest one store call may take (waiting for a connection included)
    /// before it fails with UNAVAILABLE: no call waits longer than this on a
    /// database that is down or cut off.
    #[arg(
        long,
        env = "KEYGATE_STORE_TIMEOUT",
        default_value = duration_text(StoreSettings::default().timeout),
        value_parser = parse_duration
    )]
    store_timeout: Duration,
    /// Longest this replica may go without reading the event log before it
    /// stops answering from its cache (a revoked key lives at most this long
    /// anywhere, even during a partition).
    #[arg(
        long,
        env = "KEYGATE_MAX_STALENESS",
        default_value = duration_text(Settings::new("").max_staleness),
        value_parser = parse_duration
    )]
    max_staleness: Duration,
    /// Longest wait between two reads of the event log (NOTIFY or a local
    /// write usually wakes it sooner).
    #[arg(
        long,
        env = "KEYGATE_FEED_POLL_INTERVAL",
        default_value = duration_text(FeedSettings::default().poll_interval),
        value_parser = parse_duration
    )]
    feed_poll_interval: Duration,
    /// How often Watch streams get a HEARTBEAT.
    #[arg(
        long,
        env = "KEYGATE_FEED_HEARTBEAT",
        default_value = duration_text(FeedSettings::default().heartbeat),
        value_parser = parse_duration
    )]
    feed_heartbeat: Duration,
    /// How far back (in events) a Watch can resume; older positions get RESET.
    #[arg(
        long,
        env = "KEYGATE_FEED_MAX_REPLAY",
        default_value_t = FeedSettings::default().max_replay
    )]
    feed_max_replay: i64,
    /// How often this replica records its applied sequence in the store; a
    /// replica is live (waited for by wait_for_replicas) until its last
    /// record is older than --max-staleness plus this plus --feed-poll-interval.
    #[arg(
        long,
        env = "KEYGATE_REPLICA_HEARTBEAT",
        default_value = duration_text(FeedSettings::default().replica_heartbeat),
        value_parser = parse_duration
    )]
    replica_heartbeat: Duration,
    /// Requests per minute for keys whose own rate_limit_per_minute is 0, or
    /// `off`: such keys are not limited.
    #[arg(
        long,
        env = "KEYGATE_DEFAULT_RATE_LIMIT",
        default_value = Allowance::DEFAULT.setting_text(),
        value_parser = Allowance::parse_setting
    )]
    default_rate_limit: Allowance,
    /// redis://HOST:PORT (rediss:// for TLS): share rate-limit windows with
    /// every replica; without it each replica counts its own requests.
    #[arg(long, env = "KEYGATE_RATE_LIMIT_STORE", hide_env_values = true)]
    rate_limit_store: Option<String>,
    /// While the rate-limit store does not answer: `local` enforces each
    /// limit / live replicas on every replica, `deny` refuses limited requests.
    #[arg(
        long,
        env = "KEYGATE_RATE_LIMIT_STORE_FAILURE",
        value_enum,
        default_value_t = StoreFailure::default().into()
    )]
    rate_limit_store_failure: StoreFailureArg,
    /// How often last-used times are written to the store (also at shutdown).
    #[arg(
        long,
        env = "KEYGATE_USAGE_FLUSH_INTERVAL",
        default_value = duration_text(Settings::new("").usage_flush_interval),
        value_parser = parse_duration
    )]
    usage_flush_interval: Duration,
    /// How long per-minute usage buckets are kept (GetKeyUsage MINUTE).
    #[arg(
        long,
        env = "KEYGATE_USAGE_MINUTE_RETENTION",
        default_value = duration_text(UsageRetention::default().minutes),
        value_parser = parse_duration
    )]
    usage_minute_retention: Duration,
    /// How long per-hour usage buckets are kept (GetKeyUsage HOUR).
    #[arg(
        long,
        env = "KEYGATE_USAGE_HOUR_RETENTION",
        default_value = duration_text(UsageRetention::default().hours),
        value_parser = parse_duration
    )]
    usage_hour_retention: Duration,
    /// Count Authorize outcomes per key for usage analytics (GetKeyUsage,
    /// `keygate keys usage`, the console's charts): `on` or `off`. Off, this
    /// replica counts nothing; what other replicas counted still reads back.
    #[arg(
        long,
        env = "KEYGATE_USAGE_ANALYTICS",
        value_name = "on|off",
        default_value = if Settings::new("").usage_analytics { "on" } else { "off" },
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::Set
    )]
    usage_analytics: bool,
    /// On SIGTERM/SIGINT, how long calls in flight may take to finish.
    #[arg(
        long,
        env = "KEYGATE_SHUTDOWN_GRACE",
        default_value = duration_text(Settings::new("").shutdown_grace),
        value_parser = parse_duration
    )]
    shutdown_grace: Duration,
    /// This replica's name in ListReplicas (default: hostname:port).
    #[arg(long, env = "KEYGATE_REPLICA_NAME")]
    replica_name: Option<String>,
    /// PEM certificate (chain) to serve TLS with; needs --tls-key.
    #[arg(long, env = "KEYGATE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "KEYGATE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle: clients must present a certificate it signed (mTLS).
    #[arg(long, env = "KEYGATE_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve the operator console (HTML, HTTPS when --tls-cert is set) on
    /// this address (off when unset); e.g. 127.0.0.1:8080.
    #[arg(long, env = "KEYGATE_CONSOLE_LISTEN")]
    console_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics on this address, at /metrics (off when unset).
    #[arg(long, env = "KEYGATE_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Envoy ext_authz: request headers that may carry the API key, in order
    /// of preference (a `Bearer ` prefix is accepted in any of them).
    #[arg(
        long = "ext-authz-credential-header",
        env = "KEYGATE_EXT_AUTHZ_CREDENTIAL_HEADERS",
        value_delimiter = ',',
        default_values = keygate_core::token::DEFAULT_CREDENTIAL_HEADERS
    )]
    ext_authz_credential_headers: Vec<String>,
    /// Envoy ext_authz: remove the credential headers before the request goes
    /// upstream, so upstreams never see a secret.
    #[arg(
        long,
        env = "KEYGATE_EXT_AUTHZ_STRIP_CREDENTIALS",
        default_value_t = ExtAuthzSettings::default().strip_credentials,
        action = clap::ArgAction::Set
    )]
    ext_authz_strip_credentials: bool,
    /// Envoy ext_authz: also hand Envoy the identity as dynamic metadata
    /// under envoy.filters.http.ext_authz, for RBAC rules and access logs
    /// that read it there (the identity headers carry the same).
    #[arg(
        long,
        env = "KEYGATE_EXT_AUTHZ_DYNAMIC_METADATA",
        default_value_t = ExtAuthzSettings::default().dynamic_metadata,
        action = clap::ArgAction::Set
    )]
    ext_authz_dynamic_metadata: bool,
    /// HTTP/2 streams one connection may have open at once; each open Watch
    /// is one for its whole life.
    #[arg(
        long,
        env = "KEYGATE_MAX_CONCURRENT_STREAMS",
        default_value = ServerLimits::default().max_concurrent_streams.to_string()
    )]
    max_concurrent_streams: NonZeroU32,
    /// Calls in progress across all connections; beyond it calls are refused
    /// with RESOURCE_EXHAUSTED (an open Watch counts only while it opens).
    #[arg(
        long,
        env = "KEYGATE_MAX_CONCURRENT_REQUESTS",
        default_value = ServerLimits::default().max_concurrent_requests.to_string()
    )]
    max_concurrent_requests: NonZeroUsize,
    /// Longest a call may take to answer (a stream: to start) before
    /// DEADLINE_EXCEEDED; KeyAdmin calls get 60s more for replica waits.
    #[arg(
        long,
        env = "KEYGATE_REQUEST_TIMEOUT",
        default_value = duration_text(ServerLimits::default().request_timeout),
        value_parser = parse_duration
    )]
    request_timeout: Duration,
    /// Largest request message in bytes, for every service but Envoy's Check.
    #[arg(
        long,
        env = "KEYGATE_MAX_REQUEST_SIZE",
        default_value = ServerLimits::default().max_request_size.to_string()
    )]
    max_request_size: NonZeroUsize,
    /// Largest Envoy CheckRequest in bytes (it carries every request header:
    /// keep it above Envoy's max_request_headers_kb, 60 KiB by default).
    #[arg(
        long,
        env = "KEYGATE_EXT_AUTHZ_MAX_REQUEST_SIZE",
        default_value = ServerLimits::default().ext_authz_max_request_size.to_string()
    )]
    ext_authz_max_request_size: NonZeroUsize,
    /// Watch streams one key may have open at once on this replica.
    #[arg(
        long,
        env = "KEYGATE_WATCH_MAX_STREAMS_PER_KEY",
        default_value = ServerLimits::default().watch_streams_per_key.to_string()
    )]
    watch_max_streams_per_key: NonZeroUsize,
    /// Log format; traces also go to OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[arg(long, env = "KEYGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn tls_settings(args: &ServeArgs) -> Result<Option<TlsSettings>, String> {
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
    };
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    Ok(Some(TlsSettings {
        cert_pem: read("--tls-cert", cert)?,
        key_pem: read("--tls-key", key)?,
        client_ca_pem: args
            .tls_client_ca
            .as_ref()
            .map(|ca| read("--tls-client-ca", ca))
            .transpose()?,
    }))
}

/// `--rate-limit-store-failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreFailureArg {
    /// Enforce each limit / live replicas on every replica.
    Local,
    /// Refuse every limited request.
    Deny,
}

impl From<StoreFailure> for StoreFailureArg {
    fn from(failure: StoreFailure) -> Self {
        match failure {
            StoreFailure::Local => StoreFailureArg::Local,
            StoreFailure::Deny => StoreFailureArg::Deny,
        }
    }
}

impl From<StoreFailureArg> for StoreFailure {
    fn from(arg: StoreFailureArg) -> Self {
        match arg {
            StoreFailureArg::Local => StoreFailure::Local,
            StoreFailureArg::Deny => StoreFailure::Deny,
        }
    }
}

fn default_replica_name(listen: SocketAddr) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "keygate".into());
    format!("{host}:{}", listen.port())
}

/// What serve runs with: the flags, read into the server's settings (the
/// policy and TLS files are read here).
fn settings(args: &ServeArgs) -> Result<Settings, String> {
    let brand = Brand::new(&args.brand).map_err(|e| format!("--brand: {e}"))?;
    let Policy {
        routes: policy,
        jwt_issuers,
    } = match &args.policy {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--policy {}: {e}", path.display()))?;
            Policy::from_toml(&text).map_err(|e| format!("--policy {}: {e}", path.display()))?
        }
        None => {
            tracing::warn!(
                "no --policy given: Authorize allows only calls that name required_scopes"
            );
            Policy::default()
        }
    };
    if args.request_timeout.is_zero() {
        return Err("--request-timeout must be more than 0s".into());
    }
    if args.store_timeout.is_zero() {
        return Err("--store-timeout must be more than 0s".into());
    }
    Ok(Settings {
        database_url: args.store.url(),
        store: StoreSettings {
            timeout: args.store_timeout,
        },
        policy,
        jwt_issuers,
        jwks: JwksSettings::default(),
        brand,
        cache: CacheSettings {
            max_bytes: args.cache_max_bytes,
            ttl: args.cache_ttl,
            negative_ttl: args.negative_cache_ttl,
            store_reads: args.store_read_limit.get(),
            store_read_wait: args.store_read_wait,
        },
        load_key_index: true,
        feed: FeedSettings {
            poll_interval: args.feed_poll_interval,
            heartbeat: args.feed_heartbeat,
            replica_heartbeat: args.replica_heartbeat,
            max_replay: args.feed_max_replay,
            name: args
                .replica_name
                .clone()
                .unwrap_or_else(|| default_replica_name(args.listen)),
        },
        max_staleness: args.max_staleness,
        default_rate_limit: args.default_rate_limit,
        usage_flush_interval: args.usage_flush_interval,
        usage_retention: UsageRetention {
            minutes: args.usage_minute_retention,
            hours: args.usage_hour_retention,
        },
        usage_analytics: args.usage_analytics,
        shutdown_grace: args.shutdown_grace,
        tls: tls_settings(args)?,
        ext_authz: ExtAuthzSettings {
            credential_headers: args.ext_authz_credential_headers.clone(),
            strip_credentials: args.ext_authz_strip_credentials,
            dynamic_metadata: args.ext_authz_dynamic_metadata,
        },
        console: args.console_listen.map(|_| ConsoleSettings::default()),
        rate_limit_store: args.rate_limit_store.clone().map(|url| RateLimitStore {
            url,
            failure: args.rate_limit_store_failure.into(),
        }),
        limits: ServerLimits {
            max_concurrent_streams: args.max_concurrent_streams.get(),
            max_concurrent_requests: args.max_concurrent_requests.get(),
            request_timeout: args.request_timeout,
            max_request_size: args.max_request_size.get(),
            ext_authz_max_request_size: args.ext_authz_max_request_size.get(),
            watch_streams_per_key: args.watch_max_streams_per_key.get(),
        },
    })
}

pub async fn run(args: ServeArgs) -> Result<(), String> {
    let _tracing = init_logging(args.log_format);
    if let Some(addr) = args.metrics_addr {
        crate::telemetry::install_prometheus(addr)?;
        tracing::info!(metrics = %addr, "serving Prometheus metrics on /metrics");
    }
    let settings = settings(&args)?;
    let url = settings.database_url.clone();
    let mut keygate = Keygate::open(settings, Arc::new(SystemClock))
        .await
        .map_err(|e| format!("opening {}: {e}", sql_redact(&url)))?;
    if let Some(addr) = args.health_listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--health-listen {addr}: {e}"))?;
        tracing::info!(health = %addr, "serving grpc.health.v1 in plaintext");
        keygate = keygate.with_health_listener(listener);
    }
    if let Some(addr) = args.console_listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--console-listen {addr}: {e}"))?;
        tracing::info!(console = %addr, "serving the operator console");
        keygate = keygate.with_console_listener(listener);
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", args.listen))?;
    tracing::info!(listen = %args.listen, database = %sql_redact(&url), "keygate serving");
    keygate
        .serve(listener, shutdown_signal())
        .await
        .map_err(|e| format!("serving: {e}"))?;
    tracing::info!("keygate stopped");
    Ok(())
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use clap::{Args, FromArgMatches};

    use super::*;

    fn command() -> clap::Command {
        ServeArgs::augment_args(clap::Command::new("serve"))
    }

    /// `keygate serve` with no flags, whatever KEYGATE_* the test runs under.
    fn bare() -> ServeArgs {
        let matches = command()
            .mut_args(|arg| arg.env(None))
            .try_get_matches_from(["serve"])
            .unwrap();
        ServeArgs::from_arg_matches(&matches).unwrap()
    }

    /// Each default is defined once, by the settings type that owns it; the
    /// flags only show it. Destructured in full, so a new setting must be
    /// looked at here.
    #[test]
    fn flag_defaults_are_the_settings_defaults() {
        let parsed = settings(&bare()).unwrap();
        let owner = Settings::new(parsed.database_url.clone());
        let Settings {
            database_url: _,
            store,
            policy: _,
            jwt_issuers,
            jwks,
            brand,
            cache,
            load_key_index,
            feed,
            max_staleness,
            default_rate_limit,
            usage_flush_interval,
            usage_retention,
            usage_analytics,
            shutdown_grace,
            tls,
            ext_authz,
            limits,
            rate_limit_store,
            console,
        } = parsed;
        assert!(
            console.is_none() && owner.console.is_none(),
            "off unless set"
        );
        assert!(rate_limit_store.is_none() && owner.rate_limit_store.is_none());
        assert!(jwt_issuers.is_empty() && owner.jwt_issuers.is_empty());
        assert_eq!(format!("{jwks:?}"), format!("{:?}", owner.jwks));
        assert_eq!(store, owner.store);
        assert_eq!(brand, owner.brand);
        assert_eq!(format!("{cache:?}"), format!("{:?}", owner.cache));
        assert_eq!(load_key_index, owner.load_key_index);
        // The replica's name defaults to host:port, not to the library's placeholder.
        let feed = FeedSettings {
            name: owner.feed.name.clone(),
            ..feed
        };
        assert_eq!(format!("{feed:?}"), format!("{:?}", owner.feed));
        assert_eq!(max_staleness, owner.max_staleness);
        assert_eq!(default_rate_limit, owner.default_rate_limit);
        assert_eq!(usage_flush_interval, owner.usage_flush_interval);
        assert_eq!(usage_retention, owner.usage_retention);
        assert_eq!(usage_analytics, owner.usage_analytics);
        assert_eq!(shutdown_grace, owner.shutdown_grace);
        assert!(tls.is_none() && owner.tls.is_none());
        assert_eq!(format!("{ext_authz:?}"), format!("{:?}", owner.ext_authz));
        assert_eq!(format!("{limits:?}"), format!("{:?}", owner.limits));
    }

    /// The README's settings table shows the defaults serve really has.
    #[test]
    fn the_readme_shows_the_defaults() {
        let readme = include_str!("../../README.md");
        for arg in command().get_arguments() {
            let defaults = arg.get_default_values();
            if defaults.is_empty() {
                continue;
            }
            let long = arg.get_long().unwrap();
            let row = readme
                .lines()
                .find(|line| {
                    line.strip_prefix("| `--").is_some_and(|rest| {
                        rest.split(|c: char| c != '-' && !c.is_ascii_alphanumeric())
                            .next()
                            == Some(long)
                    })
                })
                .unwrap_or_else(|| panic!("no README row for --{long}"));
            let shown = row
                .split(" | ")
                .nth(2)
                .and_then(|cell| cell.split('`').nth(1));
            let defaults: Vec<_> = defaults.iter().map(|d| d.to_string_lossy()).collect();
            assert_eq!(shown, Some(defaults.join(",").as_str()), "--{long}: {row}");
        }
    }
}
