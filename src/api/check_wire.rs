//! The ext_authz Check service on the wire: requests are read in place
//! ([`CheckView`]), allow answers are written straight as protobuf into one
//! buffer.
//!
//! An allow answer carries seven identity headers, the rate-limit headers,
//! the headers to remove and the identity again as dynamic metadata. Built
//! as prost messages that is some fifty allocations (every header name and
//! value, every metadata key and value, a hash map) and as many frees, about
//! a fifth of a Check's instructions under callgrind (BENCHMARKS.md,
//! scenario 9). Written here from borrowed values it is one.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::ext_authz::v3::pb::CheckResponse;
use prost::Message;
use prost::bytes::Buf;
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

use super::check_request::CheckView;
use super::ext_authz::ExtAuthzApi;

/// envoy.service.auth.v3.Authorization, as Envoy calls it.
pub const SERVICE_NAME: &str = "envoy.service.auth.v3.Authorization";
const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// A Check answer, already encoded.
pub struct Encoded(pub Vec<u8>);

impl From<CheckResponse> for Encoded {
    fn from(response: CheckResponse) -> Self {
        Self(response.encode_to_vec())
    }
}

/// Protobuf fields written into one growing buffer.
pub struct Writer(Vec<u8>);

const VARINT: u64 = 0;
const LENGTH_DELIMITED: u64 = 2;

impl Writer {
    /// A buffer of `capacity` bytes to start with.
    pub fn with_capacity(capacity: usize) -> Self {
        Self(Vec::with_capacity(capacity))
    }

    /// The bytes written.
    pub fn finish(self) -> Encoded {
        Encoded(self.0)
    }

    fn varint(&mut self, v: u64) {
        let (bytes, n) = varint(v);
        self.0.extend_from_slice(&bytes[..n]);
    }

    fn key(&mut self, field: u32, wire_type: u64) {
        self.varint(u64::from(field) << 3 | wire_type);
    }

    /// A string field, written even when empty (as a oneof member is).
    pub fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    /// A string field from bytes known to be UTF-8, or a bytes field.
    pub fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, LENGTH_DELIMITED);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    /// A varint field (an enum, an unsigned integer).
    pub fn uint(&mut self, field: u32, v: u64) {
        self.key(field, VARINT);
        self.varint(v);
    }

    /// An embedded message field whose body `body` writes.
    pub fn message(&mut self, field: u32, body: impl FnOnce(&mut Self)) {
        self.key(field, LENGTH_DELIMITED);
        // One byte for the length, which fits most bodies; moved over when
        // it does not.
        let at = self.0.len();
        self.0.push(0);
        body(self);
        let len = self.0.len() - at - 1;
        if len < 0x80 {
            self.0[at] = len as u8;
        } else {
            // The body moved over in place: no allocation.
            let (prefix, n) = varint(len as u64);
            let end = self.0.len();
            self.0.resize(end + n - 1, 0);
            self.0.copy_within(at + 1..end, at + n);
            self.0[at..at + n].copy_from_slice(&prefix[..n]);
        }
    }
}

/// `v` as a protobuf varint: the bytes and how many of them are used.
fn varint(mut v: u64) -> ([u8; 10], usize) {
    let mut bytes = [0u8; 10];
    let mut n = 0;
    while v >= 0x80 {
        bytes[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    bytes[n] = v as u8;
    (bytes, n + 1)
}

/// Check over [`ExtAuthzApi`], with the allow answer encoded by hand.
#[derive(Clone)]
pub struct CheckServer {
    api: Arc<ExtAuthzApi>,
    max_decoding_message_size: Option<usize>,
}

impl CheckServer {
    /// Serves `api`.
    pub fn new(api: ExtAuthzApi) -> Self {
        Self {
            api: Arc::new(api),
            max_decoding_message_size: None,
        }
    }

    /// Refuses requests over `limit` bytes (RESOURCE_EXHAUSTED), as tonic's
    /// generated servers do.
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding_message_size = Some(limit);
        self
    }
}

impl NamedService for CheckServer {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for CheckServer
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
        if req.uri().path() != CHECK_PATH {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let (api, limit) = (self.api.clone(), self.max_decoding_message_size);
        Box::pin(async move {
            let mut grpc = Grpc::new(CheckCodec).apply_max_message_size_config(limit, None);
            Ok(grpc.unary(Check(api), req).await)
        })
    }
}

struct Check(Arc<ExtAuthzApi>);

impl UnaryService<CheckView> for Check {
    type Response = Encoded;
    type Future = BoxFuture<Response<Encoded>, Status>;

    fn call(&mut self, request: Request<CheckView>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move {
            api.check_encoded(request.get_ref())
                .await
                .map(Response::new)
        })
    }
}

/// Reads a CheckRequest in place; writes an [`Encoded`] as is.
struct CheckCodec;

impl Codec for CheckCodec {
    type Encode = Encoded;
    type Decode = CheckView;
    type Encoder = EncodedEncoder;
    type Decoder = ViewDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ViewDecoder
    }
}

struct ViewDecoder;

impl Decoder for ViewDecoder {
    type Item = CheckView;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<CheckView>, Status> {
        // The message's own bytes, split off tonic's buffer rather than copied.
        let bytes = src.copy_to_bytes(src.remaining());
        // INTERNAL, as tonic answers for a message prost cannot parse (and
        // as gRPC's status-code guide has it), naming the field.
        CheckView::decode(bytes)
            .map(Some)
            .map_err(|e| Status::internal(format!("failed to decode Protobuf message: {e}")))
    }
}

struct EncodedEncoder;

impl Encoder for EncodedEncoder {
    type Item = Encoded;
    type Error = Status;

    fn encode(&mut self, item: Encoded, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item.0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_over_a_byte_are_moved_over() {
        use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
        // Lengths of two and three varint bytes.
        for len in [300, 20_000] {
            let long = "x".repeat(len);
            let mut w = Writer::with_capacity(8);
            w.message(1, |entry| {
                entry.string(1, "k");
                entry.message(2, |v| v.string(3, &long));
            });
            let decoded = Struct::decode(&w.finish().0[..]).unwrap();
            assert_eq!(
                decoded.fields.get("k"),
                Some(&Value {
                    kind: Some(Kind::StringValue(long))
                })
            );
        }
    }
}
