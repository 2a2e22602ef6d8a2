//! keygate.v1.Authorizer.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use crate::pb::keygate::v1::authorizer_server;
use crate::pb::keygate::v1::{AuthorizeRequest, AuthorizeResponse};
use crate::service::{AuthorizeInput, Authorizer};

pub struct AuthorizerApi {
    authorizer: Arc<Authorizer>,
}

impl AuthorizerApi {
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self { authorizer }
    }

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
        let r = request.get_ref();
        let input = AuthorizeInput {
            token: &r.token,
            route: &r.route,
            ip: &r.ip,
            required_scopes: &r.required_scopes,
        };
        let outcome = self.authorizer.authorize(input).await?;
        Ok(Response::new(convert::authorize_response(outcome)))
    }
}
