//! Tests of the benchmark's reports (`report.rs`, included as is), run by
//! `cargo test --test bench_report`: the bench itself has no test harness,
//! and a wrong spread or ratio would go unnoticed in a results file.

#[allow(dead_code)]
#[path = "report.rs"]
mod report;

use report::{Results, Row, Spread};

fn row(scenario: &str, metric: &str, higher: bool, rounds: Vec<Vec<Option<f64>>>) -> Row {
    Row {
        scenario: scenario.to_string(),
        metric: metric.to_string(),
        unit: "GB/s".to_string(),
        higher_is_better: higher,
        rounds,
    }
}

fn results(contenders: &[&str], rows: Vec<Row>) -> Results {
    Results {
        title: "t".to_string(),
        date: "2026-01-01".to_string(),
        machine: "m".to_string(),
        rounds: 3,
        contenders: contenders.iter().map(|c| c.to_string()).collect(),
        reference: "tcplb".to_string(),
        notes: vec![],
        rows,
        configs: vec![],
        comparisons: vec![],
    }
}

fn all(values: &[f64]) -> Vec<Option<f64>> {
    values.iter().copied().map(Some).collect()
}

/// The markdown line of `contender`'s row in the table after `## scenario`.
fn table_line<'a>(md: &'a str, scenario: &str, contender: &str) -> &'a str {
    let section = md
        .split(&format!("## {scenario}\n"))
        .nth(1)
        .expect("scenario section");
    section
        .lines()
        .find(|l| l.starts_with(&format!("| {contender} |")))
        .expect("contender line")
}

#[test]
fn ratios_are_taken_per_round_not_from_the_medians() {
    // Medians 4 and 3 (ratio of medians 1.33), but per round the other
    // contender is twice tcplb, except once at a quarter.
    let r = results(
        &["tcplb", "other"],
        vec![row(
            "bulk-1",
            "throughput",
            true,
            vec![all(&[1.0, 16.0, 3.0]), all(&[2.0, 4.0, 6.0])],
        )],
    );
    let md = report::markdown(&r);
    assert_eq!(
        table_line(&md, "bulk-1", "other"),
        "| other | 4.00 (2.00–6.00) | 2.00× (0.25–2.00) |"
    );
    assert_eq!(
        table_line(&md, "bulk-1", "tcplb"),
        "| tcplb | 3.00 (1.00–16.0) | 1 |"
    );
    let csv = report::csv(&r);
    assert!(
        csv.contains("bulk-1,throughput,GB/s,true,other,4,2,6,2,0.25,2,2;4;6\n"),
        "{csv}"
    );
}

#[test]
fn a_round_missing_on_either_side_has_no_ratio() {
    let r = results(
        &["tcplb", "other"],
        vec![row(
            "rr-50",
            "p99",
            false,
            vec![
                vec![Some(10.0), Some(10.0), None],
                vec![Some(20.0), None, Some(1.0)],
            ],
        )],
    );
    let md = report::markdown(&r);
    // Only round 1 has both: one ratio, so no range.
    assert_eq!(
        table_line(&md, "rr-50", "other"),
        "| other | 10.5 (1.00–20.0) | 2.00× |"
    );
    assert!(report::csv(&r).contains(",other,10.5,1,20,2,2,2,20;;1\n"));
}

#[test]
fn a_single_round_shows_no_range() {
    let mut r = results(
        &["tcplb", "other"],
        vec![row(
            "bulk-8",
            "throughput",
            true,
            vec![all(&[1.52]), all(&[0.76])],
        )],
    );
    r.rounds = 1;
    let md = report::markdown(&r);
    assert_eq!(
        table_line(&md, "bulk-8", "other"),
        "| other | 0.760 | 0.50× |"
    );
    assert_eq!(table_line(&md, "bulk-8", "tcplb"), "| tcplb | 1.52 | 1 |");
}

#[test]
fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
    let s = Spread::of([4.0, 1.0, 3.0, f64::NAN, 2.0]).unwrap();
    assert_eq!((s.median, s.min, s.max, s.count), (2.5, 1.0, 4.0, 4));
    assert!(Spread::of([f64::INFINITY]).is_none());
}

#[test]
fn comparisons_show_only_pairs_that_ran() {
    let mut r = results(
        &["tcplb", "tcplb-w2", "haproxy-tuned"],
        vec![row(
            "churn-20",
            "connections",
            true,
            vec![
                all(&[100.0, 100.0]),
                all(&[150.0, 200.0]),
                all(&[90.0, 90.0]),
            ],
        )],
    );
    r.comparisons = vec![
        ("tcplb-w2".to_string(), "tcplb".to_string()),
        ("nginx-w2".to_string(), "tcplb-w2".to_string()),
    ];
    let md = report::markdown(&r);
    let table = md.split("## Comparisons\n").nth(1).expect("comparisons");
    assert!(
        table.contains("| scenario | metric | tcplb-w2 ÷ tcplb |\n"),
        "{table}"
    );
    assert!(
        table.contains("| churn-20 | connections (GB/s) ↑ | 1.75× (1.50–2.00) |"),
        "{table}"
    );
    assert!(!table.contains("nginx"));
}

#[test]
fn configs_are_fenced_whole_even_with_backticks_inside() {
    let mut r = results(&["tcplb"], vec![]);
    r.configs = vec![("tcplb".to_string(), "a ``` b\nc".to_string())];
    let md = report::markdown(&r);
    assert!(md.contains("### tcplb\n\n````\na ``` b\nc\n````\n"), "{md}");
}

#[test]
fn chart_whiskers_span_the_per_round_range() {
    let r = results(
        &["tcplb", "other"],
        vec![row(
            "bulk-1",
            "throughput",
            true,
            vec![all(&[1.0, 1.0, 1.0]), all(&[0.5, 1.0, 1.5])],
        )],
    );
    let svg = report::svg(&r);
    // One whisker (the reference's ratios are all 1, so it has none), and
    // the tooltip carries the spread.
    let whiskers = svg.matches(r##"stroke="#222" stroke-width="1"/>"##).count();
    assert_eq!(whiskers, 3, "a whisker and its two caps:\n{svg}");
    assert!(svg.contains("1.00 (0.500–1.50) GB/s (1.00× (0.50–1.50) of tcplb)"));
}
