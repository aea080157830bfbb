//! Kubernetes manifests in deploy/: every kustomization renders offline (`kubectl kustomize`)
//! and validates against the real Kubernetes schemas (`kubernetes-validate --strict`) of the
//! oldest and a recent supported version; the rendered base says what the agent needs.
//!
//! Needs no root and no cluster. Without `kubectl` or `kubernetes-validate` it prints
//! "skipped: ..." and passes, except with `CI=true`, where it fails saying how to install them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use zerotel_tests::{
    agent::{run_until_exit_with_env, LISTED_CAPABILITIES},
    util::TempDir,
};

/// Kubernetes versions validated against: the oldest supported one and the newest 1.33.x
/// schema kubernetes-validate ships.
const K8S_VERSIONS: &[&str] = &["1.29.0", "1.33.0"];

const KUSTOMIZATIONS: &[&str] = &[
    "deploy/base",
    "deploy/overlays/capabilities",
    "deploy/overlays/namespace-filter",
    "deploy/overlays/otel-collector",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// True when `cmd args` can be spawned and exits 0.
fn runs(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Whether the tools are present; if not: panic under CI, else print "skipped" and say so.
fn require_tools() -> bool {
    let mut missing = Vec::new();
    if !runs("kubectl", &["version", "--client"]) {
        missing.push(
            "kubectl (https://kubernetes.io/docs/tasks/tools/; >= 1.27 for `kubectl kustomize`)",
        );
    }
    if !runs("kubernetes-validate", &["--version"]) {
        missing.push("kubernetes-validate (pip install kubernetes-validate)");
    }
    if missing.is_empty() {
        return true;
    }
    let reason = format!("missing {}", missing.join(" and "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("cannot check the deploy/ manifests in CI: {reason}");
    }
    println!("skipped: {reason}");
    false
}

fn render(dir: &str) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo_root().join(dir))
        .output()
        .expect("spawn kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("kustomize output is UTF-8");
    assert!(
        yaml.contains("kind: DaemonSet"),
        "{dir} renders no DaemonSet:\n{yaml}"
    );
    yaml
}

fn validate(dir: &str, yaml: &str) {
    let tmp = std::env::temp_dir().join(format!(
        "zerotel-deploy-{}-{}.yaml",
        std::process::id(),
        dir.replace('/', "_")
    ));
    std::fs::write(&tmp, yaml).expect("write rendered manifests");
    for version in K8S_VERSIONS {
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "-k", version])
            .arg(&tmp)
            .output()
            .expect("spawn kubernetes-validate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A schema-less kind would only warn; every kind here must really be checked.
        assert!(
            out.status.success() && !text.contains("ERROR") && !text.contains("WARN"),
            "kubernetes-validate --strict -k {version} rejects {dir} ({}):\n{text}\n--- rendered ---\n{yaml}",
            out.status
        );
    }
    let _ = std::fs::remove_file(&tmp);
}

/// The YAML documents of a render (kustomize separates them with `---` lines).
fn documents(yaml: &str) -> Vec<&str> {
    yaml.split("\n---\n").collect()
}

fn document<'a>(yaml: &'a str, kind: &str) -> &'a str {
    let line = format!("\nkind: {kind}\n");
    documents(yaml)
        .into_iter()
        .find(|d| format!("\n{d}\n").contains(&line))
        .unwrap_or_else(|| panic!("no {kind} in:\n{yaml}"))
}

/// Lines after the first line equal (trimmed) to `key`, up to `n` lines.
fn block_after<'a>(doc: &'a str, key: &str, n: usize) -> Vec<&'a str> {
    let lines: Vec<&str> = doc.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == key)
        .unwrap_or_else(|| panic!("no `{key}` in:\n{doc}"));
    lines[start + 1..]
        .iter()
        .take(n)
        .map(|l| l.trim())
        .collect()
}

#[test]
fn every_kustomization_renders_and_validates() {
    if !require_tools() {
        return;
    }
    for dir in KUSTOMIZATIONS {
        let yaml = render(dir);
        validate(dir, &yaml);
    }
}

#[test]
fn base_daemonset_has_what_the_agent_needs() {
    if !require_tools() {
        return;
    }
    let yaml = render("deploy/base");
    let ds = document(&yaml, "DaemonSet");
    let lines: Vec<&str> = ds.lines().map(str::trim).collect();
    let has = |l: &str| lines.contains(&l);

    assert!(
        has("hostPID: true"),
        "DaemonSet without hostPID: true:\n{ds}"
    );
    assert!(
        !has("hostNetwork: true"),
        "DaemonSet must not use the host network:\n{ds}"
    );
    assert!(
        has("serviceAccountName: zerotel"),
        "no service account:\n{ds}"
    );
    assert!(has("privileged: true"), "base is privileged:\n{ds}");
    assert!(
        has("- 0.0.0.0:9464"),
        "agent must listen on the pod IP for probes:\n{ds}"
    );

    for probe in ["livenessProbe:", "readinessProbe:"] {
        // kustomize sorts keys: httpGet sits among failureThreshold, initialDelaySeconds, ...
        let block = block_after(ds, probe, 10);
        let at = block
            .iter()
            .position(|l| *l == "httpGet:")
            .unwrap_or_else(|| panic!("{probe} is not an httpGet probe:\n{ds}"));
        assert_eq!(
            block[at + 1..at + 3],
            ["path: /healthz", "port: 9464"],
            "{probe} in:\n{ds}"
        );
    }

    let node_name = block_after(ds, "- name: NODE_NAME", 3);
    assert_eq!(
        node_name,
        ["valueFrom:", "fieldRef:", "fieldPath: spec.nodeName"],
        "NODE_NAME must come from the downward API:\n{ds}"
    );

    for path in [
        "/sys/kernel/tracing",
        "/sys/kernel/btf",
        "/sys/fs/cgroup",
        "/sys/fs/bpf",
        "/run/zerotel.lock",
    ] {
        let mount = format!("mountPath: {path}");
        assert!(
            has(&mount) || has(&format!("- {mount}")),
            "no mount of {path}:\n{ds}"
        );
        assert!(has(&format!("path: {path}")), "no hostPath {path}:\n{ds}");
    }
    assert!(
        has("- operator: Exists"),
        "must tolerate every taint:\n{ds}"
    );
    assert!(has("type: RollingUpdate"), "rolling updates:\n{ds}");
}

#[test]
fn cluster_role_is_read_only() {
    if !require_tools() {
        return;
    }
    let yaml = render("deploy/base");
    let role = document(&yaml, "ClusterRole");
    let mut verbs_seen = 0;
    let lines: Vec<&str> = role.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        let Some(rest) = t.strip_prefix("verbs:") else {
            continue;
        };
        verbs_seen += 1;
        // Flow style `verbs: [a, b]` or block style list on the following lines.
        let verbs: Vec<String> = if rest.trim().is_empty() {
            lines[i + 1..]
                .iter()
                .map(|l| l.trim())
                .take_while(|l| l.starts_with("- ") && !l.contains(':'))
                .map(|l| l.trim_start_matches("- ").trim_matches('"').to_string())
                .collect()
        } else {
            rest.trim()
                .trim_matches(['[', ']'])
                .split(',')
                .map(|v| v.trim().trim_matches('"').to_string())
                .collect()
        };
        assert!(!verbs.is_empty(), "empty verbs in:\n{role}");
        for verb in &verbs {
            assert!(
                ["get", "list", "watch"].contains(&verb.as_str()),
                "ClusterRole grants `{verb}`; only get/list/watch allowed:\n{role}"
            );
        }
    }
    assert!(
        verbs_seen >= 3,
        "expected rules for core, apps and batch:\n{role}"
    );
    for resource in [
        "pods",
        "namespaces",
        "replicasets",
        "deployments",
        "statefulsets",
        "daemonsets",
        "jobs",
        "cronjobs",
    ] {
        assert!(
            role.contains(&format!("- {resource}\n")),
            "ClusterRole lacks {resource}:\n{role}"
        );
    }
}

#[test]
fn overlays_change_what_they_say() {
    if !require_tools() {
        return;
    }
    let caps = render("deploy/overlays/capabilities");
    let ds = document(&caps, "DaemonSet");
    assert!(
        ds.contains("privileged: false") && !ds.contains("privileged: true"),
        "{ds}"
    );
    // Exactly the list the agent is tested with (tests/tests/privilege.rs), nothing more.
    let mut added = block_after(ds, "add:", 16)
        .into_iter()
        .map_while(|line| line.strip_prefix("- "))
        .collect::<Vec<_>>();
    added.sort_unstable();
    let mut listed = LISTED_CAPABILITIES.to_vec();
    listed.sort_unstable();
    assert_eq!(added, listed, "capabilities the overlay adds:\n{ds}");
    assert_eq!(block_after(ds, "drop:", 1), ["- ALL"], "the overlay drops every other capability:\n{ds}");
    assert!(
        ds.contains("allowPrivilegeEscalation: false"),
        "without SYS_ADMIN the overlay can forbid privilege escalation:\n{ds}"
    );

    let otel = render("deploy/overlays/otel-collector");
    let ds = document(&otel, "DaemonSet");
    assert_eq!(
        block_after(ds, "- name: OTEL_EXPORTER_OTLP_ENDPOINT", 1),
        ["value: http://otel-collector.observability.svc:4317"],
        "{ds}"
    );
    assert_eq!(
        block_after(ds, "- name: OTEL_EXPORTER_OTLP_PROTOCOL", 1),
        ["value: grpc"],
        "{ds}"
    );

    let filter = render("deploy/overlays/namespace-filter");
    let checked = check_config(document(&filter, "ConfigMap"));
    assert!(checked.contains(r#"k8s_namespace: ["shop", "pay-*"]"#), "{checked}");
}

/// `config.yaml` of a rendered ConfigMap (a `|` block scalar, indented under the key).
fn config_yaml(configmap: &str) -> String {
    let mut lines = configmap.lines().skip_while(|l| l.trim() != "config.yaml: |").skip(1);
    let first = lines.next().unwrap_or_default();
    let indent = first.len() - first.trim_start().len();
    let block = std::iter::once(first).chain(lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent));
    block.map(|l| l.get(indent..).unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The agent's own loader on the ConfigMap's file: `zerotel --check-config` prints what it selects.
fn check_config(configmap: &str) -> String {
    let dir = TempDir::new("configmap");
    let path = dir.write("config.yaml", config_yaml(configmap));
    let args = ["--config".to_owned(), path.display().to_string(), "--check-config".to_owned()];
    let output = run_until_exit_with_env(&args, &[("NODE_NAME", "node-1")], std::time::Duration::from_secs(10));
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the agent refused the ConfigMap's config.yaml:\n{stderr}\n{}", config_yaml(configmap));
    stdout.into_owned()
}

#[test]
fn base_configmap_is_a_valid_agent_config() {
    if !require_tools() {
        return;
    }
    let base = render("deploy/base");
    let checked = check_config(document(&base, "ConfigMap"));
    assert!(checked.contains(r#"k8s_namespace: ["kube-system"]"#), "default excludes on: {checked}");
    assert!(checked.contains("every process"), "{checked}");
    let ds = document(&base, "DaemonSet");
    assert!(ds.contains("- --config\n") && ds.contains("- /etc/zerotel/config.yaml\n"), "the DaemonSet reads it: {ds}");
}
