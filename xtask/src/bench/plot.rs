//! Part F's picture: achieved requests/s and p99 latency across offered rates, one line per
//! configuration, as a small hand-written SVG.
//!
//! Hand-written rather than with `plotters`: two panels of a few lines need about as much
//! code either way, while plotters' text goes through its font machinery (fontconfig and
//! system fonts with its default features) and its output changes with its version. This
//! one is plain text in a fixed layout, so a new run's picture diffs cleanly in git and
//! renders the same on GitHub.
use std::fmt::Write as _;

use super::{median, range};

/// A figure over rounds: median, with the min–max range as a whisker.
#[derive(Clone, Copy)]
pub(super) struct Value {
    median: f64,
    lo: f64,
    hi: f64,
}

impl Value {
    /// NaN (not drawn) when there are no rounds.
    pub fn of(rounds: &[f64]) -> Value {
        let (lo, hi) = range(rounds);
        Value {
            median: median(rounds),
            lo,
            hi,
        }
    }

    fn is_drawn(&self) -> bool {
        self.median.is_finite() && self.median > 0.0
    }
}

pub(super) struct Series {
    pub name: String,
    /// One per label.
    pub rate: Vec<Value>,
    pub p99_us: Vec<Value>,
}

pub(super) struct Chart {
    pub title: String,
    /// Command, machine, revision and load: what the picture was measured on.
    pub caption: String,
    /// Offered rates along the x axis.
    pub labels: Vec<String>,
    pub series: Vec<Series>,
}

const WIDTH: f64 = 960.0;
/// Where the caption's first line goes; the picture grows with its lines.
const CAPTION_TOP: f64 = 405.0;
const CAPTION_LINE: f64 = 13.0;
const PANEL_WIDTH: f64 = 360.0;
const PANEL_HEIGHT: f64 = 250.0;
const PANEL_TOP: f64 = 95.0;
const LEFT_PANEL_X: f64 = 90.0;
const RIGHT_PANEL_X: f64 = 560.0;
const COLORS: [&str; 4] = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"];

/// How a panel maps values to heights.
enum Scale {
    /// From 0 to `max`, ticks every `step`.
    Linear { max: f64, step: f64 },
    /// Decades 10^lo to 10^hi.
    Log { lo: i32, hi: i32 },
}

impl Scale {
    fn linear(values: impl Iterator<Item = f64>) -> Scale {
        let top = values
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            .max(1.0);
        // 1, 2 or 5 times a power of ten, for about five ticks.
        let raw = top / 5.0;
        let power = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .map(|m| m * power)
            .find(|&step| step >= raw)
            .unwrap_or(10.0 * power);
        Scale::Linear {
            max: (top / step).ceil() * step,
            step,
        }
    }

    fn log(values: impl Iterator<Item = f64>) -> Scale {
        let (lo, hi) = values
            .filter(|v| v.is_finite() && *v > 0.0)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        if !lo.is_finite() {
            return Scale::Log { lo: 1, hi: 4 };
        }
        let lo = lo.log10().floor() as i32;
        let hi = (hi.log10().ceil() as i32).max(lo + 1);
        Scale::Log { lo, hi }
    }

    /// 0 at the bottom of the panel, 1 at its top.
    fn fraction(&self, value: f64) -> f64 {
        let fraction = match *self {
            Scale::Linear { max, .. } => value / max,
            Scale::Log { lo, hi } => (value.log10() - f64::from(lo)) / f64::from(hi - lo),
        };
        fraction.clamp(0.0, 1.0)
    }

    fn ticks(&self) -> Vec<(f64, String)> {
        match *self {
            Scale::Linear { max, step } => {
                let count = (max / step).round() as u32;
                (0..=count)
                    .map(|i| {
                        let value = f64::from(i) * step;
                        (value, count_label(value))
                    })
                    .collect()
            }
            Scale::Log { lo, hi } => (lo..=hi)
                .map(|power| {
                    let value = 10f64.powi(power);
                    (value, micros_label(value))
                })
                .collect(),
        }
    }
}

/// 20000 -> "20k".
fn count_label(value: f64) -> String {
    if value >= 1000.0 {
        format!("{}k", value / 1000.0)
    } else {
        format!("{value}")
    }
}

/// 1000 µs -> "1 ms".
fn micros_label(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{} ms", us / 1e3)
    } else {
        format!("{us} µs")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub(super) fn svg(chart: &Chart) -> String {
    let mut out = String::new();
    // The caption may be long: one line per "; "-separated part.
    let caption: Vec<&str> = chart.caption.split("; ").collect();
    let height = CAPTION_TOP + caption.len() as f64 * CAPTION_LINE;
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{WIDTH}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="24" font-size="15" text-anchor="middle" font-weight="bold">{}</text>"#,
        WIDTH / 2.0,
        escape(&chart.title)
    );
    // Legend.
    for (i, series) in chart.series.iter().enumerate() {
        let x = LEFT_PANEL_X + i as f64 * 300.0;
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(
            out,
            r#"<line x1="{x}" y1="48" x2="{}" y2="48" stroke="{color}" stroke-width="2.5"/><circle cx="{}" cy="48" r="3.5" fill="{color}"/><text x="{}" y="52">{}</text>"#,
            x + 28.0,
            x + 14.0,
            x + 36.0,
            escape(&series.name)
        );
    }
    let rate = Scale::linear(
        chart
            .series
            .iter()
            .flat_map(|s| s.rate.iter().map(|v| v.hi)),
    );
    let p99 = Scale::log(chart.series.iter().flat_map(|s| {
        s.p99_us
            .iter()
            .flat_map(|v| [v.lo, v.hi])
            .collect::<Vec<_>>()
    }));
    panel(
        &mut out,
        chart,
        LEFT_PANEL_X,
        "achieved requests/s",
        &rate,
        |s| &s.rate,
    );
    panel(
        &mut out,
        chart,
        RIGHT_PANEL_X,
        "p99 latency (log scale)",
        &p99,
        |s| &s.p99_us,
    );
    for (i, part) in caption.into_iter().enumerate() {
        let _ = writeln!(
            out,
            r##"<text x="20" y="{}" font-size="10" fill="#555">{}</text>"##,
            CAPTION_TOP - 5.0 + i as f64 * CAPTION_LINE,
            escape(part)
        );
    }
    out.push_str("</svg>\n");
    out
}

fn panel(
    out: &mut String,
    chart: &Chart,
    x0: f64,
    title: &str,
    scale: &Scale,
    values: impl Fn(&Series) -> &Vec<Value>,
) {
    let bottom = PANEL_TOP + PANEL_HEIGHT;
    let y = |value: f64| bottom - scale.fraction(value) * PANEL_HEIGHT;
    let columns = chart.labels.len().max(1) as f64;
    let x = |i: usize| x0 + (i as f64 + 0.5) * PANEL_WIDTH / columns;
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" font-size="13" text-anchor="middle">{}</text>"#,
        x0 + PANEL_WIDTH / 2.0,
        PANEL_TOP - 12.0,
        escape(title)
    );
    for (value, label) in scale.ticks() {
        let ty = y(value);
        let _ = writeln!(
            out,
            r##"<line x1="{x0}" y1="{ty:.1}" x2="{}" y2="{ty:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 + PANEL_WIDTH,
            x0 - 6.0,
            ty + 4.0,
            escape(&label)
        );
    }
    let _ = writeln!(
        out,
        r##"<rect x="{x0}" y="{PANEL_TOP}" width="{PANEL_WIDTH}" height="{PANEL_HEIGHT}" fill="none" stroke="#888"/>"##
    );
    for (i, label) in chart.labels.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            x(i),
            bottom + 18.0,
            escape(label)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">offered requests/s (max: closed loop)</text>"#,
        x0 + PANEL_WIDTH / 2.0,
        bottom + 38.0
    );
    for (index, series) in chart.series.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        // Side by side within a column, so whiskers of the two series do not overlap.
        let nudge = (index as f64 - (chart.series.len() as f64 - 1.0) / 2.0) * 6.0;
        let points: Vec<(f64, &Value)> = values(series)
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_drawn())
            .map(|(i, v)| (x(i) + nudge, v))
            .collect();
        let line: Vec<String> = points
            .iter()
            .map(|(px, v)| format!("{px:.1},{:.1}", y(v.median)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2.5"/>"#,
            line.join(" ")
        );
        for (px, v) in points {
            let (top, low) = (y(v.hi), y(v.lo));
            let _ = writeln!(
                out,
                r#"<line x1="{px:.1}" y1="{top:.1}" x2="{px:.1}" y2="{low:.1}" stroke="{color}"/><circle cx="{px:.1}" cy="{:.1}" r="3.5" fill="{color}"/>"#,
                y(v.median)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_round_to_readable_ticks() {
        let Scale::Linear { max, step } = Scale::linear([43_210.0, 9_000.0].into_iter()) else {
            panic!("not linear");
        };
        assert_eq!((max, step), (50_000.0, 10_000.0));
        let Scale::Log { lo, hi } = Scale::log([85.0, 2_900.0].into_iter()) else {
            panic!("not log");
        };
        assert_eq!((lo, hi), (1, 4));
        assert_eq!(micros_label(1000.0), "1 ms");
        assert_eq!(count_label(20_000.0), "20k");
    }

    #[test]
    fn svg_draws_every_series_and_skips_missing_points() {
        let value = |v: f64| Value::of(&[v * 0.9, v, v * 1.1]);
        let chart = Chart {
            title: "nginx <test> & co".into(),
            caption: "cargo xtask bench; 2 CPUs".into(),
            labels: vec!["2k".into(), "max".into()],
            series: vec![
                Series {
                    name: "no agent".into(),
                    rate: vec![value(2000.0), value(80_000.0)],
                    p99_us: vec![value(100.0), value(1000.0)],
                },
                Series {
                    name: "agent".into(),
                    rate: vec![value(2000.0), Value::of(&[])],
                    p99_us: vec![value(120.0), Value::of(&[])],
                },
            ],
        };
        let svg = svg(&chart);
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("nginx &lt;test&gt; &amp; co"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        // Legend dots, then 2 + 2 + 1 + 1 points.
        assert_eq!(svg.matches("<circle").count(), 2 + 6);
        assert!(!svg.contains("NaN"));
    }
}
