//! keygate's benchmark suite (issue 13). Each scenario starts what it
//! measures (keygate as a separate `keygate serve` process, Envoy, wrk),
//! drives it from a Rust load generator over loopback, prints its tables and
//! writes `<out>/<scenario>.json`; `report` turns those into BENCHMARKS.md
//! and PNG charts. Every target is a ratio (or a bound) measured within one
//! run, alternating the compared cases, so it holds on a noisy machine.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod bulk;
mod chart;
mod http1;
mod load;
mod noop;
mod outcome;
mod quiet;
mod report;
mod scenario;
mod server;
mod soak;

#[derive(Debug, Parser)]
#[command(name = "keygate-bench", about = "keygate's benchmark suite")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// 1: grpc.health.v1 Check against cached Authorize: the limit.
    Limit(Opts),
    /// 2: every Authorize a cache miss, on PostgreSQL and SQLite; coalescing.
    Cold(Opts),
    /// 3: random strings, malformed and unknown-key tokens: store queries, throughput.
    Flood(Opts),
    /// 4: RevokeKey until every Watch subscriber and a CachedAuthorizer know.
    Revocation(Opts),
    /// 5: wrk through Envoy: no auth, api_key_auth, ext_authz to a no-op and to keygate.
    Envoy(Opts),
    /// 6: 10k, 100k (and 1M) keys bulk-loaded into PostgreSQL.
    Scale(Opts),
    /// 7: CreateKey and RevokeKey on PostgreSQL, 1 and 8 callers.
    Admin(Opts),
    /// 8 (issue 14): cached Authorize with limits on Redis against local limits.
    Shared(Opts),
    /// 9: the server's instructions per call under callgrind (noise-free ratios).
    Cost(Opts),
    /// 10 (issue 16): cached Authorize with usage analytics against without.
    Analytics(Opts),
    /// Issue 12's soak: two replicas on PostgreSQL under mixed load, sampled and checked.
    Soak(soak::Opts),
    /// Writes BENCHMARKS.md and the charts from the scenarios' JSON files.
    Report(ReportOpts),
    /// Serves Envoy's Check, always OK, until killed (scenario 5 runs it).
    #[command(hide = true)]
    NoopServer {
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// A file holding the encoded CheckResponse to answer with.
        #[arg(long)]
        answer: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// A few seconds per scenario (for CI: it keeps the suite from rotting;
    /// its figures are not the ones to quote).
    #[arg(long)]
    quick: bool,
    /// Seconds measured per case (default 10, quick 1).
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of warm-up before each measured case (default 2, quick 0.25).
    #[arg(long)]
    warmup: Option<f64>,
    /// HTTP/2 connections of the load generator.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Concurrent streams per connection in closed-loop runs.
    #[arg(long, default_value_t = 32)]
    streams: usize,
    /// Alternating rounds of each compared case (default 3, quick 1).
    #[arg(long)]
    rounds: Option<usize>,
    /// Where the scenario's JSON goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Scale: also 1M keys (the full run's default; off in quick mode).
    #[arg(long)]
    million: Option<bool>,
}

#[derive(Debug, Clone, clap::Args)]
struct ReportOpts {
    /// The scenarios' JSON files.
    #[arg(long, default_value = "target/bench")]
    results: PathBuf,
    /// The Markdown file to write.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Where the PNG charts go (linked from the Markdown relative to it).
    #[arg(long, default_value = "docs/bench")]
    charts: PathBuf,
    /// A line about the machine's state during the run (e.g. "shared").
    #[arg(long, default_value = "")]
    note: String,
}

/// The run's settings, as scenarios see them.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub quick: bool,
    pub phases: load::Phases,
    pub connections: usize,
    pub streams: usize,
    pub rounds: usize,
    pub million: bool,
}

impl Ctx {
    fn from(o: &Opts) -> Self {
        let secs = |v: Option<f64>, full: f64, quick: f64| {
            Duration::from_secs_f64(v.unwrap_or(if o.quick { quick } else { full }).max(0.0))
        };
        Self {
            quick: o.quick,
            phases: load::Phases {
                warmup: secs(o.warmup, 2.0, 0.25),
                measure: secs(o.duration, 10.0, 1.0),
            },
            connections: o.connections.max(1),
            streams: o.streams.max(1),
            rounds: o.rounds.unwrap_or(if o.quick { 1 } else { 3 }).max(1),
            million: o.million.unwrap_or(!o.quick),
        }
    }

    /// Closed-loop callers: every connection's streams.
    pub fn callers(&self) -> usize {
        self.connections * self.streams
    }

    /// `full` in a full run, `quick` in quick mode.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keygate-bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command));
    // Scenario tasks (Watch streams, servers) may still be winding down.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), String> {
    let (opts, outcome) = match command {
        Command::Report(r) => return report::write(&r.results, &r.out, &r.charts, &r.note).await,
        Command::NoopServer { listen, answer } => {
            return noop::serve(listen, answer.as_deref()).await;
        }
        Command::Soak(o) => return soak::run(&o).await,
        Command::Limit(o) => (o.clone(), scenario::limit::run(&Ctx::from(&o)).await?),
        Command::Cold(o) => (o.clone(), scenario::cold::run(&Ctx::from(&o)).await?),
        Command::Flood(o) => (o.clone(), scenario::flood::run(&Ctx::from(&o)).await?),
        Command::Revocation(o) => (o.clone(), scenario::revocation::run(&Ctx::from(&o)).await?),
        Command::Envoy(o) => (o.clone(), scenario::envoy::run(&Ctx::from(&o)).await?),
        Command::Scale(o) => (o.clone(), scenario::scale::run(&Ctx::from(&o)).await?),
        Command::Admin(o) => (o.clone(), scenario::admin::run(&Ctx::from(&o)).await?),
        Command::Shared(o) => (o.clone(), scenario::shared::run(&Ctx::from(&o)).await?),
        Command::Cost(o) => (o.clone(), scenario::cost::run(&Ctx::from(&o)).await?),
        Command::Analytics(o) => (o.clone(), scenario::analytics::run(&Ctx::from(&o)).await?),
    };
    report::print(&outcome);
    std::fs::create_dir_all(&opts.out).map_err(|e| format!("{}: {e}", opts.out.display()))?;
    let path = opts.out.join(format!("{}.json", outcome.name));
    let json = serde_json::to_string_pretty(&outcome).map_err(|e| e.to_string())?;
    std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
