//! `bench https`: the `bench http` saturation rounds over TLS. nginx serves HTTPS with a
//! self-signed certificate; wrk (OpenSSL) loads it; traced rounds trace nginx, whose plaintext
//! comes from the OpenSSL uprobes. wrk is not traced. No fixed-rate rounds: the open-loop client
//! of `bench http` speaks plaintext only.

use anyhow::{Context as _, Result};
use serde_json::json;

use super::{
    max_agent, ratio, round, rps, saturation_json, summary, table, Loads, NoHooks, Round,
    Tracer, TARGET_SATURATION_RATIO, TRACED, UNTRACED,
};
use crate::{
    bench::{
        nginx::{Nginx, Site},
        proc::TempDir,
        targets::{targets_markdown, Cmp, Target},
        wrk::{self, WrkResult},
        BenchArgs, Ctx, Report, Scenario,
    },
    util::find_cmd,
};

pub struct Https;

impl Scenario for Https {
    fn name(&self) -> &'static str {
        "https"
    }

    fn run(&self, ctx: &Ctx) -> Result<Report> {
        let a = ctx.args;
        let wrk_bin = find_cmd("wrk").context("wrk is not installed: run `cargo xtask setup`")?;
        // Declared before nginx: dropped after it, so nginx's files outlive nginx.
        let tmp = TempDir::new("https")?;
        let nginx = Nginx::start_site(tmp.path(), &Site::OriginTls)?;
        let url = format!("https://127.0.0.1:{}{}", nginx.port, a.path);
        eprintln!("bench https: nginx master {} workers {:?} on {url}", nginx.master, nginx.workers);
        let loads = Loads { args: a, url: &url, port: nginx.port };
        loads.warm_up(&wrk_bin)?;
        let tracer = match ctx.agent {
            Some(exe) => Some(Tracer::new(exe, nginx.pids(), &a.agent_args, tmp.path().into())?),
            None => None,
        };
        let mut rounds = Vec::new();
        for i in 1..=a.rounds {
            for mode in [UNTRACED, TRACED] {
                let load = || wrk::run(&wrk_bin, &loads.saturate(a.duration));
                rounds.extend(round(tracer.as_ref(), &mode, i, "saturation", &NoHooks, load)?);
            }
        }
        Ok(report(ctx, &rounds))
    }
}

fn report(ctx: &Ctx, rounds: &[Round<WrkResult>]) -> Report {
    let a = ctx.args;
    let targets = targets(rounds);
    let mut json = saturation_json(ctx, "https", rounds);
    json["targets"] = json!(targets);
    let markdown = [heading(a), table(rounds), summary(rounds), targets_markdown(&targets)].concat();
    Report { markdown, json }
}

fn heading(a: &BenchArgs) -> String {
    format!(
        "## bench https: nginx `GET {}` over TLS under `wrk -t{} -c{} -d{}s`, {} rounds per mode\n\n\
         Traced: the agent traces nginx; its plaintext comes from the OpenSSL uprobes.\n\n",
        a.path, a.threads, a.connections, a.duration, a.rounds
    )
}

fn targets(rounds: &[Round<WrkResult>]) -> Vec<Target> {
    vec![
        Target::new("req/s traced/untraced (median)", ratio(rounds, rps), Cmp::AtLeast, TARGET_SATURATION_RATIO, 3),
        Target::new("lost events (worst round)", max_agent(rounds, |g| g.events_lost), Cmp::Equals, 0.0, 0),
    ]
}
