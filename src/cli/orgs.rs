//! `keygate orgs …`: organizations' settings on a running server over gRPC
//! (a SYSTEM key's token in KEYGATE_TOKEN).

use clap::{Args, Subcommand};
use keygate_proto::v1 as pb;
use serde_json::json;

use super::remote::{RemoteArgs, client, status_error};

#[derive(Debug, Args)]
pub struct OrgsArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// Print JSON instead of text.
    #[arg(long, global = true, env = "KEYGATE_JSON")]
    json: bool,
    #[command(subcommand)]
    command: OrgsCommand,
}

#[derive(Debug, Subcommand)]
enum OrgsCommand {
    /// The rate limit shared by every key of an organization.
    Limits {
        #[command(subcommand)]
        command: LimitsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum LimitsCommand {
    /// Show an organization's shared rate limit.
    Get { organization_id: String },
    /// Set an organization's shared rate limit (0 clears it).
    Set {
        organization_id: String,
        /// Requests per minute for all the organization's keys together.
        #[arg(long)]
        rate_limit: u32,
    },
}

fn show(limits: &pb::OrganizationLimits, as_json: bool) {
    let updated_at = limits
        .updated_at
        .as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    if as_json {
        println!(
            "{}",
            json!({
                "organization_id": limits.organization_id,
                "rate_limit_per_minute": limits.rate_limit_per_minute,
                "updated_at": updated_at,
                "updated_by": limits.updated_by,
            })
        );
        return;
    }
    let limit = match limits.rate_limit_per_minute {
        0 => "none".to_owned(),
        n => format!("{n}/min"),
    };
    let changed = match updated_at {
        Some(at) => format!(" (set {at} by {})", limits.updated_by),
        None => String::new(),
    };
    println!("{}: rate limit {limit}{changed}", limits.organization_id);
}

pub async fn run(args: OrgsArgs) -> Result<(), String> {
    let mut admin = client(&args.remote).await?.admin();
    let OrgsCommand::Limits { command } = args.command;
    let limits = match command {
        LimitsCommand::Get { organization_id } => admin
            .get_organization_limits(pb::GetOrganizationLimitsRequest { organization_id })
            .await
            .map_err(status_error)?,
        LimitsCommand::Set {
            organization_id,
            rate_limit,
        } => admin
            .set_organization_limits(pb::SetOrganizationLimitsRequest {
                organization_id,
                rate_limit_per_minute: rate_limit,
            })
            .await
            .map_err(status_error)?,
    };
    show(&limits.into_inner(), args.json);
    Ok(())
}
