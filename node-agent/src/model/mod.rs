//! The one in-memory cluster model, fed by either state source (the `file` directory or the
//! Kubernetes API) and compiled into the data plane's tables. Kubernetes objects are read with
//! k8s-openapi's own types ([`parse`]), so a document that would not pass the API server does not
//! pass here; keyway's own resources are in [`resources`].
//!
//! The model is keyed like the API server: every object by its kind and namespace/name, so a
//! source can apply one object's change ([`Model::insert`], [`Model::remove`]) without rebuilding
//! the rest.

mod parse;
pub mod resources;

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Serialize;

pub use parse::{Invalid, ObjectError, parse_object, parse_selector};
pub use resources::*;

use crate::policy::Labels;

/// keyway's API group and version.
pub const KEYWAY_API_VERSION: &str = "keyway.io/v1alpha1";
/// The label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The Service annotation that asks keyway to publish a Service's endpoints on the overlay: an
/// equality selector (`app=web,tier=front`) over the pods of the Service's namespace.
pub const SERVICE_SELECTOR_ANNOTATION: &str = "keyway.io/selector";
/// The label that ties an EndpointSlice to its Service.
/// The label that keeps pods off keyway: `"false"` on a namespace or a pod (a pod's own value
/// wins). Read at the pod's ADD: a pod keeps what it was given until it is recreated.
pub const ENABLED_LABEL: &str = "keyway.io/enabled";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Istio's label that enrols workloads in ambient: `ambient` on a namespace (or a pod), `none` on
/// a pod to keep it out of its namespace's mesh.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// Whether a pod with `labels` in a namespace with `ns_labels` is in Istio's ambient mesh, as
/// istio-cni decides it: the pod's own [`DATAPLANE_MODE_LABEL`] wins, else its namespace's.
pub fn in_ambient_mesh(labels: &Labels, ns_labels: &Labels) -> bool {
    let mode = labels
        .get(DATAPLANE_MODE_LABEL)
        .or_else(|| ns_labels.get(DATAPLANE_MODE_LABEL));
    mode.is_some_and(|m| m == "ambient")
}

/// Where a namespaced object is: its namespace and name (`namespace/name` when shown).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> ObjectKey {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A container port, for resolving named ports in policies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    /// IP protocol number (TCP by default).
    pub protocol: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub key: ObjectKey,
    pub uid: String,
    pub labels: Labels,
    pub node: Option<String>,
    /// status.podIPs: the infrastructure addresses.
    pub infra_ips: Vec<IpAddr>,
    /// Named container ports.
    pub ports: Vec<NamedPort>,
    /// The pod's Ready condition; `None` when its status has none (as in the lab's files).
    pub ready: Option<bool>,
}

/// A port of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    /// IP protocol number.
    pub protocol: u8,
    /// The Service's port (what DNS SRV records name).
    pub port: u16,
    /// Where the pods listen: a number, or a container port's name.
    pub target: TargetPort,
    /// The port on every node, for NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// A Service, as kube-proxy reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub key: ObjectKey,
    pub uid: String,
    /// `spec.clusterIPs`: none for a headless or ExternalName Service.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `sessionAffinity: ClientIP`: how long a client keeps its endpoint, in seconds.
    pub affinity_secs: Option<u32>,
    /// `internalTrafficPolicy: Local`: cluster IP traffic goes to endpoints on the client's node.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`: NodePort traffic goes to the node's own endpoints.
    pub external_local: bool,
    /// [`SERVICE_SELECTOR_ANNOTATION`]'s selector: a headless, selector-less Service whose
    /// EndpointSlices keyway publishes with overlay addresses (see `docs/services.md`).
    pub covered: Option<Labels>,
}

/// An EndpointSlice (`discovery.k8s.io/v1`) of a Service, IPv4 or IPv6.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointSlice {
    pub key: ObjectKey,
    /// The Service it belongs to (its `kubernetes.io/service-name` label), in its namespace.
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<Endpoint>,
}

/// A port of an EndpointSlice: the Service port's name, and the number its endpoints use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlicePort {
    pub name: String,
    pub port: u16,
    pub protocol: u8,
}

/// An endpoint of an EndpointSlice: its first address (kube-proxy uses no other) and conditions
/// (an unset `ready` or `serving` counts as true, an unset `terminating` as false, as the API
/// says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
    /// The node's InternalIP: where its agent's SaP listens.
    pub address: Option<IpAddr>,
}

/// A document the model understood.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(String, Labels),
    Pod(Box<Pod>),
    Node(Node),
    NetworkPolicy(Box<NetworkPolicy>),
    OverlayNetwork(OverlayNetwork),
    DirectPath(DirectPath),
    External(ExternalEntity),
    ClusterConfig(String, ClusterConfigSpec),
    OverlayAttachment(OverlayAttachmentSpec),
    /// A block of an overlay network and the node that holds it, by object name.
    OverlayBlock(String, OverlayBlockSpec),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
}

/// The kinds of API object the model holds. A Pod stands for its attachment too (the serving
/// agent's `keyway.io/overlay` annotation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    NetworkPolicy,
    OverlayNetwork,
    DirectPath,
    ExternalEntity,
    ClusterConfig,
    OverlayBlock,
    Service,
    EndpointSlice,
}

/// Everything the agent knows about the cluster. Cluster-scoped objects are keyed by name,
/// namespaced ones by [`ObjectKey`].
#[derive(Debug, Clone, Default)]
pub struct Model {
    /// Namespaces and their labels, with the name label the API server always sets.
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: BTreeMap<ObjectKey, Pod>,
    pub nodes: BTreeMap<String, Node>,
    pub policies: BTreeMap<ObjectKey, NetworkPolicy>,
    pub networks: BTreeMap<String, OverlayNetwork>,
    pub direct_paths: BTreeMap<ObjectKey, DirectPath>,
    pub externals: BTreeMap<ObjectKey, ExternalEntity>,
    /// ClusterConfig objects by name; [`Model::config`] is the one in force.
    pub configs: BTreeMap<String, ClusterConfigSpec>,
    /// Overlay attachments published by agents, by pod.
    pub attachments: BTreeMap<ObjectKey, OverlayAttachmentSpec>,
    /// Overlay blocks and their holders, by object name (`<network>-<index>`).
    pub blocks: BTreeMap<String, OverlayBlockSpec>,
    pub services: BTreeMap<ObjectKey, Service>,
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
}

impl Model {
    /// Builds a model from understood objects (a later object of the same name wins).
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Model {
        let mut m = Model::default();
        for o in objects {
            m.insert(o);
        }
        m
    }

    /// Adds or replaces one object.
    pub fn insert(&mut self, o: Object) {
        match o {
            Object::Namespace(name, labels) => {
                self.namespaces.insert(name, labels);
            }
            Object::Pod(p) => {
                self.pods.insert(p.key.clone(), *p);
            }
            Object::Node(n) => {
                self.nodes.insert(n.name.clone(), n);
            }
            Object::NetworkPolicy(p) => {
                let key = ObjectKey::new(
                    p.metadata.namespace.clone().unwrap_or_default(),
                    p.metadata.name.clone().unwrap_or_default(),
                );
                self.policies.insert(key, *p);
            }
            Object::OverlayNetwork(n) => {
                self.networks.insert(n.name.clone(), n);
            }
            Object::DirectPath(d) => {
                self.direct_paths
                    .insert(ObjectKey::new(&d.namespace, &d.name), d);
            }
            Object::External(e) => {
                self.externals
                    .insert(ObjectKey::new(&e.namespace, &e.name), e);
            }
            Object::ClusterConfig(name, c) => {
                self.configs.insert(name, c);
            }
            Object::Service(svc) => {
                self.services.insert(svc.key.clone(), *svc);
            }
            Object::EndpointSlice(slice) => {
                self.endpoint_slices.insert(slice.key.clone(), *slice);
            }
            Object::OverlayAttachment(a) => {
                self.attachments
                    .insert(ObjectKey::new(&a.namespace, &a.pod), a);
            }
            Object::OverlayBlock(name, b) => {
                self.blocks.insert(name, b);
            }
        }
    }

    /// Removes what the API object of `kind` at `key` put in the model (cluster-scoped objects
    /// have an empty namespace).
    pub fn remove(&mut self, kind: Kind, key: &ObjectKey) {
        match kind {
            Kind::Namespace => drop(self.namespaces.remove(&key.name)),
            Kind::Node => drop(self.nodes.remove(&key.name)),
            Kind::Pod => {
                self.pods.remove(key);
                self.attachments.remove(key);
            }
            Kind::NetworkPolicy => drop(self.policies.remove(key)),
            Kind::OverlayNetwork => drop(self.networks.remove(&key.name)),
            Kind::DirectPath => drop(self.direct_paths.remove(key)),
            Kind::ExternalEntity => drop(self.externals.remove(key)),
            Kind::ClusterConfig => drop(self.configs.remove(&key.name)),
            Kind::OverlayBlock => drop(self.blocks.remove(&key.name)),
            Kind::Service => drop(self.services.remove(key)),
            Kind::EndpointSlice => drop(self.endpoint_slices.remove(key)),
        }
    }

    /// The keys of every object of `kind` (cluster-scoped ones with an empty namespace).
    pub fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
        fn named<V>(m: &BTreeMap<String, V>) -> Vec<ObjectKey> {
            m.keys().map(|n| ObjectKey::new("", n)).collect()
        }
        fn keyed<V>(m: &BTreeMap<ObjectKey, V>) -> Vec<ObjectKey> {
            m.keys().cloned().collect()
        }
        match kind {
            Kind::Namespace => named(&self.namespaces),
            Kind::Node => named(&self.nodes),
            Kind::Pod => {
                let mut k = keyed(&self.pods);
                k.extend(keyed(&self.attachments));
                k.sort();
                k.dedup();
                k
            }
            Kind::NetworkPolicy => keyed(&self.policies),
            Kind::OverlayNetwork => named(&self.networks),
            Kind::DirectPath => keyed(&self.direct_paths),
            Kind::ExternalEntity => keyed(&self.externals),
            Kind::ClusterConfig => named(&self.configs),
            Kind::OverlayBlock => named(&self.blocks),
            Kind::Service => keyed(&self.services),
            Kind::EndpointSlice => keyed(&self.endpoint_slices),
        }
    }

    /// The overlay networks in force, by name: the cluster's, or the built-in default.
    pub fn overlay_networks(&self) -> Vec<OverlayNetwork> {
        if self.networks.is_empty() {
            vec![OverlayNetwork::default_network()]
        } else {
            self.networks.values().cloned().collect()
        }
    }

    /// The cluster-wide settings: the first ClusterConfig by name (there should be one), or the
    /// defaults.
    pub fn config(&self) -> ClusterConfigSpec {
        self.configs.values().next().cloned().unwrap_or_default()
    }

    /// The labels of a namespace, with the name label the API server always sets (also for a
    /// namespace the model has not seen: the API server would not hold a pod in a namespace that
    /// does not exist).
    pub fn namespace_labels(&self, ns: &str) -> Labels {
        let mut l = self.namespaces.get(ns).cloned().unwrap_or_default();
        l.entry(NAMESPACE_NAME_LABEL.to_string())
            .or_insert_with(|| ns.to_string());
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str) -> Object {
        Object::Pod(Box::new(Pod {
            key: ObjectKey::new(ns, name),
            uid: String::new(),
            labels: Labels::new(),
            node: None,
            infra_ips: vec![],
            ports: vec![],
            ready: None,
        }))
    }

    #[test]
    fn the_default_network_applies_when_none_is_defined() {
        let m = Model::default();
        assert_eq!(
            m.overlay_networks()[0].spec.cidr.to_string(),
            "100.64.0.0/10"
        );
        assert_eq!(m.namespace_labels("z")[NAMESPACE_NAME_LABEL], "z");
        assert_eq!(m.config().policy_mode, PolicyMode::Kubernetes);
    }

    #[test]
    fn one_objects_change_touches_only_what_it_put_there() {
        let mut m = Model::from_objects([pod("x", "a"), pod("x", "b")]);
        m.insert(Object::OverlayAttachment(OverlayAttachmentSpec {
            namespace: "x".into(),
            pod: "a".into(),
            node: "n".into(),
            infra_ip: "10.0.0.1".parse().unwrap(),
            overlay_ips: vec![],
            proof: None,
        }));
        m.remove(Kind::Pod, &ObjectKey::new("x", "a"));
        assert_eq!(
            m.pods.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
            ["x/b"]
        );
        assert!(
            m.attachments.is_empty(),
            "a pod takes its attachment with it"
        );
        m.insert(pod("x", "b"));
        assert_eq!(m.pods.len(), 1, "the same name replaces");
    }
}
