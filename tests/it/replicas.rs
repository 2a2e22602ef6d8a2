//! More keygate processes on one database, and a cuttable link to PostgreSQL.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keygate_proto::v1 as pb;
use keygate_proto::v1::revocation_feed_client::RevocationFeedClient;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tonic::transport::Channel;

use crate::binary::{free_port, keygate, wait_serving};
use crate::harness::{AuthorizerClient, KeyAdminClient};

/// `keygate serve` as its own process; killed on drop.
pub struct Replica {
    pub port: u16,
    pub name: String,
    child: Child,
    /// How it was started, to start it again on the same port.
    database_url: String,
    extra: Vec<String>,
}

impl Replica {
    pub async fn start(database_url: &str, name: &str, extra: &[&str]) -> Self {
        Self::start_on(free_port(), database_url, name, extra).await
    }

    /// Like `start`, listening on `port`.
    pub async fn start_on(port: u16, database_url: &str, name: &str, extra: &[&str]) -> Self {
        let child = Self::spawn(port, database_url, name, extra);
        wait_serving(port).await;
        Self {
            port,
            name: name.into(),
            child,
            database_url: database_url.into(),
            extra: extra.iter().map(|e| e.to_string()).collect(),
        }
    }

    /// SIGKILL: the process dies at once, with no shutdown of any kind.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts the process again, with the same settings on the same port
    /// (after `kill`; a new process is a new replica).
    pub async fn restart(&mut self) {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.child = Self::spawn(self.port, &self.database_url, &self.name, &extra);
        wait_serving(self.port).await;
    }

    /// Whether the process is still running (it has not crashed or exited).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn spawn(port: u16, database_url: &str, name: &str, extra: &[&str]) -> Child {
        let dir = std::env::temp_dir();
        let policy = dir.join(format!("keygate-test-policy-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&policy, crate::harness::POLICY).unwrap();
        keygate(&dir)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--database-url",
                database_url,
            ])
            .arg("--policy")
            .arg(&policy)
            .args([
                "--replica-name",
                name,
                "--feed-heartbeat",
                "500ms",
                "--replica-heartbeat",
                "500ms",
            ])
            .args(if extra.contains(&"--feed-poll-interval") {
                &[][..]
            } else {
                &["--feed-poll-interval", "200ms"][..]
            })
            .args(extra)
            .stdout(Stdio::null())
            // KEYGATE_TEST_REPLICA_LOGS=1 shows the replicas' logs.
            .stderr(if std::env::var_os("KEYGATE_TEST_REPLICA_LOGS").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("spawn keygate")
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn authorizer(&self) -> AuthorizerClient<Channel> {
        AuthorizerClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> KeyAdminClient<Channel> {
        KeyAdminClient::new(self.channel().await)
    }

    pub async fn feed(&self) -> RevocationFeedClient<Channel> {
        RevocationFeedClient::new(self.channel().await)
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// Freezes the process (SIGSTOP) or thaws it (SIGCONT).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Authorize through any server.
pub async fn authorize(
    client: &mut AuthorizerClient<Channel>,
    token: &str,
) -> Result<pb::AuthorizeResponse, tonic::Status> {
    let req = pb::AuthorizeRequest {
        token: token.into(),
        route: "POST /v1/checkouts".into(),
        ..Default::default()
    };
    client.authorize(req).await.map(|r| r.into_inner())
}

/// A TCP forwarder on loopback whose link can be cut and restored, or
/// stalled: a network partition between one replica and PostgreSQL.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// While true, nothing is forwarded either way, but every connection
    /// stays open (and new ones are accepted): packets that go nowhere.
    stalled: tokio::sync::watch::Sender<bool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let stalled = tokio::sync::watch::Sender::new(false);
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let cut = cut.clone();
            let connections = connections.clone();
            let stalled = stalled.clone();
            async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        return;
                    };
                    // Checked and registered under the lock `cut` takes, so a
                    // connection accepted as the link is cut cannot escape it.
                    let mut open = connections.lock().unwrap();
                    if cut.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let stalled = stalled.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(outbound) = TcpStream::connect(target).await {
                            let (from_client, to_client) = inbound.into_split();
                            let (from_server, to_server) = outbound.into_split();
                            tokio::select! {
                                () = forward(from_client, to_server, stalled.subscribe()) => {}
                                () = forward(from_server, to_client, stalled.subscribe()) => {}
                            }
                        }
                    });
                    open.push(task.abort_handle());
                }
            }
        })
        .abort_handle();
        Self {
            addr,
            cut,
            stalled,
            connections,
            accept,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        let mut open = self.connections.lock().unwrap();
        self.cut.store(true, Ordering::SeqCst);
        for c in open.drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Stops forwarding without closing anything: calls on open connections
    /// and new connections alike hang, as behind a silent network.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Forwards again on every connection, what was held back first: the
    /// network heals.
    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }
}

/// Copies `from` to `to` until either closes, holding bytes back while stalled.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // What was read before a stall began is held back too.
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `url` with its host and port replaced by `addr`.
pub fn via(url: &str, addr: SocketAddr) -> String {
    let scheme_end = url.find("://").unwrap() + 3;
    let rest = &url[scheme_end..];
    let host_start = rest.find('@').map_or(0, |i| i + 1);
    let host_end = rest[host_start..]
        .find('/')
        .map_or(rest.len(), |i| host_start + i);
    format!(
        "{}{}{addr}{}",
        &url[..scheme_end],
        &rest[..host_start],
        &rest[host_end..]
    )
}

/// The socket address of the PostgreSQL server in `url` (IPv4 loopback only).
pub fn postgres_addr(url: &str) -> SocketAddr {
    let rest = &url[url.find("://").unwrap() + 3..];
    let host_start = rest.find('@').map_or(0, |i| i + 1);
    let host_end = rest[host_start..]
        .find('/')
        .map_or(rest.len(), |i| host_start + i);
    let hostport = &rest[host_start..host_end];
    let with_port = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    with_port
        .replace("localhost", "127.0.0.1")
        .parse()
        .expect("postgres host:port")
}

pub const SLOW: Duration = Duration::from_secs(10);

#[test]
fn urls_are_rerouted_through_the_proxy() {
    let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    assert_eq!(
        via("postgres://postgres@127.0.0.1:5432/db?x=1", addr),
        "postgres://postgres@127.0.0.1:7000/db?x=1"
    );
    assert_eq!(
        postgres_addr("postgres://u@localhost/db"),
        "127.0.0.1:5432".parse().unwrap()
    );
}

#[tokio::test]
async fn the_proxy_forwards_stalls_and_resumes() {
    use sqlx::Connection;
    let Ok(server) = std::env::var("KEYGATE_TEST_POSTGRES_URL") else {
        return;
    };
    let proxy = Proxy::start(postgres_addr(&server)).await;
    let mut conn = sqlx::PgConnection::connect(&via(&server, proxy.addr))
        .await
        .unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    proxy.stall();
    let stalled = tokio::time::timeout(
        Duration::from_millis(300),
        sqlx::query_scalar::<_, i32>("SELECT 2").fetch_one(&mut conn),
    )
    .await;
    assert!(stalled.is_err(), "nothing gets through a stalled link");
    proxy.resume();
    let three: i32 = sqlx::query_scalar("SELECT 3")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(three, 3);
}
