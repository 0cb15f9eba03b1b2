//! Stage 4: policy into allow sets per identity pair. NetworkPolicies isolate the identities they
//! select in the directions they name and add their rules' peers and ports; strict mode isolates
//! every identity's ingress; DirectPaths mark pairs that bypass the SaPs.

use std::collections::{BTreeMap, HashMap};

use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keyway_core::acl::{Acl, AclBuilder, AllowSetBuilder, Identity, Isolation, PortRange};

/// A rule whose peers are more identities than this is kept once per selected identity with its
/// peers as a group (a bitmap), not once per identity pair: beyond it, pairs would make compiled
/// state grow with identities². At or under it, pairs keep a packet's check at one lookup.
const PAIRS_PER_RULE_MAX: usize = 8;
use keyway_protocol::firewall::{EgressAllow, PortMatch};

use super::entities::Entity;
use super::identities::{Block, Identities, parse_block};
use crate::model::{Model, NamedPort, Peer, PolicyMode};
use crate::policy;

/// What policy made of the identities.
#[derive(Debug)]
pub(super) struct Policy {
    pub acl: AclBuilder,
    pub isolation: Vec<Isolation>,
    /// Per identity: the destinations off the overlay its egress policy allows.
    pub egress_allows: Vec<Vec<EgressAllow>>,
}

/// Every destination, both families: what an egress rule without peers allows off the overlay.
fn everywhere() -> Vec<Block> {
    ["0.0.0.0/0", "::/0"]
        .map(|c| (c.parse::<IpNetwork>().expect("valid CIDR"), Vec::new()))
        .to_vec()
}

/// Adds `ports` (resolved against the destination's named ports) to an allow set; an empty list
/// allows everything.
fn add_ports(b: &mut AllowSetBuilder, ports: Option<&Vec<NetworkPolicyPort>>, dst: &[NamedPort]) {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        b.allow_everything();
        return;
    };
    for p in ports {
        let Ok(proto) = policy::protocol(p.protocol.as_deref()) else {
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
                for np in dst
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
            let proto = policy::protocol(p.protocol.as_deref()).ok()?;
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

/// Whether a rule names a port by name (resolved against each destination's ports).
fn names_ports(ports: Option<&Vec<NetworkPolicyPort>>) -> bool {
    ports
        .into_iter()
        .flatten()
        .any(|p| matches!(p.port, Some(IntOrString::String(_))))
}

/// The identities a rule's peers select; every identity when it names none.
fn peers(ids: &Identities, ns: &str, list: Option<&Vec<NetworkPolicyPeer>>) -> Vec<Identity> {
    let Some(list) = list.filter(|l| !l.is_empty()) else {
        return ids.all();
    };
    let mut v: Vec<Identity> = list.iter().flat_map(|p| ids.peer(ns, p)).collect();
    v.sort();
    v.dedup();
    v
}

impl Policy {
    fn new(ids: &Identities, strict: bool) -> Policy {
        let n = ids.len();
        let mut acl = Acl::builder();
        for info in &ids.infos {
            let id = acl.identity(Isolation::default());
            if info.facts.mesh {
                acl.mesh(id);
            }
        }
        Policy {
            acl,
            isolation: vec![
                Isolation {
                    ingress: strict,
                    egress: false
                };
                n
            ],
            egress_allows: vec![Vec::new(); n],
        }
    }

    fn ingress(&mut self, ids: &Identities, ns: &str, np: &NetworkPolicy, selected: &[Identity]) {
        let Some(spec) = &np.spec else { return };
        for x in selected {
            self.isolation[x.0 as usize].ingress = true;
        }
        for rule in spec.ingress.iter().flatten() {
            if rule.from.as_ref().is_none_or(|f| f.is_empty()) {
                // Every source: one allow set per selected identity, not one per pair.
                for x in selected {
                    add_ports(
                        self.acl.ingress_from_any(*x),
                        rule.ports.as_ref(),
                        ids.ports(*x),
                    );
                }
                continue;
            }
            let from = peers(ids, ns, rule.from.as_ref());
            if from.len() > PAIRS_PER_RULE_MAX {
                let group = self.acl.peer_group(&from);
                for x in selected {
                    let b = self.acl.ingress_from_group(group, *x);
                    add_ports(b, rule.ports.as_ref(), ids.ports(*x));
                }
                continue;
            }
            for x in selected {
                for y in &from {
                    add_ports(self.acl.ingress(*y, *x), rule.ports.as_ref(), ids.ports(*x));
                }
            }
        }
    }

    fn egress(&mut self, ids: &Identities, ns: &str, np: &NetworkPolicy, selected: &[Identity]) {
        let Some(spec) = &np.spec else { return };
        for x in selected {
            self.isolation[x.0 as usize].egress = true;
        }
        for rule in spec.egress.iter().flatten() {
            let to = rule.to.as_ref().filter(|t| !t.is_empty());
            let off_overlay: Vec<Block> = match to {
                None => everywhere(),
                Some(to) => to
                    .iter()
                    .filter_map(|p| p.ip_block.as_ref().and_then(parse_block))
                    .collect(),
            };
            // Every destination, with ports that need no destination to resolve (no names): one
            // allow set per selected identity, not one per pair.
            let names = names_ports(rule.ports.as_ref());
            let any = to.is_none() && !names;
            let to = if any { Vec::new() } else { peers(ids, ns, to) };
            // Many destinations: one group per set of named ports they declare (names resolve
            // against the destination), so that each group's ports are the same for all.
            let groups = if to.len() > PAIRS_PER_RULE_MAX {
                let mut by_ports: BTreeMap<&[NamedPort], Vec<Identity>> = BTreeMap::new();
                for y in &to {
                    let key = if names { ids.ports(*y) } else { &[] };
                    by_ports.entry(key).or_default().push(*y);
                }
                by_ports
                    .into_iter()
                    .map(|(named, members)| (self.acl.peer_group(&members), named))
                    .collect()
            } else {
                Vec::new()
            };
            let pairs: &[Identity] = if groups.is_empty() { &to } else { &[] };
            let ports = numeric_ports(rule.ports.as_ref());
            let unprotected: Vec<Block> = to
                .iter()
                .flat_map(|y| ids.off_overlay_pods.get(y.0 as usize).into_iter().flatten())
                .map(|ip| (IpNetwork::from(*ip), Vec::new()))
                .collect();
            for x in selected {
                if any {
                    add_ports(self.acl.egress_to_any(*x), rule.ports.as_ref(), &[]);
                }
                for (group, named) in &groups {
                    let b = self.acl.egress_to_group(*x, *group);
                    add_ports(b, rule.ports.as_ref(), named);
                }
                for y in pairs {
                    add_ports(self.acl.egress(*x, *y), rule.ports.as_ref(), ids.ports(*y));
                }
                let Some(ports) = &ports else { continue };
                for (cidr, except) in off_overlay.iter().chain(&unprotected).cloned() {
                    self.egress_allows[x.0 as usize].push(EgressAllow {
                        cidr,
                        except,
                        ports: ports.clone(),
                    });
                }
            }
        }
    }

    fn network_policy(&mut self, ids: &Identities, np: &NetworkPolicy) {
        let Some(spec) = &np.spec else { return };
        let ns = np.metadata.namespace.as_deref().unwrap_or("default");
        let selected = ids.select(
            ns,
            Some(&spec.pod_selector.clone().unwrap_or_default()),
            None,
        );
        if selected.is_empty() {
            return;
        }
        let (ingress, egress) = policy::types(np);
        if ingress {
            self.ingress(ids, ns, np, &selected);
        }
        if egress {
            self.egress(ids, ns, np, &selected);
        }
    }
}

/// A DirectPath peer: pods by selectors (in the resource's namespace without a namespace
/// selector), or an external entity by name; nothing when it names neither.
fn direct_peer(
    ids: &Identities,
    ns: &str,
    p: &Peer,
    externals: &HashMap<&str, &[Identity]>,
) -> Vec<Identity> {
    if let Some(e) = &p.external {
        return externals
            .get(e.as_str())
            .map(|v| v.to_vec())
            .unwrap_or_default();
    }
    if p.pod_selector.is_none() && p.namespace_selector.is_none() {
        return Vec::new();
    }
    ids.select(ns, p.pod_selector.as_ref(), p.namespace_selector.as_ref())
}

/// Stage 4.
pub(super) fn apply(model: &Model, entities: &[Entity], ids: &Identities) -> Policy {
    let mut p = Policy::new(ids, model.config().policy_mode == PolicyMode::Strict);
    for np in model.policies.values() {
        p.network_policy(ids, np);
    }
    let externals: HashMap<&str, &[Identity]> = entities
        .iter()
        .zip(&ids.of_entity)
        .filter_map(|(e, i)| Some((e.external.as_deref()?, i.as_slice())))
        .collect();
    for d in model.direct_paths.values() {
        let a = direct_peer(ids, &d.namespace, &d.spec.a, &externals);
        let b = direct_peer(ids, &d.namespace, &d.spec.b, &externals);
        for x in &a {
            for y in &b {
                p.acl.direct(*x, *y);
            }
        }
    }
    for (i, iso) in p.isolation.iter().enumerate() {
        p.acl.set_isolation(Identity(i as u32), *iso);
    }
    p
}
