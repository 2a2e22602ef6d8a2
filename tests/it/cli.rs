//! `keygate keys …` against a running server, as an operator uses it.

use keygate_proto::v1 as pb;
use serde_json::Value;

use crate::harness::{Backend, TestServer};

/// `keygate keys ARGS` as the bootstrap admin: (success, stdout, stderr).
pub async fn keys(s: &TestServer, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("keys")
        .args(["--server", &s.url()])
        .args(args)
        .env("KEYGATE_TOKEN", &s.admin_token)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_cli_manages_a_key_from_creation_to_deletion() {
    let s = TestServer::start(Backend::Sqlite).await.unwrap();
    let (ok, out, err) = keys(
        &s,
        &[
            "--json",
            "create",
            "--name",
            "checkout backend",
            "--organization-id",
            "org_1",
            "--scope",
            "checkout:create",
            "--mode",
            "live",
            "--allow-cidr",
            "10.0.0.0/8",
            "--rate-limit",
            "50",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(err.contains("only time the token is shown"), "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let key_id = created["key"]["key_id"].as_str().unwrap().to_owned();
    assert!(token.starts_with("kg_live_"));
    assert_eq!(created["key"]["rate_limit_per_minute"], 50);
    let r = s.authorize(&token, "POST /v1/checkouts", "10.1.2.3").await;
    assert_eq!(r.decision(), pb::Decision::Allow);

    // A readable table with the key list's columns; no secret in it.
    let (ok, table, _) = keys(&s, &["list"]).await;
    assert!(ok);
    let header = table.lines().next().unwrap();
    for column in [
        "NAME",
        "PREFIX",
        "MODE",
        "SCOPES",
        "LAST USED",
        "CREATED",
        "STATUS",
    ] {
        assert!(header.contains(column), "{header}");
    }
    assert!(table.contains("checkout backend") && table.contains(&token[..30]));
    assert!(!table.contains(&token[30..]), "no secret in the list");

    let (ok, out, _) = keys(
        &s,
        &[
            "update",
            &key_id,
            "--rate-limit",
            "7",
            "--scope",
            "checkout:create",
            "--scope",
            "links:read",
        ],
    )
    .await;
    assert!(ok);
    assert!(out.contains("checkout:create,links:read"), "{out}");
    let (ok, out, err) = keys(&s, &["rotate", &key_id, "--grace", "1h"]).await;
    assert!(ok, "{err}");
    let new_token = out.trim();
    assert!(new_token.starts_with("kg_live_") && new_token != token);
    assert!(err.contains("previous secret works until"), "{err}");
    let (ok, out, _) = keys(&s, &["--json", "revoke", &key_id, "--reason", "leaked"]).await;
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["status"],
        "REVOKED"
    );
    let (ok, out, _) = keys(&s, &["events", "--key-id", &key_id]).await;
    assert!(ok);
    let kinds: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(kinds, ["revoked", "rotated", "updated", "created"], "{out}");
    let (ok, _, _) = keys(&s, &["delete", &key_id]).await;
    assert!(ok);

    // Errors: the code and the message, and a non-zero exit.
    let (ok, _, err) = keys(&s, &["get", &key_id]).await;
    assert!(
        !ok && err.contains("NotFound") && err.contains("key not found"),
        "{err}"
    );
    let (ok, _, err) = keys(
        &s,
        &[
            "create",
            "--name",
            "x",
            "--scope",
            "links:view",
            "--organization-id",
            "org_1",
        ],
    )
    .await;
    assert!(
        !ok && err.contains("InvalidArgument") && err.contains("links:view"),
        "{err}"
    );
}

/// Connection flags are global: `keygate keys create … --server …` works as
/// well as `keygate keys --server … create …`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flags_work_after_the_subcommand() {
    let s = TestServer::start(Backend::Sqlite).await.unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args([
            "keys",
            "create",
            "--name",
            "late flag",
            "--server",
            &s.url(),
        ])
        .args(["--organization-id", "org_1", "--json"])
        .env("KEYGATE_TOKEN", &s.admin_token)
        .env_remove("KEYGATE_SERVER")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["key"]["name"], "late flag");
}
