//! What a scenario found: tables, targets met or not, chart data. Each
//! scenario run writes one JSON file; `report` turns them into BENCHMARKS.md.

use serde::{Deserialize, Serialize};

use crate::load::Stats;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// The scenario's number (1–7 from issue 13, 8 from issue 14).
    pub number: u8,
    pub name: String,
    /// How the scenario was run, for the reader.
    pub method: String,
    pub quick: bool,
    pub tables: Vec<Table>,
    pub targets: Vec<Target>,
    pub charts: Vec<Chart>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, header: &[&str]) -> Self {
        Self {
            title: title.to_owned(),
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The usual latency table's header.
    pub fn latency(title: &str) -> Self {
        Self::new(
            title,
            &[
                "case",
                "calls/s",
                "p50 µs",
                "p90 µs",
                "p99 µs",
                "p99.9 µs",
                "calls",
                "errors",
            ],
        )
    }

    /// A row of [`Table::latency`].
    pub fn stats(&mut self, case: &str, s: &Stats) {
        let mut case = case.to_owned();
        if let Some(rate) = s.offered {
            case.push_str(&format!(" @ {} /s", thousands(rate)));
        }
        if s.overloaded {
            case.push_str(" (overloaded: stopped)");
        }
        self.row(vec![
            case,
            thousands(s.rps()),
            format!("{:.0}", s.us(0.5)),
            format!("{:.0}", s.us(0.9)),
            format!("{:.0}", s.us(0.99)),
            format!("{:.0}", s.us(0.999)),
            s.calls().to_string(),
            s.errors.to_string(),
        ]);
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub what: String,
    pub target: String,
    pub measured: String,
    /// `None`: nothing to meet (measured only), or not measurable in this run.
    pub met: Option<bool>,
    /// The run's own noise is wider than the target: the figure can show
    /// neither a hit nor a miss, whatever side of the bound it falls on.
    #[serde(default)]
    pub unresolved: bool,
}

impl Target {
    pub fn new(what: &str, target: &str, measured: String, met: Option<bool>) -> Self {
        Self {
            what: what.to_owned(),
            target: target.to_owned(),
            measured,
            met,
            unresolved: false,
        }
    }

    /// A target this run could not decide either way (noise, a starved run):
    /// neither met nor missed.
    pub fn unresolved(what: &str, target: &str, measured: String) -> Self {
        Self {
            unresolved: true,
            ..Self::new(what, target, measured, None)
        }
    }

    /// `measured` ≥ `floor` × 1, shown as a ratio.
    pub fn ratio_at_least(what: &str, ratio: f64, floor: f64) -> Self {
        Self::new(
            what,
            &format!("≥ {floor:.2}"),
            format!("{ratio:.3}"),
            Some(ratio >= floor),
        )
    }

    /// `ratio` ≤ `ceiling`.
    pub fn ratio_at_most(what: &str, ratio: f64, ceiling: f64) -> Self {
        Self::new(
            what,
            &format!("≤ {ceiling:.2}"),
            format!("{ratio:.3}"),
            Some(ratio <= ceiling),
        )
    }

    /// A latency quantile of an open-loop run in ms ≤ `ceiling_ms`; not met
    /// when the run was overloaded or answered nothing (its quantiles then
    /// describe no steady load, and an empty histogram reads as 0 ms).
    pub fn latency_at_most(what: &str, run: &Stats, q: f64, ceiling_ms: f64) -> Self {
        if run.overloaded || run.calls() == 0 {
            return Self::new(
                what,
                &format!("≤ {ceiling_ms} ms"),
                format!(
                    "not measured: the run was overloaded ({} calls answered)",
                    run.calls()
                ),
                Some(false),
            );
        }
        Self::ms_at_most(what, run.ms(q), ceiling_ms)
    }

    /// A difference of two times in ms ≤ `ceiling_ms`, unresolved when the
    /// same case's own spread from round to round (`noise_ms`) exceeds the
    /// bound: then which side of it the difference falls on is chance.
    pub fn ms_at_most_beyond_noise(what: &str, ms: f64, ceiling_ms: f64, noise_ms: f64) -> Self {
        if noise_ms <= ceiling_ms {
            return Self::ms_at_most(what, ms, ceiling_ms);
        }
        Self::unresolved(
            what,
            &format!("≤ {ceiling_ms} ms"),
            format!("{ms:.3} ms, within {noise_ms:.3} ms of noise"),
        )
    }

    /// A time in ms ≤ `ceiling_ms`.
    pub fn ms_at_most(what: &str, ms: f64, ceiling_ms: f64) -> Self {
        Self::new(
            what,
            &format!("≤ {ceiling_ms} ms"),
            format!("{ms:.3} ms"),
            Some(ms <= ceiling_ms),
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Chart {
    /// File name under the charts directory, e.g. `limit-latency.png`.
    pub file: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Both axes logarithmic.
    pub log: bool,
    pub series: Vec<Series>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// 12345.6 → "12,346".
pub fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1234567.0), "1,234,567");
        assert_eq!(thousands(-4321.0), "-4,321");
    }

    #[test]
    fn a_difference_inside_its_noise_is_neither_met_nor_missed() {
        let inside = Target::ms_at_most_beyond_noise("added p99", -5.3, 0.2, 18.5);
        assert!(inside.unresolved);
        assert_eq!(inside.met, None);
        assert_eq!(inside.measured, "-5.300 ms, within 18.500 ms of noise");

        let beyond = Target::ms_at_most_beyond_noise("added p99", 0.35, 0.2, 0.1);
        assert!(!beyond.unresolved);
        assert_eq!(beyond.met, Some(false));
        let met = Target::ms_at_most_beyond_noise("added p99", 0.15, 0.2, 0.1);
        assert_eq!(met.met, Some(true));
    }
}
