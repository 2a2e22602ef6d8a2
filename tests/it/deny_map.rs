//! One answer per deny reason, whoever asks: Authorize, Envoy's Check and the
//! embedded CachedAuthorizer give the same reason, HTTP status and message
//! for every deny reason, and Check's gRPC code is the one keygate uses for
//! that reason everywhere (`keygate_proto::convert::deny_code`).

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::{CheckRequest, HttpResponse};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};
use keygate_client::{CachedAuthorizer, ClientSettings};
use keygate_core::decision::DenyReason;
use keygate_proto::v1 as pb;
use tonic::transport::Channel;

use crate::harness::{Backend, TestServer, epoch, eventually};
use crate::on_both_backends;

/// A request that is denied for one reason, as Authorize and as Envoy sees it.
struct Case {
    reason: DenyReason,
    /// One token per transport: a rate-limited key's allowance is spent by
    /// whoever asks first.
    tokens: [String; 3],
    method: &'static str,
    path: &'static str,
    ip: &'static str,
}

fn check_request(token: &str, case: &Case) -> CheckRequest {
    let mut headers = HashMap::new();
    if !token.is_empty() {
        headers.insert("authorization".to_owned(), format!("Bearer {token}"));
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: case.ip.into(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: case.method.into(),
                    path: case.path.into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn cases(s: &TestServer) -> Vec<Case> {
    let key = |scopes: &[&str], f: fn(&mut pb::CreateKeyRequest)| {
        let mut req = pb::CreateKeyRequest {
            name: "deny map".into(),
            organization_id: "org_a".into(),
            mode: pb::Mode::Live as i32,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        f(&mut req);
        async move { s.create_key(req).await.1 }
    };
    let three = |t: String| [t.clone(), t.clone(), t];
    let checkout = three(key(&["checkout:create"], |_| {}).await);
    let expiring = three(
        key(&["checkout:create"], |r| {
            r.expires_at = Some(prost_types::Timestamp {
                seconds: (epoch() + chrono::Duration::minutes(1)).timestamp(),
                nanos: 0,
            })
        })
        .await,
    );
    let fenced = three(
        key(&["checkout:create"], |r| {
            r.allowed_cidrs = vec!["10.0.0.0/8".into()]
        })
        .await,
    );
    let mut limited = Vec::new();
    for _ in 0..3 {
        limited.push(key(&["checkout:create"], |r| r.rate_limit_per_minute = 1).await);
    }
    let forged = "kg_live_0000000000000000000000forged";
    vec![
        Case {
            reason: DenyReason::MissingToken,
            tokens: three(String::new()),
            method: "POST",
            path: "/v1/checkouts",
            ip: "203.0.113.7",
        },
        Case {
            reason: DenyReason::InvalidToken,
            tokens: three(forged.into()),
            method: "POST",
            path: "/v1/checkouts",
            ip: "203.0.113.7",
        },
        Case {
            reason: DenyReason::ExpiredToken,
            tokens: expiring,
            method: "POST",
            path: "/v1/checkouts",
            ip: "203.0.113.7",
        },
        Case {
            reason: DenyReason::InsufficientScope,
            tokens: checkout.clone(),
            method: "GET",
            path: "/v1/transactions/tx_1",
            ip: "203.0.113.7",
        },
        Case {
            reason: DenyReason::IpNotAllowed,
            tokens: fenced,
            method: "POST",
            path: "/v1/checkouts",
            ip: "203.0.113.7",
        },
        Case {
            reason: DenyReason::RateLimited,
            tokens: limited.try_into().unwrap(),
            method: "POST",
            path: "/v1/checkouts",
            ip: "203.0.113.7",
        },
        Case {
            reason: DenyReason::RouteNotFound,
            tokens: checkout,
            method: "DELETE",
            path: "/v1/nowhere",
            ip: "203.0.113.7",
        },
    ]
}

async fn every_deny_reason_answers_alike_on_every_transport(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let cases = cases(&s).await;
    // Expired keys expire on the injected clock, after they were made.
    s.advance(chrono::Duration::minutes(2));
    let channel = Channel::from_shared(s.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = CachedAuthorizer::new(
        channel.clone(),
        s.admin_token.clone(),
        ClientSettings {
            ttl: Duration::from_secs(60),
            ..Default::default()
        },
    )
    .unwrap();
    eventually(Duration::from_secs(10), "the client's feed", || async {
        client.feed_alive().then_some(())
    })
    .await;
    let mut envoy = AuthorizationClient::new(channel);

    let mut seen = Vec::new();
    for case in &cases {
        let what = format!("{:?}", case.reason);
        let request = |token: &str| pb::AuthorizeRequest {
            token: token.into(),
            route: format!("{} {}", case.method, case.path),
            ip: case.ip.into(),
            ..Default::default()
        };
        let spend = |token: String| {
            let request = request(&token);
            let s = &s;
            async move {
                if case.reason == DenyReason::RateLimited {
                    let first = s.authorizer().await.authorize(request).await.unwrap();
                    assert_eq!(first.into_inner().decision(), pb::Decision::Allow);
                }
            }
        };

        // Authorize.
        spend(case.tokens[0].clone()).await;
        let authorized = s
            .authorizer()
            .await
            .authorize(request(&case.tokens[0]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(authorized.decision(), pb::Decision::Deny, "{what}");
        assert_eq!(
            authorized.reason().as_str_name(),
            case.reason.code(),
            "{what}"
        );
        assert_eq!(
            authorized.http_status,
            u32::from(case.reason.http_status()),
            "{what}"
        );
        assert_eq!(authorized.message, case.reason.message(), "{what}");

        // Envoy's Check: the same HTTP answer, and the one gRPC code.
        spend(case.tokens[1].clone()).await;
        let checked = envoy
            .check(check_request(&case.tokens[1], case))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            checked.status.as_ref().map(|s| s.code),
            Some(keygate_proto::convert::deny_code(case.reason) as i32),
            "{what}"
        );
        let Some(HttpResponse::DeniedResponse(denied)) = &checked.http_response else {
            panic!("{what}: Check did not deny: {checked:?}");
        };
        assert_eq!(
            denied.status.as_ref().map(|s| s.code),
            Some(authorized.http_status as i32),
            "{what}"
        );
        let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
        assert_eq!(body["code"], case.reason.code(), "{what}");
        assert_eq!(body["message"], authorized.message, "{what}");

        // The embedded client.
        let token = &case.tokens[2];
        if case.reason == DenyReason::RateLimited {
            let first = client.authorize(request(token)).await.unwrap();
            assert_eq!(first.decision(), pb::Decision::Allow, "{what}");
        }
        let answered = client.authorize(request(token)).await.unwrap();
        assert_eq!(
            (
                answered.decision(),
                answered.reason(),
                answered.http_status,
                answered.message.as_str()
            ),
            (
                authorized.decision(),
                authorized.reason(),
                authorized.http_status,
                authorized.message.as_str()
            ),
            "{what}"
        );
        seen.push(case.reason);
    }
    assert_eq!(seen, DenyReason::ALL, "every deny reason is walked");
}

on_both_backends!(every_deny_reason_answers_alike_on_every_transport);
