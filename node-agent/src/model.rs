//! The one in-memory cluster model, fed by either state source (the `file` directory or the
//! Kubernetes API) and compiled into the data plane's tables. Kubernetes objects are read with
//! k8s-openapi's own types, so a document that would not pass the API server does not pass here.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{
    Namespace as K8sNamespace, Node as K8sNode, Pod as K8sPod, Service as K8sService,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// keyway's API group and version.
pub const KEYWAY_API_VERSION: &str = "keyway.io/v1alpha1";
/// The label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodKey {
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
    pub key: PodKey,
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

/// The Service annotation that asks keyway to publish a Service's endpoints on the overlay: an
/// equality selector (`app=web,tier=front`) over the pods of the Service's namespace.
pub const SERVICE_SELECTOR_ANNOTATION: &str = "keyway.io/selector";

/// A port of a covered Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    /// IP protocol number.
    pub protocol: u8,
    /// The Service's port (what DNS SRV records name).
    pub port: u16,
    /// Where the pods listen: a number, or a container port's name.
    pub target: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// A Service keyway covers: headless, selector-less for Kubernetes, with the pods it stands for
/// chosen by [`SERVICE_SELECTOR_ANNOTATION`]. keyway publishes its EndpointSlices with the pods'
/// overlay addresses (see `docs/services.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CoveredService {
    pub key: PodKey,
    pub uid: String,
    pub selector: Labels,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
    /// The node's InternalIP: where its agent's SaP listens.
    pub address: Option<IpAddr>,
}

/// `keyway.io/v1alpha1` OverlayNetwork: an overlay address range that pods join.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, CustomResource, JsonSchema)]
#[kube(
    group = "keyway.io",
    version = "v1alpha1",
    kind = "OverlayNetwork",
    root = "OverlayNetworkResource",
    shortname = "kwnet",
    printcolumn = r#"{"name":"CIDR","type":"string","jsonPath":".spec.cidr"}"#,
    printcolumn = r#"{"name":"Block","type":"integer","jsonPath":".spec.blockPrefix"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct OverlayNetworkSpec {
    /// The overlay's address range, e.g. 100.64.0.0/10 or fd00:6b77::/48.
    #[schemars(with = "String")]
    pub cidr: IpNetwork,
    /// Prefix length of the blocks each node claims (default: /24 for IPv4, /112 for IPv6).
    #[serde(default)]
    pub block_prefix: Option<u8>,
    /// The device name in pods (default `kw0` for the first network, `kw1`…).
    #[serde(default)]
    pub device: Option<String>,
    /// Which pods join it (default: every pod).
    #[serde(default)]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default)]
    pub namespace_selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverlayNetwork {
    pub name: String,
    pub spec: OverlayNetworkSpec,
}

impl OverlayNetwork {
    /// What a cluster without OverlayNetwork resources gets: one IPv4 overlay for every pod.
    pub fn default_network() -> OverlayNetwork {
        OverlayNetwork {
            name: "default".into(),
            spec: OverlayNetworkSpec {
                cidr: "100.64.0.0/10".parse().expect("valid"),
                block_prefix: Some(24),
                device: Some("kw0".into()),
                pod_selector: None,
                namespace_selector: None,
            },
        }
    }
}

/// A peer of a keyway resource: pods by selectors, or external entities by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    #[serde(default)]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default)]
    pub namespace_selector: Option<LabelSelector>,
    /// An ExternalEntity, as `namespace/name`.
    #[serde(default)]
    pub external: Option<String>,
}

/// `keyway.io/v1alpha1` DirectPath: pairs that bypass SaPs (the paper's S1↔S2), relying on keys
/// alone. Namespaced: selectors without a namespaceSelector mean the resource's namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, CustomResource, JsonSchema)]
#[kube(
    group = "keyway.io",
    version = "v1alpha1",
    kind = "DirectPath",
    root = "DirectPathResource",
    namespaced,
    shortname = "kwdirect"
)]
#[serde(rename_all = "camelCase")]
pub struct DirectPathSpec {
    pub a: Peer,
    pub b: Peer,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DirectPath {
    pub namespace: String,
    pub name: String,
    pub spec: DirectPathSpec,
}

/// `keyway.io/v1alpha1` ExternalEntity: an endpoint outside the cluster (an end-user device, a VM)
/// running `keyway-sap`, reached through a gateway SaP. Policies select it like a pod, by labels
/// and namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, CustomResource, JsonSchema)]
#[kube(
    group = "keyway.io",
    version = "v1alpha1",
    kind = "ExternalEntity",
    root = "ExternalEntityResource",
    namespaced,
    shortname = "kwext",
    printcolumn = r#"{"name":"Gateway","type":"string","jsonPath":".spec.gateway"}"#,
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.address"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ExternalEntitySpec {
    /// Its addresses on the overlays.
    pub overlay_ips: Vec<IpAddr>,
    /// Its GUE socket on the underlay.
    pub address: SocketAddr,
    /// The node whose SaP is its gateway.
    pub gateway: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExternalEntity {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub spec: ExternalEntitySpec,
}

/// How pods that no policy selects are treated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PolicyMode {
    /// Kubernetes semantics: a pod no policy selects is not isolated.
    #[default]
    Kubernetes,
    /// The paper's default deny: every pod is ingress-isolated until a policy allows.
    Strict,
}

/// `keyway.io/v1alpha1` ClusterConfig (a singleton, any name): cluster-wide settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, CustomResource, JsonSchema)]
#[kube(
    group = "keyway.io",
    version = "v1alpha1",
    kind = "ClusterConfig",
    root = "ClusterConfigResource",
    shortname = "kwconfig",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.policyMode"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterConfigSpec {
    /// `Kubernetes` (a pod no policy selects is not isolated) or `Strict` (default deny).
    #[serde(default)]
    pub policy_mode: PolicyMode,
    /// How often keys rotate (default: the agent's --key-rotation-seconds).
    #[serde(default)]
    pub key_rotation_seconds: Option<u64>,
    /// How long a key stays accepted around its epoch (default: --key-grace-seconds).
    #[serde(default)]
    pub key_grace_seconds: Option<u64>,
}

/// `keyway.io/v1alpha1` OverlayBlock: one block of an overlay network claimed by one node. The
/// API server's create-if-absent on the block's name (`<network>-<index>`) is the lock: two agents
/// racing for a block cannot both create it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, CustomResource, JsonSchema)]
#[kube(
    group = "keyway.io",
    version = "v1alpha1",
    kind = "OverlayBlock",
    root = "OverlayBlockResource",
    shortname = "kwblock",
    printcolumn = r#"{"name":"Network","type":"string","jsonPath":".spec.network"}"#,
    printcolumn = r#"{"name":"Index","type":"integer","jsonPath":".spec.index"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct OverlayBlockSpec {
    /// The OverlayNetwork the block belongs to.
    pub network: String,
    /// Which block of the network, counting from its first address.
    pub index: u64,
    /// The node that holds it.
    pub node: String,
}

/// `keyway.io/v1alpha1` OverlayAttachment: a pod's place on the overlay, published by the agent
/// that serves it so every other agent can route to it. (With the Kubernetes source the same facts
/// travel in the pod's `keyway.io/overlay` annotation.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OverlayAttachmentSpec {
    pub namespace: String,
    pub pod: String,
    pub node: String,
    pub infra_ip: IpAddr,
    pub overlay_ips: Vec<IpAddr>,
}

/// Everything the agent knows about the cluster, replaced whole by each source update.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: BTreeMap<PodKey, Pod>,
    pub nodes: BTreeMap<String, Node>,
    pub policies: Vec<NetworkPolicy>,
    pub networks: Vec<OverlayNetwork>,
    pub direct_paths: Vec<DirectPath>,
    pub externals: Vec<ExternalEntity>,
    pub config: ClusterConfigSpec,
    /// Overlay attachments published by agents, by pod.
    pub attachments: BTreeMap<PodKey, OverlayAttachmentSpec>,
    /// Services whose endpoints keyway publishes, by namespace/name.
    pub services: BTreeMap<PodKey, CoveredService>,
}

impl Model {
    /// The overlay networks in force: the cluster's, or the built-in default.
    pub fn overlay_networks(&self) -> Vec<OverlayNetwork> {
        if self.networks.is_empty() {
            vec![OverlayNetwork::default_network()]
        } else {
            let mut n = self.networks.clone();
            n.sort_by(|a, b| a.name.cmp(&b.name));
            n
        }
    }

    /// The labels of a namespace, with the name label the API server always sets.
    pub fn namespace_labels(&self, ns: &str) -> Labels {
        let mut l = self.namespaces.get(ns).cloned().unwrap_or_default();
        l.entry(NAMESPACE_NAME_LABEL.to_string())
            .or_insert_with(|| ns.to_string());
        l
    }
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
    ClusterConfig(ClusterConfigSpec),
    OverlayAttachment(OverlayAttachmentSpec),
    Service(Box<CoveredService>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    #[error("document has no apiVersion/kind")]
    NoKind,
    #[error("{kind} {name}: {reason}")]
    Invalid {
        kind: String,
        name: String,
        reason: String,
    },
}

/// The IP protocol number of a protocol as Kubernetes spells it (absent means TCP).
pub fn protocol_of(p: Option<&str>) -> Result<u8, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(keyway_sap::packet::PROTO_TCP),
        "UDP" => Ok(keyway_sap::packet::PROTO_UDP),
        "SCTP" => Ok(keyway_sap::packet::PROTO_SCTP),
        other => Err(format!("protocol {other:?} is not TCP, UDP or SCTP")),
    }
}

/// The inverse of [`protocol_of`], for the protocols it accepts.
pub fn protocol_name(p: u8) -> &'static str {
    match p {
        keyway_sap::packet::PROTO_UDP => "UDP",
        keyway_sap::packet::PROTO_SCTP => "SCTP",
        _ => "TCP",
    }
}

fn meta_name(v: &Value) -> String {
    v.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_string()
}

fn meta_ns(v: &Value) -> String {
    v.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string()
}

fn labels_of(v: &Value) -> Labels {
    v.pointer("/metadata/labels")
        .and_then(|l| serde_json::from_value(l.clone()).ok())
        .unwrap_or_default()
}

/// An equality-based label selector as the annotation spells it: `k=v` pairs joined by commas
/// (`==` is accepted for `=`). Empty selects nothing, so it is refused.
pub fn parse_selector(text: &str) -> Result<Labels, String> {
    let mut out = Labels::new();
    for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (k, v) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .ok_or_else(|| {
                format!("{SERVICE_SELECTOR_ANNOTATION} term {term:?} is not key=value")
            })?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || k.contains('!') || v.contains('=') {
            return Err(format!(
                "{SERVICE_SELECTOR_ANNOTATION} term {term:?}: only key=value terms are supported"
            ));
        }
        out.insert(k.to_string(), v.to_string());
    }
    if out.is_empty() {
        return Err(format!(
            "{SERVICE_SELECTOR_ANNOTATION} is empty: it would select no pods"
        ));
    }
    Ok(out)
}

/// Understands one document; `Ok(None)` for kinds keyway does not use.
pub fn parse_object(doc: Value) -> Result<Option<Object>, ObjectError> {
    let api = doc
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or(ObjectError::NoKind)?
        .to_string();
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .ok_or(ObjectError::NoKind)?
        .to_string();
    let name = meta_name(&doc);
    let invalid = |reason: String| ObjectError::Invalid {
        kind: kind.clone(),
        name: name.clone(),
        reason,
    };
    // A namespaced object's namespace (as the API server defaults it) and name.
    let key_of = |m: &ObjectMeta| -> Result<PodKey, ObjectError> {
        Ok(PodKey {
            namespace: m.namespace.clone().unwrap_or_else(|| "default".into()),
            name: m
                .name
                .clone()
                .ok_or_else(|| invalid("no metadata.name".into()))?,
        })
    };
    let obj = match (api.as_str(), kind.as_str()) {
        ("v1", "Namespace") => {
            let ns: K8sNamespace =
                serde_json::from_value(doc).map_err(|e| invalid(e.to_string()))?;
            let name = ns
                .metadata
                .name
                .clone()
                .ok_or_else(|| invalid("no metadata.name".into()))?;
            let mut labels: Labels = ns.metadata.labels.unwrap_or_default();
            labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
            Object::Namespace(name, labels)
        }
        ("v1", "Pod") => {
            let p: K8sPod = serde_json::from_value(doc).map_err(|e| invalid(e.to_string()))?;
            let mut ports = Vec::new();
            let spec = p.spec.unwrap_or_default();
            for c in &spec.containers {
                for cp in c.ports.iter().flatten() {
                    let protocol = protocol_of(cp.protocol.as_deref()).map_err(&invalid)?;
                    let port = u16::try_from(cp.container_port).map_err(|_| {
                        invalid(format!("containerPort {} out of range", cp.container_port))
                    })?;
                    if let Some(n) = &cp.name {
                        ports.push(NamedPort {
                            name: n.clone(),
                            port,
                            protocol,
                        });
                    }
                }
            }
            let status = p.status.unwrap_or_default();
            let ready = status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.status == "True");
            let infra_ips = status
                .pod_ips
                .iter()
                .flatten()
                .filter_map(|ip| ip.ip.parse().ok())
                .chain(status.pod_ip.as_deref().and_then(|ip| ip.parse().ok()))
                .fold(Vec::new(), |mut v, ip| {
                    if !v.contains(&ip) {
                        v.push(ip);
                    }
                    v
                });
            Object::Pod(Box::new(Pod {
                key: key_of(&p.metadata)?,
                uid: p.metadata.uid.unwrap_or_default(),
                labels: p.metadata.labels.unwrap_or_default(),
                node: spec.node_name,
                infra_ips,
                ports,
                ready,
            }))
        }
        ("v1", "Service") => {
            let svc: K8sService =
                serde_json::from_value(doc).map_err(|e| invalid(e.to_string()))?;
            let Some(selector) = svc
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SERVICE_SELECTOR_ANNOTATION))
            else {
                // Not asked to cover it: Kubernetes publishes its endpoints as usual.
                return Ok(None);
            };
            let selector = parse_selector(selector).map_err(&invalid)?;
            let spec = svc.spec.unwrap_or_default();
            if spec.selector.as_ref().is_some_and(|s| !s.is_empty()) {
                return Err(invalid(format!(
                    "has both spec.selector and {SERVICE_SELECTOR_ANNOTATION}: Kubernetes would also \
                     publish the pods' infrastructure addresses, which keyway's pods drop; move the \
                     selector into the annotation"
                )));
            }
            if spec.cluster_ip.as_deref() != Some("None") {
                return Err(invalid(
                    "is not headless (clusterIP: None): a ClusterIP is translated by kube-proxy \
                     outside the pod and cannot reach overlay addresses"
                        .into(),
                ));
            }
            let mut ports = Vec::new();
            for sp in spec.ports.iter().flatten() {
                let port = u16::try_from(sp.port)
                    .map_err(|_| invalid(format!("port {} out of range", sp.port)))?;
                let target = match &sp.target_port {
                    None => TargetPort::Number(port),
                    Some(IntOrString::Int(n)) => TargetPort::Number(
                        u16::try_from(*n)
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| invalid(format!("targetPort {n} out of range")))?,
                    ),
                    Some(IntOrString::String(n)) => TargetPort::Name(n.clone()),
                };
                ports.push(ServicePort {
                    name: sp.name.clone(),
                    protocol: protocol_of(sp.protocol.as_deref()).map_err(&invalid)?,
                    port,
                    target,
                });
            }
            Object::Service(Box::new(CoveredService {
                key: key_of(&svc.metadata)?,
                uid: svc.metadata.uid.unwrap_or_default(),
                selector,
                ports,
            }))
        }
        ("v1", "Node") => {
            let n: K8sNode = serde_json::from_value(doc).map_err(|e| invalid(e.to_string()))?;
            let address = n
                .status
                .and_then(|s| s.addresses)
                .unwrap_or_default()
                .into_iter()
                .find(|a| a.type_ == "InternalIP")
                .and_then(|a| a.address.parse().ok());
            Object::Node(Node {
                name: n
                    .metadata
                    .name
                    .ok_or_else(|| invalid("no metadata.name".into()))?,
                address,
            })
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            let mut np: NetworkPolicy =
                serde_json::from_value(doc).map_err(|e| invalid(e.to_string()))?;
            np.metadata
                .namespace
                .get_or_insert_with(|| "default".into());
            crate::policy::validate(&np).map_err(invalid)?;
            Object::NetworkPolicy(Box::new(np))
        }
        (KEYWAY_API_VERSION, "OverlayNetwork") => {
            let spec: OverlayNetworkSpec =
                serde_json::from_value(doc.get("spec").cloned().unwrap_or_default())
                    .map_err(|e| invalid(e.to_string()))?;
            if let Some(p) = spec.block_prefix {
                let max = if spec.cidr.is_ipv4() { 32 } else { 128 };
                if p < spec.cidr.prefix() || p > max {
                    return Err(invalid(format!(
                        "blockPrefix /{p} does not fit in {}",
                        spec.cidr
                    )));
                }
            }
            if let Some(d) = &spec.device
                && (d.is_empty() || d.len() > 15)
            {
                return Err(invalid(format!("device {d:?} must be 1 to 15 characters")));
            }
            Object::OverlayNetwork(OverlayNetwork { name, spec })
        }
        (KEYWAY_API_VERSION, "DirectPath") => {
            let spec: DirectPathSpec =
                serde_json::from_value(doc.get("spec").cloned().unwrap_or_default())
                    .map_err(|e| invalid(e.to_string()))?;
            Object::DirectPath(DirectPath {
                namespace: meta_ns(&doc),
                name,
                spec,
            })
        }
        (KEYWAY_API_VERSION, "ExternalEntity") => {
            let spec: ExternalEntitySpec =
                serde_json::from_value(doc.get("spec").cloned().unwrap_or_default())
                    .map_err(|e| invalid(e.to_string()))?;
            Object::External(ExternalEntity {
                namespace: meta_ns(&doc),
                name,
                labels: labels_of(&doc),
                spec,
            })
        }
        (KEYWAY_API_VERSION, "ClusterConfig") => {
            let spec: ClusterConfigSpec =
                serde_json::from_value(doc.get("spec").cloned().unwrap_or_default())
                    .map_err(|e| invalid(e.to_string()))?;
            Object::ClusterConfig(spec)
        }
        (KEYWAY_API_VERSION, "OverlayAttachment") => {
            let spec: OverlayAttachmentSpec =
                serde_json::from_value(doc.get("spec").cloned().unwrap_or_default())
                    .map_err(|e| invalid(e.to_string()))?;
            Object::OverlayAttachment(spec)
        }
        _ => return Ok(None),
    };
    Ok(Some(obj))
}

impl Model {
    /// Builds a model from understood objects (later objects of the same name win).
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Model {
        let mut m = Model::default();
        for o in objects {
            match o {
                Object::Namespace(name, labels) => {
                    m.namespaces.insert(name, labels);
                }
                Object::Pod(p) => {
                    m.pods.insert(p.key.clone(), *p);
                }
                Object::Node(n) => {
                    m.nodes.insert(n.name.clone(), n);
                }
                Object::NetworkPolicy(p) => {
                    let key = (p.metadata.namespace.clone(), p.metadata.name.clone());
                    m.policies
                        .retain(|q| (q.metadata.namespace.clone(), q.metadata.name.clone()) != key);
                    m.policies.push(*p);
                }
                Object::OverlayNetwork(n) => {
                    m.networks.retain(|x| x.name != n.name);
                    m.networks.push(n);
                }
                Object::DirectPath(d) => m.direct_paths.push(d),
                Object::External(e) => m.externals.push(e),
                Object::ClusterConfig(c) => m.config = c,
                Object::Service(svc) => {
                    m.services.insert(svc.key.clone(), *svc);
                }
                Object::OverlayAttachment(a) => {
                    m.attachments.insert(
                        PodKey {
                            namespace: a.namespace.clone(),
                            name: a.pod.clone(),
                        },
                        a,
                    );
                }
            }
        }
        // Namespaces referenced by pods exist, as the API server would insist.
        let referenced: Vec<String> = m.pods.keys().map(|k| k.namespace.clone()).collect();
        for ns in referenced {
            m.namespaces
                .entry(ns.clone())
                .or_insert_with(|| Labels::from([(NAMESPACE_NAME_LABEL.to_string(), ns)]));
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Value {
        serde_yaml_ng::from_str(s).unwrap()
    }

    #[test]
    fn pods_namespaces_and_nodes_parse() {
        let pod = parse_object(yaml(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec:
  nodeName: node-1
  containers:
    - name: c80
      image: agnhost
      ports: [{containerPort: 80, name: serve-80-tcp, protocol: TCP}, {containerPort: 81, name: serve-81-udp, protocol: UDP}]
status: {podIPs: [{ip: 10.244.1.5}]}
"#,
        ))
        .unwrap()
        .unwrap();
        let Object::Pod(p) = pod else { panic!() };
        assert_eq!(p.key.to_string(), "x/a");
        assert_eq!(p.node.as_deref(), Some("node-1"));
        assert_eq!(p.infra_ips, vec!["10.244.1.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            p.ports[1],
            NamedPort {
                name: "serve-81-udp".into(),
                port: 81,
                protocol: 17
            }
        );

        let Object::Namespace(n, l) = parse_object(yaml(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: y, labels: {ns: y}}",
        ))
        .unwrap()
        .unwrap() else {
            panic!()
        };
        assert_eq!(n, "y");
        assert_eq!(l[NAMESPACE_NAME_LABEL], "y");

        let Object::Node(node) = parse_object(yaml("apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\nstatus: {addresses: [{type: Hostname, address: n1}, {type: InternalIP, address: 192.168.77.11}]}")).unwrap().unwrap() else { panic!() };
        assert_eq!(node.address, Some("192.168.77.11".parse().unwrap()));
    }

    #[test]
    fn bad_documents_say_what_is_wrong() {
        let e = parse_object(yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPort: 80, protocol: ICMP}]}]}")).unwrap_err();
        assert!(
            e.to_string().contains("Pod p") && e.to_string().contains("ICMP"),
            "{e}"
        );
        let e = parse_object(yaml("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: 7}")).unwrap_err();
        assert!(e.to_string().contains("NetworkPolicy np"), "{e}");
        assert_eq!(
            parse_object(yaml("foo: bar")).unwrap_err(),
            ObjectError::NoKind
        );
        assert!(
            parse_object(yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}"))
                .unwrap()
                .is_none()
        );
        let e = parse_object(yaml("apiVersion: keyway.io/v1alpha1\nkind: OverlayNetwork\nmetadata: {name: n}\nspec: {cidr: 100.64.0.0/10, blockPrefix: 8}")).unwrap_err();
        assert!(e.to_string().contains("blockPrefix"), "{e}");
    }

    #[test]
    fn the_default_network_applies_when_none_is_defined() {
        let m = Model::default();
        assert_eq!(
            m.overlay_networks()[0].spec.cidr.to_string(),
            "100.64.0.0/10"
        );
        assert_eq!(m.namespace_labels("z")[NAMESPACE_NAME_LABEL], "z");
    }
}
