//! PNG line charts with plotters. Text is drawn with a TrueType font read at
//! run time (DejaVu Sans from Debian's fonts-dejavu-core, or
//! `KEYGATE_BENCH_FONT`), so no fontconfig is needed.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::outcome::Chart;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers the font once; an error names where it looked.
pub(crate) fn font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let paths: Vec<String> = std::env::var("KEYGATE_BENCH_FONT")
                .ok()
                .into_iter()
                .chain(FONT_PATHS.iter().map(|p| (*p).to_owned()))
                .collect();
            let bytes = paths
                .iter()
                .find_map(|p| std::fs::read(p).ok())
                .ok_or_else(|| {
                    format!(
                        "no TrueType font at {} (apt-get install fonts-dejavu-core)",
                        paths.join(", ")
                    )
                })?;
            // Registered fonts live for the program: leaking the one copy is the point.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| "font does not load".to_owned())
        })
        .clone()
}

/// Draws `chart` to `path` (800×500 PNG).
pub fn draw(chart: &Chart, path: &Path) -> Result<(), String> {
    font()?;
    // A run that measured nothing (0) has no place on a log scale.
    let keep = |&(x, y): &(f64, f64)| !chart.log || (x > 0.0 && y > 0.0);
    let points = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().filter(|p| keep(p)));
    let (mut x_max, mut y_max, mut x_min, mut y_min) = (0f64, 0f64, f64::MAX, f64::MAX);
    for &(x, y) in points {
        x_max = x_max.max(x);
        x_min = x_min.min(x);
        y_max = y_max.max(y);
        y_min = y_min.min(y);
    }
    if x_min == f64::MAX {
        return Err(format!("{}: no points", chart.file));
    }
    let y_max = (y_max * 1.1).max(1e-3);
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| format!("{}: {e}", chart.file);
    root.fill(&WHITE).map_err(e)?;
    let colors = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    macro_rules! body {
        ($cc:expr) => {{
            let mut cc = $cc;
            cc.configure_mesh()
                .x_desc(chart.x_label.as_str())
                .y_desc(chart.y_label.as_str())
                .draw()
                .map_err(e)?;
            for (i, s) in chart.series.iter().enumerate() {
                let color = colors[i % colors.len()];
                cc.draw_series(LineSeries::new(
                    s.points.iter().copied().filter(|p| keep(p)),
                    color,
                ))
                .map_err(e)?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
                cc.draw_series(
                    s.points
                        .iter()
                        .copied()
                        .filter(|p| keep(p))
                        .map(|p| Circle::new(p, 3, color.filled())),
                )
                .map_err(e)?;
            }
            cc.configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(e)?;
        }};
    }
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(chart.title.as_str(), ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60);
    if chart.log {
        let (x_lo, y_lo) = (x_min.max(1e-9) / 1.5, y_min.max(1e-6) / 1.5);
        body!(
            builder
                .build_cartesian_2d(
                    (x_lo..x_max * 1.5).log_scale(),
                    (y_lo..y_max * 1.5).log_scale()
                )
                .map_err(e)?
        );
    } else {
        body!(
            builder
                .build_cartesian_2d(0f64..x_max * 1.05, 0f64..y_max)
                .map_err(e)?
        );
    }
    root.present().map_err(e)?;
    Ok(())
}
