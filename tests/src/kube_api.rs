//! A fake Kubernetes API server speaking the real JSON wire format, so the
//! agent's pod metadata (kube-rs `watcher` on `Api<Pod>::all` with a
//! `spec.nodeName=<node>` field selector, ReplicaSet and Job look-ups, a
//! client built from a kubeconfig file) can be tested without a cluster: no
//! kube-apiserver (nor etcd) can run on the test machines.
//!
//! It serves plain HTTP on 127.0.0.1 and fakes, for pods, what kube-rs 5 uses:
//! - list: `GET /api/v1/pods?&fieldSelector=spec.nodeName%3D<node>&limit=500`
//!   (or `/api/v1/namespaces/<ns>/pods`) returns a `PodList` of every matching
//!   pod at once (no `continue` token) with the current `resourceVersion`;
//! - watch: the same path with `watch=true` (or `1`) streams newline-separated
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK","object":{..}}` events:
//!   every change after `resourceVersion=N` (replayed from an event log that is
//!   never compacted, so no version is ever "too old"), synthetic ADDEDs for
//!   `resourceVersion` unset or `0`, and for `sendInitialEvents=true` (streaming
//!   list) ADDEDs then a BOOKMARK annotated `k8s.io/initial-events-end`; then
//!   live changes, until `timeoutSeconds` pass. As with a real field selector,
//!   a pod that starts (stops) matching arrives as ADDED (DELETED);
//! - get: `GET /api/v1/namespaces/<ns>/pods/<name>`, and any object given to
//!   [`FakeKubeApi::put_object`] at its canonical path;
//! - anything else: a `Status` 404 (`reason: NotFound`); during a simulated
//!   outage ([`FakeKubeApi::set_unavailable`]) a `Status` 500 for everything.
//!
//! `labelSelector`, `limit` and authentication are accepted and ignored.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc as tokio_mpsc, oneshot};
use tokio::time::Sleep;

use crate::util::poll_until;

/// The bearer token of the user in [`FakeKubeApi::write_kubeconfig`].
pub const KUBECONFIG_TOKEN: &str = "test-token";

/// `metadata.creationTimestamp` (and other timestamps) of built objects.
const CREATED_AT: &str = "2024-01-01T00:00:00Z";

/// Annotation of the BOOKMARK that ends a streaming list's initial events.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// A fake kube-apiserver on 127.0.0.1 with its own tokio runtime thread.
/// Stops on drop (closing open watches).
pub struct FakeKubeApi {
    addr: SocketAddr,
    cluster: Arc<Mutex<Cluster>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeKubeApi {
    /// Starts serving plain HTTP on 127.0.0.1:<ephemeral port>, with no objects.
    pub fn start() -> FakeKubeApi {
        let cluster = Arc::new(Mutex::new(Cluster::default()));
        let (addr_tx, addr_rx) = mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let thread_cluster = Arc::clone(&cluster);
        let thread = thread::Builder::new()
            .name("fake-kube-api".to_string())
            .spawn(move || run_server(thread_cluster, addr_tx, shutdown_rx))
            .expect("spawn fake Kubernetes API thread");
        let addr =
            addr_rx.recv_timeout(Duration::from_secs(10)).expect("fake Kubernetes API did not report its address");
        FakeKubeApi { addr, cluster, shutdown: Some(shutdown_tx), thread: Some(thread) }
    }

    /// 127.0.0.1:<port>
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes `<dir>/kubeconfig`: one cluster (server [`FakeKubeApi::url`],
    /// insecure-skip-tls-verify), one user with bearer token
    /// [`KUBECONFIG_TOKEN`], one context (namespace `default`) that is the
    /// current context. Returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, kubeconfig_yaml(&self.url()))
            .unwrap_or_else(|e| panic!("write kubeconfig {}: {e}", path.display()));
        path
    }

    /// Creates or replaces the pod with `pod`'s `metadata.uid` (see [`pod`]),
    /// giving it the next `resourceVersion`: ADDED if the uid is new, else
    /// MODIFIED, to every open watch whose selector matches.
    pub fn upsert_pod(&self, pod: Value) {
        let uid = required_str(&pod, "/metadata/uid", "upsert_pod").to_string();
        self.cluster().change_pod(&uid, Some(pod));
    }

    /// Deletes the pod with `uid` (a DELETED event with its last state);
    /// panics if there is no such pod.
    pub fn delete_pod(&self, uid: &str) {
        let removed = self.cluster().change_pod(uid, None);
        assert!(removed.is_some(), "delete_pod: no pod with uid {uid:?}");
    }

    /// Serves `object` (with the next `resourceVersion`) to GETs of its
    /// canonical path, derived from `apiVersion`, `kind`, `metadata.namespace`
    /// (absent for cluster-scoped objects) and `metadata.name`: a ReplicaSet at
    /// `/apis/apps/v1/namespaces/{ns}/replicasets/{name}`, a Job at
    /// `/apis/batch/v1/namespaces/{ns}/jobs/{name}`. A Pod goes to [`FakeKubeApi::upsert_pod`].
    pub fn put_object(&self, object: Value) {
        if object["kind"] == "Pod" && object["apiVersion"] == "v1" {
            return self.upsert_pod(object);
        }
        let path = canonical_path(&object).unwrap_or_else(|e| panic!("put_object: {e}: {object}"));
        self.cluster().put_object(path, object);
    }

    /// Every request received so far, as `"<METHOD> <path>?<query>"` lines,
    /// e.g. `"GET /api/v1/pods?&fieldSelector=spec.nodeName%3Dnode-a&limit=500"`.
    pub fn requests(&self) -> Vec<String> {
        self.cluster().requests.clone()
    }

    /// Waits until a received request line satisfies `predicate` and returns it;
    /// panics with every request received on timeout.
    pub fn wait_for_request(&self, what: &str, predicate: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let find = || self.requests().into_iter().find(|line| predicate(line));
        if poll_until(timeout, || find().is_some()) {
            if let Some(line) = find() {
                return line;
            }
        }
        panic!("no request {what} within {timeout:?}; requests:\n  {}", self.requests().join("\n  "));
    }

    /// While `down`, every request gets a `Status` 500 (an apiserver that lost
    /// etcd); going down also ends every open watch. Pods may still change
    /// meanwhile: a watch resuming afterwards from its last `resourceVersion`
    /// gets the changes it missed.
    ///
    /// 500, not 503: kube-rs 5's client retries 503s by itself for about
    /// 160 s without telling its watcher, which would make outage tests slow;
    /// a 500 reaches the watcher, which backs off and lists again.
    pub fn set_unavailable(&self, down: bool) {
        let mut cluster = self.cluster();
        cluster.unavailable = down;
        if down {
            // Dropping the senders ends the watch response bodies.
            cluster.watches.clear();
        }
    }

    fn cluster(&self) -> MutexGuard<'_, Cluster> {
        self.cluster.lock().expect("fake Kubernetes API state poisoned")
    }
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            if shutdown.send(()).is_err() {
                eprintln!("note: fake Kubernetes API had already stopped");
            }
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() && !thread::panicking() {
                panic!("fake Kubernetes API thread panicked");
            }
        }
    }
}

fn kubeconfig_yaml(server: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {server}
    insecure-skip-tls-verify: true
users:
- name: fake-user
  user:
    token: {KUBECONFIG_TOKEN}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake-user
    namespace: default
current-context: fake
preferences: {{}}
"
    )
}

/// One change to a pod, as logged for watches resuming from an older version.
struct PodChange {
    version: u64,
    /// The pod before the change (None when it was created).
    previous: Option<Value>,
    /// The pod after the change; for a deletion its last state.
    object: Value,
    deleted: bool,
}

/// An open watch: which pods it sees and where its events go.
struct Watch {
    selector: PodSelector,
    events: tokio_mpsc::UnboundedSender<Bytes>,
}

/// Everything the fake server knows, shared by the test thread and the server.
#[derive(Default)]
struct Cluster {
    /// The last `resourceVersion` handed out.
    version: u64,
    /// Current pods by uid.
    pods: BTreeMap<String, Value>,
    /// Every pod change, oldest first.
    pod_log: Vec<PodChange>,
    /// Non-pod objects by canonical path.
    objects: HashMap<String, Value>,
    watches: Vec<Watch>,
    requests: Vec<String>,
    unavailable: bool,
}

impl Cluster {
    fn next_version(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    /// Stores (`Some`) or deletes (`None`) the pod with `uid`, logs the change
    /// and sends it to the open watches. Returns the previous pod.
    fn change_pod(&mut self, uid: &str, pod: Option<Value>) -> Option<Value> {
        let previous = self.pods.get(uid).cloned();
        if pod.is_none() && previous.is_none() {
            return None;
        }
        let version = self.next_version();
        let deleted = pod.is_none();
        let mut object = pod.or_else(|| previous.clone()).expect("a new or a previous pod");
        set_resource_version(&mut object, version);
        if deleted {
            self.pods.remove(uid);
        } else {
            self.pods.insert(uid.to_string(), object.clone());
        }
        let change = PodChange { version, previous: previous.clone(), object, deleted };
        self.watches.retain(|watch| watch.send_change(&change));
        self.pod_log.push(change);
        previous
    }

    fn put_object(&mut self, path: String, mut object: Value) {
        let version = self.next_version();
        set_resource_version(&mut object, version);
        self.objects.insert(path, object);
    }

    /// Current pods matching `selector`, oldest version first.
    fn pods_matching(&self, selector: &PodSelector) -> Vec<Value> {
        let mut pods: Vec<Value> = self.pods.values().filter(|pod| selector.matches(pod)).cloned().collect();
        pods.sort_by_key(resource_version);
        pods
    }

    fn pod_named(&self, namespace: &str, name: &str) -> Option<Value> {
        self.pods
            .values()
            .find(|pod| pod["metadata"]["namespace"] == namespace && pod["metadata"]["name"] == name)
            .cloned()
    }

    /// Opens a watch: queues its initial events (see the module doc) and
    /// registers it for live ones, atomically so that no change is missed.
    fn open_watch(&mut self, selector: PodSelector, start: &WatchStart) -> tokio_mpsc::UnboundedReceiver<Bytes> {
        let (sender, receiver) = tokio_mpsc::unbounded_channel();
        let watch = Watch { selector, events: sender };
        match start {
            WatchStart::After(version) => {
                self.pod_log.iter().filter(|change| change.version > *version).for_each(|change| {
                    watch.send_change(change);
                });
            }
            WatchStart::Now { initial_events_end } => {
                for pod in self.pods_matching(&watch.selector) {
                    watch.send_event("ADDED", &pod);
                }
                if *initial_events_end {
                    watch.send_event("BOOKMARK", &initial_events_end_bookmark(self.version));
                }
            }
        }
        self.watches.push(watch);
        receiver
    }
}

impl Watch {
    /// Sends what this watch sees of `change`; false once the watch is closed.
    fn send_change(&self, change: &PodChange) -> bool {
        let was_visible = change.previous.as_ref().is_some_and(|pod| self.selector.matches(pod));
        let is_visible = !change.deleted && self.selector.matches(&change.object);
        let event_type = match (was_visible, is_visible) {
            (false, true) => "ADDED",
            (true, true) => "MODIFIED",
            (true, false) => "DELETED",
            (false, false) => return !self.events.is_closed(),
        };
        self.send_event(event_type, &change.object)
    }

    fn send_event(&self, event_type: &str, object: &Value) -> bool {
        let mut line = json!({ "type": event_type, "object": object }).to_string();
        line.push('\n');
        self.events.send(Bytes::from(line)).is_ok()
    }
}

fn initial_events_end_bookmark(version: u64) -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": { "resourceVersion": version.to_string(), "annotations": { INITIAL_EVENTS_END: "true" } },
    })
}

fn set_resource_version(object: &mut Value, version: u64) {
    object["metadata"]["resourceVersion"] = Value::String(version.to_string());
}

fn resource_version(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn required_str<'a>(object: &'a Value, pointer: &str, caller: &str) -> &'a str {
    object
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{caller}: no string {pointer} in {object}"))
}

/// Which pods a list or watch sees: a namespace (None = all) and a field selector.
struct PodSelector {
    namespace: Option<String>,
    fields: Vec<FieldRequirement>,
}

/// One `path=value`, `path==value` or `path!=value` of a field selector.
struct FieldRequirement {
    path: String,
    value: String,
    equal: bool,
}

impl PodSelector {
    fn new(namespace: Option<&str>, field_selector: Option<&str>) -> PodSelector {
        let fields = field_selector.map(parse_field_selector).unwrap_or_default();
        PodSelector { namespace: namespace.map(str::to_string), fields }
    }

    fn matches(&self, pod: &Value) -> bool {
        let namespace_matches = self.namespace.as_ref().is_none_or(|ns| pod["metadata"]["namespace"] == ns.as_str());
        namespace_matches && self.fields.iter().all(|field| field.matches(pod))
    }
}

impl FieldRequirement {
    /// Compares the string at the dotted `path` (missing = "") with `value`.
    fn matches(&self, object: &Value) -> bool {
        let actual = self.path.split('.').try_fold(object, |value, key| value.get(key));
        let actual = actual.and_then(Value::as_str).unwrap_or("");
        (actual == self.value) == self.equal
    }
}

fn parse_field_selector(selector: &str) -> Vec<FieldRequirement> {
    selector.split(',').filter(|term| !term.is_empty()).map(parse_field_requirement).collect()
}

fn parse_field_requirement(term: &str) -> FieldRequirement {
    let requirement = |(path, value): (&str, &str), equal| FieldRequirement {
        path: path.trim().to_string(),
        value: value.trim().to_string(),
        equal,
    };
    if let Some(pair) = term.split_once("!=") {
        requirement(pair, false)
    } else if let Some(pair) = term.split_once("==") {
        requirement(pair, true)
    } else {
        requirement(term.split_once('=').unwrap_or((term, "")), true)
    }
}

/// Where a watch starts.
enum WatchStart {
    /// After this `resourceVersion`: replay later changes.
    After(u64),
    /// With the current state (synthetic ADDEDs); for a streaming list, then a
    /// BOOKMARK marking the end of the initial events.
    Now { initial_events_end: bool },
}

/// The query parameters this server looks at.
struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    fn parse(query: Option<&str>) -> Query {
        let pairs = query
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(key), percent_decode(value))
            })
            .collect();
        Query { pairs }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// A Go `strconv.ParseBool` true, as the apiserver parses booleans.
    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("1" | "t" | "T" | "true" | "TRUE" | "True"))
    }

    fn watch_start(&self) -> Result<WatchStart, String> {
        let initial_events_end = self.flag("sendInitialEvents");
        match self.get("resourceVersion").unwrap_or("") {
            "" | "0" => Ok(WatchStart::Now { initial_events_end }),
            _ if initial_events_end => Ok(WatchStart::Now { initial_events_end }),
            version => version
                .parse()
                .map(WatchStart::After)
                .map_err(|_| format!("invalid resourceVersion {version:?}: must be an integer")),
        }
    }

    fn timeout(&self) -> Option<Duration> {
        self.get("timeoutSeconds").and_then(|s| s.parse().ok()).map(Duration::from_secs)
    }
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes.get(i + 1..i + 3).and_then(|hex| std::str::from_utf8(hex).ok());
        match (bytes[i], escaped.and_then(|hex| u8::from_str_radix(hex, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (byte, _) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a request path names.
enum Route<'a> {
    /// `/api/v1/pods` or `/api/v1/namespaces/{ns}/pods`.
    Pods { namespace: Option<&'a str> },
    /// `/api/v1/namespaces/{ns}/pods/{name}`.
    Pod { namespace: &'a str, name: &'a str },
    /// Anything else: an object put with `put_object`, if any.
    Object,
}

fn route(path: &str) -> Route<'_> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segments.as_slice() {
        ["api", "v1", "pods"] => Route::Pods { namespace: None },
        ["api", "v1", "namespaces", namespace, "pods"] => Route::Pods { namespace: Some(namespace) },
        ["api", "v1", "namespaces", namespace, "pods", name] => Route::Pod { namespace, name },
        _ => Route::Object,
    }
}

type ResponseBody = BoxBody<Bytes, Infallible>;

fn run_server(cluster: Arc<Mutex<Cluster>>, addr_tx: mpsc::Sender<SocketAddr>, mut shutdown: oneshot::Receiver<()>) {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("build fake Kubernetes API runtime");
    // Returning drops the runtime, which cancels the connection tasks (and so open watches).
    runtime.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake Kubernetes API");
        let addr = listener.local_addr().expect("fake Kubernetes API local_addr");
        addr_tx.send(addr).expect("report fake Kubernetes API address");
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => {
                    let (stream, _) = accepted.expect("fake Kubernetes API accept");
                    tokio::spawn(serve_connection(stream, Arc::clone(&cluster)));
                }
            }
        }
    });
}

async fn serve_connection(stream: tokio::net::TcpStream, cluster: Arc<Mutex<Cluster>>) {
    let service = service_fn(move |request| {
        let response = handle_request(&request, &cluster);
        async move { Ok::<_, Infallible>(response) }
    });
    let served = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
    if let Err(e) = served {
        // A client that goes away in the middle of a watch is normal.
        if !e.is_incomplete_message() && !e.is_canceled() {
            eprintln!("note: fake Kubernetes API connection error: {e}");
        }
    }
}

fn handle_request(request: &Request<Incoming>, cluster: &Mutex<Cluster>) -> Response<ResponseBody> {
    let mut cluster = cluster.lock().expect("fake Kubernetes API state poisoned");
    let target = request.uri().path_and_query().map_or_else(|| request.uri().path(), |pq| pq.as_str());
    cluster.requests.push(format!("{} {target}", request.method()));
    if cluster.unavailable {
        return status_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "an error on the server (\"etcdserver: request timed out\") has prevented the request from succeeding (simulated outage)",
            json!({}),
        );
    }
    if request.method() != Method::GET {
        let message = format!("the fake Kubernetes API only serves GET, not {}", request.method());
        return status_response(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", &message, json!({}));
    }
    let path = request.uri().path();
    let query = Query::parse(request.uri().query());
    match route(path) {
        Route::Pods { namespace } if query.flag("watch") => watch_pods(&mut cluster, namespace, &query),
        Route::Pods { namespace } => list_pods(&cluster, namespace, &query),
        Route::Pod { namespace, name } => match cluster.pod_named(namespace, name) {
            Some(pod) => json_response(StatusCode::OK, &pod),
            None => not_found(path),
        },
        Route::Object => match cluster.objects.get(path) {
            Some(object) => json_response(StatusCode::OK, object),
            None => not_found(path),
        },
    }
}

fn list_pods(cluster: &Cluster, namespace: Option<&str>, query: &Query) -> Response<ResponseBody> {
    let selector = PodSelector::new(namespace, query.get("fieldSelector"));
    // Like the apiserver's JSON lists, items carry no apiVersion/kind.
    let items: Vec<Value> = cluster.pods_matching(&selector).into_iter().map(without_type_meta).collect();
    let list = json!({
        "apiVersion": "v1",
        "kind": "PodList",
        "metadata": { "resourceVersion": cluster.version.to_string() },
        "items": items,
    });
    json_response(StatusCode::OK, &list)
}

fn without_type_meta(mut object: Value) -> Value {
    if let Some(fields) = object.as_object_mut() {
        fields.remove("apiVersion");
        fields.remove("kind");
    }
    object
}

fn watch_pods(cluster: &mut Cluster, namespace: Option<&str>, query: &Query) -> Response<ResponseBody> {
    let start = match query.watch_start() {
        Ok(start) => start,
        Err(message) => return status_response(StatusCode::BAD_REQUEST, "BadRequest", &message, json!({})),
    };
    let selector = PodSelector::new(namespace, query.get("fieldSelector"));
    let events = cluster.open_watch(selector, &start);
    let body = WatchBody { events, deadline: query.timeout().map(|timeout| Box::pin(tokio::time::sleep(timeout))) };
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body.boxed())
        .expect("valid watch response")
}

/// A watch response: event lines as they are sent, ending when the watch is
/// closed (outage, shutdown) or at `timeoutSeconds`. Unknown length, so hyper
/// sends it chunked to HTTP/1.1 clients.
struct WatchBody {
    events: tokio_mpsc::UnboundedReceiver<Bytes>,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Poll::Ready(line) = self.events.poll_recv(cx) {
            return Poll::Ready(line.map(|line| Ok(Frame::data(line))));
        }
        match self.deadline.as_mut().map(|deadline| deadline.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(None),
            _ => Poll::Pending,
        }
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("valid JSON response")
}

/// A `Status` failure body, as the apiserver sends with every error.
fn status_response(status: StatusCode, reason: &str, message: &str, details: Value) -> Response<ResponseBody> {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": status.as_u16(),
    });
    json_response(status, &body)
}

/// 404 for `path`: `<resource>.<group> "<name>" not found` when it names a
/// namespaced object, else the apiserver's message for unknown paths.
fn not_found(path: &str) -> Response<ResponseBody> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let (group, resource, name) = match segments.as_slice() {
        ["api", _, "namespaces", _, resource, name] => ("", *resource, *name),
        ["apis", group, _, "namespaces", _, resource, name] => (*group, *resource, *name),
        _ => {
            let message = "the server could not find the requested resource";
            return status_response(StatusCode::NOT_FOUND, "NotFound", message, json!({}));
        }
    };
    let qualified = if group.is_empty() { resource.to_string() } else { format!("{resource}.{group}") };
    let message = format!("{qualified} \"{name}\" not found");
    let details = json!({ "name": name, "group": group, "kind": resource });
    status_response(StatusCode::NOT_FOUND, "NotFound", &message, details)
}

/// `/api/v1/...` or `/apis/<group>/<version>/...`, then `namespaces/<ns>/`
/// when namespaced, then `<lowercase plural kind>/<name>`.
fn canonical_path(object: &Value) -> Result<String, String> {
    let field = |pointer: &str| object.pointer(pointer).and_then(Value::as_str);
    let api_version = field("/apiVersion").ok_or("no apiVersion")?;
    let kind = field("/kind").ok_or("no kind")?;
    let name = field("/metadata/name").ok_or("no metadata.name")?;
    let group_prefix = if api_version.contains('/') { "apis" } else { "api" };
    let namespace = field("/metadata/namespace").map(|ns| format!("/namespaces/{ns}")).unwrap_or_default();
    Ok(format!("/{group_prefix}/{api_version}{namespace}/{}/{name}", plural(kind)))
}

/// The resource name of a kind: `ReplicaSet` -> `replicasets`, `NetworkPolicy` -> `networkpolicies`.
fn plural(kind: &str) -> String {
    let lower = kind.to_lowercase();
    if let Some(stem) = lower.strip_suffix('y') {
        format!("{stem}ies")
    } else if lower.ends_with('s') || lower.ends_with('x') || lower.ends_with("ch") || lower.ends_with("sh") {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    }
}

/// What [`pod`] builds.
#[derive(Debug, Clone, Copy)]
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    /// `spec.nodeName`; empty for a pod not scheduled yet (no `nodeName`, phase Pending).
    pub node: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    /// The controlling owner's (kind, name), e.g. `("ReplicaSet", "web-5d8f7c9b4")`;
    /// its uid is [`owner_uid`].
    pub owner: Option<(&'a str, &'a str)>,
    pub containers: &'a [ContainerSpec<'a>],
}

/// One container of a [`PodSpec`].
#[derive(Debug, Clone, Copy)]
pub struct ContainerSpec<'a> {
    pub name: &'a str,
    /// 64 hex digits, served as `containerd://<id>` in `status.containerStatuses`.
    pub container_id: &'a str,
    pub env: &'a [(&'a str, &'a str)],
}

/// A running `v1` Pod as the apiserver returns it. Its `resourceVersion` is
/// replaced when it is given to [`FakeKubeApi::upsert_pod`].
pub fn pod(spec: &PodSpec) -> Value {
    let scheduled = !spec.node.is_empty();
    let containers: Vec<Value> = spec.containers.iter().map(container).collect();
    let mut pod_spec = json!({
        "containers": containers,
        "restartPolicy": "Always",
        "serviceAccountName": "default",
        "terminationGracePeriodSeconds": 30,
    });
    let mut status = json!({ "phase": "Pending", "qosClass": "BestEffort" });
    if scheduled {
        pod_spec["nodeName"] = json!(spec.node);
        let statuses: Vec<Value> = spec.containers.iter().map(container_status).collect();
        status = json!({
            "phase": "Running",
            "hostIP": "10.0.0.10",
            "podIP": "10.244.0.10",
            "startTime": CREATED_AT,
            "qosClass": "BestEffort",
            "containerStatuses": statuses,
        });
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata(spec.namespace, spec.name, spec.uid, spec.labels, spec.owner),
        "spec": pod_spec,
        "status": status,
    })
}

fn container(spec: &ContainerSpec) -> Value {
    let env: Vec<Value> = spec.env.iter().map(|(name, value)| json!({ "name": name, "value": value })).collect();
    json!({
        "name": spec.name,
        "image": image(spec.name),
        "env": env,
        "imagePullPolicy": "IfNotPresent",
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    })
}

fn container_status(spec: &ContainerSpec) -> Value {
    json!({
        "name": spec.name,
        "containerID": format!("containerd://{}", spec.container_id),
        "image": image(spec.name),
        "imageID": format!("{}@sha256:{}", image(spec.name), "0".repeat(64)),
        "ready": true,
        "restartCount": 0,
        "started": true,
        "state": { "running": { "startedAt": CREATED_AT } },
    })
}

fn image(container_name: &str) -> String {
    format!("registry.example/{container_name}:1.0")
}

/// An `apps/v1` ReplicaSet, owned by Deployment `deployment` when given.
pub fn replica_set(namespace: &str, name: &str, uid: &str, deployment: Option<&str>) -> Value {
    let labels = [("app", deployment.unwrap_or(name))];
    let owner = deployment.map(|deployment| ("Deployment", deployment));
    json!({
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": metadata(namespace, name, uid, &labels, owner),
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": label_map(&labels) },
            "template": pod_template(&labels, "Always"),
        },
        "status": { "replicas": 1, "fullyLabeledReplicas": 1, "readyReplicas": 1, "availableReplicas": 1, "observedGeneration": 1 },
    })
}

/// A running `batch/v1` Job, owned by CronJob `cron_job` when given.
pub fn job(namespace: &str, name: &str, uid: &str, cron_job: Option<&str>) -> Value {
    let labels = [("batch.kubernetes.io/controller-uid", uid), ("batch.kubernetes.io/job-name", name)];
    let owner = cron_job.map(|cron_job| ("CronJob", cron_job));
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(namespace, name, uid, &labels, owner),
        "spec": {
            "parallelism": 1,
            "completions": 1,
            "backoffLimit": 6,
            "selector": { "matchLabels": { "batch.kubernetes.io/controller-uid": uid } },
            "template": pod_template(&labels, "Never"),
        },
        "status": { "active": 1, "ready": 1, "startTime": CREATED_AT },
    })
}

fn pod_template(labels: &[(&str, &str)], restart_policy: &str) -> Value {
    json!({
        "metadata": { "labels": label_map(labels) },
        "spec": {
            "containers": [{ "name": "app", "image": image("app") }],
            "restartPolicy": restart_policy,
        },
    })
}

fn metadata(namespace: &str, name: &str, uid: &str, labels: &[(&str, &str)], owner: Option<(&str, &str)>) -> Value {
    let mut metadata = json!({
        "name": name,
        "namespace": namespace,
        "uid": uid,
        "resourceVersion": "1",
        "generation": 1,
        "creationTimestamp": CREATED_AT,
        "labels": label_map(labels),
    });
    if let Some((kind, owner_name)) = owner {
        metadata["ownerReferences"] = json!([owner_reference(kind, owner_name)]);
    }
    metadata
}

fn label_map(labels: &[(&str, &str)]) -> Value {
    labels.iter().map(|(key, value)| (key.to_string(), json!(value))).collect::<serde_json::Map<_, _>>().into()
}

fn owner_reference(kind: &str, name: &str) -> Value {
    json!({
        "apiVersion": owner_api_version(kind),
        "kind": kind,
        "name": name,
        "uid": owner_uid(kind, name),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

fn owner_api_version(kind: &str) -> &'static str {
    match kind {
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" => "apps/v1",
        "Job" | "CronJob" => "batch/v1",
        _ => "v1",
    }
}

/// The uid the built objects give an owner reference to (`kind`, `name`):
/// `<kind lowercase>-<name>-uid`.
pub fn owner_uid(kind: &str, name: &str) -> String {
    format!("{}-{name}-uid", kind.to_lowercase())
}
