//! The YAML config file (`--config`): every key the command line has, plus include and exclude
//! rules. Unknown keys are errors that name the key, so a typo never silently traces too much.

use std::{collections::BTreeMap, net::SocketAddr, path::{Path, PathBuf}};

use regex::Regex;
use serde::Deserialize;

use crate::discovery::selection::{glob, BadGlob, GlobList, Rule};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Processes to trace; none: every process.
    pub include: Option<Vec<RuleSpec>>,
    /// Processes never traced, even when an include rule matches.
    pub exclude: Option<Vec<RuleSpec>>,
    /// Also exclude kube-system and other telemetry agents (default true).
    pub default_excludes: Option<bool>,
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: Option<String>,
    /// auto, on or off.
    pub propagation: Option<String>,
    pub listen: Option<SocketAddr>,
    pub print: Option<bool>,
    pub shutdown_timeout: Option<u64>,
    pub export_queue_size: Option<usize>,
    pub lock_file: Option<PathBuf>,
    /// auto (when a node name is known), on or off.
    pub kubernetes: Option<String>,
    pub node_name: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    /// Export SQL with its literals (default false: replaced by `?`).
    pub raw_sql: Option<bool>,
}

/// One rule as written: every key given must match; lists match any element.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub k8s_namespace: Option<OneOrMany<String>>,
    pub k8s_pod_labels: Option<BTreeMap<String, String>>,
    pub k8s_owner_name: Option<OneOrMany<String>>,
    pub k8s_deployment: Option<OneOrMany<String>>,
    pub container_name: Option<OneOrMany<String>>,
    pub open_ports: Option<OneOrMany<u16>>,
    pub exe_path: Option<String>,
}

/// `key: value` or `key: [values]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// A config file that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file cannot be read.
    #[error("config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Not YAML, a wrong type, or an unknown key.
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A rule value that does not compile.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("{key}: {source}")]
    Glob { key: &'static str, source: BadGlob },
    #[error("exe_path: {pattern:?} is not a valid regex: {source}")]
    Regex { pattern: String, source: regex::Error },
    #[error("a rule must set at least one key (k8s_namespace, k8s_pod_labels, k8s_owner_name, k8s_deployment, container_name, open_ports, exe_path)")]
    Empty,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read { path: path.into(), source })?;
        Self::parse(&text).map_err(|message| FileError::Invalid { path: path.into(), message })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default()); // a ConfigMap with every line commented out
        }
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }
}

impl RuleSpec {
    pub fn compile(&self) -> Result<Rule, RuleError> {
        let globs = |key: &'static str, value: &Option<OneOrMany<String>>| -> Result<Option<GlobList>, RuleError> {
            let Some(value) = value else { return Ok(None) };
            GlobList::new(&value.to_vec()).map(Some).map_err(|source| RuleError::Glob { key, source })
        };
        let labels = self
            .k8s_pod_labels
            .iter()
            .flatten()
            .map(|(key, pattern)| {
                let matcher = glob(pattern).map_err(|source| RuleError::Glob {
                    key: "k8s_pod_labels",
                    source: BadGlob { pattern: pattern.clone(), source },
                })?;
                Ok((key.clone(), matcher.compile_matcher()))
            })
            .collect::<Result<_, RuleError>>()?;
        let exe_path = self
            .exe_path
            .as_deref()
            .map(|p| Regex::new(p).map_err(|source| RuleError::Regex { pattern: p.to_owned(), source }))
            .transpose()?;
        let rule = Rule {
            pids: Vec::new(),
            open_ports: self.open_ports.as_ref().map(OneOrMany::to_vec).unwrap_or_default(),
            exe_path,
            k8s_namespace: globs("k8s_namespace", &self.k8s_namespace)?,
            k8s_pod_labels: labels,
            k8s_owner_name: globs("k8s_owner_name", &self.k8s_owner_name)?,
            k8s_deployment: globs("k8s_deployment", &self.k8s_deployment)?,
            container_name: globs("container_name", &self.container_name)?,
        };
        if rule.is_empty() {
            return Err(RuleError::Empty);
        }
        Ok(rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named() {
        let err = FileConfig::parse("include:\n  - k8s_namespace: shop\notlp_endpont: http://x\n").unwrap_err();
        assert!(err.contains("otlp_endpont"), "{err}");
        let err = FileConfig::parse("include:\n  - k8s_namespaces: [shop]\n").unwrap_err();
        assert!(err.contains("k8s_namespaces"), "{err}");
    }

    #[test]
    fn rules_take_one_value_or_a_list() {
        let config = FileConfig::parse(
            "include:\n  - k8s_namespace: shop\n    open_ports: [80, 8080]\n  - k8s_namespace: ['pay-*', billing]\n    exe_path: '^/usr/bin/java$'\n    k8s_pod_labels: {tier: 'front*'}\ndefault_excludes: false\n",
        )
        .expect("valid");
        let include = config.include.expect("include rules");
        let first = include[0].compile().expect("compiles");
        assert_eq!(first.k8s_namespace.expect("namespaces").patterns, vec!["shop"]);
        assert_eq!(first.open_ports, vec![80, 8080]);
        let second = include[1].compile().expect("compiles");
        assert!(second.k8s_namespace.as_ref().expect("namespaces").matches("pay-eu"));
        assert!(second.k8s_pod_labels[0].1.is_match("frontend"));
        assert_eq!(config.default_excludes, Some(false));
    }

    #[test]
    fn bad_values_say_which() {
        assert!(FileConfig::parse("listen: nowhere\n").is_err());
        assert!(FileConfig::parse("include: {k8s_namespace: shop}\n").is_err(), "include is a list");
        let bad_regex = RuleSpec { exe_path: Some("(".into()), ..RuleSpec::default() };
        assert!(bad_regex.compile().unwrap_err().to_string().contains("exe_path"));
        let bad_glob = RuleSpec { k8s_namespace: Some(OneOrMany::One("a[".into())), ..RuleSpec::default() };
        assert!(bad_glob.compile().unwrap_err().to_string().contains("k8s_namespace: \"a[\""));
        assert!(matches!(RuleSpec::default().compile(), Err(RuleError::Empty)));
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let config = FileConfig::parse("# all commented out\n").expect("valid");
        assert!(config.include.is_none() && config.exclude.is_none());
    }
}
