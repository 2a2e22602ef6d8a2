//! `keygate keys usage KEY_ID --since 24h [--by hour]`: a key's calls per
//! bucket, allowed and denied by reason, with a bar per row.

use keygate_proto::v1 as pb;
use serde_json::{Value, json};

/// `--by`: the bucket width.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ByArg {
    Minute,
    Hour,
}

/// Widest bar, in characters.
const BAR: u64 = 40;

/// A bar of `width` characters for `total` calls out of the busiest row's
/// `max`: `█` for allowed calls, `░` for denied ones; at least one
/// character for a row with any calls.
pub fn bar(allowed: u64, denied: u64, max: u64) -> String {
    let total = allowed + denied;
    if total == 0 || max == 0 {
        return String::new();
    }
    let width = (total * BAR).div_ceil(max).clamp(1, BAR);
    let full = (allowed * width).div_ceil(total).min(width);
    format!(
        "{}{}",
        "█".repeat(full as usize),
        "░".repeat((width - full) as usize)
    )
}

fn start(b: &pb::UsageBucket) -> String {
    b.start
        .as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_default()
}

fn denied(b: &pb::UsageBucket) -> u64 {
    b.denied.iter().map(|d| d.calls).sum()
}

fn reasons(b: &pb::UsageBucket) -> String {
    b.denied
        .iter()
        .map(|d| format!("{}={}", d.reason().as_str_name(), d.calls))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The table: one row per bucket with calls.
pub fn table(buckets: &[pb::UsageBucket]) -> String {
    let max = buckets
        .iter()
        .map(|b| b.allowed + denied(b))
        .max()
        .unwrap_or(0);
    let rows: Vec<[String; 5]> = buckets
        .iter()
        .map(|b| {
            [
                start(b),
                b.allowed.to_string(),
                denied(b).to_string(),
                bar(b.allowed, denied(b), max),
                reasons(b),
            ]
        })
        .collect();
    super::keys::table(
        ["START (UTC)", "ALLOW", "DENY", "CALLS", "DENIED BY"],
        &rows,
    )
}

/// The request for the last `since`, by `by`.
pub fn request(
    key_id: String,
    since: std::time::Duration,
    by: ByArg,
) -> Result<pb::GetKeyUsageRequest, String> {
    let end = chrono::Utc::now();
    let since = chrono::Duration::from_std(since).map_err(|e| format!("--since: {e}"))?;
    Ok(pb::GetKeyUsageRequest {
        key_id,
        organization_id: String::new(),
        start: Some(keygate_proto::convert::timestamp(end - since)),
        end: Some(keygate_proto::convert::timestamp(end)),
        granularity: match by {
            ByArg::Minute => pb::UsageGranularity::Minute,
            ByArg::Hour => pb::UsageGranularity::Hour,
        }
        .into(),
    })
}

/// Prints the answer: the table, or JSON.
pub fn print(usage: &pb::GetKeyUsageResponse, json_out: bool) {
    if json_out {
        let list: Vec<Value> = usage
            .buckets
            .iter()
            .map(|b| {
                let denied: serde_json::Map<String, Value> = b
                    .denied
                    .iter()
                    .map(|d| (d.reason().as_str_name().to_owned(), json!(d.calls)))
                    .collect();
                json!({ "start": start(b), "allowed": b.allowed, "denied": denied })
            })
            .collect();
        println!("{}", Value::Array(list));
    } else if usage.buckets.is_empty() {
        println!("no calls in this range");
    } else {
        println!("{}", table(&usage.buckets));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_busiest_row() {
        assert_eq!(bar(5, 3, 8).chars().count(), 40);
        assert_eq!(bar(5, 3, 8).chars().filter(|c| *c == '█').count(), 25);
        assert_eq!(bar(1, 0, 1000).chars().count(), 1);
        assert_eq!(bar(0, 0, 10), "");
        assert_eq!(bar(0, 4, 8), "░".repeat(20));
    }
}
