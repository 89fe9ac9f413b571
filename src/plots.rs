//! SVG charts of a job's history: training curves and the confusion matrix. Plain SVG text, so
//! they open in any browser and embed in reports without a plotting library.
use std::fmt::Write;

const FONT: &str = "font-family=\"Helvetica, Arial, sans-serif\"";
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// One line of a chart.
pub struct Series<'a> {
    pub name: &'a str,
    /// `(epoch, value)`; missing values are left out.
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

/// One panel: a title, its series, and the y range (`None`: fitted to the data).
pub struct Panel<'a> {
    pub title: &'a str,
    pub series: Vec<Series<'a>>,
    pub y_range: Option<(f64, f64)>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Ticks at 1, 2 or 5 × 10^k covering `[lo, hi]`, about `n` of them.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= n as f64)
        .unwrap_or(10.0 * mag);
    let (k0, k1) = ((lo / step).ceil() as i64, (hi / step + 1e-9).floor() as i64);
    // Rounded so that 6 × 0.1 prints as 0.6.
    (k0..=k1)
        .map(|k| (k as f64 * step * 1e9).round() / 1e9)
        .collect()
}

fn fmt_tick(v: f64) -> String {
    if v == v.round() && v.abs() < 1e6 {
        format!("{v:.0}")
    } else if v.abs() >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Panels side by side, sharing the epoch axis; `marker` draws a dashed vertical line (the best
/// epoch) with its label.
pub fn line_panels(title: &str, panels: &[Panel<'_>], marker: Option<(f64, &str)>) -> String {
    let (pw, ph) = (420.0, 300.0);
    // Room under the panels for the axis title and the legend, two entries a row.
    let legend_rows = panels
        .iter()
        .map(|p| p.series.len().div_ceil(2))
        .max()
        .unwrap_or(0);
    let (ml, mr, mt, mb) = (56.0, 16.0, 56.0, 60.0 + 16.0 * legend_rows as f64);
    let width = panels.len() as f64 * (pw + ml + mr);
    let height = ph + mt + mb;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" {FONT} font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        width / 2.0,
        esc(title)
    );
    let all_x: Vec<f64> = panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0)))
        .collect();
    let x_lo = all_x.iter().copied().fold(f64::INFINITY, f64::min);
    let x_hi = all_x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (x_lo, x_hi) = if x_lo.is_finite() {
        (x_lo, if x_hi > x_lo { x_hi } else { x_lo + 1.0 })
    } else {
        (0.0, 1.0)
    };
    for (k, panel) in panels.iter().enumerate() {
        let ox = k as f64 * (pw + ml + mr) + ml;
        let (y_lo, y_hi) = panel.y_range.unwrap_or_else(|| {
            let ys: Vec<f64> = panel
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|q| q.1))
                .filter(|v| v.is_finite())
                .collect();
            let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if !lo.is_finite() {
                (0.0, 1.0)
            } else {
                let pad = ((hi - lo) * 0.08).max(1e-3);
                ((lo - pad).max(0.0), hi + pad)
            }
        });
        let px = |x: f64| ox + (x - x_lo) / (x_hi - x_lo) * pw;
        let py = |y: f64| mt + ph - (y - y_lo) / (y_hi - y_lo) * ph;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"13\">{}</text>",
            ox + pw / 2.0,
            mt - 10.0,
            esc(panel.title)
        );
        for t in ticks(y_lo, y_hi, 5) {
            let y = py(t);
            let _ = writeln!(
                s,
                "<line x1=\"{ox}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e5e5e5\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                ox + pw,
                ox - 6.0,
                y + 4.0,
                fmt_tick(t)
            );
        }
        for t in ticks(x_lo, x_hi, 8)
            .into_iter()
            .filter(|t| t.fract() == 0.0)
        {
            let x = px(t);
            let _ = writeln!(
                s,
                "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"#999\"/><text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                mt + ph,
                mt + ph + 5.0,
                mt + ph + 18.0,
                fmt_tick(t)
            );
        }
        let _ = writeln!(
            s,
            "<rect x=\"{ox}\" y=\"{mt}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/><text x=\"{}\" y=\"{}\" text-anchor=\"middle\">epoch</text>",
            ox + pw / 2.0,
            mt + ph + 34.0
        );
        if let Some((mx, label)) = marker
            && (x_lo..=x_hi).contains(&mx)
        {
            let x = px(mx);
            // The label on the first panel only, on the side of the line with more room.
            let text = if k == 0 {
                let (tx, anchor) = if x > ox + pw / 2.0 {
                    (x - 4.0, "end")
                } else {
                    (x + 4.0, "start")
                };
                format!(
                    "<text x=\"{tx:.1}\" y=\"{}\" fill=\"#555\" text-anchor=\"{anchor}\">{}</text>",
                    mt + 14.0,
                    esc(label)
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{mt}\" y2=\"{}\" stroke=\"#555\" stroke-dasharray=\"2 3\"/>{text}",
                mt + ph,
            );
        }
        for (i, series) in panel.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let dash = if series.dashed {
                " stroke-dasharray=\"6 4\""
            } else {
                ""
            };
            let pts: Vec<String> = series
                .points
                .iter()
                .filter(|q| q.1.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y.clamp(y_lo, y_hi))))
                .collect();
            if pts.len() > 1 {
                let _ = writeln!(
                    s,
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>",
                    pts.join(" ")
                );
            }
            for p in &pts {
                let (x, y) = p.split_once(',').expect("formatted above");
                let _ = writeln!(
                    s,
                    "<circle cx=\"{x}\" cy=\"{y}\" r=\"2.5\" fill=\"{color}\"/>"
                );
            }
            // Legend under the panel, two entries per row.
            let (lx, ly) = (
                ox + (i % 2) as f64 * pw / 2.0,
                mt + ph + 52.0 + (i / 2) as f64 * 16.0,
            );
            let _ = writeln!(
                s,
                "<line x1=\"{lx}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/><text x=\"{}\" y=\"{}\">{}</text>",
                lx + 22.0,
                ly - 4.0,
                ly - 4.0,
                lx + 28.0,
                ly,
                esc(series.name)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// A confusion matrix (rows: true class, columns: predicted class) as a heat map; each cell shows
/// the count and the share of its row, so sensitivity per class is read on the diagonal.
pub fn confusion_matrix(title: &str, labels: &[String], matrix: &[Vec<usize>]) -> String {
    let n = labels.len().max(1);
    let cell = (360.0 / n as f64).clamp(36.0, 90.0);
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1) as f64;
    let ml = 40.0 + longest * 7.0;
    let mt = 76.0;
    let grid = cell * n as f64;
    let width = (ml + grid + 30.0).max(320.0);
    let height = mt + grid + 24.0;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" {FONT} font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">predicted</text>\n<text x=\"14\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 14 {})\">true</text>\n",
        width / 2.0,
        esc(title),
        ml + grid / 2.0,
        mt - 30.0,
        mt + grid / 2.0,
        mt + grid / 2.0,
    );
    for (i, label) in labels.iter().enumerate() {
        let c = ml + (i as f64 + 0.5) * cell;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><text x=\"{c:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            ml - 6.0,
            mt + (i as f64 + 0.5) * cell + 4.0,
            esc(label),
            mt - 8.0,
            esc(label),
        );
    }
    for (r, row) in matrix.iter().enumerate() {
        let total: usize = row.iter().sum();
        for (c, &count) in row.iter().enumerate() {
            let share = if total > 0 {
                count as f64 / total as f64
            } else {
                0.0
            };
            // White to the blue of the curves, by the row share.
            let mix = |hi: f64| (255.0 - (255.0 - hi) * share).round() as u8;
            let fill = format!("#{:02x}{:02x}{:02x}", mix(31.0), mix(119.0), mix(180.0));
            let ink = if share > 0.55 { "white" } else { "black" };
            let (x, y) = (ml + c as f64 * cell, mt + r as f64 * cell);
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{cell:.1}\" height=\"{cell:.1}\" fill=\"{fill}\" stroke=\"white\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"{ink}\" font-size=\"14\">{count}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"{ink}\" font-size=\"10\">{:.0}%</text>",
                x + cell / 2.0,
                y + cell / 2.0,
                x + cell / 2.0,
                y + cell / 2.0 + 14.0,
                share * 100.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 1.0, 5), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(ticks(1.0, 10.0, 8), vec![2.0, 4.0, 6.0, 8.0, 10.0]);
    }

    #[test]
    fn confusion_cells_show_counts_and_row_shares() {
        let svg = confusion_matrix(
            "test <split>",
            &["a".into(), "b".into()],
            &[vec![3, 1], vec![0, 4]],
        );
        assert!(svg.contains("test &lt;split&gt;"));
        assert!(svg.contains(">75%<") && svg.contains(">25%<") && svg.contains(">100%<"));
        assert_eq!(svg.matches("<rect x=").count(), 4);
    }

    #[test]
    fn curves_draw_one_polyline_per_series_with_points() {
        let panel = Panel {
            title: "loss",
            series: vec![
                Series {
                    name: "train",
                    points: vec![(1.0, 1.0), (2.0, 0.5), (3.0, 0.2)],
                    dashed: false,
                },
                Series {
                    name: "val",
                    points: vec![(1.0, 1.2), (2.0, f64::NAN), (3.0, 0.4)],
                    dashed: true,
                },
            ],
            y_range: None,
        };
        let svg = line_panels("job", &[panel], Some((3.0, "best")));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 5);
        assert!(svg.contains(">best<"));
    }
}
