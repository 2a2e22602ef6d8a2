//! The no-op ext_authz server: Envoy's Check, always OK, over tonic and
//! envoy-types. It is the limit of the ext_authz design: what a Check costs
//! when the authorizer does nothing. Run as its own process
//! (`keygate-bench noop-server`), like keygate.
//!
//! Given an answer, it sends that to every Check instead of a bare OK: with
//! keygate's own allow, it is the limit of the ext_authz design for that
//! answer, what Envoy's applying it costs apart from what deciding it costs
//! keygate. So it does less than either other server: the request is
//! skipped unread, the answer encoded once and copied out as is, and its
//! connections are keygate's own (`keygate::api::connection`), which h2
//! writes to as it writes to keygate's (answers this size batched, not one
//! write each).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::task::{Context, Poll};

use envoy_types::ext_authz::v3::CheckResponseExt;
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse,
};
use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes};
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

struct Noop;

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(&self, _: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(CheckResponse::with_status(Status::ok(""))))
    }
}

/// Serves the no-op Check on `addr` until the process is killed, answering
/// with the CheckResponse encoded in the file `answer`, else a bare OK.
pub async fn serve(addr: SocketAddr, answer: Option<&Path>) -> Result<(), String> {
    let mut server = tonic::transport::Server::builder().tcp_nodelay(true);
    let served = match answer {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            CheckResponse::decode(&bytes[..]).map_err(|e| format!("{}: {e}", path.display()))?;
            let canned = Canned(bytes.into());
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("{addr}: {e}"))?;
            server
                .add_service(canned)
                .serve_with_incoming(keygate::api::connection::incoming(listener))
                .await
        }
        None => {
            let noop = AuthorizationServer::new(Noop);
            server.add_service(noop).serve(addr).await
        }
    };
    served.map_err(|e| format!("{addr}: {e}"))
}

/// Check answering every request with the same encoded CheckResponse.
#[derive(Clone)]
struct Canned(Bytes);

impl NamedService for Canned {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

impl<B> Service<http::Request<B>> for Canned
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != "/envoy.service.auth.v3.Authorization/Check" {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let answer = self.clone();
        Box::pin(async move { Ok(Grpc::new(CannedCodec).unary(answer, req).await) })
    }
}

impl UnaryService<()> for Canned {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>, Status>;

    fn call(&mut self, _: Request<()>) -> Self::Future {
        let answer = self.0.clone();
        Box::pin(async move { Ok(Response::new(answer)) })
    }
}

/// Skips the request; writes the answer's bytes as they are.
struct CannedCodec;

impl Codec for CannedCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = CannedCodec;
    type Decoder = CannedCodec;

    fn encoder(&mut self) -> Self::Encoder {
        CannedCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        CannedCodec
    }
}

impl Decoder for CannedCodec {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

impl Encoder for CannedCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}
