//! The agent's configuration as a user meets it: a YAML file, `ZEROTEL_*` variables and flags,
//! checked with `--check-config` (no kernel needed), and bad files refused with the key named.

use std::time::Duration;

use zerotel_tests::{agent::run_until_exit_with_env, util::TempDir};

const TIMEOUT: Duration = Duration::from_secs(10);

fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let output = run_until_exit_with_env(&args, env, TIMEOUT);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

#[test]
fn flags_beat_environment_which_beats_the_file() {
    let dir = TempDir::new("config");
    let file = dir.write(
        "config.yaml",
        "include:\n  - k8s_namespace: from-file\nexclude:\n  - container_name: istio-proxy\nlisten: 127.0.0.1:1111\nnode_name: node-from-file\n",
    );
    let file = file.to_str().expect("utf-8 path");

    let (ok, stdout, stderr) = run(&["--config", file, "--check-config"], &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(r#"k8s_namespace: ["from-file"]"#), "{stdout}");
    assert!(stdout.contains(r#"container_name: ["istio-proxy"]"#), "{stdout}");
    assert!(stdout.contains(r#"k8s_namespace: ["kube-system"]"#), "default excludes stay: {stdout}");
    assert!(stdout.contains("127.0.0.1:1111") && stdout.contains("node-from-file"), "{stdout}");

    let env = [("ZEROTEL_K8S_NAMESPACE", "shop,pay-*"), ("ZEROTEL_LISTEN", "127.0.0.1:2222")];
    let (ok, stdout, stderr) = run(&["--config", file, "--check-config"], &env);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(r#"k8s_namespace: ["shop", "pay-*"]"#), "{stdout}");
    assert!(!stdout.contains(r#"["from-file"]"#), "the environment's includes replace the file's: {stdout}");
    assert!(stdout.contains("127.0.0.1:2222"), "{stdout}");

    let (ok, stdout, stderr) = run(&["--config", file, "--check-config", "--listen", "127.0.0.1:3333"], &env);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("127.0.0.1:3333"), "{stdout}");
}

#[test]
fn unknown_keys_and_missing_node_names_are_refused_with_what_to_do() {
    let dir = TempDir::new("config");
    let typo = dir.write("typo.yaml", "include:\n  - k8s_namespace: shop\n    k8s_labels: {app: web}\n");
    let (ok, _, stderr) = run(&["--config", typo.to_str().expect("utf-8"), "--check-config"], &[]);
    assert!(!ok, "a typo was accepted");
    assert!(stderr.contains("k8s_labels") && stderr.contains("typo.yaml"), "{stderr}");

    let (ok, _, stderr) = run(&["--k8s-namespace", "shop", "--check-config"], &[]);
    assert!(!ok, "namespace rules without pod metadata were accepted");
    assert!(stderr.contains("NODE_NAME"), "{stderr}");

    let (ok, stdout, stderr) = run(&["--k8s-namespace", "shop", "--check-config"], &[("NODE_NAME", "node-1")]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("node-1"), "{stdout}");

    let (ok, _, stderr) = run(&["--config", "/nonexistent/zerotel.yaml"], &[]);
    assert!(!ok && stderr.contains("/nonexistent/zerotel.yaml"), "{stderr}");
}
