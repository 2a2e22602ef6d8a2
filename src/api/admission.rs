//! Admission to the gRPC server: a cap on calls in progress across all
//! connections, and a deadline on each call until its response starts.
//!
//! Both cover a call until its handler returns: all of a unary call, and
//! only the opening of a server stream. So a Watch, once open, holds no
//! permit and has no deadline; it counts against the connection's HTTP/2
//! stream limit and its key's Watch limit instead.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

/// grpc.health.v1 is never refused nor timed: a probe must see the truth
/// about a busy replica, not a refusal that gets it restarted.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
/// KeyAdmin calls may wait for replicas to confirm a change.
const ADMIN_PREFIX: &str = "/keygate.v1.KeyAdmin/";

/// The admission rules, shared by every connection.
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    timeout: Duration,
    admin_timeout: Duration,
}

impl AdmissionLayer {
    /// At most `max_in_flight` calls in progress (beyond that, at once
    /// RESOURCE_EXHAUSTED); each must answer within `timeout`, KeyAdmin
    /// calls within `timeout` plus `replica_wait`, the longest wait for
    /// replicas they can ask for (beyond that, DEADLINE_EXCEEDED).
    pub fn new(max_in_flight: usize, timeout: Duration, replica_wait: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            timeout,
            admin_timeout: timeout.saturating_add(replica_wait),
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            rules: self.clone(),
        }
    }
}

/// The service `S` behind [`AdmissionLayer`]'s rules: a call over the cap
/// is answered RESOURCE_EXHAUSTED without reaching `S`, one over its
/// deadline DEADLINE_EXCEEDED; health checks pass straight through.
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    rules: AdmissionLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> Service<http::Request<B>> for Admission<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if path.starts_with(HEALTH_PREFIX) {
            return Box::pin(self.inner.call(request));
        }
        let timeout = if path.starts_with(ADMIN_PREFIX) {
            self.rules.admin_timeout
        } else {
            self.rules.timeout
        };
        // Refused at once rather than queued: a queue would only add
        // latency to calls whose callers (Envoy: 0.5 s) have given up.
        let Ok(permit) = self.rules.permits.clone().try_acquire_owned() else {
            let refused = Status::resource_exhausted(format!(
                "server busy: {} calls in progress, the most it takes; retry with backoff",
                self.rules.max_in_flight
            ));
            return Box::pin(std::future::ready(Ok(refused.into_http())));
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let _permit = permit;
            match tokio::time::timeout(timeout, call).await {
                Ok(answered) => answered,
                Err(_) => Ok(Status::deadline_exceeded(format!(
                    "the server gives a call at most {timeout:?} to answer"
                ))
                .into_http()),
            }
        })
    }
}
