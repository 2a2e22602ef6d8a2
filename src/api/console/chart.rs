//! A key's usage as a server-rendered SVG bar chart: one bar per bucket of
//! the range, allowed calls below, denied ones stacked on top.

use keygate_core::analytics::{UsageBucket, UsageRange};
use maud::{Markup, html};

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 160.0;
const LEFT: f64 = 40.0;
const BOTTOM: f64 = 20.0;

fn label(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%m-%d %H:%M").to_string()
}

/// The chart of `buckets` (one key's) over `range`; empty buckets draw nothing.
pub fn usage_chart(range: &UsageRange, buckets: &[UsageBucket]) -> Markup {
    let slots = range.len().max(1);
    let max = buckets.iter().map(UsageBucket::total).max().unwrap_or(0);
    let plot_w = WIDTH - LEFT;
    let plot_h = HEIGHT - BOTTOM;
    let slot_w = plot_w / slots as f64;
    let bar_w = (slot_w * 0.8).max(0.5);
    let width_secs = range.granularity.width().num_seconds().max(1);
    let scale = |n: u64| {
        if max == 0 {
            0.0
        } else {
            n as f64 / max as f64 * (plot_h - 4.0)
        }
    };
    html! {
        svg class="chart" viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } role="img"
            aria-label="calls per bucket, allowed and denied" xmlns="http://www.w3.org/2000/svg" {
            line class="axis" x1=(LEFT) y1=(plot_h) x2=(WIDTH) y2=(plot_h) {}
            line class="axis" x1=(LEFT) y1="0" x2=(LEFT) y2=(plot_h) {}
            text class="tick" x=(LEFT - 4.0) y="10" text-anchor="end" { (max) }
            text class="tick" x=(LEFT - 4.0) y=(plot_h) text-anchor="end" { "0" }
            text class="tick" x=(LEFT) y=(HEIGHT - 4.0) { (label(range.start)) }
            text class="tick" x=(WIDTH) y=(HEIGHT - 4.0) text-anchor="end" { (label(range.end)) }
            @for b in buckets {
                @let slot = ((b.start - range.start).num_seconds() / width_secs) as f64;
                @let x = LEFT + slot * slot_w + (slot_w - bar_w) / 2.0;
                @let allowed_h = scale(b.allowed());
                @let denied = b.total() - b.allowed();
                @let denied_h = scale(denied);
                g class="bucket" data-start=(b.start.to_rfc3339()) data-allowed=(b.allowed()) data-denied=(denied) {
                    title { (label(b.start)) ": " (b.allowed()) " allowed, " (denied) " denied" }
                    rect class="allowed" x=(format!("{x:.2}")) y=(format!("{:.2}", plot_h - allowed_h))
                        width=(format!("{bar_w:.2}")) height=(format!("{allowed_h:.2}")) {}
                    rect class="denied" x=(format!("{x:.2}")) y=(format!("{:.2}", plot_h - allowed_h - denied_h))
                        width=(format!("{bar_w:.2}")) height=(format!("{denied_h:.2}")) {}
                }
            }
        }
    }
}
