//! The policy compiler: the cluster model and this node's attachments in; the data plane's tables
//! (FIB, ACL, SaPs), every pod's keys, and each local pod's off-overlay egress rules out.
//!
//! Kubernetes NetworkPolicy semantics, per direction:
//! - a policy selects pods of its namespace by `podSelector`; `policyTypes` (or their default)
//!   say which directions it isolates them in; a pod no policy selects is not isolated (unless the
//!   cluster is in strict mode, where every pod is ingress-isolated);
//! - allow rules are additive; a rule without peers allows every peer, without ports every port;
//! - a peer is pods by `podSelector` (in the policy's namespace), by `namespaceSelector`, or both
//!   ANDed; or an `ipBlock` with `except`, which holds an endpoint when it holds its overlay
//!   address or its pod IP (the primary CNI's address, which Kubernetes reports);
//! - ports are numbers (with `endPort`) or names, resolved against the *destination's* container
//!   ports with the same protocol; TCP is the default protocol.
//!
//! Endpoints with the same policy-relevant facts (namespace, labels, named ports, which ipBlocks
//! hold their address) share an identity, and policy becomes allow sets per identity pair: the
//! per-packet check never looks at a rule.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keyway_cni::firewall::{Egress, EgressAllow, PortMatch};
use keyway_sap::acl::{Acl, AclBuilder, AllowSetBuilder, FastSet, Identity, Isolation, PortRange};
use keyway_sap::engine::Tables;
use keyway_sap::fib::{Fib, Route};
use keyway_sap::key::{ClusterSecret, Epoch, KeyRing, Rotation};

use crate::model::{Labels, Model, NamedPort, Peer, PodKey, PolicyMode, protocol_of};
use crate::policy;

/// An attachment this node serves, as the compiler needs it.
#[derive(Debug, Clone)]
pub struct LocalPod {
    pub entity: Arc<str>,
    pub pod: Option<PodKey>,
    pub overlay_ips: Vec<IpAddr>,
    pub infra_ip: IpAddr,
}

/// The entity name keys are derived from.
pub fn pod_entity(key: &PodKey) -> Arc<str> {
    format!("{}/{}", key.namespace, key.name).into()
}

pub fn external_entity(namespace: &str, name: &str) -> Arc<str> {
    format!("external/{namespace}/{name}").into()
}

/// Derives keys, remembering them: a compile re-derives only when an epoch turns.
#[derive(Debug)]
pub struct KeyCache {
    secret: ClusterSecret,
    cache: HashMap<(Arc<str>, Epoch), KeyRing>,
}

impl KeyCache {
    pub fn new(secret: ClusterSecret) -> Self {
        KeyCache {
            secret,
            cache: HashMap::new(),
        }
    }

    pub fn ring(&mut self, entity: &Arc<str>, rotation: Rotation, now_ms: u64) -> KeyRing {
        let epoch = rotation.epoch_at(now_ms);
        if self.cache.len() > 100_000 {
            self.cache.retain(|(_, e), _| *e >= epoch);
        }
        *self
            .cache
            .entry((entity.clone(), epoch))
            .or_insert_with(|| KeyRing::derive(&self.secret, entity, rotation, now_ms))
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

/// An overlay endpoint anywhere in the cluster.
#[derive(Debug, Clone)]
struct Endpoint {
    entity: Arc<str>,
    namespace: String,
    labels: Labels,
    ports: Vec<NamedPort>,
    overlay_ips: Vec<IpAddr>,
    infra: SocketAddr,
    sap: Option<SocketAddr>,
    keys: KeyRing,
    local: bool,
}

/// What the identity of an address is made of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Facts {
    namespace: String,
    labels: Labels,
    ports: Vec<NamedPort>,
    ip_blocks: Vec<u32>,
}

#[derive(Debug)]
struct IdentityInfo {
    facts: Facts,
    ns_labels: Labels,
}

/// The output of a compile.
#[derive(Debug, Default)]
pub struct Compiled {
    pub tables: Tables,
    /// Off-overlay egress of each local attachment, by entity.
    pub egress: HashMap<Arc<str>, Egress>,
    /// Each local attachment's own keys.
    pub local_keys: HashMap<Arc<str>, KeyRing>,
    pub identities: usize,
    pub endpoints: usize,
}

fn in_block(ip: IpAddr, b: &(IpNetwork, Vec<IpNetwork>)) -> bool {
    b.0.contains(ip) && !b.1.iter().any(|e| e.contains(ip))
}

fn parse_block(b: &IPBlock) -> Option<(IpNetwork, Vec<IpNetwork>)> {
    let cidr = b.cidr.parse().ok()?;
    let except = b
        .except
        .iter()
        .flatten()
        .filter_map(|e| e.parse().ok())
        .collect();
    Some((cidr, except))
}

/// Adds `ports` (resolved against the destination's named ports) to an allow set; an empty list
/// allows everything.
fn add_ports(
    b: &mut AllowSetBuilder,
    ports: Option<&Vec<NetworkPolicyPort>>,
    dst_ports: &[NamedPort],
) {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        b.allow_everything();
        return;
    };
    for p in ports {
        let Ok(proto) = protocol_of(p.protocol.as_deref()) else {
            continue;
        };
        match &p.port {
            None => {
                b.allow(proto, None);
            }
            Some(IntOrString::Int(n)) => {
                let start = *n as u16;
                let end = p.end_port.map_or(start, |e| e as u16);
                b.allow(proto, Some(PortRange::new(start, end)));
            }
            Some(IntOrString::String(name)) => {
                for np in dst_ports
                    .iter()
                    .filter(|np| &np.name == name && np.protocol == proto)
                {
                    b.allow(proto, Some(PortRange::single(np.port)));
                }
            }
        }
    }
}

/// Off-overlay port entries of a rule: names cannot be resolved off the overlay and are dropped.
/// `None` when the rule names ports but none is numeric: it then allows nothing off the overlay.
fn numeric_ports(ports: Option<&Vec<NetworkPolicyPort>>) -> Option<Vec<PortMatch>> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return Some(Vec::new());
    };
    let v: Vec<_> = ports
        .iter()
        .filter_map(|p| {
            let proto = protocol_of(p.protocol.as_deref()).ok()?;
            match &p.port {
                None => Some((proto, None)),
                Some(IntOrString::Int(n)) => Some((
                    proto,
                    Some((*n as u16, p.end_port.map_or(*n as u16, |e| e as u16))),
                )),
                Some(IntOrString::String(_)) => None,
            }
        })
        .collect();
    if v.is_empty() { None } else { Some(v) }
}

struct Compiler {
    infos: Vec<IdentityInfo>,
    blocks: Vec<(IpNetwork, Vec<IpNetwork>)>,
    acl: AclBuilder,
    isolation: Vec<Isolation>,
    egress_allows: Vec<Vec<EgressAllow>>,
}

impl Compiler {
    /// Identities a NetworkPolicy peer selects (in the policy's namespace `ns`).
    fn peer_identities(&self, ns: &str, peer: &NetworkPolicyPeer) -> Vec<Identity> {
        if let Some(b) = &peer.ip_block {
            let Some(block) = parse_block(b) else {
                return Vec::new();
            };
            let Some(idx) = self.blocks.iter().position(|x| *x == block) else {
                return Vec::new();
            };
            return (0..self.infos.len())
                .filter(|&i| self.infos[i].facts.ip_blocks.contains(&(idx as u32)))
                .map(|i| Identity(i as u32))
                .collect();
        }
        self.select(
            ns,
            peer.pod_selector.as_ref(),
            peer.namespace_selector.as_ref(),
        )
    }

    fn select(
        &self,
        ns: &str,
        pods: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
        namespaces: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    ) -> Vec<Identity> {
        (0..self.infos.len())
            .filter(|&i| {
                let info = &self.infos[i];
                let ns_ok = match namespaces {
                    Some(sel) => policy::matches(sel, &info.ns_labels),
                    None => info.facts.namespace == ns,
                };
                ns_ok && pods.is_none_or(|sel| policy::matches(sel, &info.facts.labels))
            })
            .map(|i| Identity(i as u32))
            .collect()
    }

    fn all(&self) -> Vec<Identity> {
        (0..self.infos.len()).map(|i| Identity(i as u32)).collect()
    }

    fn apply(&mut self, np: &NetworkPolicy) {
        let Some(spec) = &np.spec else { return };
        let ns = np
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let selected = self.select(
            &ns,
            Some(&spec.pod_selector.clone().unwrap_or_default()),
            None,
        );
        if selected.is_empty() {
            return;
        }
        let (ingress, egress) = policy::types(np);
        if ingress {
            for x in &selected {
                self.isolation[x.0 as usize].ingress = true;
            }
            for rule in spec.ingress.iter().flatten() {
                let peers = match rule.from.as_ref().filter(|f| !f.is_empty()) {
                    None => self.all(),
                    Some(from) => {
                        let mut v: Vec<Identity> = from
                            .iter()
                            .flat_map(|p| self.peer_identities(&ns, p))
                            .collect();
                        v.sort();
                        v.dedup();
                        v
                    }
                };
                for x in &selected {
                    let dst_ports = self.infos[x.0 as usize].facts.ports.clone();
                    for y in &peers {
                        add_ports(self.acl.ingress(*y, *x), rule.ports.as_ref(), &dst_ports);
                    }
                }
            }
        }
        if egress {
            for x in &selected {
                self.isolation[x.0 as usize].egress = true;
            }
            for rule in spec.egress.iter().flatten() {
                let to = rule.to.as_ref().filter(|t| !t.is_empty());
                let (peers, off_overlay): (Vec<Identity>, Vec<(IpNetwork, Vec<IpNetwork>)>) =
                    match to {
                        None => (
                            self.all(),
                            vec![
                                ("0.0.0.0/0".parse().expect("valid"), vec![]),
                                ("::/0".parse().expect("valid"), vec![]),
                            ],
                        ),
                        Some(to) => {
                            let mut v: Vec<Identity> = to
                                .iter()
                                .flat_map(|p| self.peer_identities(&ns, p))
                                .collect();
                            v.sort();
                            v.dedup();
                            let blocks = to
                                .iter()
                                .filter_map(|p| p.ip_block.as_ref().and_then(parse_block))
                                .collect();
                            (v, blocks)
                        }
                    };
                for x in &selected {
                    for y in &peers {
                        let dst_ports = self.infos[y.0 as usize].facts.ports.clone();
                        add_ports(self.acl.egress(*x, *y), rule.ports.as_ref(), &dst_ports);
                    }
                    if let Some(ports) = numeric_ports(rule.ports.as_ref()) {
                        for (cidr, except) in &off_overlay {
                            self.egress_allows[x.0 as usize].push(EgressAllow {
                                cidr: *cidr,
                                except: except.clone(),
                                ports: ports.clone(),
                            });
                        }
                    }
                }
            }
        }
    }

    fn keyway_peer(
        &self,
        ns: &str,
        p: &Peer,
        externals: &HashMap<String, Vec<Identity>>,
    ) -> Vec<Identity> {
        if let Some(e) = &p.external {
            return externals.get(e).cloned().unwrap_or_default();
        }
        if p.pod_selector.is_none() && p.namespace_selector.is_none() {
            return Vec::new();
        }
        self.select(ns, p.pod_selector.as_ref(), p.namespace_selector.as_ref())
    }
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
    let sap_of = |node_name: &str| -> Option<SocketAddr> {
        if node_name == node.node_name {
            return node.local_sap;
        }
        model
            .nodes
            .get(node_name)
            .and_then(|n| n.address)
            .map(|a| SocketAddr::new(a, node.gue_port))
    };

    // 1. Every overlay endpoint: this node's attachments first (authoritative for this node),
    //    then the pods other agents published, then the external entities.
    let mut endpoints: Vec<Endpoint> = Vec::new();
    let mut seen: FastSet<IpAddr> = FastSet::default();
    for l in locals {
        let pod = l.pod.as_ref().and_then(|k| model.pods.get(k));
        endpoints.push(Endpoint {
            entity: l.entity.clone(),
            namespace: l
                .pod
                .as_ref()
                .map(|k| k.namespace.clone())
                .unwrap_or_default(),
            labels: pod.map(|p| p.labels.clone()).unwrap_or_default(),
            ports: pod.map(|p| p.ports.clone()).unwrap_or_default(),
            overlay_ips: l.overlay_ips.clone(),
            infra: SocketAddr::new(l.infra_ip, node.gue_port),
            sap: node.local_sap,
            keys: keys.ring(&l.entity, node.rotation, now_ms),
            local: true,
        });
        seen.extend(l.overlay_ips.iter().copied());
    }
    for (key, a) in &model.attachments {
        if a.node == node.node_name {
            continue;
        }
        // An attachment whose pod object is gone is stale: the pod was deleted.
        let Some(pod) = model.pods.get(key) else {
            continue;
        };
        if a.overlay_ips.iter().any(|ip| seen.contains(ip)) {
            tracing::warn!(pod = %key, "overlay address already in use by another endpoint; ignoring");
            continue;
        }
        seen.extend(a.overlay_ips.iter().copied());
        let entity = pod_entity(key);
        endpoints.push(Endpoint {
            keys: keys.ring(&entity, node.rotation, now_ms),
            entity,
            namespace: key.namespace.clone(),
            labels: pod.labels.clone(),
            ports: pod.ports.clone(),
            overlay_ips: a.overlay_ips.clone(),
            infra: SocketAddr::new(a.infra_ip, node.gue_port),
            sap: sap_of(&a.node),
            local: false,
        });
    }
    let mut external_names: HashMap<String, usize> = HashMap::new();
    for e in &model.externals {
        if e.spec.overlay_ips.iter().any(|ip| seen.contains(ip)) {
            continue;
        }
        seen.extend(e.spec.overlay_ips.iter().copied());
        let entity = external_entity(&e.namespace, &e.name);
        external_names.insert(format!("{}/{}", e.namespace, e.name), endpoints.len());
        endpoints.push(Endpoint {
            keys: keys.static_ring(&entity),
            entity,
            namespace: e.namespace.clone(),
            labels: e.labels.clone(),
            ports: Vec::new(),
            overlay_ips: e.spec.overlay_ips.clone(),
            infra: e.spec.address,
            sap: sap_of(&e.spec.gateway),
            local: false,
        });
    }

    // 2. ipBlocks referenced by any policy, so identities can record which hold their address.
    let mut blocks: Vec<(IpNetwork, Vec<IpNetwork>)> = Vec::new();
    for np in &model.policies {
        let spec = np.spec.as_ref();
        let peers = spec
            .into_iter()
            .flat_map(|s| {
                s.ingress
                    .iter()
                    .flatten()
                    .flat_map(|r| r.from.iter().flatten())
            })
            .chain(spec.into_iter().flat_map(|s| {
                s.egress
                    .iter()
                    .flatten()
                    .flat_map(|r| r.to.iter().flatten())
            }));
        for p in peers {
            if let Some(b) = p.ip_block.as_ref().and_then(parse_block)
                && !blocks.contains(&b)
            {
                blocks.push(b);
            }
        }
    }

    // 3. Identities, one per distinct set of facts; each address gets its own (ipBlocks differ
    //    by address).
    let mut by_facts: HashMap<Facts, Identity> = HashMap::new();
    let mut infos: Vec<IdentityInfo> = Vec::new();
    let mut ip_identity: Vec<Vec<Identity>> = Vec::new();
    for ep in &endpoints {
        let mut ids = Vec::new();
        for ip in &ep.overlay_ips {
            // A block holds the endpoint when it holds the overlay address, or the pod IP that
            // Kubernetes reports (the infrastructure address) in the same family: policies
            // written against pod IPs keep their meaning on the overlay.
            let infra = ep.infra.ip();
            let ip_blocks = (0..blocks.len() as u32)
                .filter(|&i| {
                    let b = &blocks[i as usize];
                    in_block(*ip, b) || (infra.is_ipv4() == ip.is_ipv4() && in_block(infra, b))
                })
                .collect();
            let mut ports = ep.ports.clone();
            ports.sort();
            let facts = Facts {
                namespace: ep.namespace.clone(),
                labels: ep.labels.clone(),
                ports,
                ip_blocks,
            };
            let id = *by_facts.entry(facts.clone()).or_insert_with(|| {
                infos.push(IdentityInfo {
                    ns_labels: model.namespace_labels(&facts.namespace),
                    facts,
                });
                Identity((infos.len() - 1) as u32)
            });
            ids.push(id);
        }
        ip_identity.push(ids);
    }

    // 4. Policy.
    let strict = model.config.policy_mode == PolicyMode::Strict;
    let n = infos.len();
    let mut c = Compiler {
        blocks,
        acl: Acl::builder(),
        isolation: vec![
            Isolation {
                ingress: strict,
                egress: false
            };
            n
        ],
        egress_allows: vec![Vec::new(); n],
        infos,
    };
    for _ in 0..n {
        c.acl.identity(Isolation::default());
    }
    for np in &model.policies {
        c.apply(np);
    }
    let ext_ids: HashMap<String, Vec<Identity>> = external_names
        .iter()
        .map(|(k, &i)| (k.clone(), ip_identity[i].clone()))
        .collect();
    for d in &model.direct_paths {
        let a = c.keyway_peer(&d.namespace, &d.spec.a, &ext_ids);
        let b = c.keyway_peer(&d.namespace, &d.spec.b, &ext_ids);
        for x in &a {
            for y in &b {
                c.acl.direct(*x, *y);
            }
        }
    }
    for (i, iso) in c.isolation.iter().enumerate() {
        c.acl.set_isolation(Identity(i as u32), *iso);
    }

    // 5. FIB, SaPs, local keys and egress.
    let mut fib = Fib::builder();
    let mut out = Compiled {
        identities: n,
        endpoints: endpoints.len(),
        ..Default::default()
    };
    for (ep, ids) in endpoints.iter().zip(&ip_identity) {
        for (ip, id) in ep.overlay_ips.iter().zip(ids) {
            let route = Route {
                entity: ep.entity.clone(),
                identity: *id,
                keys: ep.keys,
                infra: ep.infra,
                sap: ep.sap,
            };
            if let Err(e) = fib.insert(IpNetwork::from(*ip), route) {
                tracing::warn!(error = %e, entity = %ep.entity, "duplicate overlay address");
            }
        }
        if ep.local {
            out.local_keys.insert(ep.entity.clone(), ep.keys);
            let id = ids.first().copied();
            let egress = match id {
                Some(id) if c.isolation[id.0 as usize].egress => {
                    Egress::Allow(c.egress_allows[id.0 as usize].clone())
                }
                _ => Egress::Open,
            };
            out.egress.insert(ep.entity.clone(), egress);
        }
    }
    let mut saps = FastSet::default();
    saps.extend(node.local_sap.map(|s| s.ip()));
    saps.extend(model.nodes.values().filter_map(|n| n.address));
    out.tables = Tables {
        fib: fib.build(),
        acl: c.acl.build(),
        saps,
        generation,
    };
    out
}

/// Which overlay networks a pod joins, by the networks' selectors.
pub fn networks_for(model: &Model, pod: Option<&PodKey>) -> Vec<crate::model::OverlayNetwork> {
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
            n.spec
                .pod_selector
                .as_ref()
                .is_none_or(|s| policy::matches(s, &labels))
                && n.spec
                    .namespace_selector
                    .as_ref()
                    .is_none_or(|s| policy::matches(s, &ns_labels))
        })
        .collect()
}

/// A readable summary of who may talk to whom, for `/debug` and logs.
pub fn describe(c: &Compiled) -> BTreeMap<String, usize> {
    BTreeMap::from([
        ("identities".to_string(), c.identities),
        ("endpoints".to_string(), c.endpoints),
        ("allow_sets".to_string(), c.tables.acl.allow_set_count()),
        ("fib_entries".to_string(), c.tables.fib.len()),
    ])
}
