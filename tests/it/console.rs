//! The operator console in a real browser: headless Chromium driven through
//! chromedriver (WebDriver, fantoccini) on an ephemeral loopback port, and
//! raw HTTP for what a browser would not send (forged POSTs).
//!
//! Chromium and chromedriver come from Debian (scripts/install-test-tools).
//! Without them these tests say they skipped, or fail when
//! KEYGATE_REQUIRE_CHROMIUM=1.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use keygate_proto::v1 as pb;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Backend, TestServer, as_key, eventually};

/// A headless Chromium session and the chromedriver it runs under; both
/// end when this is dropped.
struct Browser {
    client: Client,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

fn which(name: &str) -> Option<String> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| format!("{dir}/{name}"))
        .find(|p| std::path::Path::new(p).exists())
}

impl Browser {
    async fn start() -> Option<Self> {
        let (Some(driver), Some(chromium)) = (which("chromedriver"), which("chromium")) else {
            assert!(
                std::env::var("KEYGATE_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
                "KEYGATE_REQUIRE_CHROMIUM=1 but chromium or chromedriver is missing"
            );
            eprintln!("skipped: chromium/chromedriver not installed (scripts/install-test-tools)");
            return None;
        };
        let port = crate::binary::free_port();
        let driver = tokio::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--window-size=1280,1400",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let client = eventually(Duration::from_secs(20), "chromedriver to start", || {
            let (caps, url) = (caps.clone(), url.clone());
            async move {
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&url)
                    .await
                    .ok()
            }
        })
        .await;
        Some(Self {
            client,
            driver,
            _profile: profile,
        })
    }

    async fn goto(&self, console: SocketAddr, path: &str) {
        self.client
            .goto(&format!("http://{console}{path}"))
            .await
            .expect("goto");
    }

    async fn text(&self, css: &str) -> String {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .text()
            .await
            .expect("text")
    }

    async fn fill(&self, css: &str, value: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .send_keys(value)
            .await
            .expect("type");
    }

    /// Clicks, and when the click submits a form or follows a link, waits
    /// until the browser is on the next page (a WebDriver click does not).
    async fn click(&self, css: &str) {
        let before = self.client.current_url().await.expect("url");
        let element = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        let navigates: bool = self
            .client
            .execute(
                "return arguments[0].type === 'submit' || arguments[0].tagName === 'A'",
                vec![serde_json::to_value(&element).expect("element")],
            )
            .await
            .expect("script")
            .as_bool()
            .unwrap_or(false);
        element.click().await.expect("click");
        if navigates {
            eventually(Duration::from_secs(15), "the next page", || async {
                let now = self.client.current_url().await.ok()?;
                let ready = self
                    .client
                    .execute("return document.readyState", vec![])
                    .await
                    .ok()?;
                (now != before && ready == json!("complete")).then_some(())
            })
            .await;
        }
    }

    async fn path(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("url")
            .path()
            .to_owned()
    }

    async fn source(&self) -> String {
        self.client.source().await.expect("source")
    }

    async fn sign_in(&self, console: SocketAddr, token: &str) {
        self.goto(console, "/sign-in").await;
        self.fill("#token", token).await;
        self.click("#sign-in").await;
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill().await;
    }
}

/// One browser test at a time: each runs a Chromium, and several at once
/// on a small machine starve the servers under test.
async fn browser_turn() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

async fn console_server(backend: Backend) -> Option<TestServer> {
    TestServer::start_with(backend, |s| s.console = Some(Default::default())).await
}

/// One HTTP/1.1 request on a fresh connection: (status, raw headers, body).
async fn http(
    console: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(console).await.unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {console}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_lowercase(), body.to_owned())
}

const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Signs in over raw HTTP: the session cookie and the CSRF token of its pages.
async fn raw_sign_in(console: SocketAddr, token: &str) -> (String, String) {
    let (status, head, _) = http(
        console,
        "POST",
        "/sign-in",
        &[FORM],
        &format!("token={}", url_encode(token)),
    )
    .await;
    assert_eq!(status, 303, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let (_, _, page) = http(console, "GET", "/keys", &[("Cookie", &cookie)], "").await;
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    (cookie, csrf)
}

fn key_id_from(path: &str) -> String {
    path.trim_start_matches("/keys/")
        .trim_end_matches("/token")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_create_a_key_see_its_token_once_find_it_by_token_and_revoke_it() {
    let _turn = browser_turn().await;
    let Some(s) = console_server(Backend::Sqlite).await else {
        return;
    };
    let console = s.console.unwrap();
    let Some(b) = Browser::start().await else {
        return;
    };
    b.sign_in(console, &s.admin_token).await;
    assert_eq!(b.path().await, "/keys");
    let headers = b.text("#keys thead").await;
    for column in [
        "Name",
        "Prefix",
        "Mode",
        "Scopes",
        "Last used",
        "Created",
        "Status",
    ] {
        assert!(headers.contains(column), "{column} in {headers}");
    }

    // Create: the token is shown once.
    b.goto(console, "/keys/new").await;
    b.fill("input[name=name]", "checkout backend").await;
    b.fill("input[name=organization_id]", "org_a").await;
    b.fill("input[name=scopes]", "checkout:create").await;
    b.click("#create").await;
    let path = b.path().await;
    assert!(path.ends_with("/token"), "{path}");
    let key_id = key_id_from(&path);
    let token = b
        .client
        .find(Locator::Css("#token"))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap()
        .unwrap();
    assert!(token.starts_with("kg_test_"), "{token}");
    assert!(b.text(".warning").await.contains("only time"));
    b.client.refresh().await.unwrap();
    assert!(
        b.text("#token-gone")
            .await
            .contains("cannot be shown again")
    );
    assert!(
        !b.source().await.contains(&token),
        "a reload never shows it"
    );
    let (cookie, _) = raw_sign_in(console, &s.admin_token).await;
    let (_, head, _) = http(
        console,
        "GET",
        &format!("/keys/{key_id}/token"),
        &[("Cookie", &cookie)],
        "",
    )
    .await;
    assert!(head.contains("cache-control: no-store"), "{head}");
    // Authorize accepts it.
    let allowed = s.authorize(&token, "POST /v1/checkouts", "").await;
    assert_eq!(allowed.decision(), pb::Decision::Allow);

    // The whole token pasted into the search finds its key.
    b.goto(console, "/keys").await;
    b.fill("#search", &token).await;
    b.click("#search-button").await;
    assert_eq!(b.path().await, format!("/keys/{key_id}"));
    assert!(
        !b.client
            .current_url()
            .await
            .unwrap()
            .as_str()
            .contains(&token)
    );
    assert!(!b.source().await.contains(&token), "never echoed");
    assert_eq!(b.text("#status").await, "active");

    // Revoke it with a reason: revoked, with the time; Authorize denies at once.
    b.fill("#revoke-reason", "leaked in a public repo").await;
    b.click("#revoke-confirm").await;
    b.click("#revoke").await;
    let status = b.text("#status").await;
    assert!(
        status.starts_with("revoked 20") && status.ends_with("UTC"),
        "{status}"
    );
    assert_eq!(b.text("#revoked-reason").await, "leaked in a public repo");
    let denied = s.authorize(&token, "POST /v1/checkouts", "").await;
    assert_eq!(denied.reason(), pb::DenyReason::InvalidToken);
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organization_admin_sees_only_its_organization() {
    let _turn = browser_turn().await;
    let Some(s) = console_server(Backend::Sqlite).await else {
        return;
    };
    let console = s.console.unwrap();
    let (mine, _) = s.org_key("org_a", &["checkout:create"]).await;
    let (theirs, _) = s.org_key("org_b", &["checkout:create"]).await;
    let (_, admin) = s
        .org_key("org_a", &["api_key:read", "api_key:update"])
        .await;
    let Some(b) = Browser::start().await else {
        return;
    };
    b.sign_in(console, &admin).await;
    let table = b.text("#keys").await;
    assert!(table.contains(&mine.prefix), "{table}");
    assert!(!table.contains(&theirs.prefix), "{table}");
    assert!(!table.contains("org_b"), "{table}");
    // Searching: its own key's prefix finds it; another organization's finds nothing.
    b.fill("#search", &theirs.prefix).await;
    b.click("#search-button").await;
    assert!(b.text("#message").await.contains("No key you can see"));
    b.goto(console, "/keys").await;
    b.fill("#search", &mine.prefix).await;
    b.click("#search-button").await;
    assert_eq!(b.path().await, format!("/keys/{}", mine.key_id));
    b.goto(console, &format!("/keys/{}", theirs.key_id)).await;
    assert_eq!(b.text("h1").await, "Not found");
    assert!(!b.source().await.contains(&theirs.prefix));
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_text_forged_posts_are_refused_and_sessions_end() {
    let _turn = browser_turn().await;
    let Some(s) = console_server(Backend::Sqlite).await else {
        return;
    };
    let console = s.console.unwrap();
    let (xss, _) = s
        .create_key(pb::CreateKeyRequest {
            name: "<script>alert(1)</script>".into(),
            organization_id: "org_a".into(),
            mode: pb::Mode::Live as i32,
            scopes: vec!["checkout:create".into()],
            ..Default::default()
        })
        .await;
    let Some(b) = Browser::start().await else {
        return;
    };
    b.sign_in(console, &s.admin_token).await;
    let link = b
        .client
        .find(Locator::Css(&format!("tr[data-key-id='{}'] a", xss.key_id)))
        .await
        .unwrap();
    assert_eq!(link.text().await.unwrap(), "<script>alert(1)</script>");
    assert!(
        b.source()
            .await
            .contains("&lt;script&gt;alert(1)&lt;/script&gt;")
    );
    let inline = b
        .client
        .execute(
            "return document.querySelectorAll('script:not([src])').length",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(inline, json!(0));

    // Headers on every page.
    let (cookie, csrf) = raw_sign_in(console, &s.admin_token).await;
    let (_, head, _) = http(console, "GET", "/keys", &[("Cookie", &cookie)], "").await;
    for header in [
        "content-security-policy: default-src 'none'; script-src 'self'",
        "x-frame-options: deny",
        "referrer-policy: no-referrer",
        "cache-control: no-store",
    ] {
        assert!(head.contains(header), "{header}: {head}");
    }
    assert!(!head.contains("unsafe-inline"));
    let (_, signin_head, _) = http(
        console,
        "POST",
        "/sign-in",
        &[FORM],
        &format!("token={}", url_encode(&s.admin_token)),
    )
    .await;
    assert!(
        signin_head.contains("httponly") && signin_head.contains("samesite=strict"),
        "{signin_head}"
    );

    // A POST without the CSRF token, or from another origin: 403, nothing changes.
    let disable = format!("/keys/{}/disable", xss.key_id);
    let (status, _, _) = http(console, "POST", &disable, &[FORM, ("Cookie", &cookie)], "").await;
    assert_eq!(status, 403);
    let (status, _, _) = http(
        console,
        "POST",
        &disable,
        &[FORM, ("Cookie", &cookie), ("Origin", "http://evil.example")],
        &format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _, _) = http(
        console,
        "POST",
        &disable,
        &[FORM, ("Cookie", &cookie), ("Sec-Fetch-Site", "cross-site")],
        &format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(s.get_key(&xss.key_id).await.status(), pb::KeyStatus::Active);
    // The same request with both, from this origin, goes through.
    let (status, _, _) = http(
        console,
        "POST",
        &disable,
        &[
            FORM,
            ("Cookie", &cookie),
            ("Origin", &format!("http://{console}")),
        ],
        &format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(status, 303);
    assert_eq!(
        s.get_key(&xss.key_id).await.status(),
        pb::KeyStatus::Disabled
    );

    // Signing out ends the session.
    b.click("#sign-out").await;
    assert_eq!(b.path().await, "/sign-in");
    b.goto(console, "/keys").await;
    assert_eq!(b.path().await, "/sign-in");

    // Revoking the signed-in key ends its session on the next click.
    let (operator, operator_token) = s.org_key("org_a", &["api_key:read"]).await;
    b.sign_in(console, &operator_token).await;
    assert_eq!(b.path().await, "/keys");
    crate::feed::revoke(&s, &operator.key_id).await;
    b.goto(console, "/keys").await;
    assert_eq!(b.path().await, "/sign-in");
    assert!(b.text("#error").await.contains("session has ended"));
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_refusals_look_alike_and_are_limited_per_address() {
    let Some(s) = console_server(Backend::Sqlite).await else {
        return;
    };
    let console = s.console.unwrap();
    let (key, token) = s.org_key("org_a", &["api_key:read"]).await;
    // Well-formed, names the key, another secret. (Editing one character of
    // the real token broke its checksum instead, and left it unchanged when
    // that character was already the replacement: a 1-in-62 flake.)
    let wrong = keygate_core::token::generate(
        &keygate_core::token::Brand::default(),
        keygate_core::key::Mode::Live,
        uuid::Uuid::parse_str(&key.key_id).unwrap(),
    )
    .unwrap()
    .token;
    assert_ne!(wrong, token);
    let unknown = keygate_core::token::generate(
        &keygate_core::token::Brand::default(),
        keygate_core::key::Mode::Live,
        uuid::Uuid::new_v4(),
    )
    .unwrap()
    .token;
    let mut bodies = Vec::new();
    for t in [&wrong, &unknown, &"nonsense".to_owned()] {
        let (status, _, body) = http(
            console,
            "POST",
            "/sign-in",
            &[FORM],
            &format!("token={}", url_encode(t)),
        )
        .await;
        assert_eq!(status, 401);
        assert!(!body.contains(t.as_str()), "the key is never echoed");
        bodies.push(body);
    }
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "one message for all"
    );
    assert!(bodies[0].contains("Invalid or missing API key."));
    // Ten attempts a minute per address; the 11th (even a good key) waits.
    for _ in 0..7 {
        http(console, "POST", "/sign-in", &[FORM], "token=x").await;
    }
    let (status, _, _) = http(
        console,
        "POST",
        "/sign-in",
        &[FORM],
        &format!("token={}", url_encode(&token)),
    )
    .await;
    assert_eq!(status, 429);
    s.advance(chrono::Duration::minutes(1));
    let (status, _, _) = http(
        console,
        "POST",
        "/sign-in",
        &[FORM],
        &format!("token={}", url_encode(&token)),
    )
    .await;
    assert_eq!(status, 303);
}

async fn the_usage_chart_shows_a_known_sequence_summed_over_two_replicas(backend: Backend) {
    let _turn = browser_turn().await;
    let Some(a) = console_server(backend).await else {
        return;
    };
    let b_replica = a.join(|_| {}).await;
    let console = a.console.unwrap();
    let (key, token) = a.org_key("org_a", &["checkout:create"]).await;
    b_replica.settle().await;
    for (replica, allowed, forbidden) in [(&a, 3, 2), (&b_replica, 2, 1)] {
        for _ in 0..allowed {
            let r = replica.authorize(&token, "POST /v1/checkouts", "").await;
            assert_eq!(r.decision(), pb::Decision::Allow);
        }
        for _ in 0..forbidden {
            let r = replica
                .authorize(&token, "GET /v1/transactions/1", "")
                .await;
            assert_eq!(r.reason(), pb::DenyReason::InsufficientScope);
        }
    }
    a.keys.flush_usage().await.unwrap();
    b_replica.keys.flush_usage().await.unwrap();
    // A few more keys, so the keys page looks like one.
    for (org, name, scopes) in [
        (
            "org_a",
            "mobile app",
            vec!["checkout:create", "transaction:read"],
        ),
        ("org_b", "woocommerce plugin", vec!["transaction:read"]),
    ] {
        a.create_key(pb::CreateKeyRequest {
            name: name.into(),
            organization_id: org.into(),
            mode: pb::Mode::Live as i32,
            scopes: scopes.into_iter().map(String::from).collect(),
            ..Default::default()
        })
        .await;
    }
    let Some(b) = Browser::start().await else {
        return;
    };
    b.sign_in(console, &a.admin_token).await;
    let keys_png = b.client.screenshot().await.unwrap();
    b.goto(console, &format!("/keys/{}", key.key_id)).await;
    assert_eq!(
        b.text("#usage-totals").await,
        "5 allowed, 3 denied (INSUFFICIENT_SCOPE 3)"
    );
    let bar = b
        .client
        .find(Locator::Css("svg.chart g.bucket"))
        .await
        .unwrap();
    assert_eq!(
        bar.attr("data-allowed").await.unwrap().as_deref(),
        Some("5")
    );
    assert_eq!(bar.attr("data-denied").await.unwrap().as_deref(), Some("3"));
    b.goto(console, &format!("/keys/{}?range=1h", key.key_id))
        .await;
    assert_eq!(
        b.text("#usage-totals").await,
        "5 allowed, 3 denied (INSUFFICIENT_SCOPE 3)"
    );
    let key_png = b.client.screenshot().await.unwrap();
    if backend == Backend::Sqlite {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("keys.png"), keys_png).unwrap();
        std::fs::write(dir.join("key.png"), key_png).unwrap();
    }
    b.close().await;
    // The same counts over gRPC, as the chart's source.
    let now = keygate_core::clock::Clock::now(&*a.clock);
    let usage = a
        .admin()
        .await
        .get_key_usage(as_key(
            &a.admin_token,
            pb::GetKeyUsageRequest {
                key_id: key.key_id.clone(),
                start: Some(keygate_proto::convert::timestamp(
                    now - chrono::Duration::hours(1),
                )),
                // Exclusive, and the calls were made at `now`.
                end: Some(keygate_proto::convert::timestamp(
                    now + chrono::Duration::seconds(1),
                )),
                granularity: pb::UsageGranularity::Hour.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage.buckets[0].allowed, 5);
}

mod chart {
    use crate::harness::Backend;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::the_usage_chart_shows_a_known_sequence_summed_over_two_replicas(Backend::Sqlite)
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::the_usage_chart_shows_a_known_sequence_summed_over_two_replicas(Backend::Postgres)
            .await
    }
}
