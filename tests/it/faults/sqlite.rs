//! The SQLite file cannot be written while keygate runs: its disk fills up,
//! or its file system turns read-only. Admin writes must fail with a clear
//! error, and Authorize (and Watch) go on from the file.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

use super::ledger::Ledger;
use super::load::{Call, Load, ORG, Outcome, Report, Target};
use super::{
    RATE_LIMIT, all_succeeding, assert_bounded_waits, assert_never_wrong, assert_recovered,
    make_keys, ms, print_figures, within,
};
use keygate_proto::v1 as pb;

use crate::binary::{bootstrap, free_port, wait_serving};
use crate::harness::{Backend, KeyAdminClient, TestServer, as_key};

/// What an admin write gets while the store cannot write.
fn refused(s: &super::load::Sample, why: &str) -> bool {
    matches!(&s.outcome, Outcome::Failed(Code::FailedPrecondition, m)
        if m == &format!("key store cannot write: {why}"))
}

/// The checks both faults share: while the file could not be written, admin
/// writes were refused with `why` (every one, or when `some` only those that
/// did not fit), every Authorize was answered from the file (cached,
/// uncached and revoked keys alike), and nothing else went wrong.
fn assert_reads_go_on(report: &Report, from: Instant, to: Instant, why: &str, some: bool) {
    let writes = report.calls(|s| s.call.is_admin() && within(s, from, to));
    assert!(!writes.is_empty());
    for s in &writes {
        let ok = refused(s, why) || (some && s.outcome == Outcome::Done);
        assert!(ok, "an admin write while the file cannot be written: {s:?}");
    }
    let reads = report.calls(|s| !s.call.is_admin() && within(s, from, to));
    assert!(
        reads.iter().any(|s| s.call.is_uncached()),
        "no uncached key was read"
    );
    for s in &reads {
        let right = match s.call {
            Call::Revoked => matches!(s.outcome, Outcome::Deny(_)),
            _ => s.outcome == Outcome::Allow,
        };
        assert!(
            right,
            "an Authorize while the file cannot be written: {s:?}"
        );
    }
    let others = Report {
        samples: report
            .samples
            .iter()
            .filter(|s| !refused(s, why))
            .cloned()
            .collect(),
        subscribers: Vec::new(),
        created: Vec::new(),
    };
    assert_never_wrong(&others);
    assert_bounded_waits(report);
}

/// Marks files immutable (`chattr +i`): what writing to a file system that
/// was remounted read-only looks like to SQLite (EPERM/EROFS on write).
/// Cleared on drop, so the temp dir can go.
struct Immutable(Vec<PathBuf>);

impl Immutable {
    /// `None` when this machine cannot (not root, no CAP_LINUX_IMMUTABLE, or
    /// a file system without the flag).
    fn set(files: &[PathBuf]) -> Option<Self> {
        let ok = Command::new("chattr")
            .arg("+i")
            .args(files)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let guard = Self(files.to_vec());
        ok.then_some(guard)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").args(&self.0).status();
    }
}

/// The database file and its write-ahead log become unwritable under load
/// (the shared-memory index stays writable: SQLite maps it, and a mapped
/// file that cannot be written is a SIGBUS, not an error), then writable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_turns_read_only_under_load() {
    let s = TestServer::start_with(Backend::Sqlite, |settings| {
        settings.default_rate_limit =
            keygate_core::limits::Allowance::PerMinute(RATE_LIMIT.try_into().unwrap());
    })
    .await
    .unwrap();
    let file = PathBuf::from(s.database_url.strip_prefix("sqlite://").unwrap());
    let files = [
        file.clone(),
        PathBuf::from(format!("{}-wal", file.display())),
    ];
    let probe = file.with_file_name("probe");
    std::fs::write(&probe, b"").unwrap();
    let Some(probe) = Immutable::set(&[probe]) else {
        eprintln!("skipped: chattr +i is not permitted here (needs CAP_LINUX_IMMUTABLE)");
        return;
    };
    drop(probe);
    let target = Target {
        url: s.url(),
        admin_url: s.url(),
        admin_token: s.admin_token.clone(),
    };
    let keys = make_keys(&target, 4, 100).await;
    let after = Ledger::read(&s.database_url).await.head();
    let load = Load::start(&target, &keys, 3, after).await;
    all_succeeding(
        &load,
        load.started,
        Duration::from_secs(10),
        "the load to run",
    )
    .await;

    let guard = Immutable::set(&files).expect("chattr +i");
    let frozen = Instant::now();
    tokio::time::sleep_until(frozen + Duration::from_secs(2)).await;
    drop(guard);
    let thawed = Instant::now();
    let recovered = all_succeeding(&load, thawed, Duration::from_secs(20), "writes again").await;
    tokio::time::sleep_until(recovered + Duration::from_secs(1)).await;

    let (ledger, report) = load.conclude(&s.database_url).await;
    assert!(s.is_serving());
    print_figures(
        "sqlite read-only",
        &report,
        &format!(
            "recovered {} ms after the file was writable again",
            ms(recovered - thawed)
        ),
    );
    assert_reads_go_on(
        &report,
        frozen,
        thawed,
        "its file is read-only or cannot be written",
        false,
    );
    assert_recovered(&report, recovered);
    ledger.assert_whole();
    ledger.assert_nothing_lost(&report);
    ledger.assert_watched(&report.subscribers, after);
}

/// `keygate serve` on a SQLite file in a small tmpfs of its own (a user and
/// mount namespace: no privileges needed), whose disk the test can fill.
/// SQLite resolves symbolic links, so the test cannot open the file through
/// /proc/PID/root: once keygate has stopped, the shell that ran it copies
/// the database out.
struct OnTmpfs {
    child: Child,
    port: u16,
    /// The tmpfs as the test sees it: through the process's root.
    mount: PathBuf,
    seed: tempfile::TempDir,
    _mount: tempfile::TempDir,
}

impl OnTmpfs {
    /// `None` when user namespaces are not available here.
    async fn start() -> Option<(Self, String)> {
        let allowed = Command::new("unshare")
            .args(["-rm", "true"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !allowed {
            eprintln!("skipped: unshare -rm (user and mount namespaces) is not permitted here");
            return None;
        }
        let seed = tempfile::tempdir().unwrap();
        let token = bootstrap(seed.path(), |c| c);
        std::fs::write(seed.path().join("policy.toml"), crate::harness::POLICY).unwrap();
        std::fs::create_dir(seed.path().join("after")).unwrap();
        let mount = tempfile::tempdir().unwrap();
        let port = free_port();
        let script = r#"mount -t tmpfs -o size=64m keygate-test "$1" && cp "$2"/keygate.db* "$1"/ || exit 1
            "$3" serve --listen "127.0.0.1:$4" --database-url "sqlite://$1/keygate.db" \
              --policy "$2/policy.toml" --default-rate-limit "$5" --feed-heartbeat 500ms \
              --feed-poll-interval 200ms --replica-heartbeat 500ms &
            echo $! > "$2/keygate.pid"
            wait $!
            cp "$1"/keygate.db* "$2/after/""#;
        let child = Command::new("unshare")
            .args(["-rm", "sh", "-c", script, "sh"])
            .arg(mount.path())
            .arg(seed.path())
            .arg(env!("CARGO_BIN_EXE_keygate"))
            .arg(port.to_string())
            .arg(RATE_LIMIT.to_string())
            .env_remove("DATABASE_URL")
            .env_remove("KEYGATE_DATABASE_URL")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_serving(port).await;
        let seen = PathBuf::from(format!("/proc/{}/root", child.id())).join(
            mount
                .path()
                .strip_prefix("/")
                .expect("temp dirs are absolute"),
        );
        Some((
            Self {
                child,
                port,
                mount: seen,
                seed,
                _mount: mount,
            },
            token,
        ))
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The log's head, as keygate reports it.
    async fn head(&self, admin_token: &str) -> i64 {
        let mut feed = pb::revocation_feed_client::RevocationFeedClient::connect(self.url())
            .await
            .unwrap();
        feed.list_replicas(as_key(admin_token, pb::ListReplicasRequest {}))
            .await
            .unwrap()
            .into_inner()
            .head_sequence
    }

    /// Writes a file until the tmpfs has no space left; returns its path and
    /// size in MiB.
    fn fill(&self) -> (PathBuf, usize) {
        use std::io::Write;
        let path = self.mount.join("filler");
        let mut filler = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 1 << 20];
        let mut mib = 0;
        loop {
            match filler.write_all(&chunk) {
                Ok(()) => mib += 1,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // Fill what a whole chunk could not.
        while filler.write_all(&[0u8; 512]).is_ok() {}
        (path, mib)
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Stops keygate (SIGTERM: it writes its pending usage and exits) and
    /// returns the URL of the copy of its database.
    fn stop(&mut self) -> String {
        let pid = std::fs::read_to_string(self.seed.path().join("keygate.pid")).unwrap();
        let killed = Command::new("kill")
            .args(["-TERM", pid.trim()])
            .status()
            .unwrap();
        assert!(killed.success());
        assert!(
            self.child.wait().unwrap().success(),
            "keygate stopped cleanly"
        );
        format!(
            "sqlite://{}",
            self.seed.path().join("after").join("keygate.db").display()
        )
    }
}

impl Drop for OnTmpfs {
    fn drop(&mut self) {
        // The tmpfs goes with the namespace's last process.
        if let Ok(pid) = std::fs::read_to_string(self.seed.path().join("keygate.pid")) {
            let _ = Command::new("kill")
                .args(["-KILL", pid.trim()])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The disk under the SQLite file fills up under load, then has room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_disk_full_under_load() {
    let Some((mut server, admin_token)) = OnTmpfs::start().await else {
        return;
    };
    let target = Target {
        url: server.url(),
        admin_url: server.url(),
        admin_token: admin_token.clone(),
    };
    let keys = make_keys(&target, 4, 100).await;
    let after = server.head(&admin_token).await;
    let mut load = Load::start(&target, &keys, 3, after).await;
    all_succeeding(
        &load,
        load.started,
        Duration::from_secs(10),
        "the load to run",
    )
    .await;

    let (filler, filled) = server.fill();
    let full = Instant::now();
    // SQLite goes on writing into the space its write-ahead log already
    // has; writes fail once the log must grow. Write until one does.
    let mut admin = KeyAdminClient::connect(server.url()).await.unwrap();
    let mut burst: Vec<(String, Result<String, tonic::Status>)> = Vec::new();
    while !burst.iter().any(|(_, r)| r.is_err()) {
        assert!(
            full.elapsed() < Duration::from_secs(15),
            "no write failed on a full disk"
        );
        let name = format!("burst-{}", burst.len());
        let req = pb::CreateKeyRequest {
            name: name.clone(),
            organization_id: ORG.into(),
            mode: pb::Mode::Live as i32,
            scopes: vec!["checkout:create".into()],
            ..Default::default()
        };
        let made = admin.create_key(as_key(&admin_token, req)).await;
        burst.push((name, made.map(|r| r.into_inner().key.unwrap().key_id)));
    }
    let first_refused = Instant::now();
    // Long enough for the load to meet the full disk too.
    tokio::time::sleep_until(first_refused + Duration::from_secs(1)).await;
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let recovered = all_succeeding(&load, freed, Duration::from_secs(20), "writes again").await;
    tokio::time::sleep_until(recovered + Duration::from_secs(1)).await;

    load.stop().await;
    assert!(server.is_running(), "keygate is still running");
    let head = server.head(&admin_token).await;
    let report = load.finish(head).await;
    let ledger = Ledger::read(&server.stop()).await;
    assert_eq!(ledger.head(), head);
    print_figures(
        "sqlite disk full",
        &report,
        &format!(
            "{filled} MiB filled the tmpfs; {} more creates fit in the log's space, the first refused \
             {} ms after; recovered {} ms after space was freed",
            burst.len() - 1,
            ms(first_refused - full),
            ms(recovered - freed)
        ),
    );
    assert_reads_go_on(&report, full, freed, "the disk is full", true);
    assert!(
        report
            .calls(|s| s.call.is_admin() && within(s, first_refused, freed))
            .iter()
            .any(|s| refused(s, "the disk is full")),
        "the load met the full disk"
    );
    // The burst: what was acknowledged is stored, what was refused is not.
    for (name, made) in &burst {
        match made {
            Ok(key_id) => assert_eq!(&ledger.keys[key_id].name, name),
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert_eq!(status.message(), "key store cannot write: the disk is full");
                assert!(
                    !ledger.keys.values().any(|k| &k.name == name),
                    "{name} half applied"
                );
            }
        }
    }
    assert_recovered(&report, recovered);
    ledger.assert_whole();
    ledger.assert_nothing_lost(&report);
    ledger.assert_watched(&report.subscribers, after);
}
