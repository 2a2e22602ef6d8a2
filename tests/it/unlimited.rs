//! Unlimited keys: never counted, shown as such, and only a SYSTEM key can
//! make one; `--default-rate-limit off` makes keys without a limit of their
//! own unlimited.

use keygate::store::EventLog;
use keygate_core::limits::Allowance;
use keygate_proto::v1 as pb;
use prost_types::FieldMask;
use serde_json::Value;
use tonic::{Code, Status};

use crate::cli::keys;
use crate::harness::{Backend, TestServer, as_key};
use crate::on_both_backends;

const ROUTE: &str = "POST /v1/checkouts";

on_both_backends!(
    an_unlimited_key_is_never_rate_limited,
    organization_callers_cannot_create_or_make_unlimited_keys,
    an_organization_caller_cannot_act_on_an_unlimited_key,
    the_default_rate_limit_off_leaves_keys_without_a_limit_uncounted,
    the_cli_creates_shows_and_clears_unlimited_keys,
);

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

async fn head(s: &TestServer) -> i64 {
    s.store.head_sequence().await.unwrap()
}

/// What an operator would see of a key, without the usage that moves on its own.
async fn seen(s: &TestServer, key_id: &str) -> pb::ApiKey {
    let mut key = s.get_key(key_id).await;
    key.last_used_at = None;
    key
}

fn assert_refused<T: std::fmt::Debug>(result: Result<T, Status>, what: &str) {
    let err = result.expect_err(what);
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "{what}: {}",
        err.message()
    );
    assert!(
        err.message().starts_with("unlimited: "),
        "{what}: the refusal names the field: {}",
        err.message()
    );
}

/// `count` calls of `token`, every one of them answered ALLOW and uncounted.
async fn all_allowed_uncounted(s: &TestServer, token: &str, count: usize) {
    let mut client = s.authorizer().await;
    for i in 0..count {
        let r = client
            .authorize(pb::AuthorizeRequest {
                token: token.into(),
                route: ROUTE.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.decision(), pb::Decision::Allow, "call {i}: {r:?}");
        assert_eq!(
            (r.rate_limit, r.rate_limit_remaining, r.rate_limit_reset),
            (0, 0, None),
            "call {i}: rate_limit 0 means unlimited"
        );
    }
}

async fn an_unlimited_key_is_never_rate_limited(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    // Its own limit of 1 is kept, and not applied while it is unlimited.
    let (key, token) = s
        .create_key(pb::CreateKeyRequest {
            name: "internal service".into(),
            organization_id: "org_a".into(),
            scopes: vec!["checkout:create".into()],
            rate_limit_per_minute: 1,
            unlimited: true,
            ..Default::default()
        })
        .await;
    assert!(key.unlimited);
    all_allowed_uncounted(&s, &token, 500).await;

    // GetKey and ListKeys show it.
    let got = s.get_key(&key.key_id).await;
    assert!(got.unlimited && got.rate_limit_per_minute == 1, "{got:?}");
    let listed = s
        .admin()
        .await
        .list_keys(as_key(
            &s.admin_token,
            pb::ListKeysRequest {
                organization_id: "org_a".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .keys
            .iter()
            .map(|k| (k.key_id.as_str(), k.unlimited))
            .collect::<Vec<_>>(),
        [(key.key_id.as_str(), true)]
    );

    // Cleared (the mask names it), its own limit applies again at once.
    let mut admin = s.admin().await;
    let cleared = admin
        .update_key(as_key(
            &s.admin_token,
            pb::UpdateKeyRequest {
                key_id: key.key_id.clone(),
                update_mask: mask(&["unlimited"]),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!cleared.unlimited);
    let r = s.authorize(&token, ROUTE, "").await;
    assert_eq!((r.decision(), r.rate_limit), (pb::Decision::Allow, 1));
    let r = s.authorize(&token, ROUTE, "").await;
    assert_eq!(r.reason(), pb::DenyReason::RateLimited);

    // Set again without a mask: `unlimited: true` is a field the request sets.
    let again = admin
        .update_key(as_key(
            &s.admin_token,
            pb::UpdateKeyRequest {
                key_id: key.key_id.clone(),
                unlimited: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(again.unlimited && again.rate_limit_per_minute == 1);
    all_allowed_uncounted(&s, &token, 10).await;

    // The audit trail records the flag.
    let events = admin
        .list_key_events(as_key(
            &s.admin_token,
            pb::ListKeyEventsRequest {
                key_id: key.key_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    let details: Vec<&str> = events.iter().map(|e| e.details.as_str()).collect();
    assert_eq!(details[..2], ["unlimited=true", "unlimited=false"]);
    assert!(details[2].contains("unlimited=true"), "{}", details[2]);
}

async fn organization_callers_cannot_create_or_make_unlimited_keys(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let mut admin = s.admin().await;
    // Even an ORGANIZATION key that is itself unlimited cannot hand it out.
    for caller_unlimited in [false, true] {
        let (caller_key, caller) = s
            .create_key(pb::CreateKeyRequest {
                name: "org admin".into(),
                organization_id: "org_a".into(),
                mode: pb::Mode::Live as i32,
                scopes: vec!["api_key:*".into(), "checkout:create".into()],
                unlimited: caller_unlimited,
                ..Default::default()
            })
            .await;
        let what = |action: &str| format!("unlimited caller {caller_unlimited}: {action}");

        let before = head(&s).await;
        let result = admin
            .create_key(as_key(
                &caller,
                pb::CreateKeyRequest {
                    name: "escape".into(),
                    scopes: vec!["checkout:create".into()],
                    unlimited: true,
                    ..Default::default()
                },
            ))
            .await;
        assert_refused(result, &what("create"));
        assert_eq!(head(&s).await, before, "{}", what("nothing written"));

        // Its own child, and itself: neither with a mask nor without.
        let child = admin
            .create_key(as_key(
                &caller,
                pb::CreateKeyRequest {
                    name: "child".into(),
                    scopes: vec!["checkout:create".into()],
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap();
        for id in [&child.key_id, &caller_key.key_id] {
            for update_mask in [None, mask(&["unlimited"]), mask(&["*"])] {
                let before = (head(&s).await, seen(&s, id).await);
                let result = admin
                    .update_key(as_key(
                        &caller,
                        pb::UpdateKeyRequest {
                            key_id: id.clone(),
                            name: "renamed".into(),
                            unlimited: true,
                            update_mask: update_mask.clone(),
                            ..Default::default()
                        },
                    ))
                    .await;
                if caller_unlimited && id == &caller_key.key_id {
                    // It is unlimited already: keeping the flag makes nothing.
                    result.unwrap_or_else(|e| panic!("{}", what(e.message())));
                    continue;
                }
                assert_refused(result, &what(&format!("update {update_mask:?}")));
                assert_eq!((head(&s).await, seen(&s, id).await), before);
            }
        }
        assert!(!seen(&s, &child.key_id).await.unlimited);
    }

    // A SYSTEM key may do both.
    let (child, _) = s.org_key("org_a", &["checkout:create"]).await;
    let made = admin
        .update_key(as_key(
            &s.admin_token,
            pb::UpdateKeyRequest {
                key_id: child.key_id.clone(),
                unlimited: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(made.unlimited);
}

async fn an_organization_caller_cannot_act_on_an_unlimited_key(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let mut admin = s.admin().await;
    let (_, caller) = s
        .create_key(pb::CreateKeyRequest {
            name: "org admin".into(),
            organization_id: "org_a".into(),
            mode: pb::Mode::Live as i32,
            scopes: vec!["api_key:*".into(), "checkout:create".into()],
            rate_limit_per_minute: 1_000_000,
            ..Default::default()
        })
        .await;
    let (service, _) = s
        .create_key(pb::CreateKeyRequest {
            name: "internal service".into(),
            organization_id: "org_a".into(),
            mode: pb::Mode::Live as i32,
            scopes: vec!["checkout:create".into()],
            unlimited: true,
            ..Default::default()
        })
        .await;
    let id = service.key_id.clone();

    // Rotating would hand the caller an unlimited token; renaming or
    // re-enabling would restore unlimited power: all refused, even to the
    // highest limit there is.
    let before = (head(&s).await, seen(&s, &id).await);
    let result = admin
        .rotate_key(as_key(
            &caller,
            pb::RotateKeyRequest {
                key_id: id.clone(),
                ..Default::default()
            },
        ))
        .await;
    assert_refused(result, "rotate");
    let result = admin
        .update_key(as_key(
            &caller,
            pb::UpdateKeyRequest {
                key_id: id.clone(),
                name: "renamed".into(),
                ..Default::default()
            },
        ))
        .await;
    assert_refused(result, "rename");
    assert_eq!((head(&s).await, seen(&s, &id).await), before);
    admin
        .disable_key(as_key(
            &caller,
            pb::DisableKeyRequest {
                key_id: id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("taking power away needs no more than api_key:update");
    let before = head(&s).await;
    let result = admin
        .enable_key(as_key(&caller, pb::EnableKeyRequest { key_id: id.clone() }))
        .await;
    assert_refused(result, "enable");
    assert_eq!(head(&s).await, before);
    assert_eq!(seen(&s, &id).await.status(), pb::KeyStatus::Disabled);

    // The message says why.
    let err = admin
        .enable_key(as_key(&caller, pb::EnableKeyRequest { key_id: id.clone() }))
        .await
        .unwrap_err();
    assert_eq!(
        err.message(),
        "unlimited: the key is unlimited, above the caller's own limit of 1000000 per minute"
    );
    // The SYSTEM key can.
    admin
        .enable_key(as_key(&s.admin_token, pb::EnableKeyRequest { key_id: id }))
        .await
        .unwrap();
}

async fn the_default_rate_limit_off_leaves_keys_without_a_limit_uncounted(backend: Backend) {
    let Some(s) = TestServer::start_with(backend, |settings| {
        settings.default_rate_limit = Allowance::Unlimited;
    })
    .await
    else {
        return;
    };
    let (plain, plain_token) = s.org_key("org_a", &["checkout:create"]).await;
    all_allowed_uncounted(&s, &plain_token, 200).await;
    let shown = s.get_key(&plain.key_id).await;
    assert_eq!((shown.rate_limit_per_minute, shown.unlimited), (0, false));

    // A key with its own limit keeps it.
    let (_, limited) = crate::limits::limited_key(&s, 2).await;
    for _ in 0..2 {
        let r = s.authorize(&limited, ROUTE, "").await;
        assert_eq!((r.decision(), r.rate_limit), (pb::Decision::Allow, 2));
    }
    assert_eq!(
        s.authorize(&limited, ROUTE, "").await.reason(),
        pb::DenyReason::RateLimited
    );

    // A limited ORGANIZATION key cannot make a key without a limit: under
    // this default that is an unlimited one.
    let (_, org_admin) = s
        .create_key(pb::CreateKeyRequest {
            name: "org admin".into(),
            organization_id: "org_a".into(),
            mode: pb::Mode::Live as i32,
            scopes: vec!["api_key:*".into(), "checkout:create".into()],
            rate_limit_per_minute: 50,
            ..Default::default()
        })
        .await;
    let err = s
        .admin()
        .await
        .create_key(as_key(
            &org_admin,
            pb::CreateKeyRequest {
                name: "no limit".into(),
                scopes: vec!["checkout:create".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "rate_limit_per_minute: unlimited is above the caller's own limit of 50 per minute"
    );
}

async fn the_cli_creates_shows_and_clears_unlimited_keys(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (ok, out, err) = keys(
        &s,
        &[
            "--json",
            "create",
            "--name",
            "internal service",
            "--organization-id",
            "org_1",
            "--scope",
            "checkout:create",
            "--unlimited",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["key"]["unlimited"], true);
    let key_id = created["key"]["key_id"].as_str().unwrap().to_owned();

    let rate_cell = |table: &str| {
        let mut lines = table.lines();
        let header = lines.next().unwrap().to_owned();
        let row = lines.next().unwrap().to_owned();
        let at = header.find("RATE LIMIT").expect("a RATE LIMIT column");
        row[at..].split_whitespace().next().unwrap().to_owned()
    };
    let (ok, table, _) = keys(&s, &["get", &key_id]).await;
    assert!(ok);
    assert_eq!(rate_cell(&table), "unlimited", "{table}");
    let (ok, table, _) = keys(&s, &["list", "--organization-id", "org_1"]).await;
    assert!(ok);
    assert_eq!(rate_cell(&table), "unlimited", "{table}");

    let (ok, table, err) = keys(&s, &["update", &key_id, "--unlimited=false"]).await;
    assert!(ok, "{err}");
    assert_eq!(rate_cell(&table), "default", "{table}");
    let (ok, table, err) = keys(&s, &["update", &key_id, "--unlimited", "--rate-limit", "7"]).await;
    assert!(ok, "{err}");
    assert_eq!(rate_cell(&table), "unlimited", "{table}");
    let (ok, out, _) = keys(&s, &["--json", "get", &key_id]).await;
    assert!(ok);
    let got: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&got["unlimited"], &got["rate_limit_per_minute"]),
        (&Value::Bool(true), &Value::from(7))
    );
}
