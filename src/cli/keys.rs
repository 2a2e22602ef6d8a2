//! `keygate keys …`: manage keys on a running server over gRPC.
//!
//! The caller's token comes from KEYGATE_TOKEN. Output is a table (the
//! columns of the seeds' key lists) or, with `--json`, one JSON document.

use clap::{Args, Subcommand};
use keygate_proto::v1 as pb;
use serde_json::{Value, json};

use super::parse_duration;
use super::remote::{RemoteArgs, client, status_error};

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// Print JSON instead of a table.
    #[arg(long, global = true, env = "KEYGATE_JSON")]
    json: bool,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Live,
    Test,
}

impl ModeArg {
    fn pb(self) -> pb::Mode {
        match self {
            ModeArg::Live => pb::Mode::Live,
            ModeArg::Test => pb::Mode::Test,
        }
    }
}

/// How long to wait for every live replica to confirm a change.
#[derive(Debug, Args)]
struct WaitArgs {
    /// Return only once every live replica applied the change.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits (default 5s).
    #[arg(long, value_parser = parse_duration)]
    wait_timeout: Option<std::time::Duration>,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key and print its token once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        organization_id: Option<String>,
        /// A scope such as checkout:create (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[arg(long, value_enum, default_value = "test")]
        mode: ModeArg,
        /// A SYSTEM key (no organization, acts on all of them).
        #[arg(long)]
        system: bool,
        /// A CIDR or address the key may be used from (repeatable).
        #[arg(long = "allow-cidr")]
        allowed_cidrs: Vec<String>,
        /// Requests per minute (0: the server default).
        #[arg(long, default_value_t = 0)]
        rate_limit: u32,
        /// Never count the key against a rate limit (needs a SYSTEM key).
        #[arg(long)]
        unlimited: bool,
        /// RFC 3339 time after which the key stops working.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// List keys (every page).
    List {
        #[arg(long)]
        organization_id: Option<String>,
        #[arg(long)]
        include_revoked: bool,
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
    },
    /// Show one key.
    Get { key_id: String },
    /// Change a key's name, scopes, allow-list, rate limit, unlimited flag or expiry.
    Update {
        key_id: String,
        #[arg(long)]
        name: Option<String>,
        /// Replaces the scopes (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Replaces the allow-list (repeatable).
        #[arg(long = "allow-cidr")]
        allowed_cidrs: Vec<String>,
        /// Removes the allow-list.
        #[arg(long, conflicts_with = "allowed_cidrs")]
        no_allow_list: bool,
        #[arg(long)]
        rate_limit: Option<u32>,
        /// Never count the key against a rate limit (needs a SYSTEM key);
        /// --unlimited=false counts it again.
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
        unlimited: Option<bool>,
        #[arg(long)]
        expires_at: Option<String>,
        /// Removes the expiry.
        #[arg(long, conflicts_with = "expires_at")]
        no_expiry: bool,
    },
    /// New secret, same key id; prints the new token once.
    Rotate {
        key_id: String,
        /// How long the old secret keeps working (e.g. 1h; at most 7 days).
        #[arg(long, value_parser = parse_duration)]
        grace: Option<std::time::Duration>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Revoke for good.
    Revoke {
        key_id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Deactivate (reversible).
    Disable {
        key_id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Reactivate a disabled key.
    Enable { key_id: String },
    /// Remove for good (its events stay).
    Delete {
        key_id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Calls per minute or hour, allowed and denied by reason, with a bar
    /// per row (only buckets with calls; counts arrive with each replica's
    /// usage flush).
    Usage {
        key_id: String,
        /// How far back to look (e.g. 90m, 24h, 7d).
        #[arg(long, value_parser = parse_duration, default_value = "24h")]
        since: std::time::Duration,
        /// Bucket width.
        #[arg(long, value_enum, default_value = "minute")]
        by: super::usage::ByArg,
    },
    /// The audit trail, newest first.
    Events {
        #[arg(long)]
        organization_id: Option<String>,
        #[arg(long)]
        key_id: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

fn timestamp(rfc3339: &str, flag: &str) -> Result<prost_types::Timestamp, String> {
    let t = chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map_err(|e| format!("{flag} {rfc3339:?}: {e}"))?;
    Ok(prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    })
}

fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| "-".into())
}

fn key_json(k: &pb::ApiKey) -> Value {
    json!({
        "key_id": k.key_id,
        "name": k.name,
        "organization_id": k.organization_id,
        "tier": k.tier().as_str_name(),
        "mode": k.mode().as_str_name(),
        "prefix": k.prefix,
        "masked_key": k.masked_key,
        "scopes": k.scopes,
        "allowed_cidrs": k.allowed_cidrs,
        "rate_limit_per_minute": k.rate_limit_per_minute,
        "unlimited": k.unlimited,
        "status": k.status().as_str_name(),
        "created_at": time(k.created_at.as_ref()),
        "last_used_at": time(k.last_used_at.as_ref()),
        "expires_at": time(k.expires_at.as_ref()),
        "revoked_at": time(k.revoked_at.as_ref()),
        "revoked_reason": k.revoked_reason,
        "rotated_at": time(k.rotated_at.as_ref()),
        "created_by": k.created_by,
        "previous_secret_expires_at": time(k.previous_secret_expires_at.as_ref()),
        "previous_secret_last_used_at": time(k.previous_secret_last_used_at.as_ref()),
        "previous_secret_uses": k.previous_secret_uses,
    })
}

/// `unlimited`, `50/min`, or `default` (the server's, which may be off).
fn rate_limit(k: &pb::ApiKey) -> String {
    match (k.unlimited, k.rate_limit_per_minute) {
        (true, _) => "unlimited".into(),
        (false, 0) => "default".into(),
        (false, n) => format!("{n}/min"),
    }
}

fn key_table(keys: &[pb::ApiKey]) -> String {
    let rows: Vec<[String; 9]> = keys
        .iter()
        .map(|k| {
            [
                k.name.clone(),
                k.key_id.clone(),
                k.prefix.clone(),
                k.mode().as_str_name().to_lowercase(),
                k.scopes.join(","),
                rate_limit(k),
                time(k.last_used_at.as_ref()),
                time(k.created_at.as_ref()),
                k.status().as_str_name().to_lowercase(),
            ]
        })
        .collect();
    table(
        [
            "NAME",
            "KEY ID",
            "PREFIX",
            "MODE",
            "SCOPES",
            "RATE LIMIT",
            "LAST USED",
            "CREATED",
            "STATUS",
        ],
        &rows,
    )
}

pub(super) fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(header.to_vec())];
    out.extend(
        rows.iter()
            .map(|r| line(r.iter().map(String::as_str).collect())),
    );
    out.join("\n")
}

fn print_token(token: &str) {
    eprintln!("This is the only time the token is shown. Store it now, in a secret manager:");
    println!("{token}");
}

pub async fn run(args: KeysArgs) -> Result<(), String> {
    let mut admin = client(&args.remote).await?.admin();
    let json = args.json;
    let show_key = |k: &pb::ApiKey| {
        if json {
            println!("{}", key_json(k));
        } else {
            println!("{}", key_table(std::slice::from_ref(k)));
        }
    };
    let wait = |w: &WaitArgs| (w.wait, w.wait_timeout.map(duration));
    match args.command {
        KeysCommand::Create {
            name,
            organization_id,
            scopes,
            mode,
            system,
            allowed_cidrs,
            rate_limit,
            unlimited,
            expires_at,
        } => {
            let req = pb::CreateKeyRequest {
                name,
                organization_id: organization_id.unwrap_or_default(),
                tier: if system {
                    pb::KeyTier::System
                } else {
                    pb::KeyTier::Organization
                }
                .into(),
                mode: mode.pb().into(),
                scopes,
                allowed_cidrs,
                rate_limit_per_minute: rate_limit,
                expires_at: expires_at
                    .map(|t| timestamp(&t, "--expires-at"))
                    .transpose()?,
                unlimited,
            };
            let resp = admin
                .create_key(req)
                .await
                .map_err(status_error)?
                .into_inner();
            let key = resp.key.unwrap_or_default();
            if json {
                println!("{}", json!({ "key": key_json(&key), "token": resp.token }));
                eprintln!(
                    "This is the only time the token is shown. Store it now, in a secret manager."
                );
            } else {
                eprintln!("{}", key_table(std::slice::from_ref(&key)));
                print_token(&resp.token);
            }
        }
        KeysCommand::List {
            organization_id,
            include_revoked,
            mode,
        } => {
            let mut keys = Vec::new();
            let mut page_token = String::new();
            loop {
                let req = pb::ListKeysRequest {
                    organization_id: organization_id.clone().unwrap_or_default(),
                    include_revoked,
                    mode: mode.map_or(pb::Mode::Unspecified, ModeArg::pb).into(),
                    page_size: 1000,
                    page_token,
                };
                let page = admin
                    .list_keys(req)
                    .await
                    .map_err(status_error)?
                    .into_inner();
                keys.extend(page.keys);
                page_token = page.next_page_token;
                if page_token.is_empty() {
                    break;
                }
            }
            if json {
                println!("{}", Value::Array(keys.iter().map(key_json).collect()));
            } else {
                println!("{}", key_table(&keys));
            }
        }
        KeysCommand::Get { key_id } => {
            let key = admin
                .get_key(pb::GetKeyRequest { key_id })
                .await
                .map_err(status_error)?;
            show_key(&key.into_inner());
        }
        KeysCommand::Update {
            key_id,
            name,
            scopes,
            allowed_cidrs,
            no_allow_list,
            rate_limit,
            unlimited,
            expires_at,
            no_expiry,
        } => {
            let mut paths = Vec::new();
            let mut req = pb::UpdateKeyRequest {
                key_id,
                ..Default::default()
            };
            if let Some(name) = name {
                req.name = name;
                paths.push("name");
            }
            if !scopes.is_empty() {
                req.scopes = scopes;
                paths.push("scopes");
            }
            if !allowed_cidrs.is_empty() || no_allow_list {
                req.allowed_cidrs = allowed_cidrs;
                paths.push("allowed_cidrs");
            }
            if let Some(limit) = rate_limit {
                req.rate_limit_per_minute = limit;
                paths.push("rate_limit_per_minute");
            }
            if let Some(unlimited) = unlimited {
                req.unlimited = unlimited;
                paths.push("unlimited");
            }
            if let Some(at) = expires_at {
                req.expires_at = Some(timestamp(&at, "--expires-at")?);
                paths.push("expires_at");
            } else if no_expiry {
                paths.push("expires_at");
            }
            req.update_mask = Some(prost_types::FieldMask {
                paths: paths.into_iter().map(String::from).collect(),
            });
            let key = admin.update_key(req).await.map_err(status_error)?;
            show_key(&key.into_inner());
        }
        KeysCommand::Rotate {
            key_id,
            grace,
            wait: w,
        } => {
            let (wait_for_replicas, replica_wait_timeout) = wait(&w);
            let req = pb::RotateKeyRequest {
                key_id,
                grace_period: grace.map(duration),
                wait_for_replicas,
                replica_wait_timeout,
            };
            let resp = admin
                .rotate_key(req)
                .await
                .map_err(status_error)?
                .into_inner();
            let key = resp.key.unwrap_or_default();
            if json {
                println!(
                    "{}",
                    json!({ "key": key_json(&key), "token": resp.token, "confirmed_replicas": resp.confirmed_replicas })
                );
                eprintln!(
                    "This is the only time the token is shown. Store it now, in a secret manager."
                );
            } else {
                eprintln!("{}", key_table(std::slice::from_ref(&key)));
                eprintln!(
                    "previous secret works until {}",
                    time(resp.previous_secret_expires_at.as_ref())
                );
                print_token(&resp.token);
            }
        }
        KeysCommand::Revoke {
            key_id,
            reason,
            wait: w,
        } => {
            let (wait_for_replicas, replica_wait_timeout) = wait(&w);
            let req = pb::RevokeKeyRequest {
                key_id,
                reason,
                wait_for_replicas,
                replica_wait_timeout,
            };
            let resp = admin
                .revoke_key(req)
                .await
                .map_err(status_error)?
                .into_inner();
            show_key(&resp.key.unwrap_or_default());
        }
        KeysCommand::Disable { key_id, wait: w } => {
            let (wait_for_replicas, replica_wait_timeout) = wait(&w);
            let req = pb::DisableKeyRequest {
                key_id,
                wait_for_replicas,
                replica_wait_timeout,
            };
            let resp = admin
                .disable_key(req)
                .await
                .map_err(status_error)?
                .into_inner();
            show_key(&resp.key.unwrap_or_default());
        }
        KeysCommand::Enable { key_id } => {
            let key = admin
                .enable_key(pb::EnableKeyRequest { key_id })
                .await
                .map_err(status_error)?;
            show_key(&key.into_inner());
        }
        KeysCommand::Delete { key_id, wait: w } => {
            let (wait_for_replicas, replica_wait_timeout) = wait(&w);
            let req = pb::DeleteKeyRequest {
                key_id: key_id.clone(),
                wait_for_replicas,
                replica_wait_timeout,
            };
            admin.delete_key(req).await.map_err(status_error)?;
            if json {
                println!("{}", json!({ "deleted": key_id }));
            } else {
                println!("deleted {key_id}");
            }
        }
        KeysCommand::Usage { key_id, since, by } => {
            let req = super::usage::request(key_id, since, by)?;
            let usage = admin.get_key_usage(req).await.map_err(status_error)?;
            super::usage::print(&usage.into_inner(), json);
        }
        KeysCommand::Events {
            organization_id,
            key_id,
            limit,
        } => {
            let req = pb::ListKeyEventsRequest {
                organization_id: organization_id.unwrap_or_default(),
                key_id: key_id.unwrap_or_default(),
                page_size: limit,
                page_token: String::new(),
            };
            let events = admin
                .list_key_events(req)
                .await
                .map_err(status_error)?
                .into_inner()
                .events;
            if json {
                let list: Vec<Value> = events
                    .iter()
                    .map(|e| {
                        json!({
                            "sequence": e.sequence, "kind": e.kind().as_str_name(), "key_id": e.key_id,
                            "organization_id": e.organization_id, "actor": e.actor,
                            "at": time(e.at.as_ref()), "reason": e.reason,
                            "details": e.details,
                        })
                    })
                    .collect();
                println!("{}", Value::Array(list));
            } else {
                let rows: Vec<[String; 7]> = events
                    .iter()
                    .map(|e| {
                        [
                            e.sequence.to_string(),
                            time(e.at.as_ref()),
                            e.kind().as_str_name().to_lowercase(),
                            e.key_id.clone(),
                            e.actor.clone(),
                            e.reason.clone(),
                            e.details.clone(),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(
                        ["SEQ", "AT", "EVENT", "KEY ID", "ACTOR", "REASON", "DETAILS"],
                        &rows
                    )
                );
            }
        }
    }
    Ok(())
}
