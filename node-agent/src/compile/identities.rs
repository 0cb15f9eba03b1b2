//! Stages 2 and 3: the ipBlocks policies name, and identities. Overlay addresses whose entities
//! share every policy-relevant fact (namespace, labels, named ports, which ipBlocks hold the
//! address) share an identity, so policy becomes allow sets per identity pair and a packet's check
//! never looks at a rule.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::{IPBlock, NetworkPolicyPeer};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use keyway_core::acl::Identity;

use super::entities::Entity;
use crate::model::{Model, NamedPort, in_ambient_mesh};
use crate::policy::{self, Labels};

/// An ipBlock: its CIDR and the exceptions.
pub(super) type Block = (IpNetwork, Vec<IpNetwork>);

pub(super) fn parse_block(b: &IPBlock) -> Option<Block> {
    let cidr = b.cidr.parse().ok()?;
    let except = b
        .except
        .iter()
        .flatten()
        .filter_map(|e| e.parse().ok())
        .collect();
    Some((cidr, except))
}

fn in_block(ip: IpAddr, b: &Block) -> bool {
    b.0.contains(ip) && !b.1.iter().any(|e| e.contains(ip))
}

/// Stage 2: every distinct ipBlock any policy names, in order of first mention.
pub(super) fn referenced_blocks(model: &Model) -> Vec<Block> {
    let mut blocks: Vec<Block> = Vec::new();
    for spec in model.policies.values().filter_map(|np| np.spec.as_ref()) {
        let from = spec
            .ingress
            .iter()
            .flatten()
            .flat_map(|r| r.from.iter().flatten());
        let to = spec
            .egress
            .iter()
            .flatten()
            .flat_map(|r| r.to.iter().flatten());
        for p in from.chain(to) {
            if let Some(b) = p.ip_block.as_ref().and_then(parse_block)
                && !blocks.contains(&b)
            {
                blocks.push(b);
            }
        }
    }
    blocks
}

/// What the identity of an address is made of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Facts {
    pub namespace: String,
    pub labels: Labels,
    pub ports: Vec<NamedPort>,
    /// Indices into the blocks of stage 2 that hold the address.
    pub ip_blocks: Vec<u32>,
    /// An address region off the overlay (no pod, no namespace): only ipBlocks select it.
    pub region: bool,
    /// A pod in Istio's ambient mesh: its TCP travels as HBONE.
    pub mesh: bool,
}

#[derive(Debug)]
pub(super) struct IdentityInfo {
    pub facts: Facts,
    pub ns_labels: Labels,
}

/// The identities, and which one each overlay address of each entity has.
#[derive(Debug)]
pub(super) struct Identities {
    pub infos: Vec<IdentityInfo>,
    pub blocks: Vec<Block>,
    /// Per entity (in stage 1's order), per address (in [`Entity::addresses`]' order).
    pub of_entity: Vec<Vec<Identity>>,
    /// The address space off the overlay, by the ipBlocks that hold it: every CIDR and exception
    /// the policies name, and each family's whole space, with the identity of what lies in it
    /// but in none of the more specific prefixes (longest-prefix match gives exactly that).
    pub regions: Vec<(IpNetwork, Identity)>,
    /// Per identity, the pod IPs of its pods that are off the overlay (unprotected): a protected
    /// pod's egress policy reaches them through its own table, not the overlay.
    pub off_overlay_pods: Vec<Vec<IpAddr>>,
}

/// Stage 3. A block holds an entity's address of one family when it holds the address that
/// names the entity in that family: its pod IP, the address Kubernetes reports and users write
/// policies against; without one (an external entity, or the family of an overlay the pod IP is
/// not in), its overlay address. So an `except` of the pod CIDR excepts the pods, whatever their
/// overlay addresses, and an entity's overlay address and pod IP of one family share an identity.
pub(super) fn assign(model: &Model, entities: &[Entity], blocks: Vec<Block>) -> Identities {
    let mut by_facts: HashMap<Facts, Identity> = HashMap::new();
    let mut infos: Vec<IdentityInfo> = Vec::new();
    let mut of_entity = Vec::with_capacity(entities.len());
    for e in entities {
        let mut ports = e.ports.clone();
        ports.sort();
        let mut ids = Vec::new();
        for ip in e.addresses() {
            let named_by = match e.pod_ip.filter(|p| p.is_ipv4() == ip.is_ipv4()) {
                Some(pod_ip) => vec![pod_ip],
                None => e
                    .overlay_ips
                    .iter()
                    .copied()
                    .filter(|a| a.is_ipv4() == ip.is_ipv4())
                    .collect(),
            };
            let ip_blocks = (0..blocks.len() as u32)
                .filter(|&i| named_by.iter().any(|a| in_block(*a, &blocks[i as usize])))
                .collect();
            let facts = Facts {
                namespace: e.namespace.clone(),
                labels: e.labels.clone(),
                ports: ports.clone(),
                ip_blocks,
                region: false,
                mesh: e.external.is_none()
                    && in_ambient_mesh(&e.labels, &model.namespace_labels(&e.namespace)),
            };
            let id = identity(model, &mut by_facts, &mut infos, facts);
            ids.push(id);
        }
        of_entity.push(ids);
    }
    let mut off_overlay_pods = vec![Vec::new(); infos.len()];
    for (e, ids) in entities.iter().zip(&of_entity) {
        if let (true, Some(ip), Some(id)) = (e.outside, e.pod_ip, ids.last()) {
            off_overlay_pods[id.0 as usize].push(ip);
        }
    }
    let regions = region_prefixes(&blocks)
        .into_iter()
        .map(|p| {
            let facts = Facts {
                namespace: String::new(),
                labels: Labels::new(),
                ports: Vec::new(),
                ip_blocks: blocks_holding(&blocks, p),
                region: true,
                mesh: false,
            };
            (p, identity(model, &mut by_facts, &mut infos, facts))
        })
        .collect();
    Identities {
        infos,
        blocks,
        of_entity,
        regions,
        off_overlay_pods,
    }
}

/// The identity of `facts`, made if new.
fn identity(
    model: &Model,
    by_facts: &mut HashMap<Facts, Identity>,
    infos: &mut Vec<IdentityInfo>,
    facts: Facts,
) -> Identity {
    *by_facts.entry(facts.clone()).or_insert_with(|| {
        infos.push(IdentityInfo {
            ns_labels: model.namespace_labels(&facts.namespace),
            facts,
        });
        Identity((infos.len() - 1) as u32)
    })
}

/// Every prefix the blocks name (CIDRs and exceptions), and `0.0.0.0/0` and `::/0`, sorted.
fn region_prefixes(blocks: &[Block]) -> Vec<IpNetwork> {
    let mut v: Vec<IpNetwork> = blocks
        .iter()
        .flat_map(|(cidr, except)| std::iter::once(*cidr).chain(except.iter().copied()))
        .map(|n| IpNetwork::new(n.network(), n.prefix()).expect("a network's own prefix"))
        .chain([
            "0.0.0.0/0".parse().expect("valid"),
            "::/0".parse().expect("valid"),
        ])
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The blocks that hold every address of `p` that no more specific named prefix holds: those
/// whose CIDR covers `p` and none of whose exceptions does (an exception inside `p` is a named
/// prefix of its own, with its own region).
fn blocks_holding(blocks: &[Block], p: IpNetwork) -> Vec<u32> {
    let covers = |outer: &IpNetwork| {
        outer.is_ipv4() == p.is_ipv4()
            && outer.prefix() <= p.prefix()
            && outer.contains(p.network())
    };
    (0..blocks.len() as u32)
        .filter(|&i| {
            let (cidr, except) = &blocks[i as usize];
            covers(cidr) && !except.iter().any(covers)
        })
        .collect()
}

impl Identities {
    pub fn len(&self) -> usize {
        self.infos.len()
    }

    pub fn all(&self) -> Vec<Identity> {
        (0..self.infos.len()).map(|i| Identity(i as u32)).collect()
    }

    /// Identities selected by a pod selector and a namespace selector (the namespace `ns` when
    /// there is none), ANDed; a missing pod selector selects every pod.
    pub fn select(
        &self,
        ns: &str,
        pods: Option<&LabelSelector>,
        namespaces: Option<&LabelSelector>,
    ) -> Vec<Identity> {
        (0..self.infos.len())
            .filter(|&i| {
                let info = &self.infos[i];
                let ns_ok = match namespaces {
                    Some(sel) => policy::matches(sel, &info.ns_labels),
                    None => info.facts.namespace == ns,
                };
                !info.facts.region
                    && ns_ok
                    && pods.is_none_or(|sel| policy::matches(sel, &info.facts.labels))
            })
            .map(|i| Identity(i as u32))
            .collect()
    }

    /// Identities a NetworkPolicy peer selects (in the policy's namespace `ns`).
    pub fn peer(&self, ns: &str, peer: &NetworkPolicyPeer) -> Vec<Identity> {
        let Some(b) = &peer.ip_block else {
            return self.select(
                ns,
                peer.pod_selector.as_ref(),
                peer.namespace_selector.as_ref(),
            );
        };
        let Some(idx) =
            parse_block(b).and_then(|block| self.blocks.iter().position(|x| *x == block))
        else {
            return Vec::new();
        };
        (0..self.infos.len())
            .filter(|&i| self.infos[i].facts.ip_blocks.contains(&(idx as u32)))
            .map(|i| Identity(i as u32))
            .collect()
    }

    /// The named ports of an identity's pods.
    pub fn ports(&self, id: Identity) -> &[NamedPort] {
        &self.infos[id.0 as usize].facts.ports
    }
}
