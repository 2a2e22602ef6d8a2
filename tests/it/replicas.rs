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
}

impl Replica {
    pub async fn start(database_url: &str, name: &str, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir();
        let policy = dir.join(format!("keygate-test-policy-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&policy, crate::harness::POLICY).unwrap();
        let port = free_port();
        let child = keygate(&dir)
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
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn keygate");
        wait_serving(port).await;
        Self {
            port,
            name: name.into(),
            child,
        }
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

/// A TCP forwarder on loopback whose link can be cut and restored: a
/// network partition between one replica and PostgreSQL.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let cut = cut.clone();
            let connections = connections.clone();
            async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if cut.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().unwrap().push(task.abort_handle());
                }
            }
        })
        .abort_handle();
        Self {
            addr,
            cut,
            connections,
            accept,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
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
