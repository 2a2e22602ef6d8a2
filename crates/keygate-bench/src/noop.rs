//! The no-op ext_authz server: Envoy's Check, always OK, over tonic and
//! envoy-types. It is the limit of the ext_authz design: what a Check costs
//! when the authorizer does nothing. Run as its own process
//! (`keygate-bench noop-server`), like keygate. Given an answer, it sends
//! that to every Check instead of a bare OK: with keygate's own allow, it
//! shows what applying keygate's answer costs Envoy, apart from what
//! deciding it costs keygate.

use std::net::SocketAddr;
use std::path::Path;

use envoy_types::ext_authz::v3::CheckResponseExt;
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse,
};
use prost::Message;
use tonic::{Request, Response, Status};

struct Noop {
    answer: CheckResponse,
}

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(&self, _: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(self.answer.clone()))
    }
}

/// Serves the no-op Check on `addr` until the process is killed, answering
/// with the CheckResponse encoded in `answer`, else a bare OK.
pub async fn serve(addr: SocketAddr, answer: Option<&Path>) -> Result<(), String> {
    let answer = match answer {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            CheckResponse::decode(&bytes[..]).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => CheckResponse::with_status(Status::ok("")),
    };
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(AuthorizationServer::new(Noop { answer }))
        .serve(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))
}
