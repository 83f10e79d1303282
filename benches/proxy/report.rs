//! Reports for the benchmark's medians: a Markdown table for people, a CSV
//! file for scripts and spreadsheets, and a self-contained SVG bar chart of
//! every contender relative to the reference contender (tcplb). Everything
//! is rendered with `std` only, so the reports cost no dependencies.
//!
//! Values that are missing, NaN or infinite are all reported as "not
//! measured": a failed measurement must not poison a ratio or a chart scale.

use std::fmt::{self, Write as _};
use std::path::Path;

/// One measured quantity of one scenario, e.g. scenario "bulk-1", metric "throughput", unit "GB/s".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    /// true for throughput-like metrics, false for latency/CPU/memory-like metrics
    pub higher_is_better: bool,
    /// one entry per contender, same order as Results::contenders; None = not measured / not applicable (e.g. memory of "direct")
    pub values: Vec<Option<f64>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Results {
    pub title: String,
    pub date: String,
    pub machine: String,
    pub rounds: usize,
    /// Column order; the reference contender is named by `reference`.
    pub contenders: Vec<String>,
    /// Ratios are value / reference value.
    pub reference: String,
    /// Free-form lines, e.g. "haproxy: not installed, skipped".
    pub notes: Vec<String>,
    pub rows: Vec<Row>,
}

impl Results {
    fn reference_index(&self) -> Option<usize> {
        self.contenders.iter().position(|c| *c == self.reference)
    }

    fn rounds_text(&self) -> String {
        let s = if self.rounds == 1 { "" } else { "s" };
        format!("{} round{s}", self.rounds)
    }
}

impl Row {
    /// Tolerates `values` being shorter than the contender list, so a
    /// harness that forgot a column gets a gap rather than a panic.
    fn value(&self, i: usize) -> Option<f64> {
        self.values
            .get(i)
            .copied()
            .flatten()
            .filter(|v| v.is_finite())
    }

    /// value / reference value.
    fn ratio(&self, i: usize, reference: Option<usize>) -> Option<f64> {
        let v = self.value(i)?;
        let r = self.value(reference?)?;
        if r == 0.0 {
            return None;
        }
        Some(v / r).filter(|q| q.is_finite())
    }

    /// The ratio turned so that above 1 always means "better than the
    /// reference", which is what the chart plots.
    fn score(&self, i: usize, reference: Option<usize>) -> Option<f64> {
        let q = self.ratio(i, reference)?;
        let s = if self.higher_is_better { q } else { 1.0 / q };
        // Negative or infinite bars have no meaning on a 0-based axis.
        Some(s).filter(|s| s.is_finite() && *s >= 0.0)
    }

    fn metric_with_unit(&self) -> String {
        if self.unit.is_empty() {
            self.metric.clone()
        } else {
            format!("{} ({})", self.metric, self.unit)
        }
    }
}

/// 3 significant digits below 1000, whole numbers with thousands separators
/// from 1000 up: 2.934 → "2.93", 0.000812 → "0.000812", 315 → "315",
/// 54321 → "54,321".
fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v == 0.0 {
        return "0".to_string();
    }
    // Scientific formatting does the significant-digit rounding for us and
    // tells where it carried into the next decade (9.996 → "1.00e1").
    let sci = format!("{:.2e}", v.abs());
    let exp: i32 = sci
        .split_once('e')
        .and_then(|(_, e)| e.parse().ok())
        .unwrap_or(0);
    if exp >= 3 {
        return group_thousands(v);
    }
    let decimals = (2 - exp) as usize;
    format!("{v:.decimals$}")
}

fn group_thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    if v < 0.0 && digits != "0" {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_ratio(q: f64) -> String {
    // Two decimals would print a real but tiny ratio as a misleading "0.00×".
    if q > 0.0 && q < 0.005 {
        "<0.01×".to_string()
    } else if q >= 100.0 {
        format!("{}×", group_thousands(q))
    } else {
        format!("{q:.2}×")
    }
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// Markdown: a header paragraph (date, machine, rounds, "medians; ratios are to <reference>"), then one table:
/// columns: Scenario | Metric | <contender 1> | <contender 2> | ...
/// Each cell holds the value (its unit is in the Metric column) and the ratio
/// to the reference contender, e.g. `1.31 (0.52×)`; missing values are `–`.
/// Metrics are marked ↑ (higher is better) or ↓ (lower is better). Then the notes as a bullet list.
pub fn markdown(r: &Results) -> String {
    let mut out = String::new();
    write_markdown(r, &mut out).expect("writing to a String cannot fail");
    out
}

fn write_markdown(r: &Results, out: &mut String) -> fmt::Result {
    let reference = r.reference_index();
    if !r.title.is_empty() {
        writeln!(out, "# {}\n", md_escape(&r.title))?;
    }
    let mut header: Vec<String> = [&r.date, &r.machine]
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(|s| md_escape(s))
        .collect();
    let ratios = match reference {
        Some(_) => format!("ratios are to **{}**", md_escape(&r.reference)),
        None => format!(
            "no ratios: the reference `{}` is not among the contenders",
            md_escape(&r.reference)
        ),
    };
    header.push(format!("{}, medians; {ratios}.", r.rounds_text()));
    writeln!(out, "{}\n", header.join(" · "))?;

    write!(out, "| Scenario | Metric |")?;
    for c in &r.contenders {
        write!(out, " {} |", md_escape(c))?;
    }
    write!(out, "\n|---|---|")?;
    for _ in &r.contenders {
        write!(out, "---:|")?;
    }
    writeln!(out)?;
    for row in &r.rows {
        let arrow = if row.higher_is_better { "↑" } else { "↓" };
        write!(
            out,
            "| {} | {} {arrow} |",
            md_escape(&row.scenario),
            md_escape(&row.metric_with_unit())
        )?;
        for i in 0..r.contenders.len() {
            match (row.value(i), row.ratio(i, reference)) {
                (None, _) => write!(out, " – |")?,
                (Some(v), Some(q)) if Some(i) != reference => {
                    write!(out, " {} ({}) |", fmt_value(v), fmt_ratio(q))?
                }
                (Some(v), _) => write!(out, " {} |", fmt_value(v))?,
            }
        }
        writeln!(out)?;
    }
    if reference.is_some() {
        writeln!(
            out,
            "\nRatios are value / {0}: for ↑ metrics a ratio above 1 means the contender \
             is better than {0}, for ↓ metrics (latency, CPU, memory) it means worse.",
            md_escape(&r.reference)
        )?;
    }
    if !r.notes.is_empty() {
        writeln!(out)?;
        for note in &r.notes {
            writeln!(out, "- {}", note.replace(['\n', '\r'], " "))?;
        }
    }
    Ok(())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_number(v: Option<f64>) -> String {
    // Full precision: the CSV is for further processing, not for reading.
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// CSV with header `scenario,metric,unit,higher_is_better,<contender>...,<contender>_ratio...`;
/// values at full precision, empty fields for missing values, ratios to the reference
/// (the reference's own ratio column is 1 wherever it was measured).
pub fn csv(r: &Results) -> String {
    let reference = r.reference_index();
    let mut header: Vec<String> = ["scenario", "metric", "unit", "higher_is_better"]
        .into_iter()
        .map(String::from)
        .collect();
    header.extend(r.contenders.iter().cloned());
    header.extend(r.contenders.iter().map(|c| format!("{c}_ratio")));
    let mut out = join_csv(&header);
    for row in &r.rows {
        let mut fields = vec![
            row.scenario.clone(),
            row.metric.clone(),
            row.unit.clone(),
            row.higher_is_better.to_string(),
        ];
        let n = r.contenders.len();
        fields.extend((0..n).map(|i| csv_number(row.value(i))));
        fields.extend((0..n).map(|i| csv_number(row.ratio(i, reference))));
        out.push_str(&join_csv(&fields));
    }
    out
}

fn join_csv(fields: &[String]) -> String {
    let mut line = fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",");
    line.push('\n');
    line
}

fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            _ => out.push(c),
        }
    }
    out
}

/// Greedy word wrap; the SVG has no text layout of its own.
fn wrap(text: &str, max_chars: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let len = line.chars().count();
        if len > 0 && len + 1 + word.chars().count() > max_chars {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// A step of 1, 2, 2.5 or 5 times a power of ten giving about five ticks.
fn tick_step(top: f64) -> f64 {
    let raw = top / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude)
}

fn tick_decimals(step: f64) -> usize {
    (0..3)
        .find(|d| {
            let scaled = step * 10f64.powi(*d as i32);
            (scaled - scaled.round()).abs() < 1e-9
        })
        .unwrap_or(3)
}

/// Tableau 10 without its grey, which is kept for the reference contender so
/// its bars (always exactly 1) read as the baseline rather than a competitor.
const PALETTE: [&str; 9] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f",
];
const REFERENCE_COLOR: &str = "#8c8c8c";

/// Above this ratio the axis stops growing and taller bars are clipped and
/// labelled, so one outlier does not flatten every other bar.
const AXIS_CAP: f64 = 10.0;

/// Rough advance of a sans-serif glyph, as a fraction of the font size.
const GLYPH: f64 = 0.6;

/// A self-contained SVG bar chart of the ratios to the reference contender:
/// one group of bars per row (label "scenario metric"), one bar per contender
/// (the reference included, always 1.0), a legend, a dashed line at 1.0 and a y axis.
/// Rows where lower is better plot reference / value instead (marked `*`),
/// so a higher bar is always better than the reference. Missing values leave gaps.
/// Hovering a bar shows its value (`<title>` tooltips).
pub fn svg(r: &Results) -> String {
    let mut out = String::new();
    write_svg(r, &mut out).expect("writing to a String cannot fail");
    out
}

fn write_svg(r: &Results, out: &mut String) -> fmt::Result {
    const PLOT_H: f64 = 260.0;
    const LABEL_FONT: f64 = 11.0;
    const ANGLE: f64 = 40.0;

    let reference = r.reference_index();
    let n = r.contenders.len().max(1);
    let groups = r.rows.len().max(1);
    let group_w = (n as f64 * 12.0 + 24.0).max(90.0);
    let plot_w = group_w * groups as f64;

    // Group labels: two horizontal lines (scenario, metric) when they fit,
    // otherwise one line rotated, which needs room below and to the left.
    let labels: Vec<(String, String)> = r
        .rows
        .iter()
        .map(|row| {
            let mark = if row.higher_is_better { "" } else { "*" };
            (row.scenario.clone(), format!("{}{mark}", row.metric))
        })
        .collect();
    let label_w = |s: &str| s.chars().count() as f64 * LABEL_FONT * GLYPH;
    let horizontal = labels
        .iter()
        .all(|(a, b)| label_w(a).max(label_w(b)) <= group_w - 8.0);
    let longest = labels
        .iter()
        .map(|(a, b)| label_w(&format!("{a} {b}")))
        .fold(0.0, f64::max);
    let (sin, cos) = ANGLE.to_radians().sin_cos();
    let label_space = if horizontal {
        40.0
    } else {
        (longest * sin + 24.0).min(240.0)
    };
    let left = if horizontal {
        64.0
    } else {
        (longest * cos - group_w / 2.0 + 12.0).max(64.0)
    };

    let legend_names: Vec<String> = r
        .contenders
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if Some(i) == reference {
                format!("{c} (reference)")
            } else {
                c.clone()
            }
        })
        .collect();
    let ref_line_label = format!("1× = {}", r.reference);
    let legend_chars = legend_names
        .iter()
        .chain(std::iter::once(&ref_line_label))
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(0);
    let legend_w = 48.0 + legend_chars as f64 * 12.0 * GLYPH;
    let width = (left + plot_w + legend_w).max(520.0);

    let title = if r.title.is_empty() {
        format!("Relative to {}", r.reference)
    } else {
        format!("{}: relative to {}", r.title, r.reference)
    };
    let facts: Vec<String> = [r.date.clone(), r.machine.clone()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .chain(std::iter::once(format!("medians of {}", r.rounds_text())))
        .collect();
    let explanation = match reference {
        Some(_) => format!(
            "Bars: value / {0}, or {0} / value for lower-is-better metrics (marked *), \
             so a higher bar is always better than {0}.",
            r.reference
        ),
        None => format!(
            "The reference {} is not among the contenders, so there are no ratios to plot.",
            r.reference
        ),
    };
    let wrap_at = ((width - 24.0) / (12.0 * GLYPH)) as usize;
    let mut subtitle = wrap(&facts.join(" · "), wrap_at);
    subtitle.extend(wrap(&explanation, wrap_at));

    let plot_top = 44.0 + subtitle.len() as f64 * 15.0 + 12.0;
    let plot_bottom = plot_top + PLOT_H;
    let plot_right = left + plot_w;
    let height = plot_bottom + label_space + 12.0;

    let scores: Vec<Vec<Option<f64>>> = r
        .rows
        .iter()
        .map(|row| (0..n).map(|i| row.score(i, reference)).collect())
        .collect();
    let max_score = scores
        .iter()
        .flatten()
        .flatten()
        .fold(0.0, |a: f64, b| a.max(*b));
    // At least 1.2, so the reference line never sits on the top edge.
    let wanted_top = (max_score * 1.05).clamp(1.2, AXIS_CAP);
    let step = tick_step(wanted_top);
    let axis_top = (wanted_top / step).ceil() * step;
    let y = |v: f64| plot_bottom - v.min(axis_top) / axis_top * PLOT_H;

    writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    )?;
    writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#)?;
    writeln!(
        out,
        r#"<text x="12" y="24" font-size="16" font-weight="bold">{}</text>"#,
        xml(&title)
    )?;
    for (k, line) in subtitle.iter().enumerate() {
        writeln!(
            out,
            r##"<text x="12" y="{:.1}" fill="#444">{}</text>"##,
            44.0 + k as f64 * 15.0,
            xml(line)
        )?;
    }

    // Grid and y axis.
    let decimals = tick_decimals(step);
    let ticks = (axis_top / step).round() as usize;
    for t in 0..=ticks {
        let v = t as f64 * step;
        let ty = y(v);
        writeln!(
            out,
            r##"<line x1="{left:.1}" y1="{ty:.1}" x2="{plot_right:.1}" y2="{ty:.1}" stroke="#e5e5e5"/>"##
        )?;
        writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{v:.decimals$}×</text>"#,
            left - 6.0,
            ty + 4.0
        )?;
    }
    writeln!(
        out,
        r##"<line x1="{left:.1}" y1="{plot_top:.1}" x2="{left:.1}" y2="{plot_bottom:.1}" stroke="#333"/>"##
    )?;
    writeln!(
        out,
        r##"<line x1="{left:.1}" y1="{plot_bottom:.1}" x2="{plot_right:.1}" y2="{plot_bottom:.1}" stroke="#333"/>"##
    )?;
    let axis_mid = (plot_top + plot_bottom) / 2.0;
    // Close to the tick labels even when long rotated labels widen the margin.
    let axis_x = left - 44.0;
    writeln!(
        out,
        r#"<text x="{axis_x:.1}" y="{axis_mid:.1}" text-anchor="middle" font-size="11" transform="rotate(-90 {axis_x:.1} {axis_mid:.1})">{}</text>"#,
        xml(&format!("ratio to {} (higher = better)", r.reference))
    )?;

    // Bars sit in a fixed slot per contender, so colours line up across
    // groups and a missing value shows as a gap.
    let color = |i: usize| -> &str {
        if Some(i) == reference {
            return REFERENCE_COLOR;
        }
        let k = match reference {
            Some(rf) if i > rf => i - 1,
            _ => i,
        };
        PALETTE[k % PALETTE.len()]
    };
    let pad = 12.0;
    let slot = (group_w - 2.0 * pad) / n as f64;
    for (g, row) in r.rows.iter().enumerate() {
        let gx = left + g as f64 * group_w;
        if g > 0 {
            writeln!(
                out,
                r##"<line x1="{gx:.1}" y1="{plot_top:.1}" x2="{gx:.1}" y2="{plot_bottom:.1}" stroke="#f2f2f2"/>"##
            )?;
        }
        for (i, name) in r.contenders.iter().enumerate() {
            let Some(s) = scores[g][i] else { continue };
            let x = gx + pad + i as f64 * slot;
            let top = y(s);
            let (Some(v), Some(q)) = (row.value(i), row.ratio(i, reference)) else {
                continue;
            };
            let unit = if row.unit.is_empty() {
                String::new()
            } else {
                format!(" {}", row.unit)
            };
            let plotted = if row.higher_is_better {
                String::new()
            } else {
                format!(", plotted {s:.2}")
            };
            let tip = format!(
                "{name}, {} {}: {}{unit} ({} of {}{plotted})",
                row.scenario,
                row.metric,
                fmt_value(v),
                fmt_ratio(q),
                r.reference
            );
            writeln!(
                out,
                r#"<rect x="{x:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}</title></rect>"#,
                (slot - 1.5).max(1.0),
                plot_bottom - top,
                color(i),
                xml(&tip)
            )?;
            if s > axis_top {
                let cx = x + slot / 2.0;
                writeln!(
                    out,
                    r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="9">{}</text>"#,
                    plot_top - 3.0,
                    xml(&fmt_ratio(s))
                )?;
            }
        }
        let cx = gx + group_w / 2.0;
        let (scenario, metric) = &labels[g];
        if horizontal {
            for (k, line) in [scenario, metric].into_iter().enumerate() {
                writeln!(
                    out,
                    r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="{LABEL_FONT}">{}</text>"#,
                    plot_bottom + 16.0 + k as f64 * 14.0,
                    xml(line)
                )?;
            }
        } else {
            let ly = plot_bottom + 14.0;
            writeln!(
                out,
                r#"<text x="{cx:.1}" y="{ly:.1}" text-anchor="end" font-size="{LABEL_FONT}" transform="rotate(-{ANGLE} {cx:.1} {ly:.1})">{}</text>"#,
                xml(&format!("{scenario} {metric}"))
            )?;
        }
    }
    if reference.is_some() {
        let ry = y(1.0);
        writeln!(
            out,
            r##"<line x1="{left:.1}" y1="{ry:.1}" x2="{plot_right:.1}" y2="{ry:.1}" stroke="#222" stroke-width="1.2" stroke-dasharray="6 4"/>"##
        )?;
    }

    // Legend, right of the plot.
    let lx = plot_right + 24.0;
    for (i, name) in legend_names.iter().enumerate() {
        let ly = plot_top + 4.0 + i as f64 * 20.0;
        writeln!(
            out,
            r#"<rect x="{lx:.1}" y="{ly:.1}" width="12" height="12" fill="{}"/>"#,
            color(i)
        )?;
        writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 18.0,
            ly + 10.5,
            xml(name)
        )?;
    }
    if reference.is_some() {
        let ly = plot_top + 4.0 + legend_names.len() as f64 * 20.0 + 6.0;
        writeln!(
            out,
            r##"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="#222" stroke-width="1.2" stroke-dasharray="4 3"/>"##,
            lx + 12.0
        )?;
        writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 18.0,
            ly + 4.0,
            xml(&ref_line_label)
        )?;
    }
    writeln!(out, "</svg>")
}

/// Writes results.md, results.csv and results.svg into `dir` (creating it), returning the markdown.
pub fn write_all(r: &Results, dir: &Path) -> std::io::Result<String> {
    std::fs::create_dir_all(dir)?;
    let md = markdown(r);
    std::fs::write(dir.join("results.md"), &md)?;
    std::fs::write(dir.join("results.csv"), csv(r))?;
    std::fs::write(dir.join("results.svg"), svg(r))?;
    Ok(md)
}
