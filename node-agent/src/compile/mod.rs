//! The policy compiler: the cluster model and this node's attachments in; the data plane's tables
//! (FIB, ACL, SaPs), every pod's keys, and each local pod's off-overlay egress rules out. A pure
//! function of its inputs, in named stages:
//!
//! 1. [`entities`]: every entity on the overlay (this node's pods, the pods other agents
//!    published, external entities) with its addresses, keys and SaP;
//! 2. and 3. [`identities`]: the ipBlocks policies name, then one identity per set of
//!    policy-relevant facts;
//! 4. [`rules`]: NetworkPolicies, strict mode and DirectPaths into allow sets per identity pair;
//! 5. [`assemble`]: the FIB, the ACL, the SaPs, and each local pod's keys and egress rules;
//! 6. [`services`]: the Service ports this node's pods translate to protected pods;
//! 7. [`mesh`]: for this node's pods in Istio's ambient mesh, the ports policy allows where
//!    ztunnel hands a meshed client's connection to the application.
//!
//! Kubernetes NetworkPolicy semantics, per direction:
//! - a policy selects pods of its namespace by `podSelector`; `policyTypes` (or their default)
//!   say which directions it isolates them in; a pod no policy selects is not isolated (unless the
//!   cluster is in strict mode, where every pod is ingress-isolated);
//! - allow rules are additive; a rule without peers allows every peer, without ports every port;
//! - a peer is pods by `podSelector` (in the policy's namespace), by `namespaceSelector`, or both
//!   ANDed; or an `ipBlock` with `except`, which holds an entity when it holds its overlay
//!   address or its pod IP (the primary CNI's address, which Kubernetes reports);
//! - ports are numbers (with `endPort`) or names, resolved against the *destination's* container
//!   ports with the same protocol; TCP is the default protocol.

mod entities;

pub use entities::Refusal;
mod identities;
mod mesh;
mod rules;
mod services;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnetwork::IpNetwork;
use keyway_core::acl::FastSet;
use keyway_core::engine::{PacketAuth, Tables};
use keyway_core::fib::{Fib, Route};
use keyway_core::key::{ClusterSecret, Epoch, KeyRing, Rotation};
use keyway_protocol::firewall::{Egress, MeshIngress, ServiceNat};

use crate::model::{Model, ObjectKey, OverlayNetwork, PacketAuthentication};
use crate::policy;

/// An attachment this node serves, as the compiler needs it.
#[derive(Debug, Clone)]
pub struct LocalPod {
    pub entity: Arc<str>,
    pub pod: Option<ObjectKey>,
    pub overlay_ips: Vec<IpAddr>,
    pub infra_ip: IpAddr,
}

/// The entity name a pod's keys are derived from.
pub fn pod_entity(key: &ObjectKey) -> Arc<str> {
    format!("{}/{}", key.namespace, key.name).into()
}

/// The entity name an external entity's key is derived from.
pub fn external_entity(namespace: &str, name: &str) -> Arc<str> {
    format!("external/{namespace}/{name}").into()
}

/// Derives keys, remembering them: a compile re-derives only when an epoch turns. It holds the
/// current epoch's rings only: with keys rotating every few seconds and pods coming and going,
/// anything more would grow for as long as the agent runs.
#[derive(Debug)]
pub struct KeyCache {
    secret: ClusterSecret,
    cache: HashMap<(Arc<str>, Epoch), KeyRing>,
    /// The epoch the cache holds.
    epoch: Option<Epoch>,
    /// Attachments without an attestation count too (`--accept-unattested-attachments`).
    accept_unattested: bool,
}

impl KeyCache {
    pub fn new(secret: ClusterSecret) -> Self {
        KeyCache {
            secret,
            cache: HashMap::new(),
            epoch: None,
            accept_unattested: false,
        }
    }

    /// Counts attachments without an attestation too (a forged one is still refused): for a
    /// rolling upgrade from agents that did not attest.
    pub fn accepting_unattested(mut self, accept: bool) -> Self {
        self.accept_unattested = accept;
        self
    }

    pub fn ring(&mut self, entity: &Arc<str>, rotation: Rotation, now_ms: u64) -> KeyRing {
        let epoch = rotation.epoch_at(now_ms);
        // A new epoch (or a new rotation period, which numbers epochs afresh): the rings of
        // every other epoch, and of entities gone since, are never asked for again.
        if self.epoch != Some(epoch) {
            self.cache.retain(|(_, e), _| *e == epoch);
            self.epoch = Some(epoch);
        }
        *self
            .cache
            .entry((entity.clone(), epoch))
            .or_insert_with(|| KeyRing::derive(&self.secret, entity, rotation, now_ms))
    }

    /// Rings held (for tests of the cache's bound).
    #[cfg(test)]
    pub fn rings_held(&self) -> usize {
        self.cache.len()
    }

    /// Whether an agent attested `a` (see [`crate::model::OverlayAttachmentSpec::attest`]).
    pub fn attests(&self, a: &crate::model::OverlayAttachmentSpec) -> bool {
        (self.accept_unattested && a.proof.is_none()) || a.attested_by(&self.secret)
    }

    /// The key of an entity outside the cluster: provisioned once in its configuration, so it
    /// does not rotate (epoch 0).
    pub fn static_ring(&self, entity: &str) -> KeyRing {
        KeyRing::Static(self.secret.derive(entity, Epoch(0)))
    }
}

/// Where this node is and how the cluster's keys turn.
#[derive(Debug, Clone)]
pub struct NodeContext {
    pub node_name: String,
    pub local_sap: Option<SocketAddr>,
    pub gue_port: u16,
    pub rotation: Rotation,
}

/// The output of a compile.
#[derive(Debug, Default)]
pub struct Compiled {
    pub tables: Tables,
    /// Off-overlay egress of each local attachment, by entity.
    pub egress: HashMap<Arc<str>, Egress>,
    /// Each local attachment's own keys.
    pub local_keys: HashMap<Arc<str>, KeyRing>,
    /// Every protected pod's pod IP: what local pods steer into their overlay device.
    pub pod_ips: Vec<IpAddr>,
    /// The Service ports local pods translate (those with protected endpoints).
    pub services: Vec<ServiceNat>,
    /// What ztunnel may hand to each local pod in the mesh, by entity.
    pub mesh: HashMap<Arc<str>, MeshIngress>,
    pub identities: usize,
    pub entities: usize,
    /// Published attachments that did not count, and why.
    pub refused: Vec<(ObjectKey, Refusal)>,
}

/// Compiles the model and this node's attachments into the data plane's tables.
pub fn compile(
    model: &Model,
    locals: &[LocalPod],
    node: &NodeContext,
    keys: &mut KeyCache,
    now_ms: u64,
    generation: u64,
) -> Compiled {
    let mut refused = Vec::new();
    let entities = entities::collect(model, locals, node, keys, now_ms, &mut refused);
    let blocks = identities::referenced_blocks(model);
    let ids = identities::assign(model, &entities, blocks);
    let policy = rules::apply(model, &entities, &ids);
    let mut out = assemble(model, node, &entities, &ids, policy, generation);
    let protected = out.pod_ips.iter().copied().collect();
    out.services = services::translations(model, &node.node_name, &protected);
    out.mesh = mesh::ingress(&entities, &ids.of_entity, &out.tables.acl);
    out.refused = refused;
    out
}

/// Stage 5: the FIB (one route per overlay address), the ACL, the SaPs, and each local pod's keys
/// and off-overlay egress.
fn assemble(
    model: &Model,
    node: &NodeContext,
    entities: &[entities::Entity],
    ids: &identities::Identities,
    policy: rules::Policy,
    generation: u64,
) -> Compiled {
    let mut fib = Fib::builder();
    let mut out = Compiled {
        identities: ids.len(),
        entities: entities.len(),
        ..Default::default()
    };
    for (e, of_ip) in entities.iter().zip(&ids.of_entity) {
        if !e.outside {
            out.pod_ips.extend(e.pod_ip);
        }
        for (ip, id) in e.addresses().zip(of_ip) {
            let route = Route {
                entity: e.name.clone(),
                identity: *id,
                keys: e.keys,
                infra: e.infra,
                sap: e.sap,
                outside: e.outside,
            };
            if let Err(err) = fib.insert(IpNetwork::from(ip), route) {
                tracing::warn!(error = %err, entity = %e.name, "duplicate overlay address");
            }
        }
        if e.local {
            out.local_keys.insert(e.name.clone(), e.keys);
            let egress = match of_ip.first() {
                Some(id) if policy.isolation[id.0 as usize].egress => {
                    Egress::Allow(policy.egress_allows[id.0 as usize].clone())
                }
                _ => Egress::Open,
            };
            out.egress.insert(e.name.clone(), egress);
        }
    }
    insert_regions(&mut fib, node, ids);
    out.pod_ips.sort();
    out.pod_ips.dedup();
    let mut saps = FastSet::default();
    saps.extend(node.local_sap.map(|s| s.ip()));
    saps.extend(model.nodes.values().filter_map(|n| n.address));
    out.tables = Tables {
        fib: fib.build(),
        acl: policy.acl.build(),
        saps,
        generation,
        packet_auth: match model.config().packet_authentication {
            PacketAuthentication::Disabled => PacketAuth::Disabled,
            PacketAuthentication::Permissive => PacketAuth::Permissive,
            PacketAuthentication::Strict => PacketAuth::Strict,
        },
    };
    out
}

/// The address space off the overlay: what enters through this node's gateway comes from there,
/// with the identity of its region. A region that is exactly an entity's address is the entity's.
fn insert_regions(
    fib: &mut keyway_core::fib::FibBuilder,
    node: &NodeContext,
    ids: &identities::Identities,
) {
    let gateway = node
        .local_sap
        .unwrap_or_else(|| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), node.gue_port));
    for (prefix, id) in &ids.regions {
        let name: Arc<str> = format!("outside/{prefix}").into();
        let route = Route {
            keys: KeyRing::Static(keyway_core::key::Key::default()),
            entity: name,
            identity: *id,
            infra: gateway,
            sap: None,
            outside: true,
        };
        if fib.insert(*prefix, route).is_err() {
            tracing::debug!(%prefix, "an ipBlock prefix that is an entity's own address");
        }
    }
}

/// Which overlay networks a pod joins, by the networks' selectors.
/// Whether the pod opted out of keyway by [`ENABLED_LABEL`](crate::model::ENABLED_LABEL), its
/// own or else its namespace's.
pub fn opted_out(model: &Model, pod: &ObjectKey) -> bool {
    use crate::model::ENABLED_LABEL;
    let own = model
        .pods
        .get(pod)
        .and_then(|p| p.labels.get(ENABLED_LABEL).cloned());
    let value = own.or_else(|| {
        model
            .namespace_labels(&pod.namespace)
            .get(ENABLED_LABEL)
            .cloned()
    });
    value.as_deref() == Some("false")
}

pub fn networks_for(model: &Model, pod: Option<&ObjectKey>) -> Vec<OverlayNetwork> {
    let labels = pod
        .and_then(|k| model.pods.get(k))
        .map(|p| p.labels.clone())
        .unwrap_or_default();
    let ns_labels = pod
        .map(|k| model.namespace_labels(&k.namespace))
        .unwrap_or_default();
    model
        .overlay_networks()
        .into_iter()
        .filter(|n| {
            let pods = n.spec.pod_selector.as_ref();
            let namespaces = n.spec.namespace_selector.as_ref();
            pods.is_none_or(|s| policy::matches(s, &labels))
                && namespaces.is_none_or(|s| policy::matches(s, &ns_labels))
        })
        .collect()
}

#[cfg(test)]
mod tests;
