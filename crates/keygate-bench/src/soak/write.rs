//! The soak's files: the samples and the revocations as CSV, and a PNG of
//! RSS and p99 over time (plotters, the same font as the bench's charts).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;

use super::sample::Sample;
use super::workload::Revocation;

fn opt(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| format!("{v:.3}"))
}

/// One row per sample and replica.
pub fn csv(path: &Path, samples: &[Sample]) -> Result<(), String> {
    let mut out = String::from(
        "t_s,replica,rss_mib,fds,pg_connections,cache_entries,\
         cached_calls,cached_p50_ms,cached_p99_ms,uncached_calls,uncached_p99_ms,\
         admin_calls,admin_p99_ms,store_get_p99_ms,store_write_p99_ms,\
         expected_denials,errors,store_errors\n",
    );
    for s in samples {
        for r in &s.replicas {
            let l = r.load.as_ref();
            let calls = |f: fn(&super::IntervalLoad) -> &crate::load::Stats| {
                l.map_or(String::new(), |l| f(l).calls().to_string())
            };
            let q = |f: fn(&super::IntervalLoad) -> &crate::load::Stats, q: f64| {
                opt(l.filter(|l| f(l).calls() > 0).map(|l| f(l).ms(q)))
            };
            let _ = writeln!(
                out,
                "{:.1},{},{:.2},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                s.t,
                r.name,
                r.rss_bytes as f64 / 1_048_576.0,
                r.fds,
                r.connections,
                r.cache_entries,
                calls(|l| &l.cached),
                q(|l| &l.cached, 0.5),
                q(|l| &l.cached, 0.99),
                calls(|l| &l.uncached),
                q(|l| &l.uncached, 0.99),
                calls(|l| &l.admin),
                q(|l| &l.admin, 0.99),
                opt(r.store_get_p99_ms),
                opt(r.store_write_p99_ms),
                l.map_or(String::new(), |l| l.expected_denials.to_string()),
                l.map_or(String::new(), |l| {
                    (l.cached.errors + l.uncached.errors + l.admin.errors).to_string()
                }),
                r.store_errors,
            );
        }
    }
    std::fs::write(path, out).map_err(|e| format!("{}: {e}", path.display()))
}

/// One row per revocation.
pub fn revocations_csv(path: &Path, revs: &[Revocation]) -> Result<(), String> {
    let mut out = String::from(
        "t_s,revoked_on,denied_there_at_once,other_replica_denied_ms,all_watchers_ms,watchers_missing,problem\n",
    );
    for r in revs {
        let _ = writeln!(
            out,
            "{:.3},{},{},{},{},{},{}",
            r.t,
            r.revoker,
            r.local_denied,
            opt(r.other_ms),
            opt(r.watch_ms),
            r.watch_missing,
            r.problem.as_deref().unwrap_or("").replace([',', '\n'], ";"),
        );
    }
    std::fs::write(path, out).map_err(|e| format!("{}: {e}", path.display()))
}

type Line = (String, RGBColor, Vec<(f64, f64)>);

/// Two panels over minutes: RSS per replica, and p99 per replica and kind
/// (log scale: cached calls take well under a millisecond, writes several).
pub fn chart(path: &Path, samples: &[Sample], duration: Duration) -> Result<(), String> {
    crate::chart::font()?;
    let minutes = duration.as_secs_f64() / 60.0;
    // Per replica: cached, uncached, admin (dark to light).
    let colors = [
        [
            RGBColor(0, 60, 160),
            RGBColor(40, 140, 230),
            RGBColor(120, 190, 120),
        ],
        [
            RGBColor(170, 20, 20),
            RGBColor(240, 110, 40),
            RGBColor(180, 120, 200),
        ],
    ];
    let mut rss: Vec<Line> = Vec::new();
    let mut p99: Vec<Line> = Vec::new();
    let names: Vec<&str> = samples
        .first()
        .map(|s| s.replicas.iter().map(|r| r.name).collect())
        .unwrap_or_default();
    for (i, name) in names.iter().enumerate() {
        let [color, light, lighter] = colors[i % colors.len()];
        let series = |f: &dyn Fn(&super::sample::ReplicaSample) -> Option<f64>| -> Vec<(f64, f64)> {
            samples
                .iter()
                .filter_map(|s| Some((s.t / 60.0, f(s.replicas.get(i)?)?)))
                .collect()
        };
        rss.push((
            format!("replica {name}"),
            color,
            series(&|r| Some(r.rss_bytes as f64 / 1_048_576.0)),
        ));
        let p = |f: fn(&super::IntervalLoad) -> &crate::load::Stats| {
            move |r: &super::sample::ReplicaSample| {
                r.load
                    .as_ref()
                    .filter(|l| f(l).calls() > 0)
                    .map(|l| f(l).ms(0.99).max(0.01))
            }
        };
        p99.push((
            format!("{name}: cached Authorize"),
            color,
            series(&p(|l| &l.cached)),
        ));
        p99.push((
            format!("{name}: uncached Authorize"),
            light,
            series(&p(|l| &l.uncached)),
        ));
        p99.push((
            format!("{name}: admin write"),
            lighter,
            series(&p(|l| &l.admin)),
        ));
    }

    let root = BitMapBackend::new(path, (900, 700)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| format!("{}: {e}", path.display());
    root.fill(&WHITE).map_err(e)?;
    let (top, bottom) = root.split_vertically(300);

    let rss_max = rss
        .iter()
        .flat_map(|l| l.2.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.2;
    let mut cc = ChartBuilder::on(&top)
        .caption("Soak: resident memory per replica", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..minutes.max(0.1), 0f64..rss_max)
        .map_err(e)?;
    cc.configure_mesh()
        .x_desc("minutes")
        .y_desc("RSS MiB")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(e)?;
    let warmup = minutes * super::WARMUP_SHARE;
    cc.draw_series(std::iter::once(Rectangle::new(
        [(0.0, 0.0), (warmup, rss_max)],
        BLACK.mix(0.08).filled(),
    )))
    .map_err(e)?
    .label("warm-up")
    .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], BLACK.mix(0.08).filled()));
    draw_lines(&mut cc, &rss).map_err(e)?;

    let (lo, hi) = p99
        .iter()
        .flat_map(|l| l.2.iter().map(|p| p.1))
        .fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo > hi {
        (0.01, 1.0)
    } else {
        (lo / 2.0, hi * 3.0)
    };
    let mut cc = ChartBuilder::on(&bottom)
        .caption("p99 per 10 s interval (client side)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..minutes.max(0.1), (lo..hi).log_scale())
        .map_err(e)?;
    cc.draw_series(std::iter::once(Rectangle::new(
        [(0.0, lo), (warmup, hi)],
        BLACK.mix(0.08).filled(),
    )))
    .map_err(e)?;
    cc.configure_mesh()
        .x_desc("minutes")
        .y_desc("p99 ms (log)")
        .y_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
        .draw()
        .map_err(e)?;
    draw_lines(&mut cc, &p99).map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

fn draw_lines<'a, DB, X, Y>(
    cc: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    lines: &[Line],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (name, color, points) in lines {
        let color = *color;
        cc.draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(2),
        ))?
        .label(name.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    cc.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}
