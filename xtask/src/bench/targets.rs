//! Benchmark targets: a value, how it must compare with its limit, and the verdict line every
//! report ends with.

use serde::Serialize;

#[derive(Serialize, Clone, Copy)]
pub enum Cmp {
    #[serde(rename = ">=")]
    AtLeast,
    #[serde(rename = "<=")]
    AtMost,
    #[serde(rename = "==")]
    Equals,
}

impl Cmp {
    pub fn holds(self, value: f64, limit: f64) -> bool {
        match self {
            Cmp::AtLeast => value >= limit,
            Cmp::AtMost => value <= limit,
            Cmp::Equals => value == limit,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Cmp::AtLeast => ">=",
            Cmp::AtMost => "<=",
            Cmp::Equals => "==",
        }
    }
}

#[derive(Serialize)]
pub struct Target {
    pub what: &'static str,
    pub value: Option<f64>,
    pub cmp: Cmp,
    pub limit: f64,
    /// None when the value is unknown (no traced rounds, metric not exported).
    pub met: Option<bool>,
    #[serde(skip)]
    pub decimals: usize,
}

impl Target {
    pub fn new(what: &'static str, value: Option<f64>, cmp: Cmp, limit: f64, decimals: usize) -> Self {
        Self {
            what,
            value,
            cmp,
            limit,
            met: value.map(|v| cmp.holds(v, limit)),
            decimals,
        }
    }
}

pub fn targets_markdown(targets: &[Target]) -> String {
    let items: Vec<String> = targets
        .iter()
        .map(|t| {
            let verdict = match t.met {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "n/a",
            };
            format!(
                "{} {} {} {}: {verdict}",
                t.what,
                num(t.value, t.decimals),
                t.cmp.symbol(),
                t.limit
            )
        })
        .collect();
    format!("\ntargets: {}\n", items.join("; "))
}

pub fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.decimals$}"))
}

/// A latency in microseconds as wrk prints it: `812us`, `1.25ms`.
pub fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{us:.0}us")
    }
}

