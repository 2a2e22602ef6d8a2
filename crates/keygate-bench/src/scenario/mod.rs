//! One module per scenario of issue 13, and the calls they share.

pub mod admin;
pub mod analytics;
pub mod cold;
pub mod cost;
pub mod envoy;
pub mod flood;
pub mod limit;
pub mod pair;
pub mod revocation;
pub mod scale;
pub mod shared;

use std::sync::Arc;

use keygate_proto::v1 as pb;
use tonic::transport::Channel;

use crate::load::{Call, call};
use crate::server::{authorize_request, create_key, expect_decision};

/// grpc.health.v1 Check: the empty call every ratio is against.
pub fn health_call(channels: &[Channel]) -> Call {
    let channels: Arc<[Channel]> = channels.into();
    call(move |n| {
        let channel = channels[n as usize % channels.len()].clone();
        async move {
            tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .map(drop)
                .map_err(|s| format!("health: {:?} {}", s.code(), s.message()))
        }
    })
}

/// Authorize with `tokens[n % len]`, expecting `want`.
pub fn authorize_call(channels: &[Channel], tokens: &[String], want: pb::Decision) -> Call {
    let channels: Arc<[Channel]> = channels.into();
    let requests: Arc<[pb::AuthorizeRequest]> =
        tokens.iter().map(|t| authorize_request(t)).collect();
    call(move |n| {
        let channel = channels[n as usize % channels.len()].clone();
        let request = requests[n as usize % requests.len()].clone();
        async move {
            let answer = pb::authorizer_client::AuthorizerClient::new(channel)
                .authorize(request)
                .await;
            expect_decision(answer, want)
        }
    })
}

/// Creates `n` keys, one per organization `org_0`…, and caches them with
/// [`warm`]; their tokens.
pub async fn cached_tokens(
    channels: &[Channel],
    admin: &str,
    n: usize,
) -> Result<Vec<String>, String> {
    let mut tokens = Vec::with_capacity(n);
    for i in 0..n {
        tokens.push(
            create_key(&channels[0], admin, &format!("org_{i}"))
                .await?
                .1,
        );
    }
    warm(channels, &tokens).await?;
    Ok(tokens)
}

/// Authorize each token once (8 at a time), so it is cached. A call that
/// answers UNAVAILABLE is retried (up to 5 times, 50 ms apart): right after
/// start, keygate's store pool is still opening connections, and misses
/// beyond its concurrent-read cap then wait past `--store-read-wait`.
pub async fn warm(channels: &[Channel], tokens: &[String]) -> Result<(), String> {
    use futures_util::StreamExt;
    let call = authorize_call(channels, tokens, pb::Decision::Allow);
    let results: Vec<Result<(), String>> = futures_util::stream::iter(0..tokens.len() as u64)
        .map(|n| {
            let call = Arc::clone(&call);
            async move {
                let mut tries = 0;
                loop {
                    match call(n).await {
                        Err(e) if e.starts_with("Unavailable") && tries < 5 => {
                            tries += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                        other => return other,
                    }
                }
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    results.into_iter().collect()
}
