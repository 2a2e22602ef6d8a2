//! Printing an outcome, and BENCHMARKS.md from every scenario's JSON.

use std::fmt::Write as _;
use std::path::Path;

use crate::outcome::{Outcome, Table, Target};

/// The outcome on stdout, as the Markdown tables the report uses.
pub fn print(o: &Outcome) {
    println!("{}", scenario_markdown(o, None));
}

fn table_markdown(t: &Table) -> String {
    let mut s = format!("**{}**\n\n| {} |\n|", t.title, t.header.join(" | "));
    for (i, _) in t.header.iter().enumerate() {
        s.push_str(if i == 0 { "---|" } else { "---:|" });
    }
    s.push('\n');
    for row in &t.rows {
        let _ = writeln!(s, "| {} |", row.join(" | "));
    }
    s
}

fn met(t: &Target) -> &'static str {
    if t.unresolved {
        return "**unresolved** (noise)";
    }
    match t.met {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "measured (no target)",
    }
}

fn targets_markdown(targets: &[Target]) -> String {
    let mut s = String::from("| target | wanted | measured | |\n|---|---|---|---|\n");
    for t in targets {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            t.what,
            t.target,
            t.measured,
            met(t)
        );
    }
    s
}

fn scenario_markdown(o: &Outcome, charts: Option<&str>) -> String {
    let mut s = format!("## {}. {}\n\n{}\n\n", o.number, title(&o.name), o.method);
    s.push_str(&targets_markdown(&o.targets));
    s.push('\n');
    for t in &o.tables {
        s.push_str(&table_markdown(t));
        s.push('\n');
    }
    if let Some(dir) = charts {
        for c in &o.charts {
            let _ = writeln!(s, "![{}]({dir}/{})\n", c.title, c.file);
        }
    }
    for n in &o.notes {
        let _ = writeln!(s, "- {n}");
    }
    if !o.notes.is_empty() {
        s.push('\n');
    }
    s
}

fn title(name: &str) -> &'static str {
    match name {
        "limit" => "Limit: cached Authorize against an empty call",
        "cold" => "Cold path: every Authorize a cache miss",
        "flood" => "Garbage flood",
        "revocation" => "Revocation propagation",
        "envoy" => "Envoy",
        "scale" => "Scale",
        "admin" => "Admin writes",
        "shared" => "Shared rate limits: limits on Redis against local limits",
        "cost" => "Cost in instructions, under callgrind",
        "analytics" => "Usage analytics: Authorize with and without them",
        _ => "Scenario",
    }
}

/// A command's first line of output, or "unknown".
pub fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("unknown")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|| "not found".to_owned())
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or("?".to_owned(), |kb| {
            format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0)
        });
    format!("{model}, {cores} cores, {mem} memory")
}

/// Every `*.json` outcome under `results`, in scenario order.
fn outcomes(results: &Path) -> Result<Vec<Outcome>, String> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(results).map_err(|e| format!("{}: {e}", results.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let o: Outcome =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            out.push(o);
        }
    }
    out.sort_by_key(|o| o.number);
    Ok(out)
}

/// Writes `out` (Markdown) and the charts under `charts` from `results`.
pub async fn write(results: &Path, out: &Path, charts: &Path, note: &str) -> Result<(), String> {
    let all = outcomes(results)?;
    std::fs::create_dir_all(charts).map_err(|e| format!("{}: {e}", charts.display()))?;
    for o in &all {
        for c in &o.charts {
            crate::chart::draw(c, &charts.join(&c.file))?;
        }
    }
    let rel = relative(out, charts);
    let commit = first_line("git", &["rev-parse", "--short=12", "HEAD"]);
    // first_line says "unknown" when git printed nothing: a clean tree.
    let status = first_line("git", &["status", "--porcelain", "--untracked-files=no"]);
    let dirty = status != "unknown" && status != "not found";
    let postgres = postgres_version().await;
    let envoy = crate::scenario::envoy::envoy_bin()
        .map(|b| envoy_version(&b.display().to_string()))
        .unwrap_or_else(|_| "not found".to_owned());
    let mut s = String::from(
        "# keygate benchmarks\n\n\
         Generated by `scripts/bench` (keygate-bench, `crates/keygate-bench`); do not edit by \
         hand. Every target is a ratio or a bound measured within one run on one machine, the \
         compared cases alternating, so it holds on a noisy machine; absolute figures are only \
         this machine's.\n\n",
    );
    let quick = all.iter().any(|o| o.quick);
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(
        s,
        "| date | {} |",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    let _ = writeln!(
        s,
        "| commit | {commit}{} |",
        if dirty { " (with local changes)" } else { "" }
    );
    let _ = writeln!(s, "| machine | {} |", machine());
    let _ = writeln!(s, "| kernel | {} |", first_line("uname", &["-sr"]));
    let _ = writeln!(s, "| rustc | {} |", first_line("rustc", &["-V"]));
    let _ = writeln!(s, "| PostgreSQL | {postgres} |");
    let _ = writeln!(s, "| Envoy | {envoy} |");
    let _ = writeln!(s, "| wrk | {} |", first_line("wrk", &["-v"]));
    let _ = writeln!(
        s,
        "| mode | {} |",
        if quick {
            "quick (a few seconds per case: not figures to quote)"
        } else {
            "full"
        }
    );
    if !note.is_empty() {
        let _ = writeln!(s, "| note | {note} |");
    }
    s.push_str(
        "\n## Summary\n\n| scenario | target | wanted | measured | |\n|---|---|---|---|---|\n",
    );
    for o in &all {
        for t in &o.targets {
            let _ = writeln!(
                s,
                "| {}. {} | {} | {} | {} | {} |",
                o.number,
                o.name,
                t.what,
                t.target,
                t.measured,
                met(t)
            );
        }
    }
    for n in 1..=9u8 {
        if !all.iter().any(|o| o.number == n) {
            let _ = writeln!(
                s,
                "| {n}. | no result: the scenario failed or was not run | | | **not measured** |"
            );
        }
    }
    s.push('\n');
    // The fixes and the misses' causes, kept by hand beside the results
    // (docs/bench/fixes.md for the committed run; quick runs have none).
    if let Some(fixes) = results
        .parent()
        .and_then(|dir| std::fs::read_to_string(dir.join("fixes.md")).ok())
    {
        let body = fixes
            .lines()
            .skip_while(|l| l.starts_with("<!--"))
            .collect::<Vec<_>>()
            .join("\n");
        let _ = writeln!(s, "## Fixes: before and after\n\n{}\n", body.trim());
    }
    for o in &all {
        s.push_str(&scenario_markdown(o, Some(&rel)));
    }
    std::fs::write(out, s).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("wrote {} and charts in {}", out.display(), charts.display());
    Ok(())
}

/// "1.39.3/Clean/RELEASE/BoringSSL (6eb0d2d…)" from `envoy --version`.
pub fn envoy_version(bin: &str) -> String {
    let line = first_line(bin, &["--version"]);
    let Some((_, v)) = line.split_once("version: ") else {
        return line;
    };
    match v.split_once('/') {
        Some((commit, rest)) => format!("{rest} ({})", &commit[..commit.len().min(12)]),
        None => v.to_owned(),
    }
}

/// `charts` relative to the directory `out` is in (both under the repo).
fn relative(out: &Path, charts: &Path) -> String {
    let base = out.parent().unwrap_or(Path::new(""));
    charts
        .strip_prefix(base)
        .unwrap_or(charts)
        .display()
        .to_string()
}

async fn postgres_version() -> String {
    use sqlx::Connection;
    let Ok(mut conn) = sqlx::PgConnection::connect(&crate::server::postgres_server()).await else {
        return "not reachable".to_owned();
    };
    sqlx::query_scalar::<_, String>("SHOW server_version")
        .fetch_one(&mut conn)
        .await
        .unwrap_or_else(|_| "unknown".to_owned())
}
