//! The operator console: server-rendered HTML over the same services as
//! the gRPC API (so organization isolation, scopes and "never more than the
//! caller" hold unchanged), served by `keygate serve --console-listen`.
//!
//! Web security in one place: every response carries a CSP without
//! `unsafe-inline`, `X-Frame-Options: DENY`, `Referrer-Policy: no-referrer`
//! and `Cache-Control: no-store` (assets aside); every POST needs the
//! session's CSRF token and a same-origin `Origin` / `Sec-Fetch-Site`; the
//! session is checked against its key (through the cache) on every request.

// Handlers return early with the response to send (a redirect, a 403): a
// cold path, so the size of `Response` in an `Err` costs nothing that matters.
#![allow(clippy::result_large_err)]

mod chart;
mod forms;
mod handlers;
mod pages;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use keygate_core::clock::Clock;
use keygate_core::decision;
pub use session::ConsoleSettings;
use session::Sessions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::service::organizations::OrganizationService;
use crate::service::replicas::Replicas;
use crate::service::{Authorizer, Caller, KeyService};

/// The session cookie's name.
const COOKIE: &str = "keygate_session";

/// Largest request body the console reads (forms are small).
const MAX_BODY: usize = 64 * 1024;

/// What every console handler works with.
pub struct Console {
    authorizer: Arc<Authorizer>,
    keys: Arc<KeyService>,
    replicas: Arc<Replicas>,
    organizations: Arc<OrganizationService>,
    sessions: Sessions,
    /// Served over TLS: cookies are `Secure` and origins `https://`.
    tls: bool,
}

impl Console {
    /// The console over the server's services; sessions timed by `clock`.
    pub fn new(
        authorizer: Arc<Authorizer>,
        keys: Arc<KeyService>,
        replicas: Arc<Replicas>,
        organizations: Arc<OrganizationService>,
        clock: Arc<dyn Clock>,
        settings: ConsoleSettings,
        tls: bool,
    ) -> Self {
        Self {
            authorizer,
            keys,
            replicas,
            organizations,
            sessions: Sessions::new(clock, settings),
            tls,
        }
    }
}

type State = Arc<Console>;

/// Every route.
pub fn router(console: Console) -> Router {
    use handlers as h;
    Router::new()
        .route("/", get(|| async { Redirect::to("/keys") }))
        .route("/sign-in", get(h::sign_in_page).post(h::sign_in))
        .route("/sign-out", post(h::sign_out))
        .route("/keys", get(h::keys_page).post(h::create_key))
        .route("/keys/new", get(h::new_key_page))
        .route("/keys/search", post(h::search))
        .route("/keys/{id}", get(h::key_page))
        .route("/keys/{id}/token", get(h::token_page))
        .route("/keys/{id}/{action}", post(h::key_action))
        .route("/audit", get(h::audit_page))
        .route("/replicas", get(h::replicas_page))
        .route("/limits", get(h::limits_page).post(h::set_limits))
        .route("/assets/console.css", get(h::css))
        .route("/assets/console.js", get(h::js))
        .layer(axum::middleware::from_fn(security_headers))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Arc::new(console))
}

/// Serves the console on `listener` until `stopping` is cancelled: HTTPS
/// with `tls` (the gRPC port's certificate), plain HTTP without.
pub async fn serve(
    listener: TcpListener,
    console: Console,
    tls: Option<crate::server::TlsSettings>,
    stopping: CancellationToken,
) {
    let app = router(console);
    let served = match tls {
        None => {
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            axum::serve(listener, app)
                .with_graceful_shutdown(stopping.cancelled_owned())
                .await
                .map_err(|e| e.to_string())
        }
        Some(tls) => serve_tls(listener, app, &tls, stopping).await,
    };
    if let Err(e) = served {
        tracing::error!(error = %e, "console failed");
    }
}

fn rustls_config(
    tls: &crate::server::TlsSettings,
) -> Result<tokio_rustls::rustls::ServerConfig, String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("console TLS certificate: {e}"))?;
    let key =
        PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|e| format!("console TLS key: {e}"))?;
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("console TLS: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

async fn serve_tls(
    listener: TcpListener,
    app: Router,
    tls: &crate::server::TlsSettings,
    stopping: CancellationToken,
) -> Result<(), String> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(rustls_config(tls)?));
    loop {
        let (tcp, peer) = tokio::select! {
            () = stopping.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "console accept failed");
                    continue;
                }
            },
        };
        let (acceptor, stopping) = (acceptor.clone(), stopping.clone());
        let app = app
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let connection =
                builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                () = stopping.cancelled() => {}
            }
        });
    }
}

/// The content security policy: only this origin's stylesheet and script,
/// no inline code, no framing, forms only to this origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn security_headers(request: Request, next: Next) -> Response {
    let asset = request.uri().path().starts_with("/assets/");
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if !asset {
        // Pages show keys and, once, tokens: never kept by a cache.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// A signed-in request: the session and the caller its key is now.
pub struct SignedIn {
    id: String,
    csrf: String,
    caller: Caller,
}

fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

impl Console {
    fn session_cookie(&self, id: &str) -> String {
        let secure = if self.tls { "; Secure" } else { "" };
        format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{secure}")
    }

    fn cleared_cookie(&self) -> String {
        let secure = if self.tls { "; Secure" } else { "" };
        format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
    }

    /// The session this request belongs to, its key checked again through
    /// the cache: a key revoked, disabled, deleted or expired since sign-in
    /// ends the session at once (and so does an address outside its
    /// allow-list). `Err` is the response to send instead: to sign-in.
    async fn signed_in(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<SignedIn, Response> {
        let to_sign_in = |ended: bool| {
            let target = if ended {
                "/sign-in?ended=1"
            } else {
                "/sign-in"
            };
            (
                [(header::SET_COOKIE, self.cleared_cookie())],
                Redirect::to(target),
            )
                .into_response()
        };
        let Some(id) = cookie(headers) else {
            return Err(to_sign_in(false));
        };
        let Some(session) = self.sessions.touch(id) else {
            return Err(to_sign_in(true));
        };
        let key = match self.authorizer.reauthenticate(&session.credential).await {
            Ok(Ok(key)) if decision::ip_allowed(&key, Some(peer.ip())) => key,
            Ok(_) => {
                self.sessions.end(id);
                tracing::info!(key_id = %session.credential.key_id, "console session ended: its key no longer authenticates");
                return Err(to_sign_in(true));
            }
            Err(e) => return Err(error_response(None, e)),
        };
        Ok(SignedIn {
            id: id.to_owned(),
            csrf: session.csrf,
            caller: Caller::new(key),
        })
    }

    /// The origin this console is served on, as the browser names it.
    fn origin(&self, headers: &HeaderMap) -> Option<String> {
        let host = headers.get(header::HOST)?.to_str().ok()?;
        let scheme = if self.tls { "https" } else { "http" };
        Some(format!("{scheme}://{host}"))
    }

    /// Refuses a cross-site POST: `Sec-Fetch-Site`, when sent, must be
    /// same-origin; `Origin`, when sent, must be this console's (`null`,
    /// which a browser sends under `Referrer-Policy: no-referrer`, only
    /// together with a same-origin `Sec-Fetch-Site`).
    fn same_origin(&self, headers: &HeaderMap) -> bool {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let fetch_site = get("sec-fetch-site");
        if fetch_site.is_some_and(|s| s != "same-origin" && s != "none") {
            return false;
        }
        match get("origin") {
            None => true,
            Some("null") => fetch_site == Some("same-origin"),
            Some(origin) => self.origin(headers).as_deref() == Some(origin),
        }
    }

    /// A state-changing request's checks: same origin and the session's
    /// CSRF token. `Err` is the 403 to send.
    fn check_post(
        &self,
        headers: &HeaderMap,
        signed: &SignedIn,
        csrf: Option<&str>,
    ) -> Result<(), Response> {
        if !self.same_origin(headers) {
            return Err(refused("this request came from another site"));
        }
        match csrf {
            Some(token) if session::same(token, &signed.csrf) => Ok(()),
            _ => Err(refused(
                "the form's CSRF token is missing or wrong; reload the page and try again",
            )),
        }
    }
}

fn refused(why: &str) -> Response {
    (
        StatusCode::FORBIDDEN,
        pages::bare("Refused", &format!("Refused: {why}.")),
    )
        .into_response()
}

/// The page for a failed service call: its gRPC code as an HTTP status and
/// its message (never a store detail: those stay in the log).
fn error_response(signed: Option<&SignedIn>, e: Error) -> Response {
    let status = tonic::Status::from(e);
    let code = match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::AlreadyExists | tonic::Code::Aborted => StatusCode::CONFLICT,
        tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let title = if code == StatusCode::NOT_FOUND {
        "Not found"
    } else {
        "Error"
    };
    let body = match signed {
        Some(s) => pages::error(s, title, status.message()),
        None => pages::bare(title, status.message()),
    };
    (code, body).into_response()
}
