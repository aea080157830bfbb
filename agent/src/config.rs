//! Command line and environment, validated into a [`Config`].

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use regex::Regex;

use crate::{
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
    /// Do not insert `traceparent` into outgoing HTTP requests of traced processes.
    #[arg(long, env = "ZEROTEL_NO_PROPAGATION")]
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
    /// The OTLP settings are invalid.
    #[error(transparent)]
    Export(#[from] ExportConfigError),
}

pub struct Config {
    pub selector: Selector,
    pub propagate: bool,
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
            propagate: !cli.no_propagation,
            export: ExportConfig { print: cli.print || otlp.is_none(), otlp },
            listen: cli.listen,
            shutdown_timeout: Duration::from_secs(cli.shutdown_timeout),
        })
    }
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
    fn bad_endpoint_is_an_error() {
        assert!(parse(&["--otlp-endpoint", "not a url"]).is_err());
    }
}
