//! Stage 7: Istio ambient. ztunnel carries a meshed client's TCP to a meshed pod as HBONE, to
//! port 15008 whatever the application's port, which the ACL allows when the pair allows some
//! TCP port; the application's real port is checked where ztunnel hands the connection over, in
//! each local meshed pod's table, against what the ACL says of the pair for TCP.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use keyway_core::acl::{Acl, Identity, PortRange};
use keyway_protocol::firewall::{MeshAllow, MeshIngress};

use super::entities::Entity;

/// The last-hop rules of every local pod in the mesh, by entity. `of_entity` gives each entity's
/// identity per address (stage 3).
pub(super) fn ingress(
    entities: &[Entity],
    of_entity: &[Vec<Identity>],
    acl: &Acl,
) -> HashMap<Arc<str>, MeshIngress> {
    let addressed = |i: usize| entities[i].addresses().zip(of_entity[i].iter().copied());
    let meshed: Vec<(usize, IpAddr, Identity)> = (0..entities.len())
        .flat_map(|i| addressed(i).map(move |(addr, id)| (i, addr, id)))
        .filter(|(_, _, id)| acl.is_mesh(*id))
        .collect();
    let mut ports_of: HashMap<(Identity, Identity), Vec<PortRange>> = HashMap::new();
    let mut out = HashMap::new();
    for (i, e) in entities.iter().enumerate().filter(|(_, e)| e.local) {
        if !addressed(i).any(|(_, id)| acl.is_mesh(id)) {
            continue;
        }
        // The pod's identity for a source of either family (its addresses of one family share one).
        let own = |ipv6: bool| addressed(i).find(|(a, _)| a.is_ipv6() == ipv6).map(|x| x.1);
        let mut sources = Vec::new();
        let mut by_ports: BTreeMap<Vec<(u16, u16)>, Vec<IpAddr>> = BTreeMap::new();
        for &(j, addr, src) in &meshed {
            let Some(dst) = own(addr.is_ipv6()).filter(|_| j != i) else {
                continue;
            };
            sources.push(addr);
            let ports = ports_of
                .entry((src, dst))
                .or_insert_with(|| acl.tcp_ports(src, dst));
            if !ports.is_empty() {
                let key = ports.iter().map(|r| (r.start, r.end)).collect();
                by_ports.entry(key).or_default().push(addr);
            }
        }
        let allows = by_ports
            .into_iter()
            .map(|(ports, sources)| MeshAllow { sources, ports })
            .collect();
        out.insert(e.name.clone(), MeshIngress { sources, allows });
    }
    out
}
