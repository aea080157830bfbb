//! Command line, `ZEROTEL_*` environment and config file, merged and validated into a [`Config`].
//! Precedence: command line, then environment, then file, then defaults.

pub mod file;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use regex::Regex;
use zerotel_abi::Sampler;

use crate::{
    discovery::selection::{GlobList, Rule, Selection},
    export::{ExportConfig, ExportConfigError, OtlpConfig},
    kubernetes::KubeSettings,
    probes::Propagation,
    spans::db::QueryText,
};
use file::{FileConfig, FileError, RuleError};

/// zerotel: distributed tracing for unmodified services, from the kernel.
///
/// Traces the HTTP/1, HTTP/2 and gRPC, Kafka and PostgreSQL traffic, plaintext or through
/// OpenSSL, of the selected processes (every process but zerotel itself, the kube-system
/// namespace and other telemetry agents when nothing is selected) and exports spans over OTLP, or
/// prints them. Every flag can also be set in the environment (`ZEROTEL_<FLAG>`)
/// or in the `--config` file (`flag_name: value`).
#[derive(Debug, Parser)]
#[command(name = "zerotel", version)]
pub struct Cli {
    /// YAML config file: these flags as keys, plus `include`/`exclude` rules (see deploy/base/configmap.yaml).
    #[arg(long, value_name = "PATH", env = "ZEROTEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Trace this process (repeatable); its children are traced too, unless they start in
    /// another cgroup (a container runtime starting a container).
    #[arg(long = "pid", value_name = "PID", env = "ZEROTEL_PID", value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Trace processes listening on this TCP port (repeatable).
    #[arg(long = "port", value_name = "PORT", env = "ZEROTEL_PORT", value_delimiter = ',')]
    pub ports: Vec<u16>,
    /// Trace processes whose executable path matches this regex (repeatable).
    #[arg(long = "exe", value_name = "REGEX", env = "ZEROTEL_EXE")]
    pub exes: Vec<String>,
    /// Trace pods of this Kubernetes namespace (glob, repeatable); combined with --pid/--port/--exe,
    /// only their processes in these namespaces.
    #[arg(long = "k8s-namespace", value_name = "GLOB", env = "ZEROTEL_K8S_NAMESPACE", value_delimiter = ',')]
    pub k8s_namespaces: Vec<String>,
    /// Never trace pods of this namespace (glob, repeatable).
    #[arg(long = "exclude-k8s-namespace", value_name = "GLOB", env = "ZEROTEL_EXCLUDE_K8S_NAMESPACE", value_delimiter = ',')]
    pub exclude_k8s_namespaces: Vec<String>,
    /// Do not exclude kube-system and other telemetry agents by default.
    #[arg(long, env = "ZEROTEL_NO_DEFAULT_EXCLUDES")]
    pub no_default_excludes: bool,
    /// Print one line per span on stdout (the default when no OTLP endpoint is configured).
    #[arg(long, env = "ZEROTEL_PRINT")]
    pub print: bool,
    /// OTLP traces endpoint; overrides OTEL_EXPORTER_OTLP_{TRACES_,}ENDPOINT.
    #[arg(long, value_name = "URL", env = "ZEROTEL_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// OTLP protocol: grpc or http/protobuf; overrides OTEL_EXPORTER_OTLP_{TRACES_,}PROTOCOL.
    #[arg(long, value_name = "PROTOCOL", env = "ZEROTEL_OTLP_PROTOCOL")]
    pub otlp_protocol: Option<String>,
    /// Insert `traceparent` into outgoing HTTP/1 requests of traced processes: auto (where this
    /// kernel passes the safety self-test; the default), on, or off.
    #[arg(long, value_enum, env = "ZEROTEL_PROPAGATION")]
    pub propagation: Option<Propagation>,
    /// Same as `--propagation off`.
    #[arg(long)]
    pub no_propagation: bool,
    /// Address serving /healthz and /metrics [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR", env = "ZEROTEL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Most spans held for export (queued, in flight, awaiting a retry); more are dropped and
    /// counted. Overrides OTEL_BSP_MAX_QUEUE_SIZE [default: 8192].
    #[arg(long, value_name = "SPANS", env = "ZEROTEL_EXPORT_QUEUE_SIZE")]
    pub export_queue_size: Option<usize>,
    /// The one-agent-per-host lock: a second agent holding the same file refuses to start
    /// [default: /run/zerotel.lock].
    #[arg(long, value_name = "PATH", env = "ZEROTEL_LOCK_FILE")]
    pub lock_file: Option<PathBuf>,
    /// Longest wait for pending spans to be exported on SIGINT/SIGTERM, in seconds [default: 5].
    #[arg(long, value_name = "SECONDS", env = "ZEROTEL_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<u64>,
    /// Pod metadata from the Kubernetes API: auto (when the node name is known; the default), on, off.
    #[arg(long, value_enum, env = "ZEROTEL_KUBERNETES")]
    pub kubernetes: Option<KubernetesMode>,
    /// This node's name, to watch only its pods [default: $NODE_NAME].
    #[arg(long, value_name = "NAME", env = "ZEROTEL_NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubeconfig to reach the API with [default: in-cluster service account, else $KUBECONFIG].
    #[arg(long, value_name = "PATH", env = "ZEROTEL_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Export SQL statements as sent, literals included (by default they are replaced by `?`:
    /// literals may be personal data).
    #[arg(long, env = "ZEROTEL_RAW_SQL")]
    pub raw_sql: bool,
    /// Validate the configuration, print the effective selection and exit.
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KubernetesMode {
    Auto,
    On,
    Off,
}

/// A configuration that cannot work, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An --exe pattern is not a valid regular expression.
    #[error("--exe {pattern:?} is not a valid regex: {source}")]
    BadRegex { pattern: String, source: regex::Error },
    /// A namespace glob is invalid.
    #[error("{flag} {source}")]
    BadGlob { flag: &'static str, source: Box<crate::discovery::selection::BadGlob> },
    /// OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG name no sampler zerotel can apply.
    #[error("{0}")]
    Sampler(String),
    /// The OTLP settings are invalid.
    #[error(transparent)]
    Export(#[from] ExportConfigError),
    /// The config file is unreadable or invalid.
    #[error(transparent)]
    File(#[from] FileError),
    /// A rule of the config file is invalid.
    #[error("config file {path}: {list} rule {index}: {source}")]
    Rule { path: PathBuf, list: &'static str, index: usize, source: Box<RuleError> },
    /// A value of the config file is out of its domain.
    #[error("config file {path}: {key}: {message}")]
    Value { path: PathBuf, key: &'static str, message: String },
    /// Rules use Kubernetes keys but no pod metadata can be had.
    #[error("{0}")]
    Kubernetes(String),
}

pub struct Config {
    pub selection: Selection,
    pub propagation: Propagation,
    pub sampler: Sampler,
    pub export: ExportConfig,
    pub listen: SocketAddr,
    pub shutdown_timeout: Duration,
    pub lock_file: PathBuf,
    /// None: no pod metadata (not on Kubernetes, or turned off).
    pub kubernetes: Option<KubeSettings>,
    /// The user's rules use Kubernetes keys: without the API they would select or exclude wrongly.
    pub kubernetes_required: bool,
    pub check_only: bool,
    pub query_text: QueryText,
}

/// The export stage's share of the shutdown timeout: the stages before it drain first (in
/// milliseconds), and what it could not send must still be counted before the timeout.
fn flush_timeout(shutdown_timeout: Duration) -> Duration {
    shutdown_timeout.saturating_sub(Duration::from_millis(500)).max(shutdown_timeout / 2)
}

/// Executables of telemetry agents (their traffic is telemetry, not the application's).
const TELEMETRY_AGENTS: &str = r"/(otelcol[^/]*|otel-collector|beyla|obi|ebpf-instrument|alloy|grafana-agent|datadog-agent|trace-agent|system-probe|fluent-bit|fluentd|td-agent-bit|vector|promtail|filebeat|metricbeat|node_exporter|odigos[^/]*|zerotel)$";

impl Config {
    pub fn from_cli(cli: Cli, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let path = cli.config.clone().unwrap_or_default();
        let file = match &cli.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let value_error = |key: &'static str, message: String| ConfigError::Value { path: path.clone(), key, message };
        let propagation = match (cli.no_propagation, cli.propagation, &file.propagation) {
            (true, _, _) => Propagation::Off,
            (false, Some(p), _) => p,
            (false, None, Some(p)) => Propagation::from_str(p, true).map_err(|m| value_error("propagation", m))?,
            (false, None, None) => Propagation::Auto,
        };
        let kubernetes_mode = match (cli.kubernetes, &file.kubernetes) {
            (Some(m), _) => m,
            (None, Some(m)) => KubernetesMode::from_str(m, true).map_err(|m| value_error("kubernetes", m))?,
            (None, None) => KubernetesMode::Auto,
        };
        let node_name = cli.node_name.clone().or(file.node_name.clone()).or_else(|| env("NODE_NAME")).filter(|n| !n.is_empty());
        let (selection, kubernetes_required) = selection(&cli, &file, &path)?;
        let kubernetes = kube_settings(kubernetes_mode, node_name, cli.kubeconfig.clone().or(file.kubeconfig.clone()), &selection)?;
        let otlp_endpoint = cli.otlp_endpoint.as_deref().or(file.otlp_endpoint.as_deref());
        let otlp_protocol = cli.otlp_protocol.as_deref().or(file.otlp_protocol.as_deref());
        let queue_size = cli.export_queue_size.or(file.export_queue_size);
        let otlp = OtlpConfig::resolve(otlp_endpoint, otlp_protocol, queue_size, env)?;
        let print = cli.print || file.print.unwrap_or(false) || otlp.is_none();
        let shutdown_timeout = Duration::from_secs(cli.shutdown_timeout.or(file.shutdown_timeout).unwrap_or(5));
        Ok(Self {
            selection,
            propagation,
            sampler: sampler_from_env(env)?,
            export: ExportConfig { print, otlp, flush_timeout: flush_timeout(shutdown_timeout) },
            listen: cli.listen.or(file.listen).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9464))),
            shutdown_timeout,
            lock_file: cli.lock_file.clone().or(file.lock_file.clone()).unwrap_or_else(|| crate::probes::DEFAULT_LOCK_FILE.into()),
            kubernetes,
            kubernetes_required,
            check_only: cli.check_config,
            query_text: if cli.raw_sql || file.raw_sql.unwrap_or(false) { QueryText::Raw } else { QueryText::Sanitized },
        })
    }
}

impl Config {
    /// The effective configuration, for `--check-config`.
    pub fn describe(&self) -> String {
        let mut out = String::from("configuration is valid\ninclude:\n");
        if self.selection.include.is_empty() {
            out.push_str("  - every process\n");
        }
        for rule in &self.selection.include {
            out.push_str(&format!("  - {rule}\n"));
        }
        out.push_str("exclude:\n");
        for rule in &self.selection.exclude {
            out.push_str(&format!("  - {rule}\n"));
        }
        let kubernetes = match &self.kubernetes {
            Some(k) => format!("pods of node {:?} (kubeconfig: {})", k.node_name, k.kubeconfig.as_ref().map_or("in-cluster or $KUBECONFIG".into(), |p| p.display().to_string())),
            None => "off".into(),
        };
        out.push_str(&format!("kubernetes: {kubernetes}\n"));
        let otlp = self.export.otlp.as_ref().map_or("none".to_owned(), |o| o.endpoint.to_string());
        out.push_str(&format!("otlp_endpoint: {otlp}\nprint: {}\npropagation: {:?}\nlisten: {}\n", self.export.print, self.propagation, self.listen));
        out
    }
}

/// Include rules from the command line replace the file's; excludes add up. Also says whether the
/// rules written by the user (not the default excludes) need pod metadata.
fn selection(cli: &Cli, file: &FileConfig, path: &std::path::Path) -> Result<(Selection, bool), ConfigError> {
    let compile = |list: &'static str, specs: &Option<Vec<file::RuleSpec>>| -> Result<Vec<Rule>, ConfigError> {
        let specs = specs.iter().flatten().enumerate();
        specs
            .map(|(i, spec)| spec.compile().map_err(|source| ConfigError::Rule { path: path.into(), list, index: i + 1, source: Box::new(source) }))
            .collect()
    };
    let from_cli = cli_includes(cli)?;
    let include = if from_cli.is_empty() { compile("include", &file.include)? } else { from_cli };
    let mut exclude = compile("exclude", &file.exclude)?;
    if !cli.exclude_k8s_namespaces.is_empty() {
        let namespaces = namespace_globs("--exclude-k8s-namespace", &cli.exclude_k8s_namespaces)?;
        exclude.push(Rule { k8s_namespace: Some(namespaces), ..Rule::default() });
    }
    let mut selection = Selection { include, exclude };
    let needs_pod_metadata = selection.uses_kubernetes();
    if !cli.no_default_excludes && file.default_excludes.unwrap_or(true) {
        selection.exclude.extend(default_excludes());
    }
    Ok((selection, needs_pod_metadata))
}

/// `--pid`, `--port` and each `--exe` select on their own (any of them); `--k8s-namespace`
/// narrows them to those namespaces, or alone selects the namespaces.
fn cli_includes(cli: &Cli) -> Result<Vec<Rule>, ConfigError> {
    let namespaces = if cli.k8s_namespaces.is_empty() {
        None
    } else {
        Some(namespace_globs("--k8s-namespace", &cli.k8s_namespaces)?)
    };
    let mut rules = Vec::new();
    if !cli.pids.is_empty() {
        rules.push(Rule { pids: cli.pids.clone(), ..Rule::default() });
    }
    if !cli.ports.is_empty() {
        rules.push(Rule { open_ports: cli.ports.clone(), ..Rule::default() });
    }
    for pattern in &cli.exes {
        let re = Regex::new(pattern).map_err(|source| ConfigError::BadRegex { pattern: pattern.clone(), source })?;
        rules.push(Rule { exe_path: Some(re), ..Rule::default() });
    }
    if namespaces.is_some() && rules.is_empty() {
        rules.push(Rule::default());
    }
    for rule in &mut rules {
        rule.k8s_namespace = namespaces.clone();
    }
    Ok(rules)
}

fn namespace_globs(flag: &'static str, patterns: &[String]) -> Result<GlobList, ConfigError> {
    GlobList::new(patterns).map_err(|source| ConfigError::BadGlob { flag, source: Box::new(source) })
}

/// The control plane and node add-ons, and telemetry agents (zerotel's own pod included).
fn default_excludes() -> Vec<Rule> {
    let kube_system = GlobList::new(&["kube-system".to_owned()]).expect("static glob");
    let agents = Regex::new(TELEMETRY_AGENTS).expect("static regex");
    vec![
        Rule { k8s_namespace: Some(kube_system), ..Rule::default() },
        Rule { exe_path: Some(agents), ..Rule::default() },
    ]
}

fn kube_settings(
    mode: KubernetesMode,
    node_name: Option<String>,
    kubeconfig: Option<PathBuf>,
    selection: &Selection,
) -> Result<Option<KubeSettings>, ConfigError> {
    let user_rules_need_it = selection.includes_by_kubernetes();
    match (mode, node_name) {
        (KubernetesMode::Off, _) if user_rules_need_it => Err(ConfigError::Kubernetes(
            "include rules use Kubernetes keys (k8s_*, container_name) but --kubernetes is off".into(),
        )),
        (KubernetesMode::Off, _) => Ok(None),
        (_, Some(node_name)) => Ok(Some(KubeSettings { node_name, kubeconfig })),
        (KubernetesMode::On, None) => Err(ConfigError::Kubernetes(
            "--kubernetes on needs this node's name: set NODE_NAME from the downward API (fieldRef spec.nodeName) or pass --node-name".into(),
        )),
        (KubernetesMode::Auto, None) if user_rules_need_it => Err(ConfigError::Kubernetes(
            "include rules use Kubernetes keys (k8s_*, container_name) but this node's name is unknown: set NODE_NAME from the downward API (fieldRef spec.nodeName) or pass --node-name".into(),
        )),
        (KubernetesMode::Auto, None) => Ok(None),
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
        assert_eq!(config.selection.include[0].pids, vec![1]);
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

    fn facts_in(namespace: &str) -> (std::collections::BTreeMap<String, String>, String) {
        (std::collections::BTreeMap::new(), namespace.to_owned())
    }

    fn decide(selection: &Selection, pid: u32, exe: &str, namespace: Option<&str>) -> crate::discovery::selection::Decision {
        use crate::discovery::selection::{Facts, PodFacts, PodView};
        let (labels, ns) = facts_in(namespace.unwrap_or_default());
        let view = PodView { namespace: &ns, labels: &labels, owners: &[], container: None };
        let pod = if namespace.is_some() { PodFacts::Known(&view) } else { PodFacts::NotInPod };
        selection.decide(&Facts { pid, exe: Some(exe), open_ports: &[], pod })
    }

    #[test]
    fn namespace_flags_select_and_narrow() {
        use crate::discovery::selection::Decision::*;
        let config = parse(&["--k8s-namespace", "shop", "--k8s-namespace", "pay-*", "--node-name", "n1"]).expect("valid");
        assert_eq!(decide(&config.selection, 7, "/bin/app", Some("pay-eu")), Trace);
        assert_eq!(decide(&config.selection, 7, "/bin/app", Some("dev")), NotIncluded);
        assert_eq!(decide(&config.selection, 7, "/bin/app", None), NotIncluded);
        assert_eq!(config.kubernetes.expect("on with a node name").node_name, "n1");
        let narrowed = parse(&["--k8s-namespace", "shop", "--exe", "java", "--node-name", "n1"]).expect("valid");
        assert_eq!(decide(&narrowed.selection, 7, "/usr/bin/java", Some("shop")), Trace);
        assert_eq!(decide(&narrowed.selection, 7, "/usr/bin/python3", Some("shop")), NotIncluded);
        assert_eq!(decide(&narrowed.selection, 7, "/usr/bin/java", Some("dev")), NotIncluded);
    }

    #[test]
    fn defaults_exclude_kube_system_and_telemetry_agents() {
        use crate::discovery::selection::Decision::*;
        let config = parse(&[]).expect("valid");
        assert!(config.kubernetes.is_none(), "no node name: no pod metadata");
        assert_eq!(decide(&config.selection, 7, "/usr/sbin/nginx", Some("shop")), Trace);
        assert_eq!(decide(&config.selection, 7, "/usr/sbin/nginx", Some("kube-system")), Excluded);
        assert_eq!(decide(&config.selection, 7, "/otelcol-contrib", None), Excluded);
        assert_eq!(decide(&config.selection, 7, "/usr/bin/beyla", None), Excluded);
        let all = parse(&["--no-default-excludes"]).expect("valid");
        assert!(all.selection.traces_everything());
    }

    #[test]
    fn kubernetes_rules_need_a_node_name() {
        let err = parse(&["--k8s-namespace", "shop"]).err().expect("rejected").to_string();
        assert!(err.contains("NODE_NAME"), "{err}");
        let cli = Cli::try_parse_from(["zerotel", "--k8s-namespace", "shop"]).expect("parses");
        let config = Config::from_cli(cli, &|k| (k == "NODE_NAME").then(|| "node-7".to_owned())).expect("valid");
        assert_eq!(config.kubernetes.expect("on").node_name, "node-7");
        assert!(parse(&["--kubernetes", "on"]).is_err());
        assert!(parse(&["--kubernetes", "off", "--k8s-namespace", "x"]).is_err());
    }

    #[test]
    fn command_line_beats_the_file() {
        let dir = std::env::temp_dir().join(format!("zerotel-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("config.yaml");
        std::fs::write(&path, "include:\n  - k8s_namespace: shop\nnode_name: from-file\nlisten: 127.0.0.1:9999\npropagation: off\nshutdown_timeout: 9\n").expect("write");
        let file = path.to_str().expect("utf-8 path");
        let config = parse(&["--config", file, "--listen", "127.0.0.1:7777"]).expect("valid");
        assert_eq!(config.listen.port(), 7777, "flag over file");
        assert_eq!(config.shutdown_timeout, Duration::from_secs(9), "file over default");
        assert_eq!(config.propagation, Propagation::Off);
        assert_eq!(config.kubernetes.expect("node name from the file").node_name, "from-file");
        assert_eq!(config.selection.include[0].k8s_namespace.as_ref().expect("file rule").patterns, vec!["shop"]);
        let replaced = parse(&["--config", file, "--k8s-namespace", "pay"]).expect("valid");
        assert_eq!(replaced.selection.include.len(), 1);
        assert_eq!(replaced.selection.include[0].k8s_namespace.as_ref().expect("flag rule").patterns, vec!["pay"]);
        std::fs::write(&path, "include:\n  - namespace: shop\n").expect("write");
        let err = parse(&["--config", file]).err().expect("rejected").to_string();
        assert!(err.contains("namespace") && err.contains(file), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The ConfigMap shipped in deploy/ is what the loader reads in a pod.
    #[test]
    fn shipped_configmap_parses() {
        #[derive(serde::Deserialize)]
        struct ConfigMap {
            data: std::collections::BTreeMap<String, String>,
        }
        for manifest in [
            include_str!("../../../deploy/base/configmap.yaml"),
            include_str!("../../../deploy/overlays/namespace-filter/config.yaml"),
        ] {
            let map: ConfigMap = serde_saphyr::from_str(manifest).expect("a ConfigMap");
            let text = map.data.get("config.yaml").expect("config.yaml key");
            let file = FileConfig::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            for spec in file.include.iter().chain(&file.exclude).flatten() {
                spec.compile().unwrap_or_else(|e| panic!("{e}\n{text}"));
            }
        }
    }
}
