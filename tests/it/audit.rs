//! The audit trail: one event per change with its actor, organization
//! isolation, and a hash chain that `keygate audit verify` checks.

use keygate_proto::v1 as pb;
use keygate_proto::v1::key_event::Kind;
use sqlx::Connection;
use tonic::Code;

use crate::harness::{Backend, TestServer, as_key};
use crate::on_both_backends;

async fn events(
    s: &TestServer,
    token: &str,
    req: pb::ListKeyEventsRequest,
) -> Result<pb::ListKeyEventsResponse, tonic::Status> {
    s.admin()
        .await
        .list_key_events(as_key(token, req))
        .await
        .map(|r| r.into_inner())
}

async fn every_change_leaves_one_event_with_its_actor(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (admin_key, org_admin) = s.org_key("org_a", &["api_key:*", "checkout:create"]).await;
    let mut admin = s.admin().await;
    let t = org_admin.as_str();
    let created = admin
        .create_key(as_key(
            t,
            pb::CreateKeyRequest {
                name: "k".into(),
                scopes: vec!["checkout:create".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    let id = || created.key_id.clone();
    let mask = Some(prost_types::FieldMask {
        paths: vec!["name".into()],
    });
    admin
        .update_key(as_key(
            t,
            pb::UpdateKeyRequest {
                key_id: id(),
                name: "renamed".into(),
                update_mask: mask,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    admin
        .rotate_key(as_key(
            t,
            pb::RotateKeyRequest {
                key_id: id(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    admin
        .disable_key(as_key(
            t,
            pb::DisableKeyRequest {
                key_id: id(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    admin
        .enable_key(as_key(t, pb::EnableKeyRequest { key_id: id() }))
        .await
        .unwrap();
    admin
        .revoke_key(as_key(
            t,
            pb::RevokeKeyRequest {
                key_id: id(),
                reason: "rotated out".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    admin
        .delete_key(as_key(
            t,
            pb::DeleteKeyRequest {
                key_id: id(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();

    let got = events(
        &s,
        t,
        pb::ListKeyEventsRequest {
            key_id: id(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let kinds: Vec<_> = got.events.iter().map(|e| e.kind()).collect();
    assert_eq!(
        kinds,
        vec![
            Kind::Deleted,
            Kind::Revoked,
            Kind::Enabled,
            Kind::Disabled,
            Kind::Rotated,
            Kind::Updated,
            Kind::Created
        ],
        "newest first, one per change, and the deleted key's events remain"
    );
    assert!(
        got.events
            .iter()
            .all(|e| e.actor == admin_key.key_id && e.organization_id == "org_a")
    );
    assert_eq!(got.events[1].reason, "rotated out");
    assert_eq!(got.events[5].reason, "name");
    assert!(got.events.windows(2).all(|w| w[0].sequence > w[1].sequence));

    // Another organization's key sees none of it.
    let (_, org_b) = s.org_key("org_b", &["api_key:read"]).await;
    let theirs = events(&s, &org_b, pb::ListKeyEventsRequest::default())
        .await
        .unwrap();
    assert!(
        theirs.events.iter().all(|e| e.organization_id == "org_b"),
        "{:?}",
        theirs.events
    );
    let by_key = events(
        &s,
        &org_b,
        pb::ListKeyEventsRequest {
            key_id: id(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(by_key.events.is_empty());
    let err = events(
        &s,
        &org_b,
        pb::ListKeyEventsRequest {
            organization_id: "org_a".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Pages, newest first, each event once.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = events(
            &s,
            t,
            pb::ListKeyEventsRequest {
                page_size: 3,
                page_token: token,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        seen.extend(page.events.iter().map(|e| e.sequence));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert!(seen.windows(2).all(|w| w[0] > w[1]));
    assert_eq!(
        seen.len(),
        8,
        "the org admin's creation and the child's 7 changes"
    );
}

fn verify(url: &str) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["audit", "verify", "--database-url", url])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn sql(url: &str, statement: &'static str) {
    assert_eq!(sql_rows(url, statement).await, 1);
}

/// Runs one statement; returns how many rows it changed.
async fn sql_rows(url: &str, statement: &'static str) -> u64 {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    let done = sqlx::query(statement).execute(&mut conn).await.unwrap();
    done.rows_affected()
}

async fn audit_verify_names_an_edited_or_deleted_row(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    for _ in 0..4 {
        s.org_key("org_a", &[]).await;
    }
    let (ok, out) = verify(&s.database_url);
    assert!(ok && out.contains("intact: 5 events"), "{out}");

    sql(
        &s.database_url,
        "UPDATE key_events SET reason = 'nothing to see' WHERE seq = 3",
    )
    .await;
    let (ok, out) = verify(&s.database_url);
    assert!(
        !ok && out.contains("event 3") && out.contains("edited"),
        "{out}"
    );
    sql(
        &s.database_url,
        "UPDATE key_events SET reason = '' WHERE seq = 3",
    )
    .await;
    assert!(
        verify(&s.database_url).0,
        "restoring the row restores the chain"
    );

    sql(&s.database_url, "DELETE FROM key_events WHERE seq = 2").await;
    let (ok, out) = verify(&s.database_url);
    assert!(
        !ok && out.contains("event 2") && out.contains("missing"),
        "{out}"
    );
}

/// Clearing every hash and editing a row is not laundered by a restart,
/// which would rebuild the chain over the edit if it backfilled again.
async fn clearing_the_hashes_does_not_launder_an_edit(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    for _ in 0..3 {
        s.org_key("org_a", &[]).await;
    }
    sql(
        &s.database_url,
        "UPDATE key_events SET reason = 'nothing to see' WHERE seq = 2",
    )
    .await;
    let cleared = sql_rows(&s.database_url, "UPDATE key_events SET hash = NULL").await;
    assert_eq!(cleared, 4);
    // The restart also bootstraps a key: a damaged chain never blocks writes
    // (revocations above all).
    let s = s.restart().await;
    s.org_key("org_a", &[]).await;
    let (ok, out) = verify(&s.database_url);
    assert!(!ok && out.contains("event 1"), "{out}");
}

/// A mistyped SQLite path is an error, not an empty chain reported intact.
#[test]
fn audit_verify_refuses_a_missing_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("typo.db").display());
    let (ok, out) = verify(&url);
    assert!(!ok && !out.contains("intact"), "{out}");
    assert!(
        !dir.path().join("typo.db").exists(),
        "verify created a file"
    );
}

/// CREATED records every setting and UPDATED the changed fields' new
/// values, in ListKeyEvents and `keygate keys events`; never a secret, and
/// the chain still verifies.
async fn events_record_the_settings_they_leave_in_force(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = s
        .create_key(pb::CreateKeyRequest {
            name: "checkout backend".into(),
            organization_id: "org_a".into(),
            scopes: vec!["checkout:create".into(), "links:read".into()],
            mode: pb::Mode::Test as i32,
            allowed_cidrs: vec!["10.0.0.0/8".into()],
            rate_limit_per_minute: 50,
            ..Default::default()
        })
        .await;
    let mut admin = s.admin().await;
    admin
        .update_key(as_key(
            &s.admin_token,
            pb::UpdateKeyRequest {
                key_id: key.key_id.clone(),
                scopes: vec!["links:read".into()],
                rate_limit_per_minute: 7,
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["rate_limit_per_minute".into(), "scopes".into()],
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let rotated = admin
        .rotate_key(as_key(
            &s.admin_token,
            pb::RotateKeyRequest {
                key_id: key.key_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let got = events(
        &s,
        &s.admin_token,
        pb::ListKeyEventsRequest {
            key_id: key.key_id.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .events;
    let kinds: Vec<_> = got.iter().map(|e| e.kind()).collect();
    assert_eq!(kinds, [Kind::Rotated, Kind::Updated, Kind::Created]);
    assert_eq!(
        got[2].details,
        "name=\"checkout backend\" tier=organization mode=test \
         scopes=checkout:create,links:read allowed_cidrs=10.0.0.0/8 \
         rate_limit_per_minute=50 unlimited=false expires_at=never"
    );
    assert_eq!(got[1].reason, "scopes, rate_limit_per_minute");
    assert_eq!(got[1].details, "scopes=links:read rate_limit_per_minute=7");
    assert_eq!(got[0].details, "", "a rotation changes no setting");
    for e in &got {
        assert!(!e.details.contains(&token[30..]) && !e.details.contains(&rotated[30..]));
    }

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args([
            "keys",
            "--server",
            &s.url(),
            "events",
            "--key-id",
            &key.key_id,
        ])
        .env("KEYGATE_TOKEN", &s.admin_token)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.lines().next().unwrap().contains("DETAILS"), "{table}");
    assert!(
        table.contains("scopes=links:read rate_limit_per_minute=7")
            && table.contains("allowed_cidrs=10.0.0.0/8"),
        "{table}"
    );

    let (ok, out) = verify(&s.database_url);
    assert!(ok && out.contains("intact"), "{out}");
    // Details are covered by the chain.
    sql(
        &s.database_url,
        "UPDATE key_events SET details = 'scopes=*:*' WHERE kind = 'updated'",
    )
    .await;
    let (ok, out) = verify(&s.database_url);
    assert!(!ok && out.contains("edited"), "{out}");
}

on_both_backends!(
    events_record_the_settings_they_leave_in_force,
    every_change_leaves_one_event_with_its_actor,
    audit_verify_names_an_edited_or_deleted_row,
    clearing_the_hashes_does_not_launder_an_edit,
);
