//! Starts keygate in-process on 127.0.0.1:0 with a fresh database and a manual
//! clock, bootstraps a SYSTEM key, and hands out typed clients.
//!
//! PostgreSQL comes from KEYGATE_TEST_POSTGRES_URL (a database is created per
//! test and dropped after), else from a throwaway server started with pgtemp
//! when PostgreSQL's binaries are installed; otherwise PostgreSQL tests print
//! that they skipped, or fail when KEYGATE_REQUIRE_POSTGRES=1.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use keygate::server::{Keygate, Settings};
use keygate::store::SqlStore;
use keygate_core::clock::{Clock, ManualClock};
use keygate_core::key::Mode;
use keygate_core::policy::RouteTable;
use keygate_proto::v1 as pb;
pub use pb::authorizer_client::AuthorizerClient;
pub use pb::key_admin_client::KeyAdminClient;
use sqlx::Connection;
use tokio::net::TcpListener;
use tonic::Request;
use tonic::transport::Channel;

/// The policy every test server loads.
pub const POLICY: &str = r#"
[[route]]
route = "POST /v1/checkouts"
scope = "checkout:create"
[[route]]
route = "GET /v1/transactions/{id}"
scope = "transaction:read"
[[route]]
route = "/payments.v1.Refunds/*"
scope = "transaction:update"
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs each listed `async fn name(backend: Backend)` once per backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::harness::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::harness::Backend::Postgres).await
                }
            )*
        }
    };
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub clock: Arc<ManualClock>,
    /// A SYSTEM key with `*:*`, made by bootstrap.
    pub admin_token: String,
    pub store: Arc<SqlStore>,
    pub keys: Arc<keygate::service::KeyService>,
    pub feed: Arc<keygate::feed::Feed>,
    pub replicas: Arc<keygate::service::replicas::Replicas>,
    /// The Redis-shared limits, when the settings named a rate-limit store.
    pub shared_limits: Option<Arc<keygate::service::shared_limits::SharedLimits>>,
    pub cache: Arc<keygate::cache::KeyCache>,
    pub database_url: String,
    /// The operator console, when the settings asked for one (`console: Some(…)`).
    pub console: Option<SocketAddr>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    dir: Option<tempfile::TempDir>,
    postgres_db: PostgresDb,
}

/// The PostgreSQL database a test server uses, to clean up after it.
enum PostgresDb {
    None,
    /// Created on KEYGATE_TEST_POSTGRES_URL's server; dropped at the end.
    Created {
        server: String,
        name: String,
    },
    /// A whole throwaway server; stopped at the end.
    Temporary(pgtemp::PgTempDB),
}

/// Where every test server's manual clock starts: the start of the minute
/// in which the first server of this run started, so replicas running on the
/// real clock agree with it to within a minute (the suite already runs that
/// far ahead of it) and expected times are easy to write. A whole minute on
/// purpose: calls made at the clock's start fall on the first instant of a
/// usage bucket in every run, not in one run of sixty.
pub fn epoch() -> DateTime<Utc> {
    static EPOCH: std::sync::OnceLock<DateTime<Utc>> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(|| {
        let now = Utc::now().timestamp();
        DateTime::from_timestamp(now - now.rem_euclid(60), 0).expect("valid")
    })
}

impl TestServer {
    /// `None` when the backend is unavailable and that is allowed.
    pub async fn start(backend: Backend) -> Option<Self> {
        Self::start_tls(backend, None).await
    }

    /// Like `start`, serving TLS (and mTLS when the settings name a client CA).
    pub async fn start_tls(
        backend: Backend,
        tls: Option<keygate::server::TlsSettings>,
    ) -> Option<Self> {
        Self::start_with(backend, move |s| s.tls = tls.clone()).await
    }

    /// Like `start`, with the test's own changes to the server's settings.
    pub async fn start_with(backend: Backend, configure: impl Fn(&mut Settings)) -> Option<Self> {
        let configure: &dyn Fn(&mut Settings) = &configure;
        let dir = tempfile::tempdir().expect("temp dir");
        let (database_url, postgres_db) = match backend {
            Backend::Sqlite => (
                format!("sqlite://{}", dir.path().join("keygate.db").display()),
                PostgresDb::None,
            ),
            Backend::Postgres => {
                let Some(server) = postgres_url() else {
                    let Some(temp) = temporary_postgres().await else {
                        return skip_postgres();
                    };
                    let temp_url = temp.connection_uri();
                    return Self::start_on(temp_url, dir, PostgresDb::Temporary(temp), configure)
                        .await;
                };
                let name = format!("keygate_it_{}", uuid::Uuid::new_v4().simple());
                let mut admin = sqlx::PgConnection::connect(&server)
                    .await
                    .expect("connect to postgres");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut admin)
                    .await
                    .expect("create test database");
                (
                    with_database(&server, &name),
                    PostgresDb::Created { server, name },
                )
            }
        };
        Self::start_on(database_url, dir, postgres_db, configure).await
    }

    /// Like `start_with`, on a database the test owns (and cleans up).
    pub async fn start_on_database(
        database_url: String,
        configure: impl Fn(&mut Settings),
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_on(database_url, dir, PostgresDb::None, &configure)
            .await
            .expect("start on the given database")
    }

    /// Whether the server task is still running (it has not panicked or stopped).
    pub fn is_serving(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the server gracefully (which writes pending usage) and starts a
    /// new one on the same database, with the same clock.
    pub async fn restart(mut self) -> Self {
        self.stop().await;
        let dir = self.dir.take().expect("dir");
        let postgres_db = std::mem::replace(&mut self.postgres_db, PostgresDb::None);
        let (url, clock) = (self.database_url.clone(), self.clock.clone());
        Self::start_with_clock(url, dir, postgres_db, clock, &|_| {})
            .await
            .expect("restart")
    }

    /// Another replica on the same database and the same clock (advancing
    /// one advances every replica), with its own settings changes. The
    /// database belongs to `self`: it is dropped with `self`.
    pub async fn join(&self, configure: impl Fn(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let configure: &dyn Fn(&mut Settings) = &configure;
        Self::start_with_clock(
            self.database_url.clone(),
            dir,
            PostgresDb::None,
            self.clock.clone(),
            configure,
        )
        .await
        .expect("join")
    }

    /// Graceful shutdown: in-flight calls finish, usage is written.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }

    async fn start_on(
        database_url: String,
        dir: tempfile::TempDir,
        postgres_db: PostgresDb,
        configure: &dyn Fn(&mut Settings),
    ) -> Option<Self> {
        let clock = Arc::new(ManualClock::new(epoch()));
        Self::start_with_clock(database_url, dir, postgres_db, clock, configure).await
    }

    async fn start_with_clock(
        database_url: String,
        dir: tempfile::TempDir,
        postgres_db: PostgresDb,
        clock: Arc<ManualClock>,
        configure: &dyn Fn(&mut Settings),
    ) -> Option<Self> {
        let mut settings = Settings::new(database_url.clone());
        settings.policy = RouteTable::from_toml(POLICY).expect("test policy");
        settings.feed.heartbeat = Duration::from_millis(500);
        settings.feed.poll_interval = Duration::from_millis(200);
        configure(&mut settings);
        let wants_console = settings.console.is_some();
        let mut keygate = Keygate::open(settings, clock.clone() as Arc<dyn Clock>)
            .await
            .expect("open keygate");
        let mut console = None;
        if wants_console {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind console");
            console = Some(listener.local_addr().expect("console addr"));
            keygate = keygate.with_console_listener(listener);
        }
        let (_, admin_token) = keygate
            .keys
            .bootstrap("test admin".into(), Mode::Live)
            .await
            .expect("bootstrap");
        let store = keygate.store.clone();
        let keys = keygate.keys.clone();
        let feed = keygate.feed.clone();
        let replicas = keygate.replicas.clone();
        let shared_limits = keygate.shared_limits.clone();
        let cache = keygate.cache.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            keygate
                .serve(listener, async { drop(rx.await) })
                .await
                .expect("serve");
        });
        Some(Self {
            addr,
            clock,
            admin_token,
            store,
            keys,
            feed,
            replicas,
            shared_limits,
            cache,
            database_url,
            console,
            shutdown: Some(tx),
            task: Some(task),
            dir: Some(dir),
            postgres_db,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn authorizer(&self) -> AuthorizerClient<Channel> {
        AuthorizerClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> KeyAdminClient<Channel> {
        KeyAdminClient::new(self.channel().await)
    }

    /// Writes an active ORGANIZATION key of `org_a` with `id` and the scope
    /// `checkout:create` straight into the store (no RPC, no cache); its token.
    pub async fn store_key_with_id(&self, id: uuid::Uuid) -> String {
        let new =
            keygate_core::token::generate(&keygate_core::token::Brand::default(), Mode::Live, id)
                .unwrap();
        let now = chrono::Utc::now();
        let key = keygate_core::key::KeyRecord {
            id,
            name: "stored".into(),
            organization_id: Some("org_a".into()),
            tier: keygate_core::key::Tier::Organization,
            mode: Mode::Live,
            prefix: new.prefix,
            secret_digest: new.digest,
            previous_secret: None,
            scopes: keygate_core::scope::ScopeSet::parse(&["checkout:create"]).unwrap(),
            allowed_cidrs: Vec::new(),
            rate_limit_per_minute: 0,
            unlimited: false,
            state: keygate_core::key::KeyState::Active,
            created_at: now,
            last_used_at: None,
            expires_at: None,
            rotated_at: None,
            created_by: "bootstrap".into(),
            version: 1,
        };
        let event = keygate_core::event::NewEvent {
            kind: keygate_core::event::EventKind::Created,
            key_id: id,
            organization_id: Some("org_a".into()),
            actor: keygate_core::event::Actor::Bootstrap,
            at: now,
            reason: String::new(),
            details: String::new(),
        };
        keygate::store::KeyStore::insert_key(&*self.store, &key, &event)
            .await
            .unwrap();
        new.token
    }

    /// Creates a key as the bootstrap admin; returns it and its token.
    pub async fn create_key(&self, req: pb::CreateKeyRequest) -> (pb::ApiKey, String) {
        let resp = self
            .admin()
            .await
            .create_key(as_key(&self.admin_token, req))
            .await
            .expect("create key")
            .into_inner();
        (resp.key.expect("key"), resp.token)
    }

    /// An ORGANIZATION key of `org` with `scopes`, LIVE mode.
    pub async fn org_key(&self, org: &str, scopes: &[&str]) -> (pb::ApiKey, String) {
        self.create_key(pb::CreateKeyRequest {
            name: format!("{org} key"),
            organization_id: org.into(),
            mode: pb::Mode::Live as i32,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
    }

    /// A key as the bootstrap admin sees it.
    pub async fn get_key(&self, key_id: &str) -> pb::ApiKey {
        self.admin()
            .await
            .get_key(as_key(
                &self.admin_token,
                pb::GetKeyRequest {
                    key_id: key_id.into(),
                },
            ))
            .await
            .expect("get key")
            .into_inner()
    }

    /// Authorize `token` against explicit scopes or a route.
    pub async fn authorize(&self, token: &str, route: &str, ip: &str) -> pb::AuthorizeResponse {
        let req = pb::AuthorizeRequest {
            token: token.into(),
            route: route.into(),
            ip: ip.into(),
            ..Default::default()
        };
        self.authorizer()
            .await
            .authorize(req)
            .await
            .expect("authorize")
            .into_inner()
    }

    /// Waits until this server's feed has applied every logged event, so no
    /// invalidation is still on its way (one comes for every change).
    pub async fn settle(&self) {
        use keygate::store::EventLog;
        let head = self.store.head_sequence().await.expect("head");
        let feed = self.feed.clone();
        eventually(Duration::from_secs(10), "the feed to catch up", || {
            let feed = feed.clone();
            async move { (feed.applied() >= head).then_some(()) }
        })
        .await;
    }

    pub fn advance(&self, by: chrono::Duration) {
        self.clock.advance(by);
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let PostgresDb::Created { server, name } =
            std::mem::replace(&mut self.postgres_db, PostgresDb::None)
        {
            // Drop runs outside async; a small runtime on its own thread does the cleanup.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    if let Ok(mut admin) = sqlx::PgConnection::connect(&server).await {
                        let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                            .execute(&mut admin)
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

/// A request carrying `token` as the caller's credential.
pub fn as_key<T>(token: &str, message: T) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    req
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

/// KEYGATE_TEST_POSTGRES_URL, or `None` when unset.
fn postgres_url() -> Option<String> {
    std::env::var("KEYGATE_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// A throwaway PostgreSQL server for one test, when PostgreSQL is installed.
async fn temporary_postgres() -> Option<pgtemp::PgTempDB> {
    let runs = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let is_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    // pgtemp runs initdb itself, through sudo when root (PostgreSQL refuses root).
    if !runs("initdb", &["--version"]) || (is_root && !runs("sudo", &["-n", "true"])) {
        return None;
    }
    // pgtemp panics when it cannot start a server; that means "not installed".
    tokio::task::spawn_blocking(|| std::panic::catch_unwind(pgtemp::PgTempDB::new).ok())
        .await
        .ok()
        .flatten()
}

fn skip_postgres() -> Option<TestServer> {
    if std::env::var("KEYGATE_REQUIRE_POSTGRES").as_deref() == Ok("1") {
        panic!(
            "KEYGATE_REQUIRE_POSTGRES=1 but no PostgreSQL is available: set KEYGATE_TEST_POSTGRES_URL"
        );
    }
    eprintln!(
        "skipped: PostgreSQL unavailable (set KEYGATE_TEST_POSTGRES_URL or install PostgreSQL)"
    );
    None
}

/// Polls `check` until it returns `Some`, or panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn database_names_are_swapped_into_urls() {
    assert_eq!(
        with_database("postgres://u@h:5432/postgres", "x"),
        "postgres://u@h:5432/x"
    );
    assert_eq!(
        with_database("postgres://u@h/test?sslmode=disable", "x"),
        "postgres://u@h/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
}

/// Runs one SQL statement on the server's database, behind keygate's back
/// (to break a table or add a trigger that fails a write).
pub async fn execute_sql(s: &TestServer, statement: &str) {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&s.database_url)
        .await
        .expect("connect");
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

/// Every row of every keygate table as text, with binary columns in hex: what
/// someone who stole the database would have.
pub async fn dump_database(s: &TestServer) -> String {
    use sqlx::{Column, Row};
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&s.database_url)
        .await
        .expect("connect");
    let mut out = String::new();
    for table in [
        "api_keys",
        "key_events",
        "keygate_settings",
        "organization_limits",
        "key_usage",
    ] {
        // In key order (each table's first column), so two dumps of the same
        // rows are equal however the database happens to return them.
        let sql = sqlx::AssertSqlSafe(format!("SELECT * FROM {table} ORDER BY 1"));
        for row in sqlx::query(sql).fetch_all(&mut conn).await.expect("dump") {
            for (i, col) in row.columns().iter().enumerate() {
                let text = if let Ok(Some(v)) = row.try_get::<Option<String>, _>(i) {
                    v
                } else if let Ok(Some(v)) = row.try_get::<Option<i64>, _>(i) {
                    v.to_string()
                } else if let Ok(Some(v)) = row.try_get::<Option<Vec<u8>>, _>(i) {
                    format!("{v:02x?}{}", String::from_utf8_lossy(&v))
                } else {
                    String::new()
                };
                out.push_str(&format!("{}={text}\n", col.name()));
            }
        }
    }
    out
}
