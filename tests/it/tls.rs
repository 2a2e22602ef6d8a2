//! TLS with rustls, and mTLS: a client without a certificate from the
//! configured CA is refused.

use keygate::server::TlsSettings;
use keygate_proto::v1 as pb;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::harness::{AuthorizerClient, Backend, TestServer};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
    stranger: (String, String),
}

fn pki() -> Pki {
    let ca_params = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p
    };
    let ca =
        CertifiedIssuer::self_signed(ca_params("keygate test CA"), KeyPair::generate().unwrap())
            .unwrap();
    let other_ca =
        CertifiedIssuer::self_signed(ca_params("someone else"), KeyPair::generate().unwrap())
            .unwrap();
    let leaf = |names: Vec<String>, issuer: &CertifiedIssuer<'_, KeyPair>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca.pem(),
        server: leaf(vec!["localhost".into(), "127.0.0.1".into()], &ca),
        client: leaf(vec!["gateway".into()], &ca),
        stranger: leaf(vec!["gateway".into()], &other_ca),
    }
}

async fn call(
    s: &TestServer,
    ca_pem: &str,
    client: Option<&(String, String)>,
) -> Result<pb::AuthorizeResponse, String> {
    call_at(s.addr, &s.admin_token, ca_pem, client).await
}

async fn call_at(
    addr: std::net::SocketAddr,
    token: &str,
    ca_pem: &str,
    client: Option<&(String, String)>,
) -> Result<pb::AuthorizeResponse, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let req = pb::AuthorizeRequest {
        token: token.to_owned(),
        required_scopes: vec!["api_key:read".into()],
        ..Default::default()
    };
    AuthorizerClient::new(channel)
        .authorize(req)
        .await
        .map(|r| r.into_inner())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_admits_only_clients_with_a_certificate_from_the_ca() {
    let pki = pki();
    let tls = TlsSettings {
        cert_pem: pki.server.0.clone().into_bytes(),
        key_pem: pki.server.1.clone().into_bytes(),
        client_ca_pem: Some(pki.ca_pem.clone().into_bytes()),
    };
    let s = TestServer::start_tls(Backend::Sqlite, Some(tls))
        .await
        .unwrap();
    let ok = call(&s, &pki.ca_pem, Some(&pki.client))
        .await
        .expect("a client certificate from the CA is admitted");
    assert_eq!(ok.decision(), pb::Decision::Allow);
    assert!(
        call(&s, &pki.ca_pem, None).await.is_err(),
        "no client certificate: refused"
    );
    assert!(
        call(&s, &pki.ca_pem, Some(&pki.stranger)).await.is_err(),
        "another CA's certificate: refused"
    );
    // Plaintext to a TLS port gets nowhere either.
    let plain = AuthorizerClient::connect(format!("http://{}", s.addr)).await;
    if let Ok(mut plain) = plain {
        assert!(
            plain
                .authorize(pb::AuthorizeRequest::default())
                .await
                .is_err()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_client_ca_admits_any_client() {
    let pki = pki();
    let tls = TlsSettings {
        cert_pem: pki.server.0.clone().into_bytes(),
        key_pem: pki.server.1.clone().into_bytes(),
        client_ca_pem: None,
    };
    let s = TestServer::start_tls(Backend::Sqlite, Some(tls))
        .await
        .unwrap();
    assert_eq!(
        call(&s, &pki.ca_pem, None).await.unwrap().decision(),
        pb::Decision::Allow
    );
}

/// `keygate serve --tls-cert --tls-key --tls-client-ca` reads its PEM files,
/// and `--health-listen` keeps a plaintext health port for Kubernetes' gRPC
/// probes, which cannot speak TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reads_tls_files_and_keeps_a_plaintext_health_port() {
    use crate::binary::{bootstrap, free_port, keygate, stop, wait_serving};
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    for (name, pem) in [
        ("server.pem", &pki.server.0),
        ("server.key", &pki.server.1),
        ("ca.pem", &pki.ca_pem),
    ] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let token = bootstrap(dir.path(), |c| c);
    let (port, health_port) = (free_port(), free_port());
    let child = keygate(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--health-listen", &format!("127.0.0.1:{health_port}")])
        .args(["--tls-cert", "server.pem", "--tls-key", "server.key"])
        .args(["--tls-client-ca", "ca.pem"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // SERVING over plaintext, on the health port.
    wait_serving(health_port).await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let ok = call_at(addr, &token, &pki.ca_pem, Some(&pki.client))
        .await
        .expect("mTLS with the CA's client certificate");
    assert_eq!(ok.decision(), pb::Decision::Allow);
    assert!(
        call_at(addr, &token, &pki.ca_pem, None).await.is_err(),
        "no client certificate: refused"
    );
    // The health port serves nothing but health.
    let mut plain = AuthorizerClient::connect(format!("http://127.0.0.1:{health_port}"))
        .await
        .unwrap();
    let err = plain
        .authorize(pb::AuthorizeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    drop(plain);
    let logs = tokio::task::spawn_blocking(move || stop(child))
        .await
        .unwrap();
    assert!(!logs.contains(&token[30..]), "a secret reached the log");
}

/// `keygate keys|replicas|watch` over TLS: `--ca-cert` trusts the server's
/// CA, `--client-cert`/`--client-key` (or their KEYGATE_* variables) present
/// a client certificate to a server that requires mTLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reaches_tls_and_mtls_servers() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    for (name, pem) in [
        ("ca.pem", &pki.ca_pem),
        ("client.pem", &pki.client.0),
        ("client.key", &pki.client.1),
        ("stranger.pem", &pki.stranger.0),
        ("stranger.key", &pki.stranger.1),
    ] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let server = |client_ca: bool| {
        let pki = &pki;
        async move {
            let tls = TlsSettings {
                cert_pem: pki.server.0.clone().into_bytes(),
                key_pem: pki.server.1.clone().into_bytes(),
                client_ca_pem: client_ca.then(|| pki.ca_pem.clone().into_bytes()),
            };
            TestServer::start_tls(Backend::Sqlite, Some(tls))
                .await
                .unwrap()
        }
    };
    let cli = |s: &TestServer, args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"));
        // The subcommand, then --server (`keys` takes it before its own).
        cmd.current_dir(dir.path())
            .arg(args[0])
            .args(["--server", &format!("https://{}", s.addr)])
            .args(&args[1..])
            .env("KEYGATE_TOKEN", &s.admin_token)
            .env_remove("KEYGATE_CA_CERT")
            .env_remove("KEYGATE_CLIENT_CERT")
            .env_remove("KEYGATE_CLIENT_KEY")
            .kill_on_drop(true);
        cmd
    };
    let run = |mut cmd: tokio::process::Command| async move {
        let out = cmd.output().await.unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // TLS: the CA is enough; without it the server is not trusted.
    let tls = server(false).await;
    let (ok, out, err) = run(cli(&tls, &["keys", "--ca-cert", "ca.pem", "list"])).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("test admin"),
        "the bootstrap key is listed: {out}"
    );
    let (ok, _, err) = run(cli(&tls, &["keys", "list"])).await;
    assert!(!ok && err.contains("--ca-cert"), "{err}");
    let (ok, _, err) = run(cli(&tls, &["replicas", "--ca-cert", "missing.pem"])).await;
    assert!(!ok && err.contains("--ca-cert missing.pem"), "{err}");

    // mTLS: a client certificate from the server's client CA is required.
    let mtls = server(true).await;
    let mut with_env = cli(&mtls, &["replicas"]);
    with_env
        .env("KEYGATE_CA_CERT", "ca.pem")
        .env("KEYGATE_CLIENT_CERT", "client.pem")
        .env("KEYGATE_CLIENT_KEY", "client.key");
    let (ok, out, err) = run(with_env).await;
    assert!(ok, "{err}");
    assert!(out.contains("head sequence"), "{out}");
    let mtls_flags = [
        "--ca-cert",
        "ca.pem",
        "--client-cert",
        "client.pem",
        "--client-key",
        "client.key",
    ];
    let (ok, out, err) = run(cli(
        &mtls,
        &[&["keys"][..], &mtls_flags, &["list"]].concat(),
    ))
    .await;
    assert!(ok && out.contains("test admin"), "{err}");
    let (ok, _, _) = run(cli(&mtls, &["keys", "--ca-cert", "ca.pem", "list"])).await;
    assert!(!ok, "no client certificate: refused");
    let stranger = [
        "--ca-cert",
        "ca.pem",
        "--client-cert",
        "stranger.pem",
        "--client-key",
        "stranger.key",
    ];
    let (ok, _, _) = run(cli(&mtls, &[&["keys"][..], &stranger, &["list"]].concat())).await;
    assert!(!ok, "another CA's client certificate: refused");

    // watch streams over mTLS: it prints the revocation made below.
    let mut watch = cli(
        &mtls,
        &[&["watch"][..], &mtls_flags, &["--after", "0"]].concat(),
    );
    let mut watch = watch
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(watch.stdout.take().unwrap()));
    // Until watch has subscribed, a revocation may go unseen: revoke
    // another key each round.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let created = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watch printed no REVOKED"
        );
        let create = [
            &["keys"][..],
            &mtls_flags,
            &[
                "--json",
                "create",
                "--name",
                "w",
                "--organization-id",
                "org_1",
            ],
        ]
        .concat();
        let (ok, out, err) = run(cli(&mtls, &create)).await;
        assert!(ok, "{err}");
        let created: serde_json::Value = serde_json::from_str(&out).unwrap();
        let key_id = created["key"]["key_id"].as_str().unwrap().to_owned();
        let revoke = [&["keys"][..], &mtls_flags, &["revoke", &key_id]].concat();
        let (ok, _, err) = run(cli(&mtls, &revoke)).await;
        assert!(ok, "{err}");
        let wait = std::time::Duration::from_millis(500);
        if let Ok(line) = tokio::time::timeout(wait, lines.next_line()).await {
            let Some(line) = line.unwrap() else {
                let out = watch.wait_with_output().await.unwrap();
                panic!("watch ended: {}", String::from_utf8_lossy(&out.stderr));
            };
            if line.contains("REVOKED") {
                break line;
            }
        }
    };
    assert!(created.contains("org=org_1"), "{created}");
    watch.kill().await.unwrap();
}

/// With TLS on, the console serves HTTPS with the same certificate, and its
/// session cookie is `Secure`; plaintext HTTP gets no page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_serves_https_with_a_secure_cookie() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

    let pki = pki();
    let tls = TlsSettings {
        cert_pem: pki.server.0.clone().into_bytes(),
        key_pem: pki.server.1.clone().into_bytes(),
        client_ca_pem: None,
    };
    let s = TestServer::start_with(Backend::Sqlite, move |settings| {
        settings.tls = Some(tls.clone());
        settings.console = Some(Default::default());
    })
    .await
    .unwrap();
    let console = s.console.unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(console).await.unwrap();
    let mut stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let body = format!("token={}", s.admin_token);
    let request = format!(
        "POST /sign-in HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        console.port(),
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).to_lowercase();
    assert!(response.starts_with("http/1.1 303"), "{response}");
    let cookie = response
        .lines()
        .find(|l| l.starts_with("set-cookie:"))
        .unwrap();
    assert!(
        cookie.contains("; secure") && cookie.contains("httponly"),
        "{cookie}"
    );

    // Plain HTTP on the console port gets no page.
    let mut plain = tokio::net::TcpStream::connect(console).await.unwrap();
    plain
        .write_all(b"GET /sign-in HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    assert!(!String::from_utf8_lossy(&answer).contains("Sign in"));
}
