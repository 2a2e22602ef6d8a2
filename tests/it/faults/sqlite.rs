//! The SQLite file cannot be written while keygate runs: its file system
//! turns read-only. Admin writes must fail, and never be acknowledged and
//! then lost, and Authorize (and Watch) go on from the file.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

use super::ledger::Ledger;
use super::load::{Call, Load, Outcome, Report, Target};
use super::{
    RATE_LIMIT, all_succeeding, assert_bounded_waits, assert_never_wrong, assert_recovered,
    make_keys, ms, print_figures, within,
};
use crate::harness::{Backend, TestServer};

/// What an admin write gets while the store cannot write.
fn refused(s: &super::load::Sample) -> bool {
    matches!(&s.outcome, Outcome::Failed(Code::Unavailable, m) if m == "key store unavailable")
}

/// While the file could not be written, every admin write was refused,
/// every Authorize was answered from the file (cached, uncached and revoked
/// keys alike), and nothing else went wrong.
fn assert_reads_go_on(report: &Report, from: Instant, to: Instant) {
    let writes = report.calls(|s| s.call.is_admin() && within(s, from, to));
    assert!(!writes.is_empty());
    for s in &writes {
        assert!(
            refused(s),
            "an admin write while the file cannot be written: {s:?}"
        );
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
            .filter(|s| !refused(s))
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
        settings.default_rate_limit = RATE_LIMIT.try_into().unwrap();
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
    let mut load = Load::start(&target, &keys, 3, after).await;
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

    load.stop().await;
    assert!(s.is_serving());
    let ledger = Ledger::read(&s.database_url).await;
    let report = load.finish(ledger.head()).await;
    print_figures(
        "sqlite read-only",
        &report,
        &format!(
            "recovered {} ms after the file was writable again",
            ms(recovered - thawed)
        ),
    );
    assert_reads_go_on(&report, frozen, thawed);
    assert_recovered(&report, recovered);
    ledger.assert_whole();
    ledger.assert_nothing_lost(&report);
    ledger.assert_watched(&report.subscribers, after);
}
