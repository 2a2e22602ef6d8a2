//! A PostgreSQL server of the test's own, on an ephemeral loopback port, that
//! the test may stop and start: the shared server is never touched.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::binary::free_port;

pub struct Cluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
    /// PostgreSQL refuses to run as root: then it runs as `postgres`.
    run_as: Option<&'static str>,
}

impl Cluster {
    /// initdb and start a fresh server; `None` (the test skips) when
    /// PostgreSQL's binaries are not installed, unless KEYGATE_REQUIRE_POSTGRES=1.
    pub fn start() -> Option<Self> {
        let Some(bin) = bin_dir() else {
            assert!(
                std::env::var("KEYGATE_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "KEYGATE_REQUIRE_POSTGRES=1 but initdb/pg_ctl are not installed"
            );
            eprintln!("skipped: initdb/pg_ctl not installed");
            return None;
        };
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let cluster = Self {
            bin,
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            run_as: is_root.then_some("postgres"),
        };
        if cluster.run_as.is_some() {
            let chown = Command::new("chown")
                .arg("postgres:")
                .arg(cluster.dir.path())
                .status()
                .unwrap();
            assert!(chown.success(), "chown the cluster directory to postgres");
        }
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D",
                path(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        cluster.up();
        Some(cluster)
    }

    /// The URL of `database` on this server.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates `database` and returns its URL.
    pub async fn create_database(&self, database: &str) -> String {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&mut admin)
            .await
            .unwrap();
        self.url(database)
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn up(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("postgres.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                path(&self.data()),
                "-o",
                &options,
                "-l",
                path(&log),
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server the way an operator's fast shutdown does: every
    /// connection is terminated, then the port closes.
    pub fn down(&self) {
        self.run(
            "pg_ctl",
            &["-D", path(&self.data()), "-m", "fast", "-w", "stop"],
        );
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let mut cmd = match self.run_as {
            Some(user) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", user, "--"]).arg(&program);
                cmd
            }
            None => Command::new(&program),
        };
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let program = self.bin.join("pg_ctl");
        let data = self.data();
        let args = ["-D", path(&data), "-m", "immediate", "-w", "stop"];
        let _ = match self.run_as {
            Some(user) => Command::new("runuser")
                .args(["-u", user, "--"])
                .arg(&program)
                .args(args)
                .output(),
            None => Command::new(&program).args(args).output(),
        };
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Where initdb and pg_ctl live: `pg_config --bindir`, else the newest
/// /usr/lib/postgresql/*/bin.
fn bin_dir() -> Option<PathBuf> {
    let from_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let newest_installed = || {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .collect();
        dirs.sort();
        dirs.pop()
    };
    from_config
        .into_iter()
        .chain(newest_installed())
        .find(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists())
}
