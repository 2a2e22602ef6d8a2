//! The no-op ext_authz server: Envoy's Check, always OK, over tonic and
//! envoy-types. It is the limit of the ext_authz design: what a Check costs
//! when the authorizer does nothing. Run as its own process
//! (`keygate-bench noop-server`), like keygate.

use std::net::SocketAddr;

use envoy_types::ext_authz::v3::CheckResponseExt;
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse,
};
use tonic::{Request, Response, Status};

struct Noop;

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(&self, _: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(CheckResponse::with_status(Status::ok(""))))
    }
}

/// Serves the no-op Check on `addr` until the process is killed.
pub async fn serve(addr: SocketAddr) -> Result<(), String> {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(AuthorizationServer::new(Noop))
        .serve(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))
}
