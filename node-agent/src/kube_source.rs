//! The `kubernetes` state source: kube-rs watchers on Namespaces, Pods, Nodes, NetworkPolicies,
//! Services and keyway's resources, feeding the same [`Model`] as the `file` source through the same parser —
//! objects are turned back into the documents the file source would read, so the two cannot
//! disagree about what an object means.
//!
//! - Ready (the first model is sent) only once every kind has been listed.
//! - A watch that ends is resumed; one that fails with 410 Gone is relisted, and the relist
//!   replaces that kind's objects whole (deletions missed while away are not kept). Both are the
//!   watcher's own behaviour; this module keeps the stores right across them.
//! - Errors back off (kube's default: exponential, capped) and are counted; meanwhile the last
//!   good model stays in force, so existing pods keep working, and pods that appear only in the
//!   API server wait (their handoff fails with "try again later": fail closed).
//! - An object that does not parse keeps its last good version, as a file does in the file source.
//!
//! Pods carry their overlay addresses in the `keyway.io/overlay` annotation that the serving agent
//! writes; it becomes the same OverlayAttachment the file source reads from `.keyway/`.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::model::{
    ClusterConfigResource, DirectPathResource, ExternalEntityResource, Model, Object,
    OverlayAttachmentSpec, OverlayNetworkResource, parse_object,
};
use crate::source::SourceStats;

/// The pod annotation through which agents publish a pod's place on the overlay.
pub const OVERLAY_ANNOTATION: &str = "keyway.io/overlay";

/// What the annotation holds (the OverlayAttachment's spec without the pod's own name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OverlayAnnotation {
    pub node: String,
    pub infra_ip: std::net::IpAddr,
    pub overlay_ips: Vec<std::net::IpAddr>,
}

/// The kinds watched, in the order the model is built from.
const KINDS: [&str; 9] = [
    "Namespace",
    "Node",
    "Pod",
    "NetworkPolicy",
    "OverlayNetwork",
    "DirectPath",
    "ExternalEntity",
    "ClusterConfig",
    "Service",
];

/// The objects one API object stands for (a pod can also stand for its attachment).
pub fn objects_of(doc: Value) -> Result<Vec<Object>, crate::model::ObjectError> {
    let attachment = (doc.get("kind").and_then(Value::as_str) == Some("Pod"))
        .then(|| {
            let ann = doc
                .pointer("/metadata/annotations")?
                .get(OVERLAY_ANNOTATION)?;
            let parsed: Result<OverlayAnnotation, _> =
                serde_json::from_str(ann.as_str().unwrap_or_default());
            Some((
                parsed,
                doc.pointer("/metadata/namespace").cloned(),
                doc.pointer("/metadata/name").cloned(),
            ))
        })
        .flatten();
    let mut out: Vec<Object> = parse_object(doc)?.into_iter().collect();
    if let Some((parsed, Some(Value::String(ns)), Some(Value::String(name)))) = attachment {
        match parsed {
            Ok(a) => out.push(Object::OverlayAttachment(OverlayAttachmentSpec {
                namespace: ns,
                pod: name,
                node: a.node,
                infra_ip: a.infra_ip,
                overlay_ips: a.overlay_ips,
            })),
            Err(e) => {
                tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "ignoring an unreadable {OVERLAY_ANNOTATION} annotation")
            }
        }
    }
    Ok(out)
}

#[derive(Debug)]
enum Update {
    Init,
    InitApply(String, Value),
    InitDone,
    Apply(String, Value),
    Delete(String),
    Error(String),
}

fn key_of<K: Resource>(o: &K) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

/// Runs one kind's watcher, forwarding its events as documents.
async fn watch_kind<K>(api: Api<K>, kind: usize, tx: mpsc::UnboundedSender<(usize, Update)>)
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug + Send + Sync + 'static,
{
    let doc = |o: &K| serde_json::to_value(o).unwrap_or(Value::Null);
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(ev) = stream.next().await {
        let u = match ev {
            Ok(Event::Init) => Update::Init,
            Ok(Event::InitApply(o)) => Update::InitApply(key_of(&o), doc(&o)),
            Ok(Event::InitDone) => Update::InitDone,
            Ok(Event::Apply(o)) => Update::Apply(key_of(&o), doc(&o)),
            Ok(Event::Delete(o)) => Update::Delete(key_of(&o)),
            Err(e) => Update::Error(e.to_string()),
        };
        if tx.send((kind, u)).is_err() {
            return;
        }
    }
}

/// One kind's objects: the listed ones, and a buffer while a (re)list is under way.
#[derive(Debug, Default)]
struct Store {
    objects: BTreeMap<String, Vec<Object>>,
    relisting: Option<BTreeMap<String, Vec<Object>>>,
    synced: bool,
}

/// Parses `doc`; on failure keeps what `previous` held for `key`.
fn parse_keeping(
    kind: &str,
    key: &str,
    doc: Value,
    previous: Option<&Vec<Object>>,
    stats: &SourceStats,
) -> Vec<Object> {
    match objects_of(doc) {
        Ok(o) => o,
        Err(e) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(kind, object = key, error = %e, "object does not parse; keeping its last good version");
            previous.cloned().unwrap_or_default()
        }
    }
}

/// What [`spawn`] returns.
#[derive(Debug)]
pub struct KubeSource {
    /// The model, sent first once every kind is listed.
    pub model: watch::Receiver<Arc<Model>>,
    /// Becomes true with the first model.
    pub ready: watch::Receiver<bool>,
    pub stats: Arc<SourceStats>,
}

/// Starts the watchers on `client` and the task that keeps the model.
pub fn spawn(client: kube::Client) -> KubeSource {
    let stats: Arc<SourceStats> = Arc::default();
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(watch_kind(
        Api::<Namespace>::all(client.clone()),
        0,
        tx.clone(),
    ));
    tokio::spawn(watch_kind(Api::<Node>::all(client.clone()), 1, tx.clone()));
    tokio::spawn(watch_kind(Api::<Pod>::all(client.clone()), 2, tx.clone()));
    tokio::spawn(watch_kind(
        Api::<NetworkPolicy>::all(client.clone()),
        3,
        tx.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<OverlayNetworkResource>::all(client.clone()),
        4,
        tx.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<DirectPathResource>::all(client.clone()),
        5,
        tx.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<ExternalEntityResource>::all(client.clone()),
        6,
        tx.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<ClusterConfigResource>::all(client.clone()),
        7,
        tx.clone(),
    ));
    tokio::spawn(watch_kind(Api::<Service>::all(client), 8, tx));
    let (model_tx, model_rx) = watch::channel(Arc::new(Model::default()));
    let (ready_tx, ready_rx) = watch::channel(false);
    let st = stats.clone();
    tokio::spawn(async move {
        let mut stores: Vec<Store> = KINDS.iter().map(|_| Store::default()).collect();
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let mut changed = false;
            for (i, u) in batch {
                let kind = KINDS[i];
                let s = &mut stores[i];
                match u {
                    Update::Init => s.relisting = Some(BTreeMap::new()),
                    Update::InitApply(key, doc) => {
                        let objs = parse_keeping(kind, &key, doc, s.objects.get(&key), &st);
                        s.relisting
                            .get_or_insert_with(BTreeMap::new)
                            .insert(key, objs);
                    }
                    Update::InitDone => {
                        s.objects = s.relisting.take().unwrap_or_default();
                        if !s.synced {
                            tracing::info!(kind, objects = s.objects.len(), "listed");
                        }
                        s.synced = true;
                        changed = true;
                    }
                    Update::Apply(key, doc) => {
                        let objs = parse_keeping(kind, &key, doc, s.objects.get(&key), &st);
                        s.objects.insert(key, objs);
                        changed = true;
                    }
                    Update::Delete(key) => {
                        changed |= s.objects.remove(&key).is_some();
                    }
                    Update::Error(e) => {
                        st.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(kind, error = %e, "watch failed; backing off, keeping the last good state");
                    }
                }
            }
            if changed && stores.iter().all(|s| s.synced) {
                st.reloads.fetch_add(1, Ordering::Relaxed);
                let model = Model::from_objects(
                    stores
                        .iter()
                        .flat_map(|s| s.objects.values().flatten().cloned()),
                );
                if model_tx.send(Arc::new(model)).is_err() {
                    return;
                }
                if !*ready_tx.borrow() {
                    tracing::info!("every kind listed: the model is ready");
                    let _ = ready_tx.send(true);
                }
            }
        }
    });
    KubeSource {
        model: model_rx,
        ready: ready_rx,
        stats,
    }
}

/// Publishes attachments as the pod's `keyway.io/overlay` annotation (a merge patch that touches
/// nothing else on the pod).
#[derive(Clone)]
pub struct KubePublisher {
    client: kube::Client,
    node: String,
    handle: tokio::runtime::Handle,
}

impl Debug for KubePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePublisher")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn io_err(e: kube::Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl KubePublisher {
    pub fn new(client: kube::Client, node: &str, handle: tokio::runtime::Handle) -> KubePublisher {
        KubePublisher {
            client,
            node: node.to_string(),
            handle,
        }
    }

    fn annotate(&self, namespace: &str, pod: &str, value: Value) -> std::io::Result<()> {
        use kube::api::{Patch, PatchParams};
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {OVERLAY_ANNOTATION: value}}});
        crate::kube_claims::block_on(&self.handle, async {
            match api
                .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => Ok(()),
                // A pod that is gone has nothing left to publish or withdraw.
                Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
                Err(e) => Err(io_err(e)),
            }
        })
    }
}

impl crate::source::Publisher for KubePublisher {
    fn publish(&self, a: &OverlayAttachmentSpec) -> std::io::Result<()> {
        let ann = OverlayAnnotation {
            node: a.node.clone(),
            infra_ip: a.infra_ip,
            overlay_ips: a.overlay_ips.clone(),
        };
        let text = serde_json::to_string(&ann).map_err(std::io::Error::other)?;
        self.annotate(&a.namespace, &a.pod, Value::String(text))
    }

    fn withdraw(&self, namespace: &str, pod: &str) -> std::io::Result<()> {
        self.annotate(namespace, pod, Value::Null)
    }

    fn published(&self) -> Vec<(String, String)> {
        use kube::api::ListParams;
        let api: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={}", self.node));
        let pods = crate::kube_claims::block_on(&self.handle, api.list(&lp));
        match pods {
            Ok(list) => list
                .items
                .into_iter()
                .filter(|p| {
                    p.annotations()
                        .get(OVERLAY_ANNOTATION)
                        .and_then(|a| serde_json::from_str::<OverlayAnnotation>(a).ok())
                        .is_some_and(|a| a.node == self.node)
                })
                .map(|p| (p.namespace().unwrap_or_default(), p.name_any()))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list this node's pods to find stale publications");
                Vec::new()
            }
        }
    }
}
