//! Which processes are traced: include and exclude rules matched against what is known of a
//! process (pure; no I/O). Kubernetes facts may arrive after the process does, so a rule can be
//! undecided for a while: the caller waits for the metadata, then settles without it.

use std::collections::BTreeMap;

use globset::{Glob, GlobMatcher, GlobSet, GlobSetBuilder};
use regex::Regex;

/// One rule: every key it sets must match (AND); a key's list matches when any element does (OR).
#[derive(Debug, Clone, Default)]
pub struct Rule {
    /// Process ids (command line only: pids do not survive a restart).
    pub pids: Vec<u32>,
    /// The process listens on one of these TCP ports.
    pub open_ports: Vec<u16>,
    /// The executable's path matches.
    pub exe_path: Option<Regex>,
    pub k8s_namespace: Option<GlobList>,
    /// Every label named must be present with a value matching its glob.
    pub k8s_pod_labels: Vec<(String, GlobMatcher)>,
    /// The pod's owner, or its owner's owner (ReplicaSet, Deployment, Job, CronJob, ...).
    pub k8s_owner_name: Option<GlobList>,
    /// The pod's Deployment.
    pub k8s_deployment: Option<GlobList>,
    pub container_name: Option<GlobList>,
}

/// Globs as written (for messages) and compiled (for matching).
#[derive(Debug, Clone)]
pub struct GlobList {
    pub patterns: Vec<String>,
    set: GlobSet,
}

/// A glob that does not compile, and why.
#[derive(Debug, thiserror::Error)]
#[error("{pattern:?} is not a valid glob: {source}")]
pub struct BadGlob {
    pub pattern: String,
    pub source: globset::Error,
}

impl GlobList {
    pub fn new(patterns: &[String]) -> Result<Self, BadGlob> {
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            builder.add(glob(pattern).map_err(|source| BadGlob { pattern: pattern.clone(), source })?);
        }
        let set = builder.build().map_err(|source| BadGlob { pattern: patterns.join(","), source })?;
        Ok(Self { patterns: patterns.to_vec(), set })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.set.is_match(name)
    }
}

/// Kubernetes names contain no '/': `*` matches any run of characters.
pub fn glob(pattern: &str) -> Result<Glob, globset::Error> {
    globset::GlobBuilder::new(pattern).literal_separator(false).build()
}

/// What is known of a process when it is matched.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub pid: u32,
    pub exe: Option<&'a str>,
    pub open_ports: &'a [u16],
    pub pod: PodFacts<'a>,
}

/// The Kubernetes side of a process.
#[derive(Debug, Clone, Copy)]
pub enum PodFacts<'a> {
    /// Not in a pod (no pod in its cgroup path): Kubernetes keys do not match.
    NotInPod,
    /// In a pod whose metadata has not arrived (yet).
    Unknown,
    Known(&'a PodView<'a>),
}

/// The pod fields rules look at.
#[derive(Debug, Clone, Copy)]
pub struct PodView<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    /// Owner names, nearest first (e.g. the ReplicaSet, then its Deployment).
    pub owners: &'a [(String, String)],
    /// The process's container, once the pod's status names it.
    pub container: Option<&'a str>,
}

/// Three-valued match: Kubernetes keys are `Unknown` until the pod's metadata arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    Yes,
    No,
    Unknown,
}

impl Match {
    fn from_bool(b: bool) -> Self {
        if b { Match::Yes } else { Match::No }
    }

    /// AND: any No wins, then any Unknown.
    fn and(self, other: Match) -> Match {
        match (self, other) {
            (Match::No, _) | (_, Match::No) => Match::No,
            (Match::Unknown, _) | (_, Match::Unknown) => Match::Unknown,
            _ => Match::Yes,
        }
    }

    /// OR: any Yes wins, then any Unknown.
    fn or(self, other: Match) -> Match {
        match (self, other) {
            (Match::Yes, _) | (_, Match::Yes) => Match::Yes,
            (Match::Unknown, _) | (_, Match::Unknown) => Match::Unknown,
            _ => Match::No,
        }
    }
}

impl Rule {
    /// True when the rule sets no key (it would match every process).
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
            && self.open_ports.is_empty()
            && self.exe_path.is_none()
            && self.k8s_namespace.is_none()
            && self.k8s_pod_labels.is_empty()
            && self.k8s_owner_name.is_none()
            && self.k8s_deployment.is_none()
            && self.container_name.is_none()
    }

    /// True when some key needs Kubernetes metadata.
    pub fn uses_kubernetes(&self) -> bool {
        self.k8s_namespace.is_some()
            || !self.k8s_pod_labels.is_empty()
            || self.k8s_owner_name.is_some()
            || self.k8s_deployment.is_some()
            || self.container_name.is_some()
    }

    pub fn matches(&self, facts: &Facts) -> Match {
        let mut result = Match::Yes;
        if !self.pids.is_empty() {
            result = result.and(Match::from_bool(self.pids.contains(&facts.pid)));
        }
        if !self.open_ports.is_empty() {
            result = result.and(Match::from_bool(facts.open_ports.iter().any(|p| self.open_ports.contains(p))));
        }
        if let Some(re) = &self.exe_path {
            result = result.and(Match::from_bool(facts.exe.is_some_and(|exe| re.is_match(exe))));
        }
        if result == Match::No || !self.uses_kubernetes() {
            return result;
        }
        result.and(match facts.pod {
            PodFacts::NotInPod => Match::No,
            PodFacts::Unknown => Match::Unknown,
            PodFacts::Known(pod) => self.matches_pod(pod),
        })
    }

    fn matches_pod(&self, pod: &PodView) -> Match {
        let mut result = Match::Yes;
        if let Some(namespaces) = &self.k8s_namespace {
            result = result.and(Match::from_bool(namespaces.matches(pod.namespace)));
        }
        for (key, value) in &self.k8s_pod_labels {
            result = result.and(Match::from_bool(pod.labels.get(key).is_some_and(|v| value.is_match(v))));
        }
        if let Some(owners) = &self.k8s_owner_name {
            result = result.and(Match::from_bool(pod.owners.iter().any(|(_, name)| owners.matches(name))));
        }
        if let Some(deployments) = &self.k8s_deployment {
            let deployment = pod.owners.iter().find(|(kind, _)| kind == "Deployment");
            result = result.and(Match::from_bool(deployment.is_some_and(|(_, name)| deployments.matches(name))));
        }
        if let Some(containers) = &self.container_name {
            result = result.and(match pod.container {
                Some(name) => Match::from_bool(containers.matches(name)),
                None => Match::Unknown,
            });
        }
        result
    }
}

impl std::fmt::Display for Rule {
    /// One line, the keys as the config file names them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<String> = Vec::new();
        if !self.pids.is_empty() {
            keys.push(format!("pid: {:?}", self.pids));
        }
        if !self.open_ports.is_empty() {
            keys.push(format!("open_ports: {:?}", self.open_ports));
        }
        if let Some(re) = &self.exe_path {
            keys.push(format!("exe_path: {:?}", re.as_str()));
        }
        let lists = [
            ("k8s_namespace", &self.k8s_namespace),
            ("k8s_owner_name", &self.k8s_owner_name),
            ("k8s_deployment", &self.k8s_deployment),
            ("container_name", &self.container_name),
        ];
        for (key, list) in lists {
            if let Some(list) = list {
                keys.push(format!("{key}: {:?}", list.patterns));
            }
        }
        for (label, matcher) in &self.k8s_pod_labels {
            keys.push(format!("k8s_pod_labels.{label}: {:?}", matcher.glob().glob()));
        }
        write!(f, "{{{}}}", keys.join(", "))
    }
}

/// Include and exclude rules.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Empty: every process is included.
    pub include: Vec<Rule>,
    pub exclude: Vec<Rule>,
}

/// What to do with a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Trace,
    /// Matched an exclude rule.
    Excluded,
    /// Matched no include rule.
    NotIncluded,
    /// Depends on Kubernetes metadata that has not arrived.
    Undecided,
}

impl Selection {
    /// No rules at all: the kernel can trace every process without asking.
    pub fn traces_everything(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    /// Include rules need pod metadata (without it they match nothing).
    pub fn includes_by_kubernetes(&self) -> bool {
        self.include.iter().any(Rule::uses_kubernetes)
    }

    /// Some rule needs pod metadata.
    pub fn uses_kubernetes(&self) -> bool {
        self.include.iter().chain(&self.exclude).any(Rule::uses_kubernetes)
    }

    /// Ports some rule looks at (their listeners are looked up on rescans).
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.include.iter().chain(&self.exclude).flat_map(|r| r.open_ports.clone()).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    pub fn decide(&self, facts: &Facts) -> Decision {
        let excluded = self.exclude.iter().fold(Match::No, |m, rule| m.or(rule.matches(facts)));
        if excluded == Match::Yes {
            return Decision::Excluded;
        }
        let included = if self.include.is_empty() {
            Match::Yes
        } else {
            self.include.iter().fold(Match::No, |m, rule| m.or(rule.matches(facts)))
        };
        match (included, excluded) {
            (Match::No, _) => Decision::NotIncluded,
            (Match::Yes, Match::No) => Decision::Trace,
            _ => Decision::Undecided,
        }
    }

    /// The decision once waiting for metadata is over: an unknown exclude does not exclude, an
    /// unknown include does not include.
    pub fn settle(&self, facts: &Facts) -> Decision {
        match self.decide(facts) {
            Decision::Undecided => {
                let certain = |rule: &Rule| rule.matches(facts) == Match::Yes;
                if self.include.is_empty() || self.include.iter().any(certain) {
                    Decision::Trace
                } else {
                    Decision::NotIncluded
                }
            }
            decided => decided,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn globs(patterns: &[&str]) -> Option<GlobList> {
        Some(GlobList::new(&patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>()).expect("valid globs"))
    }

    fn namespaces(patterns: &[&str]) -> Rule {
        Rule { k8s_namespace: globs(patterns), ..Rule::default() }
    }

    struct Pod {
        namespace: &'static str,
        labels: BTreeMap<String, String>,
        owners: Vec<(String, String)>,
        container: Option<&'static str>,
    }

    impl Pod {
        fn new(namespace: &'static str) -> Self {
            let owners = vec![("ReplicaSet".into(), "web-5d8f".into()), ("Deployment".into(), "web".into())];
            let labels = [("app".to_owned(), "web".to_owned()), ("tier".to_owned(), "front".to_owned())].into();
            Self { namespace, labels, owners, container: Some("server") }
        }

        fn view(&self) -> PodView<'_> {
            PodView { namespace: self.namespace, labels: &self.labels, owners: &self.owners, container: self.container }
        }
    }

    fn facts<'a>(pod: PodFacts<'a>) -> Facts<'a> {
        Facts { pid: 42, exe: Some("/usr/bin/python3.12"), open_ports: &[8080], pod }
    }

    #[test]
    fn namespace_globs() {
        let shop_or_pay = Selection { include: vec![namespaces(&["shop", "pay-*"])], exclude: vec![] };
        for (namespace, expected) in [("shop", Decision::Trace), ("pay-eu", Decision::Trace), ("payroll", Decision::NotIncluded)] {
            let pod = Pod::new(namespace);
            let view = pod.view();
            assert_eq!(shop_or_pay.decide(&facts(PodFacts::Known(&view))), expected, "{namespace}");
        }
        assert_eq!(shop_or_pay.decide(&facts(PodFacts::NotInPod)), Decision::NotIncluded, "host process");
    }

    #[test]
    fn exclude_beats_include() {
        let selection = Selection { include: vec![namespaces(&["*"])], exclude: vec![namespaces(&["kube-system"])] };
        let system = Pod::new("kube-system");
        let view = system.view();
        assert_eq!(selection.decide(&facts(PodFacts::Known(&view))), Decision::Excluded);
    }

    #[test]
    fn every_key_of_a_rule_must_match() {
        let rule = Rule {
            k8s_namespace: globs(&["shop"]),
            k8s_pod_labels: vec![("tier".into(), glob("fr*").unwrap().compile_matcher())],
            k8s_deployment: globs(&["web"]),
            container_name: globs(&["server"]),
            exe_path: Some(Regex::new("python").unwrap()),
            open_ports: vec![8080, 9090],
            ..Rule::default()
        };
        let selection = Selection { include: vec![rule.clone()], exclude: vec![] };
        let pod = Pod::new("shop");
        let view = pod.view();
        assert_eq!(selection.decide(&facts(PodFacts::Known(&view))), Decision::Trace);
        let mut other_label = Pod::new("shop");
        other_label.labels.insert("tier".into(), "back".into());
        let view = other_label.view();
        assert_eq!(selection.decide(&facts(PodFacts::Known(&view))), Decision::NotIncluded);
        let pod = Pod::new("shop");
        let view = pod.view();
        let java = Facts { exe: Some("/usr/bin/java"), ..facts(PodFacts::Known(&view)) };
        assert_eq!(selection.decide(&java), Decision::NotIncluded);
        let other_port = Facts { open_ports: &[80], ..facts(PodFacts::Known(&view)) };
        assert_eq!(selection.decide(&other_port), Decision::NotIncluded);
    }

    #[test]
    fn owner_names_match_any_level() {
        let pod = Pod::new("shop");
        let view = pod.view();
        for (pattern, expected) in [("web-*", Match::Yes), ("web", Match::Yes), ("db", Match::No)] {
            let rule = Rule { k8s_owner_name: globs(&[pattern]), ..Rule::default() };
            assert_eq!(rule.matches(&facts(PodFacts::Known(&view))), expected, "{pattern}");
        }
        let rule = Rule { k8s_deployment: globs(&["web-*"]), ..Rule::default() };
        assert_eq!(rule.matches(&facts(PodFacts::Known(&view))), Match::No, "the ReplicaSet is not the Deployment");
    }

    #[test]
    fn unknown_pods_wait_then_settle() {
        let selection = Selection {
            include: vec![namespaces(&["shop"]), Rule { exe_path: Some(Regex::new("nginx").unwrap()), ..Rule::default() }],
            exclude: vec![namespaces(&["kube-system"])],
        };
        let unknown = facts(PodFacts::Unknown);
        assert_eq!(selection.decide(&unknown), Decision::Undecided);
        assert_eq!(selection.settle(&unknown), Decision::NotIncluded, "an unknown namespace includes nothing");
        let nginx = Facts { exe: Some("/usr/sbin/nginx"), ..unknown };
        assert_eq!(selection.decide(&nginx), Decision::Undecided, "kube-system could still exclude it");
        assert_eq!(selection.settle(&nginx), Decision::Trace, "an unknown namespace excludes nothing");
    }

    #[test]
    fn container_name_waits_for_the_status() {
        let mut pod = Pod::new("shop");
        pod.container = None;
        let view = pod.view();
        let rule = Rule { container_name: globs(&["server"]), ..Rule::default() };
        assert_eq!(rule.matches(&facts(PodFacts::Known(&view))), Match::Unknown);
    }

    #[test]
    fn pids_and_no_rules() {
        let selection = Selection { include: vec![Rule { pids: vec![42], ..Rule::default() }], exclude: vec![] };
        assert_eq!(selection.decide(&facts(PodFacts::NotInPod)), Decision::Trace);
        assert!(!selection.includes_by_kubernetes());
        assert!(Selection::default().traces_everything());
        assert_eq!(Selection::default().decide(&facts(PodFacts::Unknown)), Decision::Trace);
        assert!(Rule::default().is_empty());
    }
}
