//! keyway's nftables table in each pod's network namespace: service traffic that reaches the pod
//! any way but the overlay is dropped, traffic the pod sends to another protected pod's pod IP is
//! steered into its overlay device, and an egress-isolated pod reaches nothing off the overlay
//! unless its policy's ipBlocks allow it.
//!
//! Every exemption is a rule with a comment saying why (`nft list table inet keyway` shows them):
//! - loopback, both ways: a pod talking to itself is never blocked — except what ztunnel (Istio
//!   ambient) hands to the pod's applications from another meshed workload, which policy checks
//!   on its real port in the `mesh-ingress` chain ([`MeshIngress`]);
//! - the overlay devices, both ways: keyway's endpoint enforces policy there. A connection that
//!   travels the overlay gets [`OVERLAY_CT_MARK`];
//! - replies to connections the pod opened off the overlay (`ct state established,related`
//!   without that mark): an overlay connection's replies, and ICMP errors about it, are accepted
//!   on the overlay device only, never on `eth0`, where a neighbour could forge them;
//! - GUE to the pod's keyway endpoint: UDP 6080 in only to the pod's address and to a socket
//!   with keyway's mark; out only with keyway's socket mark (which needs CAP_NET_RAW). Every
//!   datagram is then checked by key. Unmarked GUE going out is dropped whatever the egress
//!   policy: a workload has no business speaking it;
//! - the node itself: in, from the primary CNI's gateways, `nodeAddresses` and Istio's probe
//!   addresses ([`ISTIO_PROBE_SOURCES`]): kubelet's health probes; out, to the node's addresses
//!   (NetworkPolicy never blocks traffic between a pod and its node; what the node forwards to
//!   a protected pod goes through its gateway, checked);
//! - IPv6 neighbour solicitations and advertisements, without which the pod's IPv6 underlay
//!   would not work (router advertisements and redirects are not admitted).
//!
//! The `forward` chain drops everything: a pod does not route.
//!
//! Steering: the `steer` chain (a route chain on the output hook) adds [`STEER_MARK`] to what the
//! pod sends to a protected pod's pod IP (the set `peers4` or `peers6`, of the pod IP's family);
//! the plugin's routing rule sends marked packets to table [`STEER_TABLE`], whose only route is
//! the overlay device, and the output chain accepts them (the hook still names `eth0` as their
//! way out, so `oifname` cannot tell). So
//! a connection to a pod IP — a client handed one, a headless Service, a StatefulSet's pod name —
//! travels the overlay, with its keys and policy checks, like one to an overlay address. keyway's
//! own GUE (its socket's mark) is never steered.
//!
//! The table is replaced whole in one transaction, by the plugin at ADD (egress closed, nothing
//! steered yet) and by the agent whenever the pod's egress policy or the protected pods change.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnetwork::IpNetwork;
use keyway_core::packet::{PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use keyway_sap::io::netlink::{self, MarkRule, NetlinkError};
use keyway_sap::io::nft::{
    Chain, ChainKind, Family, Hook, Policy, Rule, Set, Table, Verdict, ct_state,
};
use keyway_sap::io::udp::GUE_MARK;
use keyway_sap::sys::Netns;

pub const TABLE: &str = "keyway";
/// The table of the Service ports a pod translates: kept apart from [`TABLE`], and updated in
/// place rather than replaced, so that `sessionAffinity` outlives policy changes.
pub const SERVICES_TABLE: &str = "keyway-services";
/// Where the services chain runs: just after destination NAT's priority (-100), so that a mesh's
/// in-pod redirection at dstnat (Istio ambient's, to ztunnel) takes the application's connection
/// first, and keyway translates what the mesh's proxy then opens (the first NAT of a connection
/// is the one that holds).
const DNAT_PRIORITY: i32 = -99;
pub const FAMILY: Family = Family::Inet;
/// Before other filter chains: keyway's drop is final whatever they accept.
const PRIORITY: i32 = -10;
/// The steering chain runs where mangling does, before the filter chains see the new route.
const STEER_PRIORITY: i32 = -150;
/// The mark bit that sends a packet to [`STEER_TABLE`] (one bit, added to whatever mark the packet
/// has; clear of kube-proxy's, Istio's and keyway's GUE marks).
pub const STEER_MARK: u32 = 0x0040_0000;
/// The routing table whose only route is the pod's overlay device.
pub const STEER_TABLE: u32 = 6080;
/// The priority of the routing rule that looks marked packets up in [`STEER_TABLE`] (after the
/// `local` table's rule, before `main`'s).
pub const STEER_RULE_PRIORITY: u32 = 6080;
/// The conntrack mark bit of a connection that travels the overlay: its replies are accepted on
/// the overlay device only, never on `eth0` (where a neighbour could forge them).
pub const OVERLAY_CT_MARK: u32 = 0x0080_0000;
/// The conntrack mark (in the bits of [`ISTIO_INPOD_MARK_MASK`]) Istio's in-pod rules give a
/// connection that ztunnel opened inside an ambient pod to deliver to its application, with the
/// client's address as source (from the mark 0x539 of ztunnel's sockets, at prerouting, so its
/// first packet has it on input): its replies must go back to ztunnel (Istio's routing rule for
/// this mark), not into keyway's overlay. Only the connection mark tells such a connection's
/// packets apart: after the first, Istio's rules replace the packets' mark with it.
pub const ISTIO_INPOD_CONN_MARK: u32 = 0x111;
/// The bits of the packet and connection marks Istio's in-pod rules use.
pub const ISTIO_INPOD_MARK_MASK: u32 = 0xfff;
/// The source address Istio's CNI gives kubelet's probes of an ambient pod, IPv4 and IPv6: the
/// node, for the pod's table.
pub const ISTIO_PROBE_SOURCES: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 7, 127)),
    IpAddr::V6(Ipv6Addr::new(
        0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
    )),
];
/// The loopback addresses: a connection redirected to a local socket (destination NAT in the
/// output hook) is routed to `lo` again, but later chains still see the first route's device.
const LOOPBACK: [IpNetwork; 2] = [
    IpNetwork::V4(ipnetwork::Ipv4Network::new_checked(Ipv4Addr::new(127, 0, 0, 0), 8).unwrap()),
    IpNetwork::V6(ipnetwork::Ipv6Network::new_checked(Ipv6Addr::LOCALHOST, 128).unwrap()),
];
/// The ICMPv6 types neighbour discovery needs between a pod and its neighbours (RFC 4861): router
/// solicitations and advertisements and redirects are not among them (a pod's routes come from
/// its CNI).
const NEIGHBOUR_SOLICITATION: u8 = 135;
const NEIGHBOUR_ADVERTISEMENT: u8 = 136;

/// What the pod's table is made from, besides its egress policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFirewall {
    pub overlay_devices: Vec<String>,
    /// The pod's IP from the primary CNI: its family is the one steered (the plugin's routing rule
    /// is for that family only).
    pub pod_ip: IpAddr,
    pub gue_port: u16,
    pub node_addresses: Vec<IpNetwork>,
}

/// A protocol and, optionally, a port range (inclusive).
pub type PortMatch = (u8, Option<(u16, u16)>);

/// A destination off the overlay that an egress-isolated pod may reach (a NetworkPolicy ipBlock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressAllow {
    pub cidr: IpNetwork,
    pub except: Vec<IpNetwork>,
    /// (protocol, port range); empty: every protocol and port.
    pub ports: Vec<PortMatch>,
}

/// The routing rule that sends what the pod's table marks into its overlay device, for one
/// family (the plugin sets up the pod IP's family).
pub fn steer_rule(v6: bool) -> MarkRule {
    MarkRule {
        v6,
        mark: STEER_MARK,
        table: STEER_TABLE,
        priority: STEER_RULE_PRIORITY,
    }
}

/// Removes the steering rules of both families from `netns` (the plugin's DEL, the agent's GC);
/// what is not there is fine. The table's route goes with the overlay device.
pub fn unsteer(netns: &Netns) -> Result<(), NetlinkError> {
    netlink::in_netns(netns, async move |nl| {
        for v6 in [false, true] {
            nl.delete_mark_rule(steer_rule(v6)).await?;
        }
        Ok(())
    })
}

/// What the agent keeps current in a pod's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRules {
    /// The pod's egress policy for destinations off the overlay.
    pub egress: Egress,
    /// The pod IPs of the protected pods, which the pod reaches through its overlay device.
    pub peers: Vec<IpAddr>,
    /// The Service ports the pod's namespace translates itself.
    pub services: Vec<ServiceNat>,
    /// For a pod in Istio's ambient mesh: what ztunnel may hand to its applications.
    pub mesh: Option<MeshIngress>,
}

impl PodRules {
    /// What the plugin installs at ADD: egress closed, nothing steered, until the agent's word.
    pub fn closed() -> PodRules {
        PodRules {
            egress: Egress::Closed,
            peers: Vec::new(),
            services: Vec::new(),
            mesh: None,
        }
    }
}

/// Istio ambient: ztunnel carries a meshed client's connection as HBONE to the pod's port 15008
/// (which keyway's policy allows when the pair allows some TCP port) and hands it to the
/// application over `lo`, from the client's address, on the application's real port. Here that
/// last hop is checked against policy for the real port. A connection ztunnel hands over from an
/// address that is not a meshed workload's arrived in plaintext on its real port, through
/// keyway's checks, and is not checked again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshIngress {
    /// The addresses (overlay and pod IPs) of every other meshed workload.
    pub sources: Vec<IpAddr>,
    /// The TCP ports policy allows from each group of them; a source in no group is allowed
    /// nothing.
    pub allows: Vec<MeshAllow>,
}

/// Sources and the TCP port ranges (inclusive) policy allows from them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MeshAllow {
    pub sources: Vec<IpAddr>,
    pub ports: Vec<(u16, u16)>,
}

/// One port of one cluster IP of a Service, with the endpoints a connection to it may go to:
/// kube-proxy's job for it, done in the client pod's namespace before routing, so that the
/// translated connection (to a protected pod's pod IP) is steered into the overlay.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceNat {
    /// `namespace/name`.
    pub service: String,
    pub cluster_ip: IpAddr,
    /// IP protocol number.
    pub protocol: u8,
    pub port: u16,
    /// `sessionAffinity: ClientIP`: the timeout in seconds.
    pub affinity_secs: Option<u32>,
    /// (address, target port), as kube-proxy would choose among them; never empty.
    pub endpoints: Vec<(IpAddr, u16)>,
}

impl ServiceNat {
    /// A name unique in the table: `ns/name/proto/ip:port`.
    fn id(&self) -> String {
        format!(
            "{}/{}/{}",
            self.service,
            proto_name(self.protocol),
            SocketAddr::new(self.cluster_ip, self.port)
        )
    }
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

/// The pod's egress policy for destinations off the overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Egress {
    /// Nothing leaves but the exemptions: the state between ADD and the agent's first word.
    Closed,
    /// Not egress-isolated.
    Open,
    /// Egress-isolated, with these allows.
    Allow(Vec<EgressAllow>),
}

impl PodFirewall {
    pub fn table(&self, rules: &PodRules) -> Table {
        let peers = self.peer_set(&rules.peers);
        let (mut input, output) = self.filter_rules(&peers);
        let mut sets = vec![peers.clone()];
        let mut mesh_chain = None;
        if let Some(mesh) = &rules.mesh {
            let (jumps, chain, mut mesh_sets) = mesh_ingress(mesh, sets.len() as u32 + 1);
            // Before loopback's exemption, which would accept it.
            input.splice(0..0, jumps);
            mesh_chain = Some(chain);
            sets.append(&mut mesh_sets);
        }
        let mut chains = vec![
            Chain::base("input", Hook::Input, PRIORITY, Policy::Accept, input),
            Chain::base("output", Hook::Output, PRIORITY, Policy::Accept, output),
            Chain::base(
                "forward",
                Hook::Forward,
                PRIORITY,
                Policy::Accept,
                vec![
                    Rule::new()
                        .counter()
                        .drop_()
                        .comment("a pod does not route: nothing passes through it"),
                ],
            ),
        ];
        chains.extend(egress_chains(&rules.egress));
        chains.extend(mesh_chain);
        chains.push(self.steer_chain(&peers));
        Table {
            family: FAMILY,
            name: TABLE.into(),
            sets,
            chains,
        }
    }

    /// The input and output chains' rules: every exemption, then the drop, and the jump to the
    /// egress policy.
    fn filter_rules(&self, peers: &Set) -> (Vec<Rule>, Vec<Rule>) {
        let mut input = vec![
            Rule::new()
                .iifname("lo")
                .accept()
                .comment("loopback is never blocked"),
        ];
        let mut output = vec![
            Rule::new()
                .oifname("lo")
                .accept()
                .comment("loopback is never blocked"),
        ];
        for lo in LOOPBACK {
            output.push(Rule::new().daddr(lo).accept().comment(
                "loopback is never blocked: redirected to the pod itself (as Istio's in-pod rules redirect to ztunnel), oifname still says eth0",
            ));
        }
        for dev in &self.overlay_devices {
            input.push(
                Rule::new()
                    .iifname(dev)
                    .accept()
                    .comment("the overlay: keyway's endpoint enforces policy"),
            );
            output.push(
                Rule::new()
                    .oifname(dev)
                    .or_ct_mark(OVERLAY_CT_MARK)
                    .accept()
                    .comment(
                        "the overlay: keyway's endpoint enforces policy; replies come back on it",
                    ),
            );
        }
        input.push(neighbour_discovery());
        input.push(
            Rule::new()
                .ipv6_reverse_path_fails()
                .counter()
                .drop_()
                .comment("IPv6 source not routed back through the interface it came in on (strict reverse-path filter; IPv4's is the sysctl)"),
        );
        output.push(
            Rule::new()
                .daddr_in(peers)
                .mark_bits(STEER_MARK)
                .or_ct_mark(OVERLAY_CT_MARK)
                .accept()
                .comment("steered: rerouted into the overlay device (oifname still says eth0)"),
        );
        let established = ct_state::ESTABLISHED | ct_state::RELATED;
        input.push(
            Rule::new()
                .ct_state(established)
                .ct_mark_lacks(OVERLAY_CT_MARK | STEER_MARK)
                .accept()
                .comment("replies to connections the pod opened off the overlay (an overlay connection's come back on the overlay only)"),
        );
        output.push(
            Rule::new()
                .ct_state(established)
                .accept()
                .comment("replies within allowed connections"),
        );
        input.push(
            Rule::new()
                .daddr(IpNetwork::from(self.pod_ip))
                .l4proto(PROTO_UDP)
                .dport_range(self.gue_port, self.gue_port)
                .socket_mark(GUE_MARK)
                .accept()
                .comment("GUE to keyway's endpoint socket (its address, its mark): each datagram is checked by key"),
        );
        output.push(
            Rule::new()
                .mark(GUE_MARK)
                .l4proto(PROTO_UDP)
                .sport(self.gue_port)
                .accept()
                .comment(
                    "GUE from keyway's endpoint (marked; a workload needs CAP_NET_RAW to mark)",
                ),
        );
        output.push(
            Rule::new()
                .l4proto(PROTO_UDP)
                .dport_range(self.gue_port, self.gue_port)
                .counter()
                .drop_()
                .comment("GUE that keyway's endpoint did not send: workloads never speak it"),
        );
        for node in self.node_sources() {
            input.push(Rule::new().saddr(node).accept().comment(
                "the node itself: kubelet's (and Istio's) probes; policy never blocks the node",
            ));
        }
        for node in &self.node_addresses {
            output.push(
                Rule::new()
                    .daddr(*node)
                    .accept()
                    .comment("the node: policy never blocks the node (what it forwards to a protected pod goes through its gateway)"),
            );
        }
        output.push(neighbour_discovery());
        input.push(
            Rule::new()
                .counter()
                .drop_()
                .comment("service traffic that did not come over the overlay"),
        );
        output.push(Rule::new().verdict(Verdict::Jump("egress".into())));
        (input, output)
    }

    /// The sources the pod admits as its node: the node's addresses, and the address Istio's
    /// CNI gives kubelet's probes (`169.254.7.127`, and its IPv6 twin) in ambient mode.
    fn node_sources(&self) -> Vec<IpNetwork> {
        let mut v = self.node_addresses.clone();
        for probe in ISTIO_PROBE_SOURCES.map(IpNetwork::from) {
            if !v.contains(&probe) {
                v.push(probe);
            }
        }
        v
    }
}

/// The input rules that send what ztunnel hands over from a meshed workload to the
/// `mesh-ingress` chain, the chain, and the sets they use (ids from `first_id`).
fn mesh_ingress(mesh: &MeshIngress, first_id: u32) -> (Vec<Rule>, Chain, Vec<Set>) {
    let mut sets = Vec::new();
    let mut set_of = |name: String, addrs: &[IpAddr], ipv6: bool| -> Option<Set> {
        let elements: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| a.is_ipv6() == ipv6)
            .collect();
        if elements.is_empty() {
            return None;
        }
        let id = first_id + sets.len() as u32;
        let set = Set::of(&name, ipv6, id, elements);
        sets.push(set.clone());
        Some(set)
    };
    let mut jumps = Vec::new();
    let mut rules = vec![
        Rule::new()
            .ct_state(ct_state::ESTABLISHED | ct_state::RELATED)
            .accept()
            .comment("within a connection this chain admitted"),
    ];
    for ipv6 in [false, true] {
        let family = if ipv6 { "6" } else { "4" };
        let Some(all) = set_of(format!("mesh{family}"), &mesh.sources, ipv6) else {
            continue;
        };
        jumps.push(
            Rule::new()
                .iifname("lo")
                .ct_mark_masked(ISTIO_INPOD_MARK_MASK, ISTIO_INPOD_CONN_MARK)
                .saddr_in(&all)
                .verdict(Verdict::Jump("mesh-ingress".into()))
                .comment("Istio ambient: ztunnel hands a meshed client's connection to the application; policy on its real port"),
        );
        for (i, allow) in mesh.allows.iter().enumerate() {
            let Some(from) = set_of(format!("mesh-allow-{i}-{family}"), &allow.sources, ipv6)
            else {
                continue;
            };
            for &(start, end) in &allow.ports {
                rules.push(
                    Rule::new()
                        .saddr_in(&from)
                        .l4proto(PROTO_TCP)
                        .dport_range(start, end)
                        .accept()
                        .comment("a port policy allows from these meshed workloads"),
                );
            }
        }
    }
    rules.push(
        Rule::new()
            .counter()
            .drop_()
            .comment("Istio ambient: a port policy does not allow from this meshed workload"),
    );
    (jumps, Chain::regular("mesh-ingress", rules), sets)
}

/// What neighbour discovery needs, accepted both ways on the pod network.
fn neighbour_discovery() -> Rule {
    Rule::new()
        .l4proto(PROTO_ICMPV6)
        .icmp_type_range(NEIGHBOUR_SOLICITATION, NEIGHBOUR_ADVERTISEMENT)
        .accept()
        .comment("IPv6 neighbour discovery (solicitations, advertisements) on the pod network")
}

impl PodFirewall {
    /// The set of the protected pods' pod IPs of the pod IP's family (`peers4` or `peers6`); the
    /// other family is not steered, and reaches a protected pod off the overlay, where its table
    /// drops service traffic.
    fn peer_set(&self, peers: &[IpAddr]) -> Set {
        let ipv6 = self.pod_ip.is_ipv6();
        let name = if ipv6 { "peers6" } else { "peers4" };
        let elements = peers
            .iter()
            .copied()
            .filter(|p| p.is_ipv6() == ipv6)
            .collect();
        Set::of(name, ipv6, 1, elements)
    }

    /// Marks what goes to a protected pod's pod IP for the overlay device. GUE is never steered:
    /// keyway's own goes out as it is, and a workload's goes out `eth0`, where the output chain
    /// drops it.
    fn steer_chain(&self, peers: &Set) -> Chain {
        let rules = vec![
            Rule::new()
                .mark(GUE_MARK)
                .accept()
                .comment("keyway's own GUE goes out as it is"),
            Rule::new()
                .l4proto(PROTO_UDP)
                .dport_range(self.gue_port, self.gue_port)
                .accept()
                .comment("GUE is never steered into the overlay"),
            Rule::new()
                .ct_mark_masked(ISTIO_INPOD_MARK_MASK, ISTIO_INPOD_CONN_MARK)
                .accept()
                .comment("Istio ambient: what ztunnel delivered in this pod is answered to ztunnel, here"),
            Rule::new()
                .daddr_in(peers)
                .or_mark(STEER_MARK)
                .comment("a protected pod's pod IP: through the overlay"),
            Rule::new()
                .ct_mark_bits(STEER_MARK)
                .or_mark(STEER_MARK)
                .comment("a Service connection translated to a protected pod: through the overlay"),
        ];
        Chain {
            kind: ChainKind::Route,
            ..Chain::base("steer", Hook::Output, STEER_PRIORITY, Policy::Accept, rules)
        }
    }
}

impl PodFirewall {
    /// The pod's Service translation: for each Service port of the pod IP's family, a choice
    /// among its endpoints (uniform, or sticky per `sessionAffinity`), then DNAT; an endpoint
    /// that is a protected pod gets the steering mark on the connection, so every packet of it
    /// travels the overlay. Traffic to other Services is left to the node's kube-proxy.
    pub fn services_table(&self, rules: &PodRules) -> Table {
        let ipv6 = self.pod_ip.is_ipv6();
        let peers: HashSet<IpAddr> = rules.peers.iter().copied().collect();
        let mut dispatch = Vec::new();
        let mut chains = Vec::new();
        let mut sets = Vec::new();
        for svc in &rules.services {
            if svc.cluster_ip.is_ipv6() != ipv6 || svc.endpoints.is_empty() {
                continue;
            }
            let name = format!("svc-{}", svc.id());
            dispatch.push(
                Rule::new()
                    .daddr_is(svc.cluster_ip)
                    .l4proto(svc.protocol)
                    .dport_range(svc.port, svc.port)
                    .verdict(Verdict::Goto(name.clone()))
                    .comment(format!("Service {}", svc.service)),
            );
            let (choose, mut eps, mut affinity) = service_chains(svc, &peers, sets.len());
            chains.push(Chain::regular(&name, choose));
            chains.append(&mut eps);
            sets.append(&mut affinity);
        }
        chains.insert(
            0,
            Chain::hooked(
                ChainKind::Nat,
                "services",
                Hook::Output,
                DNAT_PRIORITY,
                dispatch,
            ),
        );
        Table {
            family: FAMILY,
            name: SERVICES_TABLE.into(),
            sets,
            chains,
        }
    }
}

/// One Service port's choosing chain, its endpoints' chains and (with affinity) their sets of
/// recent clients; set ids start after `sets_before`.
fn service_chains(
    svc: &ServiceNat,
    peers: &HashSet<IpAddr>,
    sets_before: usize,
) -> (Vec<Rule>, Vec<Chain>, Vec<Set>) {
    let n = svc.endpoints.len();
    let mut sticky = Vec::new();
    let mut random = Vec::new();
    let mut chains = Vec::new();
    let mut sets = Vec::new();
    for (i, (addr, port)) in svc.endpoints.iter().enumerate() {
        let ep = SocketAddr::new(*addr, *port);
        let chain = format!("ep-{}/{ep}", svc.id());
        let mut rules = Vec::new();
        if let Some(secs) = svc.affinity_secs {
            let set = Set::dynamic(
                &format!("aff-{}/{ep}", svc.id()),
                addr.is_ipv6(),
                (sets_before + sets.len() + 1) as u32,
            );
            sticky.push(
                Rule::new()
                    .saddr_in(&set)
                    .verdict(Verdict::Goto(chain.clone()))
                    .comment("sessionAffinity: ClientIP"),
            );
            rules.push(Rule::new().remember_saddr(&set, secs));
            sets.push(set);
        }
        if peers.contains(addr) {
            rules.push(
                Rule::new()
                    .or_ct_mark(STEER_MARK)
                    .or_mark(STEER_MARK)
                    .comment("a protected pod: the connection travels the overlay"),
            );
        }
        rules.push(
            Rule::new()
                .l4proto(svc.protocol)
                .dnat(*addr, *port)
                .comment(format!("endpoint {ep}")),
        );
        chains.push(Chain::regular(&chain, rules));
        // Uniform: endpoint i is taken with probability 1/(n-i) among those left.
        let pick = if i + 1 < n {
            Rule::new().random_is((n - i) as u32, 0)
        } else {
            Rule::new()
        };
        random.push(pick.verdict(Verdict::Goto(chain)));
    }
    // A client seen recently keeps its endpoint; the others are spread.
    sticky.append(&mut random);
    (sticky, chains, sets)
}

/// The egress chain (and its ipBlock chains) for the pod's policy off the overlay.
fn egress_chains(egress: &Egress) -> Vec<Chain> {
    let mut chains = Vec::new();
    let drop_rest = || {
        Rule::new()
            .counter()
            .drop_()
            .comment("egress-isolated: nothing else leaves off the overlay")
    };
    let egress_rules = match egress {
        Egress::Closed => vec![
            Rule::new()
                .counter()
                .drop_()
                .comment("closed until the agent applies the pod's policy"),
        ],
        Egress::Open => vec![Rule::new().accept().comment("not egress-isolated")],
        Egress::Allow(allows) => {
            let mut rules = Vec::new();
            for (i, a) in allows.iter().enumerate() {
                let name = format!("ipblock-{i}");
                rules.push(Rule::new().verdict(Verdict::Jump(name.clone())));
                chains.push(Chain::regular(&name, ip_block_rules(a)));
            }
            rules.push(drop_rest());
            rules
        }
    };
    chains.push(Chain::regular("egress", egress_rules));
    chains
}

/// One ipBlock: its exceptions return, then what it allows.
fn ip_block_rules(a: &EgressAllow) -> Vec<Rule> {
    let mut sub: Vec<Rule> = a
        .except
        .iter()
        .map(|e| {
            Rule::new()
                .daddr(*e)
                .verdict(Verdict::Return)
                .comment("ipBlock except")
        })
        .collect();
    if a.ports.is_empty() {
        sub.push(Rule::new().daddr(a.cidr).accept().comment("ipBlock"));
    }
    for (proto, range) in &a.ports {
        let r = Rule::new().daddr(a.cidr).l4proto(*proto);
        let r = match range {
            Some((s, e)) => r.dport_range(*s, *e),
            None => r,
        };
        sub.push(r.accept().comment("ipBlock with ports"));
    }
    sub
}
