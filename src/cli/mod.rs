//! The `keygate` command line. Every flag can also be set through a
//! `KEYGATE_*` environment variable.

mod audit;
mod bootstrap;
mod feed;
mod keys;
mod migrate;
mod orgs;
mod remote;
mod serve;
mod usage;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// The `keygate` command line.
#[derive(Debug, Parser)]
#[command(
    name = "keygate",
    version,
    about = "API-key authorization over gRPC",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Authorizer and KeyAdmin gRPC APIs.
    Serve(Box<serve::ServeArgs>),
    /// Write the first key (SYSTEM tier, scope *:*) straight into the store and print its token once.
    Bootstrap(bootstrap::BootstrapArgs),
    /// Print revocation feed events as they happen (token from KEYGATE_TOKEN, needs revocation:read).
    Watch(feed::WatchArgs),
    /// Show every replica's applied event sequence and lag (token from KEYGATE_TOKEN).
    Replicas(feed::ReplicasArgs),
    /// Check the tamper-evident audit trail, reading the store directly.
    Audit(audit::AuditArgs),
    /// Apply the database migrations and exit.
    Migrate(migrate::MigrateArgs),
    /// Manage keys on a running server (token from KEYGATE_TOKEN).
    Keys(keys::KeysArgs),
    /// Organizations' shared rate limits on a running server (a SYSTEM key's token in KEYGATE_TOKEN).
    Orgs(orgs::OrgsArgs),
}

/// Where the keys live.
#[derive(Clone, Args)]
pub struct StoreArgs {
    /// sqlite://PATH (created when missing) or postgres://…; falls back to
    /// DATABASE_URL, then to sqlite://keygate.db.
    #[arg(long, env = "KEYGATE_DATABASE_URL")]
    database_url: Option<String>,
}

impl std::fmt::Debug for StoreArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        let url = self.database_url.as_deref().map(crate::store::sql_redact);
        f.debug_struct("StoreArgs")
            .field("database_url", &url)
            .finish()
    }
}

impl StoreArgs {
    /// The store URL: the flag, else DATABASE_URL, else `sqlite://keygate.db`.
    pub fn url(&self) -> String {
        self.database_url
            .clone()
            .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| "sqlite://keygate.db".to_owned())
    }
}

/// The port `serve` listens on by default, and so the one the client
/// commands reach when no --server is given.
pub const DEFAULT_PORT: u16 = 50051;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logs go to stderr; the level comes from RUST_LOG (default info).
pub fn init_logging(format: LogFormat) -> crate::telemetry::TracingGuard {
    crate::telemetry::init_tracing(matches!(format, LogFormat::Json))
}

/// Parses the command line and runs the command; errors are printed to
/// stderr and exit with status 1.
pub async fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args).await,
        Command::Bootstrap(args) => bootstrap::run(args).await,
        Command::Watch(args) => feed::watch(args).await,
        Command::Replicas(args) => feed::replicas(args).await,
        Command::Audit(args) => audit::run(args).await,
        Command::Migrate(args) => migrate::run(args).await,
        Command::Keys(args) => keys::run(args).await,
        Command::Orgs(args) => orgs::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("keygate: {message}");
            ExitCode::FAILURE
        }
    }
}

/// "250ms", "30s", "5m", "2h"; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m or 250ms"))?;
    let millis = match unit {
        "ms" => n,
        "" | "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        _ => return Err(format!("{s:?} has an unknown unit; use ms, s, m, h or d")),
    };
    Ok(std::time::Duration::from_millis(millis))
}

/// `d` as `parse_duration` reads it back: whole seconds as "30s", anything
/// else in milliseconds ("250ms"); for showing a default in `--help`.
pub fn duration_text(d: std::time::Duration) -> String {
    let millis = d.as_millis();
    if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

/// Parses a size: a number of bytes, or one with KiB, MiB or GiB (also KB,
/// MB, GB, meaning the same powers of 1024). Must be more than 0.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 134217728, 512KiB or 128MiB"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1 << 10,
        "MiB" | "MB" | "M" => 1 << 20,
        "GiB" | "GB" | "G" => 1 << 30,
        _ => return Err(format!("{s:?} has an unknown unit; use KiB, MiB or GiB")),
    };
    match n.checked_mul(scale) {
        Some(0) => Err(format!("{s:?} must be more than 0 bytes")),
        Some(bytes) => Ok(bytes),
        None => Err(format!("{s:?} is too large")),
    }
}

/// `bytes` as `parse_bytes` reads it back, in the largest of GiB, MiB and
/// KiB that divides it ("128MiB"), else as a plain number.
pub fn size_text(bytes: u64) -> String {
    for (unit, scale) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= scale && bytes.is_multiple_of(scale) {
            return format!("{}{unit}", bytes / scale);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("128MiB"), Ok(128 * 1024 * 1024));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("2 GiB"), Ok(2 << 30));
        assert!(parse_bytes("0").unwrap_err().contains("more than 0"));
        assert!(
            parse_bytes("12parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_bytes("MiB").is_err());
    }

    #[test]
    fn sizes_print_as_they_parse() {
        for bytes in [
            1,
            1000,
            1024,
            65536,
            3 << 20,
            128 << 20,
            5 << 30,
            (1 << 30) + 1,
        ] {
            assert_eq!(parse_bytes(&size_text(bytes)), Ok(bytes), "{bytes}");
        }
        assert_eq!(size_text(128 << 20), "128MiB");
        assert_eq!(size_text(65536), "64KiB");
    }

    #[test]
    fn durations_print_as_they_parse() {
        use std::time::Duration;
        for millis in [0, 1, 100, 999, 1000, 1500, 60_000, 3_600_000] {
            let d = Duration::from_millis(millis);
            assert_eq!(parse_duration(&duration_text(d)), Ok(d), "{millis}ms");
        }
        assert_eq!(duration_text(Duration::from_secs(60)), "60s");
        assert_eq!(duration_text(Duration::from_millis(100)), "100ms");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("30").unwrap().as_secs(), 30);
        assert_eq!(parse_duration("5m").unwrap().as_secs(), 300);
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// Every setting can come from a KEYGATE_* variable. The exception is
    /// what one `keygate keys …` or `keygate orgs …` call acts on (a name, a
    /// scope, a key id, a limit):
    /// a stray variable must not change what such a command does, so only
    /// its connection settings (--server, the TLS files) read the environment.
    #[test]
    fn every_setting_has_an_environment_variable() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            let per_call = path.starts_with("keygate keys ") || path.starts_with("keygate orgs ");
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") || arg.is_positional() {
                    continue;
                }
                let connection = ["server", "ca_cert", "client_cert", "client_key"];
                if per_call && !connection.contains(&id) {
                    continue;
                }
                match arg.get_env() {
                    Some(var) if var.to_string_lossy().starts_with("KEYGATE_") => {}
                    _ => missing.push(format!("{path} --{}", arg.get_long().unwrap_or(id))),
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        let cli = <Cli as clap::CommandFactory>::command();
        for sub in cli.get_subcommands() {
            walk(sub, "keygate", &mut missing);
        }
        assert!(missing.is_empty(), "flags without KEYGATE_*: {missing:?}");
    }
}
