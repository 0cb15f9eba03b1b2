//! Stage 1: every entity on the overlay, as the compiler needs it — this node's attachments first
//! (authoritative for this node), then the pods other agents published, then the external
//! entities; and the pods that are not on the overlay (started before keyway, or kept off it),
//! which reach protected pods through a gateway with their pod identity. An overlay address is
//! given to the first entity that claims it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use keyway_core::acl::{FastMap, FastSet};
use keyway_core::key::KeyRing;

use super::{KeyCache, LocalPod, NodeContext, external_entity, pod_entity};
use crate::ipam::Blocks;
use crate::model::{Model, NamedPort, ObjectKey, OverlayNetwork};
use crate::policy::Labels;

/// An entity anywhere in the cluster: a pod or an external entity.
#[derive(Debug, Clone)]
pub(super) struct Entity {
    pub name: Arc<str>,
    pub namespace: String,
    pub labels: Labels,
    pub ports: Vec<NamedPort>,
    pub overlay_ips: Vec<IpAddr>,
    /// A pod's pod IP (its infrastructure address): routed like its overlay addresses, so that
    /// traffic to it travels the overlay too. External entities have none.
    pub pod_ip: Option<IpAddr>,
    pub infra: SocketAddr,
    pub sap: Option<SocketAddr>,
    pub keys: KeyRing,
    /// Served by this node.
    pub local: bool,
    /// For an external entity: `namespace/name`, as DirectPath peers name it.
    pub external: Option<String>,
    /// A pod off the overlay: no endpoint, no key; its pod IP is an outside address with the
    /// pod's identity (see [`keyway_core::fib::Route::outside`]).
    pub outside: bool,
}

impl Entity {
    /// Every address the FIB routes to the entity: its overlay IPs, then its pod IP.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.overlay_ips.iter().copied().chain(self.pod_ip)
    }
}

/// Where the SaP of `node_name` listens.
fn sap_of(model: &Model, node: &NodeContext, node_name: &str) -> Option<SocketAddr> {
    if node_name == node.node_name {
        return node.local_sap;
    }
    model
        .nodes
        .get(node_name)
        .and_then(|n| n.address)
        .map(|a| SocketAddr::new(a, node.gue_port))
}

/// The entities, in a stable order: locals, then published pods, then external entities.
pub(super) fn collect(
    model: &Model,
    locals: &[LocalPod],
    node: &NodeContext,
    keys: &mut KeyCache,
    now_ms: u64,
    refused: &mut Vec<(ObjectKey, Refusal)>,
) -> Vec<Entity> {
    let mut out = Vec::new();
    let mut seen: FastSet<IpAddr> = FastSet::default();
    for l in locals {
        let pod = l.pod.as_ref().and_then(|k| model.pods.get(k));
        out.push(Entity {
            name: l.entity.clone(),
            namespace: l
                .pod
                .as_ref()
                .map(|k| k.namespace.clone())
                .unwrap_or_default(),
            labels: pod.map(|p| p.labels.clone()).unwrap_or_default(),
            ports: pod.map(|p| p.ports.clone()).unwrap_or_default(),
            overlay_ips: l.overlay_ips.clone(),
            pod_ip: Some(l.infra_ip),
            infra: SocketAddr::new(l.infra_ip, node.gue_port),
            sap: node.local_sap,
            keys: keys.ring(&l.entity, node.rotation, now_ms),
            local: true,
            external: None,
            outside: false,
        });
        seen.extend(l.overlay_ips.iter().copied());
        seen.insert(l.infra_ip);
    }
    published_pods(model, node, keys, now_ms, &mut seen, &mut out, refused);
    for e in model.externals.values() {
        if e.spec.overlay_ips.iter().any(|ip| seen.contains(ip)) {
            tracing::warn!(external = %format!("{}/{}", e.namespace, e.name), "overlay address already in use by another entity; ignoring");
            continue;
        }
        seen.extend(e.spec.overlay_ips.iter().copied());
        let name = external_entity(&e.namespace, &e.name);
        out.push(Entity {
            keys: keys.static_ring(&name),
            name,
            namespace: e.namespace.clone(),
            labels: e.labels.clone(),
            ports: Vec::new(),
            overlay_ips: e.spec.overlay_ips.clone(),
            pod_ip: None,
            infra: e.spec.address,
            sap: sap_of(model, node, &e.spec.gateway),
            local: false,
            external: Some(format!("{}/{}", e.namespace, e.name)),
            outside: false,
        });
    }
    unprotected_pods(model, node, keys, &mut seen, &mut out);
    out
}

/// The pods with a pod IP that no agent serves: outside entities with their pod identity, so
/// that NetworkPolicy's pod selectors keep selecting them when they reach protected pods (through
/// the gateway of the destination's node). A pod IP that is a node's address is a hostNetwork
/// pod's: the node's, not the pod's.
fn unprotected_pods(
    model: &Model,
    node: &NodeContext,
    keys: &mut KeyCache,
    seen: &mut FastSet<IpAddr>,
    out: &mut Vec<Entity>,
) {
    let nodes: FastSet<IpAddr> = model.nodes.values().filter_map(|n| n.address).collect();
    let gateway = node
        .local_sap
        .unwrap_or_else(|| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), node.gue_port));
    for (key, pod) in &model.pods {
        if model.attachments.contains_key(key) {
            continue;
        }
        for ip in &pod.infra_ips {
            if seen.contains(ip) || nodes.contains(ip) {
                continue;
            }
            seen.insert(*ip);
            let name: Arc<str> = format!("unprotected/{key}/{ip}").into();
            out.push(Entity {
                keys: keys.static_ring(&name),
                name,
                namespace: key.namespace.clone(),
                labels: pod.labels.clone(),
                ports: pod.ports.clone(),
                overlay_ips: Vec::new(),
                pod_ip: Some(*ip),
                infra: gateway,
                sap: None,
                local: false,
                external: None,
                outside: true,
            });
        }
    }
}

/// Why a published attachment does not count (each counted, by reason, in
/// `keyway_attachments_refused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    /// No agent attested it: whoever wrote it does not hold the cluster secret.
    Unattested,
    /// It names another node than the pod's `spec.nodeName`.
    WrongNode,
    /// Its infrastructure address is not among the pod's `status.podIPs` (yet).
    NotPodIp,
    /// Its infrastructure address is a node's (a SaP would send to itself).
    NodeAddress,
    /// An overlay address outside every overlay network.
    OutsideNetwork,
    /// An overlay address in a block its node does not hold: addresses belong to the node whose
    /// claim on the block the API server (or the shared directory) granted.
    WrongBlock,
    /// An address another entity holds or claims too: a local or external entity keeps it; two
    /// published claims both lose it.
    Conflict,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::Unattested,
        Refusal::WrongNode,
        Refusal::NotPodIp,
        Refusal::NodeAddress,
        Refusal::OutsideNetwork,
        Refusal::WrongBlock,
        Refusal::Conflict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unattested => "unattested",
            Refusal::WrongNode => "wrong_node",
            Refusal::NotPodIp => "not_pod_ip",
            Refusal::NodeAddress => "node_address",
            Refusal::OutsideNetwork => "outside_network",
            Refusal::WrongBlock => "wrong_block",
            Refusal::Conflict => "conflict",
        }
    }
}

/// Whether a published attachment is consistent with its pod and the cluster, and attested by
/// an agent: only then does it count.
fn check_published(
    networks: &[OverlayNetwork],
    blocks: &BlockHolders,
    node: &NodeContext,
    keys: &KeyCache,
    pod: &crate::model::Pod,
    a: &crate::model::OverlayAttachmentSpec,
    nodes: &FastSet<IpAddr>,
) -> Result<(), Refusal> {
    if !keys.attests(a) {
        return Err(Refusal::Unattested);
    }
    if pod.node.as_deref() != Some(a.node.as_str()) {
        return Err(Refusal::WrongNode);
    }
    if !pod.infra_ips.contains(&a.infra_ip) {
        return Err(Refusal::NotPodIp);
    }
    if nodes.contains(&a.infra_ip) || node.local_sap.map(|s| s.ip()) == Some(a.infra_ip) {
        return Err(Refusal::NodeAddress);
    }
    for ip in &a.overlay_ips {
        let Some(net) = networks.iter().find(|n| n.spec.cidr.contains(*ip)) else {
            return Err(Refusal::OutsideNetwork);
        };
        let index = Blocks::of(net).index_of(*ip);
        let holder = index.and_then(|i| blocks.get(&(net.name.as_str(), i)));
        if holder != Some(&a.node.as_str()) {
            return Err(Refusal::WrongBlock);
        }
    }
    Ok(())
}

/// Who holds each block: (network, index) → node.
type BlockHolders<'a> = FastMap<(&'a str, u128), &'a str>;

fn block_holders(model: &Model) -> BlockHolders<'_> {
    model
        .blocks
        .values()
        .map(|b| ((b.network.as_str(), u128::from(b.index)), b.node.as_str()))
        .collect()
}

/// The pods other agents published (their own pods are this node's locals), each only when
/// [`check_published`] holds and its addresses are free.
fn published_pods(
    model: &Model,
    node: &NodeContext,
    keys: &mut KeyCache,
    now_ms: u64,
    seen: &mut FastSet<IpAddr>,
    out: &mut Vec<Entity>,
    refused: &mut Vec<(ObjectKey, Refusal)>,
) {
    let nodes: FastSet<IpAddr> = model.nodes.values().filter_map(|n| n.address).collect();
    let networks = model.overlay_networks();
    let blocks = block_holders(model);
    let mut candidates = Vec::new();
    for (key, a) in &model.attachments {
        if a.node == node.node_name {
            continue;
        }
        // An attachment whose pod object is gone is stale: the pod was deleted.
        let Some(pod) = model.pods.get(key) else {
            continue;
        };
        match check_published(&networks, &blocks, node, keys, pod, a, &nodes) {
            Ok(()) => candidates.push((key, a, pod)),
            Err(why) => {
                tracing::debug!(pod = %key, reason = why.as_str(), "attachment refused");
                refused.push((key.clone(), why));
            }
        }
    }
    // An overlay address is its block holder's alone, so two claims on one come from the same
    // node (or on one pod IP): neither gets it, as which is true cannot be told here. An address
    // this node holds stays its own.
    let mut claims: FastMap<IpAddr, u32> = FastMap::default();
    for (_, a, _) in &candidates {
        for ip in a.overlay_ips.iter().chain([&a.infra_ip]) {
            *claims.entry(*ip).or_default() += 1;
        }
    }
    for (key, a, pod) in candidates {
        let mut addresses = a.overlay_ips.iter().chain([&a.infra_ip]);
        if addresses.any(|ip| seen.contains(ip) || claims[ip] > 1) {
            tracing::warn!(pod = %key, "overlay address or pod IP claimed by another entity too; ignoring");
            refused.push((key.clone(), Refusal::Conflict));
            continue;
        }
        seen.extend(a.overlay_ips.iter().copied());
        seen.insert(a.infra_ip);
        let name = pod_entity(key);
        out.push(Entity {
            keys: keys.ring(&name, node.rotation, now_ms),
            name,
            namespace: key.namespace.clone(),
            labels: pod.labels.clone(),
            ports: pod.ports.clone(),
            overlay_ips: a.overlay_ips.clone(),
            pod_ip: Some(a.infra_ip),
            infra: SocketAddr::new(a.infra_ip, node.gue_port),
            sap: sap_of(model, node, &a.node),
            local: false,
            external: None,
            outside: false,
        });
    }
}
