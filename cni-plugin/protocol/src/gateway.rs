//! The node's gateway (the paper's SaP in its gateway role): what reaches a protected pod on this
//! node from off the overlay — a NodePort or LoadBalancer connection that kube-proxy sent here,
//! an unprotected pod, another node — enters the overlay here instead of arriving on the pod's
//! `eth0`, where the pod's table would drop it. The data path (`keyway_core::engine::gateway_ingress`)
//! gives it the identity of its source address (an unprotected pod's own, or the ipBlock region
//! it lies in), checks policy, and sends it with the destination's key from the SaP's socket.
//!
//! How traffic gets here, in the node's namespace:
//! - the `inet keyway-gateway` table's prerouting chain (after kube-proxy's DNAT) marks new
//!   traffic for a local protected pod's pod IP — not GUE (the overlay itself), not replies to
//!   connections the pod opened (they go back as they came). What kube-proxy is about to
//!   that kube-proxy marked for masquerade is taken too, and the mark cleared: it would arrive as
//!   the node, which NetworkPolicy always admits, so it is checked as its real source instead;
//! - a routing rule sends marked packets to a table whose only route is the gateway device;
//! - a pod on the same bridge would be switched to the protected pod at layer 2, past the node's
//!   routing (the prerouting chain still sees it, through `br_netfilter`, as Kubernetes nodes
//!   run it): the `bridge keyway-gateway` table hands marked frames to the bridge itself, so
//!   the node routes them into the gateway too.
//!
//! Traffic the node itself sends (kubelet's probes, hostNetwork pods) is never marked: it goes to
//! the pod directly, and the pod's table admits the node. So probes keep working while the agent
//! restarts. The device persists across restarts (the kernel gateway on it goes on carrying the
//! flows the agent admitted, for as long as the agent's lease holds); without an agent reading
//! it, whatever else is routed into it is dropped there: closed.

use std::net::IpAddr;

use keyway_core::packet::PROTO_UDP;
use keyway_sap::io::netlink::{self, Bridge, MarkRule, NetlinkError};
use keyway_sap::io::nft::{self, Chain, Family, Hook, Policy, Rule, Set, Table, Verdict};

use crate::firewall;

/// The gateway device in the node's namespace.
pub const DEVICE: &str = "kwgw0";
/// The node's nftables table.
pub const TABLE: &str = "keyway-gateway";
/// The routing table whose only route is the gateway device, and its rule's priority.
pub const ROUTE_TABLE: u32 = 6081;
pub const RULE_PRIORITY: u32 = 6081;
/// After kube-proxy's DNAT (-100), so the destination is the pod IP it chose.
const PRIORITY: i32 = -90;

/// What the node's gateway needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// The mark bit that sends a packet to the gateway.
    pub mark: u32,
    /// The mark bit kube-proxy sets on what it masquerades.
    pub masquerade_mark: u32,
    pub gue_port: u16,
}

/// Two sets of `addresses`, named `<name>4` (IPv4, id 1) and `<name>6` (IPv6, id 2).
fn sets_by_family(name: &str, addresses: &[IpAddr]) -> Vec<Set> {
    [(false, 1), (true, 2)]
        .into_iter()
        .map(|(v6, id)| {
            let of_family = addresses
                .iter()
                .copied()
                .filter(|a| a.is_ipv6() == v6)
                .collect();
            Set::of(
                &format!("{name}{}", if v6 { 6 } else { 4 }),
                v6,
                id,
                of_family,
            )
        })
        .collect()
}

/// The node's table for this node's protected pods' pod IPs.
pub fn table(cfg: &GatewayConfig, pods: &[IpAddr]) -> Table {
    let sets = sets_by_family("pods", pods);
    let mut rules = vec![
        Rule::new()
            .ct_reply()
            .verdict(Verdict::Return)
            .comment("replies go back as they came"),
        Rule::new()
            .l4proto(PROTO_UDP)
            .dport_range(cfg.gue_port, cfg.gue_port)
            .verdict(Verdict::Return)
            .comment("GUE: the overlay itself"),
    ];
    for set in &sets {
        rules.push(
            Rule::new()
                .daddr_in(set)
                .set_mark_bits(cfg.mark, cfg.masquerade_mark)
                .comment("a local protected pod, from off the overlay: through the gateway, as its real source (never masqueraded as the node)"),
        );
    }
    Table {
        family: Family::Inet,
        name: TABLE.into(),
        sets,
        chains: vec![Chain::base(
            "prerouting",
            Hook::Prerouting,
            PRIORITY,
            Policy::Accept,
            rules,
        )],
    }
}

/// After `br_netfilter` (0), which runs the IP prerouting hooks (and so the mark) for bridged
/// frames.
const BRIDGE_PRIORITY: i32 = 100;

/// The node's bridge table: frames the prerouting chain marked are delivered to the bridge they
/// came in on, to be routed into the gateway. Which bridge is told by the port the frame came in
/// on when the node has several (this kernel's nftables cannot name a frame's bridge).
///
/// First, anti-spoofing: a frame that comes in on a bridge port (from a pod, never from the node,
/// whose frames the bridge's output hook sees) with the source address of the node itself — a
/// bridge's own address, or Istio's probe address — is dropped. Pods admit the node's addresses
/// as the node; a neighbour must not be able to borrow them.
pub fn bridge_table(cfg: &GatewayConfig, bridges: &[Bridge]) -> Table {
    let mut node: Vec<IpAddr> = bridges
        .iter()
        .flat_map(|b| b.addresses.iter().copied())
        .collect();
    node.extend(firewall::ISTIO_PROBE_SOURCES);
    let sets = sets_by_family("node", &node);
    let mut rules: Vec<Rule> = sets
        .iter()
        .map(|set| {
            Rule::new()
                .frame_saddr_in(set)
                .counter()
                .drop_()
                .comment("a pod claiming the node's address: spoofed")
        })
        .collect();
    let rule = |mac: [u8; 6], port: Option<&str>| {
        let r = match port {
            Some(p) => Rule::new().iifname(p),
            None => Rule::new(),
        };
        r.mark_bits(cfg.mark)
            .deliver_to_bridge(mac)
            .comment("switched to a protected pod from off the overlay: routed, to the gateway")
    };
    match bridges {
        [only] => rules.push(rule(only.mac, None)),
        _ => rules.extend(
            bridges
                .iter()
                .flat_map(|b| b.ports.iter().map(|p| rule(b.mac, Some(p)))),
        ),
    };
    Table {
        family: Family::Bridge,
        name: TABLE.into(),
        sets,
        chains: vec![Chain::base(
            "prerouting",
            Hook::Prerouting,
            BRIDGE_PRIORITY,
            Policy::Accept,
            rules,
        )],
    }
}

/// Deletes the node's tables (the installer's uninstall); whether there were any.
pub fn delete_table() -> Result<bool, nft::NftError> {
    let mut sock = nft::Socket::open()?;
    let inet = sock.delete_table(Family::Inet, TABLE)?;
    let bridge = sock.delete_table(Family::Bridge, TABLE)?;
    Ok(inet || bridge)
}

fn rule(cfg: &GatewayConfig, v6: bool) -> MarkRule {
    MarkRule {
        v6,
        mark: cfg.mark,
        table: ROUTE_TABLE,
        priority: RULE_PRIORITY,
    }
}

/// Routes what the table marks into the gateway device (both families), in the calling
/// process's namespace: the device up, the routing table, the rules. Idempotent.
pub async fn route(cfg: &GatewayConfig) -> Result<(), NetlinkError> {
    let nl = netlink::Netlink::connect()?;
    let link = nl.require_link(DEVICE).await?;
    nl.set_up(link.index, None).await?;
    for v6 in [false, true] {
        if v6 && !std::path::Path::new("/proc/sys/net/ipv6").exists() {
            continue;
        }
        nl.ensure_default_route(v6, ROUTE_TABLE, link.index).await?;
        nl.ensure_mark_rule(rule(cfg, v6)).await?;
    }
    Ok(())
}

/// Removes the rules and the device that [`route`] made, whatever mark they used (the
/// installer's uninstall): what is not there is fine. The device persists across the agent's
/// restarts, so this is what removes it.
pub async fn unroute() -> Result<(), NetlinkError> {
    let nl = netlink::Netlink::connect()?;
    for v6 in [false, true] {
        let any_mark = MarkRule {
            v6,
            mark: 0,
            table: ROUTE_TABLE,
            priority: RULE_PRIORITY,
        };
        while nl.delete_mark_rule(any_mark).await? {}
    }
    nl.delete_link(DEVICE).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_marks_only_new_non_gue_traffic_for_local_pods() {
        let cfg = GatewayConfig {
            mark: 0x0020_0000,
            masquerade_mark: 0x4000,
            gue_port: 6080,
        };
        let t = table(
            &cfg,
            &["10.244.1.2".parse().unwrap(), "fd00::2".parse().unwrap()],
        );
        assert_eq!(
            t.sets[0].elements,
            ["10.244.1.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(t.sets[1].elements, ["fd00::2".parse::<IpAddr>().unwrap()]);
        let rules = &t.chains[0].rules;
        assert_eq!(rules.len(), 4, "two exemptions, then one mark per family");
        let bridge = |name: &str, ports: &[&str]| Bridge {
            name: name.into(),
            mac: [2, 0, 0, 0, 0, 1],
            ports: ports.iter().map(|p| p.to_string()).collect(),
            addresses: vec!["10.244.1.1".parse().unwrap()],
        };
        let b = bridge_table(&cfg, &[bridge("cni0", &["veth1", "veth2"])]);
        assert_eq!(b.family, Family::Bridge);
        assert_eq!(
            b.sets[0].elements,
            ["10.244.1.1", "169.254.7.127"]
                .map(|a| a.parse::<IpAddr>().unwrap())
                .to_vec(),
            "the bridge's address and Istio's probe address are the node's"
        );
        assert_eq!(
            b.chains[0].rules.len(),
            3,
            "anti-spoofing per family; one bridge: every frame is its"
        );
        let two = [
            bridge("cni0", &["veth1", "veth2"]),
            bridge("br1", &["veth3"]),
        ];
        assert_eq!(bridge_table(&cfg, &two).chains[0].rules.len(), 5, "by port");
        assert_eq!(bridge_table(&cfg, &[]).chains[0].rules.len(), 2);
    }
}
