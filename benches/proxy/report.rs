//! Reports for the benchmark's rounds: a Markdown file for people, a CSV
//! file for scripts and spreadsheets, and a self-contained SVG bar chart of
//! every contender relative to the reference contender (tcplb). Everything
//! is rendered with `std` only, so the reports cost no dependencies.
//!
//! Every figure is a median over rounds with its spread (min–max over the
//! same rounds). Ratios are taken per round — a contender's value divided by
//! the reference's value *from the same round* — and then summarised the
//! same way, so a round in which the whole machine was slow moves both
//! sides of a ratio instead of skewing it.
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
    /// Per contender (same order as `Results::contenders`), one entry per
    /// round; `None` where that round measured nothing (e.g. memory of
    /// "direct"). Shorter vectors are tolerated and read as missing.
    pub rounds: Vec<Vec<Option<f64>>>,
}

/// A median with the range it was taken over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// How many rounds contributed.
    pub count: usize,
}

impl Spread {
    /// Over the finite values; `None` when there are none. The median of an
    /// even count is the mean of the middle two.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            count: n,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Results {
    pub title: String,
    pub date: String,
    pub machine: String,
    pub rounds: usize,
    /// Column order; the reference contender is named by `reference`.
    pub contenders: Vec<String>,
    /// Ratios are value / reference value, per round.
    pub reference: String,
    /// Free-form lines, e.g. "haproxy: not installed, skipped".
    pub notes: Vec<String>,
    pub rows: Vec<Row>,
    /// Each contender's exact configuration (command line, config file).
    pub configs: Vec<(String, String)>,
    /// Further per-round ratios, (contender, baseline): e.g. two workers
    /// against one. Pairs with a contender not in the run are left out.
    pub comparisons: Vec<(String, String)>,
}

impl Results {
    fn index(&self, name: &str) -> Option<usize> {
        self.contenders.iter().position(|c| c == name)
    }

    fn reference_index(&self) -> Option<usize> {
        self.index(&self.reference)
    }

    fn rounds_text(&self) -> String {
        let s = if self.rounds == 1 { "" } else { "s" };
        format!("{} round{s}", self.rounds)
    }

    /// Row indices grouped by scenario, in first-seen order.
    fn scenarios(&self) -> Vec<(&str, Vec<usize>)> {
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        for (k, row) in self.rows.iter().enumerate() {
            match groups.iter_mut().find(|(s, _)| *s == row.scenario) {
                Some((_, rows)) => rows.push(k),
                None => groups.push((&row.scenario, vec![k])),
            }
        }
        groups
    }

    /// The comparisons whose both sides are in the run, as indices.
    fn comparison_indices(&self) -> Vec<(usize, usize)> {
        self.comparisons
            .iter()
            .filter_map(|(a, b)| Some((self.index(a)?, self.index(b)?)))
            .collect()
    }
}

impl Row {
    /// Contender `i`'s value in `round`, when measured and finite.
    fn sample(&self, i: usize, round: usize) -> Option<f64> {
        self.rounds
            .get(i)
            .and_then(|r| r.get(round))
            .copied()
            .flatten()
            .filter(|v| v.is_finite())
    }

    fn round_count(&self) -> usize {
        self.rounds.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Median and range of contender `i` over the rounds.
    pub fn value(&self, i: usize) -> Option<Spread> {
        Spread::of((0..self.round_count()).filter_map(|k| self.sample(i, k)))
    }

    /// Per round: `i`'s value / `base`'s value in that round (rounds where
    /// either is missing, or the base is 0, are left out); then the median
    /// and range of those ratios. With `turned`, lower-is-better ratios are
    /// inverted so that above 1 always means "better than the base".
    pub fn ratio(&self, i: usize, base: usize, turned: bool) -> Option<Spread> {
        let per_round = (0..self.round_count()).filter_map(|k| {
            let v = self.sample(i, k)?;
            let b = self.sample(base, k)?;
            let q = if turned && !self.higher_is_better {
                b / v
            } else {
                v / b
            };
            // A base of 0 (or a value of 0, turned) has no ratio.
            Some(q).filter(|q| q.is_finite() && *q >= 0.0 && b != 0.0 && v != 0.0)
        });
        Spread::of(per_round)
    }

    fn metric_with_unit(&self) -> String {
        if self.unit.is_empty() {
            self.metric.clone()
        } else {
            format!("{} ({})", self.metric, self.unit)
        }
    }

    fn arrow(&self) -> &'static str {
        if self.higher_is_better { "↑" } else { "↓" }
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

/// A ratio without its `×`: two decimals, "<0.01" for tiny ones.
fn fmt_ratio_number(q: f64) -> String {
    // Two decimals would print a real but tiny ratio as a misleading "0.00".
    if q > 0.0 && q < 0.005 {
        "<0.01".to_string()
    } else if q >= 100.0 {
        group_thousands(q)
    } else {
        format!("{q:.2}")
    }
}

fn fmt_ratio(q: f64) -> String {
    format!("{}×", fmt_ratio_number(q))
}

/// `1.52 (1.48–1.55)`; just `1.52` when every round gave the same figure
/// (e.g. a single round).
fn fmt_spread(s: &Spread) -> String {
    let (median, min, max) = (fmt_value(s.median), fmt_value(s.min), fmt_value(s.max));
    if min == max {
        median
    } else {
        format!("{median} ({min}–{max})")
    }
}

/// `0.55× (0.52–0.58)`, or `0.55×` when the range is a single point.
fn fmt_ratio_spread(s: &Spread) -> String {
    let (min, max) = (fmt_ratio_number(s.min), fmt_ratio_number(s.max));
    if min == max {
        fmt_ratio(s.median)
    } else {
        format!("{} ({min}–{max})", fmt_ratio(s.median))
    }
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// Markdown: a header paragraph (date, machine, rounds, how to read), then
/// one table per scenario with a row per contender and, per metric, a
/// column of values and a column of ratios to the reference, e.g.
/// `0.842 (0.80–0.86)` and `0.55× (0.52–0.58)`; missing values are `–`.
/// Metrics are marked ↑ (higher is better) or ↓ (lower is better). Then a
/// table of the further comparisons, each contender's configuration, and
/// the notes as a bullet list.
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
    header.push(format!("{}.", r.rounds_text()));
    writeln!(out, "{}\n", header.join(" · "))?;
    write!(
        out,
        "Each figure is the median over the rounds, with its range (min–max over the \
         rounds) in parentheses. "
    )?;
    match reference {
        Some(_) => writeln!(
            out,
            "`× {0}` columns are ratios taken per round (the contender's value divided by \
             {0}'s in the same round), then given as median (min–max). For ↑ metrics a ratio \
             above 1 means better than {0}; for ↓ metrics (latency, CPU, memory) it means worse.\n",
            md_escape(&r.reference)
        )?,
        None => writeln!(
            out,
            "No ratios: the reference `{}` is not among the contenders.\n",
            md_escape(&r.reference)
        )?,
    }

    for (scenario, rows) in r.scenarios() {
        let rows: Vec<&Row> = rows.iter().map(|&k| &r.rows[k]).collect();
        let shown: Vec<usize> = (0..r.contenders.len())
            .filter(|&i| rows.iter().any(|row| row.value(i).is_some()))
            .collect();
        if shown.is_empty() {
            continue;
        }
        writeln!(out, "## {}\n", md_escape(scenario))?;
        write!(out, "| contender |")?;
        for row in &rows {
            write!(
                out,
                " {} {} |",
                md_escape(&row.metric_with_unit()),
                row.arrow()
            )?;
            if reference.is_some() {
                write!(out, " × {} |", md_escape(&r.reference))?;
            }
        }
        write!(out, "\n|---|")?;
        for _ in &rows {
            write!(out, "---:|")?;
            if reference.is_some() {
                write!(out, "---:|")?;
            }
        }
        writeln!(out)?;
        for &i in &shown {
            write!(out, "| {} |", md_escape(&r.contenders[i]))?;
            for row in &rows {
                match row.value(i) {
                    Some(v) => write!(out, " {} |", fmt_spread(&v))?,
                    None => write!(out, " – |")?,
                }
                if let Some(rf) = reference {
                    match row.ratio(i, rf, false) {
                        _ if i == rf && row.value(i).is_some() => write!(out, " 1 |")?,
                        Some(q) => write!(out, " {} |", fmt_ratio_spread(&q))?,
                        None => write!(out, " – |")?,
                    }
                }
            }
            writeln!(out)?;
        }
        writeln!(out)?;
    }

    let pairs = r.comparison_indices();
    let compared: Vec<&Row> = r
        .rows
        .iter()
        .filter(|row| pairs.iter().any(|&(a, b)| row.ratio(a, b, false).is_some()))
        .collect();
    if !compared.is_empty() {
        writeln!(out, "## Comparisons\n")?;
        writeln!(
            out,
            "Per-round ratios between two contenders other than {}: value of the first / \
             value of the second, median (min–max).\n",
            md_escape(&r.reference)
        )?;
        write!(out, "| scenario | metric |")?;
        for &(a, b) in &pairs {
            write!(
                out,
                " {} ÷ {} |",
                md_escape(&r.contenders[a]),
                md_escape(&r.contenders[b])
            )?;
        }
        write!(out, "\n|---|---|")?;
        for _ in &pairs {
            write!(out, "---:|")?;
        }
        writeln!(out)?;
        for row in compared {
            write!(
                out,
                "| {} | {} {} |",
                md_escape(&row.scenario),
                md_escape(&row.metric_with_unit()),
                row.arrow()
            )?;
            for &(a, b) in &pairs {
                match row.ratio(a, b, false) {
                    Some(q) => write!(out, " {} |", fmt_ratio_spread(&q))?,
                    None => write!(out, " – |")?,
                }
            }
            writeln!(out)?;
        }
        writeln!(out)?;
    }

    if !r.configs.is_empty() {
        writeln!(out, "## Configurations\n")?;
        for (name, config) in &r.configs {
            writeln!(out, "### {}\n", md_escape(name))?;
            // A fence longer than any backtick run inside, so no config
            // text can end the block early.
            let longest = config.split(|c| c != '`').map(str::len).max().unwrap_or(0);
            let fence = "`".repeat(longest.max(2) + 1);
            writeln!(out, "{fence}\n{}\n{fence}\n", config.trim_end())?;
        }
    }

    if !r.notes.is_empty() {
        writeln!(out, "## Notes\n")?;
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

/// CSV, one line per (row, contender) that was measured, with header
/// `scenario,metric,unit,higher_is_better,contender,median,min,max,ratio_median,ratio_min,ratio_max,rounds`:
/// values at full precision; the ratio columns are the per-round ratios to
/// the reference (empty where there is none; 1 for the reference itself);
/// `rounds` holds every round's value, separated by `;` (empty for a round
/// that measured nothing), so anything else can be recomputed.
pub fn csv(r: &Results) -> String {
    let reference = r.reference_index();
    let header: Vec<String> = [
        "scenario",
        "metric",
        "unit",
        "higher_is_better",
        "contender",
        "median",
        "min",
        "max",
        "ratio_median",
        "ratio_min",
        "ratio_max",
        "rounds",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let mut out = join_csv(&header);
    for row in &r.rows {
        for (i, name) in r.contenders.iter().enumerate() {
            let Some(v) = row.value(i) else { continue };
            let q = reference.and_then(|rf| row.ratio(i, rf, false));
            let rounds: Vec<String> = (0..row.round_count())
                .map(|k| csv_number(row.sample(i, k)))
                .collect();
            let fields = vec![
                row.scenario.clone(),
                row.metric.clone(),
                row.unit.clone(),
                row.higher_is_better.to_string(),
                name.clone(),
                csv_number(Some(v.median)),
                csv_number(Some(v.min)),
                csv_number(Some(v.max)),
                csv_number(q.map(|q| q.median)),
                csv_number(q.map(|q| q.min)),
                csv_number(q.map(|q| q.max)),
                rounds.join(";"),
            ];
            out.push_str(&join_csv(&fields));
        }
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
/// its bars (always exactly 1) read as the baseline rather than a competitor,
/// then the darker half of Tableau 20, so a dozen contenders stay apart.
const PALETTE: [&str; 14] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#1f77b4", "#d62728", "#17becf", "#bcbd22", "#9467bd",
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
/// so a higher bar is always better than the reference. A bar is the median
/// of the per-round ratios, its whisker their range. Missing values leave gaps.
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
        .chain(std::iter::once(format!(
            "medians of {}, whiskers min–max",
            r.rounds_text()
        )))
        .collect();
    let explanation = match reference {
        Some(_) => format!(
            "Bars: value / {0} in the same round, or {0} / value for lower-is-better \
             metrics (marked *), so a higher bar is always better than {0}.",
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

    let scores: Vec<Vec<Option<Spread>>> = r
        .rows
        .iter()
        .map(|row| {
            (0..n)
                .map(|i| reference.and_then(|rf| row.ratio(i, rf, true)))
                .collect()
        })
        .collect();
    let max_score = scores
        .iter()
        .flatten()
        .flatten()
        .fold(0.0, |a: f64, b| a.max(b.max));
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
            let Some(score) = scores[g][i] else { continue };
            let s = score.median;
            let x = gx + pad + i as f64 * slot;
            let top = y(s);
            let (Some(v), Some(q)) = (
                row.value(i),
                reference.and_then(|rf| row.ratio(i, rf, false)),
            ) else {
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
                fmt_spread(&v),
                fmt_ratio_spread(&q),
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
            let cx = x + (slot - 1.5).max(1.0) / 2.0;
            if score.max > score.min {
                let (hi, lo) = (y(score.max), y(score.min));
                writeln!(
                    out,
                    r##"<line x1="{cx:.1}" y1="{hi:.1}" x2="{cx:.1}" y2="{lo:.1}" stroke="#222" stroke-width="1"/>"##
                )?;
                for cap in [hi, lo] {
                    writeln!(
                        out,
                        r##"<line x1="{:.1}" y1="{cap:.1}" x2="{:.1}" y2="{cap:.1}" stroke="#222" stroke-width="1"/>"##,
                        cx - 2.5,
                        cx + 2.5
                    )?;
                }
            }
            if s > axis_top {
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
