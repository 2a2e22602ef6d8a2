//! keygate.v1.Authorizer.

use std::sync::Arc;
use std::time::Instant;

use keygate_proto::v1::authorizer_server;
use keygate_proto::v1::{AuthorizeRequest, AuthorizeResponse};
use tonic::{Request, Response, Status};

use super::convert;
use crate::service::authorize::Principal;
use crate::service::{AuthorizeInput, Authorizer, Outcome};
use crate::telemetry::AuthorizeMetrics;

/// Authorizer over [`Authorizer`]: each call is decided, counted in the
/// Authorize metrics and recorded on the call's span (never the token).
pub struct AuthorizerApi {
    authorizer: Arc<Authorizer>,
    metrics: AuthorizeMetrics,
}

impl AuthorizerApi {
    /// Requests are decided by `authorizer`.
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self {
            authorizer,
            metrics: AuthorizeMetrics::default(),
        }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> authorizer_server::AuthorizerServer<Self> {
        authorizer_server::AuthorizerServer::new(self)
    }
}

#[tonic::async_trait]
impl authorizer_server::Authorizer for AuthorizerApi {
    async fn authorize(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> Result<Response<AuthorizeResponse>, Status> {
        let started = Instant::now();
        let r = request.get_ref();
        let input = AuthorizeInput {
            token: &r.token,
            route: &r.route,
            ip: &r.ip,
            required_scopes: &r.required_scopes,
        };
        let outcome = self.authorizer.authorize(input).await?;
        record_outcome(&self.metrics, &outcome, started);
        Ok(Response::new(convert::authorize_response(outcome)))
    }
}

/// Counts an answer and names it on the RPC's span (never the token).
pub(super) fn record_outcome(metrics: &AuthorizeMetrics, outcome: &Outcome, started: Instant) {
    metrics.record(outcome.deny, started.elapsed());
    let span = tracing::Span::current();
    span.record(
        "decision",
        if outcome.deny.is_none() {
            "ALLOW"
        } else {
            "DENY"
        },
    );
    if let Some(reason) = outcome.deny {
        span.record("reason", reason.code());
    }
    match &outcome.principal {
        Some(Principal::Key(key)) => {
            span.record("key_id", tracing::field::display(key.id));
        }
        Some(Principal::Jwt(jwt)) => {
            span.record("key_id", tracing::field::display(jwt.identity.actor()));
        }
        None => {}
    }
}
