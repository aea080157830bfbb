//! The OTLP resource of a traced process: who it is (`service.name`) and where it runs.

use std::{borrow::Cow, collections::HashMap, ffi::OsString, path::Path};

use procfs::process::Process;

use super::cgroup::ContainerRef;
use crate::{
    kubernetes::PodMeta,
    spans::model::{AttrValue, Attributes, Resource},
};

/// Programs whose service is named by the script or module they run, not by themselves.
const INTERPRETERS: &[&str] = &["python", "node", "nodejs", "ruby", "perl", "php", "java", "bun", "deno", "dotnet"];

/// Attributes every resource carries: the host and the agent (from its OTEL_RESOURCE_ATTRIBUTES).
#[derive(Debug, Clone, Default)]
pub struct BaseResource {
    pub attributes: Attributes,
}

impl BaseResource {
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Self {
        let mut attributes: Attributes = vec![
            ("telemetry.sdk.name".into(), "zerotel".into()),
            ("telemetry.sdk.language".into(), "rust".into()),
            ("telemetry.sdk.version".into(), env!("CARGO_PKG_VERSION").into()),
        ];
        if let Some(host) = host_name() {
            attributes.push(("host.name".into(), host.into()));
        }
        // The agent's own service.name would mislabel every process: it names processes itself.
        for (k, v) in parse_resource_attributes(&env("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default()) {
            if k != "service.name" {
                set(&mut attributes, k, v.into());
            }
        }
        Self { attributes }
    }
}

/// Build the resource of `pid` from procfs and its pod; `comm` is the fallback name when the
/// process is gone.
pub fn for_process(pid: u32, base: &BaseResource, comm: Option<&str>, container: &ContainerRef, pod: Option<&PodMeta>) -> Resource {
    let process = Process::new(pid as i32).ok();
    let exe = process.as_ref().and_then(|p| p.exe().ok());
    let cmdline = process.as_ref().and_then(|p| p.cmdline().ok()).unwrap_or_default();
    let environ = process.as_ref().and_then(|p| p.environ().ok()).unwrap_or_default();
    let exe_name = exe
        .as_deref()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .or_else(|| comm.map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());

    let mut attributes = base.attributes.clone();
    for (k, v) in parse_resource_attributes(&env_var(&environ, "OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default()) {
        set(&mut attributes, k, v.into());
    }
    let pod_container = pod.zip(container.container_id.as_deref()).and_then(|(p, id)| p.container_by_id(id));
    let service = env_var(&environ, "OTEL_SERVICE_NAME")
        .filter(|s| !s.is_empty())
        .or_else(|| pod.map(|p| p.service_name(pod_container).to_owned()))
        .unwrap_or_else(|| derive_service_name(&exe_name, &cmdline));
    set(&mut attributes, "service.name".into(), service.into());
    set(&mut attributes, "process.pid".into(), AttrValue::Int(pid.into()));
    set(&mut attributes, "process.executable.name".into(), exe_name.into());
    if let Some(path) = exe {
        set(&mut attributes, "process.executable.path".into(), path.to_string_lossy().into_owned().into());
    }
    if let Some(id) = &container.container_id {
        set(&mut attributes, "container.id".into(), id.clone().into());
    }
    if let Some(uid) = &container.pod_uid {
        set(&mut attributes, "k8s.pod.uid".into(), uid.clone().into());
    }
    if let Some(pod) = pod {
        add_pod(&mut attributes, pod, pod_container.map(|c| c.name.as_str()));
    }
    Resource { attributes }
}

/// The `k8s.*` attributes of the OpenTelemetry semantic conventions, and `service.namespace`.
fn add_pod(attributes: &mut Attributes, pod: &PodMeta, container: Option<&str>) {
    let mut put = |key: &str, value: &str| {
        if !value.is_empty() {
            set(attributes, key.to_owned(), value.to_owned().into());
        }
    };
    put("k8s.namespace.name", &pod.namespace);
    put("service.namespace", &pod.namespace);
    put("k8s.pod.name", &pod.name);
    put("k8s.pod.uid", &pod.uid);
    put("k8s.node.name", &pod.node);
    if let Some(name) = container {
        put("k8s.container.name", name);
    }
    for (kind, name) in &pod.owners {
        if let Some(key) = owner_attribute(kind) {
            put(key, name);
        }
    }
}

fn owner_attribute(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "ReplicaSet" => "k8s.replicaset.name",
        "Deployment" => "k8s.deployment.name",
        "StatefulSet" => "k8s.statefulset.name",
        "DaemonSet" => "k8s.daemonset.name",
        "Job" => "k8s.job.name",
        "CronJob" => "k8s.cronjob.name",
        _ => return None,
    })
}

fn set(attributes: &mut Attributes, key: String, value: AttrValue) {
    match attributes.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => attributes.push((Cow::Owned(key), value)),
    }
}

fn env_var(environ: &HashMap<OsString, OsString>, name: &str) -> Option<String> {
    environ.get(&OsString::from(name)).map(|v| v.to_string_lossy().into_owned())
}

/// `python3 /srv/backend.py` -> "backend", `java -jar shop.jar` -> "shop", nginx -> "nginx".
pub fn derive_service_name(exe_name: &str, cmdline: &[String]) -> String {
    let is_interpreter = INTERPRETERS.iter().any(|i| exe_name.starts_with(i));
    if !is_interpreter {
        return exe_name.to_owned();
    }
    script_of(cmdline).map(stem).unwrap_or_else(|| exe_name.to_owned())
}

/// The script, module or jar an interpreter runs: the first argument that is not an option
/// (`-m module` and `-jar file` name it directly; options taking a value are skipped).
fn script_of(cmdline: &[String]) -> Option<&str> {
    let mut args = cmdline.iter().skip(1).map(String::as_str);
    while let Some(arg) = args.next() {
        match arg {
            "-m" | "-jar" => return args.next(),
            "-c" | "-e" | "--eval" => return None,
            "-cp" | "-classpath" | "--class-path" | "-r" | "--require" | "-W" | "-X" => {
                args.next();
            }
            a if a.starts_with('-') => {}
            a => return Some(a),
        }
    }
    None
}

fn stem(arg: &str) -> String {
    let file = Path::new(arg).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if file.is_empty() { arg.to_owned() } else { file }
}

/// `k=v,k2=v2` with percent-encoded values (OTel spec); malformed pairs are skipped.
pub fn parse_resource_attributes(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_owned(), percent_decode(v.trim())))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match decoded {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn names_services_sensibly() {
        assert_eq!(derive_service_name("python3.11", &args("python3 -u /srv/backend.py --port 1")), "backend");
        assert_eq!(derive_service_name("python3", &args("python3 -m http.server")), "http");
        assert_eq!(derive_service_name("node", &args("node --require x server.js")), "server");
        assert_eq!(derive_service_name("java", &args("java -Xmx1g -jar /app/shop.jar")), "shop");
        assert_eq!(derive_service_name("python3", &args("python3 -c print(1)")), "python3");
        assert_eq!(derive_service_name("nginx", &args("nginx: worker process")), "nginx");
    }

    #[test]
    fn parses_resource_attributes() {
        assert_eq!(
            parse_resource_attributes("deployment.environment=prod, team=a%20b,broken,=x"),
            vec![("deployment.environment".into(), "prod".into()), ("team".into(), "a b".into())]
        );
    }

    #[test]
    fn own_process_resource() {
        let base = BaseResource::from_env(&|_| None);
        let r = for_process(std::process::id(), &base, None, &ContainerRef::default(), None);
        assert!(r.attributes.iter().any(|(k, v)| k == "process.pid" && *v == AttrValue::Int(std::process::id().into())));
        assert!(r.attributes.iter().any(|(k, _)| k == "telemetry.sdk.name"));
        assert!(!r.service_name().is_empty());
    }

    #[test]
    fn pod_attributes_and_service_name() {
        let pod = PodMeta {
            uid: "u-1".into(),
            name: "web-5d8f-x2k".into(),
            namespace: "shop".into(),
            node: "node-a".into(),
            labels: Default::default(),
            owners: vec![("ReplicaSet".into(), "web-5d8f".into()), ("Deployment".into(), "web".into())],
            containers: vec![crate::kubernetes::pod::ContainerMeta { name: "server".into(), id: Some("c1".into()), service_name: None }],
            config_uid: None,
        };
        let container = ContainerRef { container_id: Some("c1".into()), pod_uid: Some("u-1".into()) };
        // A pid that does not exist: only the pod names the service.
        let r = for_process(u32::MAX, &BaseResource::default(), Some("x"), &container, Some(&pod));
        let get = |k: &str| r.attributes.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get("service.name"), Some("web".into()), "the workload names the service");
        assert_eq!(get("service.namespace"), Some("shop".into()));
        assert_eq!(get("k8s.container.name"), Some("server".into()));
        assert_eq!(get("k8s.deployment.name"), Some("web".into()));
        assert_eq!(get("k8s.replicaset.name"), Some("web-5d8f".into()));
        assert_eq!(get("k8s.node.name"), Some("node-a".into()));
        assert_eq!(get("container.id"), Some("c1".into()));
    }
}
