//! Command line and environment, validated into a [`Config`].

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use regex::Regex;
use zerotel_abi::Sampler;

use crate::{
    probes::Propagation,
    discovery::Selector,
    export::{ExportConfig, ExportConfigError, OtlpConfig},
};

/// zerotel: distributed tracing for unmodified services, from the kernel.
///
/// Traces the HTTP/1 traffic of the selected processes (every process but zerotel itself when no
/// selector is given) and exports spans over OTLP, or prints them.
#[derive(Debug, Parser)]
#[command(name = "zerotel", version)]
pub struct Cli {
    /// Trace this process (repeatable); its children are traced too.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Trace processes listening on this TCP port (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Trace processes whose executable path matches this regex (repeatable).
    #[arg(long = "exe", value_name = "REGEX")]
    pub exes: Vec<String>,
    /// Print one line per span on stdout (the default when no OTLP endpoint is configured).
    #[arg(long)]
    pub print: bool,
    /// OTLP traces endpoint; overrides OTEL_EXPORTER_OTLP_{TRACES_,}ENDPOINT.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// OTLP protocol: grpc or http/protobuf; overrides OTEL_EXPORTER_OTLP_{TRACES_,}PROTOCOL.
    #[arg(long, value_name = "PROTOCOL")]
    pub otlp_protocol: Option<String>,
    /// Insert `traceparent` into outgoing HTTP/1 requests of traced processes: auto (where this
    /// kernel passes the safety self-test), on, or off.
    #[arg(long, value_enum, env = "ZEROTEL_PROPAGATION", default_value = "auto")]
    pub propagation: Propagation,
    /// Same as `--propagation off`.
    #[arg(long)]
    pub no_propagation: bool,
    /// Address serving /healthz and /metrics.
    #[arg(long, value_name = "ADDR", env = "ZEROTEL_LISTEN", default_value = "127.0.0.1:9464")]
    pub listen: SocketAddr,
    /// Longest wait for pending spans to be exported on SIGINT/SIGTERM, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub shutdown_timeout: u64,
}

/// A configuration that cannot work, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An --exe pattern is not a valid regular expression.
    #[error("--exe {pattern:?} is not a valid regex: {source}")]
    BadRegex { pattern: String, source: regex::Error },
    /// OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG name no sampler zerotel can apply.
    #[error("{0}")]
    Sampler(String),
    /// The OTLP settings are invalid.
    #[error(transparent)]
    Export(#[from] ExportConfigError),
}

pub struct Config {
    pub selector: Selector,
    pub propagation: Propagation,
    pub sampler: Sampler,
    pub export: ExportConfig,
    pub listen: SocketAddr,
    pub shutdown_timeout: Duration,
}

impl Config {
    pub fn from_cli(cli: Cli, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let exes = cli
            .exes
            .iter()
            .map(|p| Regex::new(p).map_err(|source| ConfigError::BadRegex { pattern: p.clone(), source }))
            .collect::<Result<_, _>>()?;
        let otlp = OtlpConfig::resolve(cli.otlp_endpoint.as_deref(), cli.otlp_protocol.as_deref(), env)?;
        Ok(Self {
            selector: Selector { pids: cli.pids, ports: cli.ports, exes },
            propagation: if cli.no_propagation { Propagation::Off } else { cli.propagation },
            sampler: sampler_from_env(env)?,
            export: ExportConfig { print: cli.print || otlp.is_none(), otlp },
            listen: cli.listen,
            shutdown_timeout: Duration::from_secs(cli.shutdown_timeout),
        })
    }
}

/// OTEL_TRACES_SAMPLER (default parentbased_always_on) and OTEL_TRACES_SAMPLER_ARG (the ratio).
pub fn sampler_from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Sampler, ConfigError> {
    let name = env("OTEL_TRACES_SAMPLER").filter(|s| !s.is_empty()).unwrap_or_else(|| "parentbased_always_on".into());
    let ratio = || -> Result<f64, ConfigError> {
        let arg = env("OTEL_TRACES_SAMPLER_ARG").filter(|s| !s.is_empty());
        let ratio = arg.as_deref().map_or(Ok(1.0), str::parse::<f64>).map_err(|_| {
            ConfigError::Sampler(format!("OTEL_TRACES_SAMPLER_ARG={:?} is not a ratio between 0 and 1", arg.clone().unwrap_or_default()))
        })?;
        if (0.0..=1.0).contains(&ratio) {
            Ok(ratio)
        } else {
            Err(ConfigError::Sampler(format!("OTEL_TRACES_SAMPLER_ARG={ratio} is outside 0..=1")))
        }
    };
    let (threshold, parent_based) = match name.as_str() {
        "always_on" => (u64::MAX, false),
        "always_off" => (0, false),
        "traceidratio" => (ratio_threshold(ratio()?), false),
        "parentbased_always_on" => (u64::MAX, true),
        "parentbased_always_off" => (0, true),
        "parentbased_traceidratio" => (ratio_threshold(ratio()?), true),
        other => {
            return Err(ConfigError::Sampler(format!(
                "OTEL_TRACES_SAMPLER={other:?} is not supported: use always_on, always_off, traceidratio or their parentbased_ forms"
            )))
        }
    };
    Ok(Sampler { threshold, parent_based: u8::from(parent_based), _pad: [0; 7] })
}

/// TraceIdRatioBased: sampled when the trace id's last 8 bytes are below ratio * 2^64.
fn ratio_threshold(ratio: f64) -> u64 {
    if ratio >= 1.0 { u64::MAX } else { (ratio * 18_446_744_073_709_551_616.0) as u64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let cli = Cli::try_parse_from(std::iter::once("zerotel").chain(args.iter().copied())).expect("parses");
        Config::from_cli(cli, &|_| None)
    }

    #[test]
    fn bad_regex_names_the_pattern() {
        let err = parse(&["--exe", "("]).err().expect("rejected").to_string();
        assert!(err.contains("--exe \"(\""), "{err}");
    }

    #[test]
    fn prints_when_no_endpoint() {
        let config = parse(&["--pid", "1"]).expect("valid");
        assert!(config.export.print && config.export.otlp.is_none());
        assert_eq!(config.selector.pids, vec![1]);
    }

    #[test]
    fn samplers_from_env() {
        let with = |name: &str, arg: &str| {
            let (name, arg) = (name.to_owned(), arg.to_owned());
            sampler_from_env(&move |k| match k {
                "OTEL_TRACES_SAMPLER" => Some(name.clone()),
                "OTEL_TRACES_SAMPLER_ARG" => Some(arg.clone()),
                _ => None,
            })
        };
        assert_eq!(sampler_from_env(&|_| None).unwrap(), Sampler::ALWAYS_ON);
        let half = with("parentbased_traceidratio", "0.5").unwrap();
        assert_eq!((half.threshold, half.parent_based), (1 << 63, 1));
        assert_eq!(with("always_off", "").unwrap().threshold, 0);
        assert!(with("traceidratio", "1.5").is_err());
        assert!(with("traceidratio", "half").is_err());
        let err = with("jaeger_remote", "").unwrap_err().to_string();
        assert!(err.contains("jaeger_remote"), "{err}");
        // Decided from the trace id: the same id gets the same answer everywhere.
        let mut low = [0u8; 16];
        low[8] = 0x10;
        let mut high = [0u8; 16];
        high[8] = 0xf0;
        assert_eq!((half.flags(&low, None), half.flags(&high, None)), (1, 0));
        assert_eq!(half.flags(&high, Some(1)), 1, "parent-based follows the parent");
    }

    #[test]
    fn bad_endpoint_is_an_error() {
        assert!(parse(&["--otlp-endpoint", "not a url"]).is_err());
    }
}
