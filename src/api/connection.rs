//! The TCP connections the gRPC server accepts, as h2 should write to them.
//!
//! h2 copies a DATA frame's payload into its write buffer only up to a
//! threshold, 256 bytes on a socket that takes vectored writes and 1,024 on
//! one that does not; a bigger payload is held aside, and nothing more can
//! be buffered until it has been written. keygate's answers are mostly
//! 300 to 1,000 bytes (a Check's allow answer with its identity headers and
//! metadata is about 700), so on a plain `TcpStream` every answer forced a
//! write of its own: 1.4 writes a Check against the no-op server's 0.4,
//! whose empty answers are batched several to a write (`perf trace`,
//! BENCHMARKS.md, scenario 5). Declaring the socket unvectored raises the
//! threshold to 1,024, so answers are copied and batched (0.64 writes a
//! Check after, the no-op's 0.63); answers bigger than that (admin pages)
//! are written in two writes instead of one vectored one.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Accepted connections, with Nagle's algorithm off: small gRPC answers must
/// leave at once, not wait for a delayed ACK (a 40 ms stall otherwise), and
/// with TCP keepalive so dead gateways' connections are noticed.
pub fn incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = io::Result<Connection>> {
    use tokio_stream::StreamExt;
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
        .map(|accepted| accepted.map(Connection))
}

/// An accepted connection that h2 writes to without vectored writes.
pub struct Connection(pub TcpStream);

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    // `is_write_vectored` stays false (the default): the point of the type.
}
