//! The `kubernetes` state source: a kube-rs watcher and reflector store per kind (Namespaces,
//! Nodes, Pods, NetworkPolicies, Services, EndpointSlices and keyway's resources) feeding the same [`Model`] as
//! the `file` source through the same parser — objects are turned back into the documents the
//! file source would read, so the two cannot disagree about what an object means.
//!
//! - Each event changes only its own object in the model; a relist (after a 410 Gone, say)
//!   replaces that kind's objects whole from the reflector's store, so deletions missed while
//!   away are not kept. Events that arrive together are published as one model.
//! - Ready (the first model is sent) only once every kind has been listed.
//! - Errors back off (kube's default: exponential, capped) and are counted; meanwhile the last
//!   good model stays in force, so existing pods keep working, and pods that appear only in the
//!   API server wait (their handoff fails with "try again later": fail closed).
//! - An object that does not parse keeps its last good version, as a file does in the file source.
//!
//! Pods carry their overlay addresses in the `keyway.io/overlay` annotation that the serving
//! agent writes ([`KubePublisher`]); it becomes the same OverlayAttachment the file source reads
//! from `.keyway/`.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::{LastGood, PublishError, SourceStats};
use crate::model::resources::{
    ClusterConfigResource, DirectPathResource, ExternalEntityResource, OverlayBlockResource,
    OverlayNetworkResource,
};
use crate::model::{
    Kind, Model, Object, ObjectError, ObjectKey, OverlayAttachmentSpec, parse_object,
};

/// The pod annotation through which agents publish a pod's place on the overlay.
pub const OVERLAY_ANNOTATION: &str = "keyway.io/overlay";

/// What the annotation holds (the OverlayAttachment's spec without the pod's own name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OverlayAnnotation {
    pub node: String,
    pub infra_ip: std::net::IpAddr,
    pub overlay_ips: Vec<std::net::IpAddr>,
    /// The publishing agent's attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
}

/// The objects one API object stands for (a pod can also stand for its attachment).
pub fn objects_of(doc: Value) -> Result<Vec<Object>, ObjectError> {
    let annotation = doc
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(OVERLAY_ANNOTATION))
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut out: Vec<Object> = parse_object(doc)?.into_iter().collect();
    let key = match out.first() {
        Some(Object::Pod(p)) => p.key.clone(),
        _ => return Ok(out),
    };
    match annotation.map(|a| serde_json::from_str::<OverlayAnnotation>(&a)) {
        Some(Ok(a)) => out.push(Object::OverlayAttachment(OverlayAttachmentSpec {
            namespace: key.namespace,
            pod: key.name,
            node: a.node,
            infra_ip: a.infra_ip,
            overlay_ips: a.overlay_ips,
            proof: a.proof,
        })),
        Some(Err(e)) => {
            tracing::warn!(pod = %key, error = %e, "ignoring an unreadable {OVERLAY_ANNOTATION} annotation");
        }
        None => {}
    }
    Ok(out)
}

/// What a watched kind is: an API resource keyway reads and turns back into a document.
trait Watched:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug + Send + Sync + 'static
{
}

impl<K> Watched for K where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug
        + Send
        + Sync
        + 'static
{
}

/// An object's parse, or why it has none.
type Parsed = Result<Vec<Object>, ObjectError>;

/// What a kind's watcher tells the model.
#[derive(Debug)]
enum Update {
    /// One object was added or changed: its document and what it parsed into.
    Apply(ObjectKey, Value, Parsed),
    /// One object is gone.
    Delete(ObjectKey),
    /// The kind was (re)listed: these are all its objects now.
    Listed(Vec<(ObjectKey, Value, Parsed)>),
    Error(watcher::Error),
}

fn key_of<K: Resource>(o: &K) -> ObjectKey {
    ObjectKey::new(ResourceExt::namespace(o).unwrap_or_default(), o.name_any())
}

/// An object's document, and what it parses into.
fn parse<K: Serialize>(o: &K) -> (Value, Parsed) {
    let doc = serde_json::to_value(o).expect("API objects serialize");
    (doc.clone(), objects_of(doc))
}

/// Runs one kind's watcher into its reflector store, forwarding what changed.
async fn watch_kind<K>(
    api: Api<K>,
    kind: Kind,
    writer: reflector::store::Writer<K>,
    tx: mpsc::UnboundedSender<(Kind, Update)>,
) where
    K: Watched,
{
    let store = writer.as_reader();
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .boxed();
    while let Some(ev) = stream.next().await {
        let u = match ev {
            Ok(Event::Apply(o)) => {
                let (doc, parsed) = parse(&o);
                Update::Apply(key_of(&o), doc, parsed)
            }
            Ok(Event::Delete(o)) => Update::Delete(key_of(&o)),
            // The store swapped the relist in before passing the event on.
            Ok(Event::InitDone) => Update::Listed(
                store
                    .state()
                    .iter()
                    .map(|o| {
                        let (doc, parsed) = parse(o.as_ref());
                        (key_of(o.as_ref()), doc, parsed)
                    })
                    .collect(),
            ),
            Ok(Event::Init | Event::InitApply(_)) => continue,
            Err(e) => Update::Error(e),
        };
        if tx.send((kind, u)).is_err() {
            return;
        }
    }
}

/// The model as the watchers build it, one object at a time.
#[derive(Debug, Default)]
struct Builder {
    model: Model,
    listed: BTreeSet<Kind>,
    /// Where last good versions outlive the agent.
    last_good: Option<LastGood>,
}

impl Builder {
    /// Puts one object's parse in the model; on a parse error the object keeps its last good
    /// version. Whether the model changed.
    /// After a restart the last good version comes from disk.
    fn apply(
        &mut self,
        kind: Kind,
        key: &ObjectKey,
        doc: &Value,
        parsed: Parsed,
        stats: &SourceStats,
    ) -> bool {
        match parsed {
            Ok(objects) => {
                if let Some(lg) = &self.last_good {
                    lg.keep(kind, key, doc);
                }
                self.model.remove(kind, key);
                for o in objects {
                    self.model.insert(o);
                }
                true
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                if !self.model.keys(kind).contains(key)
                    && let Some(objects) = self
                        .last_good
                        .as_ref()
                        .and_then(|lg| lg.recall(kind, key))
                        .and_then(|d| objects_of(d).ok())
                {
                    tracing::error!(?kind, object = %key, error = %e, "object does not parse; keeping its last good version, kept from before a restart");
                    for o in objects {
                        self.model.insert(o);
                    }
                    return true;
                }
                tracing::error!(?kind, object = %key, error = %e, "object does not parse; keeping its last good version");
                false
            }
        }
    }

    /// Whether the model changed.
    fn update(&mut self, kind: Kind, u: Update, stats: &SourceStats) -> bool {
        match u {
            Update::Apply(key, doc, parsed) => self.apply(kind, &key, &doc, parsed, stats),
            Update::Delete(key) => {
                self.model.remove(kind, &key);
                if let Some(lg) = &self.last_good {
                    lg.forget(kind, &key);
                }
                true
            }
            Update::Listed(objects) => {
                let listed: BTreeSet<&ObjectKey> = objects.iter().map(|(k, _, _)| k).collect();
                for gone in self.model.keys(kind).iter().filter(|k| !listed.contains(k)) {
                    self.model.remove(kind, gone);
                    if let Some(lg) = &self.last_good {
                        lg.forget(kind, gone);
                    }
                }
                if self.listed.insert(kind) {
                    tracing::info!(?kind, objects = objects.len(), "listed");
                }
                for (key, doc, parsed) in objects {
                    self.apply(kind, &key, &doc, parsed, stats);
                }
                true
            }
            Update::Error(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(?kind, error = %e, "watch failed; backing off, keeping the last good state");
                false
            }
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
    /// The pods as the API server last said, for the publisher.
    pub pods: Store<Pod>,
}

fn start<K>(
    client: &kube::Client,
    kind: Kind,
    tx: &mpsc::UnboundedSender<(Kind, Update)>,
) -> Store<K>
where
    K: Watched,
{
    let (store, writer) = reflector::store::<K>();
    tokio::spawn(watch_kind(
        Api::<K>::all(client.clone()),
        kind,
        writer,
        tx.clone(),
    ));
    store
}

/// Starts the watchers on `client` and the task that keeps the model.
/// Last good versions are kept in `last_good`.
pub fn spawn(client: kube::Client, last_good: LastGood) -> KubeSource {
    let stats: Arc<SourceStats> = Arc::default();
    let (tx, mut rx) = mpsc::unbounded_channel();
    start::<Namespace>(&client, Kind::Namespace, &tx);
    start::<Node>(&client, Kind::Node, &tx);
    let pods = start::<Pod>(&client, Kind::Pod, &tx);
    start::<NetworkPolicy>(&client, Kind::NetworkPolicy, &tx);
    start::<OverlayNetworkResource>(&client, Kind::OverlayNetwork, &tx);
    start::<DirectPathResource>(&client, Kind::DirectPath, &tx);
    start::<ExternalEntityResource>(&client, Kind::ExternalEntity, &tx);
    start::<ClusterConfigResource>(&client, Kind::ClusterConfig, &tx);
    start::<OverlayBlockResource>(&client, Kind::OverlayBlock, &tx);
    start::<Service>(&client, Kind::Service, &tx);
    start::<EndpointSlice>(&client, Kind::EndpointSlice, &tx);
    const KINDS: usize = 11;
    drop(tx);
    let (model_tx, model_rx) = watch::channel(Arc::new(Model::default()));
    let (ready_tx, ready_rx) = watch::channel(false);
    let st = stats.clone();
    tokio::spawn(async move {
        let mut b = Builder {
            last_good: Some(last_good),
            ..Builder::default()
        };
        while let Some(first) = rx.recv().await {
            let mut changed = false;
            let mut next = Some(first);
            while let Some((kind, u)) = next {
                changed |= b.update(kind, u, &st);
                next = rx.try_recv().ok();
            }
            if !changed || b.listed.len() < KINDS {
                continue;
            }
            st.reloads.fetch_add(1, Ordering::Relaxed);
            if model_tx.send(Arc::new(b.model.clone())).is_err() {
                return;
            }
            if !*ready_tx.borrow() {
                tracing::info!("every kind listed: the model is ready");
                let _ = ready_tx.send(true);
            }
        }
    });
    KubeSource {
        model: model_rx,
        ready: ready_rx,
        stats,
        pods,
    }
}

/// Publishes attachments as the pod's `keyway.io/overlay` annotation (a merge patch that touches
/// nothing else on the pod); knows what this node published from the pods' reflector store.
#[derive(Clone)]
pub struct KubePublisher {
    client: kube::Client,
    node: String,
    pods: Store<Pod>,
}

impl Debug for KubePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePublisher")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl KubePublisher {
    pub fn new(client: kube::Client, node: &str, pods: Store<Pod>) -> KubePublisher {
        KubePublisher {
            client,
            node: node.to_string(),
            pods,
        }
    }

    async fn annotate(&self, pod: &ObjectKey, value: Value) -> Result<(), PublishError> {
        use kube::api::{Patch, PatchParams};
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {OVERLAY_ANNOTATION: value}}});
        match api
            .patch(&pod.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            // A pod that is gone has nothing left to publish or withdraw.
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn publish(&self, a: &OverlayAttachmentSpec) -> Result<(), PublishError> {
        let ann = OverlayAnnotation {
            node: a.node.clone(),
            infra_ip: a.infra_ip,
            overlay_ips: a.overlay_ips.clone(),
            proof: a.proof.clone(),
        };
        let text = serde_json::to_string(&ann).expect("an annotation serializes");
        let pod = ObjectKey::new(&a.namespace, &a.pod);
        self.annotate(&pod, Value::String(text)).await
    }

    pub async fn withdraw(&self, pod: &ObjectKey) -> Result<(), PublishError> {
        self.annotate(pod, Value::Null).await
    }

    /// The pods whose annotation names this node, as the reflector last saw them.
    pub fn published(&self) -> Vec<ObjectKey> {
        let mut v: Vec<ObjectKey> = self
            .pods
            .state()
            .iter()
            .filter(|p| {
                p.annotations()
                    .get(OVERLAY_ANNOTATION)
                    .and_then(|a| serde_json::from_str::<OverlayAnnotation>(a).ok())
                    .is_some_and(|a| a.node == self.node)
            })
            .map(|p| key_of(p.as_ref()))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: Value) -> Value {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "x", "labels": labels}})
    }

    fn parsed(v: Value) -> Parsed {
        objects_of(v)
    }

    fn listed(key: ObjectKey, v: Value) -> (ObjectKey, Value, Parsed) {
        (key, v.clone(), parsed(v))
    }

    fn policy(name: &str, protocol: &str) -> Value {
        serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "x"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"],
                     "ingress": [{"ports": [{"port": 80, "protocol": protocol}]}]}})
    }

    #[test]
    fn a_policy_that_stops_parsing_stays_in_force_across_a_restart() {
        let t = keyway_testing::Scratch::new("kube-last-good");
        let stats = SourceStats::default();
        let key = ObjectKey::new("x", "web");
        let mut b = Builder {
            last_good: Some(LastGood::new(t.path())),
            ..Builder::default()
        };
        let good = policy("web", "TCP");
        b.update(
            Kind::NetworkPolicy,
            Update::Listed(vec![listed(key.clone(), good)]),
            &stats,
        );
        assert_eq!(b.model.policies.len(), 1);
        // The agent restarts; meanwhile the policy was changed into one that does not parse.
        let bad = policy("web", "ICMP");
        assert!(parsed(bad.clone()).is_err());
        let mut after = Builder {
            last_good: Some(LastGood::new(t.path())),
            ..Builder::default()
        };
        after.update(
            Kind::NetworkPolicy,
            Update::Listed(vec![listed(key.clone(), bad)]),
            &stats,
        );
        assert_eq!(
            after.model.policies.len(),
            1,
            "the last good version from before the restart is enforced"
        );
        // Deleted: gone for good, also from disk.
        after.update(Kind::NetworkPolicy, Update::Delete(key.clone()), &stats);
        assert!(
            LastGood::new(t.path())
                .recall(Kind::NetworkPolicy, &key)
                .is_none()
        );
    }

    #[test]
    fn events_change_one_object_and_a_relist_replaces_the_kind() {
        let stats = SourceStats::default();
        let mut b = Builder::default();
        let key = |n: &str| ObjectKey::new("x", n);
        b.update(
            Kind::Pod,
            Update::Listed(vec![
                listed(key("a"), pod("a", serde_json::json!({"v": "1"}))),
                listed(key("b"), pod("b", serde_json::json!({}))),
            ]),
            &stats,
        );
        assert_eq!(b.model.pods.len(), 2);
        // An update that does not parse keeps the last good version.
        let bad = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "x"},
            "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "protocol": "ICMP"}]}]}});
        assert!(!b.update(
            Kind::Pod,
            Update::Apply(key("a"), bad.clone(), parsed(bad)),
            &stats
        ));
        assert_eq!(b.model.pods[&key("a")].labels["v"], "1");
        assert_eq!(stats.errors.load(Ordering::Relaxed), 1);
        b.update(Kind::Pod, Update::Delete(key("b")), &stats);
        assert_eq!(b.model.pods.len(), 1);
        // A relist without a: a was deleted while the watch was away.
        b.update(
            Kind::Pod,
            Update::Listed(vec![listed(key("c"), pod("c", serde_json::json!({})))]),
            &stats,
        );
        assert_eq!(b.model.pods.keys().cloned().collect::<Vec<_>>(), [key("c")]);
        assert_eq!(b.listed.len(), 1);
    }

    #[test]
    fn a_pods_annotation_is_its_attachment() {
        let mut p = pod("a", serde_json::json!({}));
        p["metadata"]["annotations"] = serde_json::json!({OVERLAY_ANNOTATION:
            r#"{"node":"node-1","infraIp":"10.244.1.5","overlayIps":["100.64.0.7"]}"#});
        let o = objects_of(p.clone()).unwrap();
        assert!(
            matches!(&o[1], Object::OverlayAttachment(a) if a.node == "node-1" && a.pod == "a")
        );
        p["metadata"]["annotations"] = serde_json::json!({OVERLAY_ANNOTATION: "{not json"});
        assert_eq!(
            objects_of(p).unwrap().len(),
            1,
            "an unreadable annotation is ignored"
        );
    }
}
