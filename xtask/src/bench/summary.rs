//! `target/bench/summary.{md,json}`: every target of the latest report of each scenario in one
//! table, rewritten after every `bench` run (the README quotes it).

use std::{fs, path::Path};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::Value;

use super::targets::num;

const NAME: &str = "summary";

#[derive(Serialize)]
struct Row {
    scenario: String,
    agent_rev: String,
    what: String,
    value: Option<f64>,
    cmp: String,
    limit: f64,
    met: Option<bool>,
}

/// Collect the targets of every report in `dir` and write the summary beside them.
pub fn write(dir: &Path) -> Result<()> {
    let mut reports: Vec<(String, Value)> = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let Some(scenario) = path.file_stem().and_then(|s| s.to_str()).map(str::to_string) else { continue };
        if path.extension().is_none_or(|e| e != "json") || scenario == NAME {
            continue;
        }
        let text = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        // A report from an older bench version, or cut short: left out, not fatal.
        match serde_json::from_str(&text) {
            Ok(json) => reports.push((scenario, json)),
            Err(e) => eprintln!("bench: summary skips {}: {e}", path.display()),
        }
    }
    reports.sort_by(|a, b| a.0.cmp(&b.0));
    let rows: Vec<Row> = reports.iter().flat_map(|(scenario, json)| rows(scenario, json)).collect();
    let markdown = markdown(&rows);
    fs::write(dir.join(format!("{NAME}.md")), &markdown)?;
    fs::write(dir.join(format!("{NAME}.json")), serde_json::to_string_pretty(&rows)?)?;
    println!("{markdown}");
    eprintln!("bench: wrote {}", dir.join(format!("{NAME}.md")).display());
    Ok(())
}

fn rows(scenario: &str, report: &Value) -> Vec<Row> {
    let machine = &report["machine"];
    let rev = machine["agent_rev"].as_str().unwrap_or("unknown");
    let agent_rev = match machine["agent_bin"].as_str() {
        Some(path) => format!("{path} (tree {rev})"),
        None => rev.to_string(),
    };
    let Some(targets) = report["targets"].as_array() else { return Vec::new() };
    targets
        .iter()
        .map(|t| Row {
            scenario: scenario.to_string(),
            agent_rev: agent_rev.clone(),
            what: t["what"].as_str().unwrap_or_default().to_string(),
            value: t["value"].as_f64(),
            cmp: t["cmp"].as_str().unwrap_or_default().to_string(),
            limit: t["limit"].as_f64().unwrap_or(f64::NAN),
            met: t["met"].as_bool(),
        })
        .collect()
}

fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "## bench summary: the latest report of each scenario\n\n\
         | scenario | target | value | limit | verdict | zerotel |\n|---|---|---:|---:|---|---|\n",
    );
    for row in rows {
        let verdict = match row.met {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "n/a",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} {} | {verdict} | {} |\n",
            row.scenario,
            row.what,
            num(row.value, decimals(row.value)),
            row.cmp,
            row.limit,
            row.agent_rev
        ));
    }
    let met = rows.iter().filter(|r| r.met == Some(true)).count();
    out.push_str(&format!("\n{met} of {} targets met.\n", rows.len()));
    out
}

/// Enough decimals for ratios (0.639), few for big numbers (5651).
fn decimals(value: Option<f64>) -> usize {
    match value.map(f64::abs) {
        Some(v) if v < 10.0 => 3,
        Some(v) if v < 100.0 => 1,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_gives_one_row_per_target() {
        let report = serde_json::json!({
            "machine": { "agent_rev": "abc1234" },
            "targets": [
                { "what": "req/s traced/untraced", "value": 0.64, "cmp": ">=", "limit": 0.97, "met": false },
                { "what": "lost events", "value": 0.0, "cmp": "==", "limit": 0.0, "met": true },
                { "what": "kernel ns/request", "value": null, "cmp": "<=", "limit": 500.0, "met": null },
            ]
        });
        let rows = rows("http", &report);
        assert_eq!(rows.len(), 3);
        let table = markdown(&rows);
        assert!(table.contains("| http | req/s traced/untraced | 0.640 | >= 0.97 | **not met** | abc1234 |"), "{table}");
        assert!(table.contains("| http | lost events | 0.000 | == 0 | met | abc1234 |"), "{table}");
        assert!(table.contains("| kernel ns/request | n/a | <= 500 | n/a |"), "{table}");
        assert!(table.ends_with("1 of 3 targets met.\n"), "{table}");
    }

    #[test]
    fn a_report_of_another_binary_names_it() {
        let report = serde_json::json!({
            "machine": { "agent_rev": "abc1234", "agent_bin": "/tmp/zt-old" },
            "targets": [{ "what": "x", "value": 1.0, "cmp": "<=", "limit": 2.0, "met": true }]
        });
        assert_eq!(rows("http", &report)[0].agent_rev, "/tmp/zt-old (tree abc1234)");
    }

    #[test]
    fn a_report_without_targets_gives_no_rows() {
        assert!(rows("x", &serde_json::json!({ "machine": {} })).is_empty());
    }
}
