//! No key can make or become more than it is: a caller bound by a mode,
//! an allow-list, an expiry or a rate limit cannot create, update, rotate or
//! re-enable a key without it, nor shed it from itself; and wildcard scopes
//! do not reach keygate's own resources.

use keygate_proto::v1 as pb;
use prost_types::{FieldMask, Timestamp};
use tonic::{Code, Status};

use crate::harness::{Backend, TestServer, as_key, epoch};
use crate::on_both_backends;

/// The settings a restriction is about, for a CreateKey or an UpdateKey.
#[derive(Debug, Clone)]
struct Fields {
    mode: pb::Mode,
    cidrs: Vec<&'static str>,
    expires_in_minutes: Option<i64>,
    rate: u32,
}

impl Default for Fields {
    fn default() -> Self {
        Self {
            mode: pb::Mode::Test,
            cidrs: vec![],
            expires_in_minutes: None,
            rate: 0,
        }
    }
}

fn at(minutes: i64) -> Timestamp {
    Timestamp {
        seconds: (epoch() + chrono::Duration::minutes(minutes)).timestamp(),
        nanos: 0,
    }
}

impl Fields {
    fn create(&self, name: &str, tier: pb::KeyTier, org: &str) -> pb::CreateKeyRequest {
        pb::CreateKeyRequest {
            name: name.into(),
            organization_id: org.into(),
            tier: tier as i32,
            mode: self.mode as i32,
            scopes: vec!["api_key:*".into(), "checkout:create".into()],
            allowed_cidrs: self.cidrs.iter().map(|c| c.to_string()).collect(),
            rate_limit_per_minute: self.rate,
            expires_at: self.expires_in_minutes.map(at),
            unlimited: false,
        }
    }

    fn update(&self, key_id: &str, path: &str) -> pb::UpdateKeyRequest {
        pb::UpdateKeyRequest {
            key_id: key_id.into(),
            name: "renamed".into(),
            allowed_cidrs: self.cidrs.iter().map(|c| c.to_string()).collect(),
            rate_limit_per_minute: self.rate,
            expires_at: self.expires_in_minutes.map(at),
            update_mask: Some(FieldMask {
                paths: vec![path.into()],
            }),
            ..Default::default()
        }
    }
}

/// One restriction: how the caller is bound, a key inside the bound, keys
/// beyond it, and the UpdateKey path that changes the field (none for mode,
/// which is fixed at creation).
struct Restriction {
    name: &'static str,
    field: &'static str,
    tier: pb::KeyTier,
    caller: Fields,
    inside: Fields,
    beyond: Vec<Fields>,
    /// Keys beyond the caller that only an unrestricted admin can make
    /// (a CreateKey that leaves a field unset inherits the caller's).
    unset: Vec<Fields>,
    update_path: Option<&'static str>,
    /// A setting of the caller's own field that narrows it.
    narrower: Option<Fields>,
}

fn restrictions() -> Vec<Restriction> {
    let live = || Fields {
        mode: pb::Mode::Live,
        ..Default::default()
    };
    let fenced = || Fields {
        cidrs: vec!["127.0.0.0/8"],
        ..live()
    };
    let expiring = || Fields {
        expires_in_minutes: Some(60),
        ..live()
    };
    vec![
        Restriction {
            name: "a TEST caller",
            field: "mode",
            tier: pb::KeyTier::Organization,
            caller: Fields::default(),
            inside: Fields::default(),
            beyond: vec![live()],
            unset: vec![],
            update_path: None,
            narrower: None,
        },
        Restriction {
            name: "a fenced caller",
            field: "allowed_cidrs",
            tier: pb::KeyTier::Organization,
            caller: fenced(),
            inside: Fields {
                cidrs: vec!["127.0.0.1/32"],
                ..live()
            },
            beyond: vec![
                Fields {
                    cidrs: vec!["0.0.0.0/0"],
                    ..live()
                },
                Fields {
                    cidrs: vec!["127.0.0.1", "10.0.0.0/8"],
                    ..live()
                },
                Fields {
                    cidrs: vec!["::/0"],
                    ..live()
                },
            ],
            unset: vec![live()],
            update_path: Some("allowed_cidrs"),
            narrower: Some(Fields {
                cidrs: vec!["127.0.0.1/32"],
                ..live()
            }),
        },
        Restriction {
            name: "an expiring caller",
            field: "expires_at",
            tier: pb::KeyTier::Organization,
            caller: expiring(),
            inside: Fields {
                expires_in_minutes: Some(30),
                ..live()
            },
            beyond: vec![Fields {
                expires_in_minutes: Some(61),
                ..live()
            }],
            unset: vec![live()],
            update_path: Some("expires_at"),
            narrower: Some(Fields {
                expires_in_minutes: Some(45),
                ..live()
            }),
        },
        Restriction {
            name: "a rate-limited caller",
            field: "rate_limit_per_minute",
            tier: pb::KeyTier::Organization,
            caller: Fields { rate: 50, ..live() },
            inside: Fields { rate: 50, ..live() },
            beyond: vec![
                Fields { rate: 51, ..live() },
                // 0 is the server default, 100: more than 50.
                live(),
            ],
            unset: vec![],
            update_path: Some("rate_limit_per_minute"),
            narrower: Some(Fields { rate: 40, ..live() }),
        },
        // A SYSTEM key is bound by the restrictions it carries too.
        Restriction {
            name: "a fenced TEST SYSTEM caller",
            field: "mode",
            tier: pb::KeyTier::System,
            caller: Fields {
                mode: pb::Mode::Test,
                cidrs: vec!["127.0.0.0/8"],
                ..Default::default()
            },
            inside: Fields {
                cidrs: vec!["127.0.0.0/16"],
                ..Default::default()
            },
            beyond: vec![Fields {
                mode: pb::Mode::Live,
                cidrs: vec!["127.0.0.0/16"],
                ..Default::default()
            }],
            unset: vec![],
            update_path: None,
            narrower: None,
        },
        Restriction {
            name: "a fenced SYSTEM caller",
            field: "allowed_cidrs",
            tier: pb::KeyTier::System,
            caller: fenced(),
            inside: Fields {
                cidrs: vec!["127.0.0.0/16"],
                ..live()
            },
            beyond: vec![Fields {
                cidrs: vec!["10.0.0.0/8"],
                ..live()
            }],
            unset: vec![live()],
            update_path: Some("allowed_cidrs"),
            narrower: None,
        },
    ]
}

fn assert_refused<T: std::fmt::Debug>(result: Result<T, Status>, field: &str, what: &str) {
    let err = result.expect_err(what);
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "{what}: {}",
        err.message()
    );
    assert!(
        err.message().starts_with(&format!("{field}: ")),
        "{what}: the refusal names {field}: {}",
        err.message()
    );
}

/// What an operator would see of a key, without the usage that moves on its own.
async fn seen(s: &TestServer, key_id: &str) -> pb::ApiKey {
    let mut key = s.get_key(key_id).await;
    key.last_used_at = None;
    key
}

async fn head(s: &TestServer) -> i64 {
    use keygate::store::EventLog;
    s.store.head_sequence().await.unwrap()
}

async fn restricted_callers_cannot_exceed_themselves(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let mut admin = s.admin().await;
    let org = |tier: pb::KeyTier| {
        if tier == pb::KeyTier::System {
            ""
        } else {
            "org_a"
        }
    };
    for r in restrictions() {
        let what = |action: &str| format!("{}: {action}", r.name);
        let (caller_key, caller) = s
            .create_key(r.caller.create(r.name, r.tier, org(r.tier)))
            .await;
        let org_a = pb::KeyTier::Organization;

        // CreateKey beyond the restriction: refused, nothing written.
        for beyond in &r.beyond {
            let before = head(&s).await;
            let result = admin
                .create_key(as_key(&caller, beyond.create("child", org_a, "org_a")))
                .await;
            assert_refused(result, r.field, &what(&format!("create {beyond:?}")));
            assert_eq!(head(&s).await, before, "{}", what("no event"));
        }
        // Within it: allowed.
        let inside = admin
            .create_key(as_key(&caller, r.inside.create("child", org_a, "org_a")))
            .await
            .unwrap_or_else(|e| panic!("{}: {}", what("create inside"), e.message()))
            .into_inner();
        let inside_id = inside.key.unwrap().key_id;

        // A key beyond the restriction, made by the unrestricted admin.
        for beyond in r.beyond.iter().chain(&r.unset) {
            let (outside, _) = s.create_key(beyond.create("outside", org_a, "org_a")).await;
            let id = outside.key_id.clone();
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
            assert_refused(result, r.field, &what("rotate a wider key"));
            let update = pb::UpdateKeyRequest {
                key_id: id.clone(),
                name: "renamed".into(),
                update_mask: Some(FieldMask {
                    paths: vec!["name".into()],
                }),
                ..Default::default()
            };
            let result = admin.update_key(as_key(&caller, update)).await;
            assert_refused(result, r.field, &what("update a wider key"));
            assert_eq!(
                (head(&s).await, seen(&s, &id).await),
                before,
                "{}",
                what("unchanged")
            );
            admin
                .disable_key(as_key(
                    &s.admin_token,
                    pb::DisableKeyRequest {
                        key_id: id.clone(),
                        ..Default::default()
                    },
                ))
                .await
                .unwrap();
            let before = head(&s).await;
            let result = admin
                .enable_key(as_key(&caller, pb::EnableKeyRequest { key_id: id.clone() }))
                .await;
            assert_refused(result, r.field, &what("enable a wider key"));
            assert_eq!(head(&s).await, before);
            assert_eq!(seen(&s, &id).await.status(), pb::KeyStatus::Disabled);
        }

        // The key inside: rotate, disable and enable, rename, and set the
        // restricted field to the value it has: all allowed.
        admin
            .rotate_key(as_key(
                &caller,
                pb::RotateKeyRequest {
                    key_id: inside_id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_or_else(|e| panic!("{}: {}", what("rotate inside"), e.message()));
        admin
            .disable_key(as_key(
                &caller,
                pb::DisableKeyRequest {
                    key_id: inside_id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        admin
            .enable_key(as_key(
                &caller,
                pb::EnableKeyRequest {
                    key_id: inside_id.clone(),
                },
            ))
            .await
            .unwrap_or_else(|e| panic!("{}: {}", what("enable inside"), e.message()));
        admin
            .update_key(as_key(&caller, r.inside.update(&inside_id, "name")))
            .await
            .unwrap_or_else(|e| panic!("{}: {}", what("rename inside"), e.message()));
        let Some(path) = r.update_path else {
            continue;
        };
        admin
            .update_key(as_key(&caller, r.inside.update(&inside_id, path)))
            .await
            .unwrap_or_else(|e| panic!("{}: {}", what("unchanged field"), e.message()));

        // Widening the key inside: refused, nothing changes.
        let mut widen = r.beyond.clone();
        widen.push(Fields {
            cidrs: vec![],
            expires_in_minutes: None,
            rate: 1_000,
            ..Default::default()
        });
        for beyond in &widen {
            let before = (head(&s).await, seen(&s, &inside_id).await);
            let result = admin
                .update_key(as_key(&caller, beyond.update(&inside_id, path)))
                .await;
            assert_refused(result, r.field, &what(&format!("widen {beyond:?}")));
            assert_eq!((head(&s).await, seen(&s, &inside_id).await), before);
        }

        // On itself: never wider, also by clearing the field ...
        for beyond in &widen {
            let before = (head(&s).await, seen(&s, &caller_key.key_id).await);
            let result = admin
                .update_key(as_key(&caller, beyond.update(&caller_key.key_id, path)))
                .await;
            assert_refused(result, r.field, &what(&format!("widen itself {beyond:?}")));
            assert_eq!((head(&s).await, seen(&s, &caller_key.key_id).await), before);
        }
        // ... its own value again, or narrower: allowed.
        admin
            .update_key(as_key(&caller, r.caller.update(&caller_key.key_id, path)))
            .await
            .unwrap_or_else(|e| panic!("{}: {}", what("keep itself"), e.message()));
        if let Some(narrower) = &r.narrower {
            let narrowed = admin
                .update_key(as_key(&caller, narrower.update(&caller_key.key_id, path)))
                .await
                .unwrap_or_else(|e| panic!("{}: {}", what("narrow itself"), e.message()))
                .into_inner();
            // And the narrower bound holds from then on: its old value is now wider.
            let result = admin
                .update_key(as_key(&caller, r.caller.update(&narrowed.key_id, path)))
                .await;
            assert_refused(result, r.field, &what("widen back"));
        }
    }
}

/// The reproduction from the issue: a TEST key with api_key:create, fenced
/// to 127.0.0.0/8 and expiring in an hour, asks for a LIVE key with no
/// allow-list and no expiry.
async fn a_restricted_key_cannot_mint_an_unrestricted_one(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let mut admin = s.admin().await;
    let (_, caller) = s
        .create_key(pb::CreateKeyRequest {
            name: "fenced test admin".into(),
            organization_id: "org_a".into(),
            mode: pb::Mode::Test as i32,
            scopes: vec!["api_key:create".into(), "api_key:update".into()],
            allowed_cidrs: vec!["127.0.0.0/8".into()],
            expires_at: Some(at(60)),
            ..Default::default()
        })
        .await;
    let live = pb::CreateKeyRequest {
        name: "escape".into(),
        mode: pb::Mode::Live as i32,
        ..Default::default()
    };
    let err = admin
        .create_key(as_key(&caller, live.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "mode: a TEST key can create or change only TEST keys"
    );
    let err = admin
        .create_key(as_key(
            &caller,
            pb::CreateKeyRequest {
                mode: pb::Mode::Test as i32,
                allowed_cidrs: vec!["0.0.0.0/0".into()],
                ..live.clone()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.message(),
        "allowed_cidrs: 0.0.0.0/0 is outside the caller's allow-list 127.0.0.0/8"
    );
    // Left unset, the restrictions are inherited.
    let child = admin
        .create_key(as_key(
            &caller,
            pb::CreateKeyRequest {
                mode: pb::Mode::Unspecified as i32,
                ..live
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(child.mode(), pb::Mode::Test);
    assert_eq!(child.allowed_cidrs, vec!["127.0.0.0/8"]);
    assert_eq!(child.expires_at, Some(at(60)));

    // It cannot clear its own allow-list or expiry.
    let me = |paths: &[&str]| pb::UpdateKeyRequest {
        key_id: String::new(),
        update_mask: Some(FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
        ..Default::default()
    };
    let own_id = {
        let listed = s
            .admin()
            .await
            .list_keys(as_key(&s.admin_token, pb::ListKeysRequest::default()))
            .await
            .unwrap()
            .into_inner();
        listed
            .keys
            .into_iter()
            .find(|k| k.name == "fenced test admin")
            .unwrap()
            .key_id
    };
    for paths in [&["allowed_cidrs"][..], &["expires_at"]] {
        let err = admin
            .update_key(as_key(
                &caller,
                pb::UpdateKeyRequest {
                    key_id: own_id.clone(),
                    ..me(paths)
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        assert!(err.message().starts_with(paths[0]), "{}", err.message());
    }
    let own = s.get_key(&own_id).await;
    assert_eq!(own.allowed_cidrs, vec!["127.0.0.0/8"]);
    assert_eq!(own.expires_at, Some(at(60)));
}

/// `*:read` and `*:update` are for the customer's own routes: they grant
/// nothing of keygate's own (`api_key`, `revocation`); `*:*` and scopes
/// naming them do.
async fn wildcards_do_not_grant_keygates_own_scopes(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, reader) = s.org_key("org_a", &["*:read"]).await;
    let (victim, victim_token) = s.org_key("org_a", &["checkout:create"]).await;
    let mut admin = s.admin().await;
    let denied = |r: Result<(), Status>, what: &str| {
        let err = r.expect_err(what);
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{what}: {}",
            err.message()
        );
        assert!(err.message().contains("INSUFFICIENT_SCOPE"), "{what}");
    };
    denied(
        admin
            .list_keys(as_key(&reader, pb::ListKeysRequest::default()))
            .await
            .map(drop),
        "*:read lists keys",
    );
    denied(
        admin
            .get_key(as_key(
                &reader,
                pb::GetKeyRequest {
                    key_id: victim.key_id.clone(),
                },
            ))
            .await
            .map(drop),
        "*:read gets a key",
    );
    denied(
        admin
            .list_key_events(as_key(&reader, pb::ListKeyEventsRequest::default()))
            .await
            .map(drop),
        "*:read reads the audit log",
    );
    let mut feed =
        keygate_proto::v1::revocation_feed_client::RevocationFeedClient::connect(s.url())
            .await
            .unwrap();
    denied(
        feed.watch(as_key(&reader, pb::WatchRequest::default()))
            .await
            .map(drop),
        "*:read watches the feed",
    );
    // ... while it still reads the customer's own resources.
    let allowed = s.authorize(&reader, "GET /v1/transactions/tx_1", "").await;
    assert_eq!(allowed.decision(), pb::Decision::Allow);

    for scope in ["*:update", "*:write"] {
        let (_, updater) = s.org_key("org_a", &[scope]).await;
        denied(
            admin
                .revoke_key(as_key(
                    &updater,
                    pb::RevokeKeyRequest {
                        key_id: victim.key_id.clone(),
                        ..Default::default()
                    },
                ))
                .await
                .map(drop),
            &format!("{scope} revokes a key"),
        );
    }
    // Nor can such a key hand out api_key scopes it seems to cover.
    let (_, creator) = s.org_key("org_a", &["api_key:create", "*:read"]).await;
    let err = admin
        .create_key(as_key(
            &creator,
            pb::CreateKeyRequest {
                name: "reader".into(),
                scopes: vec!["api_key:read".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("api_key:read"), "{}", err.message());
    assert_eq!(
        s.authorize(&victim_token, "POST /v1/checkouts", "")
            .await
            .decision(),
        pb::Decision::Allow,
        "the victim key still works"
    );

    // api_key:* and *:* do reach them.
    for scope in ["api_key:*", "*:*"] {
        let (_, holder) = s.org_key("org_a", &[scope]).await;
        admin
            .list_keys(as_key(&holder, pb::ListKeysRequest::default()))
            .await
            .unwrap_or_else(|e| panic!("{scope}: {}", e.message()));
    }
}

on_both_backends!(
    restricted_callers_cannot_exceed_themselves,
    a_restricted_key_cannot_mint_an_unrestricted_one,
    wildcards_do_not_grant_keygates_own_scopes,
);
