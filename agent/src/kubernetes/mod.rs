//! Pod metadata from the Kubernetes API: a watch of the pods on this node only (`spec.nodeName`
//! field selector), each pod's owner resolved one level up (ReplicaSet -> Deployment,
//! Job -> CronJob), reduced to a [`PodMeta`] and sent to discovery. Runs on its own task: the API
//! being slow or down delays decoration, never tracing.

pub mod pod;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use k8s_openapi::{
    api::{apps::v1::ReplicaSet, batch::v1::Job, core::v1::Pod},
    NamespaceResourceScope,
};
use kube::{
    api::Api,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, WatchStreamExt},
    Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::telemetry::Telemetry;
pub use pod::{PodMeta, PodStore, PodUpdate};

/// Where the API is and which node's pods to watch.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    pub node_name: String,
    /// None: in-cluster (service account), else $KUBECONFIG or ~/.kube/config.
    pub kubeconfig: Option<PathBuf>,
}

/// The API client could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig file is unreadable or invalid.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig { path: PathBuf, source: kube::config::KubeconfigError },
    /// Neither in-cluster settings nor a kubeconfig were found.
    #[error("no Kubernetes API settings (not in a pod with a service account, no $KUBECONFIG): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// The settings do not make a client (TLS, proxy...).
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Longest wait for an owner look-up: a slow API must not hold the pod stream.
const OWNER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a failed look-up (forbidden, timed out) is not retried.
const OWNER_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Owners remembered (ReplicaSets and Jobs come and go with rollouts).
const MAX_CACHED_OWNERS: usize = 4096;

pub async fn client(settings: &KubeSettings) -> Result<Client, KubeError> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let loaded = Kubeconfig::read_from(path)
                .map_err(|source| KubeError::Kubeconfig { path: path.clone(), source })?;
            kube::Config::from_custom_kubeconfig(loaded, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig { path: path.clone(), source })?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Watch this node's pods until `tx` closes; list again (with back-off) whenever the watch breaks.
pub async fn watch_pods(client: Client, node_name: String, tx: mpsc::Sender<PodUpdate>, telemetry: Arc<Telemetry>) {
    let pods: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let mut events = watcher(pods, config).default_backoff().boxed();
    let mut owners = Owners::new(client);
    let mut known: HashSet<String> = HashSet::new();
    let mut listed: HashSet<String> = HashSet::new();
    while let Some(event) = events.next().await {
        let updates = match event {
            Ok(watcher::Event::Init) => {
                listed.clear();
                Vec::new()
            }
            Ok(watcher::Event::InitApply(pod)) => {
                let update = upsert(&pod, &mut owners).await;
                if let Some(PodUpdate::Upsert(meta)) = &update {
                    listed.insert(meta.uid.clone());
                }
                update.into_iter().collect()
            }
            Ok(watcher::Event::InitDone) => {
                // Pods deleted while the watch was down are only missing from the new list.
                let gone = known.difference(&listed).cloned().map(|uid| PodUpdate::Delete { uid });
                let mut updates: Vec<PodUpdate> = gone.collect();
                known = std::mem::take(&mut listed);
                telemetry.k8s_synced.store(true, std::sync::atomic::Ordering::Relaxed);
                updates.push(PodUpdate::Synced);
                updates
            }
            Ok(watcher::Event::Apply(pod)) => upsert(&pod, &mut owners).await.into_iter().collect(),
            Ok(watcher::Event::Delete(pod)) => pod.metadata.uid.map(|uid| PodUpdate::Delete { uid }).into_iter().collect(),
            Err(e) => {
                telemetry.k8s_watch_errors.inc();
                log::warn!("Kubernetes pod watch (node {node_name}): {e}; retrying");
                Vec::new()
            }
        };
        for update in updates {
            match &update {
                PodUpdate::Upsert(meta) => known.insert(meta.uid.clone()),
                PodUpdate::Delete { uid } => known.remove(uid),
                PodUpdate::Synced => false,
            };
            telemetry.k8s_pods.store(known.len() as u64, std::sync::atomic::Ordering::Relaxed);
            if tx.send(update).await.is_err() {
                return; // the agent is stopping
            }
        }
    }
}

async fn upsert(pod: &Pod, owners: &mut Owners) -> Option<PodUpdate> {
    let mut meta = PodMeta::from_pod(pod)?;
    if let Some(parent) = owners.parent_of(&meta).await {
        meta.owners.push(parent);
    }
    Some(PodUpdate::Upsert(meta))
}

/// (namespace, kind, name) of a pod's controller.
type OwnerKey = (String, String, String);

/// Owners of ReplicaSets and Jobs, looked up once each (failures again after a while).
struct Owners {
    client: Client,
    cache: HashMap<OwnerKey, CachedOwner>,
}

struct CachedOwner {
    parent: Option<(String, String)>,
    /// Set when the look-up failed and `parent` is a guess.
    retry_at: Option<Instant>,
}

impl Owners {
    fn new(client: Client) -> Self {
        Self { client, cache: HashMap::new() }
    }

    /// The owner of the pod's controller, when that is a ReplicaSet or a Job.
    async fn parent_of(&mut self, pod: &PodMeta) -> Option<(String, String)> {
        let (kind, name) = pod.controller()?;
        let key = (pod.namespace.clone(), kind.to_owned(), name.to_owned());
        if let Some(cached) = self.cache.get(&key).filter(|c| c.retry_at.is_none_or(|at| Instant::now() < at)) {
            return cached.parent.clone();
        }
        let looked_up = match kind {
            "ReplicaSet" => self.controller_of::<ReplicaSet>(&pod.namespace, name).await,
            "Job" => self.controller_of::<Job>(&pod.namespace, name).await,
            _ => Ok(None),
        };
        let cached = match looked_up {
            Ok(parent) => CachedOwner { parent, retry_at: None },
            Err(e) => {
                log::debug!("owner of {kind} {}/{name}: {e}", pod.namespace);
                CachedOwner { parent: deployment_by_hash(pod), retry_at: Some(Instant::now() + OWNER_RETRY_AFTER) }
            }
        };
        if self.cache.len() >= MAX_CACHED_OWNERS {
            self.cache.clear();
        }
        let parent = cached.parent.clone();
        self.cache.insert(key, cached);
        parent
    }

    async fn controller_of<K>(&self, namespace: &str, name: &str) -> Result<Option<(String, String)>, String>
    where
        K: Resource<Scope = NamespaceResourceScope> + DeserializeOwned + Clone + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let object = match tokio::time::timeout(OWNER_LOOKUP_TIMEOUT, api.get_opt(name)).await {
            Err(_) => return Err("timed out".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(None)) => return Ok(None),
            Ok(Ok(Some(object))) => object,
        };
        Ok(pod::controller(object.meta()))
    }
}

/// Without the ReplicaSet (API error), its name still tells the Deployment: `<deployment>-<hash>`
/// where `<hash>` is the pod's `pod-template-hash` label.
fn deployment_by_hash(pod: &PodMeta) -> Option<(String, String)> {
    let (kind, name) = pod.controller()?;
    let hash = pod.labels.get("pod-template-hash")?;
    let deployment = name.strip_suffix(hash.as_str())?.strip_suffix('-')?;
    (kind == "ReplicaSet" && !deployment.is_empty()).then(|| ("Deployment".to_owned(), deployment.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_from_the_template_hash() {
        let pod = PodMeta {
            uid: "u".into(),
            name: "web-5d8f-x2k".into(),
            namespace: "shop".into(),
            node: "n".into(),
            labels: [("pod-template-hash".to_owned(), "5d8f".to_owned())].into(),
            owners: vec![("ReplicaSet".into(), "web-5d8f".into())],
            containers: Vec::new(),
            config_uid: None,
        };
        assert_eq!(deployment_by_hash(&pod), Some(("Deployment".into(), "web".into())));
        let job = PodMeta { owners: vec![("Job".into(), "web-5d8f".into())], ..pod.clone() };
        assert_eq!(deployment_by_hash(&job), None);
        let other = PodMeta { labels: Default::default(), ..pod };
        assert_eq!(deployment_by_hash(&other), None);
    }
}
