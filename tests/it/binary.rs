//! The `keygate` binary as an operator runs it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keygate_proto::v1 as pb;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::{AuthorizerClient, KeyAdminClient, as_key, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_keygate");

pub fn keygate(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("KEYGATE_DATABASE_URL")
        .env_remove("RUST_LOG");
    cmd
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `keygate bootstrap` in `dir` (the command with `extra` applied, e.g.
/// flags or environment); asserts it worked and returns the token it printed.
pub fn bootstrap(dir: &Path, extra: impl FnOnce(&mut Command) -> &mut Command) -> String {
    let mut cmd = keygate(dir);
    cmd.args(["bootstrap", "--name", "ops"]);
    let boot = extra(&mut cmd).output().unwrap();
    let stderr = String::from_utf8_lossy(&boot.stderr);
    assert!(boot.status.success(), "{stderr}");
    assert!(stderr.contains("shown once"), "{stderr}");
    String::from_utf8(boot.stdout).unwrap().trim().to_owned()
}

/// Stops the server with SIGTERM and returns its stderr.
pub fn stop(child: Child) -> String {
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub async fn wait_serving(port: u16) {
    eventually(Duration::from_secs(30), "keygate to serve", || async move {
        let channel =
            tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}")).ok()?;
        let mut health = HealthClient::new(channel.connect().await.ok()?);
        let status = health
            .check(HealthCheckRequest {
                service: "keygate.v1.Authorizer".into(),
            })
            .await
            .ok()?;
        (status.into_inner().status() == ServingStatus::Serving).then_some(())
    })
    .await
}

#[tokio::test]
async fn serve_with_no_database_flag_creates_keygate_db_and_never_logs_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let admin_token = bootstrap(dir.path(), |c| c);
    assert!(admin_token.starts_with("kg_live_"));
    assert!(
        dir.path().join("keygate.db").exists(),
        "the embedded default is ./keygate.db"
    );

    let port = free_port();
    let child = keygate(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_serving(port).await;
    let url = format!("http://127.0.0.1:{port}");
    let mut admin = KeyAdminClient::connect(url.clone()).await.unwrap();
    let req = pb::CreateKeyRequest {
        name: "backend".into(),
        organization_id: "org_1".into(),
        scopes: vec!["checkout:create".into()],
        ..Default::default()
    };
    let created = admin
        .create_key(as_key(&admin_token, req))
        .await
        .unwrap()
        .into_inner();
    let mut authz = AuthorizerClient::connect(url).await.unwrap();
    let ask = |token: &str| pb::AuthorizeRequest {
        token: token.into(),
        required_scopes: vec!["checkout:create".into()],
        ..Default::default()
    };
    let allowed = authz
        .authorize(ask(&created.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allowed.decision(), pb::Decision::Allow);
    // A near-miss token: must not be echoed either.
    let near_miss = format!("{}x", &created.token);
    let denied = authz.authorize(ask(&near_miss)).await.unwrap().into_inner();
    assert!(!denied.message.contains(&created.token));
    let bad_admin = admin
        .list_keys(as_key(&near_miss, pb::ListKeysRequest::default()))
        .await
        .unwrap_err();
    assert!(!bad_admin.message().contains(&created.token));

    // Close our connections first: a graceful stop waits for them.
    drop((admin, authz));
    let logs = tokio::task::spawn_blocking(move || stop(child))
        .await
        .unwrap();
    assert!(
        logs.contains("key created"),
        "debug logs were captured: {logs}"
    );
    for token in [&admin_token, &created.token] {
        let secret = &token[30..73];
        assert!(!logs.contains(secret), "a secret reached the log");
    }
}

#[tokio::test]
async fn a_bad_policy_stops_serve_naming_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "[[route]]\nroute = \"GET /ok\"\nscope = \"a:read\"\n[[route]]\nroute = \"GET /x\"\nscope = \"x:view\"\n")
        .unwrap();
    let out = keygate(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--policy"])
        .arg(&policy)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("route #2") && stderr.contains("x:view"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_shipped_example_policy_loads() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/policy.example.toml"))
        .unwrap();
    let table = keygate_core::policy::RouteTable::from_toml(&text).unwrap();
    assert!(table.len() >= 10, "covers the seeds' resources");
    assert_eq!(
        table
            .required_scope("POST /v1/checkouts")
            .map(|s| s.as_str()),
        Some("checkout:create")
    );
}

#[test]
fn every_flag_has_an_environment_variable() {
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "KEYGATE_LISTEN",
        "KEYGATE_DATABASE_URL",
        "KEYGATE_POLICY",
        "KEYGATE_BRAND",
        "KEYGATE_CACHE_TTL",
        "KEYGATE_CACHE_MAX_BYTES",
        "KEYGATE_STORE_READ_LIMIT",
        "KEYGATE_STORE_READ_WAIT",
    ] {
        assert!(help.contains(var), "{var} missing from --help:\n{help}");
    }
    assert!(help.contains("0.0.0.0:50051"));
}

#[test]
fn unsupported_database_urls_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = keygate(dir.path())
        .args([
            "bootstrap",
            "--name",
            "x",
            "--database-url",
            "mysql://root:hunter2@localhost/db",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("mysql://") && !stderr.contains("hunter2"),
        "{stderr}"
    );
}

/// Production databases require TLS: keygate connects with sslmode=require.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reaches_postgres_over_tls_with_sslmode_require() {
    let Some(a) = crate::harness::TestServer::start(crate::harness::Backend::Postgres).await else {
        return;
    };
    let pg = sqlx::PgPool::connect(&a.database_url).await.unwrap();
    let ssl: String = sqlx::query_scalar("SHOW ssl").fetch_one(&pg).await.unwrap();
    if ssl != "on" {
        eprintln!("skipped: this PostgreSQL server has ssl = {ssl}");
        return;
    }
    let separator = if a.database_url.contains('?') {
        '&'
    } else {
        '?'
    };
    let url = format!("{}{separator}sslmode=require", a.database_url);
    let b = crate::replicas::Replica::start(&url, "replica-tls", &[]).await;
    let (_, token) = a.org_key("org_a", &["checkout:create"]).await;
    let mut client = b.authorizer().await;
    let r = crate::replicas::authorize(&mut client, &token)
        .await
        .unwrap();
    assert_eq!(r.decision(), pb::Decision::Allow);
    let encrypted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE ssl AND datname = current_database()",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    assert!(encrypted > 0, "no connection of keygate's is encrypted");
}

/// DATABASE_URL is the fallback for --database-url, --brand shapes every
/// token, and --log-format json writes one JSON object per line.
#[tokio::test]
async fn database_url_fallback_brand_and_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("fallback.db").display());
    let admin_token = bootstrap(dir.path(), |c| {
        c.args(["--brand", "ck"]).env("DATABASE_URL", &url)
    });
    assert!(admin_token.starts_with("ck_live_"), "{admin_token}");
    assert!(dir.path().join("fallback.db").exists());
    assert!(!dir.path().join("keygate.db").exists());

    let port = free_port();
    let child = keygate(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--brand", "ck", "--log-format", "json"])
        .env("DATABASE_URL", &url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_serving(port).await;
    let mut admin = KeyAdminClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let created = admin
        .create_key(as_key(
            &admin_token,
            pb::CreateKeyRequest {
                name: "backend".into(),
                organization_id: "org_1".into(),
                mode: pb::Mode::Test as i32,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(created.token.starts_with("ck_test_"), "{}", created.token);
    assert!(created.key.unwrap().prefix.starts_with("ck_test_"));

    // Both reflection versions list keygate's services.
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let services = reflection_v1_services(channel).await;
    for name in [
        "keygate.v1.Authorizer",
        "keygate.v1.KeyAdmin",
        "keygate.v1.RevocationFeed",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.iter().any(|s| s == name),
            "{name} not in {services:?}"
        );
    }

    drop(admin);
    let logs = tokio::task::spawn_blocking(move || stop(child))
        .await
        .unwrap();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no logs");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
}

async fn reflection_v1_services(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// `keygate serve` with no flags on a fresh machine: it creates ./keygate.db
/// itself and serves.
#[tokio::test]
async fn serve_alone_creates_the_embedded_database() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = keygate(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_serving(port).await;
    assert!(dir.path().join("keygate.db").exists());
    let logs = tokio::task::spawn_blocking(move || stop(child))
        .await
        .unwrap();
    assert!(logs.contains("keygate serving"), "{logs}");
}

/// A database password, in the userinfo or in any `…password…` query
/// parameter, reaches neither stdout nor stderr: not at start-up, not in
/// sqlx's own warnings (debug logs on), not when the connection fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_passwords_never_reach_the_output() {
    let Some(server) = crate::harness::TestServer::start(crate::harness::Backend::Postgres).await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let separator = if server.database_url.contains('?') {
        '&'
    } else {
        '?'
    };
    // Trust authentication accepts any password.
    let url = format!(
        "{}{separator}password=SECRET1&sslpassword=SECRET2&Ssl_PassWord=SECRET3",
        server.database_url
    );
    let assert_hidden = |what: &str, output: &str| {
        assert!(
            !output.contains("SECRET"),
            "{what} shows a password:\n{output}"
        );
    };

    let migrate = keygate(dir.path())
        .args(["migrate", "--database-url", &url])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&migrate.stdout);
    let stderr = String::from_utf8_lossy(&migrate.stderr);
    assert!(migrate.status.success(), "{stderr}");
    assert!(stdout.contains("password=***"), "{stdout}");
    assert_hidden("migrate", &format!("{stdout}{stderr}"));

    let port = free_port();
    let child = keygate(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("KEYGATE_DATABASE_URL", &url)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_serving(port).await;
    let child_id = child.id();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("kill")
            .args(["-TERM", &child_id.to_string()])
            .status()
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("keygate serving"), "{stderr}");
    assert!(stderr.contains("password=***"), "{stderr}");
    assert_hidden(
        "serve",
        &format!("{}{stderr}", String::from_utf8_lossy(&out.stdout)),
    );

    // Nothing listens on this port: serve fails, naming the database.
    let unreachable = format!(
        "postgres://postgres:SECRET0@127.0.0.1:{}/keygate?password=SECRET1&sslpassword=SECRET2",
        free_port()
    );
    let failed = keygate(dir.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &unreachable,
        ])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(
        stderr.contains("opening postgres://postgres:***@127.0.0.1"),
        "{stderr}"
    );
    assert_hidden(
        "a failed serve",
        &format!("{}{stderr}", String::from_utf8_lossy(&failed.stdout)),
    );
}
