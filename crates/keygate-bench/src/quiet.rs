//! Throughput ratios over the rounds the host left alone. On a virtual
//! machine the host can steal a share of the machine's time in one run and
//! not the next; a ratio of two runs is then the host's, not the cases'.

use crate::outcome::Target;

/// A round's runs count toward a throughput ratio only where the host stole
/// at most this share of the machine's time in both: beyond it the run
/// measured the host's other guests, not the cases compared (seen here: one
/// way's peak moving by a factor of four between rounds, 0–23 % stolen).
pub const STOLEN_AT_MOST_PERCENT: f64 = 2.0;

/// One case's peak in one round: calls/s, and the share of the machine's
/// time the host stole meanwhile (None where unreadable).
#[derive(Debug, Clone, Copy, Default)]
pub struct Peak {
    pub rps: f64,
    pub stolen: Option<f64>,
}

impl Peak {
    fn quiet(&self) -> bool {
        self.stolen.is_some_and(|s| s <= STOLEN_AT_MOST_PERCENT)
    }
}

/// The first cases' summed peaks ÷ the second's, one pair a round, over the
/// rounds where the host left both alone, with those rounds (numbered from
/// 1); None when no round was.
pub fn ratio(rounds: impl IntoIterator<Item = (Peak, Peak)>) -> Option<(f64, Vec<usize>)> {
    let (mut sa, mut sb, mut used) = (0.0, 0.0, Vec::new());
    for (i, (a, b)) in rounds.into_iter().enumerate() {
        if a.quiet() && b.quiet() {
            sa += a.rps;
            sb += b.rps;
            used.push(i + 1);
        }
    }
    (sb > 0.0).then(|| (sa / sb, used))
}

/// What a throughput ratio over the quiet rounds reads as in the report.
pub fn quiet_measured(q: &Option<(f64, Vec<usize>)>, rounds: usize) -> String {
    match q {
        Some((r, used)) => format!(
            "{r:.3} (round{} {} of {rounds})",
            if used.len() == 1 { "" } else { "s" },
            used.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => format!(
            "no round of {rounds} where the host stole ≤ {STOLEN_AT_MOST_PERCENT} % from both"
        ),
    }
}

/// A throughput target: resolved only from rounds the host left alone.
pub fn quiet_ratio_at_least(
    what: &str,
    q: &Option<(f64, Vec<usize>)>,
    rounds: usize,
    floor: f64,
) -> Target {
    match q {
        Some((r, _)) => Target::new(
            what,
            &format!("≥ {floor:.2}"),
            quiet_measured(q, rounds),
            Some(*r >= floor),
        ),
        None => Target::unresolved(what, &format!("≥ {floor:.2}"), quiet_measured(q, rounds)),
    }
}

/// The worst share stolen in any run, where one was readable.
pub fn most_stolen(peaks: impl IntoIterator<Item = Peak>) -> Option<f64> {
    peaks
        .into_iter()
        .filter_map(|p| p.stolen)
        .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peak(rps: f64, stolen: f64) -> Peak {
        Peak {
            rps,
            stolen: Some(stolen),
        }
    }

    #[test]
    fn only_rounds_quiet_in_both_runs_count() {
        let rounds = [
            (peak(9_000.0, 1.0), peak(10_000.0, 0.0)),
            (peak(8_000.0, 0.0), peak(4_000.0, 23.0)),
            (peak(9_400.0, 0.5), peak(10_000.0, 2.0)),
        ];
        let q = ratio(rounds);
        let (r, used) = q.clone().unwrap();
        assert!((r - 0.92).abs() < 1e-9, "{r}");
        assert_eq!(used, [1, 3]);
        assert_eq!(
            most_stolen(rounds.iter().flat_map(|(a, b)| [*a, *b])),
            Some(23.0)
        );
        assert_eq!(most_stolen([Peak::default()]), None);
    }

    #[test]
    fn no_quiet_round_leaves_the_target_unresolved() {
        let q = ratio([(peak(9_000.0, 0.0), peak(10_000.0, 5.0))]);
        assert!(q.is_none());
        assert_eq!(
            quiet_measured(&q, 1),
            "no round of 1 where the host stole ≤ 2 % from both"
        );
        let t = quiet_ratio_at_least("x", &q, 1, 0.95);
        assert_eq!((t.met, t.unresolved), (None, true));
        // Unreadable steal is not taken for quiet.
        let unreadable = Peak {
            rps: 10_000.0,
            stolen: None,
        };
        assert!(ratio([(peak(9_000.0, 0.0), unreadable)]).is_none());
        assert!(ratio([(peak(9_000.0, 0.0), peak(10_000.0, 0.0))]).is_some());
    }
}
