//! keyway's own resources (group `keyway.io`, version `v1alpha1`): what NetworkPolicy cannot say.
//! The same Rust types read the resources and generate the CRDs' schemas (`crds.rs`), so the
//! schema the API server enforces and the one the agent parses cannot drift apart.

use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use keyway_core::key::{Attestation, ClusterSecret};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::Labels;

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
    /// A network of every pod over `cidr`, cut into blocks of `/block_prefix`, its device named
    /// by the agent.
    pub fn new(name: &str, cidr: IpNetwork, block_prefix: u8) -> OverlayNetwork {
        OverlayNetwork {
            name: name.to_string(),
            spec: OverlayNetworkSpec {
                cidr,
                block_prefix: Some(block_prefix),
                device: None,
                pod_selector: None,
                namespace_selector: None,
            },
        }
    }

    /// What a cluster without OverlayNetwork resources gets: one IPv4 overlay for every pod.
    pub fn default_network() -> OverlayNetwork {
        let mut n = OverlayNetwork::new("default", "100.64.0.0/10".parse().expect("valid"), 24);
        n.spec.device = Some("kw0".into());
        n
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

/// Per-packet authentication (a MAC keyed per destination and epoch in every datagram), turned
/// on in two steps so that no node refuses what another still sends: every agent `Permissive`,
/// then every agent `Strict`. See docs/threat-model.md.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PacketAuthentication {
    /// No MAC is sent (one that arrives is still checked).
    #[default]
    Disabled,
    /// Every datagram is sealed with a MAC; datagrams without one are still accepted.
    Permissive,
    /// Every datagram is sealed, and datagrams without a MAC are dropped.
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
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.policyMode"}"#,
    printcolumn = r#"{"name":"PacketAuth","type":"string","jsonPath":".spec.packetAuthentication"}"#
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
    /// `Disabled`, `Permissive` (seal, accept unsealed: the step between) or `Strict` (seal,
    /// refuse unsealed): a MAC per datagram, so that a key seen on the wire lets no one send.
    #[serde(default)]
    pub packet_authentication: PacketAuthentication,
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
    /// The publishing agent's attestation of the facts above (see [`OverlayAttachmentSpec::attest`]):
    /// whoever can write a pod's annotations cannot make one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
}

/// The context attestations of attachments are made in.
const ATTACHMENT_CONTEXT: &str = "overlay-attachment";

impl OverlayAttachmentSpec {
    /// The attested facts, in one canonical form.
    fn facts(&self) -> Vec<u8> {
        let ips: Vec<String> = self.overlay_ips.iter().map(IpAddr::to_string).collect();
        format!(
            "{}/{}\0{}\0{}\0{}",
            self.namespace,
            self.pod,
            self.node,
            self.infra_ip,
            ips.join(",")
        )
        .into_bytes()
    }

    /// The same facts, attested by an agent (a holder of the cluster secret).
    pub fn attest(mut self, secret: &ClusterSecret) -> Self {
        self.proof = Some(secret.attest(ATTACHMENT_CONTEXT, &self.facts()).to_string());
        self
    }

    /// Whether an agent attested these facts.
    pub fn attested_by(&self, secret: &ClusterSecret) -> bool {
        self.proof
            .as_deref()
            .and_then(|p| p.parse::<Attestation>().ok())
            .is_some_and(|a| secret.attests(ATTACHMENT_CONTEXT, &self.facts(), &a))
    }
}
