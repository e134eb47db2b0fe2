//! The benchmark's results: one row per metric, the percentiles behind them, the printed
//! table and `target/ember-bench.json`. Measures nothing itself.

use serde::Serialize;

use crate::common;

/// One metric of one scenario, with its baseline when there is one.
#[derive(Serialize, Clone)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub ember: f64,
    pub baseline: Option<f64>,
    pub ratio: Option<f64>,
    pub unit: String,
}

/// A row; the ratio is `ember / baseline` when the baseline is there and not zero.
pub fn row(scenario: &str, metric: &str, ember: f64, baseline: Option<f64>, unit: &str) -> Row {
    Row {
        scenario: scenario.into(),
        metric: metric.into(),
        ember,
        baseline,
        ratio: baseline.filter(|b| *b != 0.0).map(|b| ember / b),
        unit: unit.into(),
    }
}

/// The value at fraction `p` of `sorted` (nearest rank); NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// `v` in ascending order.
pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

/// Prints the rows as a table on stdout.
pub fn print_table(rows: &[Row]) {
    println!(
        "\n{:<14} {:<44} {:>12} {:>12} {:>8}  unit",
        "scenario", "metric", "ember", "baseline", "ratio"
    );
    for r in rows {
        let b = r.baseline.map_or("-".into(), |b| format!("{b:.3}"));
        let ratio = r.ratio.map_or("-".into(), |x| format!("{x:.3}"));
        println!(
            "{:<14} {:<44} {:>12.3} {:>12} {:>8}  {}",
            r.scenario, r.metric, r.ember, b, ratio, r.unit
        );
    }
}

/// Writes the rows to `target/ember-bench.json` and says where.
pub fn write_json(rows: &[Row]) {
    let out = common::repo().join("target/ember-bench.json");
    std::fs::write(&out, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    println!("\nwritten to {}", out.display());
}
