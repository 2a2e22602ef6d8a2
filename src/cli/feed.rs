//! `keygate watch` and `keygate replicas`: the revocation feed for operators.

use clap::Args;
use keygate_proto::v1::revocation_event::Kind;
use keygate_proto::v1::{ListReplicasRequest, WatchRequest};

use super::remote::{RemoteArgs, client, status_error};

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// Replay every event after this sequence first (0: only new events).
    #[arg(long, env = "KEYGATE_WATCH_AFTER", default_value_t = 0)]
    after: i64,
    /// Also print heartbeats.
    #[arg(long, env = "KEYGATE_WATCH_HEARTBEATS")]
    heartbeats: bool,
}

#[derive(Debug, Args)]
pub struct ReplicasArgs {
    #[command(flatten)]
    remote: RemoteArgs,
}

fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| "-".into())
}

/// Prints events as they come, one line each, until the server ends the stream.
pub async fn watch(args: WatchArgs) -> Result<(), String> {
    let mut feed = client(&args.remote).await?.feed();
    let request = WatchRequest {
        after_sequence: args.after,
    };
    let mut stream = feed
        .watch(request)
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(event) = stream.message().await.map_err(status_error)? {
        if event.kind() == Kind::Heartbeat && !args.heartbeats {
            continue;
        }
        let org = if event.organization_id.is_empty() {
            "-"
        } else {
            &event.organization_id
        };
        let key = if event.key_id.is_empty() {
            "-"
        } else {
            &event.key_id
        };
        println!(
            "{:>8}  {:<14}  key={key}  org={org}  at={}",
            event.sequence,
            event.kind().as_str_name(),
            time(event.at.as_ref())
        );
    }
    Ok(())
}

/// Prints every replica's applied sequence and lag.
pub async fn replicas(args: ReplicasArgs) -> Result<(), String> {
    let mut feed = client(&args.remote).await?.feed();
    let resp = feed
        .list_replicas(ListReplicasRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    println!("head sequence: {}", resp.head_sequence);
    println!(
        "{:<36}  {:<24}  {:>8}  {:>6}  {:<5}  HEARTBEAT",
        "REPLICA", "NAME", "APPLIED", "LAG", "LIVE"
    );
    for r in resp.replicas {
        println!(
            "{:<36}  {:<24}  {:>8}  {:>6}  {:<5}  {}",
            r.replica_id,
            r.name,
            r.applied_sequence,
            r.lag,
            if r.live { "yes" } else { "no" },
            time(r.heartbeat_at.as_ref())
        );
    }
    Ok(())
}
