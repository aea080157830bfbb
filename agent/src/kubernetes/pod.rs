//! What zerotel keeps of a pod (a few strings, not the whole object) and the store of this node's
//! pods, indexed by the pod UID found in a process's cgroup path. Pure: no I/O.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, Instant},
};

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::ObjectMeta};

/// Labels naming a workload's service, in order of preference (OpenTelemetry k8s conventions).
const SERVICE_NAME_LABEL: &str = "app.kubernetes.io/name";
/// A static pod's cgroup carries the UID of its manifest, which its mirror pod has here.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// A pod as spans are decorated with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// (kind, name), nearest first: e.g. ("ReplicaSet", "web-5d8f"), ("Deployment", "web").
    pub owners: Vec<(String, String)>,
    pub containers: Vec<ContainerMeta>,
    /// The UID in the cgroup paths of a static pod (its mirror annotation), if different.
    pub config_uid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerMeta {
    pub name: String,
    /// The runtime's id without its scheme (`containerd://`), once the container started.
    pub id: Option<String>,
    /// A literal `OTEL_SERVICE_NAME` in the container's spec.
    pub service_name: Option<String>,
}

impl PodMeta {
    /// The fields zerotel needs from a Pod object; None without a UID.
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let uid = meta.uid.clone()?;
        let spec = pod.spec.as_ref();
        let statuses = pod.status.as_ref().into_iter().flat_map(|s| {
            let init = s.init_container_statuses.iter().flatten();
            s.container_statuses.iter().flatten().chain(init)
        });
        let ids: HashMap<&str, String> = statuses
            .filter_map(|s| Some((s.name.as_str(), strip_runtime(s.container_id.as_deref()?)?)))
            .collect();
        let containers = spec
            .into_iter()
            .flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()))
            .map(|c| ContainerMeta {
                name: c.name.clone(),
                id: ids.get(c.name.as_str()).cloned(),
                service_name: c
                    .env
                    .iter()
                    .flatten()
                    .find(|e| e.name == "OTEL_SERVICE_NAME")
                    .and_then(|e| e.value.clone())
                    .filter(|v| !v.is_empty()),
            })
            .collect();
        let owners = controller(meta).into_iter().collect();
        Some(Self {
            uid,
            name: meta.name.clone().unwrap_or_default(),
            namespace: meta.namespace.clone().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            owners,
            containers,
            config_uid: meta.annotations.as_ref().and_then(|a| a.get(MIRROR_ANNOTATION)).cloned(),
        })
    }

    /// The direct owner (kind, name), which the watcher may resolve one level up.
    pub fn controller(&self) -> Option<(&str, &str)> {
        self.owners.first().map(|(k, n)| (k.as_str(), n.as_str()))
    }

    /// The workload: the farthest owner (Deployment over ReplicaSet, CronJob over Job).
    pub fn workload(&self) -> Option<(&str, &str)> {
        self.owners.last().map(|(k, n)| (k.as_str(), n.as_str()))
    }

    pub fn container_by_id(&self, id: &str) -> Option<&ContainerMeta> {
        self.containers.iter().find(|c| c.id.as_deref() == Some(id))
    }

    /// `service.name`: the container's OTEL_SERVICE_NAME, else the `app.kubernetes.io/name` label,
    /// else the workload's name, else the pod's.
    pub fn service_name<'a>(&'a self, container: Option<&'a ContainerMeta>) -> &'a str {
        container
            .and_then(|c| c.service_name.as_deref())
            .or_else(|| self.labels.get(SERVICE_NAME_LABEL).map(String::as_str))
            .or_else(|| self.workload().map(|(_, name)| name))
            .unwrap_or(&self.name)
    }
}

/// An object's controlling owner (kind, name): the reference marked `controller`, else the first.
pub fn controller(meta: &ObjectMeta) -> Option<(String, String)> {
    let owners = meta.owner_references.as_deref().unwrap_or_default();
    let owner = owners.iter().find(|o| o.controller == Some(true)).or_else(|| owners.first())?;
    Some((owner.kind.clone(), owner.name.clone()))
}

/// `containerd://<id>` -> `<id>` (also `cri-o://`, `docker://`).
fn strip_runtime(id: &str) -> Option<String> {
    let bare = id.split_once("://").map_or(id, |(_, rest)| rest);
    (!bare.is_empty()).then(|| bare.to_owned())
}

/// A change the watcher reports.
#[derive(Debug, Clone)]
pub enum PodUpdate {
    Upsert(PodMeta),
    Delete { uid: String },
    /// The initial list is complete: pods not in it are not on this node (yet).
    Synced,
}

/// How long a deleted pod is remembered: its processes may run through a long termination grace
/// period, and must stay recognised (an excluded pod must not become "unknown" and be traced).
const DELETED_POD_TTL: Duration = Duration::from_secs(600);
/// Bound of the deleted pods remembered (a burst of deletions).
const MAX_DELETED_PODS: usize = 4096;

/// This node's pods by UID (and by static-pod config UID).
#[derive(Debug, Default)]
pub struct PodStore {
    pods: HashMap<String, PodMeta>,
    config_uids: HashMap<String, String>,
    /// Deleted pods still in `pods`, oldest first.
    deleted: VecDeque<(Instant, String)>,
}

impl PodStore {
    /// Apply an update; returns the UIDs (as cgroup paths show them) whose metadata changed.
    pub fn apply(&mut self, update: PodUpdate) -> Vec<String> {
        self.apply_at(update, Instant::now())
    }

    fn apply_at(&mut self, update: PodUpdate, now: Instant) -> Vec<String> {
        self.forget_deleted(now);
        match update {
            PodUpdate::Upsert(pod) => {
                let mut changed = vec![pod.uid.clone()];
                if let Some(config_uid) = &pod.config_uid {
                    self.config_uids.insert(config_uid.clone(), pod.uid.clone());
                    changed.push(config_uid.clone());
                }
                if self.pods.get(&pod.uid) == Some(&pod) {
                    return Vec::new();
                }
                self.pods.insert(pod.uid.clone(), pod);
                changed
            }
            PodUpdate::Delete { uid } => {
                // Kept for a while, unchanged: nothing to redo.
                if self.pods.contains_key(&uid) {
                    self.deleted.push_back((now, uid));
                }
                Vec::new()
            }
            PodUpdate::Synced => Vec::new(),
        }
    }

    fn forget_deleted(&mut self, now: Instant) {
        while let Some((deleted_at, uid)) = self.deleted.front() {
            if now.duration_since(*deleted_at) < DELETED_POD_TTL && self.deleted.len() <= MAX_DELETED_PODS {
                break;
            }
            if let Some(config_uid) = self.pods.remove(uid).and_then(|p| p.config_uid) {
                self.config_uids.remove(&config_uid);
            }
            self.deleted.pop_front();
        }
    }

    /// The pod whose UID (or static-pod config UID) a cgroup path shows.
    pub fn get(&self, uid: &str) -> Option<&PodMeta> {
        self.pods.get(uid).or_else(|| self.pods.get(self.config_uids.get(uid)?))
    }

    /// Pods remembered, deleted ones included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pods.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4ffd5b6a0d5e8b3c7e5f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f";

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("a valid Pod")
    }

    fn web_pod() -> Pod {
        pod(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-5d8f-x2k", "namespace": "shop", "uid": "u-1",
                "labels": {"app.kubernetes.io/name": "storefront", "pod-template-hash": "5d8f"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8f",
                                     "uid": "rs-1", "controller": true}]
            },
            "spec": {"nodeName": "node-a", "containers": [
                {"name": "server", "image": "web", "env": [{"name": "OTEL_SERVICE_NAME", "value": "checkout"}]},
                {"name": "sidecar", "image": "proxy"}
            ]},
            "status": {"containerStatuses": [
                {"name": "server", "containerID": format!("containerd://{ID}"), "image": "web", "imageID": "",
                 "ready": true, "restartCount": 0},
                {"name": "sidecar", "image": "proxy", "imageID": "", "ready": false, "restartCount": 0}
            ]}
        }))
    }

    #[test]
    fn keeps_what_spans_need() {
        let meta = PodMeta::from_pod(&web_pod()).expect("has a uid");
        assert_eq!((meta.name.as_str(), meta.namespace.as_str(), meta.node.as_str()), ("web-5d8f-x2k", "shop", "node-a"));
        assert_eq!(meta.controller(), Some(("ReplicaSet", "web-5d8f")));
        let server = meta.container_by_id(ID).expect("status names the container");
        assert_eq!(server.name, "server");
        assert_eq!(meta.containers[1].id, None, "not started yet");
        assert_eq!(meta.service_name(Some(server)), "checkout");
        assert_eq!(meta.service_name(Some(&meta.containers[1])), "storefront");
    }

    #[test]
    fn service_name_falls_back_to_the_workload_then_the_pod() {
        let mut meta = PodMeta::from_pod(&web_pod()).expect("has a uid");
        meta.labels.clear();
        meta.owners.push(("Deployment".into(), "web".into()));
        assert_eq!(meta.service_name(None), "web");
        meta.owners.clear();
        assert_eq!(meta.service_name(None), "web-5d8f-x2k");
    }

    #[test]
    fn store_indexes_static_pods_by_config_uid() {
        let mut store = PodStore::default();
        let mut meta = PodMeta::from_pod(&web_pod()).expect("has a uid");
        meta.config_uid = Some("cfg-9".into());
        assert_eq!(store.apply(PodUpdate::Upsert(meta.clone())), vec!["u-1".to_owned(), "cfg-9".to_owned()]);
        assert!(store.apply(PodUpdate::Upsert(meta)).is_empty(), "no change, nothing to redo");
        assert_eq!(store.get("cfg-9").map(|p| p.name.as_str()), Some("web-5d8f-x2k"));
        let deleted = Instant::now();
        store.apply_at(PodUpdate::Delete { uid: "u-1".into() }, deleted);
        assert!(store.get("u-1").is_some(), "a terminating pod's processes are still recognised");
        store.apply_at(PodUpdate::Synced, deleted + DELETED_POD_TTL);
        assert!(store.get("cfg-9").is_none() && store.get("u-1").is_none() && store.len() == 0);
    }

    #[test]
    fn a_pod_without_uid_is_ignored() {
        assert_eq!(PodMeta::from_pod(&pod(serde_json::json!({"metadata": {"name": "x"}}))), None);
        assert_eq!(strip_runtime("cri-o://abc").as_deref(), Some("abc"));
        assert_eq!(strip_runtime("containerd://"), None);
    }
}
