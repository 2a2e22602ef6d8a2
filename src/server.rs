//! Assembles keygate from its settings and serves it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use keygate_core::analytics::UsageRetention;
use keygate_core::clock::Clock;
use keygate_core::jwt::IssuerConfig;
use keygate_core::key_id::KeyIds;
use keygate_core::limits::Allowance;
use keygate_core::policy::RouteTable;
use keygate_core::token::Brand;
use keygate_proto as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::api::admin::AdminApi;
use crate::api::admission::AdmissionLayer;
use crate::api::authorizer::AuthorizerApi;
use crate::api::console::{Console, ConsoleSettings};
use crate::api::ext_authz::{ExtAuthzApi, ExtAuthzSettings};
use crate::api::feed::FeedApi;
use crate::api::validate::MAX_REPLICA_WAIT;
use crate::cache::{CacheSettings, Freshness, KeyCache};
use crate::feed::{Feed, FeedSettings};
use crate::jwt::{JwksSettings, Verifier};
use crate::service::limits::{Limiter, LocalLimiter};
use crate::service::organizations::{OrganizationLimits, OrganizationService};
use crate::service::replicas::Replicas;
use crate::service::shared_limits::{BadStoreUrl, SharedLimits, StoreFailure};
use crate::service::usage::UsageTracker;
use crate::service::watch::Watchers;
use crate::service::{Authorizer, KeyService};
use crate::store::{SqlStore, StoreError, StoreSettings};

/// Everything `serve` needs besides the listener.
pub struct Settings {
    /// `sqlite://PATH` or `postgres://…`; may carry a password, so never
    /// printed except through `store::sql_redact`.
    pub database_url: String,
    /// How long one store call may take.
    pub store: StoreSettings,
    /// Which scope each route needs.
    pub policy: RouteTable,
    /// The trusted JWT issuers (the policy file's `[[jwt_issuer]]` tables).
    pub jwt_issuers: Vec<IssuerConfig>,
    /// When the issuers' JWKS are fetched again.
    pub jwks: JwksSettings,
    /// The token prefix keys are minted with (`kg` → `kg_live_…`).
    pub brand: Brand,
    /// Sizes and lifetimes of the key cache.
    pub cache: CacheSettings,
    /// Load the key-id index at start (on by default). Off, every uncached
    /// id is read from the store as if there were no index.
    pub load_key_index: bool,
    /// How the revocation feed follows the log and talks to subscribers.
    pub feed: FeedSettings,
    /// Out of touch with the event log for longer than this, the cache is bypassed.
    pub max_staleness: Duration,
    /// The allowance of keys whose own limit is 0: requests per minute, or
    /// unlimited (`--default-rate-limit off`).
    pub default_rate_limit: Allowance,
    /// How often last-used times and usage counts are written to the store.
    pub usage_flush_interval: Duration,
    /// How long usage analytics buckets are kept.
    pub usage_retention: UsageRetention,
    /// Whether Authorize outcomes are counted per key for usage analytics
    /// (`--usage-analytics off`: nothing counted on this replica).
    pub usage_analytics: bool,
    /// On shutdown, how long calls in flight may take to finish.
    pub shutdown_grace: Duration,
    /// Serve TLS (rustls) instead of plaintext.
    pub tls: Option<TlsSettings>,
    /// How Envoy's Check finds credentials and what it hides from upstreams.
    pub ext_authz: ExtAuthzSettings,
    /// How much of the server one caller or connection can hold.
    pub limits: ServerLimits,
    /// Share rate-limit windows with every replica through Redis; `None`:
    /// each replica counts its own requests.
    pub rate_limit_store: Option<RateLimitStore>,
    /// The operator console's sessions, when it is served
    /// ([`Keygate::with_console_listener`]); `None`: no console.
    pub console: Option<ConsoleSettings>,
}

/// Where rate-limit windows are shared, and what to do when it is down.
#[derive(Clone)]
pub struct RateLimitStore {
    /// `redis://host:port` or `rediss://…` (TLS); may carry a password, so
    /// never printed.
    pub url: String,
    /// What a replica does while Redis does not answer.
    pub failure: StoreFailure,
}

impl std::fmt::Debug for RateLimitStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitStore")
            .field("url", &crate::store::sql_redact(&self.url))
            .field("failure", &self.failure)
            .finish()
    }
}

/// Why a keygate could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The key store could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The rate-limit store URL is not usable.
    #[error(transparent)]
    RateLimitStore(#[from] BadStoreUrl),
    /// A JWT issuer's settings cannot be used (its CA file); names it.
    #[error("{0}")]
    JwtIssuer(String),
}

/// Bounds on what callers can hold of a server.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// HTTP/2 streams one connection may have open at once (each open Watch is one).
    pub max_concurrent_streams: u32,
    /// Calls in progress across all connections; beyond it RESOURCE_EXHAUSTED.
    /// An open Watch stream does not count, only its opening.
    pub max_concurrent_requests: usize,
    /// Longest a call may take to answer (a stream: to start); KeyAdmin calls
    /// get the longest replica wait on top. Beyond it DEADLINE_EXCEEDED.
    pub request_timeout: Duration,
    /// Largest request message, in bytes, for every service but Envoy's Check.
    pub max_request_size: usize,
    /// Largest CheckRequest from Envoy, in bytes: it carries every request header.
    pub ext_authz_max_request_size: usize,
    /// Watch streams one key may have open at once, on this replica.
    pub watch_streams_per_key: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 256,
            max_concurrent_requests: 1024,
            request_timeout: Duration::from_secs(10),
            max_request_size: 64 * 1024,
            ext_authz_max_request_size: 256 * 1024,
            watch_streams_per_key: 16,
        }
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The database URL may carry a password.
        f.debug_struct("Settings")
            .field(
                "database_url",
                &crate::store::sql_redact(&self.database_url),
            )
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// PEM certificate chain and key, and optionally the CA that client
/// certificates must chain to (mTLS: then a client without one is refused).
#[derive(Clone)]
pub struct TlsSettings {
    /// The server's certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// The server's private key, PEM; never printed.
    pub key_pem: Vec<u8>,
    /// With it, every client must present a certificate chaining to this CA.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("TlsSettings")
            .field("mtls", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl TlsSettings {
    fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        let identity = tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem);
        let config = tonic::transport::ServerTlsConfig::new().identity(identity);
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(tonic::transport::Certificate::from_pem(ca)),
            None => config,
        }
    }
}

impl Settings {
    /// Defaults for everything but where the keys live.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            store: StoreSettings::default(),
            policy: RouteTable::default(),
            jwt_issuers: Vec::new(),
            jwks: JwksSettings::default(),
            brand: Brand::default(),
            cache: CacheSettings::default(),
            load_key_index: true,
            feed: FeedSettings::default(),
            max_staleness: Duration::from_secs(30),
            default_rate_limit: Allowance::DEFAULT,
            usage_flush_interval: Duration::from_secs(5),
            usage_retention: UsageRetention::default(),
            usage_analytics: true,
            shutdown_grace: Duration::from_secs(20),
            tls: None,
            ext_authz: ExtAuthzSettings::default(),
            limits: ServerLimits::default(),
            rate_limit_store: None,
            console: None,
        }
    }
}

/// A running keygate's parts, connected to its store.
pub struct Keygate {
    /// The Authorize path (and admin callers' authentication).
    pub authorizer: Arc<Authorizer>,
    /// The key lifecycle.
    pub keys: Arc<KeyService>,
    /// The store everything above reads and writes.
    pub store: Arc<SqlStore>,
    /// This replica's follower of the event log and its Watch fan-out.
    pub feed: Arc<Feed>,
    /// The replica registry and write confirmation.
    pub replicas: Arc<Replicas>,
    /// Key records in memory in front of the store.
    pub cache: Arc<KeyCache>,
    /// Open Watch sessions, bounded per key.
    pub watchers: Arc<Watchers>,
    /// The Redis-shared rate-limit windows, with `--rate-limit-store`.
    pub shared_limits: Option<Arc<SharedLimits>>,
    /// This replica's own rate-limit windows, without `--rate-limit-store`.
    pub local_limits: Option<Arc<LocalLimiter>>,
    /// The trusted JWT issuers' keys and the verified JWTs.
    pub jwt: Arc<Verifier>,
    /// Organizations' shared rate limits, as this replica holds them.
    pub organization_limits: Arc<OrganizationLimits>,
    /// SetOrganizationLimits and GetOrganizationLimits.
    pub organizations: Arc<OrganizationService>,
    load_key_index: bool,
    poll_interval: Duration,
    usage_flush_interval: Duration,
    usage_retention: UsageRetention,
    shutdown_grace: Duration,
    tls: Option<TlsSettings>,
    ext_authz: ExtAuthzSettings,
    limits: ServerLimits,
    health_listener: Option<TcpListener>,
    console: Option<ConsoleSettings>,
    console_listener: Option<TcpListener>,
    clock: Arc<dyn Clock>,
}

impl Keygate {
    /// Connects to the store (applying migrations) and builds the services.
    pub async fn open(settings: Settings, clock: Arc<dyn Clock>) -> Result<Self, OpenError> {
        let console_clock = clock.clone();
        let store = Arc::new(SqlStore::connect_with(&settings.database_url, settings.store).await?);
        let page_key = store.shared_secret("page_token_key").await?;
        let key_ids = Arc::new(KeyIds::new(store.shared_secret("key_id_key").await?));
        let freshness = Arc::new(Freshness::new(settings.max_staleness));
        let cache = Arc::new(KeyCache::new(
            store.clone(),
            settings.cache,
            freshness.clone(),
            key_ids,
        ));
        let poll_interval = settings.feed.poll_interval;
        let heartbeat = settings.feed.heartbeat;
        let follower = Arc::new(store.follower());
        let replicas = Arc::new(Replicas::new(
            store.clone(),
            follower.clone(),
            store.clone(),
            settings.max_staleness,
            &settings.feed,
        ));
        let feed = Feed::new(
            store.clone(),
            follower,
            cache.clone(),
            freshness,
            replicas.clone(),
            settings.feed,
        )
        .await?;
        let feed = Arc::new(feed);
        let usage = Arc::new(UsageTracker::new(settings.usage_analytics));
        let shared_limits = match &settings.rate_limit_store {
            Some(store) => Some(Arc::new(SharedLimits::new(
                &store.url,
                store.failure,
                clock.clone(),
            )?)),
            None => None,
        };
        let (limiter, local_limits) = match &shared_limits {
            Some(shared) => (Limiter::Shared(shared.clone()), None),
            None => {
                let local = Arc::new(LocalLimiter::new(clock.clone()));
                (Limiter::Local(local.clone()), Some(local))
            }
        };
        let organization_limits = Arc::new(OrganizationLimits::load(store.clone()).await?);
        let organizations = Arc::new(OrganizationService::new(
            organization_limits.clone(),
            clock.clone(),
        ));
        let jwt = Arc::new(
            Verifier::new(settings.jwt_issuers, clock.clone(), settings.jwks)
                .map_err(OpenError::JwtIssuer)?,
        );
        // At start, so tokens work from the first call; an issuer that does
        // not answer is retried in the background, its tokens refused meanwhile.
        jwt.fetch_all().await;
        let authorizer = Arc::new(
            Authorizer::new(
                cache.clone(),
                Arc::new(settings.policy),
                clock.clone(),
                limiter,
                settings.default_rate_limit,
                organization_limits.clone(),
                usage.clone(),
            )
            .with_jwt(jwt.clone()),
        );
        let watchers = Arc::new(Watchers::new(
            authorizer.clone(),
            feed.clone(),
            settings.limits.watch_streams_per_key,
            heartbeat,
        ));
        let keys = Arc::new(
            KeyService::new(
                store.clone(),
                cache.clone(),
                clock,
                settings.brand,
                page_key,
                replicas.clone(),
                usage,
            )
            .with_default_rate_limit(settings.default_rate_limit),
        );
        Ok(Self {
            authorizer,
            keys,
            store,
            feed,
            replicas,
            cache,
            watchers,
            shared_limits,
            local_limits,
            jwt,
            organization_limits,
            organizations,
            load_key_index: settings.load_key_index,
            poll_interval,
            usage_flush_interval: settings.usage_flush_interval,
            usage_retention: settings.usage_retention,
            shutdown_grace: settings.shutdown_grace,
            tls: settings.tls,
            ext_authz: settings.ext_authz,
            limits: settings.limits,
            health_listener: None,
            console: settings.console,
            console_listener: None,
            clock: console_clock,
        })
    }

    /// Also serve grpc.health.v1, and only that, in plaintext on `listener`:
    /// Kubernetes' gRPC probes cannot speak TLS, so with TLS on they need a
    /// port of their own to see what the store's health is.
    pub fn with_health_listener(mut self, listener: TcpListener) -> Self {
        self.health_listener = Some(listener);
        self
    }

    /// Also serve the operator console on `listener` (plain HTTP, or HTTPS
    /// with the server's TLS settings), when [`Settings::console`] is set.
    pub fn with_console_listener(mut self, listener: TcpListener) -> Self {
        self.console_listener = Some(listener);
        self
    }

    /// Serves gRPC on `listener` until `shutdown` completes, then lets
    /// in-flight calls finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let stopping = CancellationToken::new();
        tokio::spawn(self.feed.clone().run(stopping.clone()));
        tokio::spawn(self.jwt.clone().run(stopping.clone()));
        if let Some(shared) = self.shared_limits.clone() {
            tokio::spawn(shared.run(self.replicas.clone(), stopping.clone()));
        }
        let (listener_store, stopped) = (self.store.clone(), stopping.clone());
        tokio::spawn(async move { listener_store.listen_for_changes(stopped).await });
        // SERVING once other replicas' revocations wake this one: until the
        // listener is up they wait for its first catch-up or the feed's next
        // poll (on a TLS connection to PostgreSQL, tens of ms at least).
        if !self.store.wait_listening(LISTEN_WAIT).await {
            tracing::warn!(
                wait = ?LISTEN_WAIT,
                "not yet listening for other replicas' changes; serving anyway, reading them at every poll until it is"
            );
        }
        if self.load_key_index {
            // After the feed took its position (in `open`): see `crate::index`.
            let (index, store, stopped) = (
                self.cache.index().clone(),
                self.store.clone(),
                stopping.clone(),
            );
            tokio::spawn(async move {
                index
                    .load_until_done(&*store, crate::index::LOAD_PAGE, stopped)
                    .await
            });
        }
        tokio::spawn(announce_expired_secrets(
            self.keys.clone(),
            self.poll_interval,
            stopping.clone(),
        ));
        tokio::spawn(flush_usage(
            self.keys.clone(),
            self.usage_flush_interval,
            stopping.clone(),
        ));
        if let Some(local) = self.local_limits.clone() {
            tokio::spawn(sweep_rate_limits(local, stopping.clone()));
        }
        tokio::spawn(sweep_usage(
            self.keys.clone(),
            self.usage_retention,
            stopping.clone(),
        ));
        tokio::spawn(refresh_organization_limits(
            self.organization_limits.clone(),
            self.poll_interval,
            stopping.clone(),
        ));
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health = Health::new(reporter);
        // Migrations ran in `open`, so the store has answered by now.
        health.set_all(ServingStatus::Serving).await;
        health.set_alive().await;
        tokio::spawn(watch_store(
            self.store.clone(),
            health.clone(),
            stopping.clone(),
        ));
        if let Some(listener) = self.health_listener {
            let probes = health_service.clone();
            let stopped = stopping.clone();
            tokio::spawn(async move {
                let served = tonic::transport::Server::builder()
                    .add_service(probes)
                    .serve_with_incoming_shutdown(
                        crate::api::connection::incoming(listener),
                        stopped.cancelled_owned(),
                    )
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "health port failed");
                }
            });
        }

        if let (Some(listener), Some(settings)) = (self.console_listener, self.console) {
            let console = Console::new(
                self.authorizer.clone(),
                self.keys.clone(),
                self.replicas.clone(),
                self.organizations.clone(),
                self.clock.clone(),
                settings,
                self.tls.is_some(),
            );
            tokio::spawn(crate::api::console::serve(
                listener,
                console,
                self.tls.clone(),
                stopping.clone(),
            ));
        }

        let size = self.limits.max_request_size;
        let authorizer = AuthorizerApi::new(self.authorizer.clone())
            .into_server()
            .max_decoding_message_size(size);
        let admin = AdminApi::new(
            self.authorizer.clone(),
            self.keys.clone(),
            self.organizations.clone(),
        )
        .into_server()
        .max_decoding_message_size(size);
        let ext_authz = ExtAuthzApi::new(self.authorizer.clone(), self.ext_authz.clone())
            .into_server()
            .max_decoding_message_size(self.limits.ext_authz_max_request_size);
        let feed = FeedApi::new(
            self.authorizer.clone(),
            self.replicas.clone(),
            self.watchers.clone(),
            stopping.clone(),
        )
        .into_server()
        .max_decoding_message_size(size);
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("embedded descriptor sets are valid")
            .max_decoding_message_size(size);
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .expect("embedded descriptor sets are valid")
            .max_decoding_message_size(size);

        let (drain, drained) = tokio::sync::oneshot::channel::<()>();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.tls {
            builder = builder.tls_config(tls.server_config())?;
        }
        let server = builder
            .max_concurrent_streams(self.limits.max_concurrent_streams)
            .trace_fn(crate::telemetry::rpc_span)
            .layer(AdmissionLayer::new(
                self.limits.max_concurrent_requests,
                self.limits.request_timeout,
                MAX_REPLICA_WAIT,
            ))
            .add_service(health_service.max_decoding_message_size(size))
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(authorizer)
            .add_service(admin)
            .add_service(feed)
            .add_service(ext_authz)
            .serve_with_incoming_shutdown(crate::api::connection::incoming(listener), async {
                let _ = drained.await;
            });
        tokio::pin!(server);
        let served = tokio::select! {
            served = &mut server => served,
            () = shutdown => {
                // Load balancers see NOT_SERVING first; then no new
                // connections; Watch streams end with a status to reconnect
                // on; in-flight calls get up to the grace period.
                health.set_all(ServingStatus::NotServing).await;
                stopping.cancel();
                let _ = drain.send(());
                match tokio::time::timeout(self.shutdown_grace, &mut server).await {
                    Ok(served) => served,
                    Err(_) => {
                        tracing::warn!(grace = ?self.shutdown_grace, "shutdown grace elapsed; dropping calls still in flight");
                        Ok(())
                    }
                }
            }
        };
        stopping.cancel();
        // In-flight calls are done: write the last uses.
        if let Err(e) = self.keys.flush_usage().await {
            tracing::error!(error = %e, "could not write key usage at shutdown");
        }
        served
    }
}

/// grpc.health.v1 for every keygate service and the server as a whole ("").
#[derive(Clone)]
struct Health(tonic_health::server::HealthReporter);

impl Health {
    fn new(reporter: tonic_health::server::HealthReporter) -> Self {
        Self(reporter)
    }

    async fn set_alive(&self) {
        self.0
            .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
            .await;
    }

    async fn set_all(&self, status: ServingStatus) {
        use crate::api::check_wire::CheckServer;
        use pb::v1::{
            authorizer_server::AuthorizerServer, key_admin_server::KeyAdminServer,
            revocation_feed_server::RevocationFeedServer,
        };
        use tonic::server::NamedService;
        for name in [
            "",
            <AuthorizerServer<AuthorizerApi> as NamedService>::NAME,
            <KeyAdminServer<AdminApi> as NamedService>::NAME,
            <RevocationFeedServer<FeedApi> as NamedService>::NAME,
            <CheckServer as NamedService>::NAME,
        ] {
            self.0.set_service_status(name, status).await;
        }
    }
}

/// The health service name that only says the process is up and serving
/// gRPC: a liveness probe must not restart replicas because their store is
/// down (they would lose their caches and fail to start), so it stays
/// SERVING through store outages and shutdown.
pub const LIVENESS_SERVICE: &str = "liveness";

/// Longest start-up waits for the PostgreSQL event listener before
/// answering SERVING without it (a pooler that refuses LISTEN, say).
const LISTEN_WAIT: Duration = Duration::from_secs(2);

/// NOT_SERVING while the store does not answer, SERVING again when it does.
async fn watch_store(store: Arc<SqlStore>, health: Health, stopping: CancellationToken) {
    let mut serving = true;
    loop {
        tokio::select! {
            () = stopping.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let ok = tokio::time::timeout(Duration::from_secs(2), store.ping())
            .await
            .is_ok_and(|r| r.is_ok());
        if ok != serving && !stopping.is_cancelled() {
            serving = ok;
            if ok {
                tracing::info!("key store answers again: SERVING");
                health.set_all(ServingStatus::Serving).await;
            } else {
                tracing::warn!("key store does not answer: NOT_SERVING");
                health.set_all(ServingStatus::NotServing).await;
            }
        }
    }
}

/// Turns ended grace periods into EXPIRED_SECRET events, every `interval`.
async fn announce_expired_secrets(
    keys: Arc<KeyService>,
    interval: Duration,
    stopping: CancellationToken,
) {
    loop {
        if let Err(e) = keys.announce_expired_secrets().await {
            tracing::warn!(error = %e, "could not announce expired secrets");
        }
        tokio::select! {
            () = stopping.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Reads every organization's limit again every `interval` (the feed's poll
/// interval), so a limit set on another replica applies here within it. On
/// failure the limits in memory stay in force, and the next round retries.
async fn refresh_organization_limits(
    limits: Arc<OrganizationLimits>,
    interval: Duration,
    stopping: CancellationToken,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = stopping.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match limits.refresh().await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("organization limits read again");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "could not read organization limits; keeping the ones in memory");
            }
            Err(_) => {}
        }
    }
}

/// Writes last-used times every `interval`; the final flush happens when the
/// server has stopped (see `serve`).
/// A window idle for a minute holds nothing, so once a minute is often
/// enough to keep only the keys counted lately.
async fn sweep_rate_limits(local: Arc<LocalLimiter>, stopping: CancellationToken) {
    loop {
        tokio::select! {
            () = stopping.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        local.sweep();
    }
}

async fn flush_usage(keys: Arc<KeyService>, interval: Duration, stopping: CancellationToken) {
    loop {
        tokio::select! {
            () = stopping.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        if let Err(e) = keys.flush_usage().await {
            tracing::warn!(error = %e, "could not write key usage; will retry");
        }
    }
}

/// How often old usage buckets are swept.
const USAGE_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Deletes usage buckets past their retention, in bounded batches, every
/// [`USAGE_SWEEP_INTERVAL`]. Every replica sweeps; deleting what another
/// replica just deleted is harmless.
async fn sweep_usage(
    keys: Arc<KeyService>,
    retention: UsageRetention,
    stopping: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stopping.cancelled() => return,
            () = tokio::time::sleep(USAGE_SWEEP_INTERVAL) => {}
        }
        match keys.sweep_usage(retention).await {
            Ok(0) => {}
            Ok(swept) => tracing::debug!(swept, "swept old usage buckets"),
            Err(e) => tracing::warn!(error = %e, "could not sweep old usage buckets; will retry"),
        }
    }
}
